"""The generation engine: prefill per request, continuous batching over fixed decode slots.

Shapes never depend on traffic, which bounds compilations and makes outputs reproducible:
  - prefill runs one request at a time (batch 1) at its prompt-length bucket and writes that
    request's keys/values into one row (slot) of the shared cache;
  - decode runs all `max_batch` slots together, `decode_steps` steps per host round trip, with one
    compiled shape; a finished slot is refilled from the queue at the next host sync;
  - the cache is donated to every executable, so it is updated in place.

A request's tokens depend only on its prompt, its sampling params and its seed: never on its
slot or its batch companions (each row of the fixed-shape decode batch is computed the same way).

Letters: b decode slots, t prompt bucket, s cache length, v vocabulary, n top logprobs, j steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jinfer import compile as compile_lib
from jinfer import kvcache, sampling
from jinfer.errors import (
    ConfigError,
    EmptyInputError,
    InvalidSamplingParamsError,
    InvalidTokenError,
    SequenceTooLongError,
)
from jinfer.kvcache import KVCache
from jinfer.modeling import FlaxModel
from jinfer.models import layers
from jinfer.sampling import SamplerState, SamplingParams
from jinfer.sharding import ShardingRules, single_device_mesh


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Static shape of the generation engine (everything that decides what gets compiled).

    Attributes:
      max_batch: decode slots (requests generating at once).
      max_len: cache length per slot: prompt + generated tokens must fit.
      prefill_buckets: prompt lengths prefill is compiled for.
      decode_steps: decode steps run on device per host round trip.
      max_logprobs: top-n log-probabilities computed on device (a request may ask for <= this).
      prefill_chunk: when set, prompts longer than the largest bucket are prefilled in chunks of
        this size (must be a bucket); when None they are rejected.
      cache_dtype: dtype of the KV cache; None = the params' dtype.
      cache_block: positions per KV-cache block (decode skips the blocks no slot has reached; see
        jinfer.kvcache); None = automatic: one block for a one-slot engine (little to skip),
        else 64 positions (measured on SmolLM2-135M, 32 slots, max_len 512: blocks of 64 decode
        1.3-1.5x faster than one block, see BENCHMARKS.md). The cache holds max_len rounded up
        to whole blocks.
    """

    max_batch: int = 8
    max_len: int = 1024
    prefill_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    decode_steps: int = 8
    max_logprobs: int = 5
    prefill_chunk: int | None = None
    cache_dtype: str | None = None
    cache_block: int | None = None

    def __post_init__(self):
        buckets = tuple(sorted(set(int(b) for b in self.prefill_buckets)))
        object.__setattr__(self, "prefill_buckets", buckets)
        if self.max_batch < 1 or self.max_len < 2 or self.decode_steps < 1 or not buckets:
            raise ConfigError(
                f"GenerationConfig: max_batch={self.max_batch}, max_len={self.max_len}, "
                f"decode_steps={self.decode_steps}, prefill_buckets={buckets}: need max_batch >= 1, "
                "max_len >= 2, decode_steps >= 1 and at least one prefill bucket"
            )
        if buckets[0] < 1 or buckets[-1] > self.max_len:
            raise ConfigError(f"prefill buckets {buckets} must lie in [1, max_len={self.max_len}]")
        if self.prefill_chunk is not None and self.prefill_chunk not in buckets:
            raise ConfigError(f"prefill_chunk={self.prefill_chunk} must be one of the buckets {buckets}")
        if self.cache_block is not None and not 1 <= self.cache_block <= self.max_len:
            raise ConfigError(f"cache_block={self.cache_block} must lie in [1, max_len={self.max_len}]")

    @property
    def block(self) -> int:
        """Positions per KV-cache block (`cache_block`, or the automatic choice)."""
        if self.cache_block is not None:
            return self.cache_block
        if self.max_batch == 1:
            return self.max_len
        return min(self.max_len, 64)

    @property
    def max_prompt_len(self) -> int:
        return self.max_len - 1 if self.prefill_chunk else self.prefill_buckets[-1]


@dataclasses.dataclass
class Request:
    """One prompt to generate for (already tokenized and validated)."""

    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    stop_token_ids: tuple[int, ...]


@dataclasses.dataclass
class SampleResult:
    """Generated tokens of one sample (request index, sample index)."""

    request: int
    sample: int
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


