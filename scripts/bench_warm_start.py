"""One-shot CLI start-up: `jinfer generate` cold vs warm, and llama-cpp-python.

Each run is a fresh process, timed from process start to its first stdout byte ("first output")
and to its exit ("total"). With default flags on this CPU-only machine `jinfer generate` keeps a
keep-alive worker for 5 minutes (README "Command line"), so a user's commands are:
  cold   `python -m jinfer.cli --compilation-cache EMPTY_DIR generate PROMPT --max-tokens N
         --temperature 0`, no worker running: it starts one, which compiles and loads the model;
  warm   the same command again: the worker answers, the command imports no JAX. The worker is
         stopped (`jinfer stop`) at the end of each repetition.
And without a worker (`--keep-alive 0`: each command loads in its own process):
  cold-fresh  the command on another empty cache directory;
  warm-fresh  the same again on that directory (executables, traced programs cached);
  llama  a llama-cpp-python script doing the same: load the GGUF jinfer's model was converted from,
         one streamed chat completion of N greedy tokens (n_threads=2).
Medians over `--repeats` (the five kinds per repetition, interleaved). Ratios (issue 15): cold /
warm first output (target >= 3x) and warm total / llama total (target <= 2x), with the defaults
and for fresh processes.

    python scripts/bench_warm_start.py --repeats 3 --json warm_start.json

The model is `smollm2-135m-instruct` from $JINFER_HOME (converted on first use). On a shared
machine the numbers move with the load: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
PROMPT = "What is the capital of France?"
LLAMA_SCRIPT = """
import sys
import llama_cpp
path, prompt, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=2, verbose=False)
messages = [{"role": "user", "content": prompt}]
for chunk in llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0, stream=True):
    piece = chunk["choices"][0]["delta"].get("content")
    if piece:
        sys.stdout.write(piece)
        sys.stdout.flush()
sys.stdout.write("\\n")
"""


def gguf_path() -> Path:
    """The GGUF the model was converted from: where scripts/bench.py keeps it, else jinfer's
    download cache (fetched by `jinfer.hub` on first use)."""
    from jinfer import hub

    fixed = Path("/work/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    if fixed.is_file():
        return fixed
    hub.resolve_model(MODEL)  # converts (and downloads the GGUF) if needed
    return hub.jinfer_home() / "downloads" / hub.KNOWN_MODELS[MODEL].gguf_file


def timed(argv: list[str], env: dict[str, str], timeout: float) -> dict:
    """Process start -> first stdout byte, and -> exit; with the output and exit code."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0)
    first_byte = proc.stdout.read(1)
    first = time.perf_counter() - t0
    out, err = proc.communicate(timeout=timeout)
    total = time.perf_counter() - t0
    return {
        "first_output_s": first,
        "total_s": total,
        "rc": proc.returncode,
        "text": (first_byte + out).decode(errors="replace").strip(),
        "stderr_tail": err.decode(errors="replace")[-500:] if proc.returncode else "",
    }


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def summarize(runs: list[dict]) -> dict:
    return {
        "first_output_s": statistics.median(r["first_output_s"] for r in runs),
        "total_s": statistics.median(r["total_s"] for r in runs),
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--no-llama", action="store_true", help="skip the llama-cpp-python runs")
    ap.add_argument("--no-fresh", action="store_true", help="skip the runs without a worker")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args()

    gguf = None if args.no_llama else gguf_path()
    unset = ("JINFER_COMPILATION_CACHE", "XLA_FLAGS", "JINFER_KEEP_ALIVE")  # the defaults
    env = {k: v for k, v in os.environ.items() if k not in unset}
    jinfer = [sys.executable, "-m", "jinfer.cli", "--compilation-cache", "DIR", "generate", args.prompt]
    jinfer += ["--max-tokens", str(args.max_tokens), "--temperature", "0"]
    kinds = ("cold", "warm", "cold-fresh", "warm-fresh", "llama")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    load_start = load_average()
    for i in range(args.repeats):
        with (
            tempfile.TemporaryDirectory(prefix="jinfer-cc-") as cache,
            tempfile.TemporaryDirectory(prefix="jka-") as run_dir,
        ):
            kept_env = {**env, "JINFER_RUNTIME_DIR": run_dir}
            argv = [cache if a == "DIR" else a for a in jinfer]
            for kind in ("cold", "warm"):  # the defaults: the first command starts a worker
                runs[kind].append(timed(argv, kept_env, args.timeout))
            subprocess.run([sys.executable, "-m", "jinfer.cli", "stop"], env=kept_env, check=True)
        if not args.no_fresh:
            with tempfile.TemporaryDirectory(prefix="jinfer-cc-") as cache:
                argv = [cache if a == "DIR" else a for a in jinfer] + ["--keep-alive", "0"]
                for kind in ("cold-fresh", "warm-fresh"):
                    runs[kind].append(timed(argv, env, args.timeout))
        if gguf is not None:
            llama = [sys.executable, "-c", LLAMA_SCRIPT, str(gguf), args.prompt, str(args.max_tokens)]
            runs["llama"].append(timed(llama, env, args.timeout))
        done = {k: f"{v[-1]['first_output_s']:.2f}/{v[-1]['total_s']:.2f}s" for k, v in runs.items() if v}
        print(f"# repetition {i + 1}: first output/total {done}", flush=True)
    failed = [(k, r) for k, rs in runs.items() for r in rs if r["rc"] != 0]
    if failed:
        raise SystemExit(f"failed runs: {failed[:2]}")
    report = {k: summarize(v) for k, v in runs.items() if v}
    ratios = [("cold_over_warm_first_output", "cold / warm first output", ">= 3x")]
    ratios += [("warm_over_llama_total", "warm / llama.cpp total", "<= 2x")]
    for suffix in ("", "-fresh"):
        cold, warm = report.get("cold" + suffix), report.get("warm" + suffix)
        if cold and warm:
            report[f"cold_over_warm_first_output{suffix}"] = cold["first_output_s"] / warm["first_output_s"]
            if "llama" in report:
                report[f"warm_over_llama_total{suffix}"] = warm["total_s"] / report["llama"]["total_s"]
    report.update(load_average_start=load_start, load_average_end=load_average(), args=vars(args))
    print(f"load average (1/5/15 min): start {load_start}, end {report['load_average_end']}")
    for kind in (k for k in kinds if k in report):
        r = report[kind]
        print(f"{kind:10s} first output {r['first_output_s']:6.2f} s   total {r['total_s']:6.2f} s")
    labels = (("", "defaults (keep-alive worker)"), ("-fresh", "fresh processes (--keep-alive 0)"))
    for suffix, label in labels:
        for key, text, target in ratios:
            if key + suffix in report:
                print(f"{label:34s} {text}: {report[key + suffix]:.2f}x (target {target})")
    for kind in ("warm", "warm-fresh"):
        if kind in report:
            print(f"{kind} output: {report[kind]['runs'][-1]['text']!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
