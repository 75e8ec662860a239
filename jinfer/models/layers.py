"""Building blocks shared by jinfer's model families: pure math on explicit NNX params.

Norms, rotary position embeddings, the attention projections and core (grouped-query, with the
KV-cache mask), MLPs, the decoder layer loop and the Hugging Face tensor transforms live here so that
no model file copies them from another.

Einsum letters: b batch, t query length, s key length, d model dim, n query heads, k kv heads,
g query heads per kv head (n = k * g), h head dim, f mlp hidden, v vocab; in the blocked KV cache
(jinfer.kvcache) nb blocks of l positions each.

Numerics: matmuls run in the params' dtype; norms, RoPE and softmax in float32. A weight in a
narrower float dtype than its input (bfloat16 weights under float32 compute, see jinfer.precision)
multiplies the input cast to the weight's dtype and accumulates in the input's dtype (`mixed`).

Weights: every projection goes through `linear`, which dispatches on the weight's type
(jinfer.models.weights): a float array in the canonical layout, a `QuantArray` (int8, dequantized
right before the product) or an `OutMajor` weight (held [out, in], contracted in place). Modules
therefore read their weights with `param.get_value()` (the typed value), not `param[...]`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jinfer import cpu_kernels, kvcache
from jinfer.errors import ConfigError
from jinfer.kvcache import KVCache
from jinfer.models import weights
from jinfer.models.weights import OutMajor, QuantArray, Weight, dense, narrower_float, round_input

Axes = tuple[str | None, ...]
LayerCache = tuple[jax.Array, jax.Array]  # (keys, values) in the blocked layout of jinfer.kvcache

DEFAULT_INIT = nnx.initializers.normal(0.02)
# Finite "minus infinity": a fully masked row (a padding query) softmaxes to a uniform average
# instead of NaN.
MASK_VALUE = float(np.finfo(np.float32).min)


# -- weight layout ----------------------------------------------------------------------------------
# Weights are stored [in..., out...] (the layout of checkpoints). An `OutMajor` weight is held
# [out..., in] instead (jinfer.quant.transpose_params: the faster layout for XLA:CPU
# matrix-vector products), and `linear` contracts it in place: a transpose written before the dot
# would be materialised by XLA on every call.


def linear(spec: str, x: jax.Array, w: Weight, **kwargs: Any) -> jax.Array:
    """einsum(spec, x, w) for a projection, as one rank-2 matrix product, by the type of w.

    `spec` names the weight in its canonical layout, [contracted..., kept...] (e.g.
    "btd,dnh->btnh"); x's contracted letters must end its subscripts and the output must be x's
    other letters followed by w's kept ones (true of every projection in jinfer's models).
    A float array is that canonical weight; a `QuantArray` is dequantized first (to its dtype);
    an `OutMajor` weight holds [kept..., contracted] and goes through `out_major_matmul`.
    Rank-2 on purpose: XLA:CPU runs a [b, 1, d] operand ~2x slower than [b, d], and copies a
    transposed higher-rank weight on every call where it reads a rank-2 one in place.
    """
    inputs, out = spec.split("->")
    xs, ws = inputs.split(",")
    kept = "".join(c for c in ws if c in out)
    contracted = "".join(c for c in ws if c not in out)
    lead = xs[: len(xs) - len(contracted)]
    if not xs.endswith(contracted) or out != lead + kept or ws != contracted + kept:
        raise ConfigError(f"linear({spec!r}): not expressible as an [m, in] x [in, out] product")
    n_lead = x.ndim - len(contracted)
    lead_shape = x.shape[:n_lead]
    x2 = round_input(x.reshape(math.prod(lead_shape), -1), w)
    if isinstance(w, OutMajor):
        wt = dense(w.w)  # [kept..., contracted]
        kept_shape = wt.shape[: len(kept)]
        # int8 weights: XLA's loop dequantizes them in place; the kernel would need them written out
        kernel = not isinstance(w.w, QuantArray)
        y = out_major_matmul(x2, wt.reshape(math.prod(kept_shape), -1), kernel=kernel, **kwargs)
    else:
        w = dense(w)
        kept_shape = w.shape[len(contracted) :]
        narrow = narrower_float(w.dtype, x2.dtype)
        x2, kwargs = mixed(x2, w, kwargs)
        w2 = w.reshape(-1, math.prod(kept_shape))
        y = (
            two_rows(x2, w2, kwargs, "mc,ck->mk")
            if narrow and x2.shape[0] == 1
            else jnp.dot(x2, w2, **kwargs)
        )
    return y.reshape(*lead_shape, *kept_shape)


def mixed(x: jax.Array, w: jax.Array, kwargs: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    """(x, kwargs) for a product of x with the float weight w: when w is a narrower float than x
    (bfloat16 weights, float32 compute), x cast to w's dtype and the product accumulated in x's
    dtype. Casting w up instead would convert the whole weight on every call, and XLA:CPU
    multiplies bfloat16 natively on CPUs that have it (jinfer.precision)."""
    if not narrower_float(w.dtype, x.dtype):
        return x, kwargs
    return x.astype(w.dtype), {"preferred_element_type": x.dtype, **kwargs}


def out_major_matmul(x: jax.Array, w: jax.Array, kernel: bool = True, **kwargs: Any) -> jax.Array:
    """x [..., c] @ w[k, c].T -> [..., k] (a narrower float w: see `mixed`).

    With a single row this is written as the rank-1 product `dot(x, w.T)`, the form XLA:CPU
    emits as one loop over w's rows fused with w's producer: int8 weights are then read and
    dequantized inside that loop, never written out as float32 (measured: 2x faster int8 decode).
    A single row against a narrower float w is multiplied as two rows (`two_rows`), except that
    one float32 row against bfloat16 w goes to `jinfer.cpu_kernels.bf16_matvec` in programs
    traced with the kernels enabled (engines on one CPU device) unless `kernel` is False.
    """
    if kernel and set(kwargs) <= {"preferred_element_type"} and cpu_kernels.matvec_applies(x, w, **kwargs):
        return cpu_kernels.bf16_matvec(x, w)
    narrow = narrower_float(w.dtype, x.dtype)
    x, kwargs = mixed(x, w, kwargs)
    if math.prod(x.shape[:-1]) == 1:
        if narrow:
            return two_rows(x, w, kwargs)
        return jnp.dot(x.reshape(-1), w.T, **kwargs).reshape(*x.shape[:-1], w.shape[0])
    return jnp.einsum("...c,kc->...k", x, w, **kwargs)


def two_rows(x: jax.Array, w: jax.Array, kwargs: dict[str, Any], spec: str = "mc,kc->mk") -> jax.Array:
    """x [..., c] (one row) times the rank-2 w by `spec` (default: output-major w [k, c]) ->
    [..., k], computed with a zero second row.

    XLA:CPU multiplies one row by bfloat16 weights about 10x slower than two rows
    (scripts/bench_matvec.py: SmolLM2's 576x49152 head 26.5 vs 2.4 ms), so the one row of a
    decode step runs as two; the zero row's outputs are dropped."""
    x2 = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), x.dtype)])
    y = jnp.einsum(spec, x2, w, **kwargs)[:1]
    return y.reshape(*x.shape[:-1], y.shape[-1])


