"""Restore straight from a training run's Orbax checkpoint: only the subtrees inference needs.

A training loop typically writes an `ocp.CheckpointManager` directory::

    CKPT/0/  CKPT/1/  CKPT/2/          one directory per step (Orbax renames it into place when done)
    CKPT/2/default/                   one item per step: the train state {"params", "batch_stats",
                                      "opt_state", "step"} (or an NNX `nnx.state(model)` tree, whose
                                      Variables are stored as {"value": array} nodes)
    CKPT/3.orbax-checkpoint-tmp-123/  a save that was interrupted (never restored)

`restore_checkpoint` picks a complete step, reads the item's metadata (no array data), builds a
target of only the selected subtrees (ShapeDtypeStruct with the requested dtype and a sharding per
leaf) and asks Orbax for a partial restore: TensorStore then reads only those arrays' bytes (the
optimizer state is never read) and each device only its own slice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, Sharding

from jinfer.checkpoint import VARIABLES_KIND  # config.json "kind" of a frozen variables directory
from jinfer.errors import CheckpointKeyError, CheckpointNotFoundError, CorruptCheckpointError
from jinfer.sharding import PathRules, ShardingRules, logical_axes_by_path, path_str, single_device_mesh

logger = logging.getLogger(__name__)

PYTREE_METADATA = "_METADATA"  # written by Orbax's PyTree handler when an item is finalized
STEP_METADATA = "_CHECKPOINT_METADATA"  # written by CheckpointManager when a step is finalized
COMMIT_FILE = "commit_success.txt"
TMP_MARKER = ".orbax-checkpoint-tmp"
_STEP_NAME = re.compile(r"^(?:.*_)?(\d+)$")

Select = str | Sequence[str]


# -- finding the step and items ----------------------------------------------------------------
def _is_item(path: Path) -> bool:
    return path.is_dir() and (path / PYTREE_METADATA).is_file()


def _items(step_dir: Path) -> dict[str, Path]:
    """{item name: dir} of the PyTree items of one step directory."""
    return {p.name: p for p in sorted(step_dir.iterdir()) if _is_item(p)}


def _incomplete_reason(step_dir: Path) -> str | None:
    """Why a step directory is not a finished save (None when it is)."""
    if TMP_MARKER in step_dir.name:
        return "an interrupted save (Orbax temporary directory)"
    if not ((step_dir / STEP_METADATA).is_file() or (step_dir / COMMIT_FILE).is_file()):
        return f"no {STEP_METADATA} / {COMMIT_FILE} (the save did not finish)"
    unfinished = [
        p.name
        for p in step_dir.iterdir()
        if p.is_dir() and not _is_item(p) and (any(p.glob("ocdbt.process_*")) or (p / "d").is_dir())
    ]
    if unfinished:
        return f"item(s) {unfinished} have array data but no {PYTREE_METADATA} (the save did not finish)"
    if not _items(step_dir):
        return f"no Orbax PyTree item (no sub-directory with {PYTREE_METADATA})"
    return None


def checkpoint_steps(path: str | os.PathLike) -> list[int]:
    """The complete steps of a CheckpointManager directory, ascending (half-written ones excluded)."""
    return sorted(_scan_steps(Path(path), warn=False)[0])


def _scan_steps(root: Path, warn: bool) -> tuple[dict[int, Path], dict[int, str]]:
    complete: dict[int, Path] = {}
    skipped: dict[int, str] = {}
    for p in root.iterdir():
        m = _STEP_NAME.match(p.name.split(TMP_MARKER)[0]) if p.is_dir() else None
        if m is None:
            continue
        step = int(m.group(1))
        reason = _incomplete_reason(p)
        if reason is None:
            complete[step] = p
        else:
            skipped[step] = reason
    return complete, skipped


def resolve_step_dir(path: str | os.PathLike, step: int | str = "latest") -> tuple[Path, int | None]:
    """(directory holding the items, step) for a manager dir, a step dir or a plain checkpoint.

    `step="latest"` takes the newest complete step; a newer half-written step is skipped with a
    warning. Raises CheckpointNotFoundError listing the complete steps when `step` is not one.
    """
    root = Path(path).absolute()
    if not root.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory {root} does not exist")
    if _is_item(root) or _items(root):
        reason = None if _is_item(root) else _incomplete_reason(root)
        if reason is not None:
            raise CorruptCheckpointError(f"checkpoint {root} is not complete: {reason}")
        m = _STEP_NAME.match(root.name)
        return root, int(m.group(1)) if m else None
    complete, skipped = _scan_steps(root, warn=True)
    if not complete:
        detail = f"; half-written steps: {_describe(skipped)}" if skipped else ""
        raise CheckpointNotFoundError(
            f"{root} holds no complete Orbax checkpoint step (expected step directories such as "
            f"{root}/0 written by ocp.CheckpointManager, or a checkpoint directory){detail}"
        )
    if step == "latest":
        chosen = max(complete)
        newer = {s: r for s, r in skipped.items() if s > chosen}
        if newer:
            warnings.warn(
                f"jinfer: {root}: skipping half-written step(s) {_describe(newer)}; restoring step {chosen}",
                stacklevel=3,
            )
        return complete[chosen], chosen
    if isinstance(step, str) and not step.isdigit():
        raise CheckpointNotFoundError(f"step={step!r}: pass an integer step or 'latest'")
    if int(step) not in complete:
        extra = f" (step {int(step)} is half-written: {skipped[int(step)]})" if int(step) in skipped else ""
        raise CheckpointNotFoundError(
            f"{root} has no complete step {int(step)}{extra}; available steps: {sorted(complete)}"
        )
    return complete[int(step)], int(step)


def _describe(steps: Mapping[int, str]) -> str:
    return "; ".join(f"{s} ({r})" for s, r in sorted(steps.items()))


# -- metadata and selection --------------------------------------------------------------------
def _item_metadata(item_dir: Path) -> dict[str, Any]:
    """The item's tree of ArrayMetadata (shape, dtype), read without any array data."""
    import orbax.checkpoint as ocp

    try:
        meta = ocp.PyTreeCheckpointer().metadata(item_dir).item_metadata
    except Exception as e:  # Orbax raises bare Exceptions for damaged metadata
        raise CorruptCheckpointError(f"{item_dir}: cannot read the Orbax metadata: {e}") from e
    tree = getattr(meta, "tree", meta)
    if not isinstance(tree, Mapping):
        raise CorruptCheckpointError(
            f"{item_dir}: the checkpoint tree is a {type(tree).__name__}, not a dict"
        )
    return dict(tree)


