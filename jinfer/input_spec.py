"""What one example looks like, given by an example: pytree structure, shapes, dtypes, variable axes.

Host-only (numpy): validation, bucketing of variable sizes, padding into a device batch and removing
the padding from outputs. Used by `jinfer.flax_engine.FlaxEngine` (`Engine.from_flax`).

Letters: `b` batch, and one named *dim* per variable axis ("length" for token sequences, "height"
and "width" for images). A leaf `[h, w, c]` with variable axes {0: "height", 1: "width"} is padded
to `[b, H, W, c]` (H, W the smallest height/width buckets that fit) and the batch gets
`mask[b, H, W]`, True on real pixels. Several leaves may share a dim (all padded to one bucket).
Examples with no variable axis are stacked to `[b, *shape]` with `mask[b]` (True on real rows).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jinfer.buckets import Buckets
from jinfer.errors import ConfigError, EmptyInputError, InputError, SequenceTooLongError
from jinfer.sharding import path_str

VariableAxes = Mapping[int, str] | Mapping[str, Mapping[int, str]]
DimSizes = int | tuple[int, ...] | None  # one example's (or one bucket's) sizes of the variable dims


@dataclasses.dataclass(frozen=True)
class ShapeBuckets(Buckets):
    """Buckets over named variable dims: every (batch, one size per dim) combination is compiled.

    Attributes:
      dims: `((name, sizes), ...)`, e.g. `(("height", (32, 64)), ("width", (32, 64)))`; empty for
        fixed-shape inputs. A bucket key is `(batch, sizes)` with `sizes` an int for one dim, a
        tuple for several, None for none (so one "length" dim gives the usual `(batch, seq_len)`).
    """

    seq_lens: tuple[int, ...] | None = ()
    dims: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __post_init__(self):
        super().__post_init__()
        for name, sizes in self.dims:
            if not sizes or any(s <= 0 for s in sizes) or list(sizes) != sorted(set(sizes)):
                raise ConfigError(f"ShapeBuckets: {name} sizes {sizes} must be positive, ascending, unique")

    @property
    def has_seq(self) -> bool:
        return bool(self.dims)

    @property
    def max_seq_len(self) -> int | None:
        return self.dims[0][1][-1] if self.dims else None

    def keys(self) -> list[tuple[int, DimSizes]]:
        combos = [_pack(c) for c in itertools.product(*(sizes for _, sizes in self.dims))]
        return [(b, c) for c in combos for b in self.batch_sizes]

    def seq_bucket(self, length: DimSizes, index: int | str = "?") -> DimSizes:
        """Smallest bucket >= each dim's size; SequenceTooLongError naming the dim when none fits."""
        if not self.dims:
            return None
        chosen = []
        for (name, sizes), size in zip(self.dims, _unpack(length), strict=True):
            i = bisect.bisect_left(sizes, size)
            if i == len(sizes):
                raise SequenceTooLongError(
                    f"example {index} has {name} {size:,}; the largest {name} bucket is {sizes[-1]:,} "
                    "(pass truncate=True to crop, or add a larger bucket)"
                )
            chosen.append(sizes[i])
        return _pack(chosen)


def _pack(sizes: Sequence[int]) -> DimSizes:
    return None if not sizes else int(sizes[0]) if len(sizes) == 1 else tuple(int(s) for s in sizes)


