"""Compatibility names: the generation runtime lives in `jinfer.runtime` (see its modules)."""

from jinfer.runtime.config import GenerationConfig
from jinfer.runtime.runner import DecodeState, ModelRunner
from jinfer.runtime.scheduler import Request, RequestDelta
from jinfer.runtime.stats import GenerationStats

__all__ = ["DecodeState", "GenerationConfig", "GenerationStats", "ModelRunner", "Request", "RequestDelta"]