@dataclasses.dataclass(frozen=True)
class _LeafRef:
    """A saved array known only by name (from the item's _METADATA file): shape/dtype not read yet."""

    name: str
    value_type: str


def _item_structure(item_dir: Path) -> Any:
    """The item's tree with `_LeafRef` leaves, from its _METADATA JSON alone (no array opened).

    Orbax's own `metadata()` opens every array of the checkpoint (optimizer state included), a
    cost proportional to the whole train state; this reads one small file. None when the file's
    layout is not the one understood here (the caller then uses Orbax's metadata).
    """
    try:
        meta = json.loads((item_dir / PYTREE_METADATA).read_text())
        if not meta.get("use_ocdbt"):
            return None
        tree: dict[str, Any] = {}
        for entry in meta["tree_metadata"].values():
            keys = [str(k["key"]) for k in entry["key_metadata"]]
            node = tree
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = _LeafRef(".".join(keys), str(entry["value_metadata"]["value_type"]))
        return tree
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _open_leaves(item_dir: Path, subtree: Any) -> Any:
    """ShapeDtypeStructs for the `_LeafRef`s of `subtree`, opening only those arrays (TensorStore
    zarr metadata inside the item's OCDBT store). None on anything unexpected."""
    try:
        import tensorstore as ts

        meta = json.loads((item_dir / PYTREE_METADATA).read_text())
        driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        context = ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}})  # shared b-tree nodes
        kvstore = {"driver": "ocdbt", "base": f"file://{item_dir}/"}

        def open_leaf(ref):
            if ref.value_type not in ("jax.Array", "np.ndarray"):
                raise ValueError(ref.value_type)
            spec = {"driver": driver, "kvstore": kvstore, "path": ref.name}
            arr = ts.open(spec, open=True, context=context).result()
            return jax.ShapeDtypeStruct(tuple(arr.shape), arr.dtype.numpy_dtype)

        return jax.tree.map(open_leaf, subtree)
    except Exception:  # any surprise: Orbax's own (slower, complete) metadata is used instead
        return None


