"""Model directories: save, restore (straight into shards) and inspect, with integrity checks.

Layout of a model directory DIR::

    DIR/config.json        {"format_version": 1, "model_class": ..., "config": {...}, "dtype": ..., ...}
    DIR/params/            Orbax PyTree checkpoint (uncompressed) of the FLATTENED params
                           {"a/b/0/c": array}; string keys avoid Orbax's int-key issues.
    DIR/integrity.json     per array: shape, dtype, sha256 of the saved bytes; per file under params/:
                           size, sha256 and the parameters whose data the file holds.
    DIR/.jinfer_complete   written last; a directory without it is never loaded.
    DIR/tokenizer.json ... optional files the caller passes as `extra_files`.

Saving is atomic: everything goes into a sibling `.{name}.tmp-<pid>-<rand>` directory that is
renamed to DIR only after the completion marker is written.

Integrity: Orbax/TensorStore have no checksums (a flipped byte restores silently as garbage), so
`restore_params(verify=True)` re-hashes every file under params/ against integrity.json BEFORE
restoring. Hashing files (not arrays) never materialises an array on one host, works the same for
sharded restores and dtype casts, and also catches truncated and missing files. Files verified by
an earlier load and unchanged since (size, inode, mtime and ctime as recorded in
DIR/.jinfer_verified.json) are not re-read; see `jinfer.digest_record` for what that still catches.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jinfer import integrity as integrity_lib
from jinfer import limits, precision
from jinfer.digest_record import DigestRecord
from jinfer.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    ParamMismatchError,
    UnknownModelError,
)
from jinfer.modeling import FlaxModel, cast_floating
from jinfer.models.registry import ModelSpec, config_from_dict, config_to_dict, get_spec
from jinfer.osutil import pid_alive
from jinfer.sharding import ShardingRules, parse_mesh_spec, path_str, single_device_mesh

log = logging.getLogger("jinfer.checkpoint")

FORMAT_VERSION = 1
INTEGRITY_VERSION = integrity_lib.INTEGRITY_VERSION
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
INTEGRITY_FILE = "integrity.json"
COMPLETE_MARKER = ".jinfer_complete"
_RESERVED = {CONFIG_FILE, PARAMS_DIR, INTEGRITY_FILE, COMPLETE_MARKER}
_CHUNK = 1 << 20  # hash in 1 MiB pieces: bounded memory for any file or array size


# -- flat param trees ---------------------------------------------------------------------------
def flatten_params(tree: Any) -> dict[str, Any]:
    """Nested param dict -> `{"a/b/0/c": leaf}` (int keys become their decimal string)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): leaf for p, leaf in leaves}


def _unflatten_like(flat: Mapping[str, Any], like: Any) -> Any:
    """Inverse of `flatten_params` using the structure (and int keys) of `like`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[path_str(p)] for p, _ in paths])


# -- hashing ------------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _sha256_array(x: Any) -> str | None:
    """sha256 of the little-endian bytes of one array, hashed in 1 MiB pieces.

    Sharded jax arrays are gathered to the host (np.asarray) one array at a time: fine at save time,
    which is rare. Arrays spread over several processes are not gathered; their hash is None.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    host = np.ascontiguousarray(np.asarray(x))
    if sys.byteorder == "big":  # pragma: no cover - every supported host is little-endian
        host = host.byteswap()
    raw = memoryview(host.reshape(-1).view(np.uint8))
    digest = hashlib.sha256()
    for start in range(0, len(raw), _CHUNK):
        digest.update(raw[start : start + _CHUNK])
    return digest.hexdigest()


VARIABLES_KIND = "flax_variables"  # config.json "kind" of a frozen variables directory (jinfer freeze)


