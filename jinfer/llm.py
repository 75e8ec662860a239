"""`jinfer.LLM`: the user-facing text generation API (generate, stream, score)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import queue
import secrets
import threading
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jinfer import compile as compile_lib
from jinfer import cpu_kernels, quant
from jinfer.errors import ConfigError, EngineClosedError, InputError, InvalidSamplingParamsError
from jinfer.modeling import FlaxModel
from jinfer.osutil import json_object
from jinfer.runtime.config import GenerationConfig
from jinfer.runtime.kv_cache import KVCacheManager
from jinfer.runtime.loop import EngineLoop, RequestHandle
from jinfer.runtime.outputs import CompletionOutput, RequestOutput, ScoreOutput
from jinfer.runtime.runner import ModelRunner, item_name
from jinfer.runtime.scheduler import Request, RequestDelta, Scheduler
from jinfer.runtime.stats import GenerationStats
from jinfer.sampling import STOP_ID_SLOTS, SamplingParams, _short_repr
from jinfer.sharding import ShardingRules, resolve_mesh, single_device_mesh
from jinfer.tokenizer import Tokenizer, token_ids

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]
_END = object()
__all__ = ["LLM", "CompletionOutput", "RequestDelta", "RequestHandle", "RequestOutput", "ScoreOutput"]


class LLM:
    """A decoder language model ready to generate.

    Args:
      model: a jinfer model directory, a known model name (see `jinfer.hub`), or a Hugging Face
        model id ("org/name[@revision]"), fetched with huggingface_hub and converted once.
      mesh: a Mesh, a spec such as "data=2,model=4", or None (one device).
      dtype: parameter dtype on restore ("float32", "bfloat16"), and so the compute and KV-cache
        dtype; None: bfloat16 on TPU/GPU; on CPU bfloat16 weight matrices with float32 compute
        where the CPU has bfloat16 matrix instructions (float causal LMs), else the saved dtype
        (see `jinfer.defaults`, `jinfer.precision`).
      max_batch: decode slots; None: as many as a KV-cache memory budget holds (a power of two,
        at most 64 on CPU / 128 on TPU/GPU). max_len: tokens per slot (prompt + generation);
        None: the model's context length within that budget. See `jinfer.defaults` for the rule;
        `llm.engine_choices` records what was chosen and why.
      buckets: prompt-length buckets compiled for prefill (default: 16, 32, ... up to
        min(max_len, 512) on CPU; 128, 256, 512, 1024 on TPU/GPU).
      decode_steps: decode steps per host round trip.
      quantize: "int8" quantizes a float checkpoint's weights at load time (weight-only,
        per-channel; see `jinfer.quant`). Checkpoints converted with `--quantize int8` load as is.
      layout: in-memory weight layout: "canonical" (as saved), "out_major" (weights transposed to
        [out, in] at load time: XLA:CPU's matrix-vector products read them 1.5-3x faster, batched
        float32 matmuls slower), or "auto" (out_major on CPU for one-slot engines and for bfloat16 weights
        under float32 compute, canonical otherwise).
      weight_dtype: dtype of the weight matrices (floating params of rank >= 2) when it should
        differ from `dtype`'s: e.g. dtype="float32", weight_dtype="bfloat16" multiplies bfloat16
        weights under float32 compute.
      **engine_options: further GenerationConfig fields, e.g. `prefix_cache=False` (automatic
        prefix caching is on by default; outputs are bitwise identical either way),
        `batch_invariant=True` (one decode shape and one prompt per prefill call: outputs bitwise
        independent of companions, see the README's Reproducibility), `decode_buckets`
        (active-slot counts decode compiles for), `prefill_rows` (short prompts per prefill call),
        `prefix_cache_blocks` (its block budget), `max_queue` (waiting requests before `submit`
        raises OverloadedError), `prefill_chunk`, `cache_block`.

    One LLM serves any number of threads (and asyncio tasks): their requests share the decode
    batch, driven by one background engine loop. `close()` (or leaving a `with` block) stops it.
    """

    def __init__(
        self,
        model: str | Path,
        mesh: Mesh | str | None = None,
        dtype: str | None = None,
        max_batch: int | None = None,
        max_len: int | None = None,
        buckets: Sequence[int] | None = None,
        decode_steps: int = 8,
        rules: ShardingRules | None = None,
        quantize: str | None = None,
        layout: str = "auto",
        weight_dtype: str | None = None,
        **engine_options: Any,
    ):
        from jinfer import defaults, loading, prefetch
        from jinfer.memory import MemoryPlanError, plan_llm_memory

        mesh = resolve_mesh(mesh, rules)
        gen_config = shape = dtype_reason = prefetching = None
        one_row = True
        compile_lib.maybe_enable_from_env()  # before the prefetch looks for cached executables

        def plan(flax_model: FlaxModel) -> str | None:  # after the config is read, before any array is
            # The backend is first asked here: a config that fails validation never starts one.
            nonlocal gen_config, shape, dtype, dtype_reason, prefetching, one_row
            backend = defaults.backend_of(mesh)
            dtype, dtype_reason = defaults.default_dtype(backend, dtype, flax_model, weight_dtype, quantize)
            device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
            cache_dtype = engine_options.get("cache_dtype")
            shape = defaults.engine_shape(
                flax_model, backend, device, dtype, cache_dtype, max_batch, max_len, buckets
            )
            gen_config = _generation_config(
                shape.max_batch.value,
                shape.max_len.value,
                shape.prefill_buckets.value,
                decode_steps,
                engine_options,
            )
            abstract = loading.abstract_params(flax_model, mesh or single_device_mesh(), rules, dtype)
            one_row_bytes = loading.one_row_copy_size(
                layout, flax_model, abstract, gen_config.decode_batch_buckets(), mesh
            )
            try:
                plan_llm_memory(flax_model, gen_config, mesh, dtype, extra_param_bytes=one_row_bytes)
            except MemoryPlanError:
                if not one_row_bytes:
                    raise
                one_row_bytes = 0  # no one-row copy rather than no engine
                plan_llm_memory(flax_model, gen_config, mesh, dtype)
            one_row = one_row_bytes > 0
            if not quantize or flax_model.quantization is not None:  # load executables meanwhile
                prefetching = prefetch.start(flax_model, gen_config, mesh, rules, layout, dtype, one_row)
            return dtype  # the dtype to restore in

        try:
            loaded = loading.load(model, mesh=mesh, rules=rules, dtype=dtype, quantize=quantize, plan=plan)
            path, flax_model, params = loaded.path, loaded.model, loaded.params
            tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
            gen_defaults = _read_json(path / "generation_config.json")
            del model
            reasons = {
                "dtype": dtype_reason,
                **{k: getattr(shape, k).reason for k in ("max_batch", "max_len")},
            }
            reasons["prefill_buckets"] = shape.prefill_buckets.reason
            self._setup(
                flax_model,
                params,
                tokenizer,
                gen_config,
                mesh,
                rules,
                gen_defaults,
                layout,
                True,
                reasons,
                one_row,
            )
        finally:
            if prefetching is not None:  # what it loaded is handed off; nothing loads behind requests
                prefetching.stop()
        self.path = path

    @classmethod
    def from_params(
        cls,
        model: FlaxModel,
        params: Any,
        tokenizer: Tokenizer | None = None,
        config: GenerationConfig | None = None,
        mesh: Mesh | None = None,
        rules: ShardingRules | None = None,
        generation_defaults: dict[str, Any] | None = None,
        layout: str = "auto",
    ) -> LLM:
        """Builds an LLM from a model and params already in hand (e.g. for research code).

        The caller's arrays are never donated: with layout "out_major" (or "auto" where it
        chooses out_major, see `LLM`) the engine holds a transposed copy of the weights.
        """
        self = cls.__new__(cls)
        config = config or GenerationConfig()
        mesh = resolve_mesh(mesh, rules)
        self._setup(model, params, tokenizer, config, mesh, rules, generation_defaults or {}, layout)
        self.path = None
        return self

    def _setup(
        self,
        model,
        params,
        tokenizer,
        config,
        mesh,
        rules,
        gen_defaults,
        layout,
        owned=False,
        reasons=None,
        one_row_allowed=True,
    ):
        from jinfer import loading

        transposed_before = model.transposed
        model, params = loading.runtime_layout(model, params, layout, config.max_batch, mesh, rules, owned)
        one_row, one_row_bytes = None, 0
        if one_row_allowed:
            one_row_bytes = loading.one_row_copy_size(
                layout, model, params, config.decode_batch_buckets(), mesh
            )
        if one_row_bytes:
            one_row = loading.one_row_copy(model, params, mesh, rules)
        self.model = model
        self.tokenizer = tokenizer
        self._stats = GenerationStats()
        # `engine` is the model runner (compiled programs, params, KV cache); the loop drives it.
        self.engine = ModelRunner(
            model, params, config, mesh=mesh, rules=rules, stats=self._stats, one_row=one_row
        )
        self.scheduler = Scheduler(self.engine, KVCacheManager(self.engine), self._stats, tokenizer)
        self._stats.gauges = self.scheduler.gauges
        self.engine_choices = _engine_choices(
            config,
            params,
            mesh,
            layout,
            model.transposed,
            transposed_before,
            reasons,
            self.engine.decode_buckets,
            self.engine.prefill_rows,
            one_row_bytes,
        )
        self._stats.choices = self.engine_choices
        self._loop = EngineLoop(self.scheduler, max_queue=config.max_queue)
        self._finalizer = weakref.finalize(self, self._loop.close)  # the loop never refers to self
        self.generation_defaults = gen_defaults
        eos = gen_defaults.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if not eos and tokenizer is not None:
            eos = list(tokenizer.eos_token_ids)
        self.eos_token_ids = tuple(int(e) for e in eos)

    # -- public API ------------------------------------------------------------------------------
    @property
    def stats(self) -> GenerationStats:
        """Compiles per executable, padding, tokens, prefix-cache hits, queue depth (`.summary()`)."""
        return self._stats

    def default_params(self) -> SamplingParams:
        """SamplingParams from the model's generation_config.json (greedy when it has none)."""
        d = self.generation_defaults
        kw: dict[str, Any] = {"temperature": 0.0 if not d.get("do_sample", False) else 1.0}
        for key in ("temperature", "top_k", "top_p", "min_p"):
            if key in d and d.get("do_sample", True):
                kw[key] = d[key]
        if "max_new_tokens" in d:
            kw["max_tokens"] = int(d["max_new_tokens"])
        return SamplingParams(**kw)

    def warmup(self, score: bool = False) -> dict[tuple, float]:
        """Compiles prefill (every chunk bucket), first-token, copy, block and decode executables,
        and runs each prefill and decode program once (writing nothing), so the first requests
        run at full speed; with `score`, the programs of `score` too. Returns compile seconds per
        executable key.

        Ctrl-C (KeyboardInterrupt) stops it before the next program and is raised at once; the
        LLM stays usable (what was not compiled compiles on first use, or in another warmup)."""
        stop = threading.Event()
        return self._loop.call(lambda: self.engine.warmup(score=score, stop=stop), on_interrupt=stop.set)

    def _submit(self, request: Request, prompt: Any, **kwargs: Any) -> RequestHandle:
        """The loop's handle for `request`, holding this LLM: while a caller keeps a handle, the
        LLM is not collected (which closes the engine and aborts the request)."""
        handle = self._loop.submit(request, prompt, **kwargs)
        handle.owner = self
        return handle

    def submit(self, prompt: Prompt, params: SamplingParams | None = None) -> RequestHandle:
        """Queues one request and returns its handle at once (iterate its deltas, `.result()`,
        `.cancel()`). Invalid input raises an InputError before any device work; OverloadedError
        when `max_queue` requests already wait."""
        params = params or self.default_params()
        (request,), _ = self._requests([prompt], [params])
        return self._submit(request, prompt)

    async def generate_async(
        self, prompt: Prompt, params: SamplingParams | None = None
    ) -> AsyncIterator[RequestDelta]:
        """Yields the request's RequestDeltas in asyncio (no thread per request). Closing the
        iterator or cancelling the awaiting task aborts the request."""
        params = params or self.default_params()
        (request,), _ = self._requests([prompt], [params])
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[RequestDelta] = asyncio.Queue()
        handle = self._submit(
            request, prompt, listener=lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d)
        )
        left = params.n
        try:
            while left:
                delta = await deltas.get()
                if delta.finish_reason is not None:
                    left -= 1
                yield delta
        finally:
            if left:
                handle.cancel()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generates for each prompt; outputs are in input order.

        A prompt is a string, a list of token ids, or a list of chat messages. `params` is one
        SamplingParams for all prompts or one per prompt. Invalid input raises an InputError
        subclass before any device work, naming the prompt by its 0-based position ("prompt 1"
        is the second). Safe to call from several threads at once.

        With more prompts than decode slots, requests are admitted longest `max_tokens` first
        (each output is independent of its companions, so only the schedule changes): the long
        ones no longer run alone at the end while the other slots sit idle.
        """
        handles = self.submit_all(prompts, params)
        try:
            return [h.result() for h in handles]
        finally:  # an exception or KeyboardInterrupt while waiting: free what is still queued or running
            for h in handles:
                h.cancel()

    def submit_all(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestHandle]:
        """Queues every prompt and returns their handles in input order: `generate()` without the
        wait, for a caller that prints each output as it is ready or may cancel them.

        Every prompt is validated first (an InputError before any is queued); with more prompts
        than decode slots, the longest `max_tokens` are queued first. Cancel what is no longer
        wanted (`handle.cancel()`), or it runs to its end.
        """
        prompts = _as_prompt_list(prompts)
        params_list = self._params_list(params, len(prompts))
        requests, _ = self._requests(prompts, params_list)  # validate everything first
        order = range(len(prompts))
        if len(prompts) > self.engine.config.max_batch:
            order = sorted(order, key=lambda i: -params_list[i].max_tokens)
        handles: list[RequestHandle | None] = [None] * len(prompts)
        try:
            for i in order:
                handles[i] = self._submit(requests[i], prompts[i], bounded=False)
        except BaseException:
            for h in handles:
                if h is not None:
                    h.cancel()
            raise
        return handles  # type: ignore[return-value]  (all set)

    def generate_iter(
        self, items: Iterator[tuple[Any, Prompt, SamplingParams]]
    ) -> Iterator[tuple[Any, RequestOutput | Exception]]:
        """Continuous batching over an unbounded stream of (key, prompt, params).

        Yields (key, RequestOutput) in completion order as requests finish, pulling new items
        only while fewer than 2 x max_batch requests are in flight. An invalid item yields
        (key, the InputError; key None for an item that is not a (key, prompt, params) triple), a
        request that fails in the engine (key, its exception); the stream goes on. Messages say
        "the prompt", never a number: the key says which item. If `items`
        itself raises, the requests already in flight are finished and yielded first, then the
        error is raised. Closing the iterator cancels the requests still in flight.
        """
        done: queue.SimpleQueue[tuple[Any, RequestHandle]] = queue.SimpleQueue()
        inflight: dict[int, RequestHandle] = {}
        limit = 2 * self.engine.config.max_batch
        items = iter(items)
        exhausted, failure = False, None
        try:
            while True:
                while not exhausted and len(inflight) < limit:
                    try:
                        item = next(items, _END)
                    except Exception as e:  # the caller's iterator broke: finish what runs, then raise
                        exhausted, failure = True, e
                        break
                    if item is _END:
                        exhausted = True
                        break
                    if not isinstance(item, (tuple, list)) or len(item) != 3:
                        bad = _short_repr(item)
                        yield (
                            None,
                            InputError(f"generate_iter item {bad} is not a (key, prompt, params) triple"),
                        )
                        continue
                    key, prompt, params = item
                    params = params if params is not None else self.default_params()
                    try:
                        (request,), _ = self._requests([prompt], [params], numbered=False)
                    except InputError as e:
                        yield key, e
                        continue
                    handle = self._submit(request, prompt, bounded=False)
                    inflight[id(handle)] = handle
                    handle.add_done_callback(lambda h, key=key: done.put((key, h)))
                if not inflight:
                    if failure is not None:
                        raise failure
                    return
                key, handle = done.get()
                del inflight[id(handle)]
                try:
                    yield key, handle.result()
                except Exception as e:  # this request failed in the engine; the stream goes on
                    yield key, e
        finally:
            for handle in inflight.values():
                handle.cancel()

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yields text increments (always valid UTF-8) as tokens are generated; n must be 1.
        Closing the iterator (or dropping it) cancels the request. If the LLM is closed while the
        stream runs, it raises EngineClosedError after the text generated so far (a stream has
        no finish_reason to say "abort")."""
        params = params or self.default_params()
        if params.n != 1:
            raise InputError(f"stream() generates one sample; got n={params.n}")
        (request,), _ = self._requests([prompt], [params])
        handle = self._submit(request, prompt, bounded=False)
        try:
            for delta in handle:
                if delta.error is not None:
                    raise delta.error
                if delta.text:
                    yield delta.text
                if delta.finish_reason == "abort":
                    raise EngineClosedError(
                        "the LLM was closed while this stream ran; its text is incomplete"
                    )
        finally:
            handle.cancel()

    def score(
        self, prompts: Sequence[Prompt], continuations: Sequence[str | Sequence[int]]
    ) -> list[ScoreOutput]:
        """Per-token log-probabilities of each continuation given its prompt, and their sum.

        Every pair is checked first (a bad one raises an InputError naming it by its 0-based
        position, as `generate` names prompts: "score pair 1" is the second, before any device
        work); pairs of similar length are then scored together, up to `score_rows` per call."""
        if isinstance(prompts, str) != isinstance(continuations, str):
            raise InputError(
                "score takes a list of prompts and a list of continuations of the same length (or "
                "one string each)"
            )
        if isinstance(prompts, str):
            prompts, continuations = [prompts], [continuations]
        if len(prompts) != len(continuations):
            raise InputError(f"score got {len(prompts)} prompts but {len(continuations)} continuations")
        pairs = [
            self._score_pair(p, c, i) for i, (p, c) in enumerate(zip(prompts, continuations, strict=True))
        ]
        out: list[Any] = [None] * len(pairs)
        for i, result in self._scored(list(enumerate(pairs))):
            if isinstance(result, Exception):
                raise result
            out[i] = result
        return out

    def score_iter(
        self, items: Iterator[tuple[Any, Prompt, str | Sequence[int]]], window: int = 64
    ) -> Iterator[tuple[Any, ScoreOutput | Exception]]:
        """Scores a stream of (key, prompt, continuation), `window` pairs at a time grouped by
        length as `score` does. Yields (key, ScoreOutput), or (key, the InputError) for a bad pair
        (its message says "the score pair", never a number: the key says which, as in
        `generate_iter`) and (key, the exception) for pairs whose call failed; the stream goes
        on. On a closed LLM (or one closed while the stream runs) it raises EngineClosedError
        once, as `generate_iter` does."""
        items = iter(items)
        while chunk := list(itertools.islice(items, window)):
            ready = []
            for key, prompt, continuation in chunk:
                try:
                    ready.append((key, self._score_pair(prompt, continuation, None)))
                except InputError as e:
                    yield key, e
            yield from self._scored(ready)

    def _score_pair(self, prompt: Prompt, continuation: Any, index: int | None) -> tuple[list[int], int]:
        """(prompt + continuation ids, where the continuation starts), checked."""
        p_ids = self._encode(prompt, index)
        if isinstance(continuation, str):
            self._need_tokenizer("string continuations")
            c_ids = self.tokenizer.encode(continuation, add_special_tokens=False)
        else:
            what = item_name("continuation", index)
            c_ids = token_ids(continuation, what, "a string or a list of token ids")
        self.engine.check_score(p_ids + c_ids, len(p_ids), index)
        return p_ids + c_ids, len(p_ids)

    def _scored(self, pairs: list[tuple[Any, tuple[list[int], int]]]) -> Iterator[tuple[Any, Any]]:
        """Scores checked pairs, group by group on the engine loop (generation runs in between)."""
        for group in self.engine.score_groups([len(ids) for _, (ids, _) in pairs]):
            chosen = [pairs[i] for i in group]
            try:
                lps = self._loop.call(functools.partial(self.engine.score_group, [p for _, p in chosen]))
            except EngineClosedError:
                raise  # no later call can run either: once, as generate_iter and score raise it
            except Exception as e:  # this call failed: its pairs report it, the stream goes on
                yield from ((key, e) for key, _ in chosen)
                continue
            for (key, (ids, start)), lp in zip(chosen, lps, strict=True):
                yield key, ScoreOutput(ids[start:], [float(x) for x in lp])

    def close(self) -> None:
        """Stops the engine loop (requests still running end with finish_reason "abort"), joins
        its thread and frees the device memory: the engine drops the weights, the KV cache and the
        prefix-cache pool (arrays the caller passed to `from_params` stay the caller's). Later
        calls raise EngineClosedError. Idempotent. (A collected LLM only stops its loop: whoever
        still holds `llm.engine` keeps a working runner.)"""
        self._finalizer.detach()  # closed here: nothing left for the collector to do
        self._loop.close(on_exit=self.engine.release)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------------------
    def _params_list(self, params, n: int) -> list[SamplingParams]:
        if params is None:
            params = self.default_params()
        if isinstance(params, SamplingParams):
            return [params] * n
        if isinstance(params, dict) or not isinstance(params, Sequence):
            raise InputError(
                f"params is a {type(params).__name__}; expected a SamplingParams (e.g. "
                "jinfer.SamplingParams(max_tokens=64)), one per prompt in a list, or None"
            )
        params = list(params)
        if len(params) != n:
            raise InputError(f"got {n} prompts but {len(params)} SamplingParams; give one or one per prompt")
        return params

    def encode_prompt(self, prompt: Prompt, index: int | None = 0) -> list[int]:
        """A prompt's token ids as `generate` sees them (chat template applied to messages);
        InputError naming prompt `index` ("the prompt" for None) for one it cannot take."""
        return self._encode(prompt, index)

    def _encode(self, prompt: Prompt, index: int | None) -> list[int]:
        try:
            if isinstance(prompt, str):
                self._need_tokenizer("string prompts")
                return self.tokenizer.encode(prompt)
            if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict):
                self._need_tokenizer("chat messages")
                return self.tokenizer.encode_chat(prompt)
        except InputError as e:
            raise type(e)(f"{item_name('prompt', index)}: {e}") from None
        return token_ids(
            prompt, item_name("prompt", index), "a string, a list of token ids, or a list of chat messages"
        )

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise ConfigError(f"{what} need a tokenizer, and this model directory has no tokenizer.json")

    def _requests(self, prompts, params_list, numbered=True) -> tuple[list[Request], list[list[int]]]:
        """Checked Requests and their prompt ids; errors name prompt i by its position, or (not
        `numbered`) by no number: "the prompt" (see `item_name`)."""
        requests, ids_list = [], []
        for i, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
            index = i if numbered else None
            request = item_name("request", index)
            if not isinstance(params, SamplingParams):
                raise InputError(
                    f"{request} params is a {type(params).__name__}; expected a SamplingParams "
                    "(e.g. jinfer.SamplingParams(max_tokens=64)) or None"
                )
            ids = self._encode(prompt, index)
            self.engine.check_request(ids, params, index)
            stop_ids = tuple(params.stop_token_ids or ()) + (() if params.ignore_eos else self.eos_token_ids)
            stop_ids = tuple(dict.fromkeys(stop_ids))
            if len(stop_ids) > STOP_ID_SLOTS:  # only a model with many end-of-sequence ids gets here
                raise InvalidSamplingParamsError(
                    f"{request} stops at {len(stop_ids)} token ids (its stop_token_ids and the model's "
                    f"end-of-sequence ids {list(self.eos_token_ids)}); a request may stop at most at "
                    f"{STOP_ID_SLOTS} (give fewer stop_token_ids, or set ignore_eos=True)"
                )
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            requests.append(Request(ids, params, seed, stop_ids))
            ids_list.append(ids)
        return requests, ids_list


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, (bytes, bytearray)):
        raise InputError(f"prompts is {type(prompts).__name__}; decode it to a string first")
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict):
        return [prompts]  # one chat conversation
    if isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], (int, np.integer)):
        return [prompts]  # one list of token ids
    if not isinstance(prompts, Sequence):
        raise InputError(
            f"prompts is a {type(prompts).__name__}; expected a string, a list of token ids, chat messages, "
            "or a list of those"
        )
    return list(prompts)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return json_object(path.read_bytes(), path, ConfigError)