def _split(path: str) -> list[str]:
    parts = [p for p in str(path).split("/") if p]
    if not parts:
        raise CheckpointKeyError(f"select entry {path!r} is empty; use key paths such as 'params'")
    return parts


def _lookup(tree: Any, parts: list[str], where: str) -> Any:
    node = tree
    for depth, key in enumerate(parts):
        keys = _child_keys(node)
        if keys is None or key not in keys:
            at = "/".join(parts[:depth]) or "the top level"
            avail = ", ".join(keys) if keys else "(none: it is an array)"
            raise CheckpointKeyError(
                f"select {'/'.join(parts)!r} not found in {where}; keys at {at}: {avail}"
            )
        node = node[int(key)] if isinstance(node, (list, tuple)) else node[key]
    return node


def _child_keys(node: Any) -> list[str] | None:
    if isinstance(node, Mapping):
        return sorted(str(k) for k in node)
    if isinstance(node, (list, tuple)):
        return [str(i) for i in range(len(node))]
    return None


def _route(select: Sequence[str], items: Mapping[str, Path], trees: Mapping[str, Any], where: str):
    """{item name: [select paths inside that item]}; a path may start with an item name."""
    routed: dict[str, list[tuple[str, list[str]]]] = {}
    for entry in select:
        parts = _split(entry)
        if parts[0] in items and (len(items) > 1 or parts[0] not in (_child_keys(trees[parts[0]]) or [])):
            item, inner = parts[0], parts[1:]
        else:
            holders = [n for n in items if parts[0] in (_child_keys(trees[n]) or [])]
            if len(holders) != 1:
                keys = {n: _child_keys(trees[n]) for n in items}
                raise CheckpointKeyError(
                    f"select {entry!r} not found in {where}; available keys: "
                    + "; ".join(f"item {n!r}: {', '.join(k or [])}" for n, k in keys.items())
                )
            item, inner = holders[0], parts
        if inner:
            _lookup(trees[item], inner, f"{where} (item {item!r})")
        routed.setdefault(item, []).append((entry, inner))
    return routed


def _subtree(tree: Any, parts: list[str]) -> Any:
    for key in parts:
        tree = tree[int(key)] if isinstance(tree, (list, tuple)) else tree[key]
    return tree


def _nest(paths_values: Sequence[tuple[list[str], Any]]) -> dict[str, Any]:
    """{"a/b": x, "c": y} as nested dicts {"a": {"b": x}, "c": y}."""
    out: dict[str, Any] = {}
    for parts, value in paths_values:
        node = out
        for key in parts[:-1]:
            node = node.setdefault(key, {})
        node[parts[-1]] = value
    return out


# -- target shardings --------------------------------------------------------------------------
def _sharding_fn(
    mesh: Mesh | None, rules: PathRules | None, shardings: Any
) -> Callable[[str, tuple[int, ...]], Sharding]:
    """(leaf path, shape) -> Sharding, from explicit shardings, path rules on a mesh, or replicated."""
    if isinstance(shardings, Sharding):
        return lambda path, shape: shardings
    if shardings is not None:
        leaves = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, Sharding))[0]
        flat = {path_str(p): s for p, s in leaves}

        def explicit(path, shape):
            if path not in flat:
                raise CheckpointKeyError(
                    f"shardings= has no entry for {path!r}; it must have the structure of the restored "
                    f"tree (entries: {', '.join(sorted(flat)[:20])})"
                )
            return flat[path]

        return explicit
    mesh = single_device_mesh() if mesh is None else mesh
    table = ShardingRules()
    names = dict(table.rules)
    # Rules may name mesh axes directly ("model") as well as logical axes ("mlp").
    table = table.extend(**{a: a for a in mesh.axis_names if a not in names})

    def by_rules(path, shape):
        axes = logical_axes_by_path(path, len(shape), rules)
        return table.sharding(mesh, axes, shape, name=path)

    return by_rules


def _target(meta: Any, prefix: str, sharding_of, dtype: Any) -> Any:
    """Restore target for one metadata subtree: ShapeDtypeStruct leaves, dtype cast for floats."""

    def leaf(path, m):
        name = "/".join(filter(None, [prefix, path_str(path)]))
        shape, saved = tuple(m.shape), jnp.dtype(m.dtype)
        dt = jnp.dtype(dtype) if dtype is not None and jnp.issubdtype(saved, jnp.floating) else saved
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding_of(name, shape))

    return jax.tree_util.tree_map_with_path(leaf, meta, is_leaf=lambda x: hasattr(x, "shape"))


