"""GGUF SentencePiece vocabularies and Llama 3.1 `rope_freqs`, with files written by gguf's writer.

- A SentencePiece BPE model is trained here (sentencepiece's trainer, byte fallback, a user-defined
  symbol), written into a GGUF the way llama.cpp's convert_hf_to_gguf does (pieces, scores, token
  types), converted by jinfer, and its token ids compared with the sentencepiece library's.
- The HF llama3_tied fixture (llama3 RoPE scaling) is written as a Llama 3.1-style GGUF: a
  `rope_freqs` tensor instead of scaling metadata; its conversion must give the fixture's golden
  logits.
"""

import io
import json
import math
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jinfer import checkpoint
from jinfer.convert import convert
from jinfer.convert.gguf import (
    llama3_rope_from_factors,
    open_gguf,
    permute_rope_rows,
    tokenizer_files_from_gguf,
)
from jinfer.errors import UnsupportedArchitectureError
from jinfer.tokenizer import Tokenizer

spm = pytest.importorskip("sentencepiece")
FIXTURES = Path(__file__).parent / "fixtures" / "hf"

TRAIN = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Le café est très chaud, mais la crème brûlée est froide.",
    "Der Bär läuft über die Straße und isst Äpfel.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "Η γρήγορη καφέ αλεπού πηδά πάνω από το τεμπέλικο σκυλί.",
    "我们今天去公园散步，天气很好。",
    "東京は日本の首都で、人口がとても多いです。",
    "오늘은 날씨가 좋아서 산책을 했습니다.",
    "Numbers 12345 and 3.14159 appear in text, as do tools like <tool>.",
    "def add(a, b):\n    return a + b  # spaces  matter",
]
SAMPLE = [
    "The lazy dog sleeps.",
    "  two leading spaces and   three inside",
    "trailing space ",
    "Le café brûlé, l'été à Paris.",
    "Straße über Äpfel ÄÖÜ",
    "Ленивая собака спит.",
    "Ο σκύλος κοιμάται.",
    "公园里天气很好。",
    "日本の首都は東京です。",
    "산책을 했습니다",
    "مرحبا بالعالم",  # Arabic: not in training, byte fallback
    "नमस्ते दुनिया",  # Devanagari: byte fallback
    "emoji 🙂🚀 and ∑∞",
    "tabs\tand\nnewlines\n",
    "12345 67890 3.14159",
    "",
    "x",
]
BOS, EOS, UNK = 1, 2, 0


def _train_spm() -> "spm.SentencePieceProcessor":
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN * 5),
        model_writer=model,
        model_type="bpe",
        vocab_size=1000,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # as Llama's tokenizer: GGUF carries no normalizer
        remove_extra_whitespaces=False,
        user_defined_symbols=["<tool>"],
        hard_vocab_limit=False,
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _spm_vocab(sp) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and llama.cpp token types (convert_hf_to_gguf's mapping)."""
    T = gguf.TokenType
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = T.NORMAL
        if sp.is_unknown(i):
            kind = T.UNKNOWN
        elif sp.is_control(i):
            kind = T.CONTROL
        elif sp.is_unused(i):
            kind = T.UNUSED
        elif sp.is_byte(i):
            kind = T.BYTE
        elif sp.IdToPiece(i) == "<tool>":
            kind = T.USER_DEFINED
        types.append(int(kind))
    return tokens, scores, types


def _write_spm_gguf(path: Path, sp) -> Path:
    tokens, scores, types = _spm_vocab(sp)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_unk_token_id(UNK)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def spm_pair(tmp_path_factory):
    """(sentencepiece processor, jinfer Tokenizer converted from the GGUF written from it)."""
    sp = _train_spm()
    tmp = tmp_path_factory.mktemp("spm")
    path = _write_spm_gguf(tmp / "vocab.gguf", sp)
    files = tokenizer_files_from_gguf(open_gguf(path), path)
    out = tmp / "tok"
    out.mkdir()
    (out / "tokenizer.json").write_text(files["tokenizer.json"])
    (out / "tokenizer_config.json").write_text(json.dumps(files["tokenizer_config.json"]))
    return sp, Tokenizer.from_dir(out), files


def test_spm_vocab_ids_equal_sentencepiece(spm_pair):
    sp, tok, _ = spm_pair
    assert tok.vocab_size == sp.get_piece_size()
    byte_pieces = merged = 0
    for text in SAMPLE:
        want = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == want, (text, sp.encode(text, out_type=str))
        assert tok.encode(text) == [BOS, *want]  # add_bos_token
        assert tok.decode(want) == sp.decode(want)
        byte_pieces += sum(sp.is_byte(i) for i in want)
        merged += sum(len(sp.id_to_piece(i).lstrip("\u2581")) > 1 and not sp.is_byte(i) for i in want)
    assert byte_pieces > 20  # the unseen scripts went through byte fallback
    assert merged > 40  # and the seen ones through merges (pieces of several characters)


def test_spm_special_and_user_defined_tokens(spm_pair):
    sp, tok, files = spm_pair
    tool = sp.piece_to_id("<tool>")
    assert tok.encode("<tool>", add_special_tokens=False) == [tool]
    # Control tokens written in text are the special tokens (chat templates write them).
    assert tok.encode("<s>hi</s>", add_special_tokens=False)[0] == BOS
    assert tok.encode("<s>hi</s>", add_special_tokens=False)[-1] == EOS
    assert tok.decode([BOS, *sp.encode("hi there")]) == "hi there"  # skips specials
    cfg = files["tokenizer_config.json"]
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"], cfg["add_bos_token"]) == (
        "<s>",
        "</s>",
        "<unk>",
        True,
    )
    assert files["generation_config.json"] == {"bos_token_id": BOS, "eos_token_id": EOS}


