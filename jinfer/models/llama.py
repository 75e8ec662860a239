"""Llama-style decoder: Llama 2/3 (incl. llama3 RoPE scaling), Mistral, Qwen2, Qwen3, Phi-3, SmolLM.

RMSNorm pre-norm blocks, RoPE in the half-split (rotate_half) layout, grouped-query attention
(optional q/k/v biases for Qwen2, per-head q/k RMSNorm for Qwen3), SwiGLU MLP, optional tied
embeddings. Phi-3: fused qkv / gate_up projections split at load (`phi3_hf_param_map`), LongRoPE
scaling (`layers.rope_qk`), optional partial rotary (Phi-4-mini) and an all-layer sliding window.

Call contract (every decoder the generation runtime drives):
  `Llama(config, rngs=...)(tokens[b, t] int32, positions[b, t] int32, cache=None,
     prompt_start=False, cache_rows=None) -> (hidden[b, t, d], cache)`; `hidden` is AFTER the final
  norm. `prompt_start`: the tokens start their sequences (attend within the call, only write the
  cache); `cache_rows` i32[b]: query row r reads and writes cache row `cache_rows[r]` (a later
  prompt chunk in its slot's row of the whole cache); see `layers.run_decoder_layers`.
  `logits(hidden[..., d]) -> float32[..., vocab]` is only the vocabulary projection.

Einsum letters: b batch, t query length, s key/cache length, d model dim (hidden_size),
n query heads, k kv heads, h head dim, f mlp (intermediate_size), v vocab.

Parameters (L = num_layers, n = num_heads, k = num_kv_heads, h = head_dim). HF names are those of
`LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM` state dicts; "T+reshape" = transpose the
torch Linear weight [out, in] to [in, out], then reshape (see layers.apply_hf_transform):

| jinfer path                 | shape      | HF tensor                                   | transform  |
|-----------------------------|------------|---------------------------------------------|------------|
| embed                       | [v, d]     | model.embed_tokens.weight                   | none       |
| layers/{i}/attn_norm        | [d]        | model.layers.{i}.input_layernorm.weight     | none       |
| layers/{i}/attn/q           | [d, n, h]  | model.layers.{i}.self_attn.q_proj.weight    | T+reshape  |
| layers/{i}/attn/k           | [d, k, h]  | model.layers.{i}.self_attn.k_proj.weight    | T+reshape  |
| layers/{i}/attn/v           | [d, k, h]  | model.layers.{i}.self_attn.v_proj.weight    | T+reshape  |
| layers/{i}/attn/o           | [n, h, d]  | model.layers.{i}.self_attn.o_proj.weight    | T+reshape  |
| layers/{i}/attn/q_bias (*)  | [n, h]     | model.layers.{i}.self_attn.q_proj.bias      | reshape    |
| layers/{i}/attn/k_bias (*)  | [k, h]     | model.layers.{i}.self_attn.k_proj.bias      | reshape    |
| layers/{i}/attn/v_bias (*)  | [k, h]     | model.layers.{i}.self_attn.v_proj.bias      | reshape    |
| layers/{i}/attn/o_bias (+)  | [d]        | model.layers.{i}.self_attn.o_proj.bias      | none       |
| layers/{i}/q_norm (***)     | [h]        | model.layers.{i}.self_attn.q_norm.weight    | none       |
| layers/{i}/k_norm (***)     | [h]        | model.layers.{i}.self_attn.k_norm.weight    | none       |
| layers/{i}/mlp_norm         | [d]        | model.layers.{i}.post_attention_layernorm.weight | none  |
| layers/{i}/mlp/gate         | [d, f]     | model.layers.{i}.mlp.gate_proj.weight       | transpose  |
| layers/{i}/mlp/up           | [d, f]     | model.layers.{i}.mlp.up_proj.weight         | transpose  |
| layers/{i}/mlp/down         | [f, d]     | model.layers.{i}.mlp.down_proj.weight       | transpose  |
| final_norm                  | [d]        | model.norm.weight                           | none       |
| lm_head (**)                | [d, v]     | lm_head.weight                              | transpose  |

(*) only with attention_bias (always for Qwen2). (+) only with out_bias (Llama and Qwen3 with
`attention_bias: true` bias all four projections; Qwen2 only q/k/v; Mistral and Phi-3 none).
(**) absent when tie_word_embeddings: logits then
use `embed` transposed (an `lm_head.weight` in the checkpoint, if any, is ignored). (***) only with
qk_norm (Qwen3). Phi-3 checkpoints fuse q/k/v into `self_attn.qkv_proj` and gate/up into
`mlp.gate_up_proj` ([gate; up] rows): `phi3_hf_param_map` takes row ranges of those.
HF q/k weights are already in rotate_half order, so no head permutation is needed.
The same table as data: `hf_param_map(config)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from flax import nnx

from jinfer.errors import ConfigError, UnsupportedArchitectureError
from jinfer.kvcache import KVCache
from jinfer.models import layers as L
from jinfer.models.registry import ModelSpec, register

RopeScaling = tuple[tuple[str, Any], ...]
_ROPE_KEYS = (
    "rope_type",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "long_factor",
    "short_factor",
    "attention_factor",
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama-style decoder (defaults: SmolLM2-135M).

    rope_scaling: None or sorted (key, value) pairs, e.g. (("factor", 8.0), ..., ("rope_type", "llama3"))
      (a tuple keeps the config hashable and JSON round-trippable); types "linear", "llama3" and
      "longrope" (Phi-3: long/short factors, original_max_position_embeddings, attention_factor).
    sliding_window: Mistral's / Phi-3's window (query at p sees keys p - w < j <= p); None = full causal.
    qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3).
    partial_rotary_factor: fraction of head_dim that RoPE rotates (Phi-4-mini: 0.75).
    """

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # q/k/v biases
    out_bias: bool = False  # an o_proj bias
    max_position_embeddings: int = 8192
    sliding_window: int | None = None
    qk_norm: bool = False
    partial_rotary_factor: float = 1.0

    def __post_init__(self):
        if self.rope_scaling is not None:  # JSON gives lists: LongRoPE factors must be hashable tuples
            pairs = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in self.rope_scaling)
            object.__setattr__(self, "rope_scaling", pairs)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"LlamaConfig: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2 or self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(
                f"LlamaConfig: head_dim={self.head_dim} x partial_rotary_factor="
                f"{self.partial_rotary_factor} must give an even rotary dimension in (0, head_dim]"
            )
        L.rope_inv_freq(self.rotary_dim, self.rope_theta, self.rope_scaling)  # validates rope_scaling

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def long_rope_from(self) -> int | None:
        """LongRoPE (Phi-3): prompts longer than this many tokens rotate with the long factors."""
        scaling = self.rope_scaling_dict or {}
        return scaling["original_max_position_embeddings"] if scaling.get("rope_type") == "longrope" else None

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Maps a Hugging Face config.json (model_type llama, mistral, qwen2, qwen3, phi3) to a LlamaConfig.

        Mistral's and Phi-3's `sliding_window` is kept when smaller than max_position_embeddings
        (otherwise it can never bind and is dropped). Qwen2 always has q/k/v biases; Qwen2/Qwen3
        configs with `use_sliding_window: true` (per-layer windows) are rejected. Qwen3 has q/k norms.
        """
        model_type = hf.get("model_type", "llama")
        if model_type not in _MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"LlamaConfig.from_hf_config: model_type {model_type!r} is not one of "
                f"{', '.join(_MODEL_TYPES)}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu" or hf.get("mlp_bias", False):
            raise UnsupportedArchitectureError(
                f"LlamaConfig.from_hf_config: hidden_act={act!r}, mlp_bias={hf.get('mlp_bias')}; "
                "only a bias-free SiLU (SwiGLU) MLP is supported"
            )
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        # transformers: Llama and Qwen3 bias q/k/v/o with attention_bias, Qwen2 always q/k/v only,
        # Mistral and Phi-3 never (they ignore the field).
        bias = hf.get("attention_bias", False)
        if not isinstance(bias, bool):
            raise ConfigError(f"LlamaConfig.from_hf_config: attention_bias={bias!r} is not true or false")
        max_pos = hf.get("max_position_embeddings", 4096)
        rope = dict(hf.get("rope_parameters") or {})  # newer transformers nest rope_theta here
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = dict(hf.get("rope_scaling") or rope or {})
        if scaling.get("rope_type", scaling.get("type")) in ("longrope", "su"):
            scaling = _longrope_scaling(scaling, hf, max_pos)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rope_theta=float(theta),
            rope_scaling=normalize_rope_scaling(scaling or None),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=model_type == "qwen2" or (model_type in _ALL_BIASES and bias),
            out_bias=model_type in _ALL_BIASES and bias,
            max_position_embeddings=max_pos,
            sliding_window=_sliding_window(model_type, hf, max_pos),
            qk_norm=model_type == "qwen3",
            partial_rotary_factor=_partial_rotary(hf, rope),
        )


def _partial_rotary(hf: dict[str, Any], rope: dict[str, Any]) -> float:
    return float(hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)))


_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
_ALL_BIASES = ("llama", "qwen3")


def _longrope_scaling(scaling: dict[str, Any], hf: dict[str, Any], max_pos: int) -> dict[str, Any]:
    # transformers: factor defaults to max_position_embeddings / original, and the cos/sin scale to
    # sqrt(1 + ln(factor) / ln(original)) (1 when factor <= 1); stored explicitly.
    original = scaling.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    if original is None:
        raise ConfigError("longrope rope_scaling needs original_max_position_embeddings")
    factor = scaling.get("factor") or max_pos / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    return {
        "rope_type": "longrope",
        "long_factor": tuple(float(x) for x in scaling["long_factor"]),
        "short_factor": tuple(float(x) for x in scaling["short_factor"]),
        "original_max_position_embeddings": int(original),
        "attention_factor": float(attention),
    }


def normalize_rope_scaling(scaling: dict[str, Any] | None) -> RopeScaling | None:
    """HF rope_scaling dict -> sorted (key, value) pairs; None for no scaling ("default")."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind not in L.ROPE_TYPES:
        raise ConfigError(f"rope_scaling type {kind!r} is not supported; supported: {L.ROPE_TYPES}")
    kept = {k: v for k, v in scaling.items() if k in _ROPE_KEYS}
    kept["rope_type"] = kind
    return tuple(sorted(kept.items()))


