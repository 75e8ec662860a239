"""Loading a model: one path, in this order, owned by this module.

1. resolve: a model directory as is, a known name (or None) through `jinfer.hub`;
2. read config: `checkpoint.load_config` -> the `FlaxModel` (class, config, stored quantization);
3. restore into shards: `checkpoint.restore_params`, each device reading only its own slice;
4. quantize: `quantize=` turns a float checkpoint's weights into `QuantArray`s on device, straight
   into the quantized shardings (a checkpoint saved quantized is used as is);
5. runtime layout: `runtime_layout` places params given in hand on the mesh and, where it pays
   (one decode slot on XLA:CPU, or when asked), turns weights into `OutMajor` ones, on the host,
   one weight at a time. A many-slot CPU engine keeps the canonical weights and, when a second
   copy is small next to the host's memory, adds an `OutMajor` copy for its one-row decode
   (`one_row_copy_size`, `one_row_copy`).

`load` runs steps 1-4 (`LLM`, `Embedder` and `Engine.from_model_dir` call it); `LLM` runs step 5 on
what it is given, whether loaded here or passed to `LLM.from_params`. The weight types themselves
are described in `jinfer.models.weights`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from jinfer import checkpoint, precision, quant
from jinfer.errors import ConfigError
from jinfer.modeling import FlaxModel
from jinfer.models import weights
from jinfer.sharding import ShardingRules, single_device_mesh

LAYOUTS = ("auto", "canonical", "out_major")
# A one-row decode copy of the weights is made only while it takes at most this share of the
# host's physical memory (SmolLM2-135M f32: 0.54 GB, about 2 % of a 24 GB host). Physical, not
# available, memory: the same machine always builds the same engine (the same bits).
ONE_ROW_COPY_MAX_FRACTION = 0.125
_TASK_NOUNS = {"causal_lm": "a causal language model", "encoder": "an encoder", "classifier": "a classifier"}
_EXIT_ON_INTERRUPT: list[int] = []  # the command line's exit status for Ctrl-C during `load`


def exit_on_interrupt(code: int) -> None:
    """For the command line only: Ctrl-C while `load` runs (on the main thread) ends the process
    at once with exit status `code`. Nothing is written by then, and an interrupt arriving while
    Orbax's threads restore the arrays would otherwise surface as a damaged-checkpoint error, or
    abort the interpreter at exit. A library caller (a notebook) keeps KeyboardInterrupt."""
    _EXIT_ON_INTERRUPT[:] = [code]


@contextlib.contextmanager
def interrupt_exits():
    """Within: Ctrl-C exits at once, once `exit_on_interrupt` was called (main thread only)."""
    if not _EXIT_ON_INTERRUPT or threading.current_thread() is not threading.main_thread():
        yield
        return
    code = _EXIT_ON_INTERRUPT[0]
    previous = signal.signal(signal.SIGINT, lambda *_: os._exit(code))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclasses.dataclass
class LoadedModel:
    """A restored model: its directory, the FlaxModel, its params (nested dict, sharded on the
    mesh) and the directory's config.json."""

    path: Path
    model: FlaxModel
    params: Any
    meta: dict[str, Any]


def resolve(model: str | Path | None, dtype: str | None = None) -> Path:
    """A jinfer model directory as is; anything else (a known name, a Hugging Face id "org/name",
    None) through jinfer.hub (a hub id is converted once, in `dtype`)."""
    if model is not None and (Path(model) / "config.json").is_file():
        return Path(model)
    from jinfer import hub

    return hub.resolve_model(model, dtype=dtype)


def load(
    model: str | Path | None,
    *,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    dtype: Any = None,
    quantize: str | None = None,
    task: str | None = None,
    user: str = "this",
    verify: bool = True,
    plan: Callable[[FlaxModel], Any] | None = None,
) -> LoadedModel:
    """Resolves, reads the config, restores into the shards of `mesh` (None: one device) and
    quantizes (`quantize="int8"` on a float checkpoint).

    `task`, when given, is checked before any array is read: a model of another task raises
    ConfigError naming `user` (e.g. "Embedder"). `plan(model)`, when given, runs after the config is
    read and before any array is restored (e.g. checking that the engine fits in memory); a dtype
    it returns replaces `dtype` for the restore (e.g. a backend's default, chosen only once the
    config is known to be sane).
    """
    with interrupt_exits():
        return _load(model, mesh, rules, dtype, quantize, task, user, verify, plan)


