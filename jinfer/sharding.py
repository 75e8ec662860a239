"""Device meshes and the logical-axis sharding rules table.

Model code names tensor dimensions with logical axes (`"batch"`, `"embed"`, `"heads"`, ...). One
frozen `ShardingRules` table maps each logical axis to a mesh axis (or to nothing: replicated).
Everything that places arrays on devices goes through `ShardingRules.sharding`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jinfer.errors import MeshError, ShardingError

LogicalAxes = tuple[str | None, ...]
log = logging.getLogger(__name__)

_MESH_ITEM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(-?\d+)\s*$")


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """Parses `"data=2,model=4"` into `{"data": 2, "model": 4}` (order kept)."""
    if isinstance(spec, Mapping):
        return {str(k): int(v) for k, v in spec.items()}
    axes: dict[str, int] = {}
    for item in spec.split(","):
        m = _MESH_ITEM.match(item)
        if m is None:
            raise MeshError(
                f"mesh spec {spec!r}: cannot parse {item!r}; expected comma-separated NAME=SIZE items "
                "such as 'data=2,model=4' (one size may be -1 for 'all remaining devices')"
            )
        name, size = m.group(1), int(m.group(2))
        if name in axes:
            raise MeshError(f"mesh spec {spec!r}: axis {name!r} appears twice")
        if size == 0 or size < -1:
            raise MeshError(f"mesh spec {spec!r}: axis {name!r} has size {size}; sizes are >= 1 or -1")
        axes[name] = size
    if len(axes) > 3:
        raise MeshError(f"mesh spec {spec!r} has {len(axes)} axes; jinfer supports at most 3")
    return axes


def make_mesh(spec: str | Mapping[str, int] = "data=-1", devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a device mesh from `"data=2,model=4"`; `-1` takes all remaining devices.

    Axes are `Auto` (not Explicit) so that jit propagates shardings of tensor-parallel matmuls.
    """
    axes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    unknown = [k for k, v in axes.items() if v == -1]
    if len(unknown) > 1:
        raise MeshError(f"mesh spec {spec!r}: only one axis may be -1, got {unknown}")
    known = math.prod(v for v in axes.values() if v != -1)
    if unknown:
        if n % known:
            raise MeshError(
                f"mesh spec {spec!r}: {n} devices are not divisible by the fixed axes' product {known}"
            )
        axes[unknown[0]] = n // known
    if math.prod(axes.values()) != n:
        raise MeshError(
            f"mesh spec {spec!r} needs {math.prod(axes.values())} devices but {n} are available "
            f"({jax.default_backend()}); make the sizes multiply to {n} or use -1 for one axis"
        )
    names = tuple(axes)
    shape = tuple(axes.values())
    try:
        device_grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:
        device_grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(device_grid, names, axis_types=(AxisType.Auto,) * len(names))


def resolve_mesh(
    mesh: Mesh | str | Mapping[str, int] | None, rules: ShardingRules | None = None
) -> Mesh | None:
    """The mesh jinfer runs on, from what a caller passed as `mesh=`.

    A spec string or mapping goes through `make_mesh`. A `Mesh` whose axes are not all `Auto`
    (`jax.make_mesh` makes `Explicit` axes since jax 0.7) is rebuilt on the same devices with
    `Auto` axes: jinfer places every array through its logical-axis rules and lets jit propagate
    shardings, which explicit-axis tracing refuses (it asks for `out_sharding=` on each gather).
    An axis of more than one device that no rule of `rules` (default: `ShardingRules()`) maps to
    logs a warning: the arrays are replicated along it, which is correct but buys nothing (it is
    often a misspelt name).
    """
    if mesh is None:
        return None
    if isinstance(mesh, (str, Mapping)):
        mesh = make_mesh(mesh)
    elif not isinstance(mesh, Mesh):
        raise MeshError(
            f"mesh is a {type(mesh).__name__}; expected a jax.sharding.Mesh, a spec such as "
            '"data=2,model=4" (jinfer.make_mesh), or None for one device'
        )
    elif any(t != AxisType.Auto for t in getattr(mesh, "axis_types", ())):
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    rules = rules or ShardingRules()
    mapped = {axis for logical, _ in rules.rules for axis in rules.mesh_axes(logical)}
    idle = [name for name, size in mesh.shape.items() if size > 1 and name not in mapped]
    if idle:
        log.warning(
            "mesh axes %s (of %s) are used by no sharding rule, so arrays are replicated along "
            "them; the rules map to %s",
            idle,
            dict(mesh.shape),
            sorted(mapped),
        )
    return mesh


