"""The model runner: compiled programs of one decoder model, and the device arrays they update.

It knows shapes and executables, never requests. Shapes never depend on traffic, which bounds
compilations and makes outputs reproducible:
  - prefill runs chunks of at most `prefill_block` prompt tokens at their bucket. A chunk that
    starts its sequence attends within the call, on a small cache of its own blocks that is then
    written into its slot's row; several such first chunks share one call (`prefill_rows`
    prompts, padded). A later chunk runs alone and attends to its row's cached prefix, reading
    only the blocks it reaches and writing its keys/values in the row itself (no row copy);
  - decode runs the first `bucket` slots together, `decode_steps` steps per host round trip, at
    a few compiled bucket sizes (`GenerationConfig.decode_batch_buckets`): the scheduler keeps the
    live requests in the lowest slots and picks the smallest bucket that holds them, so a lone
    request does not pay for idle slots (one bucket, max_batch, when `batch_invariant`);
  - the prefix-cache pool holds full prompt blocks; `save_block` / `load_block` copy one block
    between a slot's row and the pool, bit for bit;
  - the cache (and the pool) are donated to every executable that writes them: updated in place.

Letters: b decode slots, t prompt bucket, s cache length, v vocabulary, n top logprobs, j steps,
p prefill block, k kv heads, h head dim.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jinfer import compile as compile_lib
from jinfer import cpu_kernels, kvcache, quant, sampling
from jinfer.buckets import smallest_bucket
from jinfer.errors import (
    ConfigError,
    EmptyInputError,
    InvalidSamplingParamsError,
    InvalidTokenError,
    SequenceTooLongError,
)
from jinfer.kvcache import KVCache
from jinfer.modeling import FlaxModel
from jinfer.runtime.config import GenerationConfig
from jinfer.runtime.stats import GenerationStats
from jinfer.sampling import SamplerState, SamplingParams
from jinfer.sharding import ShardingRules, single_device_mesh

# Score pairs share a call (`ModelRunner.score_rows`) while it holds at most this many tokens:
# rows of a short bucket cost less per token together; past ~256 tokens one row alone is as fast.
SCORE_CALL_TOKENS = 256


@compile_lib.export_serializable
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Per-slot decode state (leading dim b). `tokens` is the last token, fed at `positions`."""

    tokens: Any  # i32[b]
    positions: Any  # i32[b]
    active: Any  # bool[b]
    remaining: Any  # i32[b] tokens still allowed
    stop_ids: Any  # i32[b, STOP_ID_SLOTS], -1 padded
    sampler: SamplerState

    @classmethod
    def empty(cls, b: int) -> DecodeState:
        return cls(
            tokens=np.zeros(b, np.int32),
            positions=np.zeros(b, np.int32),
            active=np.zeros(b, bool),
            remaining=np.zeros(b, np.int32),
            stop_ids=np.full((b, sampling.STOP_ID_SLOTS), -1, np.int32),
            sampler=SamplerState.empty(b),
        )


