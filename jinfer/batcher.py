"""Real-time request batching: `engine.submit(example) -> Future`, served by one background thread.

Policy: requests wait in one bounded FIFO queue. The worker sends a device batch as soon as some
sequence bucket has `max_batch` requests waiting (a full largest batch bucket), or when the oldest
waiting request has waited `max_queue_delay_ms`; then it takes up to `max_batch` requests of the
oldest request's sequence bucket (FIFO) and pads them to the smallest compiled batch bucket. Each
device call therefore holds one sequence bucket and only compiled shapes.

Timeouts: `submit(example, timeout=s)` gives the request a deadline `s` seconds after submit. A
request that has not been *started* (taken into a device batch) by its deadline is never run and
its future fails with `TimeoutError` (the builtin, which is `concurrent.futures.TimeoutError`).
Expired requests are failed when the worker next looks at the queue, i.e. at most one device
batch after the deadline. A request started in time always completes with its result.

Closing: `close(drain=True)` stops new submits (EngineClosedError), runs every queued request
without waiting for the delay, and joins the worker; `close(drain=False)` cancels queued futures.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import weakref
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from jinfer.errors import ConfigError, EngineClosedError, OverloadedError

if TYPE_CHECKING:
    from jinfer.engine import Engine

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BatcherConfig:
    """Real-time batching knobs.

    Attributes:
      max_queue_delay_ms: longest time the oldest request waits for companions before its batch
        is sent even if not full.
      max_queue_size: requests waiting at most; submit beyond it raises OverloadedError.
    """

    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 1024

    def __post_init__(self):
        if self.max_queue_delay_ms < 0:
            raise ConfigError(f"BatcherConfig: max_queue_delay_ms={self.max_queue_delay_ms} must be >= 0")
        if self.max_queue_size < 1:
            raise ConfigError(f"BatcherConfig: max_queue_size={self.max_queue_size} must be >= 1")


@dataclasses.dataclass
class _Request:
    example: Any
    seq_len: int | None
    future: Future
    enqueued: float
    deadline: float | None


class Batcher:
    """Background batching thread in front of an Engine (created by `Engine.submit`).

    The thread refers to the engine weakly, and each Future it returns holds the engine: an
    engine nobody uses any more is collected (its finalizer stops this thread), while one whose
    results are still awaited stays alive (`Engine(...).submit(x).result()` works)."""

    def __init__(self, engine: Engine, config: BatcherConfig):
        self._engine = weakref.ref(engine)
        self._max_batch = engine.buckets.max_batch
        self.config = config
        self._queue: collections.deque[_Request] = collections.deque()
        self._waiting: collections.Counter = collections.Counter()  # seq bucket -> queued requests
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="jinfer-batcher", daemon=True)
        self._thread.start()

    def submit(self, example: Any, timeout: float | None = None) -> Future:
        """Validates `example` now (raising InputError) and queues it; returns its Future."""
        engine = self._engine()
        if engine is None:
            raise EngineClosedError("engine is closed; submit() accepts no more requests")
        x = engine.prepare_example(example, index="(submitted)")
        seq_len = engine.request_bucket(x)
        now = time.monotonic()
        future: Future = Future()
        future.engine = engine  # the engine outlives the requests its callers wait for
        request = _Request(x, seq_len, future, now, None if timeout is None else now + timeout)
        with self._cond:
            if self._closed:
                raise EngineClosedError("engine is closed; submit() accepts no more requests")
            if len(self._queue) >= self.config.max_queue_size:
                raise OverloadedError(
                    f"request queue is full ({self.config.max_queue_size} waiting); retry later or "
                    "raise BatcherConfig.max_queue_size"
                )
            self._queue.append(request)
            self._waiting[seq_len] += 1
            self._cond.notify()
        return request.future

    def close(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stops accepting requests; drains (runs) or cancels the queued ones; joins the worker."""
        with self._cond:
            self._closed = True
            if not drain:
                for request in self._queue:
                    request.future.cancel()
                self._queue.clear()
                self._waiting.clear()
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- worker ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)
            del batch  # its futures hold the engine: not while this thread waits for the next

    def _next_batch(self) -> list[_Request] | None:
        """Blocks until a batch is due; None when closed and nothing is left to run."""
        delay = self.config.max_queue_delay_ms / 1000.0
        max_batch = self._max_batch
        with self._cond:
            while True:
                self._expire(time.monotonic())
                if not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                full = [s for s, n in self._waiting.items() if n >= max_batch]
                waited = time.monotonic() - self._queue[0].enqueued
                if full or self._closed or waited >= delay:
                    seq_len = full[0] if full else self._queue[0].seq_len
                    return self._take(seq_len, max_batch)
                deadlines = [r.deadline for r in self._queue if r.deadline is not None]
                wake = min([delay - waited] + [d - time.monotonic() for d in deadlines])
                self._cond.wait(max(wake, 0.0))

    def _take(self, seq_len: int | None, limit: int) -> list[_Request]:
        taken, kept = [], collections.deque()
        for request in self._queue:
            if request.seq_len == seq_len and len(taken) < limit:
                taken.append(request)
            else:
                kept.append(request)
        self._queue = kept
        self._waiting[seq_len] -= len(taken)
        return taken

    def _expire(self, now: float) -> None:
        if not any(r.deadline is not None and r.deadline <= now for r in self._queue):
            return
        kept = collections.deque()
        for request in self._queue:
            if request.deadline is not None and request.deadline <= now:
                self._waiting[request.seq_len] -= 1
                if request.future.set_running_or_notify_cancel():
                    waited = now - request.enqueued
                    request.future.set_exception(
                        TimeoutError(f"request was not started within its timeout (waited {waited:.3f} s)")
                    )
            else:
                kept.append(request)
        self._queue = kept

    def _run(self, batch: list[_Request]) -> None:
        # set_running_or_notify_cancel drops requests the caller cancelled while they waited.
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        engine = live[0].future.engine  # alive: each Future holds it
        try:
            outputs = engine.run_batch([r.example for r in live], live[0].seq_len)
        except Exception as e:  # the error belongs to these requests' futures
            logger.exception("jinfer batcher: device batch failed")
            for r in live:
                r.future.set_exception(e)
            return
        for r, out in zip(live, outputs, strict=True):
            r.future.set_result(out)