# -- saving -------------------------------------------------------------------------------------
def save_model_dir(
    path: str | os.PathLike,
    model_class: str,
    config: Any,
    params: Any,
    *,
    extra_files: Mapping[str, bytes | str | dict] | None = None,
    dtype: Any = None,
    overwrite: bool = False,
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    """Writes a model directory atomically and returns its path.

    Args:
      path: the directory to create.
      model_class: a registered model class name (see `jinfer.models.registry`).
      config: that class's config dataclass (or a dict of its fields).
      params: nested dict of arrays (numpy or jax, possibly sharded; e.g. `FlaxModel.init_params`).
        The structure is not checked against the model here: `restore_params` checks it.
      extra_files: `{file_name: bytes | str | dict}` copied next to config.json (dicts as JSON),
        e.g. tokenizer.json, tokenizer_config.json, generation_config.json.
      dtype: cast floating params to this dtype before saving (integer params are kept).
      overwrite: replace an existing directory (the old one is removed only after the new one is
        complete).
      extra_config: extra top-level keys for config.json (e.g. {"family": "llama"}).

    Single-process only: with several JAX processes, raises CheckpointError.
    """
    final = Path(path).absolute()
    spec = get_spec(model_class)
    if isinstance(config, Mapping):
        config = config_from_dict(spec.config_cls, dict(config))
    if not isinstance(config, spec.config_cls):
        raise ConfigError(
            f"save_model_dir({str(final)!r}): config is a {type(config).__name__}; model class "
            f"{model_class!r} needs a {spec.config_cls.__name__}"
        )
    if jax.process_count() > 1:
        raise CheckpointError(f"save_model_dir({str(final)!r}): multi-process saving is not supported yet")
    if final.exists() and not overwrite:
        raise CheckpointError(f"{final} already exists; pass overwrite=True to replace it")
    _check_extra_names(final, extra_files or {}, extra_config or {})
    params = FlaxModel(spec, config).without_rng_state(params)
    if dtype is not None:
        params = cast_floating(params, dtype)
    flat = flatten_params(params)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_class": model_class,
        "config": config_to_dict(config),
        "dtype": _main_float_dtype(params),
        **dict(extra_config or {}),
    }
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        _write_contents(tmp, flat, meta, extra_files or {})
        _move_into_place(tmp, final, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_dead_leftovers(final: Path) -> None:
    """Deletes `.{name}.tmp-<pid>-*` directories of earlier saves to `final` whose process is gone
    (killed with SIGKILL, or the machine went down): they would otherwise stay, full size,
    forever. A save still running keeps its directory: its pid is alive here, or (another host
    on a shared filesystem) something in it was written within the last hour."""
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        pid = leftover.name[len(f".{final.name}.tmp-") :].split("-")[0]
        if not pid.isdigit() or pid_alive(int(pid)) or time.time() - _newest_mtime(leftover) < 3600:
            continue
        log.warning("removing %s, left by an interrupted save (process %s is gone)", leftover, pid)
        shutil.rmtree(leftover, ignore_errors=True)


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
    return newest


def _check_extra_names(final: Path, extra_files: Mapping[str, Any], extra_config: Mapping[str, Any]) -> None:
    for name in extra_files:
        if name in _RESERVED or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", name):
            raise ConfigError(
                f"save_model_dir({str(final)!r}): extra file name {name!r} is not allowed; use a plain "
                f"file name such as 'tokenizer.json' (reserved: {sorted(_RESERVED)})"
            )
    clash = sorted({"format_version", "model_class", "config", "dtype"} & set(extra_config))
    if clash:
        raise ConfigError(f"save_model_dir({str(final)!r}): extra_config may not set {clash}")


def _main_float_dtype(params: Any) -> str:
    """The floating dtype holding most parameters ("float32" when there are none). The float32
    scales of int8 weights do not count: a `--dtype bfloat16 --quantize int8` model is bfloat16."""
    from jinfer.models.weights import QuantArray

    counts: dict[str, int] = {}
    for x in jax.tree_util.tree_leaves(params, is_leaf=lambda v: isinstance(v, QuantArray)):
        if isinstance(x, QuantArray) or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            continue  # int8 weights and their scales; a PRNG key (an NNX Rngs stream)
        dt = jnp.dtype(x.dtype)
        if jnp.issubdtype(dt, jnp.floating):
            counts[dt.name] = counts.get(dt.name, 0) + int(np.prod(x.shape))
    return max(counts, key=counts.get) if counts else "float32"


def _uncompressed_handler(ocp: Any) -> Any:
    """The Orbax handler `save_model_dir` writes with: the standard PyTree format, uncompressed.

    Orbax compresses with zstd by default. Inference weights are written once and restored at every
    start, and trained float weights compress little (all-MiniLM-L6-v2: to 92 % in float32, 78 % in
    bfloat16), so decompressing is a cost at every restore for little disk: SmolLM2-135M in float32
    (540 MB) restores in 0.6-0.8 s uncompressed against 1.1-1.3 s compressed. `restore_params`
    reads both, so directories written before stay valid."""
    try:
        return ocp.PyTreeCheckpointHandler(use_compression=False)
    except TypeError:  # an Orbax without the option: its default (compressed) format
        return ocp.PyTreeCheckpointHandler()


def _write_contents(tmp: Path, flat: dict[str, Any], meta: dict, extra_files: Mapping[str, Any]) -> None:
    import orbax.checkpoint as ocp

    tmp.mkdir()
    params_dir = tmp / PARAMS_DIR
    with ocp.Checkpointer(_uncompressed_handler(ocp)) as ckptr:  # synchronous: done on return
        ckptr.save(params_dir, args=ocp.args.PyTreeSave(flat))
    arrays = {
        name: {"shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name, "sha256": _sha256_array(x)}
        for name, x in flat.items()
    }
    _write_json(tmp / CONFIG_FILE, meta)
    for name, content in extra_files.items():
        if isinstance(content, Mapping):
            _write_json(tmp / name, content)
        else:
            data = content.encode() if isinstance(content, str) else bytes(content)
            (tmp / name).write_bytes(data)
    integrity = {
        "format_version": INTEGRITY_VERSION,
        "algorithm": "sha256",
        "arrays": arrays,
        "files": _file_manifest(params_dir, list(flat)),
        "model_files": integrity_lib.model_file_manifest(tmp),
    }
    _write_json(tmp / INTEGRITY_FILE, integrity)
    # The marker goes last and is fsynced: its presence means every other file is complete.
    with open(tmp / COMPLETE_MARKER, "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "saved_at": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())


def check_replaceable(final: Path, sources: Sequence[Any] = ()) -> None:
    """ConfigError unless `final` may be replaced by a new model directory: it must not be (or
    hold) a source being read, and an existing `final` must be a jinfer model or variables
    directory (never an arbitrary directory or file that `overwrite` would delete)."""
    final = Path(final).absolute().resolve()
    for src in sources:
        src_path = Path(src).absolute().resolve()
        if src_path == final or final in src_path.parents:
            raise ConfigError(
                f"the output {final} is, or contains, the source {src_path}: replacing it would "
                "delete the checkpoint being read; write to another directory"
            )
    if final.exists() and not (final.is_dir() and (final / COMPLETE_MARKER).is_file()):
        what = "a directory" if final.is_dir() else "a file"
        raise ConfigError(
            f"{final} exists and is {what}, not a jinfer model directory (no {COMPLETE_MARKER}); "
            "overwrite only replaces an earlier jinfer output: remove it yourself or choose another path"
        )


def _move_into_place(tmp: Path, final: Path, overwrite: bool) -> None:
    old = None
    if final.exists() and overwrite:
        check_replaceable(final)
        old = final.parent / f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError as e:
        if not final.exists():
            raise
        # Another process wrote `final` while this one was writing (two converts into one OUT):
        # its complete output stays, this one is dropped (by the caller).
        raise CheckpointError(
            f"{final} was written by another process while this one was writing it; its output is "
            "kept and this one dropped (pass --overwrite / overwrite=True to replace it)"
        ) from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _file_manifest(params_dir: Path, names: list[str]) -> dict[str, dict]:
    """{relative file: {size, sha256, params}} for every file Orbax wrote under params/."""
    files = sorted(p for p in params_dir.rglob("*") if p.is_file())
    owners = _ocdbt_file_owners(params_dir, names)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_sha256_file, files))
    manifest = {}
    for p, digest in zip(files, digests, strict=True):
        rel = p.relative_to(params_dir).as_posix()
        # [] = reached by the walk but holds no array data; None = unknown (the walk failed).
        holders = owners.get(rel, [] if owners else None)
        manifest[rel] = {"size": p.stat().st_size, "sha256": digest, "params": holders}
    return manifest


_OCDBT_REF = re.compile(r"^(?:value|btreenode):(.*):([^:]+):(\d+):(\d+)$")


def _ocdbt_file_owners(params_dir: Path, names: list[str]) -> dict[str, list[str]]:
    """Best effort: which parameters' data each OCDBT file holds, by walking the OCDBT b-tree.

    OCDBT packs many arrays into shared files (small ones inline in b-tree nodes). Files not
    reached from the root (the per-process index Orbax keeps) map to []. On any surprise in the
    dump format the map is empty and error messages fall back to "shared storage".
    """
    try:
        import tensorstore as ts

        kv = ts.KvStore.open({"driver": "file", "path": str(params_dir) + "/"}).result()
        versions = ts.ocdbt.dump(kv).result().get("versions") or []
        if not versions or "root" not in versions[-1] or "location" not in versions[-1]["root"]:
            return {}
        owners: dict[str, set[str]] = {}
        _walk_ocdbt(ts, kv, versions[-1]["root"]["location"], owners, set(names))
        return {f: sorted(ps) for f, ps in owners.items()}
    except Exception:  # any surprise in the dump format: the map only improves error messages
        return {}


def _walk_ocdbt(ts: Any, kv: Any, location: str, owners: dict[str, set[str]], names: set[str]) -> set[str]:
    node_file = _ref_file(location)
    node = ts.ocdbt.dump(kv, location).result()
    held: set[str] = set()
    for entry in node.get("entries", []):
        key = entry.get("key", b"")
        key = key.decode() if isinstance(key, bytes) else str(key)
        param = key.rsplit("/", 1)[0] if "/" in key else key
        entry_params = {param} if param in names else set()
        for value in entry.values():
            if isinstance(value, str) and value.startswith("btreenode:"):
                entry_params |= _walk_ocdbt(ts, kv, value, owners, names)
            elif isinstance(value, str) and value.startswith("value:") and entry_params:
                owners.setdefault(_ref_file(value), set()).update(entry_params)
        held |= entry_params
    owners.setdefault(node_file, set()).update(held)
    return held


def _ref_file(ref: str) -> str:
    m = _OCDBT_REF.match(ref)
    if m is None:
        raise ValueError(ref)
    return m.group(1) + m.group(2)


# -- loading ------------------------------------------------------------------------------------
def _check_complete(path: Path) -> None:
    if path.is_file() or (path.is_dir() and not (path / COMPLETE_MARKER).is_file() and _is_source(path)):
        raise CheckpointNotFoundError(
            f"{path} is a checkpoint to convert, not a jinfer model directory: convert it first "
            f"(`jinfer convert {path} OUT`, or jinfer.convert(SRC, OUT))"
        )
    if not path.is_dir():
        leftovers = sorted(path.parent.glob(f".{path.name}.tmp-*")) if path.parent.is_dir() else []
        if leftovers:
            raise IncompleteCheckpointError(
                f"model directory {path} does not exist, but an interrupted save left "
                f"{leftovers[0]}: the save was interrupted; save it again (and delete the .tmp dir)"
            )
        raise CheckpointNotFoundError(f"model directory {path} does not exist")
    if not (path / COMPLETE_MARKER).is_file():
        raise IncompleteCheckpointError(
            f"model directory {path} has no {COMPLETE_MARKER} marker: the save was interrupted (or the "
            "directory was not written by jinfer.checkpoint.save_model_dir); save it again"
        )


def _is_source(path: Path) -> bool:
    """A Hugging Face or GGUF checkpoint directory (weights but no jinfer marker)."""
    patterns = ("*.safetensors", "*.bin", "*.gguf", "*.pth")
    return any(next(path.glob(p), None) is not None for p in patterns)


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path} is missing ({what})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path} is not valid JSON ({what}): {e}") from e


