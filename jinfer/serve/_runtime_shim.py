"""TEMPORARY adapter: the runtime contract of issue 11 on top of today's `LLM` (delete at merge).

The server codes against the contract in the runtime issue (`llm.submit`, `RequestHandle`,
`llm.generate_async`, `handle.cancel`, `OverloadedError` when `max_queue` requests wait,
`llm.stats.summary()`). Until that runtime lands, `attach(llm, max_queue)` provides the same
surface with one worker thread that owns the LLM: waiting requests are taken as a group (up to
`max_batch` samples) and run to completion through `llm.engine.run_stream`; requests arriving
meanwhile wait for the next group (no admission mid-group: that is what the real runtime adds).
Cancel frees the request's slots at the next host sync.

MERGE(issue 11): delete this file and the fallback in `jinfer.serve.backend.start_runtime` (the
server then uses `LLM(max_queue=...)` itself, which it already does whenever the LLM has one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import queue
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from jinfer.errors import EngineClosedError, OverloadedError
from jinfer.llm import LLM, CompletionOutput, RequestOutput, _stop_prefix_len
from jinfer.sampling import SamplingParams


@dataclasses.dataclass
class RequestDelta:
    """New output of one sample since its previous delta (the contract's `jinfer.RequestDelta`)."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None


class _Handle:
    """The contract's RequestHandle: iterate deltas, `result()`, `cancel()`."""

    def __init__(self, prompt, ids, request, sink: Callable[[RequestDelta], None] | None):
        self.request_id = uuid.uuid4().hex
        self.prompt, self.prompt_token_ids, self.request = prompt, ids, request
        self.params: SamplingParams = request.params
        self.cancelled = False
        self._queue: queue.Queue = queue.Queue()
        self._sink = sink or self._queue.put
        self._samples = [{"ids": [], "lps": [], "text": "", "reason": None} for _ in range(self.params.n)]
        self._done = threading.Event()

    def __iter__(self):
        left = self.params.n
        while left:
            delta = self._queue.get()
            left -= delta.finish_reason is not None
            yield delta

    def cancel(self) -> None:
        self.cancelled = True

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        outs = [
            CompletionOutput(
                k, s["text"], s["ids"], s["reason"], s["lps"] if self.params.logprobs is not None else None
            )
            for k, s in enumerate(self._samples)
        ]
        return RequestOutput(self.prompt, self.prompt_token_ids, outs)

    def emit(self, k: int, ids: list[int], text: str, lps, reason: str | None) -> None:
        s = self._samples[k]
        if s["reason"] is not None:
            return
        s["ids"] += ids
        s["lps"] += lps or []
        s["text"] += text
        s["reason"] = reason
        self._sink(RequestDelta(k, ids, text, lps, reason))
        if all(x["reason"] is not None for x in self._samples):
            self._done.set()

    def abort_unfinished(self) -> None:
        for k in range(self.params.n):
            self.emit(k, [], "", None, "abort")


class _Stats:
    def __init__(self, runtime: _Runtime):
        self._runtime = runtime

    def summary(self) -> dict[str, Any]:
        rt = self._runtime
        engine = rt.llm.engine
        cfg = engine.config
        st = engine.state
        used = sum(
            math.ceil((int(p) + 1) / cfg.block) for p, a in zip(st.positions, st.active, strict=True) if a
        )
        return {
            **engine.stats.summary(),
            "queue_depth": len(rt.waiting),
            "running": sum(not h._done.is_set() for h in rt.running),
            "cache_blocks_used": used,
            "cache_blocks_total": cfg.max_batch * math.ceil(cfg.max_len / cfg.block),
        }


class _Runtime:
    def __init__(self, llm: LLM, max_queue: int | None):
        self.llm = llm
        self.max_queue = max_queue
        self.waiting: deque[_Handle] = deque()
        self.running: list[_Handle] = []
        self.stats = _Stats(self)
        self._closed = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="jinfer-runtime-shim", daemon=True)
        self._thread.start()

    def submit(self, prompt, params: SamplingParams | None = None, _sink=None) -> _Handle:
        """Validates (InputError), enforces max_queue (OverloadedError), queues the request."""
        (request,), (ids,) = self.llm._requests([prompt], [params or self.llm.default_params()])
        handle = _Handle(prompt, ids, request, _sink)
        with self._cv:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            if self.max_queue is not None and len(self.waiting) >= self.max_queue:
                raise OverloadedError(
                    f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue})"
                )
            self.waiting.append(handle)
            self._cv.notify()
        return handle

    async def generate_async(
        self, prompt, params: SamplingParams | None = None
    ) -> AsyncIterator[RequestDelta]:
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[RequestDelta] = asyncio.Queue()

        def sink(delta: RequestDelta) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody listens
                loop.call_soon_threadsafe(deltas.put_nowait, delta)

        handle = self.submit(prompt, params, _sink=sink)
        left = handle.params.n
        try:
            while left:
                delta = await deltas.get()
                left -= delta.finish_reason is not None
                yield delta
        finally:
            if left:
                handle.cancel()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for h in self.running:
                h.cancel()
            self._cv.notify()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self.waiting and not self._closed:
                    self._cv.wait()
                if self._closed:
                    while self.waiting:
                        self.waiting.popleft().abort_unfinished()
                    return
                self.running, free = [], self.llm.engine.config.max_batch
                while self.waiting and self.waiting[0].params.n <= free:
                    free -= self.waiting[0].params.n
                    self.running.append(self.waiting.popleft())
            self._run(self.running)

    def _run(self, group: list[_Handle]) -> None:
        llm, engine = self.llm, self.llm.engine
        decoders: dict = {}
        emitted: dict[tuple[int, int], int] = {}
        live = [h for h in group if not h.cancelled]
        for h in group:
            if h.cancelled:
                h.abort_unfinished()
        for result, new, finished in engine.run_stream(iter([h.request for h in live])):
            h = live[result.request]
            key = (result.request, result.sample)
            llm._apply_stop_strings(result, new, finished, decoders, h.params)
            done = finished or result.finish_reason is not None
            text = decoders[key].text if key in decoders else ""
            end = len(text) if done else len(text) - _stop_prefix_len(text, h.params.stop or ())
            start = emitted.get(key, 0)
            emitted[key] = max(start, end)
            lps = (
                result.logprobs[len(result.logprobs) - len(new) :] if h.params.logprobs is not None else None
            )
            h.emit(result.sample, list(new), text[start:end], lps, result.finish_reason if done else None)
            for slot, entry in enumerate(engine.slots):
                if entry is not None and live[entry.result.request].cancelled:
                    engine.release(slot)
                    live[entry.result.request].emit(entry.result.sample, [], "", None, "abort")
        for h in live:
            h.abort_unfinished()  # cancelled before its samples were admitted


def attach(llm: LLM, max_queue: int | None = None) -> _Runtime:
    """The runtime contract (`submit`, `generate_async`, `stats`, `close`) over `llm`."""
    return _Runtime(llm, max_queue)
