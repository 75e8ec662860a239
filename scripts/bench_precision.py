"""Decode-step and prefill time of the default engine (`jinfer.LLM(name)`) in float32 against
bfloat16 weight matrices under float32 compute (jinfer.precision), SmolLM2-135M-Instruct on CPU.

Both engines live in one process and are timed alternately (each repeat runs every case on one
engine, then on the other), so the machine's load moves both alike. A decode round is
`decode_steps` steps of the compiled program at one decode bucket with every row live at one
position; a prefill call is `prefill_rows` prompts of one 64-token block (synthetic tokens).

    python scripts/bench_precision.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import jinfer
from jinfer.runtime.runner import DecodeState

MODEL = "smollm2-135m-instruct"
CASES = [(rows, pos) for rows in (1, 8, 32) for pos in (50, 300)]


def decode_seconds(llm, rows: int, pos: int) -> float:
    """Seconds per decode step at `rows` live rows, all at position `pos`."""
    state = DecodeState.empty(rows)
    state.active[:] = True
    state.remaining[:] = 1 << 20
    state.positions[:] = pos
    state.tokens[:] = 100
    t0 = time.perf_counter()
    llm.engine.decode(state, rows)
    return (time.perf_counter() - t0) / llm.engine.config.decode_steps


def prefill_seconds(llm) -> float:
    """Seconds of one shared prefill call: `prefill_rows` prompts of 64 tokens."""
    rows = llm.engine.prefill_rows
    pieces = [[100 + i] * 64 for i in range(rows)]
    t0 = time.perf_counter()
    llm.engine.prefill_first_pieces(list(range(rows)), pieces)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    engines = {
        "float32": jinfer.LLM(MODEL, dtype="float32"),
        "bf16_weights": jinfer.LLM(MODEL, dtype="float32", weight_dtype="bfloat16"),
    }
    for name, llm in engines.items():
        print(
            f"# {name}: {llm.engine_choices.dtype.value}; max_batch {llm.engine.config.max_batch}", flush=True
        )
        for rows, pos in CASES:  # compile and warm every program first
            decode_seconds(llm, rows, pos)
        prefill_seconds(llm)
    times: dict[str, dict[str, list[float]]] = {name: {} for name in engines}
    for _ in range(args.repeats):
        for name, llm in engines.items():
            for rows, pos in CASES:
                times[name].setdefault(f"decode rows={rows} pos={pos}", []).append(
                    decode_seconds(llm, rows, pos)
                )
            times[name].setdefault(f"prefill {llm.engine.prefill_rows}x64", []).append(prefill_seconds(llm))
    result = {}
    print(f"{'case':<24} {'float32 ms':>11} {'bf16 weights ms':>16} {'speed-up':>9}")
    for case in times["float32"]:
        f32, mixed = (1e3 * statistics.median(times[n][case]) for n in engines)
        result[case] = {
            "float32_ms": round(f32, 2),
            "bf16_weights_ms": round(mixed, 2),
            "speedup": round(f32 / mixed, 3),
        }
        print(f"{case:<24} {f32:>11.1f} {mixed:>16.1f} {f32 / mixed:>8.2f}x")
    result["repeats"] = args.repeats
    result["spread_pct"] = round(
        100 * float(np.median([np.ptp(v) / np.median(v) for t in times.values() for v in t.values()])), 1
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