# -- prefill without a cached prefix ---------------------------------------------------------------
class PromptStartCache(tuple):
    """A layer cache (keys, values) for a call whose tokens start the sequence (position 0).

    The call still writes its keys/values into the cache but attends only within itself: correct
    for a fresh prefill, and it spares reading (and re-laying out) the rest of the cache row.
    `run_decoder_layers(..., prompt_start=True)` hands this type to each layer.
    """


class CacheRows(tuple):
    """A layer cache (keys, values) whose query row r lives in cache row `rows[r]` (default: r).

    A later prefill chunk of a slot then writes and reads that slot's row in the whole cache, in
    place, instead of a copy of the row. `run_decoder_layers(..., cache_rows=rows)` hands this
    type to each layer.
    """

    rows: jax.Array

    @classmethod
    def of(cls, layer_cache: LayerCache, rows: jax.Array) -> CacheRows:
        out = cls(layer_cache)
        out.rows = rows
        return out


class StructureRngs(nnx.Rngs):
    """Rngs for building a module for its structure only (under nnx.eval_shape): `make_param`
    gives every parameter a constant initializer, whose trace is ~50x cheaper than a random one's
    (SmolLM2's structure: 1.6 s -> tens of ms, paid at every model load). The values are never
    used; shapes, dtypes and logical axes are those of a real build."""


