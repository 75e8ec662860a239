"""Bucketed inference engine: one ahead-of-time compiled executable per (batch, seq_len) bucket.

The engine wraps a pure forward `fn(params, inputs[b, t, ...], mask[b, t]) -> outputs[b, ...]`
(any pytree of arrays with a leading batch axis). Examples of any length are padded to the
smallest bucket that fits (see `jinfer.buckets`), so the set of shapes the device ever sees is
fixed by config, compiled once (`warmup()`), and counted (`stats`). The engine never calls jit on
a raw request shape.

Input dtype: integer examples become int32 (token ids, checked against the vocabulary: bool,
complex and out-of-range ids are an InputError), floating examples become the
engine's float input dtype, which is the dtype of the first floating parameter (the compute
dtype: bf16 params => bf16 inputs) or float32 when there is none. `input_dtype=` overrides.

Sharding: params by their logical axes (FlaxModel) or replicated / `param_shardings=` (plain fn);
inputs by logical axes ("batch", "length", None...), mask ("batch", "length"), every output leaf
("batch", None...). A mesh axis that does not divide a bucket's dimension is dropped for that
bucket (batch 1 on data=2 is replicated), so every bucket compiles on every mesh.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jinfer.buckets import BucketKey, Buckets, fit_example, pad_batch, plan_batches, unpad_outputs
from jinfer.compile import COMPILES, ExecutableCache, maybe_enable_from_env
from jinfer.errors import ConfigError, EngineClosedError, InputError
from jinfer.modeling import FlaxModel
from jinfer.sharding import ShardingRules, replicated, resolve_mesh, single_device_mesh

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's counters.

    Attributes:
      compiles: executables this engine compiled (at most one per bucket).
      compile_seconds: wall time of this engine's lower + compile calls.
      xla_compiles / xla_compile_seconds: real XLA compile events in the whole process since the
        engine was created (jinfer.compile.COMPILES; includes other engines and threads).
      bucket_hits: device calls per (batch, seq_len) bucket.
      real_elements / padded_elements: positions (rows x sequence) holding data vs. computed.
      padding_efficiency: real_elements / padded_elements, cumulative (1.0 before any call).
      examples_served: examples whose outputs were returned.
      calls: device calls.
    """

    compiles: int
    compile_seconds: float
    xla_compiles: int
    xla_compile_seconds: float
    bucket_hits: dict[BucketKey, int]
    real_elements: int
    padded_elements: int
    padding_efficiency: float
    examples_served: int
    calls: int


def _check_values(x: np.ndarray, index: int | str, input_dtype: np.dtype, vocab_size: int | None) -> None:
    """InputError for examples that would compute garbage silently: bool/complex/object data, ids
    outside the embedding table (NaN outputs) or beyond int32 (wrapped on conversion)."""
    if x.dtype.kind not in "iuf":
        raise InputError(
            f"example {index} has dtype {x.dtype}; accepted: integer token ids or real numbers (not bool, "
            "complex, strings or objects)"
        )
    if not jnp.issubdtype(input_dtype, jnp.integer) or x.size == 0:
        return
    low, high = int(x.min()), int(x.max())
    limit = vocab_size if vocab_size is not None else int(np.iinfo(input_dtype).max) + 1
    if low < 0 or high >= limit:
        bad = low if low < 0 else high
        raise InputError(f"example {index} has token id {bad}; accepted: ids in [0, {limit})")


@dataclasses.dataclass
class _Counters:
    compile_seconds: float = 0.0
    bucket_hits: dict = dataclasses.field(default_factory=dict)
    real: int = 0
    padded: int = 0
    served: int = 0
    calls: int = 0


def _float_compute_dtype(params: Any) -> np.dtype:
    for leaf in jax.tree.leaves(params):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return np.dtype(leaf.dtype)
    return np.dtype(np.float32)


