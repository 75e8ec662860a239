"""Ray overhead and scaling of `run-batch`: local run vs Ray at 1 replica vs Ray at 2 replicas.

    python scripts/bench_ray.py                      # small random Llama, 64 prompts, medians of 3
    python scripts/bench_ray.py --model smollm2-135m-instruct --prompts 32 --repeats 1

All runs in one process against one local Ray instance (its startup is timed on its own), with
one persistent XLA cache shared by the local run and the replicas, so every run pays the same
load + compile-cache cost. Wall time = the whole `run_batch` call (model load on the replicas,
chunk hand-out, writing the output); "run" = the Summary's seconds (first chunk sent -> last row
written). Every Ray output is checked to hold the local run's lines, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from jinfer.batch import run_batch
from jinfer.batch.ray import RayOptions
from jinfer.compile import enable_compilation_cache
from jinfer.sampling import SamplingParams
from jinfer.testing import make_tiny_llm_dir

SMALL = dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir/name (default: a small random Llama)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-lines", type=int, default=16)
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args()


def write_input(path: Path, n: int) -> Path:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "JAX", "compiles"]
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(words[(i + k) % len(words)] for k in range(4 + 4 * (i % 8)))
            f.write(json.dumps({"custom_id": f"p{i:05d}", "prompt": prompt}) + "\n")
    return path


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    enable_compilation_cache(work / "xla")
    model = args.model or str(make_tiny_llm_dir(work / "model", **SMALL))
    inp = write_input(work / "in.jsonl", args.prompts)
    engine = dict(max_len=512, buckets=(32, 64, 128, 256), max_batch=8, decode_steps=8)
    defaults = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)

    import ray

    t0 = time.monotonic()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 << 20)
    ray_start = time.monotonic() - t0

    def once(name: str, i: int, ray_options: RayOptions | None) -> dict:
        out = work / f"{name}-{i}.jsonl"
        t = time.monotonic()
        options = dict(progress=False, llm_options=engine, window=args.prompts, ray=ray_options)
        s = run_batch(model, inp, out, defaults, **options)
        wall = time.monotonic() - t
        assert s.complete and s.ok == args.prompts, s.format()
        return {"wall": wall, "run": s.seconds, "lines": sorted(out.read_bytes().splitlines())}

    variants = {
        "local": None,
        "ray-1": RayOptions(replicas=1, chunk_lines=args.chunk_lines),
        "ray-2": RayOptions(replicas=2, chunk_lines=args.chunk_lines),
    }
    once("warmup", 0, None)  # fills the XLA cache for everyone
    results: dict[str, list[dict]] = {k: [] for k in variants}
    for i in range(args.repeats):
        for name, opts in variants.items():  # interleaved: load changes hit every variant alike
            results[name].append(once(name, i, opts))
    ray.shutdown()
    ref = results["local"][0]["lines"]
    assert all(r["lines"] == ref for rs in results.values() for r in rs), "a Ray run wrote other lines"
    med = {k: {m: statistics.median(r[m] for r in rs) for m in ("wall", "run")} for k, rs in results.items()}
    report = {
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "model": model if args.model else f"random Llama {SMALL}",
        "ray_start_seconds": round(ray_start, 2),
        "medians": {k: {m: round(v, 2) for m, v in d.items()} for k, d in med.items()},
        "ray1_vs_local_wall": round(med["ray-1"]["wall"] / med["local"]["wall"], 3),
        "ray1_vs_local_run": round(med["ray-1"]["run"] / med["local"]["run"], 3),
        "ray2_speedup_wall": round(med["ray-1"]["wall"] / med["ray-2"]["wall"], 3),
        "ray2_speedup_run": round(med["ray-1"]["run"] / med["ray-2"]["run"], 3),
        "load_average": os.getloadavg(),
    }
    print(f"| variant | wall s (median of {args.repeats}) | run s |")
    print("|---|---|---|")
    for k, d in med.items():
        print(f"| {k} | {d['wall']:.2f} | {d['run']:.2f} |")
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
