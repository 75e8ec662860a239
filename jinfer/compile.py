"""Compile accounting and the persistent compilation cache.

`COMPILES` counts real XLA backend compilations in this process by listening to the jax.monitoring
event '/jax/core/compile/backend_compile_duration' (jax/_src/dispatch.py, jax 0.10.2). The event
wraps `compile_or_get_cached`, so an executable loaded from the persistent cache is also counted
(it is cheap); `COMPILES.cache_hits` counts those loads separately. The counter is process-wide:
compiles in other threads (and eager jnp ops, which compile tiny kernels) are counted too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax

logger = logging.getLogger(__name__)

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_ENV_VAR = "JINFER_COMPILATION_CACHE"
MAX_BYTES_ENV_VAR = "JINFER_COMPILATION_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 4 * 2**30
_MAX_BYTES = DEFAULT_MAX_BYTES  # per store; set by enable_compilation_cache


class CompileCounter:
    """Thread-safe running totals of XLA compile events: `count`, `seconds`, `cache_hits`."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0
        self.seconds = 0.0
        self.cache_hits = 0
        self._thread = threading.local()  # cache hits of the current thread (see thread_cache_hits)

    def _on_duration(self, event: str, duration_secs: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with self._lock:
                self.count += 1
                self.seconds += float(duration_secs)

    def _on_event(self, event: str, **kwargs) -> None:
        if event == CACHE_HIT_EVENT:
            with self._lock:
                self.cache_hits += 1
            self._thread.hits = self.thread_cache_hits() + 1

    def thread_cache_hits(self) -> int:
        """XLA persistent-cache hits of compilations run by the calling thread."""
        return getattr(self._thread, "hits", 0)

    def record_load(self, seconds: float) -> None:
        """An executable deserialized from jinfer's executable cache: counted like a cache hit."""
        with self._lock:
            self.count += 1
            self.seconds += float(seconds)
            self.cache_hits += 1

    def snapshot(self) -> tuple[int, float, int]:
        """(count, seconds, cache_hits) read atomically."""
        with self._lock:
            return self.count, self.seconds, self.cache_hits


COMPILES = CompileCounter()
jax.monitoring.register_event_duration_secs_listener(COMPILES._on_duration)
jax.monitoring.register_event_listener(COMPILES._on_event)


class ExecutableCache:
    """Compiled executables by key (a bucket), each built once; shared by `Engine` and the runtime.

    `get(key, build)` returns the cached executable, or calls `build()` under a lock the first
    time (threads asking at once wait and reuse it; a `build` may itself call `get`). After each
    build `on_compile(key, seconds)` gets its wall time; every `get` then calls `on_hit(key)`.
    A failing `build` caches nothing, so the next `get` tries again.
    """

    def __init__(
        self,
        on_compile: Callable[[Any, float], None] | None = None,
        on_hit: Callable[[Any], None] | None = None,
    ):
        self._items: dict[Any, Any] = {}
        self._lock = threading.RLock()
        self._on_compile = on_compile
        self._on_hit = on_hit

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        exe = self._items.get(key)
        if exe is None:
            with self._lock:
                exe = self._items.get(key)
                if exe is None:
                    start = time.perf_counter()
                    exe = build()
                    seconds = time.perf_counter() - start
                    self._items[key] = exe
                    if self._on_compile is not None:
                        self._on_compile(key, seconds)
        if self._on_hit is not None:
            self._on_hit(key)
        return exe

    def __contains__(self, key: Any) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[Any]:
        """The keys built so far, in build order."""
        return list(self._items)


@dataclasses.dataclass
class CompileDelta:
    """Compile events since a start point; `count`/`seconds`/`cache_hits` are live properties."""

    _start: tuple[int, float, int]

    @property
    def count(self) -> int:
        return COMPILES.snapshot()[0] - self._start[0]

    @property
    def seconds(self) -> float:
        return COMPILES.snapshot()[1] - self._start[1]

    @property
    def cache_hits(self) -> int:
        return COMPILES.snapshot()[2] - self._start[2]


def compiles_since(start: tuple[int, float, int] | None = None) -> CompileDelta:
    """A delta from `start` (a `COMPILES.snapshot()`), or from now."""
    return CompileDelta(start if start is not None else COMPILES.snapshot())


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileDelta]:
    """Counts real XLA compiles inside the block: `with count_compiles() as c: ...; c.count`."""
    yield compiles_since()


