"""Generation benchmark on a ~30M-parameter Llama-style config (random weights, f32, CPU).

Measures, in one run: decode tokens/s at batch 1 and with every slot busy, time to first token,
compile time, and a baseline that recomputes the whole prefix every token (plain jax.jit, no
cache). The roofline is weight bytes per decode step over a copy bandwidth measured in the same
run (an XLA reduction over 512 MB), as an upper bound for batch-1 decode.

    python scripts/bench_generate.py            # full run (about 2-3 minutes on 2 cores)
    python scripts/bench_generate.py --quick    # smaller, for a smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.generate import GenerationConfig
from jinfer.llm import LLM
from jinfer.modeling import FlaxModel
from jinfer.models.llama import LlamaConfig
from jinfer.sampling import SamplingParams

CONFIG_30M = LlamaConfig(
    vocab_size=16000,
    hidden_size=512,
    intermediate_size=1408,
    num_layers=8,
    num_heads=8,
    num_kv_heads=4,
    head_dim=64,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
)


def copy_bandwidth(mbytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s that XLA reads when reducing a large f32 array (median of `repeats`)."""
    x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda a: a.sum())
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return x.nbytes / statistics.median(times)


def decode_rate(llm: LLM, batch: int, new_tokens: int, prompt_len: int, repeats: int) -> dict:
    """Median decode tokens/s (after all prefills) and time to first token, `batch` requests.

    Deltas are time-stamped on the engine loop's thread as they are delivered; decode speed counts
    the tokens delivered after the step that sampled the last first token, over the time since.
    """
    from jinfer.generate import Request

    prompts = [[(7 * i + j) % 1000 + 1 for j in range(prompt_len)] for i in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    rates, ttfts = [], []
    for _ in range(repeats):
        events: list[tuple[float, int, bool]] = []  # (time, tokens, first delta of its request)

        def stamp(delta, seen: list, events: list = events) -> None:
            events.append((time.perf_counter(), len(delta.token_ids), not seen))
            seen.append(1)

        t0 = time.perf_counter()
        handles = [
            llm._loop.submit(Request(p, params, 0, ()), listener=functools.partial(stamp, seen=[]))
            for p in prompts
        ]
        for h in handles:
            h.result()
        ttfts.append(min(t for t, _, first in events if first) - t0)
        t1 = max(t for t, _, first in events if first)
        decoded = sum(n for t, n, _ in events if t > t1)
        rates.append(decoded / (max(t for t, _, _ in events) - t1))
    return {"tokens_per_s": statistics.median(rates), "ttft_s": statistics.median(ttfts)}


def recompute_baseline(model: FlaxModel, params, prompt_len: int, new_tokens: int) -> float:
    """Tokens/s of a loop that recomputes the full prefix every token (one jit per length)."""
    fwd, logits = model.apply_fn(), model.apply_fn("logits")

    @jax.jit
    def next_token(p, ids):
        pos = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
        hidden, _ = fwd(p, ids, pos, None)
        return jnp.argmax(logits(p, hidden[:, -1]), -1)

    ids = jnp.arange(1, prompt_len + 1, dtype=jnp.int32)[None]
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        ids = jnp.concatenate([ids, next_token(params, ids)[:, None].astype(jnp.int32)], axis=1)
    ids.block_until_ready()
    return new_tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--json", default=None, help="also write results here")
    args = ap.parse_args()
    new_tokens, repeats, prompt_len = (32, 1, 32) if args.quick else (128, 3, 64)

    model = FlaxModel.from_name("Llama", CONFIG_30M)
    params = jax.device_put(model.init_params(0))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    bandwidth = copy_bandwidth()

    def engine(slots: int) -> LLM:
        # Decode computes every slot each step, so batch-1 latency is measured on a 1-slot engine.
        gen = GenerationConfig(
            max_batch=slots, max_len=512, prefill_buckets=(64, 128), decode_steps=args.decode_steps
        )
        return LLM.from_params(model, params, config=gen)

    llm = engine(1)
    t0 = time.perf_counter()
    llm.warmup()
    compile_s = time.perf_counter() - t0
    one = decode_rate(llm, 1, new_tokens, prompt_len, repeats)
    full_llm = engine(args.slots)
    full_llm.warmup()
    full = decode_rate(full_llm, args.slots, new_tokens, prompt_len, repeats)
    baseline = recompute_baseline(model, params, prompt_len, min(new_tokens, 32))
    roofline = bandwidth / weight_bytes
    result = {
        "params_millions": round(model.param_count() / 1e6, 2),
        "weight_mb": round(weight_bytes / 1e6, 1),
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "roofline_tokens_per_s_batch1": round(roofline, 1),
        "compile_s": round(compile_s, 2),
        "batch1_tokens_per_s": round(one["tokens_per_s"], 1),
        "batch1_fraction_of_roofline": round(one["tokens_per_s"] / roofline, 3),
        "ttft_ms": round(one["ttft_s"] * 1e3, 1),
        f"batch{args.slots}_tokens_per_s": round(full["tokens_per_s"], 1),
        "recompute_baseline_tokens_per_s": round(baseline, 1),
        "speedup_batch1_vs_recompute": round(one["tokens_per_s"] / baseline, 1),
        "compiles": llm.stats.compiles,
    }
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