def single_device_mesh() -> Mesh:
    """A 1x1 mesh on the default device, for unsharded runs."""
    return make_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])


MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", "data"),
    ("embed", None),
    ("mlp", "model"),
    ("expert", "expert"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("vocab", "model"),
    ("length", None),
    ("cache_length", None),
    ("cache_blocks", None),
    ("layers", None),
    ("classes", None),
    ("channels", None),
    ("height", None),
    ("width", None),
    ("features", None),
)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Maps logical axis names to mesh axes.

    `rules` is a tuple of `(logical_name, mesh_axes)` where mesh_axes is a mesh axis name, a tuple
    of names, or None (replicated). Logical names that are absent are replicated. A mesh axis that
    is missing from the mesh, or that does not divide the dimension, is dropped for that tensor, so
    one table serves every mesh (a 2-way kv_heads dimension on a 4-way model axis is replicated).
    """

    rules: tuple[tuple[str, MeshAxes], ...] = DEFAULT_RULES

    def __post_init__(self):
        names = [name for name, _ in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ShardingError(f"ShardingRules: logical axes {dupes} are listed more than once")

    def replace(self, **overrides: MeshAxes) -> ShardingRules:
        """Returns a copy with some logical axes remapped, e.g. `rules.replace(mlp=None)`.

        Every name must already be in the table (a misspelt one would otherwise be added as a new
        axis no tensor uses, and the axis meant would keep its old mapping): ShardingError naming
        it and the known axes. New logical axes are added with `extend`."""
        table = dict(self.rules)
        unknown = [name for name in overrides if name not in table]
        if unknown:
            raise ShardingError(
                f"ShardingRules.replace: unknown logical {'axes' if len(unknown) > 1 else 'axis'} "
                f"{_names_with_hint(unknown, table)}; known "
                f"logical axes: {', '.join(table)} (add a new one with rules.extend({unknown[0]}=...))"
            )
        table.update(overrides)
        return ShardingRules(tuple(table.items()))

    def extend(self, **new_axes: MeshAxes) -> ShardingRules:
        """Returns a copy with new logical axes added, e.g. `rules.extend(conv_out="model")`;
        ShardingError for a name already in the table (remap those with `replace`)."""
        table = dict(self.rules)
        present = [name for name in new_axes if name in table]
        if present:
            raise ShardingError(
                f"ShardingRules.extend: logical axes {present} are already in the table; remap them "
                f"with rules.replace({present[0]}=...)"
            )
        return ShardingRules((*self.rules, *new_axes.items()))

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        if logical is None:
            return ()
        target = dict(self.rules).get(logical)
        if target is None:
            return ()
        return (target,) if isinstance(target, str) else tuple(target)

    def spec(
        self,
        logical_axes: LogicalAxes,
        shape: Sequence[int] | None = None,
        mesh: Mesh | None = None,
        name: str = "tensor",
    ) -> PartitionSpec:
        """PartitionSpec for a tensor with these logical axes.

        Raises ShardingError when two logical axes of the tensor map to the same mesh axis.
        With `shape` and `mesh`, drops mesh axes absent from the mesh or not dividing the dim.
        """
        if shape is not None and len(shape) != len(logical_axes):
            raise ShardingError(
                f"{name}: logical axes {logical_axes} have {len(logical_axes)} names but the "
                f"tensor has shape {tuple(shape)}"
            )
        used: dict[str, str | None] = {}
        entries: list[MeshAxes] = []
        for i, logical in enumerate(logical_axes):
            kept: list[str] = []
            dim_left = None if shape is None else int(shape[i])
            for axis in self.mesh_axes(logical):
                if axis in used:
                    raise ShardingError(
                        f"{name}: logical axes {used[axis]!r} and {logical!r} both map to mesh axis "
                        f"{axis!r} (logical axes {logical_axes}); change the ShardingRules so each "
                        "mesh axis is used at most once per tensor"
                    )
                used[axis] = logical
                if mesh is not None:
                    if axis not in mesh.shape:
                        continue
                    size = mesh.shape[axis]
                    if dim_left is not None and dim_left % size:
                        continue
                    if dim_left is not None:
                        dim_left //= size
                kept.append(axis)
            entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
        return PartitionSpec(*entries)

    def sharding(
        self, mesh: Mesh, logical_axes: LogicalAxes, shape: Sequence[int] | None = None, name: str = "tensor"
    ) -> NamedSharding:
        """NamedSharding on `mesh` for a tensor with these logical axes (and shape)."""
        return NamedSharding(mesh, self.spec(logical_axes, shape, mesh, name))


def _names_with_hint(names: Sequence[str], known: Sequence[str]) -> str:
    """`'mpl' (did you mean 'mlp'?), 'x'`: each name, with the closest known one if any is close."""
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, list(known), n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(parts)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def path_str(path: Sequence[Any]) -> str:
    """Renders a jax key path as 'layers/0/attn/q/kernel'."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


