"""The first request after `llm.warmup()`: compile-only warm-up vs warm-up that also runs each
program once (issue 15).

XLA:CPU builds some kernels (YNNPACK's) at a program's first run. `ModelRunner.warmup(run=True)`
(what `LLM.warmup()` does) runs every prefill and decode program once on inputs that write nothing,
so the first request no longer pays that. Each trial is a fresh process on the default engine
(`jinfer.LLM("smollm2-135m-instruct")`) with a shared, already populated compilation cache: it times
the warm-up, then two generate() calls of --prompts chat prompts (the chat set of
`scripts/bench.py`, greedy, its mixed max_tokens), the first and the second after warm-up. The
modes alternate; medians of --repeats trials each.

    python scripts/bench_first_request.py --repeats 3
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # the chat workload of scripts/bench.py

MODEL = "smollm2-135m-instruct"


def trial(run: bool, prompts: int, cache: str) -> dict:
    import jax

    jax.config.update("jax_compilation_cache_dir", cache)
    import jinfer
    from jinfer.sampling import SamplingParams

    with jinfer.LLM(MODEL) as llm:
        t0 = time.perf_counter()
        llm._loop.call(lambda: llm.engine.warmup(run=run))
        out = {"warmup_s": time.perf_counter() - t0}
        for name, seed in (("first", bench.CHAT_SEED), ("second", bench.CHAT_SEED + 1)):
            chat = bench.build_prompts(prompts, seed)
            params = [SamplingParams(max_tokens=m, temperature=0.0) for _, m in chat]
            t0 = time.perf_counter()
            outs = llm.generate([m for m, _ in chat], params)
            wall = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            out[f"{name}_s"], out[f"{name}_tok_s"] = wall, tokens / wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--trial", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trial:
        run, cache = args.trial.split(",", 1)
        print(json.dumps(trial(run == "1", args.prompts, cache)))
        return
    with tempfile.TemporaryDirectory() as cache:

        def spawn(run: bool) -> dict:
            argv = [
                sys.executable,
                __file__,
                "--prompts",
                str(args.prompts),
                "--trial",
                f"{int(run)},{cache}",
            ]
            proc = subprocess.run(argv, capture_output=True, text=True, check=True, env=os.environ.copy())
            return json.loads(proc.stdout.strip().splitlines()[-1])

        print("# populating the compilation cache (untimed) ...", flush=True)
        spawn(True)
        results: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.repeats):
            for run in (False, True):
                results[run].append(spawn(run))
                print(f"  run={run}: {results[run][-1]}", flush=True)
    med = {run: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for run, rs in results.items()}
    print(
        f"\n{args.prompts} chat prompts, medians of {args.repeats} processes"
        " (the two calls run different prompts)"
    )
    print("warm-up          warm-up s  first call s  second call s")
    for run, label in ((False, "compile only"), (True, "compile + run")):
        m = med[run]
        print(f"{label:16s} {m['warmup_s']:9.2f} {m['first_s']:13.2f} {m['second_s']:14.2f}")
    speedup = med[False]["first_s"] / med[True]["first_s"]
    print(f"first call after warm-up: {speedup:.2f}x faster when the warm-up runs the programs")


if __name__ == "__main__":
    main()
