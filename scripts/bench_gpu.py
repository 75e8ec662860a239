"""GPU decode benchmark: a SmolLM2-135M-shaped model (random weights, bf16) at batch 1 and 64.

Prints decode tokens/s, time per step, and MBU / MFU against the GPU's copy bandwidth and bf16
matmul rate measured in the same run. Random weights: the machine that runs this may have no
network, and speed does not depend on the values. Correctness on the device is checked separately
by the parity tests (scripts/gpu_check.sh runs both).

    python scripts/bench_gpu.py [--batches 1,64] [--max-len 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from jinfer.generate import GenerationConfig, Request
from jinfer.llm import LLM
from jinfer.modeling import FlaxModel, cast_floating
from jinfer.models.llama import SMOLLM2_135M
from jinfer.sampling import SamplingParams


def timed(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(gbytes: float = 4.0) -> float:
    """Bytes/s of a device copy (read + write counted) of a large bf16 array."""
    x = jnp.ones((int(gbytes * 2**30) // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 1)
    return 2 * x.nbytes / timed(lambda: f(x))


def matmul_rate(n: int = 8192) -> float:
    """bf16 FLOP/s of an n x n x n matmul."""
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / timed(lambda: f(a))


def decode_step_time(llm: LLM, batch: int, new_tokens: int, prompt_len: int = 64) -> float:
    """Median seconds per decode step with `batch` live requests (after their prefills)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    rates = []
    for _ in range(3):
        prompts = [[(7 * i + j) % 1000 + 1 for j in range(prompt_len)] for i in range(batch)]
        handles = [llm._loop.submit(Request(p, params, 0, ())) for p in prompts]
        next(iter(handles[-1]))  # the last admission's first token
        t0, s0 = time.perf_counter(), llm.stats.steps  # (decode rounds run after this step)
        for h in handles:
            h.result()
        rounds = llm.stats.steps - s0
        rates.append((time.perf_counter() - t0) / max(rounds * llm.engine.config.decode_steps, 1))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--bw-gb", type=float, default=4.0, help="array size for the bandwidth probe")
    ap.add_argument("--matmul-n", type=int, default=8192, help="matrix size for the matmul-rate probe")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print("devices:", jax.devices())
    bw, flops = copy_bandwidth(args.bw_gb), matmul_rate(args.matmul_n)
    model = FlaxModel.from_name("Llama", SMOLLM2_135M)
    params = jax.jit(lambda: cast_floating(model.init_params(0), jnp.bfloat16))()
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    n_params = model.param_count()
    result = {"device": str(jax.devices()[0]), "copy_bandwidth_gb_s": bw / 1e9, "bf16_tflops": flops / 1e12}
    for batch in (int(b) for b in args.batches.split(",")):
        config = GenerationConfig(
            max_batch=batch, max_len=args.max_len, prefill_buckets=(64,), decode_steps=16
        )
        llm = LLM.from_params(model, params, config=config)
        t0 = time.perf_counter()
        llm.warmup()
        compile_s = time.perf_counter() - t0
        step = decode_step_time(llm, batch, args.new_tokens)
        kv_bytes = llm.engine.cache.nbytes()  # decode attention reads the whole cache
        result[f"batch{batch}"] = {
            "compile_s": compile_s,
            "step_ms": step * 1e3,
            "tokens_per_s": batch / step,
            "mbu": (weight_bytes + kv_bytes) / step / bw,
            "mfu": 2 * n_params * batch / step / flops,
        }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
