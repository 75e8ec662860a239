"""int8 weight-only quantization: symmetric int8 weights with float32 scales per output channel
and per group of GROUP_SIZE input elements.

A quantized weight is a `jinfer.models.weights.QuantArray(q8=int8[shape], scale=f32[...])` leaf of
the param tree; checkpoints save its two arrays under the weight's name ("<path>/q8",
"<path>/scale") and both parts are sharded by the weight's own logical axes. `scale` has the
weight's rank: output axes keep their size, the
longest contracted axis has size (its size / GROUP_SIZE) (one scale per group; size 1 when it does
not divide), other contracted axes size 1. Groups matter for small models: on SmolLM2-135M
per-channel scales alone agree with float32 on ~96% of next-token predictions, groups of 64 on
more (see BENCHMARKS.md).

Which axes a scale spans follows from the logical axis names:
  - tables with a "vocab" axis (embeddings, lm_head): one scale per vocabulary entry;
  - weights whose first axis is "embed" (q, k, v, gate, up): contracted over axis 0, one scale per
    output element of the remaining axes;
  - weights whose last axis is "embed" (o, down): contracted over all leading axes, one scale per
    output feature.
Other leaves (norms, biases, anything 1-D) stay in floating point.

The dequantization (`q8 * scale`) runs inside the jitted forward, in the layer that reads the
weight (`jinfer.models.layers.linear` dispatches on QuantArray), right before the matmul; XLA
fuses it into the consumer where the backend can (GPU/TPU). On XLA:CPU, one-slot decode keeps the
weights output-major (see below) and the dequantization happens inside the matrix-vector loop
(~3x faster than float32-dequantized weights on SmolLM2); batched matmuls read a dequantized copy
made once per decode call (see BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.models.weights import OutMajor, QuantArray, group_view, narrower_float

METHODS = ("int8",)
GROUP_SIZE = 32


def reduced_axes(logical_axes: tuple[str | None, ...]) -> tuple[int, ...] | None:
    """Axes a weight's scale is reduced over, or None when the leaf is not quantized."""
    if len(logical_axes) < 2:
        return None
    if logical_axes[0] == "expert":  # stacked experts: each expert's weight like a dense one
        inner = reduced_axes(logical_axes[1:])
        return None if inner is None else tuple(i + 1 for i in inner)
    if "vocab" in logical_axes:
        keep = logical_axes.index("vocab")
        return tuple(i for i in range(len(logical_axes)) if i != keep)
    if logical_axes[0] == "embed":
        return (0,)
    if logical_axes[-1] == "embed":
        return tuple(range(len(logical_axes) - 1))
    return None


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, QuantArray)


def scale_shape(shape: tuple[int, ...], axes: tuple[int, ...], group: int = GROUP_SIZE) -> tuple[int, ...]:
    """Shape of the scales of a weight of `shape` reduced over `axes` (see the module docstring)."""
    out = [1 if i in axes else d for i, d in enumerate(shape)]
    grouped = max(axes, key=lambda i: shape[i])  # the longest contracted axis
    if group and shape[grouped] % group == 0 and shape[grouped] > group:
        out[grouped] = shape[grouped] // group
    return tuple(out)


def quantize_array(w: Any, axes: tuple[int, ...], group: int = GROUP_SIZE) -> QuantArray:
    """Symmetric int8: scale = max|w| / 127 per output channel and input group (numpy or jax)."""
    xp = jnp if isinstance(w, jax.Array) else np
    sshape = scale_shape(w.shape, axes, group)
    w32, bshape = group_view(w.astype(xp.float32), w.shape, sshape)
    reduce_axes = tuple(
        i for i, (a, b) in enumerate(zip(w32.shape, bshape, strict=True)) if b == 1 and a != 1
    )
    amax = xp.max(xp.abs(w32), axis=reduce_axes, keepdims=True)
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    q8 = xp.clip(xp.round(w32 / scale), -127, 127).astype(xp.int8)
    return QuantArray(q8.reshape(w.shape), scale.reshape(sshape))


def dequantize_array(leaf: QuantArray, dtype: Any) -> jax.Array:
    """The float values of a QuantArray (`leaf.dequantize(dtype)`)."""
    return leaf.dequantize(dtype)


