"""Automatic prefix caching benchmark: chat requests that share a long system prompt.

SmolLM2-135M-Instruct (f32) on CPU: N chat requests (default 64) share a ~600-token system prompt
and ask short questions; greedy, max_tokens=16. The same workload runs on two engines of one
configuration, prefix cache on and off (the off run is the baseline, measured in the same run).
Prints wall time, prompt tokens computed vs taken from the cache, the speedup, and checks that
both engines return identical tokens and logprobs.

    python scripts/bench_prefix.py                # 64 requests
    python scripts/bench_prefix.py --requests 16  # smaller
"""

from __future__ import annotations

import argparse
import json
import time

from jinfer.llm import LLM
from jinfer.sampling import SamplingParams

TOPICS = [
    "the water cycle", "photosynthesis", "volcanoes", "the moon's phases", "plate tectonics",
    "ocean tides", "rainbows", "lightning", "glaciers", "the seasons", "earthquakes", "clouds",
    "wind", "deserts", "rivers", "coral reefs",
]  # fmt: skip
RULES = [
    "Answer in plain language that a curious twelve-year-old can follow, and avoid jargon unless you "
    "explain it right away.",
    "Keep every answer short: two or three sentences are usually enough, and never more than five.",
    "If a question is ambiguous, say which reading you chose before you answer it.",
    "Never invent facts, numbers, dates or names; when you are not sure, say so plainly and suggest "
    "where the student could check.",
    "Prefer concrete everyday examples (a kettle, a bicycle, a garden hose) over abstract definitions.",
    "Use metric units first and give imperial units in brackets when they help.",
    "Do not use lists or headings; write in full sentences.",
    "Stay polite and encouraging, and praise good questions without being patronising.",
]


def system_prompt() -> str:
    intro = (
        "You are Terra, a patient science tutor for a school's online help desk. Students from many "
        "classes write to you with questions about the Earth, its weather, its oceans and its rocks. "
    )
    body = " ".join(f"Rule {i + 1}: {rule}" for i, rule in enumerate(RULES))
    topics = "Topics you know well include " + ", ".join(TOPICS) + "."
    return " ".join([intro, body, topics, intro, body, topics, topics])


def workload(n: int) -> list[list[dict]]:
    system = system_prompt()
    asks = ["What is", "Why do we have", "How does", "Can you explain", "What causes"]
    return [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": f"{asks[i % len(asks)]} {TOPICS[i % len(TOPICS)]}? ({i})"},
        ]
        for i in range(n)
    ]


def run(llm: LLM, chats: list, params: SamplingParams) -> tuple[float, list]:
    t0 = time.perf_counter()
    outs = llm.generate(chats, params)
    return time.perf_counter() - t0, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write results here")
    args = ap.parse_args()
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=1)
    chats = workload(args.requests)
    result: dict = {"requests": args.requests}
    outputs = {}
    for name, cache in (("off", False), ("on", True)):
        llm = LLM(
            args.model,
            dtype="float32",
            max_batch=args.max_batch,
            max_len=1024,
            buckets=(16, 32, 64),
            prefill_chunk=64,
            prefix_cache=cache,
        )
        result["prompt_tokens_each"] = len(llm.tokenizer.encode_chat(chats[0]))
        llm.warmup()
        seconds, outputs[name] = run(llm, chats, params)
        s = llm.stats.summary()
        result[f"cache_{name}"] = {
            "seconds": round(seconds, 2),
            "prompt_tokens_computed": s["prompt_tokens_computed"],
            "prompt_tokens_cached": s["prompt_tokens_cached"],
            "prefix_cache_hit_rate": s["prefix_cache_hit_rate"],
            "cache_blocks_used": s["cache_blocks_used"],
        }
        llm.close()
    on, off = result["cache_on"], result["cache_off"]
    result["speedup"] = round(off["seconds"] / on["seconds"], 2)
    result["computed_fraction"] = round(on["prompt_tokens_computed"] / off["prompt_tokens_computed"], 4)
    result["identical_tokens_and_logprobs"] = all(
        a.token_ids == b.token_ids and a.logprobs == b.logprobs
        for a, b in zip(outputs["on"], outputs["off"], strict=True)
    )
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
