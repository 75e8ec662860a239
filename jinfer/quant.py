"""int8 weight-only quantization: per-channel symmetric int8 weights with float32 scales.

A quantized weight is stored in the param tree as `{"q8": int8[shape], "scale": f32[shape with the
contracted axes set to 1]}`, so checkpoints stay plain nested dicts (Orbax saves them as two
arrays) and both parts are sharded by the weight's own logical axes (`scale` keeps the output
axes; its contracted axes have size 1 and are replicated).

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


def quantize_array(w: Any, axes: tuple[int, ...]) -> dict[str, Any]:
    """Symmetric per-channel int8: scale = max|w| / 127 over `axes` (numpy or jax input)."""
    xp = jnp if isinstance(w, jax.Array) else np
    w32 = w.astype(xp.float32)
    amax = xp.max(xp.abs(w32), axis=axes, keepdims=True)
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    q8 = xp.clip(xp.round(w32 / scale), -127, 127).astype(xp.int8)
    return {QKEY: q8, SKEY: scale}


def dequantize_array(leaf: dict[str, Any], dtype: Any) -> jax.Array:
    return (leaf[QKEY].astype(jnp.float32) * leaf[SKEY]).astype(dtype)


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
        scale_shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        return {
            QKEY: jax.ShapeDtypeStruct(x.shape, jnp.int8),
            SKEY: jax.ShapeDtypeStruct(scale_shape, jnp.float32),
        }

    return _map_weights(abstract, logical_axes, abstract_q)


def quantize_logical_axes(logical_axes: Any) -> Any:
    """Logical axes tree matching `quantize_abstract`: scales drop their reduced axes' names."""

    def axes_q(names, axes):
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