def _map_weights(params: Any, axes_tree: Any, fn) -> Any:
    """Applies fn(leaf, reduced_axes) to every quantizable leaf of a nested dict."""

    def apply(leaf, names):
        axes = reduced_axes(names)
        return leaf if axes is None else fn(leaf, axes)

    return _map_float_leaves(params, axes_tree, apply)


def quantize_params(params: Any, logical_axes: Any) -> Any:
    """Quantizes every weight of a param tree (nested dicts) that `reduced_axes` selects."""
    return _map_weights(params, logical_axes, quantize_array)


def quantize_abstract(abstract: Any, logical_axes: Any) -> Any:
    """ShapeDtypeStruct tree of the quantized params (what a quantized checkpoint holds)."""

    def abstract_q(x, axes):
        return QuantArray(
            jax.ShapeDtypeStruct(x.shape, jnp.int8),
            jax.ShapeDtypeStruct(scale_shape(x.shape, axes), jnp.float32),
        )

    return _map_weights(abstract, logical_axes, abstract_q)


def quantize_logical_axes(logical_axes: Any) -> Any:
    """Logical axes tree matching `quantize_abstract`: scales drop their reduced axes' names."""

    def axes_q(names, axes):
        # The grouped axis keeps no mesh axis either: its size (groups) rarely divides like the weight.
        names = tuple(names)
        return QuantArray(names, tuple(None if i in axes else n for i, n in enumerate(names)))

    return _map_weights(logical_axes, logical_axes, axes_q)


# -- output-major ("transposed") runtime layout ---------------------------------------------------
# XLA:CPU's fastest matrix-vector product is a loop over the rows of a weight stored [out, in]
# (contracting its last axis), which it also fuses with the weight's producer, so int8 weights are
# dequantized inside that loop and never written out as float32 (see
# jinfer.models.layers.out_major_matmul). Batched matmuls (8+ rows) prefer [in, out]. So one-slot
# CPU decode keeps its weights output-major in memory: every weight `reduced_axes` selects is
# stored as transpose(w, kept axes + contracted axes) with the contracted axes merged into one
# (a merged axis that the loop would have to split again costs ~5x), wrapped in an `OutMajor`
# (around a float array, or a QuantArray whose q8 and scale are both in that layout), the type
# `layers.linear` dispatches on. Checkpoints always hold the canonical layout.


def _out_major_layout(names: tuple[str | None, ...]) -> tuple[tuple[int, ...], int] | None:
    """(perm, number of kept axes) for a canonical weight with these logical axes, or None when it
    keeps its layout (1-D leaves, tables already [vocab, d], lookup tables with an unnamed axis such
    as GPT-2's positions)."""
    axes = reduced_axes(names)
    if axes is None or None in names or names[0] == "expert":  # experts feed grouped matmuls as stored
        return None
    perm = tuple(i for i in range(len(names)) if i not in axes) + tuple(axes)
    if perm == tuple(range(len(names))):
        return None
    return perm, len(names) - len(axes)


def _merge(x: Any, n_kept: int) -> Any:
    return x.reshape(*x.shape[:n_kept], -1) if x.ndim - n_kept > 1 else x


def _out_major_scale(scale: Any, q_shape: tuple[int, ...], perm, n_kept: int, xp) -> Any:
    """A scale transposed like its weight; before merging contracted axes it is broadcast over the
    contracted axes in front of the grouped one, so groups stay contiguous in the merged axis."""
    t = xp.transpose(scale, perm)
    full = [q_shape[i] for i in perm]
    grouped = [i for i in range(n_kept, t.ndim) if t.shape[i] != 1]
    if t.ndim - n_kept > 1 and grouped:
        target = [full[i] if n_kept <= i < grouped[0] else t.shape[i] for i in range(t.ndim)]
        t = xp.broadcast_to(t, tuple(target))
    return _merge(t, n_kept)


def _out_major_leaf(leaf: Any, names: tuple[str | None, ...], xp) -> Any:
    layout = _out_major_layout(names)
    if layout is None:
        return leaf
    perm, n_kept = layout
    if is_quantized(leaf):
        q8 = _merge(xp.transpose(leaf.q8, perm), n_kept)
        scale = _out_major_scale(leaf.scale, leaf.q8.shape, perm, n_kept, xp)
        return OutMajor(dataclasses.replace(leaf, q8=q8, scale=scale))
    return OutMajor(_merge(xp.transpose(leaf, perm), n_kept))


