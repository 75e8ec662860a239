"""`jinfer run-batch` flags and entry point (the lead's CLI adds --model/--mesh/--dtype and the
sampling flags --max-tokens --temperature --top-k --top-p --min-p --seed --stop itself)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from jinfer.batch.names import FORMATS, TASKS
from jinfer.errors import ConfigError

_SAMPLING_FLAGS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "stop", "ignore_eos")
ENV_COORDINATOR = "JINFER_COORDINATOR"
ENV_NUM_PROCESSES = "JINFER_NUM_PROCESSES"
ENV_PROCESS_ID = "JINFER_PROCESS_ID"


def add_run_batch_args(p: argparse.ArgumentParser) -> None:
    """Adds the run-batch flags (not --model/--mesh/--dtype/sampling: the CLI adds those)."""
    from jinfer.cli import int_at_least, positive_float

    p.add_argument("--input", required=True, help="JSONL input: one request per line")
    p.add_argument(
        "--output",
        required=True,
        help="JSONL output (appended; rerun the same command to resume after a crash)",
    )
    p.add_argument(
        "--task",
        default="generate",
        choices=TASKS,
        help="generate; score (prompt + continuation -> logprobs); embed (text -> vector)",
    )
    p.add_argument("--format", default="jinfer", choices=FORMATS, help="output rows: jinfer or OpenAI Batch")
    p.add_argument(
        "--max-errors",
        type=int_at_least(0),
        default=None,
        help="stop cleanly (exit 1) once more than N lines failed in this run (default: never)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="resume even if the output was started with another configuration",
    )
    p.add_argument(
        "--window", type=int_at_least(1), default=1024, help="lines sorted by prompt length at a time"
    )
    p.add_argument(
        "--logprobs", type=int_at_least(0), default=None, help="top-N log-probabilities per generated token"
    )
    p.add_argument("--return-token-ids", action="store_true", help="add token_ids to every row")
    p.add_argument(
        "--max-batch",
        type=int_at_least(1),
        default=None,
        help="decode slots (default: what the KV-cache budget holds; see jinfer.defaults)",
    )
    p.add_argument(
        "--max-len",
        type=int_at_least(2),
        default=None,
        help="tokens per slot (prompt + generation; default: "
        "the model's context, capped (2,048 on CPU) and shortened to fit the KV-cache budget)",
    )
    p.add_argument("--buckets", default=None, help="prefill buckets, e.g. 16,32,64,128 (default: engine's)")
    p.add_argument("--decode-steps", type=int_at_least(1), default=8, help="decode steps per host round trip")
    p.add_argument(
        "--batch-invariant",
        action="store_true",
        help="one decode shape and one prompt per prefill call: every row's bits are independent of "
        "the rows it ran beside, so a resumed run equals an uninterrupted one bitwise in any precision",
    )
    p.add_argument("--flush-every", type=int_at_least(1), default=64, help="fsync the output every N rows")
    p.add_argument("--flush-seconds", type=positive_float, default=2.0, help="... or every T seconds")
    p.add_argument(
        "--log-every", type=positive_float, default=30.0, help="seconds between log lines (no terminal)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    g = p.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--coordinator", default=None, help=f"host:port of process 0 (or ${ENV_COORDINATOR})")
    g.add_argument(
        "--num-processes", type=int_at_least(1), default=None, help=f"processes (or ${ENV_NUM_PROCESSES})"
    )
    g.add_argument(
        "--process-id", type=int_at_least(0), default=None, help=f"this process (or ${ENV_PROCESS_ID})"
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() with auto-detection (TPU pod slices, SLURM)",
    )
    r = p.add_argument_group("Ray (pip install 'jinfer[ray]')")
    r.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray replicas; no ADDRESS: a local Ray instance for this run; 'auto' or host:port: join",
    )
    r.add_argument("--replicas", type=int, default=None, help="model replicas (default: one per Ray node)")
    r.add_argument(
        "--resources-per-replica",
        default=None,
        metavar="JSON",
        help="Ray resources of one replica, e.g. '{\"num_gpus\": 1}' or '{\"TPU\": 4}' (default: 1 CPU)",
    )
    r.add_argument("--chunk-lines", type=int, default=32, help="input lines per Ray work unit")


def init_distributed(args: argparse.Namespace) -> None:
    """Initialises jax.distributed from flags or env vars; must run before any other JAX call."""
    coordinator = args.coordinator or os.environ.get(ENV_COORDINATOR)
    num = args.num_processes if args.num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = args.process_id if args.process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator is None and num is None and pid is None:
        if args.distributed:
            import jax

            jax.distributed.initialize()
        return
    if coordinator is None or num is None or pid is None:
        raise ConfigError(
            "multi-process runs need --coordinator, --num-processes and --process-id "
            f"(or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID}) together"
        )
    if not 0 <= pid < num:
        raise ConfigError(f"--process-id={pid} must be in [0, --num-processes={num})")
    if num > 1:
        import jax

        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ConfigError(f"${name}={value!r} is not an integer") from e


def _parse_buckets(text: str) -> tuple[int, ...]:
    try:
        buckets = tuple(int(b) for b in str(text).split(",") if b.strip())
    except ValueError:
        buckets = ()
    if not buckets or min(buckets) < 1:
        raise ConfigError(f"--buckets {text!r} is invalid; accepted: positive integers, e.g. 16,32,64,128")
    return buckets


def run_batch_from_args(args: argparse.Namespace) -> int:
    """`jinfer run-batch`: returns the exit code (0 done, 1 stopped by --max-errors)."""
    init_distributed(args)
    from jinfer.batch.runner import run_batch

    buckets = None if args.buckets is None else _parse_buckets(args.buckets)
    llm_options: dict[str, Any] = {"mesh": args.mesh, "dtype": args.dtype}
    if args.task != "embed":
        llm_options.update(
            max_batch=args.max_batch, max_len=args.max_len, buckets=buckets, decode_steps=args.decode_steps
        )
        if args.batch_invariant:
            llm_options["batch_invariant"] = True
    overrides = {k: getattr(args, k) for k in _SAMPLING_FLAGS if getattr(args, k, None) is not None}
    summary = run_batch(
        args.model,
        args.input,
        args.output,
        defaults=overrides,
        task=args.task,
        format=args.format,
        seed=args.seed,
        window=args.window,
        max_errors=args.max_errors,
        force=args.force,
        logprobs=args.logprobs,
        return_token_ids=args.return_token_ids,
        progress=False if args.no_progress else None,
        log_every=args.log_every,
        flush_every=args.flush_every,
        flush_seconds=args.flush_seconds,
        llm_options=llm_options,
        ray=_ray_options(args),
    )
    import jax

    if jax.process_index() == 0:
        print(summary.format(), file=sys.stderr, flush=True)
    return 0 if summary.stopped is None else 1


def _ray_options(args: argparse.Namespace) -> Any:
    """RayOptions from --ray/--replicas/--resources-per-replica/--chunk-lines (None without --ray)."""
    if getattr(args, "ray", None) is None:
        if args.replicas is not None or args.resources_per_replica is not None:
            raise ConfigError("--replicas and --resources-per-replica need --ray [ADDRESS]")
        return None
    if args.coordinator or args.num_processes or args.process_id is not None or args.distributed:
        raise ConfigError("--ray and the jax.distributed flags (--coordinator, ...) exclude each other")
    from jinfer.batch.ray import RayOptions

    resources = RayOptions.parse_resources(args.resources_per_replica) if args.resources_per_replica else {}
    return RayOptions(
        address=args.ray or None,
        replicas=args.replicas,
        resources_per_replica=resources,
        chunk_lines=args.chunk_lines,
    )
