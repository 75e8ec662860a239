"""KV-cache block size of the engine `jinfer generate` builds for one prompt (issue 15).

`jinfer generate PROMPT` runs a one-slot engine at max_len 2048. Decode attention visits the cache
blocks up to the furthest position reached, so with one block of 2,048 positions every step reads
the whole row, while blocks of 64 (the automatic `cache_block` since this benchmark) read only the
blocks a short chat has reached. Each trial is a fresh process building
`jinfer.LLM("smollm2-135m-instruct", max_batch=1, cache_block=B)` (everything else the one-slot
defaults) and timing, after one untimed call of each:
  decode   one chat prompt, 128 greedy tokens (EOS ignored): tokens/s;
  long     one 958-token chat prompt (tests/fixtures/smollm2_golden.json "long_results"),
           1 token, prefix cache off: seconds (mostly prefill, in 64-token chunks).
Block sizes alternate between trials; medians over --repeats trials of --calls calls each.

    python scripts/bench_cache_block.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "smollm2_golden.json"
CHAT = [{"role": "user", "content": "Write a short story about a robot."}]
NEW_TOKENS = 128


def trial(block: int | None, calls: int) -> dict:
    import jinfer
    from jinfer.sampling import SamplingParams

    long = json.loads(GOLDEN.read_text())["long_results"][0]["messages"]
    llm = jinfer.LLM(MODEL, max_batch=1, cache_block=block, prefix_cache=False)
    cfg = llm.engine.config
    decode = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate(CHAT, decode)
    llm.generate(long, one)
    decode_s, long_s = [], []
    for _ in range(calls):
        t = time.perf_counter()
        out = llm.generate(CHAT, decode)[0]
        decode_s.append(time.perf_counter() - t)
        assert len(out.token_ids) == NEW_TOKENS
        t = time.perf_counter()
        llm.generate(long, one)
        long_s.append(time.perf_counter() - t)
    llm.close()
    return {
        "block": cfg.block,
        "max_len": cfg.max_len,
        "decode_tokens_per_s": NEW_TOKENS / statistics.median(decode_s),
        "long_prompt_s": statistics.median(long_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--blocks", default="64,2048", help="cache_block values (2048: one block)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--trial", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial is not None:
        print("RESULT", json.dumps(trial(int(args.trial), args.calls)))
        return
    blocks = [int(b) for b in args.blocks.split(",")]
    runs: dict[int, list[dict]] = {b: [] for b in blocks}
    for r in range(args.repeats):
        for b in blocks:
            argv = [sys.executable, __file__, "--trial", str(b), "--calls", str(args.calls)]
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            runs[b].append(json.loads(out.split("RESULT", 1)[1]))
            print(f"repeat {r + 1}, block {b}: {runs[b][-1]}", flush=True)
    summary = {
        b: {
            "decode_tokens_per_s": statistics.median(x["decode_tokens_per_s"] for x in rs),
            "long_prompt_s": statistics.median(x["long_prompt_s"] for x in rs),
        }
        for b, rs in runs.items()
    }
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("| cache_block | decode tok/s (128 tokens) | 958-token prompt, s |\n|---|---|---|")
    for b, s in summary.items():
        print(f"| {b} | {s['decode_tokens_per_s']:.1f} | {s['long_prompt_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