def _map_float_leaves(tree: Any, float_axes: Any, fn) -> Any:
    """fn(leaf, canonical logical axes) on every leaf of `tree` (nested dicts), a QuantArray
    counting as one leaf; `float_axes` is the logical-axes tree of the unquantized model."""
    if isinstance(tree, dict):
        return {k: _map_float_leaves(v, float_axes[k], fn) for k, v in tree.items()}
    return fn(tree, tuple(float_axes))


def transpose_params(params: Any, float_axes: Any) -> Any:
    """Canonical params (float or int8) -> the output-major runtime layout (jax arrays)."""
    return _map_float_leaves(params, float_axes, lambda x, n: _out_major_leaf(x, n, jnp))


def transposed_bytes(params: Any, float_axes: Any, widen_to: Any = None) -> int:
    """Bytes of the leaves `transpose_params` rewrites (arrays or ShapeDtypeStructs; an int8
    weight counts its values and scales); the other leaves keep their buffers. `widen_to`: float
    weights narrower than this dtype are copied in it as well (`jinfer.models.weights.widen`)."""
    sizes = []

    def widened(x) -> bool:
        return widen_to is not None and x.ndim >= 2 and narrower_float(x.dtype, widen_to)

    def nbytes(x) -> int:
        return int(np.prod(x.shape)) * np.dtype(widen_to if widened(x) else x.dtype).itemsize

    def visit(leaf, names):
        copied = _out_major_layout(names) is not None
        sizes.extend(nbytes(x) for x in jax.tree.leaves(leaf) if copied or widened(x))
        return leaf

    _map_float_leaves(params, float_axes, visit)
    return sum(sizes)


def transpose_params_inplace(params: dict, float_axes: Any, shardings: Any) -> dict:
    """`transpose_params` on the host, one weight at a time, placed with `shardings` (the
    transposed model's). Each weight replaces its original in `params` (nested dicts this function
    modifies), so memory grows by one weight at a time, not by the model; no compilation."""
    for key in list(params):
        value, axes, sharding = params[key], float_axes[key], shardings[key]
        if isinstance(value, dict):
            transpose_params_inplace(value, axes, sharding)
            continue
        if _out_major_layout(tuple(axes)) is None:
            continue  # keeps its layout (and its device buffer)
        host = _out_major_leaf(jax.tree.map(np.asarray, value), tuple(axes), np)
        del value
        # Assigning drops the last reference to the original, which frees it before the next weight.
        params[key] = jax.tree.map(lambda x, s: jax.device_put(np.ascontiguousarray(x), s), host, sharding)
    return params


def transpose_abstract(abstract: Any, float_axes: Any) -> Any:
    return jax.eval_shape(lambda p: transpose_params(p, float_axes), abstract)


def transpose_logical_axes(axes: Any, float_axes: Any) -> Any:
    """Logical axes of the output-major leaves: permuted, a merged axis named by its first axis."""

    def names(x, perm, n_kept):
        t = tuple(x[i] for i in perm)
        return t[: n_kept + 1]

    def fn(leaf, float_names):
        layout = _out_major_layout(float_names)
        if layout is None:
            return leaf
        if is_quantized(leaf):
            return OutMajor(QuantArray(names(leaf.q8, *layout), names(leaf.scale, *layout)))
        return OutMajor(names(leaf, *layout))

    return _map_float_leaves(axes, float_axes, fn)


def compute_dtype(params: Any) -> Any:
    """The floating dtype of the non-quantized leaves (norms), i.e. the model's compute dtype."""
    for leaf in jax.tree.leaves(params):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim <= 1:
            return leaf.dtype
    return jnp.float32


def has_narrow_weights(params: Any) -> bool:
    """True when a float weight matrix of `params` (arrays or ShapeDtypeStructs, plain or inside an
    OutMajor) is narrower than the compute dtype: bfloat16 weights under float32 compute."""
    compute = compute_dtype(params)
    return any(leaf.ndim >= 2 and narrower_float(leaf.dtype, compute) for leaf in jax.tree.leaves(params))
