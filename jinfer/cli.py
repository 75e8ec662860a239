"""The `jinfer` command line: generate, embed, convert, inspect, freeze, run-batch, merge, serve,
ps, stop."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence

from jinfer.errors import CheckpointKeyError, CheckpointNotFoundError, ConfigError, InputError, JinferError

# Exit codes (README "Errors and exit codes"): 0 done; 1 runtime error (bad model files, --max-errors
# reached, an internal error); 2 usage error (flags, config, input that cannot run); 3 I/O failure
# (disk full, output not writable mid-run); 130 interrupted.
EXIT_RUNTIME, EXIT_USAGE, EXIT_IO, EXIT_INTERRUPTED = 1, 2, 3, 130
KEEP_ALIVE_ENV = "JINFER_KEEP_ALIVE"
DEFAULT_KEEP_ALIVE = 300.0  # seconds a CPU-only machine keeps `jinfer generate`'s worker (README)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (`jinfer: error: ...`, exit 2)."""

    def error(self, message: str):
        print(f"jinfer: error: {self.prog.removeprefix('jinfer ')}: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def int_at_least(low: int):
    """An argparse type: an integer >= low (e.g. --max-batch 0 is refused)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small; accepted: an integer >= {low}")
        return value

    return parse


def _step(text: str) -> int | str:
    """An argparse type: a checkpoint step number >= 0, or "latest"."""
    if text == "latest":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step; accepted: an integer >= 0 or 'latest'")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is invalid; accepted: a finite number > 0")
    return value


def duration(text: str) -> float:
    """An argparse type: seconds, as a number or with a unit ("90", "90s", "5m", "1.5h"); "0" or
    "off" for none."""
    text = text.strip().lower()
    if text in ("off", "no", "none"):
        return 0.0
    units = {"s": 1, "m": 60, "h": 3600}
    scale = units.get(text[-1:], 1) if text else 1
    number = text[:-1] if text[-1:] in units else text
    try:
        value = float(number) * scale
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; accepted: seconds >= 0 as a number or with a unit, e.g. "
            "90, 90s, 5m, 1h, or 0/off"
        )
    return value


def _add_model_args(p: argparse.ArgumentParser, default: str = "smollm2-135m-instruct") -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"model directory, known name or Hugging Face id org/name (default: {default})",
    )
    p.add_argument("--mesh", default=None, help='device mesh, e.g. "data=2,model=4" (default: one device)')
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="parameter, compute and KV-cache dtype (default: bfloat16 on TPU/GPU; generation on a CPU "
        "with bfloat16 matrix instructions: bfloat16 weights under float32 compute; else as saved)",
    )
    p.add_argument("--quantize", default=None, choices=["int8"], help="weight-only quantization at load time")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-tokens",
        type=int_at_least(1),
        default=None,
        help="tokens to generate (default: model's config)",
    )
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-k", type=int_at_least(-1), default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--seed", type=int_at_least(0), default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        default=None,
        help="generate past the model's end-of-sequence tokens, up to --max-tokens (e.g. to time decode)",
    )


SAMPLING_FLAGS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop", "ignore_eos")


def _sampling_overrides(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k, None) is not None}


def cli_max_batch(n_prompts: int) -> int | None:
    """Slots for `jinfer generate` with n prompts known up front: the power of two >= n when
    n <= 8 (no more slots than prompts: a small engine allocates and starts faster), else None
    (the KV-budget default)."""
    if n_prompts > 8:
        return None
    return 1 << max(0, int(n_prompts) - 1).bit_length()


def cmd_generate(args: argparse.Namespace) -> int:
    if args.logprobs is not None and not args.json:
        raise ConfigError("--logprobs needs --json: the log-probabilities are printed in the JSON rows")
    prompts = args.prompt or [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise ConfigError("no prompt: give PROMPT arguments, or one prompt per line on stdin")
    max_batch = args.max_batch or cli_max_batch(len(prompts))
    keep_alive = keep_alive_seconds(args)
    if keep_alive:  # a worker process keeps the engine loaded between commands (jinfer.keepalive)
        from jinfer import keepalive

        try:
            return keepalive.run(args, prompts, max_batch, keep_alive)
        except keepalive.RuntimeDirError as e:
            if not keep_alive_by_default(args):
                raise
            print(f"jinfer: no keep-alive worker: {e}; loading in this process", file=sys.stderr)
            setup_compilation_cache(args.compilation_cache)  # main() left it to the worker
    with interrupt_exits():
        llm = generate_llm(args, max_batch)
    return generate_with(llm, args, prompts, max_batch, TERMINAL)


def interrupt_exits() -> contextlib.AbstractContextManager:
    """Ctrl-C while this command loads its model (and builds its engine) exits at once with
    EXIT_INTERRUPTED: see jinfer.loading.exit_on_interrupt."""
    from jinfer import loading

    loading.exit_on_interrupt(EXIT_INTERRUPTED)
    return loading.interrupt_exits()


def keep_alive_seconds(args: argparse.Namespace) -> float:
    """`generate --keep-alive`, else $JINFER_KEEP_ALIVE, else `default_keep_alive()`. `--verify`
    asks to re-hash the model files now, so it loads in this process (0) whatever the setting."""
    if getattr(args, "verify", False):
        return 0.0
    if getattr(args, "keep_alive", None) is not None:
        return args.keep_alive
    if keep_alive_by_default(args):
        return default_keep_alive()
    text = os.environ[KEEP_ALIVE_ENV].strip()
    try:
        return duration(text)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"{KEEP_ALIVE_ENV}={text!r}: {e}") from None


def keep_alive_by_default(args: argparse.Namespace) -> bool:
    """Neither --keep-alive nor $JINFER_KEEP_ALIVE says."""
    return getattr(args, "keep_alive", None) is None and not os.environ.get(KEEP_ALIVE_ENV, "").strip()


def default_keep_alive() -> float:
    """DEFAULT_KEEP_ALIVE where JAX can only run on the CPU, else 0 (no worker).

    A worker holds what its model needs after the command is done. On the CPU that is memory,
    which the kernel takes back first (the worker marks itself the first to go when memory runs
    out) and which it gives back after its idle period. On a TPU it would hold the chips, which
    one process owns at a time, and on a GPU the memory JAX reserves, so a script run next could
    not start: there the default is no worker. Decided from JAX_PLATFORMS when set, else from the
    accelerator plugins installed (checked without importing JAX)."""
    import socket

    if os.name != "posix" or not hasattr(socket, "AF_UNIX"):
        return 0.0
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return DEFAULT_KEEP_ALIVE if set(platforms.replace(" ", "").split(",")) == {"cpu"} else 0.0
    return 0.0 if accelerator_plugins() else DEFAULT_KEEP_ALIVE


def accelerator_plugins() -> list[str]:
    """The JAX accelerator backends installed here: libtpu, and the PJRT plugins in the
    `jax_plugins` namespace package (jax[cuda12] installs jax_plugins.xla_cuda12; ROCm and Metal
    theirs). Names only: nothing is imported."""
    import importlib.util
    import pkgutil

    found = [name for name in ("libtpu", "libtpu_nightly") if importlib.util.find_spec(name)]
    if os.environ.get("TPU_LIBRARY_PATH"):
        found.append("TPU_LIBRARY_PATH")
    plugins = importlib.util.find_spec("jax_plugins")
    if plugins is not None and plugins.submodule_search_locations:
        found += [f"jax_plugins.{m.name}" for m in pkgutil.iter_modules(plugins.submodule_search_locations)]
    return found


def generate_llm(args: argparse.Namespace, max_batch: int | None):
    """The engine `jinfer generate` runs on (also what a keep-alive worker holds)."""
    from jinfer.llm import LLM

    return LLM(
        args.model,
        mesh=args.mesh,
        dtype=args.dtype,
        max_batch=max_batch,
        max_len=args.max_len,
        quantize=args.quantize,
    )


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@dataclasses.dataclass(frozen=True)
class Sink:
    """Where `jinfer generate` writes: the terminal, or a keep-alive worker's connection.
    `watch(handles)`, if set, sees the queued requests of a --json or several-prompt run (to
    cancel them when the reader goes away before an output is ready to write)."""

    out: Callable[[str], None]
    err: Callable[[str], None]
    watch: Callable[[list], None] | None = None


def _write_stderr(text: str) -> None:
    sys.stderr.write(text)


TERMINAL = Sink(_write_stdout, _write_stderr)


def generate_with(
    llm, args: argparse.Namespace, prompts: list[str], max_batch: int | None, sink: Sink
) -> int:
    """`jinfer generate`'s work on a built engine, written to `sink`; returns the exit code (0)."""
    out = sink.out
    if args.verbose:
        _print_engine_choices(llm, None if args.max_batch else max_batch, len(prompts), sink.err)
    defaults = llm.default_params()
    overrides = (
        {"max_tokens": 128, **_sampling_overrides(args)}
        if "max_new_tokens" not in llm.generation_defaults
        else _sampling_overrides(args)
    )
    params = defaults.replace(**overrides, logprobs=args.logprobs)
    inputs = prompts if args.raw else [[{"role": "user", "content": p}] for p in prompts]
    if llm.tokenizer is None or not llm.tokenizer.chat_template:
        inputs = prompts
    per_prompt = [params] * len(inputs)
    if args.max_tokens is None:  # the default length: at most what fits after each prompt
        max_len = llm.engine.config.max_len
        inputs = [llm.encode_prompt(inp, i) for i, inp in enumerate(inputs)]  # tokenized once
        per_prompt = [_fitting(ids, params, max_len) for ids in inputs]
    if args.json or len(prompts) > 1:
        handles = llm.submit_all(inputs, per_prompt)
        if sink.watch is not None:
            sink.watch(handles)
        try:  # each output as soon as it and those before it are done
            for prompt, handle in zip(prompts, handles, strict=True):
                _write_output(prompt, handle.result(), args, out)
        finally:
            for handle in handles:
                handle.cancel()
        return 0
    stream = llm.stream(inputs[0], per_prompt[0])
    try:  # a reader that goes away (a closed pipe, a keep-alive client's Ctrl-C) aborts the request
        for piece in stream:
            out(piece)
    finally:
        stream.close()
    out("\n")
    return 0


def _fitting(ids: list[int], params, max_len: int):
    """`params` with max_tokens lowered to the room a prompt of token `ids` leaves in max_len (a
    prompt with no room at all keeps it, and gets the too-long error)."""
    room = max_len - len(ids)
    return params.replace(max_tokens=room) if 1 <= room < params.max_tokens else params


def _write_output(prompt: str, output, args: argparse.Namespace, out) -> None:
    if not args.json:
        out(output.text + "\n")
        return
    row = {
        "prompt": prompt,
        "text": output.text,
        "token_ids": output.token_ids,
        "finish_reason": output.finish_reason,
        "usage": output.usage,
        **({"logprobs": _jsonable_logprobs(output.logprobs)} if output.logprobs else {}),
    }
    out(json.dumps(row, ensure_ascii=False) + "\n")


def _print_engine_choices(llm, cli_slots: int | None, n_prompts: int, err: Callable[[str], None]) -> None:
    """`generate --verbose`: what the engine was built with and why, on stderr."""
    for line in llm.engine_choices.lines():
        if cli_slots is not None and line.startswith("max_batch="):
            line = f"max_batch={cli_slots}: jinfer generate's {n_prompts} prompt(s) need no more slots"
        err(f"jinfer: {line}\n")
    mesh = llm.engine.mesh
    err(f"jinfer: mesh={','.join(f'{k}={v}' for k, v in mesh.shape.items())}: {mesh.size} device(s)\n")


def _jsonable_logprobs(logprobs):
    return [{str(k): v for k, v in entry.items()} for entry in logprobs]


def cmd_embed(args: argparse.Namespace) -> int:
    from jinfer.embed import Embedder
    from jinfer.hub import DEFAULT_ENCODER

    with interrupt_exits():
        embedder = Embedder(args.model or DEFAULT_ENCODER, mesh=args.mesh, dtype=args.dtype)
    texts = args.text or [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ConfigError("no text: give TEXT arguments, or one text per line on stdin")
    for text, vec in zip(texts, embedder.embed(texts), strict=True):
        print(json.dumps({"text": text, "embedding": [round(float(x), 7) for x in vec]}, ensure_ascii=False))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from jinfer.convert import convert

    _check_convert_output(args.out, args.overwrite)
    with _interrupt_removes_partial_output(args.out):
        out = convert(
            args.src,
            args.out,
            dtype=args.dtype or "float32",
            quantize=args.quantize,
            overwrite=args.overwrite,
        )
    print(f"wrote {out}")
    return 0


@contextlib.contextmanager
def _interrupt_removes_partial_output(out: str):
    """Ctrl-C (SIGINT) during a conversion removes what this process wrote so far (the hidden
    `.NAME.tmp-PID-*` directory; OUT itself appears only when complete) and exits with
    EXIT_INTERRUPTED at once. As a KeyboardInterrupt it could land in a callback JAX runs from the
    garbage collector, which only prints it, and the conversion went on."""
    import signal
    import threading
    from pathlib import Path

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    path = Path(out).absolute()

    def stop(*_):
        import shutil

        for partial in path.parent.glob(f".{path.name}.tmp-{os.getpid()}-*"):
            shutil.rmtree(partial, ignore_errors=True)
        os._exit(EXIT_INTERRUPTED)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_convert_output(out: str, overwrite: bool) -> None:
    """Refuses an output that cannot be written before any conversion work."""
    from pathlib import Path

    path = Path(out).absolute()
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; pass --overwrite to replace it")
    parent = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot create {path}: {parent} is not a writable directory")


def cmd_pull(args: argparse.Namespace) -> int:
    from jinfer.hub import resolve_model

    print(resolve_model(args.name))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from jinfer.checkpoint import inspect_model_dir

    print(inspect_model_dir(args.dir, mesh_spec=args.mesh))
    return 0


def cmd_rehash(args: argparse.Namespace) -> int:
    from jinfer.integrity import rehash_model_dir

    changes = rehash_model_dir(args.dir)
    for change in changes:
        print(f"jinfer rehash: {change} (now trusted)", file=sys.stderr)
    print(
        f"rehashed {args.dir}: {len(changes)} file(s) changed" if changes else f"{args.dir}: no file changed"
    )
    return 0


def cmd_run_batch(args: argparse.Namespace) -> int:
    from jinfer.batch import run_batch_from_args

    interrupt_exits()  # during the model load only: the run itself stops gracefully on Ctrl-C
    return run_batch_from_args(args)


def cmd_merge(args: argparse.Namespace) -> int:
    from jinfer.batch import merge_shards

    n = merge_shards(args.output)
    print(f"merged {n} lines into {args.output}")
    return 0


def cmd_freeze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jinfer.osutil import json_object
    from jinfer.training_checkpoint import freeze_checkpoint

    config = None
    if args.config:  # a missing or malformed file is a ConfigError naming it (exit 2)
        path = Path(args.config)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from None
        config = json_object(data, path, ConfigError)
    select = tuple(s.strip() for s in args.select.split(",") if s.strip())
    step = "latest" if args.step is None else args.step
    out = freeze_checkpoint(
        args.ckpt, args.out, select, step, args.dtype, args.model_class, config, overwrite=args.overwrite
    )
    print(f"wrote {out}")
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    from jinfer import keepalive

    found = keepalive.workers()
    for worker in found:
        print(json.dumps(worker) if args.json else keepalive.describe(worker))
    if not found and not args.json:
        print("jinfer: no keep-alive workers", file=sys.stderr)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from jinfer import keepalive

    stopped = keepalive.stop_all()
    for worker in stopped:
        print(f"stopped {keepalive.describe(worker)}")
    if not stopped:
        print("jinfer: no keep-alive workers", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from jinfer.serve.command import serve

    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jinfer", description="JAX/XLA inference for Flax models.")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    parser.add_argument(
        "--compilation-cache",
        default=None,
        help="persistent XLA compilation cache directory (default: $JINFER_COMPILATION_CACHE "
        "or the user cache dir; 'off' disables)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every model file against integrity.json, also those verified by an earlier "
        "run and unchanged since (same as JINFER_VERIFY=full)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a prompt (chat template applied)")
    p.add_argument("prompt", nargs="*", help="prompt(s); read from stdin (one per line) when absent")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument(
        "--logprobs",
        type=int_at_least(0),
        default=None,
        help="top-N (<= 5) log-probabilities per token, with --json",
    )
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object per output, with token ids")
    p.add_argument(
        "--max-batch",
        type=int_at_least(1),
        default=None,
        help="decode slots (default: the prompts' count rounded up to a power of two when <= 8, "
        "else what the KV-cache budget holds)",
    )
    p.add_argument(
        "--verbose", action="store_true", help="print the engine's dtype, slots, buckets, layout and why"
    )
    p.add_argument(
        "--max-len",
        type=int_at_least(2),
        default=None,
        help="prompt + generated tokens per slot (default: "
        "the model's context, capped (2,048 on CPU) and shortened to fit the KV-cache budget; "
        "--verbose says)",
    )
    p.add_argument(
        "--keep-alive",
        type=duration,
        default=None,
        metavar="DURATION",
        help="keep the engine loaded in a background worker for DURATION after the last request "
        "(e.g. 10m), so the next generate with the same engine flags starts at once; `jinfer stop` "
        f"ends it; 0 or off: load in this process, nothing left running (default: ${KEEP_ALIVE_ENV}, "
        f"else {DEFAULT_KEEP_ALIVE / 60:g}m where JAX runs only on the CPU, 0 with a TPU or GPU)",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("ps", help="list the keep-alive workers of `jinfer generate` (see --keep-alive)")
    p.add_argument("--json", action="store_true", help="one JSON object per worker")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("stop", help="stop the keep-alive workers (after their requests finish)")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("embed", help="embed texts with an encoder model; prints JSON lines")
    p.add_argument("text", nargs="*", help="text(s); read from stdin when absent")
    _add_model_args(p, default="all-minilm-l6-v2")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser(
        "convert", help="convert a Hugging Face directory or a .gguf file to a jinfer model dir"
    )
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quantize", default=None, choices=["int8"], help="weight-only quantization")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "pull", help="fetch and convert a known model into the cache (default: smollm2-135m-instruct)"
    )
    p.add_argument("name", nargs="?", default=None)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("inspect", help="print a model directory's parameters without loading them")
    p.add_argument("dir")
    p.add_argument("--mesh", default=None, help='show per-device bytes for this mesh, e.g. "data=2,model=4"')
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "rehash",
        help="trust a model directory's edited config/tokenizer files: re-record their hashes "
        "(the parameter files must still match)",
    )
    p.add_argument("dir")
    p.set_defaults(func=cmd_rehash)

    p = sub.add_parser("freeze", help="write a model dir from a training run's Orbax checkpoint")
    p.add_argument("ckpt", help="CheckpointManager directory, one step directory, or an Orbax checkpoint")
    p.add_argument("out")
    p.add_argument("--select", default="params", help="comma-separated key paths (default: params)")
    p.add_argument(
        "--step", type=_step, default=None, help="step to restore: a number or 'latest' (default: latest)"
    )
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="cast floating arrays")
    p.add_argument("--model-class", default=None, help="registered model class (then --select params)")
    p.add_argument("--config", default=None, help="JSON file with the model class's config")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_freeze)

    p = sub.add_parser("run-batch", help="offline generation over a JSONL file, resumable")
    from jinfer.batch import add_run_batch_args

    add_run_batch_args(p)
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_run_batch)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the serve extra)")
    from jinfer.serve.command import add_serve_args

    _add_model_args(p)
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("merge", help="merge per-process output shards of a run-batch")
    p.add_argument("output")
    p.set_defaults(func=cmd_merge)
    return parser


