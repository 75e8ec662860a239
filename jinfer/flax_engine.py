"""`Engine.from_flax`: serve any Linen or NNX module, its input spec taken from one example.

The module runs in inference mode only: Linen collections are never mutable (pass
`apply_kwargs={"train": False}` or whatever flag selects BatchNorm running averages and turns off
Dropout); NNX modules are switched to evaluation mode (`Module.eval()`) on a copy inside the
traced forward, so the caller's module is untouched.

Inputs: `example` is one example without the batch axis, an array or a pytree of arrays
(`{"image": ..., "tokens": ...}`); a tuple is passed as positional arguments, anything else as one
argument. `variable_axes` declares which axes vary between requests and the name of the dim they
belong to ("length" takes `buckets.seq_lens`; other dims, e.g. "height"/"width", take
`dim_buckets`); every other axis, and every dtype, is fixed by the example. With `mask_arg` the
module also receives `mask[b, *dims]` (True on real positions; `mask[b]` without variable dims).

Shardings of the variables: `param_rules` (`[(regex on "params/Dense_0/kernel", axes)]`) when
given; else the logical axes the module declares (`nn.with_logical_partitioning`,
`nnx.with_partitioning`) mapped by `rules`; else data-parallel: variables replicated and the batch
split over every mesh axis.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jinfer.buckets import Buckets
from jinfer.engine import Engine
from jinfer.errors import ConfigError
from jinfer.input_spec import InputSpec, ShapeBuckets, VariableAxes, output_dims, unpad_row
from jinfer.modeling import cast_floating, placeholder_rng_leaf
from jinfer.sharding import (
    PathRules,
    ShardingRules,
    logical_axes_by_path,
    path_str,
    single_device_mesh,
    tree_logical_axes,
    unbox_tree,
)

logger = logging.getLogger(__name__)


class FlaxEngine(Engine):
    """An Engine whose examples are pytrees with named variable dims (see `from_flax`)."""

    def __init__(
        self,
        forward: Callable[..., Any],
        variables: Any,
        spec: InputSpec,
        *,
        buckets: ShapeBuckets,
        unpad_outputs: bool = True,
        **engine_kwargs: Any,
    ):
        self.spec = spec
        self.unpad_outputs = unpad_outputs
        first = spec.leaves[0]
        super().__init__(
            forward, variables, buckets=buckets, input_dtype=first.dtype, example_shape=(), **engine_kwargs
        )
        self._output_dims = self._find_output_dims() if unpad_outputs and spec.dim_names else None

    # -- inputs ----------------------------------------------------------------------------
    def prepare_example(self, example: Any, index: int | str = "?", truncate: bool | None = None) -> tuple:
        """Validates one example against the spec (structure, shapes, dtypes, bucket sizes)."""
        return self.spec.prepare(
            example, index, self.buckets, self.truncate if truncate is None else truncate
        )

    def _length(self, x: tuple) -> Any:
        return self.spec.sizes(x)

    def _abstract_inputs(self, key):
        batch, bucket = key
        leaves = []
        for shape, leaf in zip(self.spec.abstract_shapes(batch, bucket), self.spec.leaves, strict=True):
            axes = ("batch",) + (None,) * (len(shape) - 1)
            sharding = self.rules.sharding(self.mesh, axes, shape, f"input {leaf.path}")
            leaves.append(jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding))
        mask_shape = self.spec.mask_shape(batch, bucket)
        mask_axes = ("batch",) + (None,) * (len(mask_shape) - 1)
        mask_sh = self.rules.sharding(self.mesh, mask_axes, mask_shape, "mask")
        return self.spec.unflatten(leaves), jax.ShapeDtypeStruct(mask_shape, np.dtype(bool), sharding=mask_sh)

    def abstract_outputs(self, key) -> Any:
        """Output shapes/dtypes of bucket `key` (traced, not compiled)."""
        inputs, mask = self._abstract_inputs(key)
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.params)
        return jax.eval_shape(self.forward, params, inputs, mask)

    def _find_output_dims(self) -> Any:
        # Probe the smallest bucket and, per dim, its largest size and one size that is no bucket
        # (half the smallest, else one past the largest; traced only, never compiled): output axes
        # whose size follows a dim's size in every probe are cut back to the example's size. The
        # extra size keeps an axis that merely equals a bucket size (a feature axis of 64 with one
        # 64-token bucket) from being taken for the dim.
        dims = self.buckets.dims
        smallest = [sizes[0] for _, sizes in dims]
        probes = {_key(smallest): self.abstract_outputs((1, _key(smallest)))}
        for i, (_, sizes) in enumerate(dims):
            for size in dict.fromkeys([sizes[-1], sizes[0] // 2 or sizes[-1] + 1]):
                if size == smallest[i]:
                    continue
                sizes_i = [*smallest[:i], size, *smallest[i + 1 :]]
                try:
                    probes[_key(sizes_i)] = self.abstract_outputs((1, _key(sizes_i)))
                except Exception:
                    if size in sizes:
                        raise
                    # a size the module cannot trace (e.g. not a multiple of its stride): skip it
        return output_dims(probes, self.spec.dim_names)

    # -- running ---------------------------------------------------------------------------
    def _dispatch(self, examples: Sequence[tuple], batch: int, bucket: Any):
        leaves, mask = self.spec.pad(examples, batch, bucket)
        padded = int(np.prod(self.spec.mask_shape(batch, bucket)))
        real = self.spec.real_elements(examples) if self.spec.dim_names else len(examples)
        return self._launch((batch, bucket), self.spec.unflatten(leaves), mask, real, padded)

    def _unpad(self, host: Any, examples: Sequence[tuple], bucket: Any) -> list[Any]:
        if self._output_dims is None:
            return [jax.tree.map(lambda x, r=r: np.asarray(x[r]), host) for r in range(len(examples))]
        return [unpad_row(host, self._output_dims, r, self.spec.sizes(x)) for r, x in enumerate(examples)]


def _key(sizes: Sequence[int]) -> Any:
    return int(sizes[0]) if len(sizes) == 1 else tuple(int(s) for s in sizes)


# -- building one ----------------------------------------------------------------------------
def from_flax(
    module: Any,
    variables: Any = None,
    *,
    example: Any,
    buckets: Buckets | None = None,
    variable_axes: VariableAxes | None = None,
    dim_buckets: Mapping[str, Sequence[int]] | None = None,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    param_rules: PathRules | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    mask_arg: str | None = None,
    method: str | None = None,
    dtype: Any = None,
    unpad_outputs: bool = True,
    truncate: bool = False,
    batcher_config: Any = None,
) -> FlaxEngine:
    """Engine over a Flax module; call it as `Engine.from_flax(...)`.

    Args:
      module: a Linen module (with `variables`) or an NNX module (its own state is used unless
        `variables` is given: a pure dict, an `nnx.State`, or a restored `nnx.state(model)` tree).
      variables: Linen: `{"params": ..., "batch_stats": ..., ...}` (e.g. from
        `jinfer.restore_checkpoint`); possibly boxed with logical partitioning.
      example: one example without the batch axis: array or pytree; fixes shapes and dtypes.
      buckets: batch sizes (and `seq_lens` for a "length" dim); default batch sizes (1, 2, 4, 8).
      variable_axes: `{axis: dim}` (array example) or `{input path: {axis: dim}}` (pytree).
      dim_buckets: `{dim: sizes}` for dims other than "length", e.g. {"height": (32, 64)}.
      mesh: devices (default: one). rules: logical-axis table (default ShardingRules()).
      param_rules: `[(regex, axes)]` on variable paths; axes are logical or mesh axis names.
      apply_kwargs: extra keyword arguments of every call, e.g. {"train": False}.
      mask_arg: keyword name under which the module receives the padding mask (default: none).
      method: call `module.<method>` instead of `__call__`.
      dtype: cast floating variables (e.g. "bfloat16").
      unpad_outputs: cut output axes that follow a variable dim back to each example's size.
      truncate: crop examples larger than the largest bucket instead of raising.
      batcher_config: `jinfer.batcher.BatcherConfig` for `submit()`.
    """
    apply_kwargs = dict(apply_kwargs or {})
    spec = InputSpec.from_example(example, variable_axes)
    shape_buckets = _shape_buckets(spec, buckets or Buckets(seq_lens=()), dim_buckets)
    mesh = single_device_mesh() if mesh is None else mesh
    user_rules, rules = rules is not None, rules or ShardingRules()
    if isinstance(module, nnx.Module):
        forward, values, boxed = _nnx_forward(module, variables, apply_kwargs, mask_arg, method)
    else:
        probe = _probe_inputs(spec, shape_buckets)
        forward, values, boxed = _linen_forward(module, variables, probe, apply_kwargs, mask_arg, method)
    if dtype is not None:
        values = cast_floating(values, dtype)
    shardings, rules = _variable_shardings(values, boxed, mesh, rules, param_rules, user_rules)
    with _training_mode_errors(apply_kwargs):  # the engine traces the module to find output axes
        engine = FlaxEngine(
            forward,
            values,
            spec,
            buckets=shape_buckets,
            unpad_outputs=unpad_outputs,
            mesh=mesh,
            rules=rules,
            param_shardings=shardings,
            truncate=truncate,
            batcher_config=batcher_config,
        )
        engine.abstract_outputs(engine.buckets.keys()[0])  # trace the smallest bucket now
    return engine


def _shape_buckets(
    spec: InputSpec, buckets: Buckets, dim_buckets: Mapping[str, Sequence[int]] | None
) -> ShapeBuckets:
    dim_buckets = dict(dim_buckets or {})
    dims = []
    for name in spec.dim_names:
        sizes = dim_buckets.pop(name, None)
        if sizes is None and name == "length":
            sizes = buckets.seq_lens
        if not sizes:
            raise ConfigError(
                f"variable dim {name!r} has no bucket sizes; pass dim_buckets={{{name!r}: (...)}}"
                + (" or Buckets(seq_lens=...)" if name == "length" else "")
            )
        dims.append((name, tuple(int(s) for s in sizes)))
    if dim_buckets:
        raise ConfigError(
            f"dim_buckets names {sorted(dim_buckets)}, which no input declares in variable_axes "
            f"(declared dims: {list(spec.dim_names)})"
        )
    return ShapeBuckets(batch_sizes=buckets.batch_sizes, dims=tuple(dims))


def _call_args(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, tuple) else (inputs,)


def _call_kwargs(apply_kwargs: Mapping[str, Any], mask_arg: str | None, mask: Any) -> dict[str, Any]:
    return {**apply_kwargs, **({mask_arg: mask} if mask_arg else {})}


def _probe_inputs(spec: InputSpec, buckets: ShapeBuckets) -> tuple[Any, Any]:
    """Abstract batch-1 inputs and mask of the smallest bucket (for tracing `init`)."""
    bucket = buckets.keys()[0][1]
    leaves = [
        jax.ShapeDtypeStruct(s, leaf.dtype)
        for s, leaf in zip(spec.abstract_shapes(1, bucket), spec.leaves, strict=True)
    ]
    return spec.unflatten(leaves), jax.ShapeDtypeStruct(spec.mask_shape(1, bucket), np.dtype(bool))


def _linen_forward(module, variables, probe, apply_kwargs, mask_arg, method):
    if variables is None:
        raise ConfigError("Engine.from_flax: a Linen module needs variables ({'params': ..., ...})")
    if not isinstance(variables, Mapping):
        raise ConfigError(
            f"Engine.from_flax: Linen variables must be a dict of collections, got {type(variables).__name__}"
        )
    boxed = variables
    if not _has_boxes(variables):
        boxed = _linen_boxed_abstract(module, variables, probe, apply_kwargs, mask_arg, method)
    values = unbox_tree(dict(variables))

    def forward(variables, inputs, mask):
        kwargs = _call_kwargs(apply_kwargs, mask_arg, mask)
        return module.apply(variables, *_call_args(inputs), method=method, **kwargs)

    return forward, values, boxed


def _linen_boxed_abstract(module, variables, probe, apply_kwargs, mask_arg, method):
    """The module's own abstract variables (with logical partitioning boxes, if it declares any)."""
    batch, mask = probe
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}

    def init(batch, mask):  # the probe's ShapeDtypeStructs enter as arguments (traced), not closed over
        return module.init(
            rngs, *_call_args(batch), method=method, **_call_kwargs(apply_kwargs, mask_arg, mask)
        )

    try:
        abstract = jax.eval_shape(init, batch, mask)
    except Exception as e:  # only used to find logical axes; the engine works without them
        logger.info("jinfer: no logical axes from %s.init (%s); using data-parallel shardings", module, e)
        return variables
    return abstract if _has_boxes(abstract) else variables


