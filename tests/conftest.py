"""Test setup: 8 simulated CPU devices (set before jax is imported anywhere)."""

import os
import signal

# A suite started in the background without job control (`nohup pytest &` in a script) inherits
# SIGINT ignored, and so would every command it starts; the interrupt tests send SIGINT to this
# process and to their commands and expect Python's default (KeyboardInterrupt).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# `jinfer generate` on a CPU-only machine keeps a worker for 5 minutes by default: the tests'
# commands (and notebooks) load in their own process unless a test asks for a worker
# (tests/test_keepalive.py tests the default itself).
os.environ.setdefault("JINFER_KEEP_ALIVE", "0")
# jinfer's CPU kernels are built once for the session, also for the tests (and their commands)
# that set a JINFER_HOME of their own (tests/test_cpu_kernels.py tests the default location).
if "JINFER_KERNELS_DIR" not in os.environ:
    from pathlib import Path

    _home = os.environ.get("JINFER_HOME")
    if _home:
        os.environ["JINFER_KERNELS_DIR"] = str(Path(_home).expanduser().absolute() / "kernels")

import jax

jax.config.update("jax_enable_x64", False)

import pytest  # noqa: E402

_CACHE_OPTIONS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


@pytest.fixture(autouse=True)
def _restore_compilation_cache():
    """A test that turns on a compilation cache (e.g. an in-process `jinfer.cli.main`, which
    defaults to the user's cache directory) must not switch it on for the tests after it."""
    from jinfer import compile as compile_lib

    before = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    max_bytes = compile_lib._MAX_BYTES
    yield
    compile_lib._MAX_BYTES = max_bytes
    if any(getattr(jax.config, name) != value for name, value in before.items()):
        from jax.experimental.compilation_cache import compilation_cache

        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
