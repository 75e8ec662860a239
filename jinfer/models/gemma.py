"""Gemma, Gemma 2 and Gemma 3 (text) decoders.

Like Llama (jinfer.models.llama) with: RMSNorm scaled by (1 + w) (weights stored zero-centred), a
norm before AND after both attention and MLP, GeGLU MLP (tanh GELU), embeddings scaled by
sqrt(hidden_size) (rounded to the params' dtype, as transformers does), attention scale
query_pre_attn_scalar ** -0.5, optional soft-capping of attention scores and of the final logits
(Gemma 2), and local (sliding-window) layers interleaved with global ones (`layer_types`: Gemma 2
alternates 1:1, Gemma 3 has 5 local layers per global one). Gemma 3 adds per-head q/k norms and
its own RoPE base for local layers (`rope_local_theta`); `rope_scaling` (linear for Gemma 3 4B+)
applies to global layers only. Embeddings are tied (a separate `lm_head` [d, v] when
tie_word_embeddings is false). Gemma (1) is the same block without the
post-norms, soft-capping and local layers (`post_norms=False`).

KV cache: local layers keep full-length cache rows like global ones (one cache shape for every
layer); exactness of the window comes from the mask (a query at p sees keys p - w < j <= p), and
decode attention of a local layer visits only the cache blocks inside the window
(`layers.blocked_attention`), so its per-step cost is bounded by the window, not the context.

Call contract: as Llama's: `Gemma(config, rngs=...)(tokens[b, t], positions[b, t], cache=None,
prompt_start=False, cache_rows=None) -> (hidden[b, t, d] after the final norm, cache)`;
`logits(hidden) -> float32[..., vocab]` (soft-capped).

Einsum letters: b batch, t query length, d model dim, n heads, k kv heads, h head dim, v vocab.

Parameters (HF names of `Gemma2ForCausalLM` / `Gemma3ForCausalLM`; "T" = transpose the torch
Linear weight [out, in] then reshape):

| jinfer path                  | shape     | HF tensor                                         | transform |
|------------------------------|-----------|---------------------------------------------------|-----------|
| embed                        | [v, d]    | model.embed_tokens.weight                         | none      |
| layers/{i}/attn_norm         | [d]       | model.layers.{i}.input_layernorm.weight           | none      |
| layers/{i}/attn/{q,k,v,o}    | as Llama  | model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  | T         |
| layers/{i}/q_norm, k_norm(*) | [h]       | model.layers.{i}.self_attn.{q,k}_norm.weight      | none      |
| layers/{i}/post_attn_norm(**)| [d]       | model.layers.{i}.post_attention_layernorm.weight  | none      |
| layers/{i}/mlp_norm          | [d]       | model.layers.{i}.pre_feedforward_layernorm.weight | none      |
| layers/{i}/mlp/{gate,up,down}| as Llama  | model.layers.{i}.mlp.{gate,up,down}_proj.weight   | T         |
| layers/{i}/post_mlp_norm     | [d]       | model.layers.{i}.post_feedforward_layernorm.weight| none      |
| final_norm                   | [d]       | model.norm.weight                                 | none      |

(*) Gemma 3 only. (**) post norms: Gemma 2 and 3 only; Gemma (1) has no post norms and its
pre-MLP norm (mlp_norm) is named post_attention_layernorm. The same table as data: `hf_param_map(config)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jinfer.errors import ConfigError, UnsupportedArchitectureError
from jinfer.kvcache import KVCache
from jinfer.models import layers as L
from jinfer.models.llama import RopeScaling, normalize_rope_scaling
from jinfer.models.registry import ModelSpec, register

LOCAL, GLOBAL = "sliding_attention", "full_attention"
# transformers' Gemma3TextConfig defaults: the text_config of a multimodal Gemma 3 checkpoint on the
# hub (Gemma3ForConditionalGeneration, 4B and up) lists only the values that differ from them.
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
}
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")


def pattern_layer_types(num_layers: int, pattern: int) -> tuple[str, ...]:
    """transformers' layer types for a `sliding_window_pattern`: every pattern-th layer is global."""
    return tuple(LOCAL if (i + 1) % pattern else GLOBAL for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Hyperparameters of a Gemma 2 / Gemma 3 text decoder (defaults: Gemma 3 1B).

    layer_types: per layer "sliding_attention" (local, window `sliding_window`) or "full_attention".
    rope_theta / rope_scaling: global layers; rope_local_theta: local layers (no scaling).
    attn_logit_softcapping / final_logit_softcapping: None = off (Gemma 3), 50 / 30 in Gemma 2.
    qk_norm: per-head (1 + w) RMSNorm of q and k before RoPE (Gemma 3).
    post_norms: norms after attention and after the MLP (Gemma 2 and 3; not Gemma 1).
    """

    vocab_size: int = 262144
    hidden_size: int = 1152
    intermediate_size: int = 6912
    num_layers: int = 26
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    rope_theta: float = 1_000_000.0
    rope_local_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    sliding_window: int | None = 512
    layer_types: tuple[str, ...] = pattern_layer_types(26, 6)
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    qk_norm: bool = True
    post_norms: bool = True
    tie_word_embeddings: bool = True  # False: a separate lm_head (no released Gemma has one)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"GemmaConfig: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= {LOCAL, GLOBAL}:
            raise ConfigError(
                f"GemmaConfig: layer_types must give one of {LOCAL!r}, {GLOBAL!r} for each of the "
                f"{self.num_layers} layers; got {list(self.layer_types)}"
            )
        if LOCAL in self.layer_types and not self.sliding_window:
            raise ConfigError("GemmaConfig: local (sliding_attention) layers need a sliding_window")
        L.rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)  # validates rope_scaling

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> GemmaConfig:
        """Maps a Hugging Face config.json (model_type gemma, gemma2 or gemma3_text) to a GemmaConfig.

        Accepts transformers-5 `rope_parameters` (per layer type for Gemma 3) and the hub layout
        (`rope_theta`, `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`). A
        multimodal Gemma 3 config (model_type gemma3) maps its `text_config`.
        """
        if hf.get("model_type") == "gemma3" and "text_config" in hf:
            hf = {**GEMMA3_TEXT_DEFAULTS, **hf["text_config"], "model_type": "gemma3_text"}
        model_type = hf.get("model_type")
        if model_type not in ("gemma", "gemma2", "gemma3_text"):
            raise UnsupportedArchitectureError(
                f"GemmaConfig.from_hf_config: model_type {model_type!r} is not one of "
                "gemma, gemma2, gemma3_text"
            )
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if model_type == "gemma" and act == "gelu":  # transformers reads Gemma 1's "gelu" as tanh GELU
            act = "gelu_pytorch_tanh"
        if act not in _ACTIVATIONS or hf.get("attention_bias") or hf.get("use_bidirectional_attention"):
            raise UnsupportedArchitectureError(
                f"GemmaConfig.from_hf_config: hidden_activation={act!r}, attention_bias="
                f"{hf.get('attention_bias')}, use_bidirectional_attention="
                f"{hf.get('use_bidirectional_attention')};"
                f" supported: {_ACTIVATIONS}, no attention bias, causal attention"
            )
        layers, heads, hidden = hf["num_hidden_layers"], hf["num_attention_heads"], hf["hidden_size"]
        pattern = hf.get("sliding_window_pattern") or (2 if model_type == "gemma2" else 6)
        global_rope, local_theta = _rope(hf, model_type)
        head_dim = hf.get("head_dim") or hidden // heads
        gemma1 = model_type == "gemma"
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope_theta=float(global_rope.get("rope_theta", 10000.0)),
            rope_local_theta=float(local_theta),
            rope_scaling=normalize_rope_scaling(global_rope),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            sliding_window=None if gemma1 else hf.get("sliding_window"),
            layer_types=(GLOBAL,) * layers
            if gemma1
            else tuple(hf.get("layer_types") or pattern_layer_types(layers, pattern)),
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or head_dim),
            attn_logit_softcapping=hf.get("attn_logit_softcapping"),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            qk_norm=model_type == "gemma3_text",
            post_norms=not gemma1,
            tie_word_embeddings=hf.get("tie_word_embeddings", True) is not False,
        )


def _rope(hf: dict[str, Any], model_type: str) -> tuple[dict[str, Any], float]:
    """(global rope dict with rope_theta, local theta) from either config layout."""
    params = dict(hf.get("rope_parameters") or {})
    if GLOBAL in params:  # transformers 5, Gemma 3: one dict per layer type
        local = params.get(LOCAL) or {}
        if local.get("rope_type", "default") != "default":
            raise UnsupportedArchitectureError(
                f"GemmaConfig.from_hf_config: rope_parameters.{LOCAL}.rope_type="
                f"{local['rope_type']!r}; local layers support only unscaled RoPE (rope_type 'default')"
            )
        return dict(params[GLOBAL]), local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))
    default_theta = 1_000_000.0 if model_type == "gemma3_text" else 10000.0
    rope = dict(hf.get("rope_scaling") or params)
    rope["rope_theta"] = hf.get("rope_theta", params.get("rope_theta", default_theta))
    local_theta = hf.get(
        "rope_local_base_freq", 10000.0 if model_type == "gemma3_text" else rope["rope_theta"]
    )
    return rope, local_theta


class GemmaBlock(nnx.Module):
    """x + post_norm(attn(norm(x))), then x + post_norm(GeGLU(norm(x))); norms are (1 + w) RMSNorms."""

    def __init__(self, config: GemmaConfig, layer: int, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.local = c.layer_types[layer] == LOCAL
        self.attn_norm = L.zeros_param(rngs, (c.hidden_size,), ("embed",))
        self.attn = L.Attention(
            L.AttentionDims(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim), rngs=rngs
        )
        if c.qk_norm:
            self.q_norm = L.zeros_param(rngs, (c.head_dim,), ("head_dim",))
            self.k_norm = L.zeros_param(rngs, (c.head_dim,), ("head_dim",))
        self.mlp_norm = L.zeros_param(rngs, (c.hidden_size,), ("embed",))
        self.mlp = L.GeGLU(c.hidden_size, c.intermediate_size, rngs=rngs)
        if c.post_norms:
            self.post_attn_norm = L.zeros_param(rngs, (c.hidden_size,), ("embed",))
            self.post_mlp_norm = L.zeros_param(rngs, (c.hidden_size,), ("embed",))

    def __call__(
        self, x: jax.Array, positions: jax.Array, layer_cache: L.LayerCache | None
    ) -> tuple[jax.Array, L.LayerCache | None]:
        c = self.config
        eps = c.rms_norm_eps
        q, k, v = self.attn.project(L.rms_norm_plus_one(x, self.attn_norm[...], eps))
        if c.qk_norm:
            q, k = (
                L.rms_norm_plus_one(q, self.q_norm[...], eps),
                L.rms_norm_plus_one(k, self.k_norm[...], eps),
            )
        if self.local:
            q, k = L.rope_qk(q, k, positions, c.rope_local_theta, None)
        else:
            q, k = L.rope_qk(q, k, positions, c.rope_theta, c.rope_scaling)
        o, layer_cache = L.causal_attention(
            q,
            k,
            v,
            positions,
            layer_cache,
            c.sliding_window if self.local else None,
            scale=c.query_pre_attn_scalar**-0.5,
            softcap=c.attn_logit_softcapping,
        )
        o = self.attn.output(o)
        x = x + (L.rms_norm_plus_one(o, self.post_attn_norm[...], eps) if c.post_norms else o)
        h = self.mlp(L.rms_norm_plus_one(x, self.mlp_norm[...], eps))
        h = L.rms_norm_plus_one(h, self.post_mlp_norm[...], eps) if c.post_norms else h
        return x + h, layer_cache


class Gemma(nnx.Module):
    """Gemma / Gemma 2 / Gemma 3 text causal LM (see the module docstring for the contract and names)."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.embed = L.make_param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        self.layers = nnx.List([GemmaBlock(c, i, rngs=rngs) for i in range(c.num_layers)])
        self.final_norm = L.zeros_param(rngs, (c.hidden_size,), ("embed",))
        if not c.tie_word_embeddings:
            self.lm_head = L.make_param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"))

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache | None = None,
        prompt_start: bool = False,
        cache_rows: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """tokens, positions [b, t] int32 (position < 0: padding) -> (normed hidden [b, t, d], cache).

        `prompt_start=True`: the tokens start the sequence (a fresh prefill), so they attend within
        the call only (their keys/values are still written to the cache). `cache_rows` [b]: the
        cache row each token row writes and reads (default: row i of the cache for row i)."""
        table = self.embed[...]
        # transformers multiplies by sqrt(d) cast to the weights' dtype (rounded in bfloat16).
        x = L.embed_lookup(table, tokens) * jnp.asarray(math.sqrt(self.config.hidden_size), table.dtype)
        x, cache = L.run_decoder_layers(self.layers, x, positions, cache, prompt_start, cache_rows)
        return L.rms_norm_plus_one(x, self.final_norm[...], self.config.rms_norm_eps), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., d] (from __call__) -> float32 logits [..., vocab], soft-capped if configured."""
        return L.soft_cap(L.lm_head_logits(self, hidden), self.config.final_logit_softcapping)


def hf_param_map(config: GemmaConfig) -> L.HFParamMap:
    """{jinfer param path: (HF tensor name, transform)} for Gemma / Gemma 2 / Gemma 3 text checkpoints."""
    out: L.HFParamMap = {"embed": ("model.embed_tokens.weight", "reshape")}
    norms = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    if config.post_norms:
        norms = {
            "attn_norm": "input_layernorm",
            "post_attn_norm": "post_attention_layernorm",
            "mlp_norm": "pre_feedforward_layernorm",
            "post_mlp_norm": "post_feedforward_layernorm",
        }
    for i in range(config.num_layers):
        hf, jp = f"model.layers.{i}.", f"layers/{i}/"
        for name, hf_name in norms.items():
            out[jp + name] = (f"{hf}{hf_name}.weight", "reshape")
        for name in ("q", "k", "v", "o"):
            out[f"{jp}attn/{name}"] = (f"{hf}self_attn.{name}_proj.weight", "transpose")
        if config.qk_norm:
            for name in ("q", "k"):
                out[f"{jp}{name}_norm"] = (f"{hf}self_attn.{name}_norm.weight", "reshape")
        for name in ("gate", "up", "down"):
            out[f"{jp}mlp/{name}"] = (f"{hf}mlp.{name}_proj.weight", "transpose")
    out["final_norm"] = ("model.norm.weight", "reshape")
    if not config.tie_word_embeddings:
        out["lm_head"] = ("lm_head.weight", "transpose")
    return out


GEMMA3_1B = GemmaConfig()
GEMMA2_2B = GemmaConfig(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_layers=26,
    num_heads=8,
    num_kv_heads=4,
    head_dim=256,
    rope_theta=10000.0,
    rope_local_theta=10000.0,
    max_position_embeddings=8192,
    sliding_window=4096,
    layer_types=pattern_layer_types(26, 2),
    query_pre_attn_scalar=256.0,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    qk_norm=False,
)

register(ModelSpec(name="Gemma", config_cls=GemmaConfig, module_cls=Gemma, task="causal_lm"))
