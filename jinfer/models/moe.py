"""Sparse mixture-of-experts decoders: Mixtral and Qwen3-MoE.

A Llama-style decoder (RMSNorm pre-norm blocks, RoPE, grouped-query attention) whose MLP is, on
all or some layers, a sparse mixture of SwiGLU experts:

  router:  probs = softmax(x @ router) in float32; the `top_k` largest are kept (ties: the lower
           expert index first), renormalised to sum to 1 when `norm_topk_prob` (always for Mixtral);
  experts: y = sum_j probs_j * down_e(silu(x @ gate_e) * (x @ up_e)) over the token's chosen experts.

Only the chosen experts are computed: the (token, expert) assignments are sorted by expert, then
either each expert's rows run through one grouped matmul (`grouped_experts`, `jax.lax.ragged_dot`:
TPU/GPU) or fixed-size tiles of rows run one expert each (`tiled_experts`: CPU, where ragged_dot
is expanded into a dense product). `dense_experts` computes every expert for every token and is
kept as the measured baseline (scripts/bench_moe.py) and as a cross-check in the tests.

Qwen3-MoE adds a per-head RMSNorm on q and k (before RoPE) and places experts on the layers with
(i + 1) % decoder_sparse_step == 0 that are not in `mlp_only_layers` (the others keep a dense SwiGLU
of `intermediate_size`).

Call contract: as jinfer.models.llama (`(tokens, positions, cache, prompt_start, cache_rows) ->
(normed hidden, cache)`,
`logits(hidden)`).

Einsum letters: as jinfer.models.llama, plus e experts, m tokens (b * t flattened), a assignments
(m * top_k), f expert hidden size (moe_intermediate_size).

Parameters beyond Llama's (HF names: Mixtral `model.layers.{i}.block_sparse_moe.` + X, Qwen3-MoE
`model.layers.{i}.mlp.` + Y; one HF tensor per expert j, stacked on the leading axis):

| jinfer path                    | shape     | X (Mixtral)                 | Y (Qwen3-MoE)                  |
|--------------------------------|-----------|-----------------------------|--------------------------------|
| layers/{i}/moe/router          | [d, e]    | gate.weight                 | gate.weight                    |
| layers/{i}/moe/gate            | [e, d, f] | experts.{j}.w1.weight       | experts.{j}.gate_proj.weight   |
| layers/{i}/moe/up              | [e, d, f] | experts.{j}.w3.weight       | experts.{j}.up_proj.weight     |
| layers/{i}/moe/down            | [e, f, d] | experts.{j}.w2.weight       | experts.{j}.down_proj.weight   |
| layers/{i}/{q,k}_norm (Qwen3)  | [h]       | -                           | (self_attn.{q,k}_norm.weight)  |
| layers/{i}/attn/{q,k,v,o}_bias | as Llama  | -                           | (self_attn.{q,k,v,o}_proj.bias)|

(Qwen3-MoE biases only with `attention_bias: true`.)

Expert weights carry the logical axis "expert" (default rule: the mesh axis "expert", e.g.
`make_mesh("data=2,expert=4")`: each device holds num_experts / 4 whole experts; on a mesh without
that axis the experts are split along "mlp" like a dense MLP).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jinfer.errors import ConfigError, UnsupportedArchitectureError
from jinfer.models import layers as L
from jinfer.models.llama import Llama, RopeScaling, normalize_rope_scaling
from jinfer.models.registry import ModelSpec, register

DISPATCHES = ("auto", "tiled", "ragged", "dense")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Hyperparameters of a sparse MoE decoder (defaults: a small Mixtral-shaped model).

    sparse_step / mlp_only_layers: layer i has experts iff (i + 1) % sparse_step == 0 and i is not
      in mlp_only_layers (Qwen3-MoE's decoder_sparse_step; Mixtral: every layer).
    norm_topk_prob: renormalise the top-k router probabilities to sum to 1.
    qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3).
    dispatch: how tokens reach their experts (same values up to float rounding): "tiled" (only the
      chosen experts, sorted into fixed-size tiles: `tiled_experts`), "ragged" (only the chosen
      experts, `jax.lax.ragged_dot`: `grouped_experts`), "dense" (every expert on every token, the
      baseline), "auto" (ragged on TPU/GPU, tiled on CPU).
    """

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1024  # dense-MLP layers only (Qwen3-MoE mlp_only_layers)
    moe_intermediate_size: int = 1024
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 64
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    qk_norm: bool = False
    attention_bias: bool = False  # q/k/v/o biases (Qwen3-MoE with attention_bias; never Mixtral)
    sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    rope_theta: float = 1000000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    dispatch: str = "auto"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"MoEConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"MoEConfig: num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts "
                f"({self.num_experts})"
            )
        if self.sparse_step < 1:
            raise ConfigError(f"MoEConfig: sparse_step={self.sparse_step} must be >= 1")
        if self.dispatch not in DISPATCHES:
            raise ConfigError(f"MoEConfig: dispatch={self.dispatch!r} is not one of {DISPATCHES}")
        L.rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)  # validates rope_scaling

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` has experts (else a dense SwiGLU)."""
        return (layer + 1) % self.sparse_step == 0 and layer not in self.mlp_only_layers

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> MoEConfig:
        """Maps a Hugging Face config.json (model_type mixtral or qwen3_moe) to an MoEConfig."""
        model_type = hf.get("model_type", "mixtral")
        if model_type not in ("mixtral", "qwen3_moe"):
            raise UnsupportedArchitectureError(
                f"MoEConfig.from_hf_config: model_type {model_type!r} is not one of mixtral, qwen3_moe"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedArchitectureError(f"MoEConfig.from_hf_config: hidden_act={act!r}; only silu")
        qwen = model_type == "qwen3_moe"
        if qwen and hf.get("use_sliding_window", False):
            raise UnsupportedArchitectureError("qwen3_moe with use_sliding_window=true is not supported")
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        max_pos = hf.get("max_position_embeddings", 4096)
        rope = dict(hf.get("rope_parameters") or {})
        theta = hf.get("rope_theta", rope.get("rope_theta", 1000000.0))
        experts = hf.get("num_experts") if qwen else None
        experts = experts or hf.get("num_local_experts")
        window = None if qwen else hf.get("sliding_window")
        scaling = hf.get("rope_scaling") or rope or None
        if scaling and scaling.get("rope_type", scaling.get("type")) in ("longrope", "su"):
            raise UnsupportedArchitectureError(
                f"MoEConfig.from_hf_config: {model_type} with longrope rope scaling is not supported "
                "(LongRoPE is read for Phi-3 models)"
            )
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            moe_intermediate_size=hf["moe_intermediate_size"] if qwen else hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            num_experts=int(experts),
            num_experts_per_tok=hf["num_experts_per_tok"],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)) if qwen else True,
            qk_norm=qwen,
            attention_bias=qwen and hf.get("attention_bias", False) is True,
            sparse_step=hf.get("decoder_sparse_step", 1) if qwen else 1,
            mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()) if qwen else (),
            rope_theta=float(theta),
            rope_scaling=normalize_rope_scaling(scaling),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            max_position_embeddings=max_pos,
            sliding_window=window if window is not None and window < max_pos else None,
        )


# -- routing and expert dispatch --------------------------------------------------------------------
def route(x: jax.Array, router: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """x [m, d], router [d, e] -> (weights [m, top_k] in x's dtype, expert ids [m, top_k] int32).

    Softmax in float32 over all experts, then the top_k largest (`lax.top_k`: among equal
    probabilities the lower expert index wins, a fixed rule; torch.topk's order among ties is
    unspecified, so a checkpoint whose router produces exact ties may pick other experts than
    transformers does).
    """
    logits = jnp.dot(x, router)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(x.dtype), experts.astype(jnp.int32)


def grouped_experts(
    x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, weights: jax.Array, experts: jax.Array
) -> jax.Array:
    """Computes only the chosen experts with `jax.lax.ragged_dot`: x [m, d], gate/up [e, d, f],
    down [e, f, d], weights and experts [m, k] -> [m, d].

    The m * k assignments are sorted by expert (stable) so each expert's rows are contiguous, and
    one grouped matmul per projection runs them (group sizes = assignments per expert). TPU and GPU
    lower ragged_dot to grouped kernels; XLA:CPU expands it into a masked dense product over all
    experts plus a copy of the weights (measured slower than `dense_experts`), so the CPU default
    is `tiled_experts`.
    """
    k = experts.shape[1]
    flat = experts.reshape(-1)  # [a]
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
    rows = x[order // k]  # [a, d], grouped by expert
    hidden = jax.nn.silu(jax.lax.ragged_dot(rows, gate, sizes)) * jax.lax.ragged_dot(rows, up, sizes)
    out = (
        jnp.zeros((flat.shape[0], x.shape[-1]), x.dtype)
        .at[order]
        .set(jax.lax.ragged_dot(hidden, down, sizes))
    )
    return _mix(out.reshape(*experts.shape, -1), weights)


def tiled_experts(
    x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, weights: jax.Array, experts: jax.Array
) -> jax.Array:
    """Computes only the chosen experts in fixed-size tiles: same contract as `grouped_experts`.

    The assignments are sorted by expert and each expert's rows padded to whole tiles of `T` rows
    (T = assignments per expert on average, at most 8: one row per tile at batch 1). A loop runs
    over the tiles in use; each tile multiplies its [T, d] rows by its one expert's weights, read
    in place (`dynamic_index`), so a step reads the chosen experts only (batch-1 decode: top_k of
    num_experts weights). Every tile has the same shape whatever the routing, so a row's bits do
    not depend on which rows share its tile (tested).
    """
    m, k = experts.shape
    e, d = gate.shape[0], x.shape[-1]
    a = m * k
    tile = max(1, min(8, a // e))
    n_tiles = (a + min(e, a) * (tile - 1)) // tile  # bound: each non-empty group wastes < 1 tile
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # sorted position -> assignment
    sorted_expert = flat[order]
    sizes = jnp.bincount(flat, length=e)
    tiles = (sizes + tile - 1) // tile
    tile_end = jnp.cumsum(tiles)
    rank = jnp.arange(a) - (jnp.cumsum(sizes) - sizes)[sorted_expert]
    slot = (tile_end - tiles)[sorted_expert] * tile + rank  # sorted position -> padded row
    token = jnp.full((n_tiles * tile,), m, jnp.int32).at[slot].set(order // k)  # padded rows: token m
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(n_tiles), side="right"), e - 1)
    rows = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[token].reshape(n_tiles, tile, d)

    def run_tile(i, out):
        w_gate, w_up, w_down = (
            jax.lax.dynamic_index_in_dim(w, tile_expert[i], 0, False) for w in (gate, up, down)
        )
        h = jax.nn.silu(jnp.dot(rows[i], w_gate)) * jnp.dot(rows[i], w_up)
        return jax.lax.dynamic_update_index_in_dim(out, jnp.dot(h, w_down), i, 0)

    out = jax.lax.fori_loop(0, tile_end[-1], run_tile, jnp.zeros((n_tiles, tile, d), x.dtype))
    per_assignment = out.reshape(n_tiles * tile, d)[jnp.zeros(a, jnp.int32).at[order].set(slot)]
    return _mix(per_assignment.reshape(m, k, d), weights)


def _mix(outputs: jax.Array, weights: jax.Array) -> jax.Array:
    """outputs [m, k, d], weights [m, k] -> [m, d], summed in top-k order (per token, fixed)."""
    total = outputs[:, 0] * weights[:, :1]
    for j in range(1, outputs.shape[1]):
        total = total + outputs[:, j] * weights[:, j : j + 1]
    return total


def dense_experts(
    x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, weights: jax.Array, experts: jax.Array
) -> jax.Array:
    """The baseline: every expert on every token, then the chosen ones weighted and summed."""
    hidden = jax.nn.silu(jnp.einsum("md,edf->mef", x, gate)) * jnp.einsum("md,edf->mef", x, up)
    out = jnp.einsum("mef,efd->med", hidden, down)  # [m, e, d]
    return _mix(jnp.take_along_axis(out, experts[:, :, None], axis=1), weights)


_DISPATCH = {"tiled": tiled_experts, "ragged": grouped_experts, "dense": dense_experts}


def _resolve_dispatch(dispatch: str) -> str:
    if dispatch != "auto":
        return dispatch
    return "tiled" if jax.default_backend() == "cpu" else "ragged"


class MoE(nnx.Module):
    """Router + stacked SwiGLU experts; params router [d, e], gate/up [e, d, f], down [e, f, d]."""

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        e, d, f = c.num_experts, c.hidden_size, c.moe_intermediate_size
        # Unnamed axes: the router stays float32 and replicated (int8 could flip expert choices).
        self.router = L.make_param(rngs, (d, e), (None, None))
        self.gate = L.make_param(rngs, (e, d, f), ("expert", "embed", "mlp"))
        self.up = L.make_param(rngs, (e, d, f), ("expert", "embed", "mlp"))
        self.down = L.make_param(rngs, (e, f, d), ("expert", "mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [b, t, d] -> [b, t, d]."""
        c = self.config
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = route(flat, self.router[...], c.num_experts_per_tok, c.norm_topk_prob)
        y = _DISPATCH[_resolve_dispatch(c.dispatch)](
            flat, self.gate[...], self.up[...], self.down[...], weights, experts
        )
        return y.reshape(x.shape)


# -- decoder --------------------------------------------------------------------------------------
class MoEBlock(nnx.Module):
    """Pre-RMSNorm block: x + attn(norm(x)), then x + MoE(norm(x)) (or a dense SwiGLU)."""

    def __init__(self, config: MoEConfig, layer: int, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.attn_norm = L.ones_param(rngs, (c.hidden_size,), ("embed",))
        dims = L.AttentionDims(
            c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.attention_bias, c.attention_bias
        )
        self.attn = L.Attention(dims, rngs=rngs)
        if c.qk_norm:
            self.q_norm = L.ones_param(rngs, (c.head_dim,), ("head_dim",))
            self.k_norm = L.ones_param(rngs, (c.head_dim,), ("head_dim",))
        self.mlp_norm = L.ones_param(rngs, (c.hidden_size,), ("embed",))
        if c.is_sparse(layer):
            self.moe = MoE(c, rngs=rngs)
        else:
            self.mlp = L.SwiGLU(c.hidden_size, c.intermediate_size, rngs=rngs)

    def __call__(
        self, x: jax.Array, positions: jax.Array, layer_cache: L.LayerCache | None
    ) -> tuple[jax.Array, L.LayerCache | None]:
        c = self.config
        q, k, v = self.attn.project(L.rms_norm(x, self.attn_norm[...], c.rms_norm_eps))
        if c.qk_norm:
            q, k = (
                L.rms_norm(q, self.q_norm[...], c.rms_norm_eps),
                L.rms_norm(k, self.k_norm[...], c.rms_norm_eps),
            )
        inv_freq = L.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        q, k = L.apply_rope(q, positions, inv_freq), L.apply_rope(k, positions, inv_freq)
        o, layer_cache = L.causal_attention(q, k, v, positions, layer_cache, c.sliding_window)
        x = x + self.attn.output(o)
        h = L.rms_norm(x, self.mlp_norm[...], c.rms_norm_eps)
        x = x + (self.moe(h) if hasattr(self, "moe") else self.mlp(h))
        return x, layer_cache


class MoEDecoder(Llama):
    """Sparse MoE causal LM (see the module docstring for the contract and parameter names): a
    Llama-style decoder (embedding, blocks, final norm, lm head; `__call__` and `logits` are
    Llama's) whose blocks route each token to its top experts."""

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.embed = L.make_param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        self.layers = nnx.List([MoEBlock(c, i, rngs=rngs) for i in range(c.num_layers)])
        self.final_norm = L.ones_param(rngs, (c.hidden_size,), ("embed",))
        if not c.tie_word_embeddings:
            self.lm_head = L.make_param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"))


def hf_param_map(config: MoEConfig) -> L.HFParamMap:
    """{jinfer param path: (HF tensor name, transform)}; "{expert}" in a name marks a stack of one
    tensor per expert (transform "expert_transpose": each [out, in] -> [in, out], stacked)."""
    qwen = config.qk_norm
    out: L.HFParamMap = {"embed": ("model.embed_tokens.weight", "reshape")}
    for i in range(config.num_layers):
        hf, jp = f"model.layers.{i}.", f"layers/{i}/"
        out[jp + "attn_norm"] = (hf + "input_layernorm.weight", "reshape")
        out[jp + "mlp_norm"] = (hf + "post_attention_layernorm.weight", "reshape")
        for name in ("q", "k", "v", "o"):
            out[f"{jp}attn/{name}"] = (f"{hf}self_attn.{name}_proj.weight", "transpose")
            if config.attention_bias:
                out[f"{jp}attn/{name}_bias"] = (f"{hf}self_attn.{name}_proj.bias", "reshape")
        if qwen:
            out[jp + "q_norm"] = (hf + "self_attn.q_norm.weight", "reshape")
            out[jp + "k_norm"] = (hf + "self_attn.k_norm.weight", "reshape")
        if not config.is_sparse(i):
            for name in ("gate", "up", "down"):
                out[f"{jp}mlp/{name}"] = (f"{hf}mlp.{name}_proj.weight", "transpose")
            continue
        moe = hf + ("mlp." if qwen else "block_sparse_moe.")
        out[jp + "moe/router"] = (moe + "gate.weight", "transpose")
        names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        if not qwen:
            names = {"gate": "w1", "up": "w3", "down": "w2"}
        for name, hf_name in names.items():
            out[f"{jp}moe/{name}"] = (f"{moe}experts.{{expert}}.{hf_name}.weight", "expert_transpose")
    out["final_norm"] = ("model.norm.weight", "reshape")
    if not config.tie_word_embeddings:
        out["lm_head"] = ("lm_head.weight", "transpose")
    return out


MIXTRAL_8X7B = MoEConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    moe_intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    num_experts=8,
    num_experts_per_tok=2,
    rope_theta=1e6,
    max_position_embeddings=32768,
)
QWEN3_30B_A3B = MoEConfig(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_layers=48,
    num_heads=32,
    num_kv_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    qk_norm=True,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
)

register(ModelSpec(name="MoE", config_cls=MoEConfig, module_cls=MoEDecoder, task="causal_lm"))