def make_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Axes, init: Callable = DEFAULT_INIT) -> nnx.Param:
    """An nnx.Param of `shape` annotated with logical axes (float32 unless cast later)."""
    if isinstance(rngs, StructureRngs):
        return nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, axes)(None, tuple(shape)))
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), tuple(shape)))


def ones_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Axes) -> nnx.Param:
    return make_param(rngs, shape, axes, nnx.initializers.ones)


def zeros_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Axes) -> nnx.Param:
    return make_param(rngs, shape, axes, nnx.initializers.zeros)


def embed_lookup(table: jax.Array | QuantArray, ids: jax.Array, dtype: Any = None) -> jax.Array:
    """table [v, d] (float or int8), ids [...] int -> [..., d] in `dtype` (default: the table's;
    negative ids, i.e. padding, read row 0)."""
    # The barrier ties the table to this call's ids. XLA:CPU has no bfloat16 gather: it widens the
    # table to float32 around the gather, and inside a decode loop, where the table is
    # loop-invariant, it hoisted that conversion out of the loop, so every decode call converted
    # the whole table (SmolLM2's 49152 x 576: 23 ms on one thread). Tied to the ids, the
    # conversion stays fused with the gather and touches only the rows read.
    table, ids = jax.lax.optimization_barrier((table, ids))
    rows = jnp.take(dense(table), jnp.maximum(ids, 0), axis=0)
    if dtype is None or rows.dtype == dtype:
        return rows
    # Converted after the gather: XLA would otherwise rewrite gather(table).astype as a gather
    # of the converted table and hoist that whole-table conversion out of the decode loop.
    return jax.lax.optimization_barrier(rows).astype(dtype)


# -- norms ----------------------------------------------------------------------------------------
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale.astype(jnp.float32)).astype(x.dtype)


def rms_norm_plus_one(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: normalised x times (1 + scale), in float32 (scale is stored zero-centred)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma 2's attention and final logit soft-capping); x when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with params `scale` [d] and `bias` [d] (logical axis "embed")."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = ones_param(rngs, (dim,), ("embed",))
        self.bias = zeros_param(rngs, (dim,), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


# -- rotary position embeddings --------------------------------------------------------------------
ROPE_TYPES = ("default", "linear", "llama3", "longrope")


@functools.lru_cache(maxsize=64)
def rope_inv_freq(head_dim: int, theta: float, scaling: tuple[tuple[str, Any], ...] | None) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float32), with optional "linear"/"llama3" scaling.

    `scaling` is a tuple of (key, value) pairs as stored in LlamaConfig.rope_scaling.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    params = dict(scaling or ())
    kind = params.get("rope_type", "default")
    if kind == "default":
        return inv_freq.astype(np.float32)
    if kind == "linear":
        return (inv_freq / params["factor"]).astype(np.float32)
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, params)
    if kind == "longrope":
        return longrope_inv_freq(head_dim, theta, scaling, long=False)
    raise ConfigError(f"rope_scaling type {kind!r} is not supported; supported types are {ROPE_TYPES}")