def load_config(path: str | os.PathLike) -> tuple[ModelSpec, Any, dict[str, Any]]:
    """Reads DIR/config.json: returns (ModelSpec, config dataclass, the full config.json dict).

    Raises CheckpointNotFoundError (no dir / config.json), IncompleteCheckpointError (interrupted
    save), CorruptCheckpointError (bad JSON or fields), UnknownModelError (unregistered class).
    """
    path = Path(path).absolute()
    _check_complete(path)
    meta = _read_json(path / CONFIG_FILE, "model config")
    integrity_lib.verify_model_files(path, _load_integrity(path))
    if isinstance(meta, dict) and meta.get("kind") == VARIABLES_KIND:
        raise ConfigError(
            f"{path} holds frozen Flax variables (`jinfer freeze` without --model-class), not a model "
            "directory: restore them with jinfer.load_variables (e.g. for Engine.from_flax), or freeze "
            "with --model-class CLASS --config FILE to get a model directory"
        )
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CorruptCheckpointError(f"{path / CONFIG_FILE}: expected an object with a 'config' object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{path / CONFIG_FILE}: format_version {meta.get('format_version')!r} is not supported "
            f"(this jinfer reads version {FORMAT_VERSION})"
        )
    name = meta.get("model_class")
    if not isinstance(name, str):
        raise CorruptCheckpointError(f"{path / CONFIG_FILE}: 'model_class' is missing or not a string")
    try:
        spec = get_spec(name)
    except UnknownModelError as e:
        raise UnknownModelError(f"{path / CONFIG_FILE}: {e}") from e
    try:
        config = config_from_dict(spec.config_cls, meta["config"])
    except ConfigError as e:
        raise CorruptCheckpointError(f"{path / CONFIG_FILE}: {e}") from e
    limits.check_hyperparameters(config, str(path / CONFIG_FILE), CorruptCheckpointError)
    return spec, config, meta


