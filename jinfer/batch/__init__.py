"""Offline batch runs: JSONL in, JSONL out, exactly once through crashes, across processes.

`run_batch(llm_or_model, input, output, defaults=SamplingParams(...), **BatchOptions)` and the
`jinfer run-batch` / `jinfer merge` commands; `ray=RayOptions(...)` runs on Ray replicas
(`jinfer.batch.ray`). See `jinfer.batch.runner` for the flow,
`jinfer.batch.files` for the on-disk guarantees and `jinfer.batch.records` for the row formats.
"""

from jinfer.batch.command import add_run_batch_args, init_distributed, run_batch_from_args
from jinfer.batch.files import CorruptOutputError, DuplicateIdError, ManifestMismatchError, merge_shards
from jinfer.batch.ray import RayOptions, ReplicaLostError
from jinfer.batch.runner import BatchOptions, Summary, run_batch

__all__ = [
    "BatchOptions",
    "CorruptOutputError",
    "DuplicateIdError",
    "ManifestMismatchError",
    "RayOptions",
    "ReplicaLostError",
    "Summary",
    "add_run_batch_args",
    "init_distributed",
    "merge_shards",
    "run_batch",
    "run_batch_from_args",
]