class ModelRunner:
    """Compiled prefill / first-token / decode / copy / block / score programs for one model.

    Holds the params, the KV cache (one row per decode slot), the prefix-cache pool and the
    executables (one per key, compiled on first use and counted in `stats`). Not thread-safe:
    one thread (the engine loop) drives it.
    """

    def __init__(
        self,
        model: FlaxModel,
        params: Any,
        config: GenerationConfig | None = None,
        *,
        mesh: Mesh | None = None,
        rules: ShardingRules | None = None,
        stats: GenerationStats | None = None,
        one_row: tuple[FlaxModel, Any] | None = None,
    ):
        """`one_row`: (model, params) that decode bucket 1 runs instead of (`model`, `params`): the
        same weights in another layout (`jinfer.loading.one_row_copy`); prefill and larger buckets
        run `params`."""
        if model.spec.task != "causal_lm":
            raise ConfigError(
                f"model class {model.spec.name!r} is a {model.spec.task!r} model, not causal_lm"
            )
        config = config or GenerationConfig()
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
        self.one_row = one_row
        self.stats = stats or GenerationStats()
        self._forward = model.apply_fn()
        self._logits = model.apply_fn("logits")
        self.dtype = config.cache_dtype or quant.compute_dtype(params)  # the norms', not the weights'
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        # jinfer's CPU kernels (few-row bfloat16 products) in this engine's programs: one CPU device
        self.cpu_kernels = cpu_kernels.wanted(self.mesh)
        self._executables = compile_lib.ExecutableCache(
            on_compile=lambda key, seconds: self.stats.record_compile(key, seconds),
            on_hit=lambda key: self.stats.hit(key),
        )
        self._abstract_cache = self._cache_spec(config.max_batch)
        self._zero_fns: dict[Any, Any] = {}
        self.cache = self._zero_cache()
        pool_shape = (config.cache_budget_blocks, config.prefill_block, mc.num_kv_heads, mc.head_dim)
        block_spec = jax.ShapeDtypeStruct(pool_shape, self.dtype, sharding=self._replicated)
        self._abstract_pool = ((block_spec,) * mc.num_layers, (block_spec,) * mc.num_layers)
        self.pool = None  # the prefix cache's blocks: allocated at the first block saved

    def release(self) -> None:
        """Drops the device arrays (params, the one-row copy, KV cache, prefix-cache pool) so that
        their memory is freed while the runner object lives on (a closed LLM). Only once nothing
        runs any more: every program needs them."""
        self.params = self.one_row = self.cache = self.pool = None
        self._zero_fns.clear()

    def _cache_spec(self, rows: int) -> KVCache:
        """ShapeDtypeStructs (with shardings) of a KV cache of `rows` rows of max_len positions."""
        mc, config = self.model.config, self.config
        dims = (rows, config.max_len, mc.num_kv_heads, mc.head_dim, config.block)
        shardings = (
            self.rules.sharding(self.mesh, kvcache.K_AXES, kvcache.k_shape(*dims), name="kv_cache.k"),
            self.rules.sharding(self.mesh, kvcache.V_AXES, kvcache.v_shape(*dims), name="kv_cache.v"),
        )
        return KVCache.abstract(
            mc.num_layers, *dims[:4], dtype=self.dtype, shardings=shardings, block=config.block
        )

    def _zero_cache(self, abstract: KVCache | None = None) -> KVCache:
        """A zero KV cache of `abstract`'s shapes and shardings (default: the decode slots'); one
        program per spec, compiled once (a new jitted lambda per call recompiled every time: each
        long `score` pair paid a compile)."""
        a = self._abstract_cache if abstract is None else abstract
        leaves, treedef = jax.tree.flatten(a)
        key = (treedef, tuple((x.shape, x.dtype, x.sharding) for x in leaves))
        if key not in self._zero_fns:
            self._zero_fns[key] = jax.jit(
                lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), a),
                out_shardings=jax.tree.map(lambda x: x.sharding, a),
            )
        return self._zero_fns[key]()

    def ensure_cache(self) -> bool:
        """Re-creates the KV cache if a failed executable consumed (donated) it; True if it did."""
        if any(x.is_deleted() for x in jax.tree.leaves(self.cache)):
            self.cache = self._zero_cache()
            return True
        return False

    # -- executables -------------------------------------------------------------------------
    def _executable(self, key: tuple, build: Callable[[], Any]) -> Any:
        return self._executables.get(key, build)

    def _abstract_params(self, params: Any = None) -> Any:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            self.params if params is None else params,
        )

    def _scalar(self, dtype=jnp.int32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((), dtype, sharding=self._replicated)

    def _spec(self, shape, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._replicated)

    def _lower(
        self, name: str, fn: Callable, args: tuple, model: FlaxModel | None = None, **jit_kwargs: Any
    ) -> Any:
        """jax.jit(fn, **jit_kwargs).lower(*args), via jinfer.compile's traced-program cache."""
        identity = repr(
            (name, model or self.model, self.config.compiled_shape(), self.rules, self.cpu_kernels)
        )
        fn = cpu_kernels.tracing_with(fn, self.cpu_kernels)
        return compile_lib.lower(fn, args, identity=identity, **jit_kwargs)

    def _cache_shardings(self) -> Any:
        return jax.tree.map(lambda x: x.sharding, self._abstract_cache)

    def _prefill_exe(self, bucket: int, continuation: bool = False) -> Any:
        """Prefill of one slot at `bucket` tokens. The default (a prompt's first piece, start 0)
        attends within the call; a `continuation` (a later chunk) attends to the slot's cached
        prefix as well."""

        def prefill(params, cache, slot, tokens, start, n_valid, total):
            rope = self._rope_kwargs(total)  # `total`: the whole prompt's length
            if not continuation:  # start is 0: write the piece's blocks only
                return self._prefill_fresh(params, cache, slot[None], tokens, n_valid[None], rope)
            # A later piece attends to the row's cached prefix: it is written and read in the
            # slot's row of the whole cache, in place (no copy of the row).
            idx = jnp.arange(tokens.shape[1], dtype=jnp.int32)
            positions = jnp.where(idx < n_valid, start + idx, -1)[None, :]
            hidden, cache = self._forward(params, tokens, positions, cache, cache_rows=slot[None], **rope)
            last = jax.lax.dynamic_slice_in_dim(hidden, n_valid - 1, 1, axis=1)[:, 0]
            return cache, self._logits(params, last)

        name = "prefill_continuation" if continuation else "prefill"

        def build():
            s = self._scalar()
            args = (
                self._abstract_params(),
                self._abstract_cache,
                s,
                self._spec((1, bucket), jnp.int32),
                s,
                s,
                s,
            )
            return self._lower(
                name,
                prefill,
                args,
                donate_argnums=(1,),
                out_shardings=(self._cache_shardings(), self._replicated),
            ).compile()

        return self._executable((name, bucket), build)

    def _rope_kwargs(self, total: jax.Array) -> dict[str, Any]:
        """Traced: the model's extra arguments for a chunk of a prompt of `total` tokens: for a
        LongRoPE model whether the whole prompt is past its original context (then every chunk
        rotates with the long factors, as one forward over the prompt does); {} otherwise."""
        since = getattr(self.model.config, "long_rope_from", None)
        return {} if since is None else {"long_rope": total > since}

    def _prefill_fresh(self, params, cache, slots, tokens, n_valid, rope=None):
        """Traced: prefill of pieces that start their sequences (positions 0 .. n_valid - 1 of
        tokens [r, t]) into the cache rows `slots` [r]; returns (cache, last tokens' logits [r, v]).
        Such pieces attend within the call, so they run on a small cache of their own blocks,
        which are then written into their rows: no cache row is read or copied whole (the zeros
        past a piece's end are never attended: positions are written before they are read).
        Slots >= max_batch (padding rows) are dropped."""
        rows, t = tokens.shape
        idx = jnp.arange(t, dtype=jnp.int32)
        positions = jnp.where(idx[None, :] < n_valid[:, None], idx[None, :], -1)
        mc, block = self.model.config, self.config.block
        fresh = KVCache.zeros(mc.num_layers, rows, t, mc.num_kv_heads, mc.head_dim, self.dtype, block=block)
        hidden, fresh = self._forward(params, tokens, positions, fresh, prompt_start=True, **(rope or {}))
        index = (slice(0, fresh.k[0].shape[0]), slots)  # [blocks, batch, ...]: these blocks, these rows
        cache = jax.tree.map(lambda c, r: c.at[index].set(r, mode="drop", unique_indices=True), cache, fresh)
        last = jnp.take_along_axis(hidden, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
        return cache, self._logits(params, last)

    @property
    def prefill_rows(self) -> int:
        """Prompts per batched prefill call (1: every prompt alone); see GenerationConfig."""
        return self.config.prefill_batch_rows(self.mesh.size)

    def _prefill_rows_exe(self, bucket: int) -> Any:
        """Prefill of the first piece of `prefill_rows` prompts (start 0), each into its own slot;
        returns the logits of each row's last token (see `_prefill_fresh`)."""
        rows = self.prefill_rows

        def build():
            args = (
                self._abstract_params(),
                self._abstract_cache,
                self._spec((rows,), jnp.int32),
                self._spec((rows, bucket), jnp.int32),
                self._spec((rows,), jnp.int32),
            )
            return self._lower(
                "prefill_rows",
                self._prefill_fresh,
                args,
                donate_argnums=(1,),
                out_shardings=(self._cache_shardings(), self._replicated),
            ).compile()

        return self._executable(("prefill_rows", rows, bucket), build)

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
        def copy(cache, src, dst, length):
            # Only the blocks holding positions < length are copied (a runtime trip count): a row
            # copy costs what the sequence holds, not max_len.
            def one(c):
                def block(i, c):
                    piece = jax.lax.dynamic_slice(c, (i, src) + (0,) * (c.ndim - 2), (1, 1, *c.shape[2:]))
                    return jax.lax.dynamic_update_slice(c, piece, (i, dst) + (0,) * (c.ndim - 2))

                blocks = jnp.clip((length + self.config.block - 1) // self.config.block, 0, c.shape[0])
                return jax.lax.fori_loop(0, blocks, block, c)

            return jax.tree.map(one, cache)

        def build():
            args = (self._abstract_cache, self._scalar(), self._scalar(), self._scalar())
            return self._lower(
                "copy_slot", copy, args, donate_argnums=(0,), out_shardings=self._cache_shardings()
            ).compile()

        return self._executable(("copy_slot",), build)

    def _block_index(self, start):
        """(cache block, offset) of the prefill block's positions start .. start + p - 1."""
        pos = start + jnp.arange(self.config.prefill_block, dtype=jnp.int32)
        return pos // self.config.block, pos % self.config.block

    def _save_block_exe(self) -> Any:
        def save(cache, pool, slot, start, index):
            blk, off = self._block_index(start)
            # Advanced indices split by slices go first: [p, k, h] for keys and values alike.
            keys = tuple(
                pk.at[index].set(ck[blk, slot, :, :, off]) for pk, ck in zip(pool[0], cache.k, strict=True)
            )
            values = tuple(
                pv.at[index].set(cv[blk, slot, :, off, :]) for pv, cv in zip(pool[1], cache.v, strict=True)
            )
            return keys, values

        def build():
            s = self._scalar()
            return self._lower(
                "save_block",
                save,
                (self._abstract_cache, self._abstract_pool, s, s, s),
                donate_argnums=(1,),
                out_shardings=jax.tree.map(lambda x: x.sharding, self._abstract_pool),
            ).compile()

        return self._executable(("save_block",), build)

    def _load_block_exe(self) -> Any:
        def load(cache, pool, slot, start, index):
            blk, off = self._block_index(start)
            k = tuple(
                ck.at[blk, slot, :, :, off].set(pk[index]) for ck, pk in zip(cache.k, pool[0], strict=True)
            )
            v = tuple(
                cv.at[blk, slot, :, off, :].set(pv[index]) for cv, pv in zip(cache.v, pool[1], strict=True)
            )
            return KVCache(k=k, v=v)

        def build():
            s = self._scalar()
            return self._lower(
                "load_block",
                load,
                (self._abstract_cache, self._abstract_pool, s, s, s),
                donate_argnums=(0,),
                out_shardings=self._cache_shardings(),
            ).compile()

        return self._executable(("load_block",), build)

    @property
    def decode_buckets(self) -> tuple[int, ...]:
        """Active-slot counts decode is compiled for (multiples of the mesh axis the slots are
        split over, when automatic)."""
        return self.config.decode_batch_buckets(self._batch_shards())

    def _batch_shards(self) -> int:
        spec = self._abstract_cache.k[0].sharding.spec
        axes = spec[kvcache.BATCH_AXIS] if len(spec) > kvcache.BATCH_AXIS else None
        axes = (axes,) if isinstance(axes, str) else axes or ()
        shards = 1
        for a in axes:
            shards *= self.mesh.shape[a]
        return shards

    def _decode_exe(self, bucket: int | None = None) -> Any:
        """Decode of cache rows 0 .. bucket - 1 (default: every slot)."""
        bucket = bucket or self.config.max_batch
        steps, n = self.config.decode_steps, self.config.max_logprobs
        model, params = self._decode_weights(bucket)

        def step(params, cache, state: DecodeState):
            positions = jnp.where(state.active, state.positions, -1)
            forward, logits_fn = model.apply_fn(), model.apply_fn("logits")  # (traced once)
            hidden, cache = forward(params, state.tokens[:, None], positions[:, None], cache)
            logits = logits_fn(params, hidden[:, 0])
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
            abstract_state = jax.tree.map(lambda x: self._spec(x.shape, x.dtype), DecodeState.empty(bucket))
            lowered = self._lower(
                f"decode{bucket}",
                decode,
                (self._abstract_params(params), self._abstract_cache, abstract_state),
                model=model,
                donate_argnums=(1,),
                out_shardings=(self._cache_shardings(), self._replicated, self._replicated),
            )
            return _compile(lowered, self._decode_compiler_options(params, model is not self.model))

        return self._executable(("decode", bucket), build)

    def _decode_weights(self, bucket: int) -> tuple[FlaxModel, Any]:
        """(model, params) decode runs at `bucket` rows: the one-row copy at bucket 1, if any."""
        if bucket == 1 and self.one_row is not None:
            return self.one_row
        return self.model, self.params

    def _decode_compiler_options(self, params: Any, one_row_layout: bool = False) -> dict[str, Any] | None:
        """XLA options for the decode executable over `params`.

        XLA:CPU's YNNPACK fusions speed up batched matmuls but slow down the float32
        matrix-vector products of one-slot decode: measured on a 32M-parameter Llama, +16-25 %
        batch-1 tokens/s without them, -40 % at 8 slots with them off. So they are turned off for
        1-slot engines and for the one-row copy's decode only, and kept where the weights are
        bfloat16 under float32 compute: YNNPACK multiplies those (10-20x slower without it).
        """
        if quant.has_narrow_weights(params):
            return None
        if jax.default_backend() == "cpu" and (self.config.max_batch == 1 or one_row_layout):
            return {"xla_cpu_experimental_ynn_fusion_type": ""}
        return None

    def _score_exe(self, bucket: int, rows: int = 1) -> Any:
        """Log-probabilities of each row's next tokens in one forward over `rows` sequences of up to
        `bucket` tokens (tokens [rows, bucket], n_valid [rows]; a row of n_valid 0 is padding)."""

        def score(params, tokens, n_valid):
            idx = jnp.arange(tokens.shape[1], dtype=jnp.int32)
            positions = jnp.where(idx[None, :] < n_valid[:, None], idx[None, :], -1)
            hidden, _ = self._forward(params, tokens, positions, None)
            logp = jax.nn.log_softmax(self._logits(params, hidden), axis=-1)
            nxt = jnp.roll(tokens, -1, axis=1)
            return jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]

        def build():
            args = (
                self._abstract_params(),
                self._spec((rows, bucket), jnp.int32),
                self._spec((rows,), jnp.int32),
            )
            return jax.jit(score, out_shardings=self._replicated).lower(*args).compile()

        return self._executable(("score", bucket) if rows == 1 else ("score", bucket, rows), build)

    def _score_chunk_exe(self) -> Any:
        """Scoring of a sequence longer than the largest bucket: one chunk of that many tokens per
        call, attending to the chunks before it through a one-row KV cache of its own (no decode
        slot is taken, and attention memory stays that of one chunk against max_len positions)."""
        bucket = self.config.prefill_buckets[-1]
        abstract = self._cache_spec(1)

        def score_chunk(params, cache, tokens, targets, start, n_valid, total):
            idx = jnp.arange(bucket, dtype=jnp.int32)
            positions = jnp.where(idx < n_valid, start + idx, -1)[None, :]
            row = jnp.zeros((1,), jnp.int32)
            rope = self._rope_kwargs(total)  # `total`: the whole sequence's length
            hidden, cache = self._forward(params, tokens, positions, cache, cache_rows=row, **rope)
            logp = jax.nn.log_softmax(self._logits(params, hidden), axis=-1)
            return cache, jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

        def build():
            s, chunk = self._scalar(), self._spec((1, bucket), jnp.int32)
            args = (self._abstract_params(), abstract, chunk, chunk, s, s, s)
            shardings = (jax.tree.map(lambda x: x.sharding, abstract), self._replicated)
            return self._lower(
                "score_chunk", score_chunk, args, donate_argnums=(1,), out_shardings=shardings
            ).compile()

        return self._executable(("score_chunk", bucket), build)

    def warmup(
        self, score: bool = False, run: bool = True, stop: threading.Event | None = None
    ) -> dict[tuple, float]:
        """Compiles every executable up front; returns seconds per executable key. Once `stop` is
        set (its caller was interrupted), raises CancelledError before the next program: what was
        compiled stays, the rest compiles on first use.

        With `run`, each prefill, decode (and score) program also runs once, on inputs that
        write nothing: XLA:CPU builds some kernels (YNNPACK's) at a program's first run, 0.2-0.5 s
        per program for SmolLM2, which the first requests would otherwise pay. No token is valid
        (n_valid 0, so positions -1; decode rows inactive) and prefill slots are >= max_batch
        (out of range), so every cache write is dropped: the cache keeps its bits."""
        cfg = self.config
        nowhere, none = self._nowhere(1)[0], np.int32(0)
        rows = self.prefill_rows
        for b in cfg.prefill_chunk_buckets:
            _raise_if_stopped(stop)
            tokens = np.zeros((1, b), np.int32)
            for continuation in (False, True)[: 1 + (cfg.max_prompt_len > cfg.prefill_block)]:
                exe = self._prefill_exe(b, continuation=continuation)
                if run:
                    self.cache, _ = exe(self.params, self.cache, nowhere, tokens, none, none, none)
            if rows > 1:
                exe = self._prefill_rows_exe(b)
                if run:
                    args = (self._nowhere(rows), np.zeros((rows, b), np.int32), np.zeros(rows, np.int32))
                    self.cache, _ = exe(self.params, self.cache, *args)
        if score:
            for b in cfg.prefill_buckets:
                _raise_if_stopped(stop)
                rows = self.score_rows(b)
                exe = self._score_exe(b, rows)
                if run:
                    exe(self.params, np.zeros((rows, b), np.int32), np.ones(rows, np.int32))
            if cfg.max_len > cfg.prefill_buckets[-1]:
                exe, chunk = self._score_chunk_exe(), np.zeros((1, cfg.prefill_buckets[-1]), np.int32)
                if run:
                    exe(self.params, self._zero_cache(self._cache_spec(1)), chunk, chunk, none, none, none)
        self._first_token_exe()
        self._copy_slot_exe()
        for bucket in self.decode_buckets:
            _raise_if_stopped(stop)
            exe = self._decode_exe(bucket)
            if run:
                params = self._decode_weights(bucket)[1]
                self.cache, _, _ = exe(params, self.cache, DecodeState.empty(bucket))
        if cfg.cache_budget_blocks:
            self._ensure_pool()  # warm-up allocates everything a request may need
            self._save_block_exe()
            if cfg.max_prompt_len > cfg.prefill_block:
                self._load_block_exe()
        jax.block_until_ready(self.cache)
        return dict(self.stats.compile_seconds)

    def _nowhere(self, count: int) -> np.ndarray:
        """`count` distinct slot ids past the last slot: a prefill row sent there writes nothing
        (its cache scatter is dropped as out of range)."""
        return np.arange(self.config.max_batch, self.config.max_batch + count, dtype=np.int32)

    # -- programs ----------------------------------------------------------------------------------
    def prefill(self, slot: int, piece: Sequence[int], start: int, total: int | None = None) -> jax.Array:
        """Prefills `piece` (at most prefill_block tokens) at positions start.. of `slot`'s row,
        a piece of a prompt of `total` tokens (default: it ends the prompt); returns the logits of
        its last token (f32[1, v])."""
        total = start + len(piece) if total is None else total
        bucket = smallest_bucket(self.config.prefill_buckets, len(piece))
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, : len(piece)] = piece
        exe = self._prefill_exe(bucket, continuation=start > 0)
        self.stats.record_padding(len(piece), bucket)
        self.cache, logits = exe(
            self.params,
            self.cache,
            np.int32(slot),
            tokens,
            np.int32(start),
            np.int32(len(piece)),
            np.int32(total),
        )
        return logits

    def prefill_first_pieces(self, slots: Sequence[int], pieces: Sequence[Sequence[int]]) -> np.ndarray:
        """Prefills the first pieces (start 0, each at most prefill_block tokens) of
        `prefill_rows` prompts or fewer in one call, each into its slot; returns their last
        tokens' logits (f32[len(pieces), v], on the host). Missing rows are padding (write nothing)."""
        rows = self.prefill_rows
        n = len(pieces)
        if not 1 <= n <= rows or len(slots) != n or len(set(slots)) != n:
            raise ValueError(f"{n} pieces for {len(slots)} distinct slots; need 1 .. {rows} of each")
        bucket = smallest_bucket(self.config.prefill_buckets, max(len(p) for p in pieces))
        slot_ids = np.concatenate([np.asarray(slots, np.int32), self._nowhere(rows - n)])
        tokens = np.zeros((rows, bucket), np.int32)
        n_valid = np.zeros(rows, np.int32)
        for i, piece in enumerate(pieces):
            tokens[i, : len(piece)] = piece
            n_valid[i] = len(piece)
            self.stats.record_padding(len(piece), bucket)
        self.stats.record_padding(0, bucket * (rows - n))
        exe = self._prefill_rows_exe(bucket)
        self.cache, logits = exe(self.params, self.cache, slot_ids, tokens, n_valid)
        return np.asarray(logits)[:n]

    def first_token(self, logits: jax.Array, sampler: SamplerState, position: int) -> tuple[np.ndarray, ...]:
        """(token i32[1], logprob f32[1], top ids i32[1, n], top logprobs f32[1, n]) on the host."""
        outs = self._first_token_exe()(logits, sampler, np.array([position], np.int32))
        return tuple(np.asarray(x) for x in outs)

    def copy_slot(self, src: int, dst: int, length: int | None = None) -> None:
        """Copies positions 0 .. length - 1 (default: all) of `src`'s cache row into `dst`'s."""
        length = self.config.max_len if length is None else length
        self.cache = self._copy_slot_exe()(self.cache, np.int32(src), np.int32(dst), np.int32(length))

    def _ensure_pool(self) -> None:
        if self.pool is None:
            self.pool = jax.jit(
                lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._abstract_pool),
                out_shardings=jax.tree.map(lambda s: s.sharding, self._abstract_pool),
            )()

    def save_block(self, slot: int, start: int, index: int) -> None:
        """Copies positions start .. start + prefill_block - 1 of `slot`'s row into pool block `index`."""
        self._ensure_pool()
        self.pool = self._save_block_exe()(
            self.cache, self.pool, np.int32(slot), np.int32(start), np.int32(index)
        )

    def load_block(self, slot: int, start: int, index: int) -> None:
        """Copies pool block `index` into positions start .. start + prefill_block - 1 of `slot`'s row."""
        self.cache = self._load_block_exe()(
            self.cache, self.pool, np.int32(slot), np.int32(start), np.int32(index)
        )

    def decode(
        self, state: DecodeState, bucket: int | None = None
    ) -> tuple[DecodeState, tuple[np.ndarray, ...]]:
        """Runs decode_steps steps on slots 0 .. bucket - 1 (`state` holds those rows; default:
        every slot); returns their new state and (tokens [b, j] (-1 where inactive), logprob
        [b, j], top ids [b, j, n], top logprobs [b, j, n]) on the host."""
        params = self._decode_weights(bucket or self.config.max_batch)[1]
        self.cache, new_state, outs = self._decode_exe(bucket)(params, self.cache, state)
        return jax.tree.map(np.array, new_state), tuple(np.asarray(x) for x in outs)

    def score(self, ids: Sequence[int], start: int) -> np.ndarray:
        """Log-probabilities of ids[start:] given the preceding tokens (f32[len(ids) - start])."""
        self.check_score(ids, start)
        return self.score_group([(ids, start)])[0]

    def check_score(self, ids: Sequence[int], start: int, index: int | None = 0) -> None:
        """Raises an InputError subclass for a score pair (prompt + continuation `ids`, the
        continuation starting at `start`) that cannot run; no device work. Messages name the pair
        by `index` (see `item_name`)."""
        n, cfg, pair = len(ids), self.config, item_name("score pair", index)
        if not 1 <= start < n:
            raise EmptyInputError(
                f"{pair} needs a non-empty prompt and continuation (got {start} and {n - start} tokens)"
            )
        if n > cfg.max_len:
            raise SequenceTooLongError(
                f"{pair}: prompt + continuation has {n:,} tokens but max_len is "
                f"{cfg.max_len:,} (raise max_len to >= {n:,} or shorten them)"
            )
        bad = [t for t in ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise InvalidTokenError(
                f"{pair} has token id {bad[0]} outside the vocabulary [0, {self.vocab_size})"
            )

    def score_rows(self, bucket: int) -> int:
        """Rows of the score program at `bucket` tokens: up to `prefill_rows`, at most
        SCORE_CALL_TOKENS tokens per call (1 with batch_invariant). Every call at a bucket has
        these rows, a lone pair padded: a pair's log-probabilities depend on its bucket alone,
        never on the pairs scored with it (the rows of one call are computed independently;
        with bfloat16 matrices on XLA:CPU, 1 and 4 rows of 16 tokens rounded differently)."""
        return max(1, min(self.prefill_rows, SCORE_CALL_TOKENS // bucket))

    def score_groups(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices of pairs (of these token counts) to score together, one `score_group` each:
        sorted by length, up to `score_rows` pairs of the same bucket per call. A pair never runs
        at a larger bucket than alone (bucket shapes may round differently: with bfloat16
        matrices on XLA:CPU a pair's log-probabilities moved by up to 0.07 between buckets)."""
        buckets = self.config.prefill_buckets

        def bucket(n: int) -> int:
            return smallest_bucket(buckets, n) if n <= buckets[-1] else -n  # longer: alone

        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        groups: list[list[int]] = []
        for i in order:
            b = bucket(lengths[i])
            last = groups[-1] if groups else None
            if last and b > 0 and bucket(lengths[last[0]]) == b and len(last) < self.score_rows(b):
                last.append(i)
            else:
                groups.append([i])
        return groups

    def score_group(self, pairs: Sequence[tuple[Sequence[int], int]]) -> list[np.ndarray]:
        """Log-probabilities of each pair's continuation (pairs checked by `check_score`, grouped
        by `score_groups`): one call for the group, or chunks for one pair longer than every
        bucket."""
        buckets = self.config.prefill_buckets
        longest = max(len(ids) for ids, _ in pairs)
        if longest > buckets[-1]:
            ((ids, start),) = pairs
            return [self._score_in_chunks(ids)[start - 1 :]]
        bucket = smallest_bucket(buckets, longest)
        rows = self.score_rows(bucket)  # a lone pair too: its bits never depend on its companions
        tokens, n_valid = np.zeros((rows, bucket), np.int32), np.zeros(rows, np.int32)
        for r, (ids, _) in enumerate(pairs):
            tokens[r, : len(ids)], n_valid[r] = ids, len(ids)
        out = np.asarray(self._score_exe(bucket, rows)(self.params, tokens, n_valid))
        return [out[r, start - 1 : len(ids) - 1] for r, (ids, start) in enumerate(pairs)]

    def _score_in_chunks(self, ids: Sequence[int]) -> np.ndarray:
        """Log-probabilities of ids[1:] (f32[len(ids) - 1]), one largest-bucket chunk per call."""
        chunk, n = self.config.prefill_buckets[-1], len(ids)
        exe, cache = self._score_chunk_exe(), self._zero_cache(self._cache_spec(1))
        out = []
        for start in range(0, n - 1, chunk):
            valid = min(chunk, n - 1 - start)  # the last token predicts nothing
            tokens, targets = np.zeros((2, 1, chunk), np.int32)
            tokens[0, :valid] = ids[start : start + valid]
            targets[0, :valid] = ids[start + 1 : start + 1 + valid]
            cache, lp = exe(
                self.params, cache, tokens, targets, np.int32(start), np.int32(valid), np.int32(n)
            )
            out.append(np.asarray(lp)[0, :valid])
        return np.concatenate(out)

    # -- validation ----------------------------------------------------------------------------
    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams, index: int | None = 0) -> None:
        """Raises an InputError subclass for a request that cannot run; no device work. Messages
        name the prompt by `index` (see `item_name`)."""
        cfg = self.config
        n = len(prompt_ids)
        prompt, request = item_name("prompt", index), item_name("request", index)
        if n == 0:
            raise EmptyInputError(f"{prompt} is empty; give at least one token")
        bad = [t for t in prompt_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise InvalidTokenError(
                f"{prompt} has token id {bad[0]} outside the vocabulary [0, {self.vocab_size})"
            )
        if n > cfg.max_prompt_len:
            raise SequenceTooLongError(
                f"{prompt} has {n:,} tokens; max_len is {cfg.max_len:,}, so a prompt may have "
                f"at most {cfg.max_prompt_len:,} (raise max_len or shorten the prompt)"
            )
        if params.max_tokens >= cfg.max_len:
            raise SequenceTooLongError(
                f"{request} asks for max_tokens={params.max_tokens:,}, but max_len is "
                f"{cfg.max_len:,}: prompt + generated tokens must fit, so max_tokens may be at most "
                f"{cfg.max_len - n:,} for this {n:,}-token prompt (lower max_tokens or raise max_len)"
            )
        if n + params.max_tokens > cfg.max_len:
            raise SequenceTooLongError(
                f"{prompt} has {n:,} tokens and asks for max_tokens={params.max_tokens:,}, but "
                f"max_len is {cfg.max_len:,}: the prompt may have at most "
                f"{cfg.max_len - params.max_tokens:,} tokens (lower max_tokens or raise max_len)"
            )
        if params.n > cfg.max_batch:
            raise InvalidSamplingParamsError(
                f"{request} asks for n={params.n} samples but the engine has {cfg.max_batch} decode slots"
            )
        if params.logprobs is not None and params.logprobs > cfg.max_logprobs:
            raise InvalidSamplingParamsError(
                f"{request} asks for logprobs={params.logprobs}; this engine computes at most "
                f"{cfg.max_logprobs} (build it with a larger max_logprobs, e.g. "
                f"LLM(model, max_logprobs={params.logprobs}))"
            )
        bad = [t for t in params.stop_token_ids or () if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise InvalidTokenError(
                f"{request} has stop token id {bad[0]} outside the vocabulary [0, {self.vocab_size})"
            )


def item_name(what: str, index: int | None) -> str:
    """How an error names one input: "prompt 1" by its 0-based position in a list the caller
    passed (LLM.generate, LLM.score), "the prompt" where the caller names it another way (a key
    in LLM.generate_iter / score_iter, the file's line number in run-batch)."""
    return f"the {what}" if index is None else f"{what} {index}"


def _raise_if_stopped(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise CancelledError("the warm-up was stopped: its caller was interrupted")


def _compile(lowered: Any, options: dict[str, Any] | None) -> Any:
    """lowered.compile(options), falling back to default options if this XLA rejects them."""
    if options:
        # An option unknown to another jaxlib version must not break generation: use defaults.
        with contextlib.suppress(Exception):
            return lowered.compile(compiler_options=options)
    return lowered.compile()