@compile_lib.export_serializable
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Per-slot decode state (leading dim b). `tokens` is the last token, fed at `positions`."""

    tokens: Any  # i32[b]
    positions: Any  # i32[b]
    active: Any  # bool[b]
    remaining: Any  # i32[b] tokens still allowed
    stop_ids: Any  # i32[b, MAX_STOP_TOKEN_IDS], -1 padded
    sampler: SamplerState

    @classmethod
    def empty(cls, b: int) -> DecodeState:
        return cls(
            tokens=np.zeros(b, np.int32),
            positions=np.zeros(b, np.int32),
            active=np.zeros(b, bool),
            remaining=np.zeros(b, np.int32),
            stop_ids=np.full((b, sampling.MAX_STOP_TOKEN_IDS), -1, np.int32),
            sampler=SamplerState.empty(b),
        )


@dataclasses.dataclass
class _Slot:
    result: SampleResult
    params: SamplingParams
    stop_token_ids: tuple[int, ...]


@dataclasses.dataclass
class GenerationStats:
    """Compile and padding accounting of a GenerationEngine (one executable per key)."""

    compile_seconds: dict[tuple, float] = dataclasses.field(default_factory=dict)
    hits: dict[tuple, int] = dataclasses.field(default_factory=dict)
    prompt_tokens: int = 0
    padded_prompt_tokens: int = 0
    generated_tokens: int = 0

    def record_compile(self, key: tuple, seconds: float) -> None:
        self.compile_seconds[key] = seconds

    def hit(self, key: tuple) -> None:
        self.hits[key] = self.hits.get(key, 0) + 1

    def record_padding(self, real: int, padded: int) -> None:
        self.prompt_tokens += real
        self.padded_prompt_tokens += padded

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

    def summary(self) -> dict[str, Any]:
        return {
            "compiles": self.compiles,
            "compile_seconds": round(self.compile_time, 3),
            "padding_efficiency": round(self.padding_efficiency, 4),
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "executables": {"/".join(map(str, k)): v for k, v in self.hits.items()},
        }


class GenerationEngine:
    """Compiled prefill/decode executables for one decoder model plus the slot scheduler."""

    def __init__(
        self,
        model: FlaxModel,
        params: Any,
        config: GenerationConfig = GenerationConfig(),
        *,
        mesh: Mesh | None = None,
        rules: ShardingRules | None = None,
    ):
        if model.spec.task != "causal_lm":
            raise ConfigError(
                f"model class {model.spec.name!r} is a {model.spec.task!r} model, not causal_lm"
            )
        mc = model.config
        if config.max_len > getattr(mc, "max_position_embeddings", config.max_len):
            raise ConfigError(
                f"max_len={config.max_len} exceeds the model's max_position_embeddings="
                f"{mc.max_position_embeddings}"
            )
        compile_lib.maybe_enable_from_env()
        self.model = model
        self.config = config
        self.mesh = mesh or single_device_mesh()
        self.rules = rules or ShardingRules()
        self.vocab_size = int(mc.vocab_size)
        self.params = params
        self._forward = model.apply_fn()
        self._logits = model.apply_fn("logits")
        dtype = config.cache_dtype or _params_dtype(params)
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        cache_dims = (config.max_batch, config.max_len, mc.num_kv_heads, mc.head_dim, config.block)
        cache_shardings = (
            self.rules.sharding(self.mesh, kvcache.K_AXES, kvcache.k_shape(*cache_dims), name="kv_cache.k"),
            self.rules.sharding(self.mesh, kvcache.V_AXES, kvcache.v_shape(*cache_dims), name="kv_cache.v"),
        )
        self._abstract_cache = KVCache.abstract(
            mc.num_layers, *cache_dims[:4], dtype=dtype, shardings=cache_shardings, block=config.block
        )
        self._param_shardings = jax.tree.map(lambda x: x.sharding, params)
        self.cache = jax.jit(
            lambda: KVCache.zeros(mc.num_layers, *cache_dims[:4], dtype=dtype, block=config.block),
            out_shardings=jax.tree.map(lambda x: x.sharding, self._abstract_cache),
        )()
        self.state = DecodeState.empty(config.max_batch)
        self.slots: list[_Slot | None] = [None] * config.max_batch
        self._executables: dict[tuple, Any] = {}
        self.stats = GenerationStats()

    # -- executables -------------------------------------------------------------------------
    def _executable(self, key: tuple, build: Callable[[], Any]) -> Any:
        exe = self._executables.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = build()
            self.stats.record_compile(key, time.perf_counter() - t0)
            self._executables[key] = exe
        self.stats.hit(key)
        return exe

    def _abstract_params(self) -> Any:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.params
        )

    def _scalar(self, dtype=jnp.int32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((), dtype, sharding=self._replicated)

    def _spec(self, shape, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._replicated)

    def _prefill_exe(self, bucket: int, continuation: bool = False) -> Any:
        """Prefill of one slot at `bucket` tokens. The default (a prompt's first piece, start 0)
        attends within the call; a `continuation` (a later chunk of a long prompt) attends to the
        slot's cached prefix as well."""

        def prefill(params, cache, slot, tokens, start, n_valid):
            idx = jnp.arange(tokens.shape[1], dtype=jnp.int32)
            positions = jnp.where(idx < n_valid, start + idx, -1)[None, :]
            row = jax.tree.map(
                lambda c: jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=kvcache.BATCH_AXIS), cache
            )
            with contextlib.nullcontext() if continuation else layers.prompt_is_whole_prefix():
                hidden, row = self._forward(params, tokens, positions, row)
            cache = jax.tree.map(
                lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot, axis=kvcache.BATCH_AXIS),
                cache,
                row,
            )
            last = jax.lax.dynamic_slice_in_dim(hidden, n_valid - 1, 1, axis=1)[:, 0]
            return cache, self._logits(params, last)

        def build():
            s = self._scalar()
            args = (
                self._abstract_params(),
                self._abstract_cache,
                s,
                self._spec((1, bucket), jnp.int32),
                s,
                s,
            )
            return self._lower(
                "prefill_continuation" if continuation else "prefill",
                prefill,
                args,
                donate_argnums=(1,),
                out_shardings=(self._cache_shardings(), self._replicated),
            ).compile()

        return self._executable(("prefill_continuation" if continuation else "prefill", bucket), build)

    def _lower(self, name: str, fn: Callable, args: tuple, **jit_kwargs: Any) -> Any:
        """jax.jit(fn, **jit_kwargs).lower(*args), via jinfer.compile's traced-program cache."""
        identity = repr((name, self.model, self.config, self.rules))
        return compile_lib.lower(fn, args, identity=identity, **jit_kwargs)

    def _cache_shardings(self) -> Any:
        return jax.tree.map(lambda x: x.sharding, self._abstract_cache)

    def _first_token_exe(self) -> Any:
        n = self.config.max_logprobs

        def first(logits, sampler, position):
            token = sampling.sample(logits, sampler, position)
            return token, *sampling.token_logprobs(logits, token, n)

        def build():
            sampler = jax.tree.map(lambda x: self._spec(x.shape, x.dtype), SamplerState.empty(1))
            args = (self._spec((1, self.vocab_size), jnp.float32), sampler, self._spec((1,), jnp.int32))
            return self._lower("first_token", first, args).compile()

        return self._executable(("first_token",), build)

    def _copy_slot_exe(self) -> Any:
        def copy(cache, src, dst):
            def one(c):
                row = jax.lax.dynamic_slice_in_dim(c, src, 1, axis=kvcache.BATCH_AXIS)
                return jax.lax.dynamic_update_slice_in_dim(c, row, dst, axis=kvcache.BATCH_AXIS)

            return jax.tree.map(one, cache)

        def build():
            args = (self._abstract_cache, self._scalar(), self._scalar())
            return self._lower(
                "copy_slot", copy, args, donate_argnums=(0,), out_shardings=self._cache_shardings()
            ).compile()

        return self._executable(("copy_slot",), build)

    def _decode_exe(self) -> Any:
        steps, n = self.config.decode_steps, self.config.max_logprobs

        def step(params, cache, state: DecodeState):
            positions = jnp.where(state.active, state.positions, -1)
            hidden, cache = self._forward(params, state.tokens[:, None], positions[:, None], cache)
            logits = self._logits(params, hidden[:, 0])
            token = sampling.sample(logits, state.sampler, state.positions + 1)
            logprob, top_ids, top_lp = sampling.token_logprobs(logits, token, n)
            out_token = jnp.where(state.active, token, -1)
            stopped = (token[:, None] == state.stop_ids).any(-1)
            remaining = state.remaining - state.active.astype(jnp.int32)
            active = state.active & ~stopped & (remaining > 0)
            state = dataclasses.replace(
                state,
                tokens=jnp.where(state.active, token, state.tokens),
                positions=state.positions + state.active.astype(jnp.int32),
                active=active,
                remaining=remaining,
            )
            return cache, state, (out_token, logprob, top_ids, top_lp)

        def decode(params, cache, state):
            def body(carry, _):
                cache, state = carry
                cache, state, out = step(params, cache, state)
                return (cache, state), out

            (cache, state), outs = jax.lax.scan(body, (cache, state), None, length=steps)
            # scan stacks on axis 0: [j, b, ...] -> [b, j, ...]
            return cache, state, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outs)

        def build():
            abstract_state = jax.tree.map(lambda x: self._spec(x.shape, x.dtype), self.state)
            lowered = self._lower(
                "decode",
                decode,
                (self._abstract_params(), self._abstract_cache, abstract_state),
                donate_argnums=(1,),
                out_shardings=(self._cache_shardings(), self._replicated, self._replicated),
            )
            return _compile(lowered, self._decode_compiler_options())

        return self._executable(("decode",), build)

    def _decode_compiler_options(self) -> dict[str, Any] | None:
        """XLA options for the decode executable.

        XLA:CPU's YNNPACK fusions speed up batched matmuls but slow down the matrix-vector
        products of one-slot decode: measured on a 32M-parameter Llama, +16-25 % batch-1 tokens/s
        without them, -40 % at 8 slots with them off. So they are turned off for 1-slot engines only.
        """
        if jax.default_backend() == "cpu" and self.config.max_batch == 1:
            return {"xla_cpu_experimental_ynn_fusion_type": ""}
        return None

    def _score_exe(self, bucket: int) -> Any:
        def score(params, tokens, n_valid):
            idx = jnp.arange(tokens.shape[1], dtype=jnp.int32)
            positions = jnp.where(idx < n_valid, idx, -1)[None, :]
            hidden, _ = self._forward(params, tokens, positions, None)
            logp = jax.nn.log_softmax(self._logits(params, hidden), axis=-1)
            nxt = jnp.roll(tokens, -1, axis=1)
            return jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]

        def build():
            return (
                jax.jit(score, out_shardings=self._replicated)
                .lower(self._abstract_params(), self._spec((1, bucket), jnp.int32), self._scalar())
                .compile()
            )

        return self._executable(("score", bucket), build)

    def warmup(self, score: bool = False) -> dict[tuple, float]:
        """Compiles every executable up front; returns seconds per executable key."""
        for b in self.config.prefill_buckets:
            self._prefill_exe(b)
            if self.config.prefill_chunk and b <= self.config.prefill_chunk:
                self._prefill_exe(b, continuation=True)
            if score:
                self._score_exe(b)
        self._first_token_exe()
        self._copy_slot_exe()
        self._decode_exe()
        return dict(self.stats.compile_seconds)

    # -- validation ----------------------------------------------------------------------------
    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams, index: int = 0) -> None:
        """Raises an InputError subclass for a request that cannot run; no device work."""
        cfg = self.config
        n = len(prompt_ids)
        if n == 0:
            raise EmptyInputError(f"prompt {index} is empty; give at least one token")
        bad = [t for t in prompt_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise InvalidTokenError(
                f"prompt {index} has token id {bad[0]} outside the vocabulary [0, {self.vocab_size})"
            )
        if n > cfg.max_prompt_len:
            raise SequenceTooLongError(
                f"prompt {index} has {n:,} tokens; the largest prefill bucket is {cfg.prefill_buckets[-1]:,} "
                "(add a bucket, set prefill_chunk, or shorten the prompt)"
            )
        if n + params.max_tokens > cfg.max_len:
            raise SequenceTooLongError(
                f"prompt {index} has {n:,} tokens and asks for max_tokens={params.max_tokens:,}, but "
                f"max_len is {cfg.max_len:,}: the prompt may have at most "
                f"{cfg.max_len - params.max_tokens:,} tokens (lower max_tokens or raise max_len)"
            )
        if params.n > cfg.max_batch:
            raise InvalidSamplingParamsError(
                f"request {index} asks for n={params.n} samples but the engine has "
                f"{cfg.max_batch} decode slots"
            )
        if params.logprobs is not None and params.logprobs > cfg.max_logprobs:
            raise InvalidSamplingParamsError(
                f"request {index} asks for logprobs={params.logprobs}; this engine computes at most "
                f"{cfg.max_logprobs} (raise GenerationConfig.max_logprobs)"
            )

    # -- scheduling ------------------------------------------------------------------------------
    def run(self, requests: Sequence[Request]) -> Iterator[tuple[SampleResult, list[int], bool]]:
        """Generates for all requests; yields (result, new_token_ids, finished) after each host sync.

        All requests are validated first (nothing runs if one is invalid). Results are yielded for
        every sample with new tokens; `result.request` is the index in `requests`. Stop strings
        are applied by the caller via `finish()` (they need detokenization).
        """
        for i, r in enumerate(requests):
            self.check_request(r.prompt_ids, r.params, i)
        return self.run_stream(iter(requests))

    def run_stream(self, requests: Iterator[Request]) -> Iterator[tuple[SampleResult, list[int], bool]]:
        """Like `run`, but pulls requests lazily: a new one is taken only when slots are free.

        Requests must already be validated (`check_request`). Continuous batching over an
        unbounded stream: memory stays bounded by the slot count.
        """
        pending: deque[Request] = deque()
        index = 0
        exhausted = False
        while True:
            while not exhausted and len(pending) == 0:
                nxt = next(requests, None)
                if nxt is None:
                    exhausted = True
                else:
                    pending.append(nxt)
            while pending and self._free_slots() >= pending[0].params.n:
                yield from self._admit(index, pending.popleft())
                index += 1
                if not pending and not exhausted:
                    nxt = next(requests, None)
                    if nxt is None:
                        exhausted = True
                    else:
                        pending.append(nxt)
            if any(s is not None for s in self.slots):
                yield from self._decode_round()
            elif exhausted and not pending:
                return

    def _free_slots(self) -> int:
        return sum(s is None for s in self.slots)

    def _prefill(self, slot: int, prompt: list[int]) -> jax.Array:
        cfg = self.config
        chunk = cfg.prefill_chunk or cfg.prefill_buckets[-1]
        logits = None
        for start in range(0, len(prompt), chunk):
            piece = prompt[start : start + chunk]
            bucket = next(b for b in cfg.prefill_buckets if b >= len(piece))
            tokens = np.zeros((1, bucket), np.int32)
            tokens[0, : len(piece)] = piece
            exe = self._prefill_exe(bucket, continuation=start > 0)
            self.cache, logits = exe(
                self.params, self.cache, np.int32(slot), tokens, np.int32(start), np.int32(len(piece))
            )
        self.stats.record_padding(len(prompt), _padded_len(len(prompt), cfg))
        return logits

    def _admit(self, idx: int, req: Request) -> Iterator[tuple[SampleResult, list[int], bool]]:
        free = [i for i, s in enumerate(self.slots) if s is None][: req.params.n]
        logits = self._prefill(free[0], req.prompt_ids)
        for k, slot in enumerate(free):
            if k > 0:
                self.cache = self._copy_slot_exe()(self.cache, np.int32(free[0]), np.int32(slot))
            key = sampling.request_key(req.seed, k)
            sampler = SamplerState.from_params([req.params], [key])
            pos = len(req.prompt_ids)
            token, lp, top_ids, top_lp = self._first_token_exe()(logits, sampler, np.array([pos], np.int32))
            token = int(np.asarray(token)[0])
            result = SampleResult(request=idx, sample=k)
            self._record(
                result,
                req.params,
                [token],
                np.asarray(lp)[0:1],
                np.asarray(top_ids)[0:1],
                np.asarray(top_lp)[0:1],
            )
            stopped = token in req.stop_token_ids
            done = stopped or req.params.max_tokens == 1
            if done:
                result.finish_reason = "stop" if stopped else "length"
                yield result, [token], True
                continue
            self.slots[slot] = _Slot(result, req.params, req.stop_token_ids)
            self._set_row(slot, req, token, pos, sampler)
            yield result, [token], False

    def _set_row(self, slot: int, req: Request, token: int, pos: int, sampler: SamplerState) -> None:
        st = self.state
        st.tokens[slot], st.positions[slot] = token, pos
        st.active[slot], st.remaining[slot] = True, req.params.max_tokens - 1
        st.stop_ids[slot] = -1
        st.stop_ids[slot, : len(req.stop_token_ids)] = req.stop_token_ids
        for name in ("temperature", "top_k", "top_p", "min_p", "key"):
            getattr(st.sampler, name)[slot] = getattr(sampler, name)[0]

    def _decode_round(self) -> Iterator[tuple[SampleResult, list[int], bool]]:
        exe = self._decode_exe()
        self.cache, new_state, outs = exe(self.params, self.cache, self.state)
        tokens, lps, top_ids, top_lps = (np.asarray(x) for x in outs)
        new_state = jax.tree.map(np.array, new_state)
        # Host state stays authoritative; only these fields change on device.
        self.state.tokens, self.state.positions = new_state.tokens, new_state.positions
        self.state.active, self.state.remaining = new_state.active, new_state.remaining
        for slot, entry in enumerate(self.slots):
            if entry is None:
                continue
            valid = tokens[slot] >= 0
            new = tokens[slot][valid].tolist()
            r = entry.result
            self._record(r, entry.params, new, lps[slot][valid], top_ids[slot][valid], top_lps[slot][valid])
            finished = not bool(self.state.active[slot])
            if finished:
                r.finish_reason = "stop" if new and new[-1] in entry.stop_token_ids else "length"
                self.release(slot)
            yield r, new, finished

    def _record(self, r: SampleResult, params: SamplingParams | None, tokens, lp, top_ids, top_lp) -> None:
        r.token_ids.extend(int(t) for t in tokens)
        self.stats.generated_tokens += len(tokens)
        want = None if params is None else params.logprobs
        if want is None:
            return
        for i, t in enumerate(tokens):
            entry = {int(t): float(lp[i])}
            for tid, val in zip(top_ids[i][:want], top_lp[i][:want], strict=True):
                entry.setdefault(int(tid), float(val))
            r.logprobs.append(entry)

    def finish(self, result: SampleResult, reason: str) -> None:
        """Ends a sample early (a stop string was found); frees its slot at once."""
        result.finish_reason = reason
        for slot, entry in enumerate(self.slots):
            if entry is not None and entry.result is result:
                self.release(slot)

    def release(self, slot: int) -> None:
        self.slots[slot] = None
        self.state.active[slot] = False

    # -- scoring ---------------------------------------------------------------------------------
    def score(self, ids: Sequence[int], start: int) -> np.ndarray:
        """Log-probabilities of ids[start:] given the preceding tokens (f32[len(ids) - start])."""
        n = len(ids)
        if not 1 <= start < n:
            raise EmptyInputError(
                f"score needs a non-empty prompt and continuation (got {start} and {n - start})"
            )
        if n > self.config.prefill_buckets[-1]:
            raise SequenceTooLongError(
                f"prompt + continuation has {n:,} tokens; the largest bucket is "
                f"{self.config.prefill_buckets[-1]:,}"
            )
        bad = [t for t in ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise InvalidTokenError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        bucket = next(b for b in self.config.prefill_buckets if b >= n)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :n] = ids
        out = np.asarray(self._score_exe(bucket)(self.params, tokens, np.int32(n)))[0]
        return out[start - 1 : n - 1]


def _compile(lowered: Any, options: dict[str, Any] | None) -> Any:
    """lowered.compile(options), falling back to default options if this XLA rejects them."""
    if options:
        # An option unknown to another jaxlib version must not break generation: use defaults.
        with contextlib.suppress(Exception):
            return lowered.compile(compiler_options=options)
    return lowered.compile()


def _padded_len(n: int, cfg: GenerationConfig) -> int:
    chunk = cfg.prefill_chunk or cfg.prefill_buckets[-1]
    total = 0
    for start in range(0, n, chunk):
        piece = min(chunk, n - start)
        total += next(b for b in cfg.prefill_buckets if b >= piece)
    return total


def _params_dtype(params: Any) -> Any:
    floats = [x.dtype for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    return floats[0] if floats else jnp.float32
