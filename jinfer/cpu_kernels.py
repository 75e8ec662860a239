"""jinfer's own XLA:CPU kernels (`jinfer/csrc/cpu_kernels.cc`), called through the XLA FFI.

- `bf16_matvec`: the products of a one-row decode step (one request decoding alone) with
  bfloat16 output-major weights under float32 compute. XLA:CPU runs those at 10-16 GB/s of
  weight bytes (its YNNPACK kernels are built for many rows); this one reads each weight row
  once with AVX512-BF16 dot products split over XLA's intra-op threads, prefetching the rows
  ahead (~31 GB/s over a step's products on a 2-core Xeon VM).
- `decode_attention`: one query token per row over the blocked float32 KV cache, read in place
  (XLA:CPU copies each cache block before its fused products), one task per row and kv head.

BENCHMARKS.md, "jinfer's CPU kernels", has the measurements.

The source ships with the package and is compiled on first use with the system's C++ compiler
(`$CXX`, else `c++`/`g++`/`clang++`) into `$JINFER_HOME/kernels/<digest>/` (or
`$JINFER_KERNELS_DIR/<digest>/`; the digest covers the source, jaxlib's version, the compiler and
its flags), then loaded and registered with
`jax.ffi`. Each load marks its build as used (the directory's mtime); making a new build removes
the others in the same directory not used for `UNUSED_DAYS` days (each jinfer or jaxlib upgrade
makes a new one). Nothing is compiled at install time, and every failure (no compiler, a CPU without
AVX512_BF16, a compile error) leaves the kernels off with one log line: the programs then use
XLA's own programs, as before. `JINFER_CPU_KERNELS=0` turns them off.

A program uses them only when traced under `enabled(True)`: `jinfer.runtime.runner.Runner`
does so for engines on one CPU device (a custom call is not partitioned across a mesh), and puts
that choice in the key of its cached programs.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cc"
MATVEC_TARGET = "jinfer_bf16_matvec"
ATTENTION_TARGET = "jinfer_decode_attention"
TARGETS = (MATVEC_TARGET, ATTENTION_TARGET)
MAX_GROUP = 16  # query heads per kv head the attention kernel takes (kMaxGroup)
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-mfma")
CPU_FEATURES = ("avx512f", "avx512bw", "avx512_bf16")
# Rows up to which the products use the kernel: over a whole step's products 1.89x XLA:CPU at one
# row, 1.06x at 4 and 1.03x at 8, where its dot products bind it (`scripts/bench_matvec.py --kernel`).
MATVEC_MAX_ROWS = 1
ENV = "JINFER_CPU_KERNELS"
DIR_ENV = "JINFER_KERNELS_DIR"  # where builds go (default $JINFER_HOME/kernels)
UNUSED_DAYS = 30  # a new build removes the other builds not loaded for this long
_DIGEST_CHARS = 16  # a build directory's name: this many hex digits of its digest

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("jinfer_cpu_kernels", default=False)


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _cpu_supported() -> bool:
    from jinfer.precision import cpu_flags

    return sys.platform == "linux" and cpu_flags().issuperset(CPU_FEATURES)


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used here (None: they can): the env switch, the CPU, the compiler."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{ENV}={os.environ[ENV]}"
    if not _cpu_supported():
        return f"the CPU lacks one of {', '.join(CPU_FEATURES)} (or this is not Linux)"
    if _compiler() is None:
        return "no C++ compiler found ($CXX, c++, g++, clang++)"
    return None


def _build_dir(compiler: str) -> Path:
    """$JINFER_KERNELS_DIR (else $JINFER_HOME/kernels)/<digest of the source, jaxlib, the compiler
    binary and the flags>."""
    import jaxlib

    from jinfer.hub import jinfer_home

    binary = Path(compiler).resolve()
    stat = binary.stat()  # the compiler as installed (a stat, not a `--version` process per start)
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jaxlib.__version__, str(binary), stat.st_size, stat.st_mtime_ns, FLAGS):
        h.update(part if isinstance(part, bytes) else repr(part).encode())
    root = Path(os.environ[DIR_ENV]).expanduser() if os.environ.get(DIR_ENV) else jinfer_home() / "kernels"
    return root / h.hexdigest()[:_DIGEST_CHARS]


def _build(compiler: str) -> Path:
    """The compiled library, built once per digest (atomically: concurrent processes may race)."""
    import jax.ffi

    out_dir = _build_dir(compiler)
    lib = out_dir / "libjinfer_cpu_kernels.so"
    if lib.is_file():
        with contextlib.suppress(OSError):  # a read-only shared directory: no mark, still usable
            os.utime(out_dir)  # in use: `_trim` keeps it
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("jinfer: compiling CPU kernels (%s, once per machine) into %s", SOURCE.name, out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_lib = Path(tmp) / lib.name
        cmd = [compiler, *FLAGS, "-w", f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(tmp_lib)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        os.replace(tmp_lib, lib)
    _trim(out_dir)
    return lib


def _trim(keep: Path) -> None:
    """Removes the builds beside `keep` (digest-named directories) not loaded for UNUSED_DAYS."""
    cutoff = time.time() - UNUSED_DAYS * 86400
    digest = re.compile(f"[0-9a-f]{{{_DIGEST_CHARS}}}")
    for build in keep.parent.iterdir():
        with contextlib.suppress(OSError):  # another process's trim, a permission: leave it
            if build != keep and digest.fullmatch(build.name) and build.stat().st_mtime < cutoff:
                shutil.rmtree(build)
                log.info("jinfer: removed CPU kernel build %s (not used for %d days)", build, UNUSED_DAYS)


_LOCK = threading.Lock()


def available() -> bool:
    """True once the kernels are compiled, loaded and registered with jax.ffi (once a process;
    thread-safe: an engine's prefetch thread and its constructor may ask at the same time)."""
    with _LOCK:
        return _load()


@functools.cache
def _load() -> bool:
    import jax.ffi

    reason = unavailable_reason()
    if reason is None:
        try:
            library = ctypes.cdll.LoadLibrary(str(_build(_compiler())))
            for target, symbol in (
                (MATVEC_TARGET, "JinferBf16Matvec"),
                (ATTENTION_TARGET, "JinferDecodeAttention"),
            ):
                jax.ffi.register_ffi_target(
                    target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
                )
            return True
        except Exception as e:  # any failure: XLA's own kernels, as before
            reason = f"{type(e).__name__}: {e}"
    log.info("jinfer: CPU kernels off (%s); XLA:CPU's own products are used", reason)
    return False


def active() -> bool:
    """True while tracing a program that may call the kernels (`enabled(True)`)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Programs traced inside may (on) or may not call the kernels."""
    token = _ACTIVE.set(bool(on))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def tracing_with(fn: Callable, on: bool) -> Callable:
    """`fn` traced under `enabled(on)`, whichever thread traces it (prefetch threads do).

    A new function object each call, on purpose: `jax.jit` caches traces by function and
    arguments, not by this context, so jitting the same `fn` once with and once without the
    kernels would otherwise reuse the first trace."""

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with enabled(on):
            return fn(*args, **kwargs)

    return traced


def wanted(mesh: Any) -> bool:
    """Whether an engine on `mesh` should use the kernels: one CPU device, and they are available."""
    return not_wanted_reason(mesh) is None


def not_wanted_reason(mesh: Any) -> str | None:
    """Why an engine on `mesh` does not use the kernels (None: it does)."""
    devices = list(mesh.devices.flat) if mesh is not None else []
    if not devices or devices[0].platform != "cpu":
        return f"backend {devices[0].platform if devices else 'unknown'}: XLA's own kernels"
    if len(devices) > 1:
        return f"a mesh of {len(devices)} devices (a custom call is not partitioned)"
    if not available():
        return unavailable_reason() or "they failed to build (see the log)"
    return None


def engine_choice(mesh: Any) -> tuple[str, str]:
    """(value, reason) for `LLM.engine_choices.cpu_kernels`."""
    reason = not_wanted_reason(mesh)
    if reason is None:
        return "on", (
            "one CPU device with AVX512_BF16: jinfer's decode attention, and its products for one "
            "row with bfloat16 weights (JINFER_CPU_KERNELS=0: off)"
        )
    return "off", reason


def matvec_applies(x: Any, w: Any, preferred_element_type: Any = None) -> bool:
    """Whether `bf16_matvec(x, w)` serves x [..., c] @ w[k, c].T (a float32 result) in the
    program being traced."""
    import jax.numpy as jnp

    rows = x.size // max(x.shape[-1], 1)
    return (
        active()
        and w.ndim == 2
        and w.dtype == jnp.bfloat16
        and x.dtype == jnp.float32
        and preferred_element_type in (None, jnp.float32)
        and 0 < rows <= MATVEC_MAX_ROWS
    )


def bf16_matvec(x: Any, w: Any) -> Any:
    """x [..., c] float32 @ w [k, c].T bfloat16 -> [..., k] float32: x rounded to bfloat16, the
    products accumulated in float32 (jinfer's mixed product; sums in another order)."""
    import jax

    out = jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[0]), x.dtype)
    return jax.ffi.ffi_call(MATVEC_TARGET, out)(x, w)


