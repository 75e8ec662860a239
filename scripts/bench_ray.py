"""Ray overhead and scaling of `jinfer run-batch`: the local command vs `--ray` at 1 and 2 replicas.

    python scripts/bench_ray.py --model smollm2-135m-instruct --prompts 256 --repeats 2  # minutes a run
    python scripts/bench_ray.py               # small random Llama, 192 prompts x 64 tokens, medians of 3

Every variant is the real command in a fresh process, timed end to end (import, model load,
compile-cache loads, the run, the summary), in interleaved order so that load changes hit all
variants alike:

  local     `jinfer run-batch ...`
  ray-own   `... --ray --replicas 1`: the command starts (and stops) its own local Ray instance
  ray-1     `... --ray ADDRESS --replicas 1`: joins a Ray instance started once by this script
  ray-2     `... --ray ADDRESS --replicas 2`

One persistent XLA cache (warmed by a first local run) serves every process. "run s" is the
summary's seconds (first chunk handed out -> last row written). Every output is checked to hold
the local run's lines, byte for byte. For the Ray variants the summary's timeline (seconds since
run_batch was called: Ray up, replicas requested, replicas loaded, first row, last row) shows
where the fixed cost goes; "startup" of the local run is its wall minus its run seconds.
The last line is the target check: `ray-own` (what `--ray` users run) vs local wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32)
ENGINE_FLAGS = ["--max-len", "512", "--buckets", "32,64,128,256", "--max-batch", "8", "--decode-steps", "8"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir/name (default: a small random Llama)")
    p.add_argument("--prompts", type=int, default=192)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-lines", type=int, default=32)
    p.add_argument(
        "--variants",
        default="local,ray-own,ray-1,ray-2",
        help="any of local, ray-own, ray-own-2 (--ray, own instance), ray-1, ray-2 (--ray ADDRESS)",
    )
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--compilation-cache",
        default=None,
        help="an XLA cache already warm for this model and these engine flags: no warm-up run "
        "(default: a fresh cache, warmed by one local run first)",
    )
    return p.parse_args()


def write_input(path: Path, n: int) -> Path:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "JAX", "compiles"]
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(words[(i + k) % len(words)] for k in range(4 + 4 * (i % 8)))
            f.write(json.dumps({"custom_id": f"p{i:05d}", "prompt": prompt}) + "\n")
    return path


def command(args, model: str, inp: Path, out: Path, cache: Path, ray: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jinfer.cli",
        "--compilation-cache",
        str(cache),
        "run-batch",
        "--model",
        model,
        "--input",
        str(inp),
        "--output",
        str(out),
        *ENGINE_FLAGS,
        "--max-tokens",
        str(args.max_tokens),
        "--temperature",
        "0",
        "--window",
        str(args.prompts),
        "--no-progress",
        *ray,
    ]


def timed(cmd: list[str], out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=1200)
    wall = time.monotonic() - t
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["complete"], summary
    timeline = summary.get("timeline", {})
    return {
        "wall": wall,
        "run": summary["seconds"],
        **{k: v for k, v in timeline.items() if isinstance(v, (int, float))},
        "lines": sorted(out.read_bytes().splitlines()),
    }


TIMES = (
    "wall",
    "run",
    "ray_ready",
    "replicas_created",
    "replicas_ready",
    "replica_load_max",
    "first_row",
    "last_row",
)


def medians(runs: list[dict]) -> dict[str, float]:
    """Median of every timing the runs have (the Ray variants have a timeline, the local one not)."""
    return {m: statistics.median(r[m] for r in runs) for m in TIMES if all(m in r for r in runs)}


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    cache = Path(args.compilation_cache) if args.compilation_cache else work / "xla"
    if args.model:
        model = args.model
    else:
        from jinfer.testing import make_tiny_llm_dir

        model = str(make_tiny_llm_dir(work / "model", **SMALL))
    inp = write_input(work / "in.jsonl", args.prompts)

    import ray

    variants = args.variants.split(",")
    address, ray_start = "", None
    if {"ray-1", "ray-2"} & set(variants):  # an idle instance costs the other variants CPU: only if needed
        t0 = time.monotonic()
        context = ray.init(
            address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 << 20
        )
        ray_start = round(time.monotonic() - t0, 2)
        address = context.address_info["address"]
    chunk = ["--chunk-lines", str(args.chunk_lines)]
    ray_flags = {
        "local": [],
        "ray-own": ["--ray", "--replicas", "1", *chunk],
        "ray-own-2": ["--ray", "--replicas", "2", *chunk],
        "ray-1": ["--ray", address, "--replicas", "1", *chunk],
        "ray-2": ["--ray", address, "--replicas", "2", *chunk],
    }
    reference = work / "warmup.jsonl" if not args.compilation_cache else work / f"{variants[0]}-0.jsonl"
    if not args.compilation_cache:
        timed(command(args, model, inp, reference, cache, []), reference)
    results: dict[str, list[dict]] = {k: [] for k in variants}
    for i in range(args.repeats):
        for name in variants:
            out = work / f"{name}-{i}.jsonl"
            results[name].append(timed(command(args, model, inp, out, cache, ray_flags[name]), out))
            print(f"{name} #{i}: {results[name][-1]['wall']:.1f}s", file=sys.stderr, flush=True)
    if address:
        ray.shutdown()
    ref = sorted(reference.read_bytes().splitlines())
    assert all(r["lines"] == ref for rs in results.values() for r in rs), "a run wrote other lines"
    med = {k: medians(rs) for k, rs in results.items()}
    report = {
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "chunk_lines": args.chunk_lines,
        "model": model if args.model else f"random Llama {SMALL}",
        "ray_start_seconds_in_this_script": ray_start,
        "medians": {k: {m: round(v, 2) for m, v in d.items()} for k, d in med.items()},
        "load_average_end": os.getloadavg(),
    }
    base = med.get("local")
    for k in ("ray-own", "ray-own-2", "ray-1", "ray-2"):
        if base and k in med:
            report[f"{k}_vs_local_wall"] = round(med[k]["wall"] / base["wall"], 3)
            report[f"{k}_vs_local_run"] = round(med[k]["run"] / base["run"], 3)
    if "ray-1" in med and "ray-2" in med:
        report["ray2_speedup_wall"] = round(med["ray-1"]["wall"] / med["ray-2"]["wall"], 3)
        report["ray2_speedup_run"] = round(med["ray-1"]["run"] / med["ray-2"]["run"], 3)
    if "ray-own" in med and "ray-own-2" in med:
        report["ray_own2_speedup_wall"] = round(med["ray-own"]["wall"] / med["ray-own-2"]["wall"], 3)
    print(
        f"| variant | wall s (median of {args.repeats}) | run s | Ray up | replicas ready | 1st row | last |"
    )
    print("|---|---|---|---|---|---|---|")
    for k, d in med.items():
        cells = [
            f"{d[m]:.2f}" if m in d else "-" for m in ("ray_ready", "replicas_ready", "first_row", "last_row")
        ]
        print(f"| {k} | {d['wall']:.2f} | {d['run']:.2f} | {' | '.join(cells)} |")
    print(json.dumps(report, indent=2))
    for k in ("ray-own", "ray-1"):
        if f"{k}_vs_local_wall" in report:
            ratio = report[f"{k}_vs_local_wall"]
            verdict = "met" if ratio <= 1.2 else "NOT met"
            print(
                f"{k} (1 replica) wall {med[k]['wall']:.2f} s / local wall {base['wall']:.2f} s = "
                f"{ratio:.3f}x (target <= 1.20x: {verdict})"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