class Engine:
    """Bucketed, sharded, ahead-of-time compiled inference over a pure forward function.

    Args:
      model_or_apply_fn: a `FlaxModel` (its `apply_fn()` is the forward, params sharded by its
        logical axes) or a callable `fn(params, inputs[b, t, ...], mask[b, t]) -> outputs[b, ...]`.
      params: nested dict of arrays.
      buckets: the compiled shapes; `seq_lens` empty for fixed-shape inputs (images).
      mesh: device mesh (default: one device). rules: logical-axis rules (default ShardingRules()).
      input_dtype: dtype of the model input; default int32 for token models, or the kind of the
        Linen model's example input (float => the params' compute dtype).
      example_shape: one example's shape without the sequence axis: trailing feature dims for
        sequence inputs (default ()), the whole shape for fixed-shape inputs (default from a Linen
        spec's example_inputs).
      param_shardings: for a plain callable, a tree of shardings for params (default replicated).
      per_token_outputs: outputs have a per-token axis 1 equal to the bucket length; strip padding.
      truncate: default for predict(): cut too-long examples to the largest bucket instead of raising.
      batcher_config: `jinfer.batcher.BatcherConfig` for `submit()` (default BatcherConfig()).
    """

    def __init__(
        self,
        model_or_apply_fn: FlaxModel | Callable[..., Any],
        params: Any,
        *,
        buckets: Buckets | None = None,
        mesh: Mesh | None = None,
        rules: ShardingRules | None = None,
        input_dtype: Any = None,
        example_shape: Sequence[int] | None = None,
        param_shardings: Any = None,
        per_token_outputs: bool = False,
        truncate: bool = False,
        batcher_config: Any = None,
    ):
        maybe_enable_from_env()
        self.buckets = buckets or Buckets()
        self.mesh = mesh if mesh is not None else single_device_mesh()
        self.rules = rules or ShardingRules()
        self.per_token_outputs = per_token_outputs
        self.truncate = truncate
        self._batcher_config = batcher_config
        model = model_or_apply_fn if isinstance(model_or_apply_fn, FlaxModel) else None
        if model is not None:
            params = model.checked_params(params)
            self.forward = model.apply_fn()
            shardings = model.shardings(self.mesh, self.rules)
        else:
            self.forward = model_or_apply_fn
            shardings = param_shardings or jax.tree.map(lambda _: replicated(self.mesh), params)
        self.param_shardings = shardings
        self.params = jax.device_put(params, shardings)
        self.input_dtype, self.example_shape = self._resolve_inputs(model, input_dtype, example_shape)
        self.vocab_size = getattr(model.config, "vocab_size", None) if model is not None else None
        self._executables = ExecutableCache(on_compile=self._record_compile)
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._compile_start = COMPILES.snapshot()
        self._closed = False
        self._batcher = None

    @classmethod
    def from_model_dir(
        cls,
        path: str,
        *,
        mesh: Mesh | None = None,
        buckets: Buckets | None = None,
        dtype: Any = None,
        rules: ShardingRules | None = None,
        **engine_kwargs: Any,
    ) -> Engine:
        """Engine for a registered model saved in a jinfer model directory (restored onto `mesh`)."""
        from jinfer import loading

        mesh = resolve_mesh(mesh, rules)
        loaded = loading.load(path, mesh=mesh, rules=rules, dtype=dtype)
        return cls(loaded.model, loaded.params, buckets=buckets, mesh=mesh, rules=rules, **engine_kwargs)

    @classmethod
    def from_flax(cls, module: Any, variables: Any = None, *, example: Any, **kwargs: Any) -> Engine:
        """Engine for any Linen or NNX module, its input spec taken from one `example`.

        See `jinfer.flax_engine.from_flax` for the arguments (buckets, variable_axes, mesh,
        apply_kwargs, mask_arg, ...).
        """
        from jinfer.flax_engine import from_flax

        return from_flax(module, variables, example=example, **kwargs)

    # -- inputs ----------------------------------------------------------------------------
    def _resolve_inputs(self, model, input_dtype, example_shape) -> tuple[np.dtype, tuple[int, ...]]:
        example = None
        if model is not None and model.spec.example_inputs is not None:
            example = model.spec.example_inputs(model.config)[0]
        if example_shape is None:
            if self.buckets.has_seq:
                example_shape = ()
            elif example is not None:
                example_shape = tuple(example.shape[1:])
            else:
                raise ConfigError(
                    "Engine: fixed-shape buckets (no seq_lens) need example_shape= (one example's shape)"
                )
        if input_dtype is None:
            floating = example is not None and jnp.issubdtype(example.dtype, jnp.floating)
            input_dtype = _float_compute_dtype(self.params) if floating else np.int32
        return np.dtype(input_dtype), tuple(int(d) for d in example_shape)

    def prepare_example(
        self, example: Any, index: int | str = "?", truncate: bool | None = None
    ) -> np.ndarray:
        """Validates one example and converts it to the input dtype (host only, no device work).

        Raises InputError subclasses naming `index`: wrong shape, float data for an integer input,
        empty, or longer than the largest bucket (unless truncating).
        """
        x = np.asarray(example)
        seq = self.buckets.has_seq
        want = ("t", *self.example_shape) if seq else self.example_shape
        got_features = x.shape[1:] if seq else x.shape
        if (seq and x.ndim != len(want)) or tuple(got_features) != self.example_shape:
            raise InputError(f"example {index} has shape {x.shape}; expected {want}")
        if jnp.issubdtype(x.dtype, jnp.floating) and not jnp.issubdtype(self.input_dtype, jnp.floating):
            raise InputError(
                f"example {index} has dtype {x.dtype} but the model input is {self.input_dtype}; "
                "pass integer ids"
            )
        _check_values(x, index, self.input_dtype, self.vocab_size)
        x = fit_example(x, self.buckets, index, self.truncate if truncate is None else truncate)
        return x.astype(self.input_dtype, copy=False)

    def _length(self, x: np.ndarray) -> int | None:
        return int(x.shape[0]) if self.buckets.has_seq else None

    # -- compilation -----------------------------------------------------------------------
    def _input_axes(self, extra_dims: int) -> tuple[str | None, ...]:
        return ("batch", "length" if self.buckets.has_seq else None) + (None,) * extra_dims

    def _abstract_inputs(self, key: BucketKey):
        batch, seq_len = key
        if seq_len is None:
            shape = (batch, *self.example_shape)
            mask_shape = (batch, self.example_shape[0] if self.example_shape else 1)
        else:
            shape = (batch, seq_len, *self.example_shape)
            mask_shape = (batch, seq_len)
        in_sh = self.rules.sharding(
            self.mesh, self._input_axes(len(shape) - 2)[: len(shape)], shape, "inputs"
        )
        mask_sh = self.rules.sharding(self.mesh, self._input_axes(0), mask_shape, "mask")
        return (
            jax.ShapeDtypeStruct(shape, self.input_dtype, sharding=in_sh),
            jax.ShapeDtypeStruct(mask_shape, np.dtype(bool), sharding=mask_sh),
        )

    def _compile(self, key: BucketKey):
        inputs, mask = self._abstract_inputs(key)
        abstract_params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.params
        )
        out_shapes = jax.eval_shape(self.forward, abstract_params, inputs, mask)
        out_sh = jax.tree.map(
            lambda s: self.rules.sharding(self.mesh, ("batch",) + (None,) * (s.ndim - 1), s.shape, "output"),
            out_shapes,
        )
        # Inputs may be a pytree of arrays (Engine.from_flax); shardings follow its structure.
        in_sh, mask_sh = (jax.tree.map(lambda s: s.sharding, a) for a in (inputs, mask))
        in_shardings = (self.param_shardings, in_sh, mask_sh)
        jitted = jax.jit(self.forward, in_shardings=in_shardings, out_shardings=out_sh)
        return jitted.lower(abstract_params, inputs, mask).compile(), (in_sh, mask_sh)

    def executable(self, key: BucketKey):
        """The AOT executable of bucket `key` = (batch, seq_len), compiled on first use."""
        return self._executables.get(key, lambda: self._compile(key))

    def _record_compile(self, key: BucketKey, seconds: float) -> None:
        with self._lock:
            self._counters.compile_seconds += seconds
        logger.info("jinfer: compiled bucket %s in %.3f s", key, seconds)

    def warmup(self, progress: bool = False) -> dict[BucketKey, float]:
        """Compiles every bucket now; returns seconds per bucket (0.0 for already compiled ones)."""
        from tqdm.auto import tqdm

        times = {}
        for key in tqdm(self.buckets.keys(), desc="jinfer warmup", disable=not progress):
            start = time.perf_counter()
            self.executable(key)
            times[key] = time.perf_counter() - start
        logger.info("jinfer: warmup compiled %d buckets in %.2f s", len(times), sum(times.values()))
        return times

    # -- running ---------------------------------------------------------------------------
    def _dispatch(self, examples: Sequence[np.ndarray], batch: int, seq_len: int | None):
        """Pads, places and launches one bucket call (async); returns the device outputs."""
        inputs, mask = pad_batch(examples, batch, seq_len, self.input_dtype)
        real = sum(int(x.shape[0]) for x in examples) if seq_len is not None else len(examples)
        padded = batch * (seq_len if seq_len is not None else 1)
        return self._launch((batch, seq_len), inputs, mask, real, padded)

    def _launch(self, key: BucketKey, inputs: Any, mask: Any, real: int, padded: int):
        """Counts one call of bucket `key` and launches it on padded host `inputs` and `mask`."""
        exe, (in_sh, mask_sh) = self.executable(key)
        params = self.params
        if params is None:  # closed while this call was on its way (another thread, the batcher)
            self._check_open()
        with self._lock:
            c = self._counters
            c.bucket_hits[key] = c.bucket_hits.get(key, 0) + 1
            c.real += real
            c.padded += padded
            c.calls += 1
        return exe(params, jax.device_put(inputs, in_sh), jax.device_put(mask, mask_sh))

    def _collect(self, out: Any, examples: Sequence[np.ndarray], seq_len: int | None) -> list[Any]:
        results = self._unpad(jax.device_get(out), examples, seq_len)
        with self._lock:
            self._counters.served += len(examples)
        return results

    def _unpad(self, host: Any, examples: Sequence[np.ndarray], seq_len: int | None) -> list[Any]:
        lengths = [self._length(x) for x in examples]
        return unpad_outputs(host, lengths, seq_len, self.per_token_outputs)

    def request_bucket(self, example: Any) -> Any:
        """The sequence bucket of one prepared example (None for fixed-shape inputs)."""
        return self.buckets.seq_bucket(self._length(example)) if self.buckets.has_seq else None

    def run_batch(self, examples: Sequence[np.ndarray], seq_len: int | None) -> list[Any]:
        """Runs prepared examples (all in bucket `seq_len`, at most max_batch) in one device call."""
        batch = self.buckets.batch_bucket(len(examples))
        return self._collect(self._dispatch(examples, batch, seq_len), examples, seq_len)

    def predict(self, examples: Sequence[Any], *, truncate: bool | None = None) -> list[Any]:
        """One output (numpy array, or pytree of them) per example, in input order.

        All examples are validated before any device work. They are sorted by length, grouped by
        sequence bucket and split into calls of at most max_batch rows; all calls are dispatched
        before the first result is fetched.
        """
        self._check_open()
        prepared = [self.prepare_example(x, i, truncate) for i, x in enumerate(examples)]
        plans = plan_batches([self._length(x) for x in prepared], self.buckets)
        launched = []
        for plan in plans:
            batch_examples = [prepared[i] for i in plan.indices]
            launched.append((plan, batch_examples, self._dispatch(batch_examples, plan.batch, plan.seq_len)))
        results: list[Any] = [None] * len(prepared)
        for plan, batch_examples, out in launched:
            for i, result in zip(plan.indices, self._collect(out, batch_examples, plan.seq_len), strict=True):
                results[i] = result
        return results

    # -- real-time serving -----------------------------------------------------------------
    def submit(self, example: Any, timeout: float | None = None) -> Future:
        """Queues one example for the background batcher; returns a Future of its output.

        Invalid examples raise here (InputError); a full queue raises OverloadedError; a closed
        engine raises EngineClosedError. See `jinfer.batcher.Batcher` for timeout semantics.
        """
        self._check_open()
        with self._lock:
            if self._batcher is None:
                from jinfer.batcher import Batcher, BatcherConfig

                self._batcher = Batcher(self, self._batcher_config or BatcherConfig())
                # a collected engine stops its batcher's thread (the thread holds it weakly)
                weakref.finalize(self, self._batcher.close, drain=False, timeout=0)
            batcher = self._batcher
        return batcher.submit(example, timeout=timeout)

    def close(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stops accepting requests; with `drain` finishes queued ones, else cancels them. Then
        drops the params (the device memory is freed unless the caller holds the same arrays);
        a call still on its way raises EngineClosedError. Idempotent."""
        with self._lock:
            self._closed = True
            batcher = self._batcher
        if batcher is not None:
            batcher.close(drain=drain, timeout=timeout)
        self.params = None

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("engine is closed; create a new Engine to serve more requests")

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stats(self) -> EngineStats:
        """Snapshot of compile, bucket and padding counters."""
        count, seconds, _ = COMPILES.snapshot()
        with self._lock:
            c = self._counters
            return EngineStats(
                compiles=len(self._executables),
                compile_seconds=c.compile_seconds,
                xla_compiles=count - self._compile_start[0],
                xla_compile_seconds=seconds - self._compile_start[1],
                bucket_hits=dict(c.bucket_hits),
                real_elements=c.real,
                padded_elements=c.padded,
                padding_efficiency=c.real / c.padded if c.padded else 1.0,
                examples_served=c.served,
                calls=c.calls,
            )