def load_model(path: str | os.PathLike) -> FlaxModel:
    """The FlaxModel described by DIR/config.json (no parameters loaded)."""
    spec, config, meta = load_config(path)
    return FlaxModel(spec, config, meta.get("quantization"))


def _load_integrity(path: Path) -> dict[str, Any]:
    integrity = _read_json(path / INTEGRITY_FILE, "integrity manifest")
    integrity_lib.check_manifest(path, integrity)
    return integrity


def verify_files(
    path: str | os.PathLike, integrity: Mapping[str, Any] | None = None, full: bool = False
) -> None:
    """Re-hashes every file under DIR/params/ against integrity.json (streaming, 1 MiB reads).

    A file verified before and unchanged since is skipped (`jinfer.digest_record`) unless `full`
    (or $JINFER_VERIFY=full).

    Raises CheckpointNotFoundError for a missing file and CorruptCheckpointError for a file whose
    size (truncation) or sha256 (flipped bytes) differs, naming the file and the parameters in it.
    """
    path = Path(path).absolute()
    integrity = _load_integrity(path) if integrity is None else integrity
    files: dict[str, dict] = integrity.get("files") or {}
    params_dir = path / PARAMS_DIR
    integrity_lib.check_params_coverage(path, params_dir, files)
    missing = [rel for rel in files if not (params_dir / rel).is_file()]
    if missing:
        raise CheckpointNotFoundError(
            f"{path}: {len(missing)} parameter file(s) missing under {PARAMS_DIR}/: "
            + "; ".join(f"{rel} ({_holders(files[rel])})" for rel in missing)
        )
    stats = {rel: (params_dir / rel).stat() for rel in files}
    for rel, rec in files.items():
        size = stats[rel].st_size
        if size != rec["size"]:
            raise CorruptCheckpointError(
                f"{path}: {PARAMS_DIR}/{rel} has {size} bytes but {rec['size']} were saved (truncated or "
                f"overwritten); it holds {_holders(rec)}"
            )
    # Files verified before and unchanged since (same size, inode, mtime, ctime) are not re-read.
    record = DigestRecord(path, integrity, use_record=not full)
    rels = [
        rel for rel in files if not record.verified(f"{PARAMS_DIR}/{rel}", stats[rel], files[rel]["sha256"])
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda rel: _sha256_file(params_dir / rel), rels))
    bad = [rel for rel, d in zip(rels, digests, strict=True) if d != files[rel]["sha256"]]
    if bad:
        raise CorruptCheckpointError(
            f"{path}: sha256 mismatch (bytes changed since the save) in "
            + "; ".join(f"{PARAMS_DIR}/{rel}, which holds {_holders(files[rel])}" for rel in bad)
        )
    for rel, digest in zip(rels, digests, strict=True):
        record.add(f"{PARAMS_DIR}/{rel}", stats[rel], digest)
    record.save()


