"""Does a request's output depend on its companions? Each chat prompt is generated alone (one
`generate()` call per prompt) and all together (one call), greedy, `ignore_eos`, on
`jinfer.LLM(name, **options)` for several engine settings; reports, per setting, how many prompts'
greedy tokens diverge (and where) and the largest logprob difference before a divergence.

    python scripts/bench_companions.py [--tokens 48] [--json out.json]

Settings: the defaults (on a CPU with bfloat16 matrix instructions: bfloat16 weight matrices under
float32 compute), `dtype="float32"`, and `batch_invariant=True` (which promises bitwise equality).
The same process also checks that repeating the together-call gives the same tokens (the
schedule is deterministic for one `generate()` call).
"""

from __future__ import annotations

import argparse
import json

import jinfer
from jinfer import SamplingParams

MODEL = "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Explain photosynthesis briefly.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "What is 17 times 3?",
    "Give me a synonym for happy.",
    "How do airplanes fly?",
    "Name a famous painter.",
    "What is the boiling point of water?",
    "Translate 'hello' to Spanish.",
    "Why is the sky blue?",
]
SETTINGS = {"defaults": {}, "float32": {"dtype": "float32"}, "batch_invariant": {"batch_invariant": True}}


def compare(together, alone) -> dict:
    """Divergent prompts (first differing token index) and the largest |logprob| difference over
    the tokens before each prompt's divergence."""
    diverged, worst, compared = {}, 0.0, 0
    for i, (t, a) in enumerate(zip(together, alone, strict=True)):
        tt, ta = t.outputs[0].token_ids, a.outputs[0].token_ids
        first = next((j for j, (x, y) in enumerate(zip(tt, ta, strict=False)) if x != y), None)
        if first is not None:
            diverged[i] = first
        upto = len(tt) if first is None else first
        lt, la = t.outputs[0].logprobs, a.outputs[0].logprobs
        for j in range(upto):
            worst = max(worst, abs(lt[j][tt[j]] - la[j][ta[j]]))
        compared += upto
    return {"diverged": diverged, "max_logprob_diff": worst, "tokens_compared": compared}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {list(SETTINGS)}")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, logprobs=1, ignore_eos=True)
    report = {}
    for name in args.settings.split(","):
        with jinfer.LLM(MODEL, **SETTINGS[name]) as llm:
            together = llm.generate(messages, params)
            again = llm.generate(messages, params)
            alone = [llm.generate([m], params)[0] for m in messages]
            result = compare(together, alone)
            result["dtype"] = llm.engine_choices.dtype.value
            result["repeat_identical"] = [o.outputs[0].token_ids for o in together] == [
                o.outputs[0].token_ids for o in again
            ]
        report[name] = result
        firsts = sorted(result["diverged"].values())
        print(
            f"{name:16s} ({result['dtype']}): {len(firsts)}/{len(QUESTIONS)} prompts' greedy tokens "
            f"differ alone vs together (first differing token: {firsts}); max |logprob diff| before "
            f"that {result['max_logprob_diff']:.2e} over {result['tokens_compared']} tokens; "
            f"repeated call identical: {result['repeat_identical']}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