def _load(model, mesh, rules, dtype, quantize, task, user, verify, plan) -> LoadedModel:
    path = resolve(model, dtype)
    spec, config, meta = checkpoint.load_config(path)
    if task is not None and spec.task != task:
        raise ConfigError(
            f"{path}: model class {spec.name!r} is a {spec.task!r} model; {user} needs "
            f"{_TASK_NOUNS.get(task, repr(task))}"
        )
    flax_model = FlaxModel(spec, config, meta.get("quantization"))
    if plan is not None:
        dtype = plan(flax_model) or dtype
    params = checkpoint.restore_params(path, flax_model, mesh=mesh, rules=rules, dtype=dtype, verify=verify)
    if quantize and flax_model.quantization is None:
        flax_model, params = quantize_on_device(flax_model, params, quantize, mesh, rules)
    return LoadedModel(path, flax_model, params, meta)


def quantize_on_device(model: FlaxModel, params: Any, method: str, mesh: Mesh | None, rules):
    """Quantizes restored float params on device, straight into the quantized shardings."""
    qmodel = model.quantized(method)
    axes = model.float_logical_axes()
    shardings = qmodel.shardings(mesh or single_device_mesh(), rules)
    qparams = jax.jit(lambda p: quant.quantize_params(p, axes), out_shardings=shardings)(params)
    return qmodel, qparams


def runtime_layout(
    model: FlaxModel,
    params: Any,
    layout: str,
    max_batch: int,
    mesh: Mesh | None,
    rules: ShardingRules | None,
    owned: bool = False,
) -> tuple[FlaxModel, Any]:
    """(model, params) as a generation engine of `max_batch` slots runs them.

    Params not yet on devices (or a `mesh` given) are placed with the model's shardings; then, if
    `layout` asks for it (see `wants_out_major`), the weights become `OutMajor`. `owned`: the
    caller hands `params` over, so each original weight is released once its copy exists.
    """
    if mesh is not None or not all(hasattr(x, "sharding") for x in jax.tree.leaves(params)):
        params = jax.device_put(params, model.shardings(mesh or single_device_mesh(), rules))
    if wants_out_major(layout, model, max_batch, quant.has_narrow_weights(params)) and not model.transposed:
        model, params = to_out_major(model, params, mesh or single_device_mesh(), rules, owned)
    return model, params