def enable_compilation_cache(directory: str | os.PathLike, max_bytes: int | None = None) -> Path:
    """Turns on JAX's persistent compilation cache in `directory` (created if missing).

    Sets `jax_compilation_cache_dir` and caches every executable regardless of compile time or
    size (`jax_persistent_cache_min_compile_time_secs=0`, `..._min_entry_size_bytes=0`; the
    default 1 s threshold skips most CPU compiles). Each of the directory's three stores (XLA's
    executables, jinfer's executables and its traced programs) is kept under `max_bytes` (default
    $JINFER_COMPILATION_CACHE_MAX_BYTES, else 4 GiB; -1: unbounded), removing the least recently
    used entries first (XLA's: the oldest written, trimmed when the cache is turned on; jinfer's:
    after each store, a load counting as a use): every jinfer upgrade or model change adds entries.
    The cache directory is trusted code: do not share it with untrusted users. Returns the resolved
    directory.
    """
    global _MAX_BYTES
    path = Path(directory).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from jinfer.errors import ConfigError

        raise ConfigError(
            f"compilation cache directory {str(path)!r} cannot be created ({e.strerror or e}); give a "
            f"writable directory, or turn the cache off (--compilation-cache off, {CACHE_ENV_VAR} unset)"
        ) from None
    if max_bytes is None:
        max_bytes = _max_bytes_from_env()
    _MAX_BYTES = max_bytes
    # XLA's own entries (files at the top): trimmed here, oldest written first. jax's own limit
    # (`jax_compilation_cache_max_size`) is not used: in jax 0.10.2 it fails every write in a
    # directory whose entries were stored without it (they have no "-atime" files; jax#39880).
    trim_store(path, max_bytes)
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if previous and previous != str(path):
        # JAX opens the cache once; point it at the new directory.
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    logger.info("jinfer: persistent compilation cache at %s", path)
    return path


def _max_bytes_from_env() -> int:
    value = os.environ.get(MAX_BYTES_ENV_VAR)
    if value is None:
        return DEFAULT_MAX_BYTES
    try:
        return int(value)
    except ValueError:
        from jinfer.errors import ConfigError

        raise ConfigError(
            f"${MAX_BYTES_ENV_VAR}={value!r} is not a whole number of bytes "
            f"(e.g. {DEFAULT_MAX_BYTES}; -1: unbounded)"
        ) from None


def trim_store(directory: Path, max_bytes: int | None = None) -> int:
    """Removes the least recently used files of one of jinfer's cache stores until it holds at
    most `max_bytes` (default: the limit `enable_compilation_cache` set); returns bytes removed.
    Recency is the file's mtime, which a load refreshes."""
    max_bytes = _MAX_BYTES if max_bytes is None else max_bytes
    if max_bytes < 0:
        return 0
    entries, stale = [], time.time() - 3600  # a temporary file this old was left by a crash
    for path in directory.glob("*"):
        with contextlib.suppress(OSError):
            st = path.stat()
            if path.is_file() and (".tmp" not in path.suffix or st.st_mtime < stale):
                entries.append((st.st_mtime, st.st_size, path))
    total, removed = sum(e[1] for e in entries), 0
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        with contextlib.suppress(OSError):  # another process may have removed it
            path.unlink()
            removed += size
        total -= size
    return removed


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def maybe_enable_from_env() -> Path | None:
    """Enables the persistent cache at $JINFER_COMPILATION_CACHE if that variable is set."""
    directory = os.environ.get(CACHE_ENV_VAR)
    if not directory:
        return None
    if jax.config.jax_compilation_cache_dir == str(Path(directory).expanduser().resolve()):
        return Path(jax.config.jax_compilation_cache_dir)
    return enable_compilation_cache(directory)


