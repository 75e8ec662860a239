"""One view of any Flax model (NNX or Linen): abstract params, logical axes, init and a pure apply.

Parameters are always a plain nested dict of arrays (NNX: `nnx.to_pure_dict(state)`; Linen: the
`params` collection), so checkpoints, sharding and jit treat both frameworks the same way. A leaf
may be a typed weight (`jinfer.models.weights`: `QuantArray` for int8, `OutMajor` for the
output-major runtime layout), a pytree of arrays that the model's layers dispatch on; `quantization`
and `transposed` below only say which types `abstract_params` (what is restored) holds.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jinfer import quant
from jinfer.errors import ConfigError
from jinfer.models import layers
from jinfer.models.registry import ModelSpec, get_spec
from jinfer.models.weights import dequantize_tree, with_compute_dtype
from jinfer.sharding import PathRules, ShardingRules, path_str, tree_logical_axes, unbox_tree


@dataclasses.dataclass(frozen=True)
class FlaxModel:
    """A registered model class plus its config, seen through one framework-neutral interface."""

    spec: ModelSpec
    config: Any
    quantization: str | None = None  # None or "int8" (weight-only, see jinfer.quant)
    # Weights kept output-major in memory (a runtime layout for CPU matrix-vector decode, see
    # jinfer.quant.transpose_params); checkpoints always hold the canonical layout.
    transposed: bool = False

    def __post_init__(self):
        if self.quantization is not None and self.quantization not in quant.METHODS:
            raise ConfigError(f"quantization={self.quantization!r} is not one of {quant.METHODS} or None")

    @classmethod
    def from_name(cls, name: str, config: Any, quantization: str | None = None) -> FlaxModel:
        return cls(get_spec(name), config, quantization)

    def quantized(self, method: str | None = "int8") -> FlaxModel:
        """The same model with weight-only quantized params (`init_params`/checkpoints change)."""
        return dataclasses.replace(self, quantization=method)

    def out_major(self, transposed: bool = True) -> FlaxModel:
        """The same model with its weights in the output-major runtime layout (or back)."""
        if transposed and not self.spec.typed_weights:
            raise ConfigError(
                f"model class {self.spec.name!r} reads plain arrays (its ModelSpec has no typed_weights), "
                "so it cannot hold output-major weights; use layout='canonical'"
            )
        return dataclasses.replace(self, transposed=transposed)

    def canonical(self) -> FlaxModel:
        """The model as its checkpoints store it (canonical layout)."""
        return self.out_major(False)

    # -- structure -------------------------------------------------------------------------
    def _nnx_abstract(self) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
        """(graphdef, RNG streams' state, every other variable): the latter is what checkpoints
        hold; the streams (an `nnx.Dropout(rngs=...)`) are never drawn from in evaluation mode."""
        return _abstract_module(self.spec, self.config)

    def _linen_abstract(self) -> Any:
        return _abstract_module(self.spec, self.config)

    def _boxed_abstract(self) -> Any:
        if self.spec.framework == "nnx":
            return self._nnx_abstract()[2]
        return self._linen_abstract()

    def float_abstract_params(self) -> Any:
        """Abstract params of the unquantized model (nested dict of ShapeDtypeStruct)."""
        boxed = self._boxed_abstract()
        raw = unbox_tree(boxed)
        if self.spec.framework == "nnx":
            raw = nnx.to_pure_dict(raw)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), raw)

    def float_logical_axes(self) -> Any:
        boxed = self._boxed_abstract()
        axes = tree_logical_axes(boxed, self.path_rules)
        if self.spec.framework == "nnx":
            axes = nnx.to_pure_dict(axes)
        return axes

    def abstract_params(self) -> Any:
        """Nested dict of ShapeDtypeStruct, the structure every checkpoint of this model has."""
        abstract = self.float_abstract_params()
        if self.quantization:
            abstract = quant.quantize_abstract(abstract, self.float_logical_axes())
        if self.transposed:
            abstract = quant.transpose_abstract(abstract, self.float_logical_axes())
        return abstract

    def logical_axes(self) -> Any:
        """Nested dict (same structure as abstract_params) of logical-axis tuples."""
        float_axes = self.float_logical_axes()
        axes = quant.quantize_logical_axes(float_axes) if self.quantization else float_axes
        return quant.transpose_logical_axes(axes, float_axes) if self.transposed else axes

    def weight_matrices(self) -> Any:
        """Nested dict (same structure as abstract_params) of bools: True for the weight matrices
        (embeddings, projections: what `quant.reduced_axes` selects from the logical axes), False
        for norms, biases (also rank-2 ones such as [heads, head_dim]) and int8 scales."""
        treedef = jax.tree.structure(self.abstract_params())
        axes = treedef.flatten_up_to(self.logical_axes())
        return treedef.unflatten([quant.reduced_axes(tuple(a)) is not None for a in axes])

    @property
    def path_rules(self) -> PathRules:
        return self.spec.path_rules

    def shardings(self, mesh: Mesh, rules: ShardingRules | None = None) -> Any:
        """NamedShardings (same structure as abstract_params) on `mesh`."""
        rules = rules or ShardingRules()
        axes = self.logical_axes()
        abstract = self.abstract_params()
        leaves, treedef = jax.tree.flatten(abstract)
        axes_leaves = treedef.flatten_up_to(axes)
        paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
        return treedef.unflatten(
            [
                rules.sharding(mesh, tuple(a), x.shape, name=n)
                for x, a, n in zip(leaves, axes_leaves, paths, strict=True)
            ]
        )

    def without_rng_state(self, params: Any) -> Any:
        """`params` without an NNX module's RNG-stream state (the keys and counts of a
        `Dropout(rngs=...)`, found in `nnx.to_pure_dict(nnx.state(module))`): never drawn from in
        evaluation mode, not part of a checkpoint."""
        if self.spec.framework != "nnx" or not isinstance(params, dict):
            return params
        rng = nnx.to_pure_dict(self._nnx_abstract()[1])
        rng_paths = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(rng)[0]}
        return _without_paths(params, rng_paths) if rng_paths else params

    def checked_params(self, params: Any, where: str = "Engine") -> Any:
        """`params` with the structure of `abstract_params()`, RNG-stream state left out
        (`without_rng_state`); any other missing or extra entry is a ConfigError naming the paths."""
        if not isinstance(params, dict):
            return params  # a State or other pytree: device_put reports a structure mismatch
        params = self.without_rng_state(params)
        want = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(self.abstract_params())[0]}
        got = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
        if want != got:
            missing, extra = sorted(want - got), sorted(got - want)
            raise ConfigError(
                f"{where}: the parameters do not match {self.spec.name}'s structure: "
                f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}; for an NNX module pass "
                "nnx.to_pure_dict(nnx.state(module)) (BatchNorm statistics included), for Linen "
                "variables['params'] (FlaxModel.init_params gives the expected structure)"
            )
        return params

    # -- values ----------------------------------------------------------------------------
    def init_params(self, seed: int = 0, dtype: Any = None) -> Any:
        """Random parameters (nested dict of arrays) — for tests and examples."""
        if self.spec.framework == "nnx":
            with nnx.use_eager_sharding(False):
                module = self.spec.module_cls(self.config, rngs=nnx.Rngs(seed))
            # Every variable the checkpoint structure has (BatchNorm statistics too), not only Params.
            params = nnx.to_pure_dict(nnx.state(module, nnx.Not(nnx.RngState)))
        else:
            module = self.spec.module_cls(self.config)
            params = unbox_tree(module.init(jax.random.key(seed), *self.spec.example_inputs(self.config)))
            params = params["params"]
        if dtype is not None:
            params = cast_floating(params, dtype)
        if self.quantization:
            params = quant.quantize_params(params, self.float_logical_axes())
        if self.transposed:
            params = quant.transpose_params(params, self.float_logical_axes())
        return params

    def apply_fn(self, method: str | None = None) -> Callable[..., Any]:
        """Pure `fn(params, *inputs) -> outputs` calling the module (or `module.method`).

        Typed weights reach the module as they are (its layers dispatch on them), with each
        QuantArray set to dequantize to the compute dtype; a module without `typed_weights` gets
        int8 weights dequantized to plain arrays.
        """
        pin_weights = self.quantization is not None and self.transposed
        typed = self.spec.typed_weights

        def prepare(params, args):
            # Output-major int8 is dequantized inside each matrix-vector loop; the barrier makes
            # that depend on this call's inputs, otherwise XLA hoists the dequantization out of
            # the decode loop and every step reads float32 weights again. (Batched canonical
            # int8 keeps the hoisting: once per decode call beats once per step there.)
            if pin_weights and args:
                params, first = jax.lax.optimization_barrier((params, args[0]))
                args = (first, *args[1:])
            if self.quantization is not None:
                dtype = quant.compute_dtype(params)
                params = with_compute_dtype(params, dtype) if typed else dequantize_tree(params, dtype)
            return params, args

        if self.spec.framework == "nnx":
            graphdef, rng_abstract, _ = self._nnx_abstract()

            def nnx_apply(params, *args, **kwargs):
                params, args = prepare(params, args)
                # nnx.merge at the jit boundary: the module is rebuilt from pure arrays each trace.
                module = nnx.merge(graphdef, _placeholder_rngs(rng_abstract), params)
                module.eval()  # inference behaviour (BatchNorm's running stats, no Dropout) on this copy
                fn = module if method is None else getattr(module, method)
                return fn(*args, **kwargs)

            return nnx_apply

        module = self.spec.module_cls(self.config)

        def linen_apply(params, *args, **kwargs):
            params, args = prepare(params, args)
            return module.apply({"params": params}, *args, method=method, **kwargs)

        return linen_apply

    def param_count(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_params()))


@functools.lru_cache(maxsize=32)
def _abstract_module(spec: ModelSpec, config: Any) -> Any:
    """Traces a model's construction once per (class, config): NNX (graphdef, state) or Linen params.

    Tracing builds every parameter abstractly (seconds for a 30-layer model), and structure,
    logical axes and shardings all derive from it, so it is cached.
    """
    if spec.framework == "nnx":
        # Eager sharding is off: logical names are not mesh axes; jinfer maps them itself.
        with nnx.use_eager_sharding(False):
            module = nnx.eval_shape(lambda: spec.module_cls(config, rngs=layers.StructureRngs(0)))
        return nnx.split(module, nnx.RngState, ...)
    module = spec.module_cls(config)
    return jax.eval_shape(module.init, jax.random.key(0), *spec.example_inputs(config))["params"]


def _without_paths(tree: Any, drop: set[str], prefix: str = "") -> Any:
    """Nested dict `tree` without the leaves at `drop` ("a/0/b" paths), and without the dicts
    that leaves empty; key types (ints of list indices) are kept."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if name in drop:
            continue
        v = _without_paths(v, drop, name + "/")
        if not (isinstance(v, dict) and not v and isinstance(tree[k], dict) and tree[k]):
            out[k] = v
    return out


def placeholder_rng_leaf(x: Any) -> Any:
    """A concrete value for one abstract leaf of an RNG stream (a key, or its count): evaluation
    mode never draws from it, but it is part of an NNX module's state."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key(0)
    return jnp.zeros(x.shape, x.dtype)


def _placeholder_rngs(abstract: nnx.State) -> nnx.State:
    """Concrete values for an abstract RNG-streams state (keys and counts)."""
    return jax.tree.map(placeholder_rng_leaf, abstract)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Casts floating leaves of a tree to `dtype`, leaving integer leaves (e.g. int8) alone."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)