def _sliding_window(model_type: str, hf: dict[str, Any], max_pos: int) -> int | None:
    if model_type in ("qwen2", "qwen3"):
        if hf.get("use_sliding_window", False):
            raise UnsupportedArchitectureError(f"{model_type} with use_sliding_window=true is not supported")
        return None
    window = hf.get("sliding_window") if model_type in ("mistral", "phi3") else None
    return window if window is not None and window < max_pos else None


class LlamaBlock(nnx.Module):
    """Pre-RMSNorm block: x + attn(norm(x)), then x + SwiGLU(norm(x))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.attn_norm = L.ones_param(rngs, (c.hidden_size,), ("embed",))
        dims = L.AttentionDims(
            c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.attention_bias, c.out_bias
        )
        self.attn = L.Attention(dims, rngs=rngs)
        if c.qk_norm:
            self.q_norm = L.ones_param(rngs, (c.head_dim,), ("head_dim",))
            self.k_norm = L.ones_param(rngs, (c.head_dim,), ("head_dim",))
        self.mlp_norm = L.ones_param(rngs, (c.hidden_size,), ("embed",))
        self.mlp = L.SwiGLU(c.hidden_size, c.intermediate_size, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        layer_cache: L.LayerCache | None,
        long_rope: jax.Array | None = None,
    ) -> tuple[jax.Array, L.LayerCache | None]:
        c = self.config
        q, k, v = self.attn.project(L.rms_norm(x, self.attn_norm[...], c.rms_norm_eps))
        if c.qk_norm:
            q = L.rms_norm(q, self.q_norm[...], c.rms_norm_eps)
            k = L.rms_norm(k, self.k_norm[...], c.rms_norm_eps)
        q, k = L.rope_qk(q, k, positions, c.rope_theta, c.rope_scaling, c.rotary_dim, long_rope)
        o, layer_cache = L.causal_attention(q, k, v, positions, layer_cache, c.sliding_window)
        x = x + self.attn.output(o)
        x = x + self.mlp(L.rms_norm(x, self.mlp_norm[...], c.rms_norm_eps))
        return x, layer_cache


class Llama(nnx.Module):
    """Llama-style causal LM (see the module docstring for the contract and parameter names)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.embed = L.make_param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        self.layers = nnx.List([LlamaBlock(c, rngs=rngs) for _ in range(c.num_layers)])
        self.final_norm = L.ones_param(rngs, (c.hidden_size,), ("embed",))
        if not c.tie_word_embeddings:
            self.lm_head = L.make_param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"))

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache | None = None,
        prompt_start: bool = False,
        cache_rows: jax.Array | None = None,
        long_rope: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """tokens, positions [b, t] int32 (position < 0: padding) -> (normed hidden [b, t, d], cache).

        `prompt_start=True`: the tokens start the sequence (a fresh prefill), so they attend within
        the call only (their keys/values are still written to the cache). `cache_rows` [b]: the
        cache row each token row writes and reads (default: row i of the cache for row i).
        `long_rope` (bool, scalar or [b]; LongRoPE models): the row's whole prompt is longer than
        the original context, so a chunk of it rotates with the long factors throughout."""
        x = L.embed_lookup(self.embed.get_value(), tokens, self.final_norm[...].dtype)  # compute dtype
        kwargs = None if long_rope is None else {"long_rope": long_rope}
        x, cache = L.run_decoder_layers(self.layers, x, positions, cache, prompt_start, cache_rows, kwargs)
        return L.rms_norm(x, self.final_norm[...], self.config.rms_norm_eps), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., d] (from __call__) -> float32 logits [..., vocab]."""
        return L.lm_head_logits(self, hidden)


def hf_param_map(config: LlamaConfig) -> L.HFParamMap:
    """{jinfer param path: (HF tensor name, transform)} for `LlamaForCausalLM`-style checkpoints."""
    out: L.HFParamMap = {"embed": ("model.embed_tokens.weight", "reshape")}
    for i in range(config.num_layers):
        hf, jp = f"model.layers.{i}.", f"layers/{i}/"
        out[jp + "attn_norm"] = (hf + "input_layernorm.weight", "reshape")
        out[jp + "mlp_norm"] = (hf + "post_attention_layernorm.weight", "reshape")
        for name in ("q", "k", "v", "o"):
            out[f"{jp}attn/{name}"] = (f"{hf}self_attn.{name}_proj.weight", "transpose")
        if config.attention_bias:
            for name in ("q", "k", "v"):
                out[f"{jp}attn/{name}_bias"] = (f"{hf}self_attn.{name}_proj.bias", "reshape")
        if config.out_bias:
            out[f"{jp}attn/o_bias"] = (f"{hf}self_attn.o_proj.bias", "reshape")
        if config.qk_norm:
            for name in ("q", "k"):
                out[f"{jp}{name}_norm"] = (f"{hf}self_attn.{name}_norm.weight", "reshape")
        for name in ("gate", "up", "down"):
            out[f"{jp}mlp/{name}"] = (f"{hf}mlp.{name}_proj.weight", "transpose")
    out["final_norm"] = ("model.norm.weight", "reshape")
    if not config.tie_word_embeddings:
        out["lm_head"] = ("lm_head.weight", "transpose")
    return out


def phi3_hf_param_map(config: LlamaConfig) -> L.HFParamMap:
    """`hf_param_map` for `Phi3ForCausalLM`: q/k/v are row ranges of the fused `qkv_proj`
    ([q; k; v] rows) and gate/up those of `gate_up_proj` ([gate; up] rows)."""
    out = hf_param_map(config)
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    f = config.intermediate_size
    for i in range(config.num_layers):
        hf, jp = f"model.layers.{i}.", f"layers/{i}/"
        for name, start, stop in (("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv)):
            out[f"{jp}attn/{name}"] = (f"{hf}self_attn.qkv_proj.weight", f"rows:{start}:{stop}")
        for name, start, stop in (("gate", 0, f), ("up", f, 2 * f)):
            out[f"{jp}mlp/{name}"] = (f"{hf}mlp.gate_up_proj.weight", f"rows:{start}:{stop}")
    return out


SMOLLM2_135M = LlamaConfig()
LLAMA3_8B = LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    max_position_embeddings=8192,
)

register(
    ModelSpec(name="Llama", config_cls=LlamaConfig, module_cls=Llama, task="causal_lm", typed_weights=True)
)