PathRules = Sequence[tuple[str, LogicalAxes]]


def logical_axes_by_path(path: str, ndim: int, path_rules: PathRules | None) -> LogicalAxes:
    """Fallback for unannotated parameters: first regex in `path_rules` that matches the path.

    Unmatched parameters are replicated.
    """
    for pattern, axes in path_rules or ():
        if re.search(pattern, path) and len(axes) == ndim:
            return tuple(axes)
    return (None,) * ndim


def tree_logical_axes(tree: Any, path_rules: PathRules | None = None) -> Any:
    """Logical axes for every leaf of a param tree.

    Reads annotations that Flax put on the leaves (NNX `sharding_names` metadata, Linen
    `LogicallyPartitioned` boxes), falling back to `path_rules` (regex on 'a/b/c' paths).
    Returns a tree of tuples with the same structure as `unbox_tree(tree)`.
    """

    def axes_of(path, leaf):
        names = _annotated_names(leaf)
        shape = np.shape(_raw_value(leaf))
        if names is not None:
            return tuple(names)
        return logical_axes_by_path(path_str(path), len(shape), path_rules)

    return jax.tree_util.tree_map_with_path(axes_of, tree, is_leaf=_is_boxed)


def tree_shardings(
    tree: Any, mesh: Mesh, rules: ShardingRules | None = None, path_rules: PathRules | None = None
) -> Any:
    """NamedShardings for every leaf of a (possibly boxed) param tree."""
    rules = rules or ShardingRules()

    def sharding_of(path, leaf):
        names = _annotated_names(leaf)
        shape = np.shape(_raw_value(leaf))
        if names is None:
            names = logical_axes_by_path(path_str(path), len(shape), path_rules)
        return rules.sharding(mesh, tuple(names), shape, name=path_str(path))

    return jax.tree_util.tree_map_with_path(sharding_of, tree, is_leaf=_is_boxed)


def unbox_tree(tree: Any) -> Any:
    """Strips Flax annotation boxes (NNX Variables, Linen Partitioned) leaving raw arrays."""
    return jax.tree_util.tree_map(_raw_value, tree, is_leaf=_is_boxed)


def _is_boxed(x: Any) -> bool:
    try:
        from flax import nnx
        from flax.core import meta

        return isinstance(x, (nnx.Variable, meta.Partitioned))
    except ImportError:  # pragma: no cover
        return False


def _raw_value(x: Any) -> Any:
    from flax import nnx
    from flax.core import meta

    if isinstance(x, nnx.Variable):
        return x.get_value()
    if isinstance(x, meta.Partitioned):
        return x.value
    return x


def _annotated_names(x: Any) -> tuple[str | None, ...] | None:
    from flax import nnx
    from flax.core import meta

    if isinstance(x, nnx.Variable):
        meta_dict = x.get_metadata()
        for key in ("out_sharding", "sharding_names", "sharding"):
            names = meta_dict.get(key)
            if names:
                return tuple(names)
        return None
    if isinstance(x, meta.Partitioned):
        return tuple(x.names)
    return None