# -- restoring ---------------------------------------------------------------------------------
def restore_checkpoint(
    path: str | os.PathLike,
    select: Select = ("params", "batch_stats"),
    step: int | str = "latest",
    mesh: Mesh | None = None,
    rules: PathRules | None = None,
    shardings: Any = None,
    dtype: Any = None,
) -> dict[str, Any]:
    """Restores only the selected subtrees of a training checkpoint, straight into shardings.

    Args:
      path: a `CheckpointManager` directory (steps as sub-directories), one step directory, or a
        plain Orbax PyTree checkpoint directory.
      select: key paths to restore ("params", "batch_stats", "model", "state/params", ...); the
        rest (optimizer state, step counters) is never read. A path may start with an item name
        when a step holds several items (Composite checkpoints).
      step: "latest" (the newest complete step; half-written ones are skipped with a warning) or
        an int.
      mesh: device mesh for the restored arrays (default: one device).
      rules: `[(regex, axes), ...]` on leaf paths such as "params/Dense_0/kernel"; axes are
        logical names of `ShardingRules()` ("mlp", "embed", ...) or mesh axis names ("model").
        Unmatched leaves are replicated over the mesh.
      shardings: instead of mesh/rules, one `Sharding` for all leaves or a tree of them with the
        structure of the result.
      dtype: cast floating leaves to this dtype on restore (integer leaves unchanged).

    Returns:
      Nested dict holding the selected subtrees at their key paths, e.g.
      `{"params": {...}, "batch_stats": {...}}` (Linen variables, ready for `module.apply`).

    Raises:
      CheckpointNotFoundError (no directory / no complete step / unknown step, listing the
      complete steps), CheckpointKeyError (a select path is missing, listing the keys there),
      CorruptCheckpointError (unreadable metadata or data).
    """
    import orbax.checkpoint as ocp

    select = (select,) if isinstance(select, str) else tuple(select)
    if not select:
        raise CheckpointKeyError("select is empty; name at least one key path such as 'params'")
    step_dir, step_number = resolve_step_dir(path, step)
    items = {step_dir.name: step_dir} if _is_item(step_dir) else _items(step_dir)
    trees = {name: _item_structure(d) for name, d in items.items()}
    trees = {name: _item_metadata(items[name]) if t is None else t for name, t in trees.items()}
    where = f"{step_dir}" + ("" if step_number is None else f" (step {step_number})")
    sharding_of = _sharding_fn(mesh, rules, shardings)
    results: list[tuple[list[str], Any]] = []
    for item, entries in _route(select, items, trees, where).items():
        target: dict[str, Any] = {}
        for entry, inner in entries:
            meta = _subtree(trees[item], inner)
            if any(isinstance(x, _LeafRef) for x in jax.tree.leaves(meta)):
                opened = _open_leaves(items[item], meta)
                meta = opened if opened is not None else _subtree(_item_metadata(items[item]), inner)
            sub = _target(meta, "/".join(_split(entry)), sharding_of, dtype)
            node = target
            for key in inner[:-1]:
                node = node.setdefault(key, {})
            if inner:
                node[inner[-1]] = sub
            else:
                target = sub
        restored = _partial_restore(ocp, items[item], target, where)
        results += [(_split(entry), _subtree(restored, inner)) for entry, inner in entries]
    logger.info("jinfer: restored %s from %s", ", ".join(select), where)
    return _nest(results)


def _partial_restore(ocp: Any, item_dir: Path, target: Any, where: str) -> Any:
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), target
    )
    try:
        return ocp.PyTreeCheckpointer().restore(
            item_dir,
            args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
        )
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{where}: a data file is missing: {e}") from e
    except Exception as e:  # TensorStore reports damaged files as bare Exceptions
        raise CorruptCheckpointError(f"{where}: cannot read the selected arrays: {str(e)[:400]}") from e


# -- freezing ------------------------------------------------------------------------------------