def _holders(rec: Mapping[str, Any]) -> str:
    params = rec.get("params")
    if params is None:
        return "shared OCDBT storage (may hold data of any parameter)"
    if not params:
        return "no parameter data (OCDBT index/metadata)"
    if len(params) == 1:
        return f"parameter {params[0]!r}"
    return f"data of {len(params)} parameters (shared OCDBT file): {', '.join(params)}"


def _disk_metadata(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} from the Orbax metadata, without reading any array."""
    import orbax.checkpoint as ocp

    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointNotFoundError(f"{params_dir} is missing (the parameters of {path})")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            item = ckptr.metadata(params_dir).item_metadata
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{params_dir}: Orbax metadata file missing: {e}") from e
    except Exception as e:  # Orbax raises bare Exceptions for damaged files
        raise CorruptCheckpointError(f"{params_dir}: cannot read Orbax metadata: {_short(e)}") from e
    tree = getattr(item, "tree", item)
    return {str(k): (tuple(v.shape), np.dtype(v.dtype)) for k, v in dict(tree).items()}


def _short(e: BaseException, limit: int = 400) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _check_params_match(
    path: Path, model: FlaxModel, expected: Mapping[str, Any], on_disk: Mapping[str, tuple]
) -> None:
    """ParamMismatchError listing every missing, extra, wrong-shape or wrong-kind parameter."""
    problems = []
    for name in sorted(set(expected) - set(on_disk)):
        x = expected[name]
        problems.append(f"missing on disk: {name} (model expects {tuple(x.shape)} {jnp.dtype(x.dtype).name})")
    for name in sorted(set(on_disk) - set(expected)):
        shape, dt = on_disk[name]
        problems.append(f"extra on disk (not in the model): {name} (found {shape} {dt.name})")
    for name in sorted(set(expected) & set(on_disk)):
        x, (shape, dt) = expected[name], on_disk[name]
        if tuple(x.shape) != shape:
            problems.append(f"shape mismatch: {name} expected {tuple(x.shape)}, found {shape}")
        elif jnp.issubdtype(x.dtype, jnp.floating) != jnp.issubdtype(dt, jnp.floating):
            problems.append(f"dtype mismatch: {name} expected {jnp.dtype(x.dtype).name}, found {dt.name}")
    if problems:
        raise ParamMismatchError(
            f"{path}: parameters on disk do not match model {model.spec.name} ({model.config}):\n  "
            + "\n  ".join(problems)
        )


def restore_params(
    path: str | os.PathLike,
    model: FlaxModel,
    mesh: jax.sharding.Mesh | None = None,
    rules: ShardingRules | None = None,
    dtype: Any = None,
    verify: bool = True,
) -> Any:
    """Restores DIR/params straight into the model's shardings; returns the nested param dict.

    Each device reads only its own slice (the Orbax target carries a NamedSharding per leaf).
    Floating leaves come back in `dtype` (default: the saved dtype; a `jinfer.precision.Precision`
    restores matrices and the other leaves in two dtypes); integer leaves unchanged.
    With `verify`, every file under params/ is re-hashed first (see `verify_files`).
    `mesh=None` restores onto a 1x1 mesh on the default device.

    Raises CheckpointNotFoundError / IncompleteCheckpointError / CorruptCheckpointError /
    ParamMismatchError, each naming the path.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    _check_complete(path)
    integrity = _load_integrity(path)
    if verify:
        verify_files(path, integrity)
    on_disk = _disk_metadata(path)
    recorded = {
        n: (tuple(r["shape"]), np.dtype(jnp.dtype(r["dtype"]))) for n, r in integrity["arrays"].items()
    }
    if recorded != on_disk:
        raise CorruptCheckpointError(
            f"{path}: {INTEGRITY_FILE} and the Orbax metadata under {PARAMS_DIR}/ disagree on the arrays "
            f"(names/shapes/dtypes); the directory was modified after the save"
        )
    abstract = model.abstract_params()
    expected = flatten_params(abstract)
    _check_params_match(path, model, expected, on_disk)
    mesh = single_device_mesh() if mesh is None else mesh
    shardings = flatten_params(model.shardings(mesh, rules))
    matrices = flatten_params(model.weight_matrices())
    target = {}
    for name, x in expected.items():
        saved = on_disk[name][1]
        floating = jnp.issubdtype(saved, jnp.floating)
        dt = precision.leaf_dtype(dtype, matrices[name], saved) if floating else saved
        target[name] = jax.ShapeDtypeStruct(x.shape, jnp.dtype(dt), sharding=shardings[name])
    try:
        with ocp.StandardCheckpointer() as ckptr:
            flat = ckptr.restore(path / PARAMS_DIR, target)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{path}: a parameter file is missing: {_short(e)}") from e
    except Exception as e:  # truncated files surface as bare Exceptions from TensorStore
        interrupt = _interrupt_in(e)
        if interrupt is not None:  # Ctrl-C during the restore, wrapped by Orbax: not damage
            raise interrupt from None
        raise CorruptCheckpointError(
            f"{path}: cannot read the parameters under {PARAMS_DIR}/ (damaged or truncated data file; "
            f"run with verify=True to find which): {_short(e)}"
        ) from e
    return _unflatten_like(flat, abstract)


