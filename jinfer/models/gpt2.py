"""GPT-2 decoder: learned positions, pre-LayerNorm blocks, tanh GELU ("gelu_new"), tied lm_head.

Call contract: the same as Llama's (jinfer.models.llama):
  `GPT2(config, rngs=...)(tokens[b, t] int32, positions[b, t] int32, cache=None,
     prompt_start=False, cache_rows=None) -> (hidden[b, t, d], cache)`; `hidden` is AFTER the final
  LayerNorm (ln_f).
  `logits(hidden[..., d]) -> float32[..., vocab]` = hidden @ embed.T (tied, as in GPT-2), or
  hidden @ lm_head with `tie_word_embeddings: false`.
Padding positions (< 0) read position embedding 0; they are neither written to the cache nor attended.

Einsum letters: b batch, t query length, s key length, d model dim, n heads, h head dim, f mlp, v vocab.

Parameters. q/k/v are stored SEPARATELY (same layout as Llama, so the attention code is shared); the
converter splits HF's fused `c_attn` ([d, 3d], columns [q | k | v]). HF GPT-2 uses Conv1D, whose
weights are already [in, out]: no transpose. HF names are those of `GPT2LMHeadModel` ("transformer."
prefix; checkpoints saved from `GPT2Model`, like openai-community/gpt2, lack the prefix).

| jinfer path                  | shape      | HF tensor                                 | transform          |
|------------------------------|------------|-------------------------------------------|--------------------|
| embed                        | [v, d]     | transformer.wte.weight                    | none               |
| pos_embed                    | [P, d]     | transformer.wpe.weight                    | none               |
| layers/{i}/attn_norm/scale   | [d]        | transformer.h.{i}.ln_1.weight             | none               |
| layers/{i}/attn_norm/bias    | [d]        | transformer.h.{i}.ln_1.bias               | none               |
| layers/{i}/attn/q, k, v      | [d, n, h]  | transformer.h.{i}.attn.c_attn.weight      | split3_j + reshape |
| layers/{i}/attn/{q,k,v}_bias | [n, h]     | transformer.h.{i}.attn.c_attn.bias        | split3_j + reshape |
| layers/{i}/attn/o            | [n, h, d]  | transformer.h.{i}.attn.c_proj.weight      | reshape            |
| layers/{i}/attn/o_bias       | [d]        | transformer.h.{i}.attn.c_proj.bias        | none               |
| layers/{i}/mlp_norm/scale    | [d]        | transformer.h.{i}.ln_2.weight             | none               |
| layers/{i}/mlp_norm/bias     | [d]        | transformer.h.{i}.ln_2.bias               | none               |
| layers/{i}/mlp/up            | [d, f]     | transformer.h.{i}.mlp.c_fc.weight         | none               |
| layers/{i}/mlp/up_bias       | [f]        | transformer.h.{i}.mlp.c_fc.bias           | none               |
| layers/{i}/mlp/down          | [f, d]     | transformer.h.{i}.mlp.c_proj.weight       | none               |
| layers/{i}/mlp/down_bias     | [d]        | transformer.h.{i}.mlp.c_proj.bias         | none               |
| final_norm/scale, bias       | [d]        | transformer.ln_f.weight, .bias            | none               |

(j = 0, 1, 2 for q, k, v.) There is no lm_head param (`lm_head.weight` in HF is wte) unless
tie_word_embeddings is false: then lm_head [d, v] from `lm_head.weight`, transposed.
`scale_attn_weights: false` and `scale_attn_by_inverse_layer_idx: true` scale q (see GPT2Block).
The same table as data: `hf_param_map(config)`.
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
from jinfer.models.registry import ModelSpec, register


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyperparameters of GPT-2 (defaults: gpt2 124M). intermediate_size is HF's n_inner (4 d)."""

    vocab_size: int = 50257
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-5
    intermediate_size: int = 3072
    tie_word_embeddings: bool = True  # False: a separate lm_head [d, v]
    scale_attn_weights: bool = True  # False: attention scores are not divided by sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # scores of layer i also divided by i + 1

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"GPT2Config: hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
            )

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> GPT2Config:
        """Maps a Hugging Face GPT-2 config.json (n_embd, n_layer, n_head, n_positions, ...)."""
        if hf.get("model_type", "gpt2") != "gpt2":
            raise UnsupportedArchitectureError(f"GPT2Config: model_type {hf.get('model_type')!r} is not gpt2")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedArchitectureError(f"GPT2Config: activation_function {act!r}; only gelu_new")
        d = hf["n_embd"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=d,
            num_layers=hf["n_layer"],
            num_heads=hf["n_head"],
            max_position_embeddings=hf["n_positions"],
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            intermediate_size=hf.get("n_inner") or 4 * d,
            tie_word_embeddings=hf.get("tie_word_embeddings", True) is not False,
            scale_attn_weights=hf.get("scale_attn_weights", True) is not False,
            scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False) is True,
        )