def freeze_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike,
    select: Select = ("params",),
    step: int | str = "latest",
    dtype: Any = None,
    model_class: str | None = None,
    config: Any = None,
    overwrite: bool = False,
) -> Path:
    """Writes the selected subtrees of a training checkpoint as a jinfer model directory.

    With `model_class` (a registered class) and its `config`, `select` must be just the params
    and the result is a regular model directory (`jinfer.load_model_dir`, `LLM`, ...). Without,
    the directory holds the selected variables (`jinfer.load_variables` restores them, e.g. for
    `Engine.from_flax`). Both have the same integrity manifest and completion marker.
    """
    from jinfer import checkpoint
    from jinfer.errors import ConfigError

    variables = restore_checkpoint(path, select=select, step=step, dtype=dtype)
    step_dir, step_number = resolve_step_dir(path, step)
    if model_class is not None:
        if config is None or set(variables) != {"params"}:
            raise ConfigError(
                f"freeze with model_class={model_class!r} needs config and select='params' only "
                f"(selected: {sorted(variables)}); leave model_class out to freeze any variables"
            )
        from jinfer.modeling import FlaxModel
        from jinfer.models.registry import config_from_dict, get_spec

        spec = get_spec(model_class)
        cfg = config_from_dict(spec.config_cls, dict(config)) if isinstance(config, dict) else config
        # a checkpoint of another module would write a directory that can never load: refuse it here
        FlaxModel(spec, cfg).checked_params(variables["params"], where=f"freeze {path} as {model_class}")
        return checkpoint.save_model_dir(out, model_class, cfg, variables["params"], overwrite=overwrite)
    final = Path(out).absolute()
    if final.exists() and not overwrite:
        raise ConfigError(f"{final} already exists; pass overwrite=True (--overwrite) to replace it")
    flat = checkpoint.flatten_params(variables)
    # PRNG keys (an NNX module's Dropout streams) are training state that inference never draws
    # from: they are left out (Engine.from_flax takes the module's own), and named in the meta.
    keys = sorted(k for k, v in flat.items() if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key))
    flat = {k: v for k, v in flat.items() if k not in keys}
    meta = {
        "format_version": checkpoint.FORMAT_VERSION,
        "kind": VARIABLES_KIND,
        "model_class": None,
        "select": list((select,) if isinstance(select, str) else select),
        "source": {"path": str(step_dir), "step": step_number},
        "dtype": checkpoint._main_float_dtype(flat),
        "dropped_prng_keys": keys,
    }
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    try:
        checkpoint._write_contents(tmp, flat, meta, {})
        checkpoint._move_into_place(tmp, final, overwrite)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_variables(
    path: str | os.PathLike,
    mesh: Mesh | None = None,
    rules: PathRules | None = None,
    dtype: Any = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Restores a directory written by `freeze_checkpoint` (no model class) as nested dicts.

    Files are re-hashed against integrity.json first (`verify`); arrays go straight into the
    shardings given by `mesh`/`rules` (as in `restore_checkpoint`), floating ones cast to `dtype`.
    """
    import orbax.checkpoint as ocp

    from jinfer import checkpoint

    path = Path(path).absolute()
    checkpoint._check_complete(path)
    meta = checkpoint._read_json(path / checkpoint.CONFIG_FILE, "frozen variables config")
    if not isinstance(meta, dict) or meta.get("kind") != VARIABLES_KIND:
        raise CorruptCheckpointError(
            f"{path} is not a frozen variables directory (config.json kind != {VARIABLES_KIND!r}); "
            "model directories load with jinfer.load_model_dir"
        )
    integrity = checkpoint._load_integrity(path)
    if verify:
        checkpoint.verify_files(path, integrity)
    sharding_of = _sharding_fn(mesh, rules, None)
    target = {}
    for name, rec in integrity["arrays"].items():
        shape, saved = tuple(rec["shape"]), jnp.dtype(rec["dtype"])
        dt = jnp.dtype(dtype) if dtype is not None and jnp.issubdtype(saved, jnp.floating) else saved
        target[name] = jax.ShapeDtypeStruct(shape, dt, sharding=sharding_of(name, shape))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            flat = ckptr.restore(path / checkpoint.PARAMS_DIR, target)
    except Exception as e:  # TensorStore reports damaged files as bare Exceptions
        raise CorruptCheckpointError(f"{path}: cannot read the variables: {str(e)[:400]}") from e
    return _nest([(name.split("/"), x) for name, x in flat.items()])
