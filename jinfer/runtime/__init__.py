"""The generation runtime, one job per module:

config.py        GenerationConfig: what gets compiled, and the runtime's budgets
runner.py        ModelRunner: compiled programs (prefill chunk, first token, decode, copies, score)
prefix_cache.py  block-hash chain and LRU index of cached prompt blocks
kv_cache.py      KVCacheManager: decode slots, prefix-cache blocks, prefill through them
scheduler.py     Scheduler: waiting / running requests, admission, stop, finish; step() -> deltas
loop.py          EngineLoop: the background thread driving step(); RequestHandle
stats.py         GenerationStats: compiles, tokens, cache hits, queue gauges
"""

from jinfer.runtime.config import GenerationConfig
from jinfer.runtime.loop import EngineLoop, RequestHandle
from jinfer.runtime.outputs import CompletionOutput, RequestOutput, ScoreOutput
from jinfer.runtime.runner import DecodeState, ModelRunner
from jinfer.runtime.scheduler import Request, RequestDelta, Scheduler
from jinfer.runtime.stats import GenerationStats

__all__ = [
    "CompletionOutput",
    "DecodeState",
    "EngineLoop",
    "GenerationConfig",
    "GenerationStats",
    "ModelRunner",
    "Request",
    "RequestDelta",
    "RequestHandle",
    "RequestOutput",
    "Scheduler",
    "ScoreOutput",
]