COMPILING_COMMANDS = frozenset({"generate", "embed", "run-batch", "serve"})


def setup_compilation_cache(value: str | None) -> None:
    from jinfer.compile import enable_compilation_cache, maybe_enable_from_env

    if value == "off":
        return
    if value:
        enable_compilation_cache(value)
    elif maybe_enable_from_env() is None:
        import platformdirs

        enable_compilation_cache(os.path.join(platformdirs.user_cache_dir("jinfer"), "xla"))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (see EXIT_* above). `--debug` re-raises."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    try:
        args = build_parser().parse_args([a for a in argv if a != "--debug"])
    except SystemExit as e:  # usage errors (already printed) and --help, as a return value
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    args.debug = debug
    try:
        if args.verify:
            from jinfer.digest_record import VERIFY_ENV

            os.environ[VERIFY_ENV] = "full"
        keep_alive = args.command == "generate" and keep_alive_seconds(args)  # the worker sets one up
        if args.command in COMPILING_COMMANDS and not keep_alive:  # inspect, ... leave no cache behind
            setup_compilation_cache(args.compilation_cache)
        return args.func(args) or 0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`jinfer generate ... | head -1`): not an error
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return 0
    except Exception as e:
        if args.debug:
            raise
        code, message = error_report(e, args)
        print(f"jinfer: error: {message}", file=sys.stderr)
        return code


