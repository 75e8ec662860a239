"""`jinfer inspect` names the checkpoint's family; conversion errors name it and list what is supported."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from jinfer import cli
from jinfer.convert import convert
from jinfer.errors import ConversionError, UnsupportedArchitectureError

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def test_inspect_names_the_source_family(tmp_path, capsys):
    import jax

    out = convert(FIXTURES / "qwen2", tmp_path / "qwen2", progress=False)
    cache_dir = jax.config.jax_compilation_cache_dir
    assert cli.main(["inspect", str(out)]) == 0
    assert jax.config.jax_compilation_cache_dir == cache_dir  # inspect compiles nothing: no cache set up
    text = capsys.readouterr().out
    assert "model_class: Llama (nnx, causal_lm)" in text
    assert "converted from: Qwen2ForCausalLM (qwen2, from huggingface)" in text
    assert json.loads((out / "config.json").read_text())["source"]["model_type"] == "qwen2"


def _gguf(path: Path, arch: str, tokenizer: str | None = None, tensors=("token_embd.weight",)) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(32)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    if tokenizer:
        w.add_tokenizer_model(tokenizer)
        w.add_token_list(["a", "b"])
    for name in tensors:
        w.add_tensor(name, np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_gguf_architecture_is_named_with_the_supported_ones(tmp_path):
    src = _gguf(tmp_path / "f.gguf", "falcon")
    with pytest.raises(UnsupportedArchitectureError, match=r"'falcon'.*GGUF architectures: llama, qwen2"):
        convert(src, tmp_path / "out", progress=False)


def test_unsupported_gguf_tokenizer_lists_supported_ones(tmp_path):
    src = _gguf(tmp_path / "t.gguf", "llama", tokenizer="bert")
    with pytest.raises(ConversionError, match=r"tokenizer model 'bert'.*\['gpt2', 'llama'\]"):
        convert(src, tmp_path / "out", progress=False)


def test_unknown_gguf_tensor_names_the_architecture(tmp_path):
    src = _gguf(tmp_path / "x.gguf", "llama", tensors=("token_embd.weight", "blk.0.attn_sinks.weight"))
    with pytest.raises(UnsupportedArchitectureError, match=r"'blk.0.attn_sinks.weight'.*'llama'"):
        convert(src, tmp_path / "out", progress=False)
