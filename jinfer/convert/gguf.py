"""GGUF files (llama.cpp) -> jinfer model directories.

The GGUF is read with the `gguf` library (memory-mapped). `GGUFSource` presents its tensors under
Hugging Face names and layouts, so the mapping to jinfer params is the HF path's
(`hf.convert_source`); only three things are GGUF-specific:

- dequantization (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants) with
  `gguf.quants.dequantize`, whose block layouts match ggml's reference
  (tests/test_convert.py checks F16, Q8_0, Q4_0 and Q4_1 against hand-built blocks);
- llama.cpp's convert_hf_to_gguf permutes the q/k rows of `llama` models so ggml's RoPE can rotate
  adjacent pairs; `unpermute_rope_rows` restores HF's half-split (rotate_half) layout. `qwen2`,
  `qwen3`, `phi3` and `gemma/2/3` GGUFs use the NeoX RoPE and are not permuted;
- the other families (see `_family_config`): Gemma norms are stored with the +1 of (1 + w) folded
  in (undone at load), Phi-3's LongRoPE factors are tensors (`rope_factors_long/short`) and its
  fused `ffn_up` holds [gate; up];
- the tokenizer: a byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is rebuilt as a `tokenizers`
  tokenizer.json from the vocabulary, merges and token types; SentencePiece ("llama") vocabularies
  are rejected for now.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jinfer.convert import hf
from jinfer.errors import ConversionError, UnsupportedArchitectureError

log = logging.getLogger("jinfer.convert")

GGUF_MAGIC = b"GGUF"
ROPE_FREQS = "rope_freqs.weight"
_GGUF_TO_HF_ARCH = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
}
# Stacked expert tensors ([experts, out, in] in HF layout) and the per-expert HF names they hold:
# Mixtral (GGUF architecture "llama" with experts) and Qwen3-MoE.
_EXPERT_TENSORS = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}
_MOE_HF_NAMES = {
    "llama": ("block_sparse_moe.", {"gate": "w1", "up": "w3", "down": "w2"}),
    "qwen3moe": ("mlp.", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_qkv": "self_attn.qkv_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Where a GGUF tensor name means another HF module in one architecture.
_ARCH_LAYER_TENSORS = {
    "gemma2": {"ffn_norm": "pre_feedforward_layernorm"},
    "gemma3": {"ffn_norm": "pre_feedforward_layernorm"},
    "phi3": {"ffn_up": "mlp.gate_up_proj"},
}
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
# Tensors that hold configuration, read by `_family_config` rather than converted.
_CONFIG_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_BYTE = 6
# tokenizer.ggml.model values: byte-level BPE ("gpt2") and SentencePiece ("llama").
TOKENIZER_MODELS = ("gpt2", "llama")

# Pre-tokenizer split patterns of llama.cpp's `tokenizer.ggml.pre` values (before byte-level mapping).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def gguf_tensor_to_hf(name: str, arch: str = "llama") -> str | None:
    """GGUF tensor name -> HF name ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight").

    A stacked expert tensor maps to a pattern with "{expert}" (one HF tensor per expert), its router
    ("ffn_gate_inp") to the MoE block's gate."""
    if m := _BLOCK.match(name):
        layer, kind, suffix = m.groups()
        if arch in _MOE_HF_NAMES and (kind in _EXPERT_TENSORS or kind == "ffn_gate_inp"):
            prefix, names = _MOE_HF_NAMES[arch]
            module = (
                "gate" if kind == "ffn_gate_inp" else f"experts.{{expert}}.{names[_EXPERT_TENSORS[kind]]}"
            )
            return f"model.layers.{layer}.{prefix}{module}.{suffix}"
        module = _ARCH_LAYER_TENSORS.get(arch, {}).get(kind) or _LAYER_TENSORS.get(kind)
        return f"model.layers.{layer}.{module}.{suffix}" if module else None
    base, _, suffix = name.rpartition(".")
    return f"{_GLOBAL_TENSORS[base]}.{suffix}" if base in _GLOBAL_TENSORS else None


