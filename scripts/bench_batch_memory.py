"""Peak memory of `jinfer run-batch` machinery on a large input (default 100,000 lines).

Each measurement runs in a fresh child process and reports its peak RSS (ru_maxrss) next to the
RSS the same child had right after its imports (the peak mark is reset there through
/proc/self/clear_refs), so the difference is what the batch machinery itself holds:

  prepass   duplicate check + line count over the whole input (scan_input)
  resume    prepass + reading back an output with half the rows done (scan_output)
  run       a full run_batch over the input with all but --run-lines rows already done (tiny
            random model, loaded and compiled before the start mark, max_tokens=1)

Usage: python scripts/bench_batch_memory.py [--lines 100000] [--run-lines 500]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM), so import spikes do not hide what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def write_files(root: Path, lines: int, run_lines: int) -> None:
    """in.jsonl (lines rows) and two outputs: half done, and all but `run_lines` done."""
    with open(root / "in.jsonl", "w") as f:
        for i in range(lines):
            f.write(
                json.dumps({"custom_id": f"request-{i:08d}", "prompt": f"hello {i % 97}", "max_tokens": 1})
            )
            f.write("\n")
    for name, done in (("half.jsonl", range(0, lines, 2)), ("most.jsonl", range(run_lines, lines))):
        with open(root / name, "w") as f:
            for i in done:
                f.write(
                    f'{{"custom_id":"request-{i:08d}","text":"x","finish_reason":"length","error":null}}\n'
                )


def child(mode: str, root: Path) -> None:
    from jinfer.batch.files import scan_input, scan_output

    if mode == "run":  # the model is loaded and compiled before the baseline is taken
        from jinfer.llm import LLM

        llm = LLM(root / "tiny", max_len=64, buckets=(16,), max_batch=4)
        llm.warmup()
    start = _status_mb("VmRSS")
    _reset_peak()
    if mode == "prepass":
        scan_input(root / "in.jsonl")
    elif mode == "resume":
        scan_input(root / "in.jsonl")
        scan_output(root / "half.jsonl", repair=False)
    elif mode == "run":
        from jinfer.batch import run_batch
        from jinfer.sampling import SamplingParams

        # The output needs a manifest to be resumed: start it from an empty run, then append.
        out = root / "run.jsonl"
        if not out.exists():
            empty = root / "empty.jsonl"
            empty.write_text("")
            run_batch(llm, empty, out, SamplingParams(max_tokens=1, temperature=0.0), progress=False)
            with open(out, "ab") as f, open(root / "most.jsonl", "rb") as src:
                shutil.copyfileobj(src, f)
        s = run_batch(
            llm, root / "in.jsonl", out, SamplingParams(max_tokens=1, temperature=0.0), progress=False
        )
        print(json.dumps({"ok": s.ok, "skipped": s.skipped}), file=sys.stderr)
    peak = _status_mb("VmHWM")
    print(json.dumps({"mode": mode, "start_rss_mb": round(start, 1), "peak_rss_mb": round(peak, 1)}))


def measure(mode: str, root: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--root", str(root)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--run-lines", type=int, default=500)
    p.add_argument("--child", default=None)
    p.add_argument("--root", default=None)
    args = p.parse_args()
    if args.child:
        child(args.child, Path(args.root))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_files(root, args.lines, args.run_lines)
        from jinfer.testing import make_tiny_llm_dir

        make_tiny_llm_dir(root / "tiny")
        size = (root / "in.jsonl").stat().st_size / 1e6
        print(f"input: {args.lines:,} lines, {size:.1f} MB")
        for mode in ("prepass", "resume", "run"):
            m = measure(mode, root)
            growth = m["peak_rss_mb"] - m["start_rss_mb"]
            print(
                f"{mode:8s} RSS at start {m['start_rss_mb']:6.1f} MB, peak {m['peak_rss_mb']:6.1f} MB "
                f"(+{growth:.1f} MB, {growth * 1e6 / args.lines:.1f} bytes/line)"
            )


if __name__ == "__main__":
    main()