def _interrupt_in(error: BaseException) -> BaseException | None:
    """The KeyboardInterrupt (or SystemExit) somewhere in `error`'s cause/context chain, if any."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def load_model_dir(
    path: str | os.PathLike,
    mesh: jax.sharding.Mesh | None = None,
    rules: ShardingRules | None = None,
    dtype: Any = None,
    verify: bool = True,
) -> tuple[FlaxModel, Any, dict[str, Any]]:
    """`load_config` + `restore_params`: returns (FlaxModel, params, config.json dict)."""
    spec, config, meta = load_config(path)
    model = FlaxModel(spec, config, meta.get("quantization"))
    return model, restore_params(path, model, mesh, rules, dtype, verify), meta


# -- inspecting ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One saved array: path, shape, dtype, bytes, logical axes, and bytes per device on a mesh."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    logical_axes: tuple[str | None, ...] | None  # None: the model has no such parameter
    partition: str | None = None  # PartitionSpec on the mesh, e.g. "(None, 'model')"
    per_device_bytes: int | None = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class ModelDirInfo:
    """What `inspect_model_dir` prints; computed without reading any array."""

    path: str
    model_class: str
    framework: str
    task: str
    dtype: str
    params: tuple[ParamInfo, ...]
    mesh: dict[str, int] | None = None
    source: str | None = None  # the checkpoint's family, e.g. "Qwen2ForCausalLM (qwen2, from gguf)"

    @property
    def param_count(self) -> int:
        return sum(p.size for p in self.params)

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.params)

    @property
    def per_device_bytes(self) -> int | None:
        if self.mesh is None:
            return None
        return sum(p.per_device_bytes or 0 for p in self.params)

    def render(self) -> str:
        """Human-readable table: one line per array, then the totals."""
        lines = [
            f"model dir: {self.path}",
            f"model_class: {self.model_class} ({self.framework}, {self.task})  dtype: {self.dtype}",
        ]
        if self.source:
            lines.append(f"converted from: {self.source}")
        mesh_text = None
        if self.mesh is not None:
            mesh_text = ",".join(f"{k}={v}" for k, v in self.mesh.items())
            lines.append(f"mesh: {mesh_text} ({math.prod(self.mesh.values())} devices)")
        header = ["path", "shape", "dtype", "bytes", "logical axes"]
        rows = []
        for p in self.params:
            axes = "(not in model)" if p.logical_axes is None else str(p.logical_axes)
            row = [p.path, str(p.shape), p.dtype, str(p.nbytes), axes]
            if self.mesh is not None:
                row += [str(p.partition), str(p.per_device_bytes)]
            rows.append(row)
        if self.mesh is not None:
            header += ["partition", "bytes/device"]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        lines.append(
            f"total: {len(self.params)} arrays, {self.param_count} params, {self.total_bytes} bytes "
            f"({_human(self.total_bytes)})"
        )
        if self.mesh is not None:
            per_device = self.per_device_bytes
            lines.append(f"per device on mesh {mesh_text}: {per_device} bytes ({_human(per_device)})")
        experts = [p for p in self.params if p.logical_axes and p.logical_axes[0] == "expert"]
        if experts:
            total = sum(p.nbytes for p in experts)
            text = f"expert weights: {len(experts)} arrays, {total} bytes ({_human(total)})"
            if self.mesh is not None:
                mine = sum(p.per_device_bytes or 0 for p in experts)
                text += f"; per device on mesh {mesh_text}: {mine} bytes ({_human(mine)})"
            lines.append(text)
        return "\n".join(lines)


def _human(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


def _abstract_mesh(mesh_spec: str | Mapping[str, int]) -> jax.sharding.AbstractMesh:
    """A device-free mesh with these axis sizes; -1 takes all this process's devices."""
    axes = parse_mesh_spec(mesh_spec)
    if -1 in axes.values():
        known = math.prod(v for v in axes.values() if v != -1)
        axes = {k: (max(jax.device_count() // known, 1) if v == -1 else v) for k, v in axes.items()}
    return jax.sharding.AbstractMesh(tuple(axes.values()), tuple(axes))


def describe_model_dir(
    path: str | os.PathLike,
    mesh_spec: str | Mapping[str, int] | None = None,
    rules: ShardingRules | None = None,
) -> ModelDirInfo:
    """Structured form of `inspect_model_dir`: shapes/dtypes from integrity.json, axes from the model."""
    path = Path(path).absolute()
    spec, config, meta = load_config(path)
    arrays = _load_integrity(path)["arrays"]
    axes_by_path = flatten_params_axes(FlaxModel(spec, config, meta.get("quantization")).logical_axes())
    rules = rules or ShardingRules()
    mesh = None if mesh_spec is None else _abstract_mesh(mesh_spec)
    infos = []
    for name, rec in arrays.items():
        shape, dt = tuple(rec["shape"]), jnp.dtype(rec["dtype"])
        nbytes = math.prod(shape) * dt.itemsize
        axes = axes_by_path.get(name)
        partition = per_device = None
        if mesh is not None:
            pspec = rules.spec(axes if axes is not None else (None,) * len(shape), shape, mesh, name)
            split = math.prod(mesh.shape[a] for e in pspec if e for a in ((e,) if isinstance(e, str) else e))
            partition, per_device = str(tuple(pspec)), nbytes // split
        infos.append(ParamInfo(name, shape, dt.name, nbytes, axes, partition, per_device))
    return ModelDirInfo(
        path=str(path),
        model_class=spec.name,
        framework=spec.framework,
        task=spec.task,
        dtype=str(meta.get("dtype")),
        params=tuple(infos),
        mesh=None if mesh is None else dict(mesh.shape),
        source=_source_text(meta),
    )


def _source_text(meta: Mapping[str, Any]) -> str | None:
    """ "Qwen2ForCausalLM (qwen2, from gguf)" from config.json's conversion record, if any."""
    source = meta.get("source")
    if not isinstance(source, Mapping) or not source.get("architecture"):
        return None
    detail = [str(source["model_type"])] if source.get("model_type") else []
    if meta.get("source_format"):
        detail.append(f"from {meta['source_format']}")
    return f"{source['architecture']} ({', '.join(detail)})" if detail else str(source["architecture"])


def flatten_params_axes(axes_tree: Any) -> dict[str, tuple[str | None, ...]]:
    """Flattens a tree of logical-axes tuples (tuples are leaves) to {"a/b/0/c": axes}."""
    leaves = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=lambda x: isinstance(x, tuple))[0]
    return {path_str(p): tuple(a) for p, a in leaves}


def inspect_model_dir(path: str | os.PathLike, mesh_spec: str | None = None) -> str:
    """Text report of a model directory: parameter tree (path, shape, dtype, bytes), totals, and
    bytes per device when `mesh_spec` (e.g. "data=2,model=4") is given. Reads no array data, and
    needs no devices for the mesh (the per-device numbers come from the sharding rules)."""
    return describe_model_dir(path, mesh_spec).render()
