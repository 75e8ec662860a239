"""Where a default engine's decode step spends its time, by XLA op kind (issue 15).

Builds `jinfer.LLM(model)` (defaults), runs `warmup()` and one set of `rows` chat prompts, then
another set (no prefix-cache hits) under `jax.profiler.trace`, and sums the trace's XLA op
durations by kind (the op name without its numeric suffix: `ynn_fusion`,
`select_dynamic-slice_fusion`, ...), with the decode rounds' wall time per step.
Thread-seconds: XLA:CPU runs ops on two or more threads at once.

    python scripts/bench_decode_profile.py --rows 32 --tokens 48
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=32, help="prompts decoding together (a decode bucket)")
    ap.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()

    import bench
    import jax

    import jinfer
    from jinfer.runtime import runner

    rounds: list[float] = []
    decode = runner.ModelRunner.decode

    def timed(self, state, bucket=None):
        t0 = time.perf_counter()
        try:
            return decode(self, state, bucket)
        finally:
            rounds.append(time.perf_counter() - t0)

    runner.ModelRunner.decode = timed
    llm = jinfer.LLM(args.model)
    llm.warmup()
    params = jinfer.SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    llm.generate([messages for messages, _ in bench.build_prompts(args.rows, seed=7)], params)
    rounds.clear()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            llm.generate([messages for messages, _ in bench.build_prompts(args.rows, seed=8)], params)
        with gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]) as f:
            trace = json.load(f)
    steps = len(rounds) * llm.engine.config.decode_steps
    total: collections.Counter[str] = collections.Counter()
    for e in trace["traceEvents"]:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith("$") and not name.startswith(("Thunk", "end: ")):
            total[re.sub(r"\.\d+$", "", name)] += e.get("dur", 0)
    print(f"{args.rows} rows, {steps} decode steps: {1e3 * sum(rounds) / steps:.1f} ms per step (wall)")
    print("XLA op kind: thread-ms per decode step (whole run, prefill included)")
    for name, us in total.most_common(args.top):
        print(f"  {us / 1e3 / steps:8.2f}  {name}")


if __name__ == "__main__":
    main()
