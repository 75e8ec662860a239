"""The weight types that jinfer's layers dispatch on: what a matmul does is the type of its weight.

A param tree's leaves are plain arrays or one of these registered pytrees:

- a jax array: a float weight in its canonical layout, [contracted..., kept...] (e.g. q [d, n, h]),
  the layout checkpoints hold;
- `QuantArray(q8, scale)`: a symmetric int8 weight (see jinfer.quant), value = q8 * scale with
  one float scale per output channel and input group; dequantized (to `dtype`) by the layer that
  reads it, inside the traced forward;
- `OutMajor(w)`: a weight held output-major, [kept..., contracted] with the contracted axes merged
  into one (w is a float array or a QuantArray in that layout). A runtime layout only (the fastest
  matrix-vector product of XLA:CPU, see `jinfer.models.layers.linear`); never saved.

`jinfer.models.layers.linear(spec, x, w)` reads `spec` as the canonical einsum and dispatches on
type(w); embedding lookups read `dense(w)`. A model file therefore computes what its weights'
types say, with no mode set from far away. Checkpoints keep their flat names: a QuantArray at
"layers/0/attn/q" is saved as "layers/0/attn/q/q8" and "layers/0/attn/q/scale".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jinfer.errors import ConfigError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantArray:
    """An int8 weight: q8 int8[shape], scale float[shape with reduced axes of size 1 or #groups].

    `scale` has q8's rank; an axis where scale is neither 1 nor q8's size is split into groups of
    equal length (see jinfer.quant). `dtype` (static) is the float dtype `dequantize` returns, set
    to the model's compute dtype when a forward is traced (None: float32).
    """

    q8: Any
    scale: Any
    dtype: Any = dataclasses.field(default=None, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q8.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """q8 * scale as a float array of q8's shape (in `dtype`, default self.dtype or float32)."""
        if dtype is None:  # (not `or`: a numpy dtype is falsy)
            dtype = jnp.float32 if self.dtype is None else self.dtype
        grouped, scale_shape = group_view(self.q8, self.q8.shape, self.scale.shape)
        values = grouped.astype(jnp.float32) * self.scale.reshape(scale_shape)
        return values.reshape(self.q8.shape).astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OutMajor:
    """A weight held [kept..., contracted] (its canonical layout transposed, contracted axes merged).

    `w` is a float array or a QuantArray in that layout. Read only by `layers.linear` (and the
    attention output projection), which contract it in place.
    """

    w: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Widened:
    """A narrower-float weight held in the compute dtype: `w` holds values exactly representable in
    `inputs` (e.g. bfloat16 weights as float32), and a product first rounds its input to `inputs`.

    Each product then equals, up to the order of the sums, the mixed product of the narrow weight
    (`layers.mixed`: input cast to bfloat16, accumulated in float32), on XLA:CPU paths that have no
    fast narrow kernel (output-major weights on a CPU without bfloat16 matrix instructions,
    `jinfer.loading.widen_narrow_weights`)."""

    w: Any
    inputs: Any = dataclasses.field(default=None, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def dtype(self) -> Any:
        return self.w.dtype


Weight = jax.Array | QuantArray | OutMajor | Widened


def is_weight(x: Any) -> bool:
    """True for the typed weights, which tree walks over params treat as one leaf."""
    return isinstance(x, (QuantArray, OutMajor, Widened))


def round_input(x: jax.Array, w: Any) -> jax.Array:
    """x as a product with w sees it: rounded to `w.inputs` for a Widened weight, else as it is."""
    if isinstance(w, OutMajor):
        w = w.w
    if isinstance(w, Widened) and w.inputs is not None:
        return x.astype(w.inputs).astype(x.dtype)
    return x


def dense(w: jax.Array | QuantArray | Widened) -> jax.Array:
    """The weight's values as a float array in its own layout (a QuantArray dequantized)."""
    if isinstance(w, QuantArray):
        return w.dequantize()
    if isinstance(w, Widened):
        return w.w
    if isinstance(w, OutMajor):
        raise ConfigError(
            "an OutMajor weight is read only by layers.linear; this layer needs a canonical weight "
            "(an array or a QuantArray)"
        )
    return w


def astype(w: Weight, dtype: Any) -> Weight:
    """The weight read as `dtype`: a float array cast, a QuantArray dequantized to `dtype`."""
    if isinstance(w, OutMajor):
        return OutMajor(astype(w.w, dtype))
    if isinstance(w, Widened):
        return dataclasses.replace(w, w=w.w.astype(dtype))
    if isinstance(w, QuantArray):
        return dataclasses.replace(w, dtype=jnp.dtype(dtype))
    return w.astype(dtype)


def with_compute_dtype(params: Any, dtype: Any) -> Any:
    """`params` with every QuantArray set to dequantize to `dtype` (done when a forward is traced)."""
    dtype = jnp.dtype(dtype)

    def bind(x):
        return dataclasses.replace(x, dtype=dtype) if isinstance(x, QuantArray) else x

    return jax.tree.map(bind, params, is_leaf=lambda x: isinstance(x, QuantArray))


def dequantize_tree(params: Any, dtype: Any) -> Any:
    """Every QuantArray of `params` as a plain `dtype` array (for models that read raw arrays)."""
    return jax.tree.map(
        lambda x: x.dequantize(dtype) if isinstance(x, QuantArray) else x,
        params,
        is_leaf=lambda x: isinstance(x, QuantArray),
    )


def group_view(x: Any, shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
    """x [shape] viewed as [.., groups, group_size, ..] along the grouped axis (if any), and the
    scale shape that broadcasts against that view."""
    for i, (d, g) in enumerate(zip(shape, scale_shape, strict=True)):
        if g not in (1, d):
            view = x.reshape(*shape[:i], g, d // g, *shape[i + 1 :])
            return view, (*scale_shape[:i], g, 1, *scale_shape[i + 1 :])
    return x, tuple(scale_shape)


def _register_export_serialization() -> None:
    # Programs whose arguments hold these types go through jax.export in the traced-program cache
    # (jinfer.compile.lower); QuantArray's static `dtype` travels as its name.
    from jax import export

    export.register_pytree_node_serialization(
        QuantArray,
        serialized_name="jinfer.models.weights.QuantArray",
        serialize_auxdata=lambda aux: b"" if aux[0] is None else jnp.dtype(aux[0]).name.encode(),
        deserialize_auxdata=lambda data: (jnp.dtype(bytes(data).decode()) if data else None,),
    )
    export.register_pytree_node_serialization(
        Widened,
        serialized_name="jinfer.models.weights.Widened",
        serialize_auxdata=lambda aux: b"" if aux[0] is None else jnp.dtype(aux[0]).name.encode(),
        deserialize_auxdata=lambda data: (jnp.dtype(bytes(data).decode()) if data else None,),
    )
    export.register_pytree_node_serialization(
        OutMajor,
        serialized_name="jinfer.models.weights.OutMajor",
        serialize_auxdata=lambda aux: b"",
        deserialize_auxdata=lambda data: (),
    )


_register_export_serialization()


def widen(params: Any, dtype: Any) -> Any:
    """`params` with every float weight narrower than `dtype` (rank >= 2, plain or inside an
    OutMajor) as a Widened weight in `dtype` whose products round their inputs to the weight's
    own dtype; arrays or ShapeDtypeStructs."""
    dtype = jnp.dtype(dtype)

    def wide(x):
        if isinstance(x, OutMajor):
            return OutMajor(wide(x.w))
        if isinstance(x, (QuantArray, Widened)) or x.ndim < 2 or not narrower_float(x.dtype, dtype):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return Widened(jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding), jnp.dtype(x.dtype))
        return Widened(x.astype(dtype), jnp.dtype(x.dtype))

    return jax.tree.map(wide, params, is_leaf=is_weight)


def narrower_float(dtype: Any, than: Any) -> bool:
    """True when `dtype` is a float type with fewer bytes per element than `than`."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < jnp.dtype(than).itemsize