# -- traced-program cache ---------------------------------------------------------------------------
# The persistent compilation cache skips XLA compilation but not Python tracing and lowering,
# which for a 30-layer model's prefill and decode cost more than the compile-cache loads (~3 s of
# a ~7 s warm CLI start). So next to it, jinfer keeps each program as a serialized `jax.export`
# artifact: a warm process deserializes it instead of tracing the model. Cold and warm processes
# both compile the exported program, so the compile cache hits. The key covers the function's
# identity (caller-supplied), the argument shapes, dtypes and shardings, the jax/jaxlib versions
# and a hash of jinfer's own sources, so a code change never reuses a stale program.
EXPORTS_SUBDIR = "jinfer-exports"
# ... and each compiled executable (`jax.experimental.serialize_executable`, loaded without
# lowering or hashing the HLO for the XLA cache key: on SmolLM2-135M's prefill, 0.33 s to load vs
# 0.96 s through lowering + XLA's cache on a loaded 2-core machine; the gain shrinks when idle).
# Its key adds what compilation depends on beyond the traced program: output shardings, compiler
# options, jaxlib, the backend and its devices, XLA_FLAGS and the host CPU.
EXECUTABLES_SUBDIR = "jinfer-executables"


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    h = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.cc")]):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _exports_dir() -> Path | None:
    directory = jax.config.jax_compilation_cache_dir
    return Path(directory) / EXPORTS_SUBDIR if directory else None


_SERIALIZABLE: list[type] = []
_INT_KEY = "#int:"


def export_serializable(cls: type) -> type:
    """Class decorator for a `jax.tree_util.register_dataclass` pytree without static fields
    (KVCache, DecodeState, ...): lets the traced-program cache serialize it."""
    _SERIALIZABLE.append(cls)
    return cls


@functools.lru_cache(maxsize=1)
def _register_serializable() -> None:
    from jax import export

    for cls in _SERIALIZABLE:
        export.register_pytree_node_serialization(
            cls,
            serialized_name=f"{cls.__module__}.{cls.__qualname__}",
            serialize_auxdata=lambda aux: b"",
            deserialize_auxdata=lambda data: (),
        )


def _map_keys(tree: Any, key_fn) -> Any:
    """`tree` with every dict key replaced by key_fn(key) (dicts inside tuples/lists too)."""
    if isinstance(tree, dict):
        return {key_fn(k): _map_keys(v, key_fn) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)) and not hasattr(tree, "_fields"):
        return type(tree)(_map_keys(v, key_fn) for v in tree)
    return tree


def _keys_to_str(tree: Any) -> Any:
    """jax.export serializes only string dict keys; params use ints for layer indices."""
    return _map_keys(tree, lambda k: f"{_INT_KEY}{k}" if isinstance(k, int) else k)


def _keys_from_str(tree: Any) -> Any:
    return _map_keys(
        tree, lambda k: int(k[len(_INT_KEY) :]) if isinstance(k, str) and k.startswith(_INT_KEY) else k
    )


def lower(
    fn: Any, args: tuple, *, identity: str, donate_argnums: tuple[int, ...] = (), out_shardings: Any = None
) -> Any:
    """`jax.jit(fn, ...).lower(*args)`, through the traced-program cache when the persistent
    compilation cache is on. `identity` must name everything `fn` closes over (model, config).
    Any failure of the cache path falls back to plain lowering.

    With the cache on, the result is lazy (`CachedLowering`): its `.compile()` first looks for the
    executable a previous process serialized, and only traces and lowers when there is none."""
    directory = _exports_dir()
    if directory is None:
        return jax.jit(fn, donate_argnums=donate_argnums, out_shardings=out_shardings).lower(*args)
    key = hashlib.sha256(
        repr((identity, args, donate_argnums, jax.__version__, _source_digest())).encode()
    ).hexdigest()[:32]
    if jax.process_count() > 1:  # executables spanning processes: XLA's cache only
        return _lower_exported(fn, args, key, donate_argnums, out_shardings)
    return CachedLowering(
        functools.partial(_lower_exported, fn, args, key, donate_argnums, out_shardings),
        key=f"{key}:{out_shardings!r}",
        directory=directory.parent / EXECUTABLES_SUBDIR,
    )


