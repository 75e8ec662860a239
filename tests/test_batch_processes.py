"""jinfer run-batch in real processes: SIGKILL at random points + resume, and two jax.distributed
processes whose merged output equals a one-process run (as a set of lines, byte for byte)."""

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jinfer.batch import run_batch
from jinfer.llm import LLM
from jinfer.sampling import SamplingParams
from jinfer.testing import make_tiny_llm_dir

REPO = Path(__file__).resolve().parents[1]
ENGINE_FLAGS = ["--max-len", "128", "--buckets", "16,32,64", "--max-batch", "4", "--decode-steps", "1"]
SAMPLING_FLAGS = ["--max-tokens", "6", "--temperature", "1.0", "--seed", "7"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Model dir, a 40-line input (sampled, some lines greedy or with their own seed), and the
    reference output of an uninterrupted in-process run with the same settings as the CLI flags."""
    root = tmp_path_factory.mktemp("batchproc")
    model = make_tiny_llm_dir(root / "tiny")
    rows = []
    for i in range(40):
        row = {"custom_id": f"q{i:02d}", "prompt": "The quick brown fox " * (1 + i % 6), "idx": i}
        if i % 5 == 0:
            row["temperature"] = 0.0
        if i % 7 == 0:
            row["seed"] = 1000 + i
        rows.append(row)
    rows.append({"custom_id": "bad", "prompt": ""})
    inp = root / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    llm = LLM(model, max_len=128, buckets=(16, 32, 64), max_batch=4, decode_steps=1)
    ref = root / "ref.jsonl"
    run_batch(llm, inp, ref, SamplingParams(max_tokens=6, temperature=1.0), seed=7, progress=False)
    return {"root": root, "model": model, "input": inp, "ref": ref, "cache": root / "xla-cache"}


def cli(setup, out, *extra):
    return [
        sys.executable,
        "-m",
        "jinfer.cli",
        "--compilation-cache",
        str(setup["cache"]),
        "run-batch",
        "--model",
        str(setup["model"]),
        "--input",
        str(setup["input"]),
        "--output",
        str(out),
        *ENGINE_FLAGS,
        *SAMPLING_FLAGS,
        "--flush-every",
        "2",
        "--no-progress",
        *extra,
    ]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def complete_lines(path):
    if not Path(path).exists():
        return []
    data = Path(path).read_bytes()
    return data[: data.rfind(b"\n") + 1].splitlines(keepends=True)


def line_set(path):
    return sorted(Path(path).read_bytes().splitlines(keepends=True))


def assert_each_id_once(path):
    ids = [json.loads(line)["custom_id"] for line in complete_lines(path)]
    assert len(ids) == len(set(ids)), f"duplicate rows in {path}"
    return ids


def run_and_kill(cmd, out, min_lines, log):
    """Starts the CLI and SIGKILLs it once `out` has >= min_lines rows (0: once the manifest exists,
    before any row). Returns True if it was killed, False if it finished first."""
    with open(log, "ab") as err:
        p = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 240
    manifest = Path(f"{out}.manifest.json")
    while p.poll() is None and time.monotonic() < deadline:
        ready = manifest.exists() if min_lines == 0 else len(complete_lines(out)) >= min_lines
        if ready:
            p.kill()
            p.wait()
            return True
        time.sleep(0.005)
    assert p.wait(timeout=5) == 0, Path(log).read_text()[-3000:]
    return False


def test_sigkill_at_random_points_then_resume_is_exactly_once(setup, tmp_path):
    out, log = tmp_path / "out.jsonl", tmp_path / "stderr.log"
    rng = random.Random(1234)
    kills = []
    for min_lines in (0, rng.randint(2, 10), rng.randint(12, 24), rng.randint(26, 36)):
        kills.append(
            (min_lines, run_and_kill(cli(setup, out), out, min_lines, log), len(complete_lines(out)))
        )
        assert_each_id_once(out)
    assert kills[0][1] and kills[0][2] == 0, f"first kill must land before any row: {kills}"
    assert sum(k[1] for k in kills) >= 3, f"most kills must land mid-run: {kills}"
    final = subprocess.run(cli(setup, out), cwd=REPO, env=env(), capture_output=True, timeout=240)
    assert final.returncode == 0, final.stderr.decode()[-3000:]
    ids = assert_each_id_once(out)
    assert len(ids) == 41
    assert line_set(out) == line_set(setup["ref"]), (
        f"resumed output differs from an uninterrupted run ({kills})"
    )
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert (
        summary["complete"]
        and summary["skipped"] == kills[-1][2]
        and summary["failed"] + summary["skipped"] <= 41
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_merge_to_the_one_process_output(setup, tmp_path):
    out, port = tmp_path / "out.jsonl", free_port()
    procs = []
    for pid in range(2):
        cmd = cli(
            setup, out, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)
        )
        log = open(tmp_path / f"p{pid}.log", "wb")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=log), log))
    for p, log in procs:
        rc = p.wait(timeout=300)
        log.close()
        assert rc == 0, Path(log.name).read_text()[-3000:]
    assert line_set(out) == line_set(setup["ref"])
    assert not list(tmp_path.glob("out.jsonl.shard-*")), "shards must be merged and removed"
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert (
        summary["processes"] == 2 and summary["lines"] == 41 and summary["ok"] == 40 and summary["complete"]
    )
    assert "run-batch complete" in Path(tmp_path / "p0.log").read_text()
    assert "run-batch complete" not in Path(tmp_path / "p1.log").read_text()  # only process 0 prints