def wants_out_major(layout: str, model: FlaxModel, max_batch: int, narrow: bool = False) -> bool:
    """layout "out_major", or "auto" on CPU in a single process (the host-side transpose needs
    every shard addressable) for a model with typed weights whose engine has one slot, or whose
    weight matrices are `narrow` (bfloat16 under float32 compute) on a CPU that keeps them narrow
    (`keeps_narrow_weights`): XLA:CPU's bfloat16 products run faster on [out, in] weights at every
    row count measured (1-512 rows), so such an engine needs no second layout for one row."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} is not one of {LAYOUTS}")
    if layout == "auto":
        cpu = jax.default_backend() == "cpu" and jax.process_count() == 1
        return cpu and model.spec.typed_weights and (max_batch == 1 or (narrow and keeps_narrow_weights()))
    return layout == "out_major"


def keeps_narrow_weights() -> bool:
    """True when output-major weights narrower than the compute dtype stay narrow on this host:
    a CPU with bfloat16 matrix instructions, where XLA:CPU's YNNPACK fusions multiply them (one
    row as two, `jinfer.models.layers.out_major_matmul`). Elsewhere they are held widened
    (`widen_narrow_weights`)."""
    return precision.cpu_has_bf16_matmul()


def one_row_copy_size(
    layout: str, model: FlaxModel, params: Any, decode_buckets: tuple[int, ...], mesh: Mesh | None
) -> int:
    """Bytes of the one-row copy an engine should make (`one_row_copy_bytes` of `params`, arrays
    or ShapeDtypeStructs), 0 for none. A copy is made for layout "auto" on CPU in a single process
    and on one device, for a canonical model with typed weights whose engine also decodes at one
    row (decode bucket 1 beside larger ones), when it takes at most `ONE_ROW_COPY_MAX_FRACTION` of
    the host's physical memory. (`LLM` also counts it in its memory plan and goes without it when
    the engine would not fit with it.)

    Why: on XLA:CPU one row's float32 matrix-vector products run faster on [out, in] weights
    (SmolLM2-135M f32, one request on a 32-slot engine: 52-54 vs 37-38 tokens/s), while batched
    float32 rows run slower on them (8 requests: 91 vs 118 tokens/s), so a many-slot engine keeps
    both layouts. Narrow weights on a host that keeps them narrow need no copy: the whole engine
    runs output-major (`wants_out_major`).
    """
    if layout != "auto" or model.transposed or not model.spec.typed_weights:
        return 0
    if jax.default_backend() != "cpu" or jax.process_count() > 1 or (mesh is not None and mesh.size > 1):
        return 0
    if decode_buckets[:1] != (1,) or len(decode_buckets) < 2:
        return 0
    if quant.has_narrow_weights(params) and keeps_narrow_weights():
        return 0  # the whole engine runs output-major (`wants_out_major`)
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):  # unknown: no copy rather than a risky one
        return 0
    size = one_row_copy_bytes(model, params)
    return size if size <= ONE_ROW_COPY_MAX_FRACTION * physical else 0


def abstract_params(model: FlaxModel, mesh: Mesh, rules: ShardingRules | None, dtype: Any) -> Any:
    """What `load` will restore, without reading it: shapes, dtypes (floating leaves cast to
    `dtype`, a dtype or a `jinfer.precision.Precision`; None: as the model declares them) and
    shardings on `mesh`."""

    def spec(x, sharding, matrix):
        floating = jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
        dt = precision.leaf_dtype(dtype, matrix, x.dtype) if floating else x.dtype
        return jax.ShapeDtypeStruct(x.shape, dt, sharding=sharding)

    return jax.tree.map(spec, model.abstract_params(), model.shardings(mesh, rules), model.weight_matrices())


def one_row_copy_bytes(model: FlaxModel, params: Any) -> int:
    """Bytes a one-row copy of `params` adds: the weights it transposes, and the weights narrower
    than the compute dtype, which it holds widened (see `one_row_copy`); the other leaves (norm
    scales, a float32 embedding table) are shared with the canonical params."""
    widen_to = None if keeps_narrow_weights() else quant.compute_dtype(params)
    return quant.transposed_bytes(params, model.float_logical_axes(), widen_to=widen_to)


def one_row_copy(model: FlaxModel, params: Any, mesh: Mesh | None, rules) -> tuple[FlaxModel, Any]:
    """(the output-major model, a transposed copy of `params`) for one-row decode; `params` stay
    as they are (leaves that are neither transposed nor widened are shared, not copied; narrow
    weights are widened where the host does not keep them narrow, see `widen_narrow_weights`)."""
    return to_out_major(model, params, mesh or single_device_mesh(), rules, owned=False)


def widen_narrow_weights(params: Any) -> Any:
    """Output-major params' float weights narrower than the compute dtype as `Widened` ones
    (arrays or ShapeDtypeStructs), on a host that does not keep them narrow
    (`keeps_narrow_weights`); else `params` as they are.

    Without bfloat16 matrix instructions XLA:CPU has no fast one-row bfloat16 product and converts
    such a weight on every step, while float32 values rounded from bfloat16, with inputs rounded
    alike, give the batched mixed products up to the order of the sums."""
    if keeps_narrow_weights():
        return params
    return weights.widen(params, quant.compute_dtype(params))


def to_out_major(model: FlaxModel, params: Any, mesh: Mesh, rules, owned: bool):
    """Params in the output-major runtime layout (see jinfer.quant.transpose_params), float
    weights narrower than the compute dtype widened where the host does not keep them narrow
    (`widen_narrow_weights`).

    Done on the host weight by weight (no compilation); when the caller owns `params` each original
    is released as soon as its transposed copy exists, so loading never holds the model twice.
    """
    tmodel = model.out_major()
    if not owned:  # new dicts, same arrays: the caller's tree is left as it was
        params = _copy_dicts(params)
    shardings = tmodel.shardings(mesh, rules)
    params = quant.transpose_params_inplace(params, model.float_logical_axes(), shardings)
    return tmodel, widen_narrow_weights(params)


def _copy_dicts(tree: Any) -> Any:
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree
