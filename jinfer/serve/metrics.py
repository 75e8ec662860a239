"""Prometheus metrics of `jinfer serve` (one registry per server, text format at GET /metrics)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily

# Buckets in seconds: TTFT spans queueing (up to seconds), TPOT is per decode step (ms).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# runtime stats key -> (metric name, help)
_RUNTIME_GAUGES = {
    "queue_depth": ("jinfer_queue_depth", "Requests waiting for a decode slot."),
    "running": ("jinfer_requests_running", "Requests holding decode slots."),
    "cache_blocks_used": ("jinfer_kv_cache_blocks_used", "KV-cache blocks in use."),
    "cache_blocks_total": ("jinfer_kv_cache_blocks_total", "KV-cache blocks in all."),
    "prefix_cache_hit_rate": ("jinfer_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache."),
    "cache_blocks_evicted": ("jinfer_prefix_cache_blocks_evicted", "Prefix-cache blocks evicted so far."),
}


class _RuntimeCollector:
    """Gauges read from the runtime's `stats.summary()` at scrape time."""

    def __init__(self, summary: Callable[[], dict[str, Any] | None]):
        self._summary = summary

    def collect(self):
        stats = self._summary() or {}
        for key, (name, doc) in _RUNTIME_GAUGES.items():
            if stats.get(key) is not None:
                yield GaugeMetricFamily(name, doc, value=float(stats[key]))
        used, total = stats.get("cache_blocks_used"), stats.get("cache_blocks_total")
        if used is not None and total:
            yield GaugeMetricFamily(
                "jinfer_kv_cache_usage_ratio", "KV-cache blocks used / total.", value=used / total
            )


class ServerMetrics:
    """Counters and histograms the request handlers update."""

    def __init__(self, summary: Callable[[], dict[str, Any] | None]):
        disable_created_metrics()  # no `_created` series: one server per process, counters from 0
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "jinfer_requests", "HTTP requests by route and status code.", ["route", "status"], registry=r
        )
        self.finished = Counter(
            "jinfer_request_finish", "Finished generations by finish reason.", ["reason"], registry=r
        )
        self.prompt_tokens = Counter(
            "jinfer_prompt_tokens", "Prompt tokens of admitted requests.", registry=r
        )
        self.generated_tokens = Counter("jinfer_generation_tokens", "Generated tokens.", registry=r)
        self.ttft = Histogram(
            "jinfer_time_to_first_token_seconds", "Arrival to first token.", buckets=TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "jinfer_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request.",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram("jinfer_request_latency_seconds", "Arrival to last byte.", registry=r)
        r.register(_RuntimeCollector(summary))

    def render(self) -> bytes:
        return generate_latest(self.registry)
