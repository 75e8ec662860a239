"""jinfer: JAX/XLA inference for Flax models.

Orbax restore onto device meshes, sharded jit per static bucket, request batching, and LLM
generation (KV cache, continuous batching, sampling, scoring, embeddings).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names -> defining module. Imported lazily so `import jinfer` stays cheap and the CLI
# only pays for what a command uses.
_EXPORTS = {
    "make_mesh": "jinfer.sharding",
    "ShardingRules": "jinfer.sharding",
    "Buckets": "jinfer.buckets",
    "choose_buckets": "jinfer.buckets",
    "Engine": "jinfer.engine",
    "enable_compilation_cache": "jinfer.compile",
    "count_compiles": "jinfer.compile",
    "FlaxModel": "jinfer.modeling",
    "save_model_dir": "jinfer.checkpoint",
    "load_model_dir": "jinfer.checkpoint",
    "restore_params": "jinfer.checkpoint",
    "inspect_model_dir": "jinfer.checkpoint",
    "restore_checkpoint": "jinfer.training_checkpoint",
    "load_variables": "jinfer.training_checkpoint",
    "LLM": "jinfer.llm",
    "SamplingParams": "jinfer.sampling",
    "GenerationConfig": "jinfer.generate",
    "RequestDelta": "jinfer.runtime",
    "RequestHandle": "jinfer.runtime",
    "RequestOutput": "jinfer.runtime",
    "Embedder": "jinfer.embed",
    "Tokenizer": "jinfer.tokenizer",
    "convert": "jinfer.convert",
    "resolve_model": "jinfer.hub",
    "run_batch": "jinfer.batch",
    "register_model": ("jinfer.models.registry", "register"),
    "ModelSpec": "jinfer.models.registry",
}

__all__ = sorted([*_EXPORTS, "errors"])


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        if name == "errors":
            return importlib.import_module("jinfer.errors")
        raise AttributeError(f"module 'jinfer' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
