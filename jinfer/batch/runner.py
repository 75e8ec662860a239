"""`run_batch`: offline generation / scoring / embedding over a JSONL file, exactly once.

Flow of one process: pre-pass over the input (duplicate ids, line counts) -> load the model ->
check/write the manifest -> (process 0) fold leftover shards of another process count into the
output -> barrier -> read back the rows already done -> stream the input in windows, sorted by
prompt length inside each window, through one `LLM.generate_iter` (slots never drain between
windows) -> append rows, fsynced in groups -> barrier -> (process 0) merge the shards and write
the summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jinfer.batch import files
from jinfer.batch.files import InputScan, RowWriter, contains, iter_lines
from jinfer.batch.names import FORMATS, TASKS
from jinfer.batch.records import (
    Item,
    LineError,
    RowOptions,
    build_item,
    dumps,
    embed_row,
    error_row,
    generate_row,
    key_hash,
    line_identity,
    sampling_params,
    score_row,
)
from jinfer.errors import ConfigError
from jinfer.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    """Settings of a batch run (everything except the model, the files and the sampling defaults).

    Attributes:
      task: "generate", "score" (prompt + continuation -> logprobs) or "embed" (text -> vector).
      format: "jinfer" rows or "openai" (OpenAI Batch response lines; generate and embed).
      seed: run seed; a line without its own seed samples with blake2b(seed, custom_id).
        None: the defaults' seed, else 0.
      window: lines read, then sorted by prompt length, at a time.
      max_errors: stop cleanly once more than this many lines failed in this run (None: never).
      force: resume even if the manifest records another configuration.
      logprobs: top-N log-probabilities per generated token for every line (None: as defaults).
      return_token_ids: add "token_ids" to rows.
      progress: None = on for process 0 (tqdm on a terminal, log lines otherwise); False = off.
      log_every: seconds between plain log lines. flush_every / flush_seconds: fsync cadence.
      merge: process 0 merges the shards at the end of a multi-process run.
      ray: a `jinfer.batch.ray.RayOptions` to run on Ray replicas (the model must be a path/name).
      llm_options: keyword arguments for LLM / Embedder when a model path is given
        (mesh, dtype, max_batch, max_len, buckets, decode_steps).
    """

    task: str = "generate"
    format: str = "jinfer"
    seed: int | None = None
    window: int = 1024
    max_errors: int | None = None
    force: bool = False
    logprobs: int | None = None
    return_token_ids: bool = False
    progress: bool | None = None
    log_every: float = 30.0
    flush_every: int = 64
    flush_seconds: float = 2.0
    merge: bool = True
    ray: Any = None  # jinfer.batch.ray.RayOptions (Any: that module imports this one)
    llm_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r}; accepted: {', '.join(TASKS)}")
        if self.format not in FORMATS:
            raise ConfigError(f"format={self.format!r}; accepted: {', '.join(FORMATS)}")
        if self.format == "openai" and self.task == "score":
            raise ConfigError(
                "--format openai has no scoring endpoint; use --format jinfer with --task score"
            )
        if self.window < 1 or (self.max_errors is not None and self.max_errors < 0):
            raise ConfigError(f"window={self.window} must be >= 1 and max_errors={self.max_errors} >= 0")


@dataclasses.dataclass
class Summary:
    """Counts and rates of a run (of this process, or of all processes for process 0)."""

    output: str
    task: str
    lines: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0
    prefill_tokens: int = 0
    padded_prefill_tokens: int = 0
    stopped: str | None = None
    processes: int = 1

    @property
    def complete(self) -> bool:
        """Every input line has a row and the run was not stopped early."""
        return self.stopped is None and self.ok + self.failed + self.skipped == self.lines

    @property
    def padding_efficiency(self) -> float | None:
        """Real / padded prompt tokens of this run's prefills (None when nothing was prefilled)."""
        return self.prefill_tokens / self.padded_prefill_tokens if self.padded_prefill_tokens else None

    @property
    def prompts_per_second(self) -> float:
        return (self.ok + self.failed) / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        eff = self.padding_efficiency
        d.update(
            complete=self.complete,
            padding_efficiency=None if eff is None else round(eff, 4),
            prompts_per_second=round(self.prompts_per_second, 3),
            tokens_per_second=round(self.tokens_per_second, 3),
            seconds=round(self.seconds, 3),
            compile_seconds=round(self.compile_seconds, 3),
        )
        return d

    def format(self) -> str:
        """A few human-readable lines."""
        eff = self.padding_efficiency
        state = "complete" if self.complete else f"stopped: {self.stopped}" if self.stopped else "incomplete"
        return (
            f"run-batch {state}: {self.ok} ok, {self.failed} failed, {self.skipped} skipped (already done) "
            f"of {self.lines} lines -> {self.output}\n"
            f"  {self.prompt_tokens} prompt + {self.completion_tokens} output tokens in {self.seconds:.1f}s "
            f"({self.prompts_per_second:.2f} prompts/s, {self.tokens_per_second:.1f} output tokens/s), "
            f"compile {self.compile_seconds:.1f}s, padding efficiency "
            f"{'n/a' if eff is None else f'{eff:.1%}'}, {self.processes} process(es)"
        )

    @classmethod
    def combine(cls, parts: list[Summary], output: str, lines: int) -> Summary:
        """The summary of all processes from their per-shard summaries."""
        total = cls(output=output, task=parts[0].task, lines=lines, processes=len(parts))
        for p in parts:
            for f in (
                "ok",
                "failed",
                "skipped",
                "prompt_tokens",
                "completion_tokens",
                "prefill_tokens",
                "padded_prefill_tokens",
            ):
                setattr(total, f, getattr(total, f) + getattr(p, f))
            total.seconds = max(total.seconds, p.seconds)
            total.compile_seconds = max(total.compile_seconds, p.compile_seconds)
            total.stopped = total.stopped or p.stopped
        return total

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Summary:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def run_batch(
    llm_or_model: Any,
    input: str | os.PathLike,
    output: str | os.PathLike,
    defaults: SamplingParams | dict[str, Any] | None = None,
    **options: Any,
) -> Summary:
    """Runs every line of the JSONL `input` once, appending rows to the JSONL `output`.

    `llm_or_model` is an `LLM` (or an `Embedder` for task="embed") or a model directory/name.
    `defaults` are the sampling settings lines may override: a SamplingParams, or a dict of
    changes to the model's generation config (None: that config as is; with no max_new_tokens
    there, max_tokens=128). `options` are `BatchOptions` fields. Rerunning the same call after a
    crash resumes: finished rows are kept, every custom_id ends up exactly once, and the rows are
    identical to an uninterrupted run. Under `jax.distributed` each process runs its shard of the
    lines and process 0 merges the shards at the end. Returns the Summary (also in `<output>.summary.json`).

    In every task an error row names its input by the 1-based line number of the file: the
    message starts "line 2: " and the error's "line" field is 2 (blank lines count); the message
    itself numbers nothing else ("line 2: the score pair: prompt + continuation has ...").
    """
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(BatchOptions)})
    if unknown:
        raise ConfigError(f"run_batch got unknown options {unknown}; accepted: BatchOptions fields")
    opts = BatchOptions(**options)
    if opts.ray is not None:
        from jinfer.batch.ray import run_batch_on_ray

        return run_batch_on_ray(llm_or_model, Path(input), Path(output), defaults, opts)
    return _Run(opts, Path(input), Path(output)).execute(llm_or_model, defaults)