# -- q/k row permutation ---------------------------------------------------------------------------
def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (HF half-split -> interleaved pairs) of q/k rows [n_heads * h, ...].

    Within a head, HF row `half * h/2 + i` moves to row `2 * i + half`.
    """
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_rope_rows`: interleaved pairs -> HF half-split layout."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- reading ---------------------------------------------------------------------------------------
def open_gguf(path: Path) -> Any:
    """A `gguf.GGUFReader` for `path`; ConversionError naming the file when it is not valid GGUF."""
    import gguf

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ConversionError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    from jinfer.limits import check_gguf_header

    check_gguf_header(path)  # counts and lengths vs the file size, before the reader allocates
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError/IndexError/struct.error on damaged files
        if isinstance(e, ValueError) and "GGMLQuantizationType" in str(e):  # a type newer than gguf
            raise UnsupportedArchitectureError(
                f"{path}: a tensor type this gguf package ({_gguf_version()}) does not know: {e}; "
                "upgrade it (pip install -U gguf), or convert a file in a common type (Q4_K_M, Q8_0, F16)"
            ) from e
        raise ConversionError(f"{path}: corrupt or truncated GGUF file: {type(e).__name__}: {e}") from e


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown version"


_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclasses.dataclass
class SplitReader:
    """The parts of a split GGUF (llama.cpp's gguf-split: NAME-00001-of-0000N.gguf, ...) read as
    one file: the first part's metadata, every part's tensors."""

    fields: Mapping[str, Any]
    tensors: list[Any]
    paths: list[Path]


def open_gguf_model(path: Path) -> Any:
    """`open_gguf`, or for any part of a split GGUF a SplitReader over all its parts (a model's
    tensors, the output layer among them, may be in any part); ConversionError naming missing or
    mismatched parts."""
    reader = open_gguf(path)
    count = int(field(reader, "split.count", 1) or 1)
    if count <= 1:
        return reader
    m = _SHARD_NAME.match(path.name)
    if m is None or int(m["count"]) != count:
        raise ConversionError(
            f"{path} is one part of a {count}-part split GGUF (split.count), but its name is not "
            "llama.cpp's NAME-00001-of-0000N.gguf, so the other parts cannot be found; keep the names "
            "the parts were published with"
        )
    paths = [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ConversionError(
            f"{path} is one part of a {count}-part split GGUF; missing {missing} in {path.parent}: "
            "download every part"
        )
    readers = [reader if p == path else open_gguf(p) for p in paths]
    for i, (r, p) in enumerate(zip(readers, paths, strict=True)):
        if int(field(r, "split.no", -1)) != i or int(field(r, "split.count", 0)) != count:
            raise ConversionError(f"{p}: split.no / split.count say it is not part {i + 1} of {count}")
    tensors = [t for r in readers for t in r.tensors]
    names = [t.name for t in tensors]
    expected = field(readers[0], "split.tensors.count", None)
    if len(set(names)) != len(names) or (expected is not None and int(expected) != len(names)):
        raise ConversionError(
            f"{paths[0]}: the {count} parts hold {len(names)} tensors ({len(set(names))} distinct); "
            f"split.tensors.count says {expected}: the parts are not one split of one model"
        )
    return SplitReader(readers[0].fields, tensors, paths)


def field(reader: Any, key: str, default: Any = ...) -> Any:
    """A metadata value (scalars, strings and arrays as Python objects)."""
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise ConversionError(f"GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


def dequantize_tensor(data: np.ndarray, qtype: Any) -> np.ndarray:
    """Raw GGUF tensor data (numpy view of the file, rows of blocks) -> float32 [rows, elements]."""
    from gguf.quants import dequantize

    try:
        return np.asarray(dequantize(data, qtype), dtype=np.float32)
    except NotImplementedError as e:
        raise ConversionError(
            f"GGUF tensor type {getattr(qtype, 'name', qtype)} is not supported: {e}"
        ) from e


@dataclasses.dataclass(frozen=True)
class _ExpertSlice:
    """One expert of a stacked expert tensor."""

    tensor: Any
    index: int


class GGUFSource:
    """GGUF tensors under HF names and layouts: dequantized to float32, q/k un-permuted (llama)."""

    def __init__(self, path: Path, reader: Any, arch: str, n_heads: int, n_kv_heads: int):
        self.path, self.arch, self.n_heads, self.n_kv_heads = path, arch, n_heads, n_kv_heads
        self._tensors = {}
        for t in reader.tensors:
            if t.name == ROPE_FREQS or t.name in _CONFIG_TENSORS:  # read into the config instead
                continue
            hf_name = gguf_tensor_to_hf(t.name, arch)
            if hf_name is None:
                raise UnsupportedArchitectureError(
                    f"{path}: GGUF tensor {t.name!r} is not supported for architecture {arch!r}"
                )
            if "{expert}" in hf_name:  # ggml ne = [in, out, experts]
                for j in range(int(t.shape[-1])):
                    self._tensors[hf_name.format(expert=j)] = _ExpertSlice(t, j)
                continue
            self._tensors[hf_name] = t
        self._stack: tuple[str, np.ndarray] | None = None  # the last dequantized expert stack

    def names(self) -> list[str]:
        return list(self._tensors)

    def read(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        if isinstance(t, _ExpertSlice):  # the converter reads a stack's experts in order
            if self._stack is None or self._stack[0] != t.tensor.name:
                self._stack = (t.tensor.name, self._dequantize(t.tensor))
            return self._stack[1][t.index]
        w = self._dequantize(t)
        if self.arch == "llama" and ".self_attn.q_proj." in name:
            w = unpermute_rope_rows(w, self.n_heads)
        elif self.arch == "llama" and ".self_attn.k_proj." in name:
            w = unpermute_rope_rows(w, self.n_kv_heads)
        elif self.arch in _GEMMA_ARCHS and t.name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w) norm weights with the 1 added
        return w

    def _dequantize(self, t: Any) -> np.ndarray:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml ne[] is innermost-first
        try:
            return dequantize_tensor(t.data, t.tensor_type).reshape(shape)
        except ConversionError as e:
            raise ConversionError(f"{self.path}: tensor {t.name!r}: {e}") from e

    def describe(self) -> str:
        return str(self.path)


def hf_config_from_gguf(reader: Any, path: Path) -> dict[str, Any]:
    """A Hugging Face config.json dict built from GGUF metadata (llama / qwen2)."""
    arch = field(reader, "general.architecture")
    if arch not in _GGUF_TO_HF_ARCH:
        raise UnsupportedArchitectureError(
            f"{path}: GGUF architecture {arch!r} is not supported; {hf.supported_text()}"
        )
    names = {t.name: t for t in reader.tensors}
    heads = int(field(reader, f"{arch}.attention.head_count"))
    hidden = int(field(reader, f"{arch}.embedding_length"))
    embed = names.get("token_embd.weight")
    if embed is None:
        raise ConversionError(f"{path}: GGUF has no token_embd.weight tensor")
    cfg: dict[str, Any] = {
        "architectures": [_GGUF_TO_HF_ARCH[arch]],
        "model_type": arch,
        "vocab_size": int(embed.shape[1]),
        "hidden_size": hidden,
        "intermediate_size": int(
            field(reader, f"{arch}.feed_forward_length", None)
            or field(reader, f"{arch}.expert_feed_forward_length")
        ),
        "num_hidden_layers": int(field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(field(reader, f"{arch}.attention.key_length", hidden // heads)),
        "rope_theta": float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(field(reader, f"{arch}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
    }
    scaling = field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        cfg["rope_scaling"] = {
            "rope_type": "linear",
            "factor": float(field(reader, f"{arch}.rope.scaling.factor")),
        }
    elif scaling not in ("none", None):
        raise UnsupportedArchitectureError(
            f"{path}: GGUF rope scaling {scaling!r} is not supported (only linear, and llama3 via rope_freqs)"
        )
    if ROPE_FREQS in names:  # Llama 3.1+: per-frequency divisors instead of scaling metadata
        t = names[ROPE_FREQS]
        factors = dequantize_tensor(t.data, t.tensor_type).reshape(-1)
        try:
            rope = llama3_rope_from_factors(factors, cfg["head_dim"], cfg["rope_theta"])
        except UnsupportedArchitectureError as e:
            raise UnsupportedArchitectureError(f"{path}: {e}") from e
        if rope is not None:
            cfg["rope_scaling"] = rope
    cfg.update(_family_config(reader, arch, cfg, names))
    cfg.update(_moe_config(reader, arch, cfg, names))
    return cfg


def _moe_config(reader: Any, arch: str, cfg: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """HF config keys of a mixture-of-experts GGUF: Mixtral ("llama" with expert_count) or qwen3moe."""
    experts = int(field(reader, f"{arch}.expert_count", 0) or 0)
    if arch not in _MOE_HF_NAMES or not experts:
        return {}
    used = int(field(reader, f"{arch}.expert_used_count"))
    if arch == "llama":
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "num_local_experts": experts,
            "num_experts_per_tok": used,
        }
    layers = cfg["num_hidden_layers"]
    return {
        "model_type": "qwen3_moe",
        "num_experts": experts,
        "num_experts_per_tok": used,
        "moe_intermediate_size": int(field(reader, f"{arch}.expert_feed_forward_length")),
        "norm_topk_prob": bool(field(reader, f"{arch}.expert_weights_norm", True)),
        "decoder_sparse_step": 1,
        # Layers stored with a dense MLP instead of experts (Qwen3-MoE's mlp_only_layers).
        "mlp_only_layers": [i for i in range(layers) if f"blk.{i}.ffn_gate_exps.weight" not in tensors],
    }


# -- Llama 3.1 rope_freqs ------------------------------------------------------------------------------
def llama3_rope_from_factors(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any] | None:
    """HF llama3 rope_scaling reproducing llama.cpp's `rope_freqs` divisors ([head_dim // 2]).

    Frequency i is divided by 1 (short wavelengths), by `factor` (long ones), or in between by
    1 / ((1 - s) / factor + s) with s linear in 1 / wavelength. The divisors fix `factor` and the
    band edges only as ratios to original_max_position_embeddings, so low_freq_factor is taken as
    1 (Meta's value) and the rest solved from the band; with fewer than two points inside the band
    any edges between the neighbouring frequencies give the same RoPE, and the midpoints are used.
    The result is checked by recomputing the divisors. None when every divisor is 1 (no scaling);
    UnsupportedArchitectureError when the divisors are not of the llama3 form.
    """
    f = np.asarray(factors, np.float64).reshape(-1)
    u = 1.0 / (2 * np.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if f.shape != u.shape or not np.all(np.isfinite(f)) or f.min() <= 0:
        raise UnsupportedArchitectureError(
            f"rope_freqs has shape {f.shape} / values that are not positive divisors for head_dim {head_dim}"
        )
    factor = float(f.max())
    if np.allclose(f, 1.0, rtol=1e-6):
        return None
    one, full = np.isclose(f, 1.0, rtol=1e-6), np.isclose(f, factor, rtol=1e-6)
    band = ~(one | full)
    s = (1 / f[band] - 1 / factor) / (1 - 1 / factor)
    lo, hi = _llama3_band(u, s, band, one, full)
    old_len = 1.0 / lo
    if abs(old_len - round(old_len)) < 1e-3 * old_len:
        old_len = float(round(old_len))
    rope = {  # 7 significant digits: float32 divisors carry no more, and 4.000000018 reads as 4
        "rope_type": "llama3",
        "factor": _round7(factor),
        "low_freq_factor": _round7(lo * old_len),
        "high_freq_factor": _round7(hi * old_len),
        "original_max_position_embeddings": _round7(old_len),
    }
    if old_len.is_integer():
        rope["original_max_position_embeddings"] = int(old_len)
    if not np.allclose(_llama3_divisors(u, rope), f, rtol=1e-4):
        raise UnsupportedArchitectureError(
            "rope_freqs divisors do not follow Llama 3.1's llama3 RoPE scaling (1, factor, and a smooth "
            "band between); this RoPE variant is not supported"
        )
    return rope


def _round7(x: float) -> float:
    return float(f"{float(x):.7g}")


def _llama3_band(u: np.ndarray, s: np.ndarray, band: np.ndarray, one: np.ndarray, full: np.ndarray):
    """(lo, hi): the band's edges in inverse wavelength, per unit original context length."""
    if band.sum() >= 2:
        slope, intercept = np.polyfit(u[band], s, 1)
        lo = -intercept / slope
        return lo, lo + 1 / slope
    below = u[full].max() if full.any() else 0.0  # slowed by `factor`: inverse wavelength < lo
    above = u[one].min() if one.any() else 2 * u.max()  # kept: inverse wavelength > hi
    if band.sum() == 1:
        u1, s1 = float(u[band][0]), float(s[0])
        width = 0.5 * min((u1 - below) / max(s1, 1e-12), (above - u1) / max(1 - s1, 1e-12))
        return u1 - s1 * width, u1 + (1 - s1) * width
    gap = above - below
    return below + gap / 3, below + 2 * gap / 3


def _llama3_divisors(u: np.ndarray, rope: dict[str, Any]) -> np.ndarray:
    old, factor = rope["original_max_position_embeddings"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    wavelen = 1 / u
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid))


def _family_config(reader: Any, arch: str, cfg: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """HF config keys of the qwen3 / phi3 / gemma2 / gemma3 GGUF metadata (as llama.cpp writes it)."""
    if arch == "qwen3":
        return {"model_type": "qwen3", "attention_bias": False}
    if arch == "phi3":
        return _phi3_config(reader, cfg, tensors)
    if arch not in _GEMMA_ARCHS:
        return {}
    if arch == "gemma":
        return {"model_type": "gemma", "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}
    layers, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    # llama.cpp keeps no query_pre_attn_scalar: it uses head_dim, except hidden/heads for the 27B
    # models (46 layers in Gemma 2, 62 in Gemma 3); an explicit attention.scale (float32) wins.
    scale = field(reader, f"{arch}.attention.scale", None)
    is_27b = layers == (46 if arch == "gemma2" else 62)
    query_scalar = round(float(scale) ** -2, 4) if scale else (hidden // heads if is_27b else cfg["head_dim"])
    pattern = field(reader, f"{arch}.attention.sliding_window_pattern", None)
    if isinstance(pattern, list):  # per layer: True = local
        layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        n = int(pattern or (2 if arch == "gemma2" else 6))
        layer_types = ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(layers)]
    out = {
        "model_type": "gemma2" if arch == "gemma2" else "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": query_scalar,
        "sliding_window": int(field(reader, f"{arch}.attention.sliding_window", 4096)),
        "layer_types": layer_types,
        "attn_logit_softcapping": field(reader, f"{arch}.attn_logit_softcapping", None),
        "final_logit_softcapping": field(reader, f"{arch}.final_logit_softcapping", None),
        "tie_word_embeddings": True,
    }
    if arch == "gemma3":
        out["rope_local_base_freq"] = float(field(reader, "gemma3.rope.freq_base_swa", 10000.0))
    else:
        out["rope_local_base_freq"] = cfg["rope_theta"]
    return out


def _phi3_config(reader: Any, cfg: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    original = field(reader, "phi3.rope.scaling.original_context_length", None)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    rotary = int(field(reader, "phi3.rope.dimension_count", head_dim))
    window = int(field(reader, "phi3.attention.sliding_window", 0))
    out: dict[str, Any] = {
        "model_type": "phi3",
        "head_dim": head_dim,
        "partial_rotary_factor": rotary / head_dim,
        "sliding_window": window or None,  # 0: none (Phi-4)
    }
    if "rope_factors_long.weight" in tensors:
        factors = {
            kind: [float(x) for x in np.asarray(tensors[f"rope_factors_{kind}.weight"].data, np.float32)]
            for kind in ("long", "short")
        }
        out["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": factors["long"],
            "short_factor": factors["short"],
            "original_max_position_embeddings": int(original or cfg["max_position_embeddings"]),
            "attention_factor": float(field(reader, "phi3.rope.scaling.attn_factor", 1.0)),
        }
    return out


# -- tokenizer ---------------------------------------------------------------------------------------
def tokenizer_files_from_gguf(reader: Any, path: Path) -> dict[str, Any]:
    """tokenizer.json, tokenizer_config.json and generation_config.json from GGUF metadata ({} if none)."""
    model = field(reader, "tokenizer.ggml.model", None)
    if model is None:
        log.warning("%s has no tokenizer metadata: the converted model will accept token ids only", path)
        return {}
    if model not in TOKENIZER_MODELS:
        raise ConversionError(
            f"{path}: GGUF tokenizer model {model!r} is not supported; supported: {sorted(TOKENIZER_MODELS)} "
            "(byte-level BPE, SentencePiece); convert the original Hugging Face checkpoint instead"
        )
    tokens = list(field(reader, "tokenizer.ggml.tokens"))
    types = list(field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    if model == "llama":
        tok = build_spm_tokenizer(
            tokens,
            list(field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))),
            types,
            add_space_prefix=bool(field(reader, "tokenizer.ggml.add_space_prefix", True)),
            remove_extra_whitespaces=bool(field(reader, "tokenizer.ggml.remove_extra_whitespaces", False)),
        )
    else:
        tok = build_bpe_tokenizer(
            tokens,
            list(field(reader, "tokenizer.ggml.merges", [])),
            types,
            field(reader, "tokenizer.ggml.pre", "default"),
        )
    special = {
        k: field(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("bos", "eos", "padding", "unknown")
    }
    # SentencePiece models add <s> unless told otherwise (llama.cpp's default for "llama" vocabs).
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(field(reader, "tokenizer.ggml.add_eos_token", False))
    _add_special_processor(
        tok,
        (tokens[special["bos"]], int(special["bos"])) if add_bos and special["bos"] is not None else None,
        (tokens[special["eos"]], int(special["eos"])) if add_eos and special["eos"] is not None else None,
    )
    tok_cfg: dict[str, Any] = {"add_bos_token": add_bos}
    for key, hf_key in (
        ("bos", "bos_token"),
        ("eos", "eos_token"),
        ("padding", "pad_token"),
        ("unknown", "unk_token"),
    ):
        if special[key] is not None and 0 <= special[key] < len(tokens):
            tok_cfg[hf_key] = tokens[special[key]]
    template = field(reader, "tokenizer.chat_template", None)
    if template:
        tok_cfg["chat_template"] = template
    gen_cfg: dict[str, Any] = {
        k: int(special[s])
        for k, s in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding"))
        if special[s] is not None
    }
    stops = end_of_generation_ids(reader, tokens, types, special["eos"])
    if len(stops) > 1:
        gen_cfg["eos_token_id"] = stops
    return {
        "tokenizer.json": tok.to_str(),
        "tokenizer_config.json": tok_cfg,
        "generation_config.json": gen_cfg,
    }


# Texts of end-of-turn tokens that llama.cpp stops at besides the GGUF's eos (when they are
# control tokens of the vocabulary): chat models end a turn with these, not with eos.
END_OF_TURN_TEXTS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "<|end_of_text|>",
)
CONTROL_TOKEN = 3


def end_of_generation_ids(reader: Any, tokens: list[str], types: list[int], eos: int | None) -> list[int]:
    """The token ids generation stops at, as llama.cpp decides them: eos, the GGUF's
    eot/eom token ids, and control tokens whose text is a known end of turn."""
    ids = [int(eos)] if eos is not None else []
    for key in ("eot", "eom"):
        tid = field(reader, f"tokenizer.ggml.{key}_token_id", None)
        if tid is not None and 0 <= int(tid) < len(tokens):
            ids.append(int(tid))
    ids += [
        i
        for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
        if kind == CONTROL_TOKEN and t in END_OF_TURN_TEXTS
    ]
    return list(dict.fromkeys(ids))


def build_bpe_tokenizer(tokens: list[str], merges: list[str], token_types: list[int], pre: str) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` from a GGUF vocabulary.

    Control (type 3) and user-defined (type 4) tokens become added special tokens, matched before
    the pre-tokenizer. `pre` (tokenizer.ggml.pre) picks llama.cpp's split pattern: "smollm" splits
    digits individually (as SmolLM's original tokenizer.json does), "llama-bpe" and "qwen2" use
    their regexes, anything else GPT-2's.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("llama-bpe", "llama3", "qwen2"):
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT), "isolated")
        no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, no_regex])
    else:
        if pre not in ("default", "gpt2", "gpt-2"):
            log.warning("GGUF tokenizer.ggml.pre=%r is not known; using GPT-2's pre-tokenizer", pre)
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [i for i, t in enumerate(token_types) if t in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]
    tok.add_special_tokens(
        [
            AddedToken(tokens[i], special=token_types[i] == TOKEN_TYPE_CONTROL, normalized=False)
            for i in special
        ]
    )
    return tok


def build_spm_tokenizer(
    tokens: list[str],
    scores: list[float],
    token_types: list[int],
    add_space_prefix: bool = True,
    remove_extra_whitespaces: bool = False,
) -> Any:
    """A `tokenizers` BPE equivalent to a SentencePiece (BPE) vocabulary, as llama.cpp reads it.

    SentencePiece merges the adjacent pair whose joined piece has the highest score; the BPE merge
    list therefore holds every split (a, b) of each normal piece into two vocabulary pieces, ranked
    by the joined piece's score. Spaces become `▁` and, with `add_space_prefix`, each text segment
    gets a leading `▁` (llama.cpp adds it at the start and after every special token). Characters
    outside the vocabulary fall back to `<0xXX>` byte tokens when the vocabulary has them, else to
    the unknown token. Control and unknown tokens become special added tokens, user-defined ones
    plain added tokens (matched whole, before segmentation).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    if len(scores) != len(tokens) or len(token_types) != len(tokens):
        raise ConversionError(
            f"SentencePiece vocabulary: {len(tokens)} tokens but {len(scores)} scores and "
            f"{len(token_types)} token types"
        )
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicated piece keeps its first id, as SentencePiece does
    normal = {t for t, ty in zip(tokens, token_types, strict=True) if ty == TOKEN_TYPE_NORMAL}
    ranked = sorted(
        (i for i, t in enumerate(tokens) if token_types[i] == TOKEN_TYPE_NORMAL and len(t) > 1),
        key=lambda i: (-scores[i], i),
    )
    merges = [
        (t[:k], t[k:])
        for t in (tokens[i] for i in ranked)
        for k in range(1, len(t))
        if t[:k] in normal and t[k:] in normal
    ]
    unk = next((tokens[i] for i, ty in enumerate(token_types) if ty == TOKEN_TYPE_UNKNOWN), None)
    byte_fallback = any(ty == TOKEN_TYPE_BYTE for ty in token_types)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback)
    )
    steps = []
    if remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if add_space_prefix:
        steps.append(normalizers.Prepend("\u2581"))
    steps.append(normalizers.Replace(" ", "\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(decode)
    added = (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_USER_DEFINED)
    tok.add_special_tokens(
        [
            AddedToken(t, special=ty != TOKEN_TYPE_USER_DEFINED, normalized=False)
            for t, ty in zip(tokens, token_types, strict=True)
            if ty in added
        ]
    )
    return tok


def _add_special_processor(tok: Any, bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> None:
    """Adds `bos` before and `eos` after every encoding (when given)."""
    from tokenizers import processors

    if bos is None and eos is None:
        return
    pre, post = (f"{bos[0]} " if bos else ""), (f" {eos[0]}" if eos else "")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{pre}$A{post}",
        pair=f"{pre}$A{post} {pre}$B{post}",
        special_tokens=sorted({x for x in (bos, eos) if x is not None}, key=lambda x: x[1]),
    )


# -- entry point -----------------------------------------------------------------------------------
def convert_gguf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "float32",
    progress: bool = True,
    overwrite: bool = False,
    quantize: str | None = None,
) -> Path:
    """Converts a .gguf file (an architecture of hf.GGUF_ARCHITECTURES) to a jinfer model directory."""
    path = Path(src)
    reader = open_gguf_model(path)
    if isinstance(reader, SplitReader):
        path = reader.paths[0]  # named in messages and the conversion record
    cfg = hf_config_from_gguf(reader, path)
    arch = hf.get_architecture(cfg["architectures"][0], str(path))
    source = GGUFSource(
        path,
        reader,
        field(reader, "general.architecture"),
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
    )
    extra_files: Mapping[str, Any] = tokenizer_files_from_gguf(reader, path)
    extra_config = {
        "source_format": "gguf",
        "gguf": {
            "file": path.name,
            "name": field(reader, "general.name", ""),
            **({"parts": len(reader.paths)} if isinstance(reader, SplitReader) else {}),
        },
    }
    return hf.convert_source(
        arch,
        cfg,
        source,
        out,
        dtype=dtype,
        extra_files=extra_files,
        extra_config=extra_config,
        progress=progress,
        overwrite=overwrite,
        quantize=quantize,
        where=str(path),
    )


def gguf_summary(path: str | os.PathLike) -> str:
    """JSON text of a GGUF's architecture and tensor types (for debugging)."""
    reader = open_gguf_model(Path(path))
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return json.dumps({"architecture": field(reader, "general.architecture", None), "tensor_types": types})