def _lower_exported(
    fn: Any, args: tuple, key: str, donate_argnums: tuple[int, ...], out_shardings: Any
) -> Any:
    """`jax.jit(fn).lower(*args)` through the `jax.export` artifact `key` (traced once, ever)."""
    jitted = jax.jit(fn, donate_argnums=donate_argnums, out_shardings=out_shardings)
    directory = _exports_dir()
    try:
        from jax import export

        from jinfer.cpu_kernels import TARGETS  # the custom calls jinfer registers itself

        _register_serializable()
        path = directory / f"{key}.jaxexport"
        exported = None
        if path.is_file():
            with contextlib.suppress(Exception):
                exported = export.deserialize(bytearray(path.read_bytes()))
        if exported is None:
            inner = jax.jit(
                lambda *a: fn(*_keys_from_str(a)), donate_argnums=donate_argnums, out_shardings=out_shardings
            )
            checks = [export.DisabledSafetyCheck.custom_call(t) for t in TARGETS]
            exported = export.export(inner, disabled_checks=checks)(*_keys_to_str(args))
            directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(exported.serialize())
            tmp.replace(path)
            trim_store(directory)
        else:
            _touch(path)

        def call_exported(*a):
            return exported.call(*_keys_to_str(a))

        # The key in the module name keeps XLA's cache key distinct per traced program, so a
        # program new to jinfer's executable cache is compiled for real (and then stored) rather
        # than loaded from XLA's cache, whose executables do not serialize again faithfully.
        call_exported.__name__ = call_exported.__qualname__ = f"jinfer_{key}"
        outer = jax.jit(call_exported, donate_argnums=donate_argnums, out_shardings=out_shardings)
        return outer.lower(*args)
    except Exception as e:  # the cache must never break compilation
        logger.warning("jinfer: traced-program cache unavailable (%s: %s); tracing", type(e).__name__, e)
        return jitted.lower(*args)


@functools.lru_cache(maxsize=1)
def _environment_digest() -> str:
    """What an executable depends on besides its program: jaxlib, backend, devices, flags, CPU."""
    import jaxlib

    cpu_flags = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu_flags = next((ln for ln in lines if ln.startswith(("flags", "Features"))), "")
    backend = jax.devices()[0].client
    material = (
        jaxlib.__version__,
        backend.platform,
        backend.platform_version,
        repr(jax.devices()),
        os.environ.get("XLA_FLAGS", ""),
        os.environ.get("LIBTPU_INIT_ARGS", ""),
        jax.config.jax_enable_x64,
        jax.config.jax_default_matmul_precision,
        cpu_flags,
    )
    return hashlib.sha256(repr(material).encode()).hexdigest()