def attention_applies(q: Any, cache_k: Any, cache_v: Any) -> bool:
    """Whether `decode_attention` serves one query token per row (q [b, 1, n, h]) over these
    caches in the program being traced."""
    import jax.numpy as jnp

    kv_heads = cache_k.shape[2]
    return (
        active()
        and q.ndim == 4
        and q.shape[1] == 1
        and cache_k.dtype == cache_v.dtype == jnp.float32
        and q.shape[2] % kv_heads == 0
        and q.shape[2] // kv_heads <= MAX_GROUP
    )


def decode_attention(
    q32: Any, cache_k: Any, cache_v: Any, positions: Any, rows: Any, softcap: float | None, window: int | None
) -> Any:
    """q32 [b, k, g, h] float32 (scaled), cache_k [nb, c, k, h, l], cache_v [nb, c, k, l, h],
    positions [b] (negative: padding, zeros out), rows [b] (the cache row of each query row) ->
    [b, k, g, h]: softmax(softcap(q . keys[start .. p])) . values, per row in float32."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    out = jax.ShapeDtypeStruct(q32.shape, jnp.float32)
    return jax.ffi.ffi_call(ATTENTION_TARGET, out)(
        q32,
        cache_k,
        cache_v,
        positions.astype(jnp.int32),
        rows.astype(jnp.int32),
        softcap=np.float32(softcap or 0.0),
        window=np.int64(window or 0),
    )
