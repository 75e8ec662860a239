"""Loading an engine's compiled programs while its checkpoint is restored (warm starts).

On a warm start (the executables are in the compilation cache directory, see
`jinfer.compile.CachedLowering`), the programs a first request needs (first-token sampler,
prefill chunks, decode) are deserialized in a background thread while the main thread restores
and lays out the weights; the engine then takes them from `jinfer.compile`'s hand-off instead of
loading them after the restore. Only executables already on disk are loaded: nothing is traced or
compiled here, so a cold start does no extra work. Everything is keyed exactly as the engine keys
it; a program prefetched under another key is simply not used (the engine loads its own).
`LLM` stops the loader (`Prefetch.stop`) before its constructor returns: no loading goes on behind
a request, and a loaded executable never lands inside a caller's `count_compiles()` block.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import jax
from jax.sharding import Mesh

from jinfer import compile as compile_lib
from jinfer.modeling import FlaxModel
from jinfer.runtime.config import GenerationConfig
from jinfer.runtime.runner import ModelRunner
from jinfer.sharding import ShardingRules, single_device_mesh

log = logging.getLogger(__name__)


class _ProgramLoader(ModelRunner):
    """A ModelRunner over abstract params that only loads executables: it holds no KV cache."""

    def _zero_cache(self) -> Any:
        return self._abstract_cache


# The first token, the largest prefill chunk and the smallest decode bucket: any first request
# needs them, so `stop()` lets them finish; it skips the rest.
FIRST_REQUEST_PROGRAMS = 3


class Prefetch:
    """The background loader started by `start`; `stop()` ends it once the programs every first
    request needs are loaded (`FIRST_REQUEST_PROGRAMS`) and joins its thread. What it loaded
    stays handed off to the engine."""

    def __init__(self, *args: Any):
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=_load, args=(*args, self._stopping), name="jinfer-prefetch")
        self.thread.daemon = True
        self.thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.thread.join()


def start(
    model: FlaxModel,
    config: GenerationConfig,
    mesh: Mesh | None,
    rules: ShardingRules | None,
    layout: str,
    dtype: Any,
    one_row: bool,
) -> Prefetch | None:
    """Starts loading the cached executables of the engine `LLM` will build (`one_row`: with a
    one-row decode copy); None when there is nothing to gain (no compilation cache, several
    processes)."""
    if compile_lib._exports_dir() is None or jax.process_count() > 1:
        return None
    return Prefetch(model, config, mesh, rules, layout, dtype, one_row)


def _load(model, config, mesh, rules, layout, dtype, one_row: bool, stopping: threading.Event) -> None:
    from jinfer import loading, quant

    try:
        with compile_lib.prefetching():
            mesh = mesh or single_device_mesh()
            narrow = quant.has_narrow_weights(loading.abstract_params(model, mesh, rules, dtype))
            transposed = (
                loading.wants_out_major(layout, model, config.max_batch, narrow) and not model.transposed
            )
            if transposed:
                model = model.out_major()
            params = loading.abstract_params(model, mesh, rules, dtype)
            if transposed:  # as loading.to_out_major leaves them
                params = loading.widen_narrow_weights(params)
            row = None
            if one_row:
                row_params = loading.abstract_params(model.out_major(), mesh, rules, dtype)
                row = (model.out_major(), loading.widen_narrow_weights(row_params))
            runner = _ProgramLoader(model, params, config, mesh=mesh, rules=rules, one_row=row)
            chunks = sorted(config.prefill_chunk_buckets, reverse=True)  # chat prompts fill the largest
            decode = runner.decode_buckets  # a lone request decodes at the smallest
            builds = [runner._first_token_exe, lambda: runner._prefill_exe(chunks[0])]
            builds += [lambda: runner._decode_exe(decode[0])]
            builds += [lambda b=b: runner._prefill_exe(b) for b in chunks[1:]]
            builds += [lambda b=b: runner._decode_exe(b) for b in decode[1:]]
            for i, build in enumerate(builds):
                if stopping.is_set() and i >= FIRST_REQUEST_PROGRAMS:
                    return
                try:
                    build()
                except compile_lib.NotCachedError:
                    continue
    except Exception as e:  # prefetching is an optimisation: the engine loads what is missing
        log.debug("jinfer: prefetching executables stopped (%s: %s)", type(e).__name__, e)