def _unpack(sizes: DimSizes) -> tuple[int, ...]:
    return () if sizes is None else (sizes,) if isinstance(sizes, int) else tuple(sizes)


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One input array: its path in the example tree, shape, dtype and `(axis, dim name)` pairs."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    dims: tuple[tuple[int, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The input of a model, from one example (array or pytree) and its declared variable axes."""

    treedef: Any
    leaves: tuple[LeafSpec, ...]

    @classmethod
    def from_example(cls, example: Any, variable_axes: VariableAxes | None = None) -> InputSpec:
        """Spec of `example`; `variable_axes` is `{axis: dim}` for an array example, or
        `{leaf path: {axis: dim}}` for a pytree ("tokens", "inputs/ids"; paths as `a/b/0`)."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(example)
        if not flat:
            raise ConfigError("example= has no arrays; pass one example (an array or a pytree of arrays)")
        paths = [path_str(p) for p, _ in flat]
        per_leaf = _axes_per_leaf(paths, variable_axes)
        leaves = []
        for path, (_, x) in zip(paths, flat, strict=True):
            arr = np.asarray(x)
            dims = tuple(
                sorted((int(a) % max(arr.ndim, 1), str(d)) for a, d in per_leaf.get(path, {}).items())
            )
            if any(a >= arr.ndim for a, _ in dims) or (dims and arr.ndim == 0):
                raise ConfigError(
                    f"variable_axes for {path or 'the example'}: axis out of range for {arr.shape}"
                )
            leaves.append(LeafSpec(path, tuple(arr.shape), _input_dtype(arr.dtype), dims))
        return cls(treedef, tuple(leaves))

    @property
    def dim_names(self) -> tuple[str, ...]:
        """Variable dims in order of first appearance (the mask's axes after batch)."""
        names: list[str] = []
        for leaf in self.leaves:
            names += [d for _, d in leaf.dims if d not in names]
        return tuple(names)

    def describe(self) -> str:
        parts = []
        for leaf in self.leaves:
            shape = list(leaf.shape)
            for a, d in leaf.dims:
                shape[a] = d
            parts.append(f"{leaf.path or 'example'}: [{', '.join(map(str, shape))}] {leaf.dtype.name}")
        return "; ".join(parts)

    # -- one example ------------------------------------------------------------------------
    def prepare(self, example: Any, index: int | str, buckets: ShapeBuckets, truncate: bool) -> tuple:
        """Validates one example; returns its leaves (numpy, input dtypes), cropped when truncating."""
        try:
            flat = self.treedef.flatten_up_to(example)
        except (ValueError, TypeError) as e:
            raise InputError(
                f"example {index} does not have the structure of the engine's example "
                f"({self.describe()}): {e}"
            ) from e
        arrays = [self._check_leaf(leaf, x, index) for leaf, x in zip(self.leaves, flat, strict=True)]
        sizes = self._sizes_of(arrays, index)
        if truncate and sizes:
            limits = dict(zip(self.dim_names, _unpack(buckets.keys()[-1][1]), strict=True))
            arrays = [self._crop(leaf, x, limits) for leaf, x in zip(self.leaves, arrays, strict=True)]
            sizes = self._sizes_of(arrays, index)
        buckets.seq_bucket(_pack(sizes), index)
        return tuple(arrays)

    def _check_leaf(self, leaf: LeafSpec, x: Any, index: int | str) -> np.ndarray:
        arr = np.asarray(x)
        where = f"example {index}" + (f" input {leaf.path!r}" if leaf.path else "")
        names = dict(leaf.dims)
        variable = set(names)
        want = tuple(names.get(a, s) for a, s in enumerate(leaf.shape))
        if arr.ndim != len(leaf.shape) or any(
            a not in variable and arr.shape[a] != s for a, s in enumerate(leaf.shape)
        ):
            raise InputError(f"{where} has shape {arr.shape}; expected {want}")
        if any(arr.shape[a] == 0 for a in variable):
            raise EmptyInputError(f"{where} is empty (shape {arr.shape}); variable sizes must be >= 1")
        if np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(leaf.dtype, np.floating):
            raise InputError(
                f"{where} has dtype {arr.dtype} but the model input is {leaf.dtype.name}; pass integers"
            )
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise InputError(f"{where} has dtype {arr.dtype}; expected numbers ({leaf.dtype.name})")
        if np.issubdtype(arr.dtype, np.complexfloating) and not np.issubdtype(leaf.dtype, np.complexfloating):
            raise InputError(
                f"{where} has dtype {arr.dtype} but the model input is {leaf.dtype.name}; pass real numbers"
            )
        if np.issubdtype(arr.dtype, np.integer) and np.issubdtype(leaf.dtype, np.integer) and arr.size:
            lo, hi = np.iinfo(leaf.dtype).min, np.iinfo(leaf.dtype).max
            if arr.min() < lo or arr.max() > hi:  # astype would wrap around silently
                raise InputError(
                    f"{where} has values in [{arr.min()}, {arr.max()}], outside the model input's "
                    f"{leaf.dtype.name} range [{lo}, {hi}]"
                )
        return arr.astype(leaf.dtype, copy=False)

    def _sizes_of(self, arrays: Sequence[np.ndarray], index: int | str) -> tuple[int, ...]:
        found: dict[str, tuple[int, str]] = {}
        for leaf, arr in zip(self.leaves, arrays, strict=True):
            for a, d in leaf.dims:
                size = int(arr.shape[a])
                if d in found and found[d][0] != size:
                    raise InputError(
                        f"example {index}: {d} is {found[d][0]} in input {found[d][1]!r} but {size} in "
                        f"input {leaf.path!r}; inputs sharing a variable dim must agree"
                    )
                found[d] = (size, leaf.path)
        return tuple(found[d][0] for d in self.dim_names)

    def _crop(self, leaf: LeafSpec, arr: np.ndarray, limits: Mapping[str, int]) -> np.ndarray:
        index = [slice(None)] * arr.ndim
        for a, d in leaf.dims:
            index[a] = slice(0, limits[d])
        return arr[tuple(index)]

    def sizes(self, prepared: tuple) -> DimSizes:
        """The variable sizes of a prepared example (int for one dim, tuple, or None)."""
        return _pack(self._sizes_of(prepared, "?"))

    # -- a batch ----------------------------------------------------------------------------
    def abstract_shapes(self, batch: int, bucket: DimSizes) -> list[tuple[int, ...]]:
        """Per leaf, the padded batch shape `[b, ...]` of bucket `bucket`."""
        target = dict(zip(self.dim_names, _unpack(bucket), strict=True))
        shapes = []
        for leaf in self.leaves:
            shape = list(leaf.shape)
            for a, d in leaf.dims:
                shape[a] = target[d]
            shapes.append((batch, *shape))
        return shapes

    def mask_shape(self, batch: int, bucket: DimSizes) -> tuple[int, ...]:
        return (batch, *_unpack(bucket))

    def pad(
        self, examples: Sequence[tuple], batch: int, bucket: DimSizes
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Zero-pads prepared examples into per-leaf `[b, ...]` arrays and `mask[b, *dims]`."""
        shapes = self.abstract_shapes(batch, bucket)
        inputs = [np.zeros(s, leaf.dtype) for s, leaf in zip(shapes, self.leaves, strict=True)]
        mask = np.zeros(self.mask_shape(batch, bucket), bool)
        for r, example in enumerate(examples):
            for out, x in zip(inputs, example, strict=True):
                out[(r, *(slice(0, n) for n in x.shape))] = x
            mask[(r, *(slice(0, n) for n in self._sizes_of(example, r)))] = True
        return inputs, mask

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        return jax.tree_util.tree_unflatten(self.treedef, list(leaves))

    def real_elements(self, examples: Sequence[tuple]) -> int:
        return sum(math.prod(self._sizes_of(x, "?")) for x in examples)


def _input_dtype(dtype: Any) -> np.dtype:
    """The device dtype of an example leaf: 64-bit numbers become 32-bit (JAX's default)."""
    dtype = np.dtype(dtype)
    if dtype.itemsize > 4 and np.issubdtype(dtype, np.integer):
        return np.dtype(np.int32)
    if dtype == np.float64:
        return np.dtype(np.float32)
    return dtype


def _axes_per_leaf(paths: list[str], variable_axes: VariableAxes | None) -> dict[str, dict[int, str]]:
    if not variable_axes:
        return {}
    if paths == [""] and all(isinstance(k, int) for k in variable_axes):
        return {"": dict(variable_axes)}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in variable_axes if k not in paths)
    if unknown:
        raise ConfigError(
            f"variable_axes names {unknown}, which are not inputs of the example; inputs: {paths}"
        )
    return {str(k): dict(v) for k, v in variable_axes.items()}  # type: ignore[union-attr]


def output_dims(probes: Mapping[DimSizes, Any], dim_names: Sequence[str]) -> Any:
    """Per output leaf, `((axis, dim index), ...)`: axes whose size follows a variable dim.

    `probes` maps bucket sizes to output shape trees (jax.eval_shape at those buckets). An axis
    follows dim i when its size equals dim i's bucket size in every probe (axes >= 1 only); a dim
    may have several (a pairwise [b, T, T] output is cut on both).
    """
    keys = list(probes)
    trees = [probes[k] for k in keys]

    def follow(*shapes):
        claimed: list[tuple[int, int]] = []
        for axis in range(1, len(shapes[0].shape)):
            for i in range(len(dim_names)):
                if all(s.shape[axis] == _unpack(k)[i] for s, k in zip(shapes, keys, strict=True)):
                    claimed.append((axis, i))
                    break
        return tuple(claimed)

    return jax.tree.map(follow, *trees)


def unpad_row(out: Any, dims: Any, row: int, sizes: DimSizes) -> Any:
    """Row `row` of every output leaf, with the axes that follow a dim cut to the example's size."""
    real = _unpack(sizes)

    def take(x, leaf_dims):
        y = np.asarray(x[row])
        if leaf_dims:
            index = [slice(None)] * y.ndim
            for axis, i in leaf_dims:
                index[axis - 1] = slice(0, real[i])
            y = y[tuple(index)]
        return y

    return jax.tree.map(take, out, dims)
