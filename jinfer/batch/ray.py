"""`run-batch` on a Ray cluster: one driver owns the output, replicas (Ray actors) generate.

The driver reads the input, hands out chunks of raw lines to replicas, and is the only writer of
the output file. Each replica is a Ray actor that loads the model once on its own devices and
turns a chunk of lines into finished rows with the offline runner's code (`_Run._generate` /
`_score` / `_embed`, the same row builders, the same seeds derived from the run seed and the
custom_id), so every row is byte-identical to the one a single-process run writes. A replica keeps
one generation stream over the chunks queued to it (the driver keeps `chunks_in_flight` per
replica), so its decode slots do not drain between chunks.

Exactly once: a chunk's rows are appended by the driver when its result arrives, and a chunk is
either in flight, re-queued or written, never two of these. A replica that dies (RayActorError)
is replaced by a fresh actor and its in-flight chunks go back to the queue; nothing of theirs was
written. A driver that dies leaves the output as a local run does (complete rows + maybe a torn
tail); the rerun repairs the tail and skips every row already written (`files.scan_output`).

Order: like the local run, rows are appended in completion order (the local run sorts each window
by prompt length and writes rows as slots finish); neither promises an order, both promise the
same set of lines.

Ray Data: `RowMapper` is a callable class for `Dataset.map_batches` that turns input rows into
the same output rows; there, retries and exactly-once are Ray Data's, not jinfer's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jinfer.batch import files
from jinfer.batch.records import Item, RowOptions, build_item, key_hash, line_identity, row_key
from jinfer.batch.runner import (
    BatchOptions,
    Summary,
    _load_model,
    _Progress,
    _Run,
    _stats_snapshot,
)
from jinfer.errors import ConfigError, JinferError

_ACTOR_OPTION_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")
_LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024  # rows are small; keep shared memory low
REPLICA_NAME_PREFIX = "jinfer-replica-"


class ReplicaLostError(JinferError):
    """A chunk of lines lost its replica more often than `RayOptions.max_attempts` allows."""


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """Where and how a batch run uses Ray.

    Attributes:
      address: None starts a local Ray instance for the run (stopped at the end); "auto",
        "host:port" or "ray://host:10001" joins a running cluster. When Ray is already
        initialised in this process (a notebook's `ray.init()`), that session is used as is.
      replicas: model replicas (Ray actors). None: one per alive node that has the resources of
        one replica.
      resources_per_replica: Ray actor resources of one replica: num_cpus, num_gpus, memory,
        resources, accelerator_type; any other key is a custom resource (e.g. {"TPU": 4}).
        Empty: {"num_cpus": 1}.
      chunk_lines: input lines per work unit (a replica sorts a chunk by prompt length).
      chunks_in_flight: chunks queued per replica, so a replica never waits for the driver.
      max_attempts: a chunk whose replica dies this many times fails the run (ReplicaLostError).
      object_store_memory: bytes of shared memory of a local instance (None: Ray's default).
    """

    address: str | None = None
    replicas: int | None = None
    resources_per_replica: dict[str, Any] = dataclasses.field(default_factory=dict)
    chunk_lines: int = 32
    chunks_in_flight: int = 2
    max_attempts: int = 3
    object_store_memory: int | None = _LOCAL_OBJECT_STORE_BYTES

    def __post_init__(self):
        if self.replicas is not None and self.replicas < 1:
            raise ConfigError(f"replicas={self.replicas}; give at least 1")
        if self.chunk_lines < 1 or self.chunks_in_flight < 1 or self.max_attempts < 1:
            raise ConfigError(
                f"chunk_lines={self.chunk_lines}, chunks_in_flight={self.chunks_in_flight}, "
                f"max_attempts={self.max_attempts}: each must be >= 1"
            )
        actor_options(self.resources_per_replica)  # validates

    @classmethod
    def parse_resources(cls, text: str) -> dict[str, Any]:
        """`--resources-per-replica` JSON -> dict (ConfigError naming the flag on bad input)."""
        try:
            value = json.loads(text)
        except ValueError as e:
            raise ConfigError(
                f"--resources-per-replica {text!r} is not JSON; "
                "e.g. '{\"num_gpus\": 1}' or '{\"TPU\": 4}'"
            ) from e
        if not isinstance(value, dict):
            raise ConfigError(f"--resources-per-replica {text!r} must be a JSON object")
        return value


def actor_options(resources: dict[str, Any]) -> dict[str, Any]:
    """Ray actor options of one replica from `resources_per_replica`."""
    out: dict[str, Any] = {"num_cpus": 1} if not resources else {}
    custom: dict[str, float] = {}
    for key, value in resources.items():
        if key == "resources":
            if not isinstance(value, dict):
                raise ConfigError(f"resources_per_replica['resources'] must be an object, got {value!r}")
            custom.update(value)
        elif key in _ACTOR_OPTION_KEYS:
            out[key] = value
        else:
            custom[key] = value
    for key, value in (*((k, v) for k, v in out.items() if k != "accelerator_type"), *custom.items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"resources_per_replica[{key!r}]={value!r}; give a number >= 0")
    if custom:
        out["resources"] = custom
    return out


# -- the replica ---------------------------------------------------------------------------------
class _ChunkRun(_Run):
    """The offline runner's per-line machinery, fed by chunks, writing rows back to their chunk.

    One background thread runs the task over a stream of chunks (`_Run._generate` & co.): a chunk
    queued while another is generating joins the same `generate_iter`, so decode slots do not
    drain between chunks (only when the queue is empty). `run_chunk` blocks until every line of
    its chunk has its row; several callers may wait at once (a threaded Ray actor).
    """

    def __init__(self, opts: BatchOptions, llm_or_model: Any, defaults: Any):
        super().__init__(opts, Path(os.devnull), Path(os.devnull))
        self.model = _load_model(llm_or_model, opts, 1)
        given = llm_or_model if isinstance(llm_or_model, (str, os.PathLike)) else None
        self.model_path = getattr(self.model, "path", None) or given
        self.defaults, self.run_seed = self._resolve_defaults(defaults)
        self.manifest = self._manifest()
        path = self.manifest["model"]["path"]
        self.rows = RowOptions(
            opts.format,
            opts.return_token_ids,
            Path(path).name if path else "jinfer",
            getattr(self.model, "tokenizer", None),
        )
        self.progress = _Progress(False, 0, 0, 0.0)
        self.summary = Summary("", opts.task, 0)
        self.writer = _RowList()
        self._queue: queue.Queue[list[Item]] = queue.Queue()
        self._owner: dict[bytes, _PendingChunk] = {}
        self._lock = threading.Lock()
        self._stats = _stats_snapshot(getattr(self.model, "stats", None))
        threading.Thread(target=self._serve, name="jinfer-replica", daemon=True).start()

    def run_chunk(self, lines: list[tuple[int, bytes]]) -> dict[str, Any]:
        """Rows of `lines` ((line number, raw bytes)) in completion order, with per-row counts."""
        items = [build_item(*line_identity(raw, number), number, self.opts.task) for number, raw in lines]
        if not items:
            return {
                "rows": [],
                "counts": [],
                "compile_seconds": 0.0,
                "prefill_tokens": 0,
                "padded_prefill_tokens": 0,
            }
        chunk = _PendingChunk(len(items))
        with self._lock:
            for item in items:
                self._owner[item.key] = chunk
        self._queue.put(items)
        chunk.done.wait()
        if chunk.error is not None:
            raise chunk.error
        return chunk.result

    def _serve(self) -> None:
        task = {"generate": self._generate, "score": self._score, "embed": self._embed}[self.opts.task]
        while True:
            first = self._queue.get()  # idle until a chunk comes

            def chunks(first=first) -> Iterator[list[Item]]:
                yield first
                while True:  # ends the stream (slots drain) only when nothing is queued
                    try:
                        yield self._queue.get_nowait()
                    except queue.Empty:
                        return

            try:
                task(chunks())
            except BaseException as e:  # the engine failed: every waiting chunk gets the error
                with self._lock:
                    waiting = set(self._owner.values())
                    self._owner.clear()
                for chunk in waiting:
                    chunk.error = e
                    chunk.done.set()

    def _route(self, key: bytes, failed: bool, prompt_tokens: int, completion_tokens: int) -> None:
        """Hands the row just written to its chunk; completes the chunk with its last row."""
        with self._lock:
            chunk = self._owner.pop(key)
        chunk.rows.append(self.writer.lines.pop())
        chunk.counts.append((failed, prompt_tokens, completion_tokens))
        if len(chunk.rows) == chunk.size:
            now = _stats_snapshot(getattr(self.model, "stats", None))
            delta = [a - b for a, b in zip(now, self._stats, strict=True)]
            self._stats = now
            chunk.result = {
                "rows": chunk.rows,
                "counts": chunk.counts,  # (failed, prompt tokens, completion tokens) per row
                "compile_seconds": delta[0],
                "prefill_tokens": delta[1],
                "padded_prefill_tokens": delta[2],
            }
            chunk.done.set()

    def _ok(self, row: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> None:
        super()._ok(row, prompt_tokens, completion_tokens)
        self._route(row_key(row), False, prompt_tokens, completion_tokens)

    def _fail(self, item: Item, e: Exception) -> None:
        super()._fail(item, e)
        self._route(item.key, True, 0, 0)


@dataclasses.dataclass(eq=False)
class _PendingChunk:
    size: int
    rows: list[bytes] = dataclasses.field(default_factory=list)
    counts: list[tuple[bool, int, int]] = dataclasses.field(default_factory=list)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    error: BaseException | None = None


class _RowList:
    """A RowWriter stand-in that keeps the rows (bytes) in memory."""

    def __init__(self):
        self.lines: list[bytes] = []

    def write(self, line: bytes) -> None:
        self.lines.append(line)


class Replica:
    """Body of a replica actor: loads the model once, then turns chunks of lines into rows."""

    def __init__(self, llm_or_model: Any, defaults: Any, opts: BatchOptions, cache_dir: str | None = None):
        from jinfer.compile import enable_compilation_cache, maybe_enable_from_env

        if cache_dir:
            enable_compilation_cache(cache_dir)
        else:
            maybe_enable_from_env()  # $JINFER_COMPILATION_CACHE of the worker (runtime_env env_vars)
        t0 = time.monotonic()
        self._run = _ChunkRun(opts, llm_or_model, defaults)
        self.load_seconds = time.monotonic() - t0

    def ready(self) -> tuple[dict[str, Any], float]:
        """(manifest, seconds this replica took to load the model): answered once it is loaded."""
        return self._run.manifest, self.load_seconds

    def manifest(self) -> dict[str, Any]:
        """The manifest this replica's rows belong to (model, engine, sampling defaults, seed)."""
        return self._run.manifest

    def pid(self) -> int:
        """The replica's process id (monitoring, failure drills)."""
        return os.getpid()

    def run_chunk(self, lines: list[tuple[int, bytes]]) -> dict[str, Any]:
        """Rows and counts of a chunk of (line number, raw line) pairs."""
        return self._run.run_chunk(lines)


# -- Ray Data interop ------------------------------------------------------------------------------
class RowMapper:
    """A callable class for `ray.data.Dataset.map_batches(RowMapper, fn_constructor_kwargs=...)`.

    Each input row has the fields of a run-batch input line (custom_id, prompt or messages,
    sampling fields, ...); an optional "line" column gives line numbers for error rows (else
    the row's position in the batch, from 1). Returns the columns "custom_id" and "row": the JSON
    line run-batch would write for it (without the newline). Works on numpy batches
    (`batch_format="numpy"`, dict of arrays) and on lists of dicts.
    """

    def __init__(self, model: Any, defaults: Any = None, **options: Any):
        """`model`: a model dir/name (loaded with `options["llm_options"]`) or a loaded LLM;
        `defaults` and `options` as for `run_batch` (task, format, seed, ...)."""
        opts = BatchOptions(**{**options, "progress": False, "max_errors": None})
        self._run = _ChunkRun(opts, model, defaults)

    def __call__(self, batch: dict[str, np.ndarray] | list[dict[str, Any]]) -> dict[str, np.ndarray]:
        records = _batch_records(batch)
        lines = []
        for i, rec in enumerate(records):
            number = rec.pop("line", None)
            number = i + 1 if number is None else int(number)
            lines.append((number, json.dumps(rec, ensure_ascii=False).encode()))
        rows = [json.loads(r) for r in self._run.run_chunk(lines)["rows"]]
        return {
            "custom_id": np.array([r.get("custom_id") for r in rows], dtype=object),
            "row": np.array(
                [json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in rows], dtype=object
            ),
        }


def _batch_records(batch: dict[str, np.ndarray] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(batch, list):
        return [dict(r) for r in batch]
    columns = {k: _python(np.asarray(v, dtype=object).tolist()) for k, v in batch.items()}
    n = len(next(iter(columns.values()))) if columns else 0
    # Arrow nulls arrive as None, or as NaN in float columns (JSON input has no NaN): both = absent.
    return [{k: col[i] for k, col in columns.items() if not _absent(col[i])} for i in range(n)]


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _python(value: Any) -> Any:
    """numpy scalars/arrays inside Ray Data columns -> plain JSON-able Python values."""
    if isinstance(value, np.ndarray):
        return _python(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_python(v) for v in value]
    if isinstance(value, dict):
        return {k: _python(v) for k, v in value.items()}
    return value


# -- the driver ------------------------------------------------------------------------------------
@dataclasses.dataclass
class RaySummary(Summary):
    """A run's Summary plus what happened on Ray."""

    replicas: int = 0
    replicas_lost: int = 0
    chunks_retried: int = 0
    chunks_per_replica: list[int] = dataclasses.field(default_factory=list)
    # Seconds since the run started (run_batch was called) at which: Ray was up ("ray_ready"), the
    # replica actors were requested ("replicas_created"), every replica had loaded the model
    # ("replicas_ready"; "replica_load_max": the slowest replica's model load itself), the first and
    # the last row were written ("first_row", "last_row").
    timeline: dict[str, float] = dataclasses.field(default_factory=dict)

    def format(self) -> str:
        return (
            super().format()
            + f"\n  on Ray: {self.replicas} replica(s), {self.replicas_lost} lost and replaced, "
            f"{self.chunks_retried} chunk(s) re-run, chunks per replica {self.chunks_per_replica}"
            + self._startup()
        )

    def _startup(self) -> str:
        t = self.timeline
        if "replicas_ready" not in t:
            return ""
        return f"; Ray up after {t['ray_ready']:.1f}s, replicas ready after {t['replicas_ready']:.1f}s"


@dataclasses.dataclass
class _Chunk:
    lines: list[tuple[int, bytes]]
    attempts: int = 0


@contextlib.contextmanager
def _ray_session(ray_opts: RayOptions, replicas_hint: int, cpus_each: float) -> Iterator[Any]:
    try:
        import ray
    except ImportError as e:
        raise ConfigError("--ray needs the ray package: pip install 'jinfer[ray]'") from e
    if ray.is_initialized():
        yield ray  # the caller's session (a notebook's ray.init()): leave it running
        return
    if ray_opts.address is None:
        # Only the CPUs the replicas reserve: Ray prestarts one idle worker process per CPU, and
        # on a small host the unused ones compete with the replicas' start-up. (A replica still
        # computes on every core: the CPU count is Ray's bookkeeping, not an affinity mask.)
        cpus = max(1, int(np.ceil(replicas_hint * cpus_each)))
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            object_store_memory=ray_opts.object_store_memory,
            logging_level=logging.WARNING,  # no INFO line about the instance it starts
        )
    else:
        ray.init(address=ray_opts.address)
    try:
        yield ray
    finally:
        ray.shutdown()


class _ReplicaPool:
    """Replica actors by slot; a lost one is replaced by a fresh actor in the same slot."""

    def __init__(self, ray: Any, ray_opts: RayOptions, args: tuple, count: int):
        self.ray, self.args, self.count = ray, args, count
        self.options = actor_options(ray_opts.resources_per_replica)
        self.chunks_in_flight = ray_opts.chunks_in_flight
        self.actor_class = ray.remote(Replica)
        self.actors: list[Any] = []
        self.generation = [0] * count
        self.lost = 0
        self.load_seconds: list[float] = []
        for slot in range(count):
            self.actors.append(self._start(slot))

    def _start(self, slot: int) -> Any:
        name = f"{REPLICA_NAME_PREFIX}{os.getpid()}-{slot}.{self.generation[slot]}"
        # Threaded actor: queued chunks wait inside it, so its generation stream never runs dry.
        concurrency = self.chunks_in_flight + 2
        options = dict(name=name, max_restarts=0, max_concurrency=concurrency, **self.options)
        return self.actor_class.options(**options).remote(*self.args)

    def manifest(self) -> dict[str, Any]:
        """Waits for every replica to load the model; they must agree on the manifest."""
        from ray.exceptions import RayActorError

        try:
            ready = self.ray.get([a.ready.remote() for a in self.actors])
        except RayActorError as e:
            raise ReplicaLostError(
                f"a replica could not load the model {self.args[0]!r} (it must be readable at that path "
                f"on every node): {e}"
            ) from e
        manifests = [m for m, _ in ready]
        self.load_seconds = [round(t, 3) for _, t in ready]
        for slot, m in enumerate(manifests[1:], start=1):
            if m != manifests[0]:
                diffs = files._diff(manifests[0], m)
                raise ConfigError(
                    f"replica {slot} would write other rows than replica 0 ({'; '.join(diffs)}); "
                    "give every replica the same model path, devices and settings"
                )
        return manifests[0]

    def replace(self, slot: int, generation: int) -> None:
        """Replaces the actor of `slot` if it is still the one of `generation`."""
        if self.generation[slot] != generation:
            return  # another lost chunk of the same actor already replaced it
        self.lost += 1
        with contextlib.suppress(Exception):
            self.ray.kill(self.actors[slot], no_restart=True)
        self.generation[slot] += 1
        self.actors[slot] = self._start(slot)

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)


def run_batch_on_ray(
    llm_or_model: Any, input: Path, output: Path, defaults: Any, opts: BatchOptions
) -> RaySummary:
    """The Ray flavour of `run_batch` (called by it when `BatchOptions.ray` is set).

    Start-up is overlapped: the input scan runs in a thread while Ray starts and the replicas load
    the model, and the summary is written before a self-started Ray instance is stopped.
    """
    start = time.monotonic()
    ray_opts = opts.ray
    if not isinstance(llm_or_model, (str, os.PathLike)):
        raise ConfigError(
            "a Ray run loads the model on every replica: give a model directory or name, not a loaded model"
        )
    if not input.is_file():
        raise ConfigError(f"input file {input} does not exist")
    files.check_output_path(input, output)
    scanning = _Background(files.scan_input, input)  # its errors (duplicates) surface below
    replica_opts = dataclasses.replace(opts, ray=None, max_errors=None, progress=False)
    cpus_each = float(actor_options(ray_opts.resources_per_replica).get("num_cpus", 1) or 0)
    timeline: dict[str, float] = {}
    with _ray_session(ray_opts, ray_opts.replicas or 1, cpus_each) as ray:
        timeline["ray_ready"] = time.monotonic() - start
        count = ray_opts.replicas or _nodes_that_fit(ray, actor_options(ray_opts.resources_per_replica))
        if scanning.done():  # as a rule the scan is over by now: a bad input starts no replica
            scanning.result()
        model = Path(llm_or_model).absolute() if Path(llm_or_model).exists() else llm_or_model
        args = (str(model), defaults, replica_opts, _compilation_cache_dir())
        pool = _ReplicaPool(ray, ray_opts, args, count)  # replicas load the model from here on
        timeline["replicas_created"] = time.monotonic() - start
        try:
            scan = scanning.result()
            manifest = pool.manifest()
            timeline["replicas_ready"] = time.monotonic() - start
            timeline["replica_load_max"] = max(pool.load_seconds)  # model load inside the slowest replica
            files.check_manifest(output, manifest, opts.force, write=True)
            files.merge_shards(output, files.shard_files(output))  # leftovers of a jax.distributed run
            done = files.scan_output(output, repair=True)
            skipped = files.count_contained(scan.shard_hashes, done)
            summary = RaySummary(str(output), opts.task, scan.lines, skipped=skipped, replicas=count)
            summary.chunks_per_replica = [0] * count
            summary.processes = count
            summary.timeline = timeline
            scan.shard_hashes = np.zeros(0, np.uint64)
            _Driver(ray, pool, ray_opts, opts, summary, start).run(_chunks(input, done, ray_opts.chunk_lines))
        finally:
            pool.close()
        # The output is complete: the summary does not wait for Ray to stop.
        timeline.update({k: round(v, 3) for k, v in timeline.items()})
        files.write_json_atomic(files.summary_path(output), summary.to_dict())
    return summary


class _Background:
    """`fn(*args)` in a daemon thread; `result()` waits for it and re-raises its error."""

    def __init__(self, fn: Any, *args: Any):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._call, args=(fn, *args), name="jinfer-ray-scan", daemon=True
        )
        self._thread.start()

    def _call(self, fn: Any, *args: Any) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:  # handed to the caller of result()
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _nodes_that_fit(ray: Any, options: dict[str, Any]) -> int:
    """Alive nodes with the resources of one replica (the default replica count: one per node)."""
    need = {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0)}
    need.update(options.get("resources", {}))
    fits = [
        n
        for n in ray.nodes()
        if n.get("Alive") and all(n.get("Resources", {}).get(k, 0) >= v for k, v in need.items() if v)
    ]
    if not fits:
        raise ConfigError(
            f"no node of the Ray cluster has the resources of one replica ({need}); "
            "check --resources-per-replica or give --replicas"
        )
    return len(fits)


