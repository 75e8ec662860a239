"""int8 weight-only quantization: symmetric int8 weights with float32 scales per output channel
and per group of GROUP_SIZE input elements.

A quantized weight is stored in the param tree as `{"q8": int8[shape], "scale": f32[...]}`, so
checkpoints stay plain nested dicts (Orbax saves them as two arrays) and both parts are sharded by
the weight's own logical axes. `scale` has the weight's rank: output axes keep their size, the
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

The dequantization (`q8 * scale`) runs inside the jitted forward, right before the matmul; XLA
fuses it into the consumer where the backend can (GPU/TPU). On XLA:CPU the converted weight is
materialised, so int8 saves memory but not decode time there (see BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("int8",)
QKEY, SKEY = "q8", "scale"
GROUP_SIZE = 32


def reduced_axes(logical_axes: tuple[str | None, ...]) -> tuple[int, ...] | None:
    """Axes a weight's scale is reduced over, or None when the leaf is not quantized."""
    if len(logical_axes) < 2:
        return None
    if "vocab" in logical_axes:
        keep = logical_axes.index("vocab")
        return tuple(i for i in range(len(logical_axes)) if i != keep)
    if logical_axes[0] == "embed":
        return (0,)
    if logical_axes[-1] == "embed":
        return tuple(range(len(logical_axes) - 1))
    return None


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, dict) and set(leaf) == {QKEY, SKEY}


def scale_shape(shape: tuple[int, ...], axes: tuple[int, ...], group: int = GROUP_SIZE) -> tuple[int, ...]:
    """Shape of the scales of a weight of `shape` reduced over `axes` (see the module docstring)."""
    out = [1 if i in axes else d for i, d in enumerate(shape)]
    grouped = max(axes, key=lambda i: shape[i])  # the longest contracted axis
    if group and shape[grouped] % group == 0 and shape[grouped] > group:
        out[grouped] = shape[grouped] // group
    return tuple(out)


def _grouped(x: Any, shape: tuple[int, ...], scale_shape_: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
    """View x [shape] as [.., groups, group_size, ..] along the grouped axis (if any)."""
    for i, (d, g) in enumerate(zip(shape, scale_shape_, strict=True)):
        if g not in (1, d):
            return x.reshape(*shape[:i], g, d // g, *shape[i + 1 :]), (
                *scale_shape_[:i],
                g,
                1,
                *scale_shape_[i + 1 :],
            )
    return x, scale_shape_


def quantize_array(w: Any, axes: tuple[int, ...], group: int = GROUP_SIZE) -> dict[str, Any]:
    """Symmetric int8: scale = max|w| / 127 per output channel and input group (numpy or jax)."""
    xp = jnp if isinstance(w, jax.Array) else np
    sshape = scale_shape(w.shape, axes, group)
    w32, bshape = _grouped(w.astype(xp.float32), w.shape, sshape)
    reduce_axes = tuple(
        i for i, (a, b) in enumerate(zip(w32.shape, bshape, strict=True)) if b == 1 and a != 1
    )
    amax = xp.max(xp.abs(w32), axis=reduce_axes, keepdims=True)
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    q8 = xp.clip(xp.round(w32 / scale), -127, 127).astype(xp.int8)
    return {QKEY: q8.reshape(w.shape), SKEY: scale.reshape(sshape)}


def dequantize_array(leaf: dict[str, Any], dtype: Any) -> jax.Array:
    q8, scale = leaf[QKEY], leaf[SKEY]
    grouped, bshape = _grouped(q8, q8.shape, scale.shape)
    return (grouped.astype(jnp.float32) * scale.reshape(bshape)).reshape(q8.shape).astype(dtype)


def _map_weights(params: Any, axes_tree: Any, fn) -> Any:
    """Applies fn(leaf, reduced_axes) to every quantizable leaf of a nested dict."""
    if isinstance(params, dict):
        return {k: _map_weights(v, axes_tree[k], fn) for k, v in params.items()}
    axes = reduced_axes(tuple(axes_tree))
    return params if axes is None else fn(params, axes)


def quantize_params(params: Any, logical_axes: Any) -> Any:
    """Quantizes every weight of a param tree (nested dicts) that `reduced_axes` selects."""
    return _map_weights(params, logical_axes, quantize_array)


def quantize_abstract(abstract: Any, logical_axes: Any) -> Any:
    """ShapeDtypeStruct tree of the quantized params (what a quantized checkpoint holds)."""

    def abstract_q(x, axes):
        return {
            QKEY: jax.ShapeDtypeStruct(x.shape, jnp.int8),
            SKEY: jax.ShapeDtypeStruct(scale_shape(x.shape, axes), jnp.float32),
        }

    return _map_weights(abstract, logical_axes, abstract_q)


def quantize_logical_axes(logical_axes: Any) -> Any:
    """Logical axes tree matching `quantize_abstract`: scales drop their reduced axes' names."""

    def axes_q(names, axes):
        # The grouped axis keeps no mesh axis either: its size (groups) rarely divides like the weight.
        names = tuple(names)
        return {QKEY: names, SKEY: tuple(None if i in axes else n for i, n in enumerate(names))}

    return _map_weights(logical_axes, logical_axes, axes_q)


def dequantize_params(params: Any, dtype: Any = jnp.float32) -> Any:
    """Float params from a (possibly partly) quantized tree; used inside the jitted forward."""
    if is_quantized(params):
        return dequantize_array(params, dtype)
    if isinstance(params, dict):
        return {k: dequantize_params(v, dtype) for k, v in params.items()}
    return params


def compute_dtype(params: Any) -> Any:
    """The floating dtype of the non-quantized leaves (norms), i.e. the model's compute dtype."""
    for leaf in jax.tree.leaves(params):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim <= 1:
            return leaf.dtype
    return jnp.float32