# -- Llama 3.1 rope_freqs ----------------------------------------------------------------------------
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
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[
        hf_name
    ]


def llama_cpp_rope_factors(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """The `rope_freqs` llama.cpp's converter writes for a llama3 rope_scaling (its formula)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _write_llama31_gguf(path: Path) -> Path:
    src = FIXTURES / "llama3_tied"
    cfg = json.loads((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    factors = llama_cpp_rope_factors(head_dim, cfg["rope_theta"], cfg["rope_scaling"])
    w.add_tensor("rope_freqs.weight", factors)
    for name, x in tensors.items():
        if ".q_proj." in name:
            x = permute_rope_rows(x, heads)
        elif ".k_proj." in name:
            x = permute_rope_rows(x, kv_heads)
        w.add_tensor(_gguf_name(name), np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    model, params, _ = checkpoint.load_model_dir(model_dir)
    tokens = jnp.asarray(ids, jnp.int32)[None]
    hidden, _ = model.apply_fn()(params, tokens, jnp.arange(tokens.shape[1], dtype=jnp.int32)[None])
    return np.asarray(model.apply_fn("logits")(params, hidden))[0]


def test_llama31_rope_freqs_gguf_matches_hf_golden_logits(tmp_path):
    golden = np.load(FIXTURES / "llama3_tied" / "golden.npz")
    out = convert(_write_llama31_gguf(tmp_path / "llama31.gguf"), tmp_path / "out", progress=False)
    scaling = dict(json.loads((out / "config.json").read_text())["config"]["rope_scaling"])
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == pytest.approx(8.0)
    info = checkpoint.inspect_model_dir(out)
    assert "converted from: LlamaForCausalLM (llama, from gguf)" in info
    for i in (0, 1):
        expected = golden[f"logits_{i}"]
        diff = np.abs(_logits(out, golden[f"input_ids_{i}"]) - expected).max()
        assert diff <= 2.5e-5 * np.abs(expected).max(), f"prompt {i}: max abs diff {diff:.2e}"


@pytest.mark.parametrize(("factor", "old_len"), [(8.0, 8192), (32.0, 8192), (8.0, 32)])
def test_rope_factors_invert_to_the_same_frequencies(factor, old_len):
    from jinfer.models.layers import rope_inv_freq

    scaling = {
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": old_len,
    }

    head_dim, theta = 128, 500000.0
    factors = llama_cpp_rope_factors(head_dim, theta, scaling)
    got = llama3_rope_from_factors(factors, head_dim, theta)
    want = rope_inv_freq(head_dim, theta, tuple(sorted({**scaling, "rope_type": "llama3"}.items())))
    have = rope_inv_freq(head_dim, theta, tuple(sorted(got.items())))
    np.testing.assert_allclose(have, want, rtol=1e-6)
    if scaling["original_max_position_embeddings"] == 8192:  # enough smooth-band points to fit
        assert (got["original_max_position_embeddings"], got["low_freq_factor"]) == (8192, 1.0)
        assert got["high_freq_factor"] == 4.0


def test_rope_freqs_that_are_not_llama3_are_refused():
    with pytest.raises(UnsupportedArchitectureError, match="rope_freqs"):
        llama3_rope_from_factors(np.asarray([1.0, 3.0, 1.0, 2.0] * 16, np.float32), 128, 500000.0)
    assert llama3_rope_from_factors(np.ones(64, np.float32), 128, 500000.0) is None


def test_spm_token_bytes_join_to_the_text(spm_pair):
    """Byte-fallback pieces ("<0xE4>") are one byte each and pieces keep their leading space, so
    the tokens' bytes (OpenAI's logprobs `bytes`) join to the decoded text's UTF-8."""
    sp, tok, _ = spm_pair
    for text in SAMPLE:
        ids = sp.encode(text)
        raw = b"".join(tok.token_bytes(i) for i in ids)
        assert raw.decode("utf-8").removeprefix(" ") == sp.decode(ids), text
    byte_piece = next(i for i in range(sp.get_piece_size()) if sp.is_byte(i))
    assert tok.token_bytes(byte_piece) == bytes([int(sp.id_to_piece(byte_piece)[3:5], 16)])