def _generation_config(max_batch, max_len, buckets, decode_steps, options) -> GenerationConfig:
    from jinfer import defaults

    accepted = {f.name for f in dataclasses.fields(GenerationConfig)} - {"prefill_buckets"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"LLM got unknown option(s) {unknown}; accepted: the LLM arguments and GenerationConfig "
            f"fields {sorted(accepted)}"
        )
    kw = dict(max_batch=max_batch, max_len=max_len, decode_steps=decode_steps, **options)
    if buckets is not None:
        kw["prefill_buckets"] = tuple(buckets)
    else:
        kw["prefill_buckets"] = defaults.default_prefill_buckets(max_len)
    return GenerationConfig(**kw)


def dtype_summary(params: Any) -> str:
    """ "float32", or "bfloat16 weights, float32 compute" when the matrices' dtype differs from the
    norms' (jinfer.precision); int8 matrices count as their compute dtype."""
    floats = [x for x in jax.tree.leaves(params) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
    if not floats:
        return "none"
    compute = str(jax.numpy.dtype(quant.compute_dtype(params)))
    matrices = [x for x in floats if x.ndim >= 2 and x.size > 1]  # the largest is a matrix
    weights = str(max(matrices, key=lambda x: x.size).dtype) if matrices else compute
    return compute if weights == compute else f"{weights} weights, {compute} compute"


def _engine_choices(
    config,
    params,
    mesh,
    layout,
    transposed,
    transposed_before,
    reasons,
    decode_buckets,
    prefill_rows,
    one_row_bytes=0,
):
    """The EngineChoices record of an engine: `reasons` from LLM.__init__, else "given"."""
    from jinfer import defaults

    reasons = reasons or {}
    given = "given (LLM.from_params)"
    dtype = dtype_summary(params)
    cache = config.cache_dtype or str(jax.numpy.dtype(quant.compute_dtype(params)))
    backend = defaults.backend_of(mesh)
    layout_choice = defaults.layout_choice(layout, transposed, backend, config.max_batch)
    if transposed_before:
        layout_choice = defaults.Choice("out_major", "as loaded (the model already holds out_major weights)")
    if one_row_bytes:
        layout_choice = defaults.one_row_layout_choice(layout_choice, one_row_bytes)
    return defaults.EngineChoices(
        backend=backend,
        dtype=defaults.Choice(dtype, f"{reasons.get('dtype', given)}; KV cache {cache}"),
        max_batch=defaults.Choice(config.max_batch, reasons.get("max_batch", given)),
        max_len=defaults.Choice(config.max_len, reasons.get("max_len", given)),
        prefill_buckets=defaults.Choice(config.prefill_buckets, reasons.get("prefill_buckets", given)),
        decode_buckets=defaults.decode_buckets_choice(config, decode_buckets),
        layout=layout_choice,
        prefill_rows=defaults.prefill_rows_choice(config, prefill_rows),
        cpu_kernels=defaults.Choice(*cpu_kernels.engine_choice(mesh or single_device_mesh())),
    )