class _Progress:
    """tqdm on a terminal, plain log lines otherwise; silent when disabled."""

    def __init__(self, enabled: bool, total: int, initial: int, log_every: float):
        self.enabled, self.total, self.count, self.log_every = enabled, total, initial, log_every
        self.start = time.monotonic()
        self.tokens = self.rows = 0
        self._last = self.start
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="prompt", dynamic_ncols=True, file=sys.stderr)

    def update(self, completion_tokens: int) -> None:
        self.count += 1
        self.rows += 1
        self.tokens += completion_tokens
        if not self.enabled:
            return
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(1)
            if now - self._last >= 0.5:
                self._bar.set_postfix_str(
                    f"{self.tokens / max(now - self.start, 1e-9):.1f} tok/s", refresh=False
                )
                self._last = now
        elif now - self._last >= self.log_every:
            self._log(now)
            self._last = now

    def _log(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.rows / elapsed
        eta = (self.total - self.count) / rate if rate else float("inf")
        pct = 100.0 * self.count / self.total if self.total else 100.0
        print(
            f"run-batch: {self.count}/{self.total} lines ({pct:.1f}%), {rate:.2f} prompts/s, "
            f"{self.tokens / elapsed:.1f} output tokens/s, ETA {_duration(eta)}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class _Run:
    """One process's part of a batch run."""

    def __init__(self, opts: BatchOptions, input_path: Path, output: Path):
        import jax

        self.opts, self.input, self.output = opts, input_path, output
        self.process, self.processes = jax.process_index(), jax.process_count()
        self.target = (
            output if self.processes == 1 else files.shard_path(output, self.process, self.processes)
        )
        self.stopped: str | None = None

    # -- setup ----------------------------------------------------------------------------------
    def execute(self, llm_or_model: Any, defaults: SamplingParams | dict | None) -> Summary:
        if not self.input.is_file():
            raise ConfigError(f"input file {self.input} does not exist")
        files.check_output_path(self.input, self.output)  # before the (slow) model load
        lock = files.lock_output(self.output, self.process, self.processes)
        try:
            return self._execute(llm_or_model, defaults)
        finally:
            if lock is not None:
                lock.close()

    def _execute(self, llm_or_model: Any, defaults: SamplingParams | dict | None) -> Summary:
        scan = files.scan_input(self.input, self.process, self.processes)
        self.model = _load_model(llm_or_model, self.opts, self.processes)
        given_path = llm_or_model if isinstance(llm_or_model, (str, os.PathLike)) else None
        self.model_path = getattr(self.model, "path", None) or given_path
        self.defaults, self.run_seed = self._resolve_defaults(defaults)
        manifest = self._manifest()
        files.check_manifest(self.output, manifest, self.opts.force, write=self.process == 0)
        if self.process == 0:
            excluded = self.processes if self.processes > 1 else None
            files.merge_shards(self.output, files.shard_files(self.output, exclude_processes=excluded))
        _barrier("jinfer-run-batch-start", self.processes)
        done = files.scan_output(self.target, repair=True, process=self.process, processes=self.processes)
        if self.processes > 1:
            done = np.union1d(done, files.scan_output(self.output, False, self.process, self.processes))
        skipped = files.count_contained(scan.shard_hashes, done)
        scan.shard_hashes = np.zeros(0, np.uint64)  # free 8 bytes per line before the run
        summary = self._run(scan, done, skipped, manifest)
        return self._finish(summary, scan)

    def _resolve_defaults(self, defaults: SamplingParams | dict | None) -> tuple[SamplingParams, int]:
        if not isinstance(defaults, SamplingParams):
            changes = dict(defaults or {})
            base = self.model.default_params() if hasattr(self.model, "default_params") else SamplingParams()
            gen = getattr(self.model, "generation_defaults", {}) or {}
            if "max_tokens" not in changes and "max_new_tokens" not in gen:
                changes["max_tokens"] = 128  # as `jinfer generate`: the engine default of 16 is too short
            defaults = base.replace(**changes)
        seed = (
            self.opts.seed
            if self.opts.seed is not None
            else defaults.seed
            if defaults.seed is not None
            else 0
        )
        if self.opts.logprobs is not None:
            defaults = defaults.replace(logprobs=self.opts.logprobs)
        return defaults.replace(seed=None), int(seed)

    def _manifest(self) -> dict[str, Any]:
        import jax

        import jinfer

        path = self.model_path
        sampling = dataclasses.asdict(self.defaults)
        sampling.pop("seed")
        manifest = {
            "format_version": files.MANIFEST_VERSION,
            "model": {
                "path": None if path is None else str(Path(path).absolute()),
                "fingerprint": files.model_fingerprint(path),
            },
            "task": self.opts.task,
            "format": self.opts.format,
            "run_seed": self.run_seed,
            "sampling_defaults": sampling if self.opts.task == "generate" else None,
            "return_token_ids": self.opts.return_token_ids,
            "engine": _engine_info(self.model),
            "versions": {"jinfer": jinfer.__version__, "jax": jax.__version__},
        }
        return json.loads(json.dumps(manifest))  # tuples -> lists, as read back from disk

    # -- the run --------------------------------------------------------------------------------
    def _run(self, scan: InputScan, done: np.ndarray, skipped: int, manifest: dict) -> Summary:
        summary = Summary(
            str(self.target), self.opts.task, scan.shard_lines, skipped=skipped, processes=self.processes
        )
        path = manifest["model"]["path"]
        self.rows = RowOptions(
            self.opts.format,
            self.opts.return_token_ids,
            Path(path).name if path else "jinfer",
            getattr(self.model, "tokenizer", None),
        )
        enabled = self.opts.progress is not False and self.process == 0
        self.progress = _Progress(enabled, scan.shard_lines, skipped, self.opts.log_every)
        self.summary = summary
        stats = getattr(self.model, "stats", None)
        before = _stats_snapshot(stats)
        t0 = time.monotonic()
        self.writer = RowWriter(self.target, self.opts.flush_every, self.opts.flush_seconds)
        try:
            windows = self._windows(done)
            {"generate": self._generate, "score": self._score, "embed": self._embed}[self.opts.task](windows)
        finally:
            self.writer.close()
            self.progress.close()
        summary.seconds = time.monotonic() - t0
        after = _stats_snapshot(stats)
        summary.compile_seconds = after[0] - before[0]
        summary.prefill_tokens, summary.padded_prefill_tokens = after[1] - before[1], after[2] - before[2]
        summary.stopped = self.stopped
        return summary

    def _windows(self, done: np.ndarray) -> Iterator[list[Item]]:
        """This process's not-yet-done lines, `window` at a time (streamed, never the whole file)."""
        buf: list[Item] = []
        for number, raw in iter_lines(self.input):
            key, obj = line_identity(raw, number)
            h = key_hash(key)
            if h % self.processes != self.process or contains(done, h):
                continue
            buf.append(build_item(key, obj, number, self.opts.task))
            if len(buf) >= self.opts.window:
                yield buf
                buf = []
        if buf:
            yield buf

    def _ok(self, row: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> None:
        self.writer.write(dumps(row))
        self.summary.ok += 1
        self.summary.prompt_tokens += prompt_tokens
        self.summary.completion_tokens += completion_tokens
        self.progress.update(completion_tokens)

    def _fail(self, item: Item, e: Exception) -> None:
        self.writer.write(dumps(error_row(item, e, self.rows)))
        self.summary.failed += 1
        self.progress.update(0)
        limit = self.opts.max_errors
        if limit is not None and self.summary.failed > limit and self.stopped is None:
            self.stopped = f"more than --max-errors={limit} failed lines"

    def _prepared(self, window: list[Item]) -> list[tuple[Item, list[int], SamplingParams | None]]:
        """Tokenizes a window (bad lines become error rows) and sorts it by prompt length."""
        ready = []
        for item in window:
            if self.stopped:
                break
            try:
                if item.error is not None:
                    raise item.error
                ids = _encode(self.model, item.prompt, item.chat, item.line)
                params = None
                if self.opts.task == "generate":
                    params = sampling_params(item, self.defaults, self.run_seed)
                    # Checked here (generate_iter checks too) so that --max-errors stops at once.
                    self.model.engine.check_request(ids, params, None)  # the row names the line
                    _check_stop_ids(params, getattr(self.model.engine, "vocab_size", None), item.line)
            except Exception as e:  # any problem with one line becomes its error row
                self._fail(item, e)
                continue
            ready.append((item, ids, params))
        ready.sort(key=lambda r: (len(r[1]), r[0].line))
        return ready

    def _generate(self, windows: Iterator[list[Item]]) -> None:
        pending: dict[int, tuple[Item, list[int], int]] = {}

        def feed() -> Iterator[tuple[int, list[int], SamplingParams]]:
            for window in windows:
                for item, ids, params in self._prepared(window):
                    if self.stopped:
                        return
                    pending[item.line] = (item, ids, params.logprobs or 0)
                    yield item.line, ids, params
                if self.stopped:
                    return

        for line, out in self.model.generate_iter(feed()):
            item, ids, top = pending.pop(line)
            if isinstance(out, Exception):
                self._fail(item, out)
            else:
                self._ok(generate_row(item, out, self.rows, top), len(ids), out.usage["completion_tokens"])

    def _score(self, windows: Iterator[list[Item]]) -> None:
        for window in windows:
            pairs = {}
            for item, ids, _ in self._prepared(window):
                try:
                    cont = item.continuation
                    pairs[item.line] = (
                        item,
                        ids,
                        _token_ids(cont, item.line, "continuation") if isinstance(cont, list) else cont,
                    )
                except Exception as e:
                    self._fail(item, e)
            # Pairs of similar length share a call (LLM.score_iter); each bad pair is its own error row.
            for line, out in self.model.score_iter(
                (line, ids, cont) for line, (_, ids, cont) in pairs.items()
            ):
                if self.stopped:
                    return
                item, ids, _ = pairs[line]
                if isinstance(out, Exception):
                    self._fail(item, out)
                else:
                    self._ok(score_row(item, ids, out, self.rows), len(ids), 0)

    def _embed(self, windows: Iterator[list[Item]]) -> None:
        for window in windows:
            ready = [item for item in window if item.error is None]
            for item in window:
                if item.error is not None and not self.stopped:
                    self._fail(item, item.error)
            if self.stopped:
                return
            try:
                vectors = list(self.model.embed([item.prompt for item in ready])) if ready else []
            except Exception:
                vectors = None
            for i, item in enumerate(ready):
                if self.stopped:
                    return
                try:
                    vec = vectors[i] if vectors is not None else self.model.embed([item.prompt])[0]
                except Exception as e:
                    self._fail(item, e)
                    continue
                self._ok(embed_row(item, vec, self.rows), 0, 0)

    # -- the end --------------------------------------------------------------------------------
    def _finish(self, summary: Summary, scan: InputScan) -> Summary:
        if self.processes > 1:
            files.write_json_atomic(files.summary_path(self.target), summary.to_dict())
        _barrier("jinfer-run-batch-end", self.processes)
        if self.processes == 1:
            summary.output = str(self.output)
            return _write_summary(self.output, summary)
        if self.process != 0 or not self.opts.merge:
            return summary
        shards = files.shard_files(self.output)
        parts = [
            Summary.from_dict(json.loads(files.summary_path(s).read_text()))
            for s in shards
            if files.summary_path(s).is_file()
        ]
        files.merge_shards(self.output, shards)
        total = Summary.combine(parts or [summary], str(self.output), scan.lines)
        return _write_summary(self.output, total)


def _write_summary(output: Path, summary: Summary) -> Summary:
    """Writes `summary` next to the output and returns it; a rerun that found every line done keeps
    the summary file of the run that completed the output (its counts, tokens and rates) instead of
    replacing it with a run of nothing but skipped lines."""
    path = files.summary_path(output)
    if summary.ok == summary.failed == 0 and summary.complete and path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
        if isinstance(previous, dict) and previous.get("complete") and previous.get("lines") == summary.lines:
            print(f"jinfer: {output} was already complete; {path.name} is kept", file=sys.stderr)
            return summary
    files.write_json_atomic(path, summary.to_dict())
    return summary


# -- helpers ---------------------------------------------------------------------------------------
def _barrier(name: str, processes: int) -> None:
    if processes > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _stats_snapshot(stats: Any) -> tuple[float, int, int]:
    if stats is None:
        return 0.0, 0, 0
    return (
        float(getattr(stats, "compile_time", 0.0)),
        int(getattr(stats, "prompt_tokens", 0)),
        int(getattr(stats, "padded_prompt_tokens", 0)),
    )


def _token_ids(values: list[Any], line: int, what: str) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in values):
        raise LineError(
            "invalid_request", f"line {line}: '{what}' must be a string or a list of integer token ids"
        )
    return list(values)


def _check_stop_ids(params: SamplingParams, vocab_size: int | None, line: int) -> None:
    bad = [t for t in params.stop_token_ids or () if vocab_size is not None and t >= vocab_size]
    if bad:
        raise LineError(
            "invalid_token",
            f"line {line}: stop_token_ids has {bad[0]}, outside the vocabulary [0, {vocab_size})",
        )


def _encode(model: Any, prompt: Any, chat: bool, line: int) -> list[int]:
    """Prompt ids; the chat template is applied to messages."""
    tokenizer = getattr(model, "tokenizer", None)
    if isinstance(prompt, list) and not chat:
        return _token_ids(prompt, line, "prompt")
    if tokenizer is None:
        raise LineError("invalid_request", f"line {line}: this model has no tokenizer; give token ids")
    return tokenizer.encode_chat(prompt) if chat else tokenizer.encode(prompt)


def _engine_info(model: Any) -> dict[str, Any] | None:
    engine = getattr(model, "engine", None)
    if engine is None or not hasattr(model, "generate_iter"):
        return None  # e.g. an Embedder: its outputs are decided by the model files alone
    from jinfer.llm import dtype_summary

    info = dataclasses.asdict(engine.config)
    info["mesh"] = dict(engine.mesh.shape)
    # "float32", "bfloat16", "bfloat16 weights, float32 compute" (jinfer.precision): what runs
    info["param_dtype"] = dtype_summary(engine.params)
    return info


def _load_model(llm_or_model: Any, opts: BatchOptions, processes: int) -> Any:
    """The given LLM/Embedder, or one loaded from a path on this process's local devices."""
    if llm_or_model is not None and not isinstance(llm_or_model, (str, os.PathLike)):
        return llm_or_model
    kw = dict(opts.llm_options)
    mesh = kw.pop("mesh", None)
    if processes > 1 and not hasattr(mesh, "devices"):
        import jax

        from jinfer.sharding import make_mesh

        # Each process is a data-parallel replica on its own devices: never the global device list.
        local = jax.local_devices()
        mesh = make_mesh(mesh, devices=local) if mesh else make_mesh("data=1,model=1", devices=local[:1])
    if opts.task == "embed":
        from jinfer.embed import Embedder

        return Embedder(llm_or_model, mesh=mesh, dtype=kw.get("dtype"))
    from jinfer.llm import LLM

    return LLM(llm_or_model, mesh=mesh, **kw)
