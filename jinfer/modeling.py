"""One view of any Flax model (NNX or Linen): abstract params, logical axes, init and a pure apply.

Parameters are always a plain nested dict of arrays (NNX: `nnx.to_pure_dict(state)`; Linen: the
`params` collection), so checkpoints, sharding and jit treat both frameworks the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jinfer.models.registry import ModelSpec, get_spec
from jinfer.sharding import PathRules, ShardingRules, tree_logical_axes, tree_shardings, unbox_tree


@dataclasses.dataclass(frozen=True)
class FlaxModel:
    """A registered model class plus its config, seen through one framework-neutral interface."""

    spec: ModelSpec
    config: Any

    @classmethod
    def from_name(cls, name: str, config: Any) -> FlaxModel:
        return cls(get_spec(name), config)

    # -- structure -------------------------------------------------------------------------
    def _nnx_abstract(self) -> tuple[nnx.GraphDef, nnx.State]:
        # Eager sharding is off: logical names are not mesh axes; jinfer maps them itself.
        with nnx.use_eager_sharding(False):
            module = nnx.eval_shape(lambda: self.spec.module_cls(self.config, rngs=nnx.Rngs(0)))
        return nnx.split(module)

    def _linen_abstract(self) -> Any:
        module = self.spec.module_cls(self.config)
        inputs = self.spec.example_inputs(self.config)
        return jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]

    def _boxed_abstract(self) -> Any:
        if self.spec.framework == "nnx":
            return self._nnx_abstract()[1]
        return self._linen_abstract()

    def abstract_params(self) -> Any:
        """Nested dict of ShapeDtypeStruct, the structure every checkpoint of this model has."""
        boxed = self._boxed_abstract()
        raw = unbox_tree(boxed)
        if self.spec.framework == "nnx":
            raw = nnx.to_pure_dict(raw)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), raw)

    def logical_axes(self) -> Any:
        """Nested dict (same structure as abstract_params) of logical-axis tuples."""
        boxed = self._boxed_abstract()
        axes = tree_logical_axes(boxed, self.path_rules)
        if self.spec.framework == "nnx":
            axes = nnx.to_pure_dict(axes)
        return axes

    @property
    def path_rules(self) -> PathRules:
        return self.spec.path_rules

    def shardings(self, mesh: Mesh, rules: ShardingRules | None = None) -> Any:
        """NamedShardings (same structure as abstract_params) on `mesh`."""
        boxed = self._boxed_abstract()
        shard = tree_shardings(boxed, mesh, rules, self.path_rules)
        if self.spec.framework == "nnx":
            shard = nnx.to_pure_dict(shard)
        return shard

    # -- values ----------------------------------------------------------------------------
    def init_params(self, seed: int = 0, dtype: Any = None) -> Any:
        """Random parameters (nested dict of arrays) — for tests and examples."""
        if self.spec.framework == "nnx":
            with nnx.use_eager_sharding(False):
                module = self.spec.module_cls(self.config, rngs=nnx.Rngs(seed))
            params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
        else:
            module = self.spec.module_cls(self.config)
            params = unbox_tree(module.init(jax.random.key(seed), *self.spec.example_inputs(self.config)))
            params = params["params"]
        if dtype is not None:
            params = cast_floating(params, dtype)
        return params

    def apply_fn(self, method: str | None = None) -> Callable[..., Any]:
        """Pure `fn(params, *inputs) -> outputs` calling the module (or `module.method`)."""
        if self.spec.framework == "nnx":
            graphdef, _ = self._nnx_abstract()

            def nnx_apply(params, *args, **kwargs):
                # nnx.merge at the jit boundary: the module is rebuilt from pure arrays each trace.
                module = nnx.merge(graphdef, params)
                fn = module if method is None else getattr(module, method)
                return fn(*args, **kwargs)

            return nnx_apply

        module = self.spec.module_cls(self.config)

        def linen_apply(params, *args, **kwargs):
            return module.apply({"params": params}, *args, method=method, **kwargs)

        return linen_apply

    def param_count(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_params()))


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
