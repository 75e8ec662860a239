"""The scheduler: requests in, per-request deltas out. It knows requests, never arrays.

`add_request` and `abort` may be called from any thread; `step` is driven by one thread (the
engine loop). Each `step()` applies pending aborts, admits waiting requests while decode slots are
free (prefill through the KV cache manager, first token), then runs one decode round of every
occupied slot, and returns what each request gained: new token ids, their logprobs, the new text
(stop strings applied; a tail that could still become a stop string is held back) and, at the
end, the finish reason.

A request's tokens depend only on its prompt, its sampling params and its seed: never on its slot,
its batch companions or what the prefix cache holds.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jinfer import sampling
from jinfer.buckets import smallest_bucket
from jinfer.runtime.kv_cache import KVCacheManager
from jinfer.runtime.runner import DecodeState, ModelRunner
from jinfer.runtime.stats import GenerationStats
from jinfer.sampling import SamplerState, SamplingParams
from jinfer.tokenizer import IncrementalDecoder, Tokenizer


@dataclasses.dataclass
class Request:
    """One prompt to generate for (already tokenized and validated)."""

    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    stop_token_ids: tuple[int, ...]


@dataclasses.dataclass
class RequestDelta:
    """What one sample of a request gained since its previous delta.

    Attributes:
      index: sample index (0 .. n - 1).
      token_ids: new token ids.
      text: new text (valid UTF-8, stop strings applied; "" without a tokenizer).
      logprobs: per new token {token_id: logprob} (the chosen token and the top ones), or None
        when the request asked for no logprobs.
      finish_reason: None while running, else "stop", "length", "abort" or "error".
      error: the exception that failed the request (finish_reason "error").
    """

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    error: BaseException | None = None


@dataclasses.dataclass(eq=False)
class _Sample:
    index: int
    decoder: IncrementalDecoder | None
    slot: int | None = None
    emitted: int = 0  # characters of decoder.text already sent
    finished: bool = False


@dataclasses.dataclass(eq=False)
class _RequestState:
    id: str
    request: Request
    samples: list[_Sample]

    @property
    def done(self) -> bool:
        return all(s.finished for s in self.samples)


class Scheduler:
    """Waiting and running requests over the runner's decode slots (see the module docstring)."""

    def __init__(
        self,
        runner: ModelRunner,
        kv: KVCacheManager,
        stats: GenerationStats,
        tokenizer: Tokenizer | None = None,
    ):
        self.runner = runner
        self.kv = kv
        self.stats = stats
        self.tokenizer = tokenizer
        b = runner.config.max_batch
        self.buckets = runner.decode_buckets
        self.state = DecodeState.empty(b)
        self.slots: list[tuple[_RequestState, _Sample] | None] = [None] * b
        self.waiting: deque[_RequestState] = deque()
        self.running: dict[str, _RequestState] = {}
        self._lock = threading.RLock()  # guards the inbox and aborts (a GC finalizer may re-enter)
        self._inbox: deque[_RequestState] = deque()
        self._waiting_ids: dict[str, _RequestState] = {}
        self._aborts: deque[str] = deque()
        self._ids = itertools.count()

    # -- any thread --------------------------------------------------------------------------------
    def add_request(self, request: Request, request_id: str | None = None) -> str:
        """Queues a validated request; returns its id."""
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        samples = [_Sample(k, self._decoder()) for k in range(request.params.n)]
        with self._lock:
            self._inbox.append(_RequestState(rid, request, samples))
        return rid

    def abort(self, request_id: str) -> None:
        """Ends the request at the next step (finish_reason "abort"); unknown ids are ignored."""
        with self._lock:
            self._aborts.append(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._aborts or self.waiting or self.running)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a decode slot."""
        with self._lock:
            return len(self._inbox) + len(self.waiting)

    def gauges(self) -> dict[str, int]:
        return {"queue_depth": self.queue_depth, "running": len(self.running), **self.kv.gauges()}

    # -- the engine loop's thread -----------------------------------------------------------------
    def step(
        self, flush: Callable[[list[tuple[str, RequestDelta]]], None] | None = None
    ) -> list[tuple[str, RequestDelta]]:
        """Aborts, admissions and one decode round; returns (request id, delta) pairs in order.

        `flush`, if given, receives the deltas of aborts and of each admission (first tokens) as
        they are made, before the decode round runs, so a new request's first token is not held
        back by it; the returned list then holds the rest."""
        out: list[tuple[str, RequestDelta]] = []
        self.stats.steps += 1
        with self._lock:
            self._enqueue_inbox()
            aborts = list(self._aborts)
            self._aborts.clear()
        for rid in aborts:
            self._abort(rid, out)
        if aborts:  # drop aborted requests from the queue in one pass
            self.waiting = deque(st for st in self.waiting if not st.done)
        out = self._admit(out, flush)
        if any(s is not None for s in self.slots):
            self._compact()
            self._decode_round(out)
        return out

    def fail_running(self, error: BaseException) -> list[tuple[str, RequestDelta]]:
        """Fails every running request (their cache rows are lost, e.g. after a device error)."""
        out: list[tuple[str, RequestDelta]] = []
        for st in list(self.running.values()):
            self._fail(st, error, out)
        self.runner.ensure_cache()
        return out

    def abort_all(self) -> list[tuple[str, RequestDelta]]:
        """Aborts every request (the engine is closing)."""
        out: list[tuple[str, RequestDelta]] = []
        with self._lock:
            self._enqueue_inbox()
            self._aborts.clear()
        for st in [*self.waiting, *self.running.values()]:
            self._abort(st.id, out)
        return out

    def _enqueue_inbox(self) -> None:
        for st in self._inbox:
            self._waiting_ids[st.id] = st
        self.waiting.extend(self._inbox)
        self._inbox.clear()

    def _admit(self, out: list, flush=None) -> list:
        """Admits waiting requests while slots are free, up to `runner.prefill_rows` at a time
        (their prefills may share calls); with `flush`, hands over the deltas after each group (so
        the first requests' first tokens do not wait for the others' prefill)."""
        rows = self.runner.prefill_rows
        while self.waiting and self.kv.free_slots >= self.waiting[0].request.params.n:
            group, free = [], self.kv.free_slots
            while self.waiting and len(group) < rows and free >= self.waiting[0].request.params.n:
                st = self.waiting.popleft()
                self._waiting_ids.pop(st.id, None)
                free -= st.request.params.n
                group.append(st)
            self._start(group, out)
            if flush is not None and out:
                flush(out)
                out = []
        if flush is not None and out:  # the aborts' deltas, when nothing was admitted
            flush(out)
            out = []
        return out

    def _start(self, group: list[_RequestState], out: list) -> None:
        """Prefills a group of admitted requests and emits their first tokens. If a shared
        prefill call fails, each request is prefilled alone, so a failure stays with its request."""
        for st in group:
            slots = self.kv.allocate_slots(st.request.params.n)
            self.running[st.id] = st
            for sample, slot in zip(st.samples, slots, strict=True):
                sample.slot = slot
                self.slots[slot] = (st, sample)
        results = None
        if len(group) > 1:
            try:
                results = self.kv.prefill_many(
                    [st.samples[0].slot for st in group], [st.request.prompt_ids for st in group]
                )
            except Exception as e:  # retried one by one below, so only a failing request fails
                if self.runner.ensure_cache():  # unless the failed call consumed the cache
                    out.extend(self.fail_running(e))
                    return
        for i, st in enumerate(group):
            try:
                if results is None:
                    logits, cached = self.kv.prefill(st.samples[0].slot, st.request.prompt_ids)
                else:
                    logits, cached = results[i]
                self._first_tokens(st, logits, cached, out)
            except Exception as e:  # this request fails; the others go on
                self._fail(st, e, out)
                if self.runner.ensure_cache():  # a failed executable consumed the cache
                    out.extend(self.fail_running(e))
                    return

    def _first_tokens(self, st: _RequestState, logits: Any, cached: int, out: list) -> None:
        req = st.request
        slots = [sample.slot for sample in st.samples]
        self.stats.record_prompt(len(req.prompt_ids) - cached, cached)
        pos = len(req.prompt_ids)
        for k, sample in enumerate(st.samples):
            if k > 0:
                self.runner.copy_slot(slots[0], sample.slot, pos)
            sampler = SamplerState.from_params([req.params], [sampling.request_key(req.seed, k)])
            token, lp, top_ids, top_lp = self.runner.first_token(logits, sampler, pos)
            token = int(token[0])
            stopped = token in req.stop_token_ids
            finish = "stop" if stopped else "length" if req.params.max_tokens == 1 else None
            if finish is None:
                self._set_row(sample.slot, req, token, pos, sampler)
            self._emit(st, sample, [token], lp, top_ids, top_lp, finish, out)

    def _set_row(self, slot: int, req: Request, token: int, pos: int, sampler: SamplerState) -> None:
        st = self.state
        st.tokens[slot], st.positions[slot] = token, pos
        st.active[slot], st.remaining[slot] = True, req.params.max_tokens - 1
        st.stop_ids[slot] = -1
        st.stop_ids[slot, : len(req.stop_token_ids)] = req.stop_token_ids
        for name in ("temperature", "top_k", "top_p", "min_p", "key"):
            getattr(st.sampler, name)[slot] = getattr(sampler, name)[0]

    def _compact(self) -> None:
        """Moves the requests in the highest slots into free lower ones, so that the live rows are
        0 .. live - 1 and decode runs at the smallest bucket (a no-op with one decode bucket)."""
        if len(self.buckets) == 1:
            return
        while True:
            free = next((i for i, e in enumerate(self.slots) if e is None), None)
            last = max((i for i, e in enumerate(self.slots) if e is not None), default=-1)
            if free is None or last < free:
                return
            self.runner.copy_slot(last, free, int(self.state.positions[last]) + 1)
            for a in jax.tree.leaves(self.state):
                a[free] = a[last]
            self.state.active[last] = False
            entry = self.slots[free] = self.slots[last]
            self.slots[last] = None
            entry[1].slot = free
            self.kv.move_slot(last, free)
            self.stats.slot_moves += 1

    def _decode_round(self, out: list) -> None:
        live = max(i for i, e in enumerate(self.slots) if e is not None) + 1
        bucket = smallest_bucket(self.buckets, live)
        rows = jax.tree.map(lambda a: a[:bucket], self.state)
        t0 = time.perf_counter()
        new_state, (tokens, lps, top_ids, top_lps) = self.runner.decode(rows, bucket)
        t1 = time.perf_counter()
        self.stats.record_decode_bucket(bucket, live)
        # Host state stays authoritative; only these fields change on device.
        for name in ("tokens", "positions", "active", "remaining"):
            getattr(self.state, name)[:bucket] = getattr(new_state, name)
        for slot, entry in enumerate(self.slots[:bucket]):
            if entry is None:
                continue
            st, sample = entry
            valid = tokens[slot] >= 0
            new = tokens[slot][valid].tolist()
            finish = None
            if not self.state.active[slot]:
                finish = "stop" if new and new[-1] in st.request.stop_token_ids else "length"
            try:
                self._emit(
                    st, sample, new, lps[slot][valid], top_ids[slot][valid], top_lps[slot][valid], finish, out
                )
            except Exception as e:  # e.g. detokenization: this request fails, the others go on
                self._fail(st, e, out)
        self.stats.record_decode_time(t1 - t0, time.perf_counter() - t1)

    # -- outputs -----------------------------------------------------------------------------------
    def _emit(self, st, sample: _Sample, tokens: list[int], lp, top_ids, top_lp, finish, out: list) -> None:
        params = st.request.params
        stop_token = finish == "stop" and bool(tokens) and tokens[-1] in st.request.stop_token_ids
        text, finish, kept = self._detokenize(sample, tokens, finish, params, stop_token)
        tokens = tokens[:kept]  # a stop string ended the request: the round's later tokens are dropped
        self.stats.generated_tokens += kept
        logprobs = None
        if params.logprobs is not None:
            logprobs = []
            for i, t in enumerate(tokens):
                entry = {int(t): float(lp[i])}
                for tid, val in zip(top_ids[i][: params.logprobs], top_lp[i][: params.logprobs], strict=True):
                    entry.setdefault(int(tid), float(val))
                logprobs.append(entry)
        if finish is not None:
            self._finish_sample(st, sample)
            if st.done:
                self.stats.requests_finished += 1
        out.append((st.id, RequestDelta(sample.index, [int(t) for t in tokens], text, logprobs, finish)))

    def _detokenize(
        self, sample: _Sample, tokens: list[int], finish: str | None, params, stop_token: bool = False
    ) -> tuple[str, str | None, int]:
        """New text of a sample (stop strings applied), its finish reason ("stop" at a stop
        string) and how many of `tokens` it keeps: with stop strings the tokens are decoded one
        at a time, and the first one that completes a stop string (the earliest in the text, of
        any of them) is the last kept. With `stop_token` the last token is a stop token id: it
        stays in the tokens, and its text (a special token's is empty) is not added (as vLLM)."""
        dec = sample.decoder
        if dec is None:
            return "", finish, len(tokens)
        stops = params.stop or ()
        before, kept = len(dec.text), len(tokens)
        text_tokens = tokens[:-1] if stop_token else tokens
        pieces = [[t] for t in text_tokens] if stops and text_tokens else [text_tokens]
        for i, piece in enumerate(pieces):
            dec.push(piece)
            if finish is not None and i == len(pieces) - 1:
                self._flush(dec)
            # Search only where a new match can start, so text before `before` is never re-cut.
            found = [at for stop in stops if (at := dec.text.find(stop, max(0, before - len(stop) + 1))) >= 0]
            if found:
                dec.text = dec.text[: min(found)]
                finish, kept = "stop", min(i + 1, len(tokens))
                break
        # Hold back a tail that could still become a stop string, so the text sent never includes
        # characters that a later stop string would cut.
        end = len(dec.text) if finish is not None else len(dec.text) - _stop_prefix_len(dec.text, stops)
        text = dec.text[sample.emitted : end] if end > sample.emitted else ""
        sample.emitted = max(sample.emitted, end)
        return text, finish, kept

    def _flush(self, dec: IncrementalDecoder) -> None:
        """Appends a tail the incremental decoder still holds back (the sample is finishing)."""
        tail = self.tokenizer.decode(dec.ids[dec.prefix_offset :])
        prefix = self.tokenizer.decode(dec.ids[dec.prefix_offset : dec.read_offset])
        if len(tail) > len(prefix):
            dec.text += tail[len(prefix) :]
            dec.prefix_offset = dec.read_offset = len(dec.ids)

    def _decoder(self) -> IncrementalDecoder | None:
        return IncrementalDecoder(self.tokenizer) if self.tokenizer is not None else None

    # -- ends ----------------------------------------------------------------------------------------
    def _finish_sample(self, st: _RequestState, sample: _Sample) -> None:
        sample.finished = True
        if sample.slot is not None:
            self.slots[sample.slot] = None
            self.state.active[sample.slot] = False
            self.kv.free_slot(sample.slot)
            sample.slot = None
        if st.done:
            self.running.pop(st.id, None)

    def _end(self, st: _RequestState, reason: str, error: BaseException | None, out: list) -> None:
        for sample in st.samples:
            if not sample.finished:
                self._finish_sample(st, sample)
                out.append((st.id, RequestDelta(sample.index, [], "", None, reason, error)))
        self.running.pop(st.id, None)
        self._waiting_ids.pop(st.id, None)

    def _abort(self, rid: str, out: list) -> None:
        st = self.running.get(rid) or self._waiting_ids.get(rid)
        if st is not None and not st.done:
            self._end(st, "abort", None, out)
            self.stats.requests_aborted += 1

    def _fail(self, st: _RequestState, error: BaseException, out: list) -> None:
        self._end(st, "error", error, out)
        self.stats.requests_failed += 1


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


__all__: Any = ["Request", "RequestDelta", "Scheduler"]
