"""Batched prefill: short chat prompts sharing one prefill call vs one call each (issue 15).

Two measurements on `jinfer.LLM("smollm2-135m-instruct")` (defaults: 32 slots on this CPU), each a
same-run ratio:
  calls  4 chat prompts (the bench's chat set, 35-52 tokens) prefilled by `runner.prefill`, one
         call each, vs `runner.prefill_first_pieces` (one call of 4 rows); median of --repeats.
  chat48 (with --chat48) the 48-prompt chat workload of `scripts/bench.py --defaults` (one
         generate() call, greedy, mixed max_tokens), on the default engine and on one with
         `prefill_rows=1`, alternating, median tokens/s of --repeats sets each.

    python scripts/bench_prefill_rows.py --repeats 7
    python scripts/bench_prefill_rows.py --chat48 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # the workloads of scripts/bench.py

MODEL = "smollm2-135m-instruct"


def prompts_ids(llm, count: int, seed: int) -> list[list[int]]:
    return [llm.tokenizer.encode_chat(m) for m, _ in bench.build_prompts(count, seed)]


def bench_calls(repeats: int) -> None:
    import jax

    import jinfer

    with jinfer.LLM(MODEL) as llm:
        runner = llm.engine
        runner.warmup()
        short = [p for p in prompts_ids(llm, 48, bench.CHAT_SEED) if len(p) <= runner.config.prefill_block]
        pieces = short[:4]
        slots = [1, 2, 3, 4]

        def median_ms(fn) -> float:
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times.append(time.perf_counter() - t0)
            return 1e3 * statistics.median(times[1:])  # the first run is untimed

        one_each = median_ms(lambda: [runner.prefill(s, p, 0) for s, p in zip(slots, pieces, strict=True)])
        shared = median_ms(lambda: runner.prefill_first_pieces(slots, pieces))
        print(f"prompt lengths {[len(p) for p in pieces]}, {runner.prefill_rows} rows per call")
        print(f"one call each: {one_each:.1f} ms; one call of 4 rows: {shared:.1f} ms")
        print(f"ratio {one_each / shared:.2f}x")


def bench_chat48(repeats: int) -> None:
    import jinfer
    from jinfer.sampling import SamplingParams

    sets = [bench.build_prompts(48, bench.CHAT_SEED + i) for i in range(repeats + 1)]
    engines = {"default": jinfer.LLM(MODEL), "prefill_rows=1": jinfer.LLM(MODEL, prefill_rows=1)}
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for i, chat in enumerate(sets):
        params = [SamplingParams(max_tokens=m, temperature=0.0) for _, m in chat]
        for name, llm in engines.items():
            if i == 0:
                llm.warmup()
            t0 = time.perf_counter()
            outs = llm.generate([messages for messages, _ in chat], params)
            wall = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            if i:  # set 0 warms up
                rates[name].append(tokens / wall)
                print(f"set {i} {name}: {tokens / wall:.1f} tok/s ({tokens} tok, {wall:.1f} s)", flush=True)
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"median tok/s: {med}; default / prefill_rows=1: {med['default'] / med['prefill_rows=1']:.2f}x")
    for llm in engines.values():
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--chat48", action="store_true", help="the end-to-end chat workload instead")
    args = ap.parse_args()
    print(f"# load average: {bench.uptime()}", flush=True)
    bench_chat48(args.repeats) if args.chat48 else bench_calls(args.repeats)


if __name__ == "__main__":
    main()
