"""The engine loop: one background thread drives `Scheduler.step()` for any number of callers.

The thread steps while the scheduler has unfinished work and sleeps on a condition otherwise (no
busy wait). Arrivals never hold up a decode: a request submitted during a step waits for the next
one, where it is admitted before that step's decode round. Each request is seen through a
RequestHandle (iterate its deltas, `result()`, `cancel()`); a handle that is garbage-collected
aborts its request, so an abandoned caller never keeps a decode slot.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from typing import Any

from jinfer.errors import EngineClosedError, OverloadedError
from jinfer.runtime.outputs import CompletionOutput, RequestOutput
from jinfer.runtime.scheduler import Request, RequestDelta, Scheduler

WAKE_S = 0.1  # how often a caller's wait wakes up to let a pending KeyboardInterrupt through

log = logging.getLogger(__name__)


class RequestHandle:
    """A submitted request: iterate its deltas, wait for its `result()`, or `cancel()` it.

    Attributes:
      request_id: the id the engine knows the request by.
      prompt_token_ids: the tokenized prompt.
    """

    def __init__(
        self,
        loop: EngineLoop,
        request_id: str,
        prompt: Any,
        request: Request,
        listener: Callable[[RequestDelta], None] | None = None,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(request.prompt_ids)
        self._loop = loop
        self._want_logprobs = request.params.logprobs is not None
        n = request.params.n
        self._tokens: list[list[int]] = [[] for _ in range(n)]
        self._texts: list[list[str]] = [[] for _ in range(n)]
        self._logprobs: list[list[dict[int, float]]] = [[] for _ in range(n)]
        self._finish: list[str | None] = [None] * n
        self._queue: queue.SimpleQueue[RequestDelta] = queue.SimpleQueue()
        self._listener = listener
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[RequestHandle], None]] = []
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None
        self.owner: Any = None  # what must outlive the request (the LLM that submitted it)

    # -- called by the engine loop's thread -----------------------------------------------------
    def _deliver(self, delta: RequestDelta) -> None:
        k = delta.index
        self._tokens[k].extend(delta.token_ids)
        self._texts[k].append(delta.text)
        if delta.logprobs:
            self._logprobs[k].extend(delta.logprobs)
        if delta.finish_reason is not None:
            self._finish[k] = delta.finish_reason
        if delta.error is not None and self._error is None:
            self._error = delta.error
        self._queue.put(delta)
        finished = all(f is not None for f in self._finish)
        if finished:
            with self._lock:
                self._done.set()
                callbacks, self._callbacks = self._callbacks, []
        if self._listener is not None:
            self._listener(delta)
        if finished:
            for callback in callbacks:  # each runs, whatever the ones before it raised
                try:
                    callback(self)
                except BaseException:  # even SystemExit: it would end the engine's thread
                    log.exception("a done-callback of %s raised; the engine goes on", self.request_id)

    # -- any thread ------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[RequestDelta]:
        """Deltas as they come (blocking), until every sample has finished."""
        left = len(self._finish)
        while left:
            delta = self._next_delta()
            if delta.finish_reason is not None:
                left -= 1
            yield delta

    def _next_delta(self) -> RequestDelta:
        while True:  # in slices, as `_interruptible_result` waits
            try:
                return self._queue.get(timeout=WAKE_S)
            except queue.Empty:
                pass

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Waits for the request to end; returns its RequestOutput (raises the error that failed it).
        Waits in WAKE_S slices, so a KeyboardInterrupt from `_thread.interrupt_main` is raised at
        once (see `_interruptible_result`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.wait(WAKE_S if deadline is None else min(WAKE_S, deadline - time.monotonic())):
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self.output()

    def output(self) -> RequestOutput:
        """The request's output so far (complete once it has finished)."""
        samples = [
            CompletionOutput(
                k,
                "".join(self._texts[k]),
                list(self._tokens[k]),
                self._finish[k] or "length",
                list(self._logprobs[k]) if self._want_logprobs else None,
            )
            for k in range(len(self._finish))
        ]
        return RequestOutput(self.prompt, self.prompt_token_ids, samples)

    def cancel(self) -> None:
        """Aborts the request at the next step (its slots are freed; finish_reason "abort")."""
        if not self._done.is_set():
            self._loop.abort(self.request_id)

    def add_done_callback(self, callback: Callable[[RequestHandle], None]) -> None:
        """Calls `callback(handle)` once the request has ended (on the engine loop's thread, or at
        once on this one if it already has)."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback(self)


class EngineLoop:
    """Background thread stepping a Scheduler; `submit`, `abort` and `call` from any thread."""

    def __init__(self, scheduler: Scheduler, max_queue: int | None = None):
        self.scheduler = scheduler
        self.max_queue = max_queue
        self._cv = threading.Condition(threading.RLock())  # re-entrant: GC finalizers may abort
        self._handles: dict[str, weakref.ref[RequestHandle]] = {}
        self._forgotten: deque[str] = deque()  # requests of collected handles, aborted by the loop
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._closed = False
        self._on_exit: list[Callable[[], None]] = []
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="jinfer-engine-loop", daemon=True)
        self._thread.start()

    def submit(
        self,
        request: Request,
        prompt: Any = None,
        listener: Callable[[RequestDelta], None] | None = None,
        bounded: bool = True,
    ) -> RequestHandle:
        """Queues a validated request. With `bounded`, raises OverloadedError when `max_queue`
        requests already wait for a slot."""
        with self._cv:
            if self._closed:
                raise EngineClosedError("the engine is closed; create a new LLM")
            if bounded and self.max_queue is not None and self.scheduler.queue_depth >= self.max_queue:
                depth = self.scheduler.queue_depth
                raise OverloadedError(
                    f"{depth} requests are already waiting (max_queue={self.max_queue}); retry later"
                )
            rid = f"req-{next(self._ids)}"
            handle = RequestHandle(self, rid, prompt, request, listener)
            self._handles[rid] = weakref.ref(handle)
            handle._finalizer = weakref.finalize(handle, self._forget, rid)
            self.scheduler.add_request(request, rid)
            self._cv.notify()
        return handle

    def _forget(self, rid: str) -> None:
        """A handle was garbage-collected: nobody can read its request any more, so abort it.

        The collector runs this on whatever thread it runs on: the loop's own in the middle of a
        step (holding the scheduler's lock), or a caller's holding `_cv` while it waits for that
        lock. So it takes no lock (taking `_cv` here deadlocked both threads); the loop aborts the
        request before its next step (a request left unfinished keeps the loop stepping)."""
        self._handles.pop(rid, None)
        self._forgotten.append(rid)

    def abort(self, request_id: str) -> None:
        with self._cv:
            self.scheduler.abort(request_id)
            self._cv.notify()

    def call(self, fn: Callable[[], Any], on_interrupt: Callable[[], None] | None = None) -> Any:
        """Runs `fn()` on the loop's thread between steps (device work that must not interleave
        with a step, e.g. scoring or warm-up) and returns its result.

        A KeyboardInterrupt (or any exception) while the caller waits is raised at once: the call
        is dropped if it has not started, else `on_interrupt()` asks it to stop."""
        if threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        with self._cv:
            if self._closed:
                raise EngineClosedError("the engine is closed; create a new LLM")
            self._calls.append((fn, future))
            self._cv.notify()
        try:
            return _interruptible_result(future)
        except BaseException:
            if not future.cancel() and on_interrupt is not None:
                on_interrupt()
            raise

    def close(self, on_exit: Callable[[], None] | None = None) -> None:
        """Aborts what is left, stops the thread and joins it (idempotent). `on_exit` runs once
        the thread has stopped for good, so no step or call runs after it (it may free what they
        use): here, or on the loop's thread as it ends when that thread closes the loop itself."""
        with self._cv:
            self._closed = True
            if on_exit is not None:
                self._on_exit.append(on_exit)
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()
            self._run_exit_hooks()

    def _run_exit_hooks(self) -> None:
        """Runs each `on_exit` once: whichever of the closing and the loop's thread comes last."""
        with self._cv:
            hooks, self._on_exit = self._on_exit, []
        for hook in hooks:
            hook()

    @property
    def closed(self) -> bool:
        return self._closed

    def _run(self) -> None:
        try:
            self._steps()
        except BaseException:  # the thread is ending: refuse new work instead of queuing it forever
            log.exception("the engine loop stopped")
            with self._cv:
                self._closed = True
            with contextlib.suppress(BaseException):  # and end what waits, so no caller hangs
                self._dispatch(self.scheduler.abort_all())
            raise
        finally:
            self._run_exit_hooks()

    def _steps(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._calls and not self.scheduler.has_unfinished():
                    self._cv.wait()
                if self._closed:
                    break
                calls = list(self._calls)
                self._calls.clear()
            for fn, future in calls:
                _run_call(fn, future)
            while self._forgotten:
                self.scheduler.abort(self._forgotten.popleft())
            if self.scheduler.has_unfinished():
                try:
                    deltas = self.scheduler.step(flush=self._dispatch)
                except Exception as e:  # e.g. a device error in decode: fail the running requests
                    log.exception("engine step failed; failing the running requests")
                    deltas = self.scheduler.fail_running(e)
                self._dispatch(deltas)
        self._dispatch(self.scheduler.abort_all())
        with self._cv:
            calls = list(self._calls)
            self._calls.clear()
        for _, future in calls:
            future.set_exception(EngineClosedError("the engine closed before this call ran"))

    def _dispatch(self, deltas: list[tuple[str, RequestDelta]]) -> None:
        for rid, delta in deltas:
            ref = self._handles.get(rid)
            handle = ref() if ref is not None else None
            if handle is None:
                continue
            try:
                handle._deliver(delta)
            except Exception:  # a caller's listener failed (e.g. its event loop closed): its problem
                log.exception("delivering a delta of %s failed", rid)
            if handle.finished:
                self._handles.pop(rid, None)
                handle._finalizer.detach()  # nothing left to abort when it is collected


def _interruptible_result(future: Future) -> Any:
    """`future.result()`, waking every WAKE_S: a wait without a timeout is not woken by
    `_thread.interrupt_main()` (IDEs, Windows' Ctrl-C), so the KeyboardInterrupt came only once
    the call had ended; a timed wait returns to the interpreter, which raises it."""
    while not future.done():
        wait((future,), timeout=WAKE_S)
    return future.result()


def _run_call(fn: Callable[[], Any], future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as e:
        future.set_exception(e)