def _has_boxes(tree: Any) -> bool:
    from flax.core import meta

    return any(
        isinstance(x, meta.Partitioned)
        for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, meta.Partitioned))
    )


def _nnx_forward(module, variables, apply_kwargs, mask_arg, method):
    graphdef, state = nnx.split(module)
    own = nnx.to_pure_dict(state)
    rng_paths = set(_flat(nnx.to_pure_dict(nnx.state(module, nnx.RngState))))
    values = own if variables is None else _overlay_nnx(own, _pure(variables), rng_paths)
    values = _materialize_rng(values, rng_paths)

    def forward(values, inputs, mask):
        # nnx.merge at the jit boundary: the module is rebuilt from arrays on every trace, and
        # eval() switches that copy (not the caller's module) to inference behaviour.
        model = nnx.merge(graphdef, values)
        model.eval()
        fn = model if method is None else getattr(model, method)
        return fn(*_call_args(inputs), **_call_kwargs(apply_kwargs, mask_arg, mask))

    return forward, values, state


def _pure(variables: Any) -> Any:
    """A pure nested dict of arrays from an nnx.State, a pure dict, or a restored Orbax tree in
    which each NNX Variable was stored as {"value": array}."""
    if isinstance(variables, nnx.State):
        variables = nnx.to_pure_dict(variables)
    if isinstance(variables, Mapping):
        if set(variables) == {"value"} and not isinstance(variables["value"], Mapping):
            return variables["value"]
        return {k: _pure(v) for k, v in variables.items()}
    return variables


