"""Runtime accounting: compiles per executable, prompt padding, tokens, prefix cache, queues."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class GenerationStats:
    """Counters of one generation runtime.

    The runner records compiles and executable hits; the scheduler records tokens and the prefix
    cache's hits; `gauges` (set by the runtime) report live values: queue depth, running requests,
    cache blocks in use. Counters are written by the engine loop's thread only.
    """

    compile_seconds: dict[tuple, float] = dataclasses.field(default_factory=dict)
    hits: dict[tuple, int] = dataclasses.field(default_factory=dict)
    prompt_tokens: int = 0
    padded_prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_tokens_computed: int = 0
    prompt_tokens_cached: int = 0
    steps: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    requests_failed: int = 0
    decode_rounds: dict[int, int] = dataclasses.field(default_factory=dict)  # per decode bucket
    decode_rows_live: int = 0
    decode_rows_computed: int = 0
    slot_moves: int = 0
    decode_device_seconds: float = 0.0
    decode_host_seconds: float = 0.0
    gauges: Callable[[], dict[str, int]] | None = None
    choices: Any = None  # the engine's jinfer.defaults.EngineChoices (what was chosen and why)

    def record_compile(self, key: tuple, seconds: float) -> None:
        self.compile_seconds[key] = seconds

    def hit(self, key: tuple) -> None:
        self.hits[key] = self.hits.get(key, 0) + 1

    def record_padding(self, real: int, padded: int) -> None:
        self.prompt_tokens += real
        self.padded_prompt_tokens += padded

    def record_prompt(self, computed: int, cached: int) -> None:
        self.prompt_tokens_computed += computed
        self.prompt_tokens_cached += cached

    def record_decode_bucket(self, bucket: int, live: int) -> None:
        self.decode_rounds[bucket] = self.decode_rounds.get(bucket, 0) + 1
        self.decode_rows_live += live
        self.decode_rows_computed += bucket

    def record_decode_time(self, device: float, host: float) -> None:
        """Seconds of one decode round: waiting for the device program, and host work around it
        (state updates, logprob dicts, detokenization, stop strings, handing deltas over)."""
        self.decode_device_seconds += device
        self.decode_host_seconds += host

    @property
    def compiles(self) -> int:
        return len(self.compile_seconds)

    @property
    def compile_time(self) -> float:
        return sum(self.compile_seconds.values())

    @property
    def padding_efficiency(self) -> float:
        """Real prompt tokens / padded prompt tokens over all prefills (1.0 = no padding)."""
        return self.prompt_tokens / self.padded_prompt_tokens if self.padded_prompt_tokens else 1.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens taken from the prefix cache / all prompt tokens prefilled or reused."""
        total = self.prompt_tokens_computed + self.prompt_tokens_cached
        return self.prompt_tokens_cached / total if total else 0.0

    def summary(self) -> dict[str, Any]:
        # Copies first (one C call each, atomic under the GIL): the engine thread may add a key
        # (a decode bucket or executable used the first time) while another thread reads stats.
        rounds, hits = dict(self.decode_rounds), dict(self.hits)
        out = {
            "compiles": self.compiles,
            "compile_seconds": round(self.compile_time, 3),
            "padding_efficiency": round(self.padding_efficiency, 4),
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prompt_tokens_computed": self.prompt_tokens_computed,
            "prompt_tokens_cached": self.prompt_tokens_cached,
            "prefix_cache_hit_rate": round(self.prefix_cache_hit_rate, 4),
            "steps": self.steps,
            "requests_finished": self.requests_finished,
            "requests_aborted": self.requests_aborted,
            "requests_failed": self.requests_failed,
            "decode_rounds_per_bucket": dict(sorted(rounds.items())),
            "decode_row_occupancy": round(self.decode_rows_live / max(1, self.decode_rows_computed), 4),
            "slot_moves": self.slot_moves,
            "decode_host_ms_per_round": round(
                1e3 * self.decode_host_seconds / max(1, sum(rounds.values())), 3
            ),
            "decode_host_fraction": round(
                self.decode_host_seconds / max(1e-9, self.decode_host_seconds + self.decode_device_seconds), 4
            ),
            "executables": {"/".join(map(str, k)): v for k, v in hits.items()},
        }
        if self.gauges is not None:
            out.update(self.gauges())
        if self.choices is not None:
            out["engine"] = self.choices.as_dict()
        return out