class CachedLowering:
    """A lowering deferred until needed: `compile()` loads the executable serialized under this
    key by an earlier process, else lowers (`lower_fn()`), compiles and stores the executable.

    A missing, corrupt or unloadable file is compiled again and overwritten, never trusted
    blindly; like XLA's own cache, the directory holds machine code and must be trusted. Any other
    attribute (`as_text`, `cost_analysis`, ...) is the real `jax.stages.Lowered`'s.
    """

    def __init__(self, lower_fn: Callable[[], Any], *, key: str, directory: Path):
        self._lower_fn = lower_fn
        self._key = key
        self._directory = directory
        self._lowered = None

    def lowered(self) -> Any:
        """The `jax.stages.Lowered` (traced or read from the traced-program cache once)."""
        if self._lowered is None:
            self._lowered = self._lower_fn()
        return self._lowered

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lowered(), name)

    def _path(self, compiler_options: dict[str, Any] | None) -> Path:
        options = sorted((compiler_options or {}).items())
        material = repr((self._key, options, _environment_digest()))
        return self._directory / f"{hashlib.sha256(material.encode()).hexdigest()[:32]}.jaxexe"

    def compile(self, compiler_options: dict[str, Any] | None = None) -> Any:
        """The compiled executable: loaded from the executable cache, or compiled and stored.

        Inside `prefetching()` only an executable already on disk is loaded (else NotCachedError)
        and handed to the next `compile()` of the same program, in any thread."""
        path = self._path(compiler_options)
        if getattr(_PREFETCH, "active", False):
            return _prefetch_executable(path)
        with _HANDOFF_LOCK:
            future = _HANDOFF.pop(path, None)
        compiled = future.result() if future is not None else None
        if compiled is None:
            compiled = _load_executable(path)
        if compiled is not None:
            return compiled
        lowered = self.lowered()
        hits = COMPILES.thread_cache_hits()
        compiled = (
            lowered.compile(compiler_options=compiler_options) if compiler_options else lowered.compile()
        )
        # An executable XLA itself loaded from its cache does not serialize again faithfully on
        # XLA:CPU (measured: "Function ... not found" when the copy runs): store only real compiles.
        if COMPILES.thread_cache_hits() == hits:
            _store_executable(path, compiled)
        return compiled


class NotCachedError(LookupError):
    """Raised inside `prefetching()` for a program whose executable is not on disk yet."""


_PREFETCH = threading.local()
_HANDOFF: dict[Path, concurrent.futures.Future] = {}  # executables loaded ahead, by file
_HANDOFF_LOCK = threading.Lock()


@contextlib.contextmanager
def prefetching() -> Iterator[None]:
    """In this thread, `CachedLowering.compile()` loads cached executables ahead of their use
    (e.g. while the checkpoint is restored) and never traces or compiles. Loaded executables
    wait for the next `compile()` of the same program; leftovers of an earlier prefetch are dropped."""
    with _HANDOFF_LOCK:
        _HANDOFF.clear()
    _PREFETCH.active = True
    try:
        yield
    finally:
        _PREFETCH.active = False


def _prefetch_executable(path: Path) -> Any:
    if not path.is_file():
        raise NotCachedError(path.name)
    future: concurrent.futures.Future = concurrent.futures.Future()
    with _HANDOFF_LOCK:
        if path in _HANDOFF:
            return None
        _HANDOFF[path] = future
    compiled = None
    try:
        compiled = _load_executable(path)
    finally:
        future.set_result(compiled)  # a waiting compile() falls back to its own path on None
    return compiled


def _load_executable(path: Path) -> Any:
    if not path.is_file():
        return None
    import pickle

    from jax.experimental import serialize_executable

    start = time.perf_counter()
    try:
        serialized, in_tree, out_tree, device_ids = pickle.loads(path.read_bytes())
        by_id = {d.id: d for d in jax.devices()}
        # the devices it was compiled for, in order (by default all devices would be assumed)
        devices = [by_id[i] for i in device_ids]
        compiled = serialize_executable.deserialize_and_load(
            serialized, in_tree, out_tree, execution_devices=devices
        )
    except Exception as e:  # truncated, corrupt or from another jaxlib: compile again
        logger.warning("jinfer: cached executable %s unusable (%s); compiling", path.name, type(e).__name__)
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    COMPILES.record_load(time.perf_counter() - start)
    _touch(path)
    return compiled


def _store_executable(path: Path, compiled: Any) -> None:
    import pickle

    from jax.experimental import serialize_executable

    try:
        device_ids = [d.id for d in compiled._executable._unloaded_executable.device_list]
        data = pickle.dumps((*serialize_executable.serialize(compiled), device_ids))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(data)
        tmp.replace(path)
        trim_store(path.parent)
    except Exception as e:  # not serializable on this backend, disk full, ...: just not cached
        logger.info("jinfer: executable not cached (%s: %s)", type(e).__name__, e)