def _flat(tree: Any) -> dict[str, Any]:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _overlay_nnx(own: Any, given: Any, rng_paths: set[str]) -> Any:
    """The module's state with every leaf replaced by `given`'s (checked by path and shape)."""
    own_flat, given_flat = _flat(own), _flat(given)
    extra = sorted(set(given_flat) - set(own_flat))
    missing = sorted(set(own_flat) - set(given_flat) - rng_paths)
    if extra or missing:
        raise ConfigError(
            "Engine.from_flax: variables do not match the NNX module's state: "
            + (f"missing {missing[:10]}; " if missing else "")
            + (f"not in the module {extra[:10]}; " if extra else "")
            + f"the module's top-level keys are {sorted(own)} (pass the model's own subtree, e.g. "
            "restored['model'])"
        )
    bad = [p for p in given_flat if np.shape(given_flat[p]) != np.shape(own_flat[p])]
    if bad:
        raise ConfigError(
            "Engine.from_flax: shape mismatch for "
            + "; ".join(
                f"{p}: module {np.shape(own_flat[p])}, given {np.shape(given_flat[p])}" for p in bad[:10]
            )
        )
    paths, treedef = jax.tree_util.tree_flatten_with_path(own)
    return jax.tree_util.tree_unflatten(treedef, [given_flat.get(path_str(p), x) for p, x in paths])