class GPT2Block(nnx.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config, layer: int, *, rngs: nnx.Rngs):
        c = config
        # transformers' optional scalings of the scores, applied to q (the attention divides by
        # sqrt(head_dim) itself).
        self.q_scale = (1.0 if c.scale_attn_weights else math.sqrt(c.head_dim)) / (
            layer + 1 if c.scale_attn_by_inverse_layer_idx else 1
        )
        self.attn_norm = L.LayerNorm(c.hidden_size, c.layer_norm_eps, rngs=rngs)
        dims = L.AttentionDims(c.hidden_size, c.num_heads, c.num_heads, c.head_dim, True, True)
        self.attn = L.Attention(dims, rngs=rngs)
        self.mlp_norm = L.LayerNorm(c.hidden_size, c.layer_norm_eps, rngs=rngs)
        self.mlp = L.GeluMLP(c.hidden_size, c.intermediate_size, approximate=True, rngs=rngs)

    def __call__(
        self, x: jax.Array, positions: jax.Array, layer_cache: L.LayerCache | None
    ) -> tuple[jax.Array, L.LayerCache | None]:
        q, k, v = self.attn.project(self.attn_norm(x))
        if self.q_scale != 1.0:
            q = (q.astype(jnp.float32) * self.q_scale).astype(q.dtype)
        o, layer_cache = L.causal_attention(q, k, v, positions, layer_cache)
        x = x + self.attn.output(o)
        return x + self.mlp(self.mlp_norm(x)), layer_cache


class GPT2(nnx.Module):
    """GPT-2 causal LM (see the module docstring for the contract and parameter names)."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.embed = L.make_param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        self.pos_embed = L.make_param(rngs, (c.max_position_embeddings, c.hidden_size), (None, "embed"))
        self.layers = nnx.List([GPT2Block(c, i, rngs=rngs) for i in range(c.num_layers)])
        self.final_norm = L.LayerNorm(c.hidden_size, c.layer_norm_eps, rngs=rngs)
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
        dtype = self.final_norm.scale[...].dtype  # the compute dtype (see jinfer.precision)
        x = L.embed_lookup(self.embed.get_value(), tokens, dtype)
        x = x + L.embed_lookup(self.pos_embed.get_value(), positions, dtype)
        x, cache = L.run_decoder_layers(self.layers, x, positions, cache, prompt_start, cache_rows)
        return self.final_norm(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., d] (from __call__) -> float32 logits [..., vocab] (embed, or lm_head if untied)."""
        return L.lm_head_logits(self, hidden)


def hf_param_map(config: GPT2Config) -> L.HFParamMap:
    """{jinfer param path: (HF tensor name, transform)} for `GPT2LMHeadModel` checkpoints."""
    p = "transformer."
    out: L.HFParamMap = {"embed": (p + "wte.weight", "reshape"), "pos_embed": (p + "wpe.weight", "reshape")}
    for i in range(config.num_layers):
        hf, jp = f"{p}h.{i}.", f"layers/{i}/"
        for j, name in enumerate(("q", "k", "v")):
            out[f"{jp}attn/{name}"] = (hf + "attn.c_attn.weight", f"split3_{j}")
            out[f"{jp}attn/{name}_bias"] = (hf + "attn.c_attn.bias", f"split3_{j}")
        out[jp + "attn/o"] = (hf + "attn.c_proj.weight", "reshape")
        out[jp + "attn/o_bias"] = (hf + "attn.c_proj.bias", "reshape")
        out[jp + "mlp/up"] = (hf + "mlp.c_fc.weight", "reshape")
        out[jp + "mlp/up_bias"] = (hf + "mlp.c_fc.bias", "reshape")
        out[jp + "mlp/down"] = (hf + "mlp.c_proj.weight", "reshape")
        out[jp + "mlp/down_bias"] = (hf + "mlp.c_proj.bias", "reshape")
        for norm, hf_norm in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[f"{jp}{norm}/scale"] = (f"{hf}{hf_norm}.weight", "reshape")
            out[f"{jp}{norm}/bias"] = (f"{hf}{hf_norm}.bias", "reshape")
    out["final_norm/scale"] = (p + "ln_f.weight", "reshape")
    out["final_norm/bias"] = (p + "ln_f.bias", "reshape")
    if not config.tie_word_embeddings:
        out["lm_head"] = ("lm_head.weight", "transpose")
    return out


register(ModelSpec(name="GPT2", config_cls=GPT2Config, module_cls=GPT2, task="causal_lm", typed_weights=True))