def _llama3_inv_freq(inv_freq: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, and the band
    # between them interpolated smoothly.
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


@functools.lru_cache(maxsize=64)
def longrope_inv_freq(
    head_dim: int, theta: float, scaling: tuple[tuple[str, Any], ...], long: bool
) -> np.ndarray:
    """Phi-3's LongRoPE inverse frequencies [head_dim // 2]: the base ones divided by the
    per-frequency `long_factor` or `short_factor` of `scaling`."""
    params = dict(scaling)
    factors = np.asarray(params["long_factor" if long else "short_factor"], np.float32)
    if factors.shape != (head_dim // 2,):
        raise ConfigError(
            f"longrope {'long' if long else 'short'}_factor has {factors.size} values; "
            f"the rotary dimension {head_dim} needs {head_dim // 2}"
        )
    return (1.0 / (factors * theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(
        np.float32
    )


def rope_qk(
    q: jax.Array,
    k: jax.Array,
    positions: jax.Array,
    theta: float,
    scaling: tuple[tuple[str, Any], ...] | None,
    rotary_dim: int | None = None,
    long_rope: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Rotates q [b, t, n, h] and k [b, t, k, h] by positions [b, t] (half-split layout).

    Only the first `rotary_dim` (default h) channels rotate (partial rotary, Phi-4-mini); the rest
    pass through. LongRoPE (Phi-3 128k) picks its long factors for a row when the row's furthest
    position in this call is at or past `original_max_position_embeddings`, or when `long_rope`
    (bool, scalar or [b]) says its whole prompt is (a prompt prefilled in chunks: its first chunks
    end inside the original context), else its short ones, and scales cos/sin by
    `attention_factor`. Keys already cached keep the rotation they were written with
    (transformers' cached forward does the same; its `generate` instead re-encodes the whole
    sequence once when generation crosses the original context, see the README).
    """
    rot = rotary_dim or q.shape[-1]
    params = dict(scaling or ())
    mscale = 1.0
    if params.get("rope_type") == "longrope":
        short, long = (jnp.asarray(longrope_inv_freq(rot, theta, scaling, long=x)) for x in (False, True))
        past = jnp.max(positions, axis=1) + 1 > params["original_max_position_embeddings"]  # [b]
        if long_rope is not None:
            past = past | long_rope
        inv_freq = jnp.where(past[:, None, None], long, short)  # [b, 1, rot / 2]
        mscale = float(params.get("attention_factor", 1.0))
    else:
        inv_freq = rope_inv_freq(rot, theta, scaling)

    def rotate(x: jax.Array) -> jax.Array:
        y = apply_rope(x[..., :rot], positions, inv_freq)
        if mscale != 1.0:
            y = (y.astype(jnp.float32) * mscale).astype(x.dtype)
        return y if rot == x.shape[-1] else jnp.concatenate([y, x[..., rot:]], axis=-1)

    return rotate(q), rotate(k)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates x [b, t, n, h] by positions [b, t] in the half-split (rotate_half) layout."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, t, h/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# -- attention ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttentionDims:
    """Shapes and biases of one attention block."""

    embed: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    out_bias: bool = False


class Attention(nnx.Module):
    """Projections of multi-head / grouped-query attention.

    Params: q [d, n, h], k [d, k, h], v [d, k, h], o [n, h, d]; with qkv_bias also q_bias [n, h],
    k_bias [k, h], v_bias [k, h]; with out_bias o_bias [d].
    """

    def __init__(self, dims: AttentionDims, *, rngs: nnx.Rngs):
        d, n, kv, h = dims.embed, dims.num_heads, dims.num_kv_heads, dims.head_dim
        self.dims = dims
        self.q = make_param(rngs, (d, n, h), ("embed", "heads", "head_dim"))
        self.k = make_param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"))
        self.v = make_param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"))
        self.o = make_param(rngs, (n, h, d), ("heads", "head_dim", "embed"))
        if dims.qkv_bias:
            self.q_bias = zeros_param(rngs, (n, h), ("heads", "head_dim"))
            self.k_bias = zeros_param(rngs, (kv, h), ("kv_heads", "head_dim"))
            self.v_bias = zeros_param(rngs, (kv, h), ("kv_heads", "head_dim"))
        if dims.out_bias:
            self.o_bias = zeros_param(rngs, (d,), ("embed",))

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [b, t, d] -> q [b, t, n, h], k [b, t, k, h], v [b, t, k, h]."""
        q = linear("btd,dnh->btnh", x, self.q.get_value())
        k = linear("btd,dkh->btkh", x, self.k.get_value())
        v = linear("btd,dkh->btkh", x, self.v.get_value())
        if self.dims.qkv_bias:
            # dense: a bias given narrower than the compute dtype may come widened in a one-row copy
            biases = (self.q_bias, self.k_bias, self.v_bias)
            q, k, v = (x + dense(b.get_value()) for x, b in zip((q, k, v), biases, strict=True))
        return q, k, v

    def output(self, o: jax.Array) -> jax.Array:
        """o [b, t, n, h] -> [b, t, d]."""
        # An explicit [n*h] contraction (`linear`): the einsum form lets XLA pick an (h, n)
        # contraction order, which transposes (copies) the whole o weight on every call.
        b, t, n, h = o.shape
        w = self.o.get_value()
        if isinstance(w, OutMajor) and not isinstance(w.w, QuantArray):  # w.w [d, n * h] float
            # A library dot: the fused loop of `out_major_matmul` (used by `linear`) reads an input
            # that is a reshaped [k, g, h] buffer (the attention output) with per-element index
            # arithmetic (SmolLM2 f32: 43.5 vs 38.2 tokens/s). int8 keeps the fused loop, which
            # dequantizes in place.
            wd = dense(w.w)
            o2 = round_input(o.reshape(b, t, n * h), w)
            if cpu_kernels.matvec_applies(o2, wd):
                return self._out_bias(cpu_kernels.bf16_matvec(o2, wd))
            o2, kwargs = mixed(o2, wd, {})
            if b * t == 1 and kwargs:  # one row, narrow weights
                y = two_rows(o2, wd, kwargs)
            else:
                y = jnp.einsum("btm,dm->btd", o2, wd, **kwargs)
        else:
            y = linear("btnh,nhd->btd", o, w)
        return self._out_bias(y)

    def _out_bias(self, y: jax.Array) -> jax.Array:
        return y + self.o_bias[...] if self.dims.out_bias else y


def cached_attention(
    q: jax.Array,
    keys_t: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Grouped-query attention over keys/values in the cache layout (see jinfer.kvcache).

    q [b, t, n, h], keys_t [b, k, h, s], values [b, k, s, h], mask [b, t, s] -> [b, t, n, h].
    The query is grouped as [b, t, k, g, h], so kv heads are never repeated. Scale 1/sqrt(h);
    scores and softmax in f32. Masked keys get a finite minimum, so their weight is exactly 0
    and a fully masked (padding) query averages instead of producing NaN. `scale` replaces
    1/sqrt(h) (Gemma's query_pre_attn_scalar ** -0.5); `softcap` soft-caps the scaled scores.
    """
    b, t, n, h = q.shape
    kv_heads = keys_t.shape[1]
    qg = (q * (scale or 1.0 / math.sqrt(h))).reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bkhs->bkgts", qg, keys_t.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = soft_cap(scores, softcap)
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, values)
    return out.reshape(b, t, n, h).astype(q.dtype)


def _block_scores(q32: jax.Array, keys_t: jax.Array, one_token: bool) -> jax.Array:
    # q32 [b, k, q, h] x keys_t [b, k, h, s] -> [b, k, q, s] (q: the query tokens of a kv head,
    # t * g), straight from the cache layout. For one decode token of one row, XLA:CPU lowers the
    # einsum to batched dots whose operand/result layouts force copies of the cache; a
    # multiply-reduce reads it once. A chunk of queries is a real matmul: einsum.
    if one_token and q32.shape[0] == 1:
        return jnp.sum(q32[..., None] * keys_t[:, :, None].astype(jnp.float32), axis=3)
    return jnp.einsum("bkqh,bkhs->bkqs", q32, keys_t.astype(jnp.float32))


def _block_values(p: jax.Array, values: jax.Array, one_token: bool) -> jax.Array:
    # p [b, k, q, l] x values [b, k, l, h] -> [b, k, q, h]: a multiply-reduce for one decode token
    # (decode's bits as before chunks used this path), an einsum for a chunk (on XLA:CPU 1.25-1.7x
    # faster for 64 queries at position 512, 1.6-1.8x for 512: scripts/bench_chunk_attention.py).
    if one_token:
        return jnp.sum(p[..., None] * values[:, :, None].astype(jnp.float32), axis=3)
    return jnp.einsum("bkql,bklh->bkqh", p, values.astype(jnp.float32))


def blocked_attention(
    q: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    positions: jax.Array,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    rows: jax.Array | None = None,
) -> jax.Array:
    """Attention of t query tokens per row over the blocked cache (see jinfer.kvcache).

    q [b, t, n, h], cache_k [nb, c, k, h, l], cache_v [nb, c, k, l, h] with c >= b cache rows
    (query row r attends to cache row `rows[r]`, default r), positions [b, t] -> [b, t, n, h].
    One token per row is decode; several are a later prefill chunk, which attends to the row's
    cached prefix and to itself.
    Loops over blocks 0 .. max(positions) // l only (a runtime trip count) with an
    online softmax. For a row, a block past its own position changes nothing, bit for bit: its
    scores are all masked, so the running max stays, the rescale factor is exp(0) = 1 and the
    added sums are exact zeros. So a row's result does not depend on how far its companions reach.
    With a sliding window the loop starts at the first block any live row's window reaches (rows
    at negative positions, idle slots, are ignored): the blocks before it are masked for every row
    (a masked block visited first is scaled to exact zeros by the first unmasked one), so skipping
    them changes no bit either. `scale`/`softcap` as in `cached_attention`.
    """
    b, t, n, h = q.shape
    blocks, _, kv_heads, _, block = cache_k.shape
    g = n // kv_heads
    # The t queries of a kv head are folded into its group axis: [b, k, t * g, h] (t major), so
    # one token (decode) is the plain grouped layout and a chunk reuses the same contractions.
    q32 = (q * (scale or 1.0 / math.sqrt(h))).astype(jnp.float32).reshape(b, t, kv_heads, g, h)
    q32 = jnp.swapaxes(q32, 1, 2).reshape(b, kv_heads, t * g, h)
    if cpu_kernels.attention_applies(q, cache_k, cache_v):  # one token per row, jinfer's CPU kernel
        row_ids = jnp.arange(b, dtype=jnp.int32) if rows is None else rows
        out = cpu_kernels.decode_attention(
            q32, cache_k, cache_v, positions[:, 0], row_ids, softcap, sliding_window
        )
        return out.reshape(b, t, n, h).astype(q.dtype)

    def visit(i, carry):
        top, total, out = carry  # running max [b, k, t*g, 1], sum [b, k, t*g, 1], numerator [b, k, t*g, h]
        # The cache may hold more rows than there are queries (a decode bucket smaller than the
        # slot count): query row r reads cache row `rows[r]` (default r), the others are not read.
        keys, values = (_block_rows(c, i, b, rows) for c in (cache_k, cache_v))
        k_positions = jnp.broadcast_to(i * block + jnp.arange(block, dtype=positions.dtype), (b, block))
        mask = _attention_mask(positions, k_positions, sliding_window)  # [b, t, l]
        mask = jnp.broadcast_to(mask[:, None, :, None], (b, 1, t, g, block)).reshape(b, 1, t * g, block)
        scores = jnp.where(mask, soft_cap(_block_scores(q32, keys, t == 1), softcap), MASK_VALUE)
        new_top = jnp.maximum(top, scores.max(axis=-1, keepdims=True))
        rescale = jnp.exp(top - new_top)
        p = jnp.exp(scores - new_top)
        total = total * rescale + p.sum(axis=-1, keepdims=True)
        out = out * rescale + _block_values(p, values, t == 1)
        return new_top, total, out

    init = (
        jnp.full((*q32.shape[:3], 1), MASK_VALUE, jnp.float32),
        jnp.zeros((*q32.shape[:3], 1), jnp.float32),
        jnp.zeros(q32.shape, jnp.float32),
    )
    if blocks == 1:
        _, total, out = visit(0, init)
    else:
        reached = jnp.clip(jnp.max(positions) // block + 1, 1, blocks)
        first = 0
        if sliding_window is not None:
            earliest = jnp.min(jnp.where(positions >= 0, positions, jnp.iinfo(positions.dtype).max))
            first = jnp.clip((earliest - sliding_window + 1) // block, 0, reached - 1)
        _, total, out = jax.lax.fori_loop(first, reached, visit, init)
    out = (out / total).reshape(b, kv_heads, t, g, h)
    return jnp.swapaxes(out, 1, 2).reshape(b, t, n, h).astype(q.dtype)


def _block_rows(cache: jax.Array, i: jax.Array, b: int, rows: jax.Array | None) -> jax.Array:
    """Block i of the cache rows the b query rows read: rows 0 .. b - 1, or `rows` (distinct; a
    row outside [0, c) is read clamped, so it may only carry padding queries, whose writes are
    dropped: see kvcache.write_keys)."""
    block = jax.lax.dynamic_index_in_dim(cache, i, 0, keepdims=False)
    if rows is None:
        return block[:b]
    if b == 1:
        return jax.lax.dynamic_slice_in_dim(block, rows[0], 1, 0)
    return jnp.take(block, rows, axis=0, mode="clip")


def _attention_mask(positions: jax.Array, k_positions: jax.Array, sliding_window: int | None) -> jax.Array:
    mask = kvcache.attention_mask(positions, k_positions)
    if sliding_window is not None:
        mask &= (positions[:, :, None] - k_positions[:, None, :]) < sliding_window
    return mask


def dot_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention over fresh keys/values: q [b, t, n, h], k/v [b, s, k, h], mask [b, t, s]."""
    return cached_attention(q, jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3)), mask)


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    layer_cache: LayerCache | None,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[jax.Array, LayerCache | None]:
    """Causal self-attention by absolute position, through the KV cache when one is given.

    q [b, t, n, h], k/v [b, t, k, h], positions [b, t] (negative = padding). Without a cache the
    queries attend within the call; with (cache_k, cache_v) in the blocked layout of
    jinfer.kvcache the new keys/values are written at their positions and the query at p attends
    to cache positions j <= p (within the call only when `layer_cache` is a PromptStartCache;
    through a CacheRows the query rows read and write the cache rows it names). A
    sliding window w additionally restricts attention to keys with p - j < w (Mistral, Gemma's
    local layers). `scale`/`softcap`: see `cached_attention`.
    """
    new_cache = None
    within_call = isinstance(layer_cache, PromptStartCache)
    rows = layer_cache.rows if isinstance(layer_cache, CacheRows) else None
    if layer_cache is not None:
        new_cache = (
            kvcache.write_keys(layer_cache[0], k, positions, rows),
            kvcache.write_values(layer_cache[1], v, positions, rows),
        )
    if new_cache is not None and not within_call:  # the cached prefix, over the blocks reached
        return blocked_attention(q, *new_cache, positions, sliding_window, scale, softcap, rows), new_cache
    mask = _attention_mask(positions, positions, sliding_window)  # attend within the call
    keys_t, values = jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3))
    return cached_attention(q, keys_t, values, mask, scale, softcap), new_cache


# -- MLPs -----------------------------------------------------------------------------------------
class SwiGLU(nnx.Module):
    """down(silu(x @ gate) * (x @ up)); params gate [d, f], up [d, f], down [f, d]."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.gate = make_param(rngs, (dim, hidden), ("embed", "mlp"))
        self.up = make_param(rngs, (dim, hidden), ("embed", "mlp"))
        self.down = make_param(rngs, (hidden, dim), ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        g = linear("btd,df->btf", x, self.gate.get_value())
        u = linear("btd,df->btf", x, self.up.get_value())
        return linear("btf,fd->btd", self.activation(g) * u, self.down.get_value())

    @staticmethod
    def activation(g: jax.Array) -> jax.Array:
        return jax.nn.silu(g)


class GeGLU(SwiGLU):
    """down(gelu_tanh(x @ gate) * (x @ up)) (Gemma); params as SwiGLU's."""

    @staticmethod
    def activation(g: jax.Array) -> jax.Array:
        return jax.nn.gelu(g, approximate=True)


class GeluMLP(nnx.Module):
    """down(gelu(x @ up + up_bias)) + down_bias; params up [d, f], up_bias [f], down [f, d], down_bias [d].

    `approximate=True` is the tanh GELU (GPT-2 "gelu_new"), False the exact erf GELU (BERT "gelu").
    """

    def __init__(self, dim: int, hidden: int, approximate: bool, *, rngs: nnx.Rngs):
        self.approximate = approximate
        self.up = make_param(rngs, (dim, hidden), ("embed", "mlp"))
        self.up_bias = zeros_param(rngs, (hidden,), ("mlp",))
        self.down = make_param(rngs, (hidden, dim), ("mlp", "embed"))
        self.down_bias = zeros_param(rngs, (dim,), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = linear("btd,df->btf", x, self.up.get_value()) + self.up_bias[...]
        h = jax.nn.gelu(h, approximate=self.approximate)
        return linear("btf,fd->btd", h, self.down.get_value()) + self.down_bias[...]


# -- decoder plumbing -----------------------------------------------------------------------------
def run_decoder_layers(
    layers: Sequence[Any],
    x: jax.Array,
    positions: jax.Array,
    cache: KVCache | None,
    prompt_start: bool = False,
    cache_rows: jax.Array | None = None,
    layer_kwargs: dict[str, Any] | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Runs `layer(x, positions, layer_cache, **layer_kwargs) -> (x, layer_cache)` over layers,
    threading the cache.

    `prompt_start`: the tokens start the sequence, so attention stays within the call (see
    PromptStartCache). `cache_rows` [b]: the cache row of each row of x (see CacheRows)."""
    if prompt_start and cache_rows is not None:
        raise ValueError("prompt_start calls write a cache of their own rows; cache_rows is for later chunks")
    if cache is not None and len(cache.k) != len(layers):
        raise ConfigError(f"KV cache has {len(cache.k)} layers but the model has {len(layers)}")
    new_k, new_v = [], []
    for i, layer in enumerate(layers):
        layer_cache = None if cache is None else (cache.k[i], cache.v[i])
        if layer_cache is not None and prompt_start:
            layer_cache = PromptStartCache(layer_cache)
        elif layer_cache is not None and cache_rows is not None:
            layer_cache = CacheRows.of(layer_cache, cache_rows)
        x, layer_cache = layer(x, positions, layer_cache, **(layer_kwargs or {}))
        if layer_cache is not None:
            new_k.append(layer_cache[0])
            new_v.append(layer_cache[1])
    return x, (None if cache is None else KVCache(k=tuple(new_k), v=tuple(new_v)))


def lm_head_logits(model: Any, hidden: jax.Array) -> jax.Array:
    """Logits of a decoder whose output table is `model.embed` (transposed) when
    `model.config.tie_word_embeddings`, else `model.lm_head` (Llama-style families)."""
    if model.config.tie_word_embeddings:
        return vocab_logits(hidden, model.embed.get_value(), tied=True)
    return vocab_logits(hidden, model.lm_head.get_value(), tied=False)


def vocab_logits(hidden: jax.Array, table: Weight, tied: bool) -> jax.Array:
    """hidden [..., d] -> float32 logits [..., v]; `table` is embed [v, d] if tied else lm_head [d, v]
    (a narrower float table than hidden multiplies as it is, see `mixed`)."""
    stored = table.w if isinstance(table, OutMajor) else table
    if isinstance(stored, QuantArray) or not narrower_float(stored.dtype, hidden.dtype):
        table = weights.astype(table, hidden.dtype)
    hidden = round_input(hidden, table)
    if tied:  # the embedding table [v, d] is already output-major
        return out_major_matmul(hidden, dense(table), preferred_element_type=jnp.float32)
    return linear("...d,dv->...v", hidden, table, preferred_element_type=jnp.float32)


# -- Hugging Face tensor transforms ---------------------------------------------------------------
# hf_param_map(config) in each model module returns {jinfer_path: (hf_name, transform)}; the
# transform names below are the whole vocabulary, applied by `apply_hf_transform`.
HF_TRANSFORMS = (
    "reshape",
    "transpose",
    "split3_0",
    "split3_1",
    "split3_2",
    "rows:START:STOP",
    "expert_transpose",
)
HFParamMap = dict[str, tuple[str, str]]


def apply_hf_transform(transform: str, tensor: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Turns a Hugging Face tensor into the jinfer param of `shape`.

    "reshape": reshape only (identity when shapes match). "transpose": torch nn.Linear weight
    [out, in] -> [in, out], then reshape. "split3_i": the i-th third of the last axis (GPT-2's fused
    c_attn = [q | k | v]), then reshape. "rows:START:STOP": output rows START..STOP of a fused
    torch Linear weight (Phi-3's qkv_proj and gate_up_proj), then as "transpose". "expert_transpose":
    "transpose" for each expert of a stack [e, out, in].
    """
    tensor = np.asarray(tensor)
    if transform.startswith("rows:"):
        start, stop = (int(i) for i in transform.split(":")[1:])
        tensor = tensor[start:stop].T
    elif transform == "transpose":
        tensor = tensor.T
    elif transform == "expert_transpose":  # stacked per-expert Linear weights [e, out, in] -> [e, in, out]
        tensor = np.swapaxes(tensor, -1, -2)
    elif transform.startswith("split3_"):
        tensor = np.split(tensor, 3, axis=-1)[int(transform[-1])]
    elif transform != "reshape":
        raise ConfigError(f"unknown HF transform {transform!r}; known: {HF_TRANSFORMS}")
    return tensor.reshape(tuple(shape))