def _materialize_rng(values: Any, rng_paths: set[str]) -> Any:
    """Abstract leaves (an `nnx.eval_shape` module) of RNG streams become concrete placeholders:
    evaluation mode never draws from them, but they are part of the module's state."""

    def concrete(path, x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if path_str(path) not in rng_paths:
            raise ConfigError(
                f"Engine.from_flax: the NNX module's {path_str(path)} is abstract and no variables were "
                "given for it; pass variables= (e.g. restored from a checkpoint)"
            )
        return placeholder_rng_leaf(x)

    return jax.tree_util.tree_map_with_path(concrete, values)


def _variable_shardings(values, boxed, mesh, rules, param_rules, user_rules):
    """(tree of NamedShardings for the variables, the rules for inputs/outputs)."""
    flat = _flat(values)
    if param_rules:
        table = rules.extend(**{a: a for a in mesh.axis_names if a not in dict(rules.rules)})
        axes = {p: logical_axes_by_path(p, np.ndim(x), param_rules) for p, x in flat.items()}
        return _shardings_from(values, axes, mesh, table), rules
    declared = _flat_axes(boxed)
    axes = {p: declared.get(p, (None,) * np.ndim(x)) for p, x in flat.items()}
    if user_rules or any(a is not None for t in axes.values() for a in t):
        return _shardings_from(values, axes, mesh, rules), rules
    # Data-parallel default: the batch axis over every mesh axis (dropped where it does not divide).
    return _shardings_from(values, axes, mesh, rules), rules.replace(batch=tuple(mesh.axis_names))


def _flat_axes(boxed: Any) -> dict[str, tuple]:
    axes = tree_logical_axes(boxed)
    if isinstance(axes, nnx.State):
        axes = nnx.to_pure_dict(axes)
    leaves = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    return {path_str(p): tuple(a) for p, a in leaves}


def _shardings_from(values, axes, mesh, table):
    def sharding(path, x):
        name = path_str(path)
        return table.sharding(mesh, axes[name], np.shape(x), name=name)

    return jax.tree_util.tree_map_with_path(sharding, values)


@contextlib.contextmanager
def _training_mode_errors(apply_kwargs: Mapping[str, Any]):
    """Turns Flax's training-mode errors (raised while tracing the module) into a clear one."""
    from flax import errors as flax_errors

    try:
        yield
    except (flax_errors.ModifyScopeVariableError, flax_errors.InvalidRngError) as e:
        raise ConfigError(
            f"Engine.from_flax: the module ran in training mode ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}); "
            f"inference never updates batch statistics or draws dropout randomness: pass the flag that "
            f"selects evaluation, e.g. apply_kwargs={{'train': False}} (now {dict(apply_kwargs)})"
        ) from e