def _compilation_cache_dir() -> str | None:
    """The driver's persistent XLA cache, so replicas on this host reuse its executables."""
    if "jax" not in sys.modules:
        return None
    import jax

    return jax.config.jax_compilation_cache_dir or None


def _chunks(input: Path, done: np.ndarray, size: int) -> Iterator[_Chunk]:
    """Not-yet-done (line number, raw line) pairs of the input, `size` at a time (streamed)."""
    buf: list[tuple[int, bytes]] = []
    for number, raw in files.iter_lines(input):
        if files.contains(done, key_hash(line_identity(raw, number)[0])):
            continue
        buf.append((number, raw))
        if len(buf) >= size:
            yield _Chunk(buf)
            buf = []
    if buf:
        yield _Chunk(buf)


class _Driver:
    """Hands chunks to replicas, re-queues the chunks of lost replicas, appends rows once."""

    def __init__(
        self,
        ray: Any,
        pool: _ReplicaPool,
        ray_opts: RayOptions,
        opts: BatchOptions,
        summary: RaySummary,
        start: float,
    ):
        self.ray, self.pool, self.ray_opts, self.opts, self.summary = ray, pool, ray_opts, opts, summary
        self.start = start  # time.monotonic() when the run started (the timeline's zero)
        self.inflight: dict[Any, tuple[_Chunk, int, int]] = {}  # ref -> (chunk, slot, generation)
        self.load = [0] * pool.count
        self.retry: deque[_Chunk] = deque()
        self.compile_seconds = [0.0] * pool.count

    def run(self, chunks: Iterator[_Chunk]) -> None:
        summary = self.summary
        progress = _Progress(
            self.opts.progress is not False, summary.lines, summary.skipped, self.opts.log_every
        )
        writer = files.RowWriter(Path(summary.output), self.opts.flush_every, self.opts.flush_seconds)
        t0 = time.monotonic()
        try:
            exhausted = False
            while True:
                exhausted = self._fill(chunks, exhausted)
                if not self.inflight:
                    break
                (ref,), _ = self.ray.wait(list(self.inflight), num_returns=1)
                result = self._collect(ref)
                if result is not None and self._write(result, writer, progress):
                    break  # --max-errors: in-flight chunks are dropped (a rerun computes them)
        finally:
            writer.close()
            progress.close()
        summary.seconds = time.monotonic() - t0
        summary.compile_seconds = max(self.compile_seconds)
        summary.timeline["last_row"] = time.monotonic() - self.start

    def _fill(self, chunks: Iterator[_Chunk], exhausted: bool) -> bool:
        while self.summary.stopped is None:
            slot = int(np.argmin(self.load))
            if self.load[slot] >= self.ray_opts.chunks_in_flight:
                break
            chunk = self.retry.popleft() if self.retry else None if exhausted else next(chunks, None)
            if chunk is None:
                return True
            ref = self.pool.actors[slot].run_chunk.remote(chunk.lines)
            self.inflight[ref] = (chunk, slot, self.pool.generation[slot])
            self.load[slot] += 1
        return exhausted

    def _collect(self, ref: Any) -> dict[str, Any] | None:
        from ray.exceptions import RayActorError

        chunk, slot, generation = self.inflight.pop(ref)
        if generation == self.pool.generation[slot]:
            self.load[slot] -= 1
        try:
            result = self.ray.get(ref)
        except RayActorError as e:
            chunk.attempts += 1
            if chunk.attempts >= self.ray_opts.max_attempts:
                first = chunk.lines[0][0]
                raise ReplicaLostError(
                    f"the chunk of input lines {first}..{chunk.lines[-1][0]} lost its replica "
                    f"{chunk.attempts} times (last: {type(e).__name__}); the rows written so far are kept, "
                    "rerun the command to resume"
                ) from e
            if generation == self.pool.generation[slot]:
                # The fresh actor starts with nothing queued; the lost actor's other chunks fail
                # through ray.wait like this one and come back to the queue the same way.
                self.load[slot] = 0
            self.pool.replace(slot, generation)
            self.summary.replicas_lost = self.pool.lost
            self.summary.chunks_retried += 1
            print(
                f"run-batch: replica {slot} lost ({type(e).__name__}); re-running its chunk of "
                f"{len(chunk.lines)} lines",
                file=sys.stderr,
                flush=True,
            )
            self.retry.append(chunk)
            return None
        self.compile_seconds[slot] += result["compile_seconds"]
        self.summary.chunks_per_replica[slot] += 1
        return result

    def _write(self, result: dict[str, Any], writer: files.RowWriter, progress: _Progress) -> bool:
        """Appends a chunk's rows; True once more than --max-errors lines failed."""
        s, limit = self.summary, self.opts.max_errors
        if result["rows"] and "first_row" not in s.timeline:
            s.timeline["first_row"] = time.monotonic() - self.start
        s.prefill_tokens += result["prefill_tokens"]
        s.padded_prefill_tokens += result["padded_prefill_tokens"]
        for row, (failed, prompt_tokens, completion_tokens) in zip(
            result["rows"], result["counts"], strict=True
        ):
            writer.write(row)
            s.failed += failed
            s.ok += not failed
            s.prompt_tokens += prompt_tokens
            s.completion_tokens += completion_tokens
            progress.update(completion_tokens)
            if limit is not None and s.failed > limit:
                s.stopped = f"more than --max-errors={limit} failed lines"
                return True
        return False
