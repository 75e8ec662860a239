"""Offline batch runs: JSONL in, JSONL out, exactly once through crashes, across processes.

`run_batch(llm_or_model, input, output, defaults=SamplingParams(...), **BatchOptions)` and the
`jinfer run-batch` / `jinfer merge` commands; `ray=RayOptions(...)` runs on Ray replicas
(`jinfer.batch.ray`). See `jinfer.batch.runner` for the flow,
`jinfer.batch.files` for the on-disk guarantees and `jinfer.batch.records` for the row formats.
"""

import importlib
from typing import Any

# Public names -> defining module, imported on first use: `jinfer run-batch --help` and the CLI's
# parser need only the flags (jinfer.batch.command), not JAX.
_EXPORTS = {
    "add_run_batch_args": "jinfer.batch.command",
    "init_distributed": "jinfer.batch.command",
    "run_batch_from_args": "jinfer.batch.command",
    "CorruptOutputError": "jinfer.batch.files",
    "DuplicateIdError": "jinfer.batch.files",
    "ManifestMismatchError": "jinfer.batch.files",
    "merge_shards": "jinfer.batch.files",
    "RayOptions": "jinfer.batch.ray",
    "ReplicaLostError": "jinfer.batch.ray",
    "BatchOptions": "jinfer.batch.runner",
    "Summary": "jinfer.batch.runner",
    "run_batch": "jinfer.batch.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jinfer.batch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
