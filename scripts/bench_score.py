"""`LLM.score` throughput on many short pairs, the shape of a log-likelihood evaluation.

An evaluation (multiple-choice, cloze) scores thousands of (context, continuation) pairs of tens of
tokens. `LLM.score` checks every pair, sorts them by length and scores up to `score_rows` pairs
of one bucket per call (4 on an engine of 8+ slots, at most 256 tokens per call; a lone pair is
padded to the same rows); before, it ran one 1-row call per pair. In one process building
`jinfer.LLM("smollm2-135m-instruct")` with the defaults, this times
  grouped   `llm.score(prompts, continuations)` as is;
  one       the same pairs with `score_rows` forced to 1 (one call per pair, the old behaviour),
alternating, after one untimed pass of each (compiles). Pairs: 4 candidate endings of 1-5 words
for each of --items contexts of 6-50 words (a fixed seed), as in a multiple-choice item.
Reports pairs/s (medians over --repeats passes), the largest log-probability difference between
the two (their shapes differ, and bfloat16 matrices round differently), and how many pairs get
bitwise the log-probabilities of the same pair scored alone with the defaults (all should).

    python scripts/bench_score.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

MODEL = "smollm2-135m-instruct"
WORDS = [
    "the",
    "a",
    "model",
    "river",
    "city",
    "small",
    "large",
    "quickly",
    "reads",
    "writes",
    "under",
    "over",
    "between",
    "light",
    "dark",
    "cat",
    "dog",
    "paper",
    "stone",
    "music",
    "table",
    "window",
    "garden",
    "north",
    "south",
    "answer",
    "question",
    "because",
]


def pairs(n_items: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    prompts, conts = [], []
    for _ in range(n_items):
        context = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 50)))
        for _ in range(4):
            prompts.append(context)
            conts.append(" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))))
    return prompts, conts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=50, help="multiple-choice items (4 pairs each)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import jax
    import numpy as np

    import jinfer

    llm = jinfer.LLM(MODEL)
    prompts, conts = pairs(args.items)
    grouped_rows = llm.engine.score_rows

    def run(one: bool) -> tuple[float, list]:
        llm.engine.score_rows = (lambda bucket: 1) if one else grouped_rows
        t = time.perf_counter()
        out = llm.score(prompts, conts)
        return time.perf_counter() - t, out

    run(False), run(True)  # compile both
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for one in (False, True):
            seconds, out = run(one)
            times[one].append(seconds)
            if one:
                ref = out
            else:
                got = out
    diff = max(
        float(np.max(np.abs(np.subtract(a.logprobs, b.logprobs)))) for a, b in zip(got, ref, strict=True)
    )
    llm.engine.score_rows = grouped_rows  # each pair alone, padded to the same rows
    alone = [llm.score([p], [c])[0] for p, c in zip(prompts, conts, strict=True)]
    same = sum(a.logprobs == b.logprobs for a, b in zip(got, alone, strict=True))
    lengths = [len(llm.tokenizer.encode(p)) + len(c.split()) for p, c in zip(prompts, conts, strict=True)]
    result = {
        "pairs": len(prompts),
        "tokens_per_pair_median": statistics.median(lengths),
        "compute_dtype": str(llm.engine.dtype),
        "weight_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(llm.engine.params)}),
        "score_rows_at_64": grouped_rows(64),
        "grouped_pairs_per_s": len(prompts) / statistics.median(times[False]),
        "one_per_call_pairs_per_s": len(prompts) / statistics.median(times[True]),
        "max_abs_logprob_diff_vs_one_per_call": diff,
        "pairs_bitwise_equal_to_scored_alone": same,
        "seconds": {"grouped": times[False], "one_per_call": times[True]},
    }
    result["speedup"] = result["grouped_pairs_per_s"] / result["one_per_call_pairs_per_s"]
    llm.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