def error_report(e: Exception, args: argparse.Namespace) -> tuple[int, str]:
    """(exit code, one-line message) for an error that ends a command."""
    import errno

    from jinfer.errors import UnsupportedArchitectureError
    from jinfer.hf_hub import HubDownloadError

    text = " ".join(str(e).split()) or type(e).__name__
    usage = (ConfigError, InputError, CheckpointNotFoundError, CheckpointKeyError)
    if isinstance(e, (*usage, HubDownloadError, UnsupportedArchitectureError)):  # nothing to run
        return EXIT_USAGE, text
    # TensorStore (Orbax's writer) reports a full disk as a ValueError "RESOURCE_EXHAUSTED: ...
    # No space left on device"; it is the same failure, with the same advice.
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in text:
        filename = getattr(e, "filename", None)
        where = f" writing {filename}" if filename else ""
        resume = (
            "rows written so far are kept; free space and rerun the same command to resume"
            if args.command == "run-batch"
            else "free space and rerun the command"
        )
        return EXIT_IO, f"no space left on device{where}: {resume}"
    if isinstance(e, JinferError):
        return EXIT_RUNTIME, text
    if isinstance(e, OSError):
        return EXIT_IO, f"{type(e).__name__}: {text}"
    return EXIT_RUNTIME, f"internal error {type(e).__name__}: {text} (rerun with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
