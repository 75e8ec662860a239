"""jinfer run-batch on a real local Ray instance (2 CPU replicas of a tiny model): the rows equal a
single-process run byte for byte, a SIGKILLed replica's chunks are re-run elsewhere, and a SIGKILLed
driver resumes from the output like the local run. One Ray instance is shared by the module."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from jinfer.batch import run_batch
from jinfer.batch.files import DuplicateIdError
from jinfer.batch.ray import (
    REPLICA_NAME_PREFIX,
    RayOptions,
    ReplicaLostError,
    RowMapper,
    _nodes_that_fit,
    actor_options,
)
from jinfer.errors import ConfigError
from jinfer.llm import LLM
from jinfer.sampling import SamplingParams
from jinfer.testing import make_tiny_llm_dir

REPO = Path(__file__).resolve().parents[1]
ENGINE = dict(max_len=128, buckets=(16, 32, 64), max_batch=4, decode_steps=1)
SAMPLED = SamplingParams(max_tokens=6, temperature=1.0)
ENGINE_FLAGS = ["--max-len", "128", "--buckets", "16,32,64", "--max-batch", "4", "--decode-steps", "1"]
SAMPLING_FLAGS = ["--max-tokens", "6", "--temperature", "1.0", "--seed", "7"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny model, a 30-line input (seeded sampling, greedy lines, own seeds, a chat line, 5 bad lines), the
    reference output of a single-process run, and a local Ray instance with 2 CPUs."""
    root = tmp_path_factory.mktemp("batchray")
    model = make_tiny_llm_dir(root / "tiny")
    rows = []
    for i in range(24):
        row = {"custom_id": f"q{i:02d}", "prompt": "The quick brown fox " * (1 + i % 6), "idx": i}
        if i % 5 == 0:
            row["temperature"] = 0.0
        if i % 7 == 0:
            row["seed"] = 1000 + i
        rows.append(json.dumps(row))
    rows += [
        json.dumps({"custom_id": "empty", "prompt": ""}),
        "{not json",
        json.dumps({"custom_id": "long", "prompt": "word " * 100}),
        json.dumps({"custom_id": "badtemp", "prompt": "hi", "temperature": -1}),
        json.dumps({"prompt": "no id"}),
        json.dumps({"custom_id": "chat", "messages": [{"role": "user", "content": "Hi"}], "n": 2}),
    ]
    inp = root / "in.jsonl"
    inp.write_text("".join(r + "\n" for r in rows))
    ref = root / "ref.jsonl"
    llm = LLM(model, **ENGINE)
    summary = run_batch(llm, inp, ref, SAMPLED, seed=7, progress=False)
    assert summary.ok == 25 and summary.failed == 5
    cache = root / "xla-cache"
    os.environ["JINFER_COMPILATION_CACHE"] = str(cache)  # inherited by the Ray workers only
    try:
        context = ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=100 * 1024 * 1024,
            log_to_driver=False,
        )
    finally:
        del os.environ["JINFER_COMPILATION_CACHE"]
    yield {
        "root": root,
        "model": model,
        "llm": llm,
        "input": inp,
        "ref": ref,
        "cache": cache,
        "address": context.address_info["address"],
    }
    ray.shutdown()


def line_set(path):
    return sorted(Path(path).read_bytes().splitlines(keepends=True))


def complete_lines(path):
    if not Path(path).exists():
        return []
    data = Path(path).read_bytes()
    return data[: data.rfind(b"\n") + 1].splitlines(keepends=True)


def assert_each_id_once(path):
    ids = []
    for line in complete_lines(path):
        row = json.loads(line)
        ids.append(row["custom_id"] if row["custom_id"] is not None else ("line", row["error"]["line"]))
    assert len(ids) == len(set(ids)), f"duplicate rows in {path}"
    return ids


def assert_timeline(timeline):
    """The driver's start-up timestamps (seconds since run_batch was called) come in order."""
    order = ["ray_ready", "replicas_created", "replicas_ready", "first_row", "last_row"]
    assert [timeline[k] for k in order] == sorted(timeline[k] for k in order), timeline
    assert timeline["ray_ready"] >= 0
    # The slowest replica's model load happened between its creation and the driver seeing it ready.
    assert 0 < timeline["replica_load_max"] <= timeline["replicas_ready"] - timeline["replicas_created"]


def run_on_ray(setup, out, **ray_options):
    return run_batch(
        str(setup["model"]),
        setup["input"],
        out,
        SAMPLED,
        seed=7,
        progress=False,
        flush_every=1,
        llm_options=ENGINE,
        ray=RayOptions(**ray_options),
    )


def test_two_replicas_write_the_single_process_lines(setup, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run_on_ray(setup, out, replicas=2, chunk_lines=4)
    assert line_set(out) == line_set(setup["ref"])  # greedy, seeded sampling and error rows
    assert len(assert_each_id_once(out)) == 30
    assert summary.ok == 25 and summary.failed == 5 and summary.complete and summary.replicas == 2
    assert all(n > 0 for n in summary.chunks_per_replica), summary.chunks_per_replica
    assert sum(summary.chunks_per_replica) == 8 and summary.replicas_lost == 0
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest == json.loads(Path(f"{setup['ref']}.manifest.json").read_text())
    saved = json.loads(Path(f"{out}.summary.json").read_text())
    assert saved["replicas"] == 2 and saved["complete"] and saved["ok"] == 25
    assert_timeline(saved["timeline"])
    # The output is a local run's output: the local runner resumes it and finds nothing to do.
    again = run_batch(setup["llm"], setup["input"], out, SAMPLED, seed=7, progress=False)
    assert again.skipped == 30 and again.ok == again.failed == 0


def test_max_errors_stops_the_ray_run_cleanly(setup, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run_batch(
        str(setup["model"]),
        setup["input"],
        out,
        SAMPLED,
        seed=7,
        progress=False,
        max_errors=1,
        llm_options=ENGINE,
        ray=RayOptions(replicas=1, chunk_lines=30),
    )
    assert summary.stopped and "max-errors=1" in summary.stopped and not summary.complete
    assert summary.failed == 2
    rows = [json.loads(line) for line in complete_lines(out)]
    assert sum(r["error"] is not None for r in rows) == 2
    assert set(line_set(out)) <= set(line_set(setup["ref"]))


def find_replica_pid(slot):
    prefix = f"{REPLICA_NAME_PREFIX}{os.getpid()}-{slot}."
    names = [n["name"] if isinstance(n, dict) else n for n in ray.util.list_named_actors()]
    (name,) = [n for n in names if n.startswith(prefix)]
    return ray.get(ray.get_actor(name).pid.remote())


def test_sigkilled_replica_its_chunks_run_elsewhere_exactly_once(setup, tmp_path):
    out = tmp_path / "out.jsonl"
    result = {}

    def drive():
        try:
            result["summary"] = run_on_ray(setup, out, replicas=2, chunk_lines=2)
        except BaseException as e:  # re-raised in the test thread
            result["error"] = e

    thread = threading.Thread(target=drive)
    thread.start()
    deadline = time.monotonic() + 240
    while len(complete_lines(out)) < 6 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert thread.is_alive(), f"the run ended before the kill: {result}"
    written_before_kill = len(complete_lines(out))
    os.kill(find_replica_pid(0), signal.SIGKILL)
    thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert written_before_kill < 30
    assert summary.replicas_lost == 1 and summary.chunks_retried >= 1, summary.format()
    assert summary.complete and summary.ok == 25 and summary.failed == 5
    assert len(assert_each_id_once(out)) == 30
    assert line_set(out) == line_set(setup["ref"])


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
        "1",
        "--no-progress",
        "--ray",
        setup["address"],
        "--replicas",
        "2",
        "--chunk-lines",
        "2",
        *extra,
    ]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def test_sigkilled_driver_rerun_resumes_without_recomputing(setup, tmp_path):
    out, log = tmp_path / "out.jsonl", tmp_path / "driver.log"
    with open(log, "wb") as err:
        p = subprocess.Popen(cli(setup, out), cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 240
    while p.poll() is None and len(complete_lines(out)) < 8 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert p.poll() is None, f"the driver ended before the kill: {log.read_text()[-3000:]}"
    p.kill()
    p.wait()
    kept = b"".join(complete_lines(out))
    assert 8 <= len(kept.splitlines()) < 30
    assert_each_id_once(out)
    final = subprocess.run(cli(setup, out), cwd=REPO, env=env(), capture_output=True, timeout=300)
    assert final.returncode == 0, final.stderr.decode()[-3000:]
    assert "run-batch complete" in final.stderr.decode()
    assert out.read_bytes().startswith(kept)  # written rows stay as they were, appended after
    assert len(assert_each_id_once(out)) == 30
    assert line_set(out) == line_set(setup["ref"])
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    skipped = len(kept.splitlines())
    assert summary["complete"] and summary["skipped"] == skipped
    assert summary["ok"] + summary["failed"] == 30 - skipped  # nothing written was computed again


def test_ray_alone_starts_and_stops_its_own_instance(setup, tmp_path):
    """`--ray` without an address: the command starts a local Ray instance for the run (not the
    module's one), writes the single-process lines and its summary, and stops the instance."""
    out = tmp_path / "out.jsonl"
    command = cli(setup, out)
    command[command.index("--ray") + 1 : command.index("--ray") + 4] = ["--replicas", "1"]
    p = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    assert line_set(out) == line_set(setup["ref"])
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["complete"] and summary["replicas"] == 1 and summary["chunks_per_replica"] == [15]
    assert_timeline(summary["timeline"])
    assert "Started a local Ray instance" not in p.stderr.decode()  # start-up logs at WARNING


def test_ray_data_row_mapper_gives_run_batch_rows(setup):
    mapper = RowMapper(setup["llm"], SAMPLED, seed=7)  # a path works too; the loaded LLM saves time
    lines = setup["input"].read_text().splitlines()
    wanted = [json.loads(x) for x in lines[:4] if x.startswith("{")]
    batch = {
        "custom_id": [r["custom_id"] for r in wanted],
        "prompt": [r["prompt"] for r in wanted],
        "temperature": [r.get("temperature", np.nan) for r in wanted],  # Ray Data's nulls
        "seed": [r.get("seed") for r in wanted],
        "idx": [r["idx"] for r in wanted],
    }
    out = mapper({k: np.array(v, dtype=object) for k, v in batch.items()})
    ref = {json.loads(x)["custom_id"]: x for x in setup["ref"].read_text().splitlines()}
    assert sorted(out["custom_id"]) == sorted(r["custom_id"] for r in wanted)
    for cid, row in zip(out["custom_id"], out["row"], strict=True):
        assert row == ref[cid]


def test_bad_ray_options_get_specific_errors(setup):
    with pytest.raises(ConfigError, match="--resources-per-replica 'gpu' is not JSON"):
        RayOptions.parse_resources("gpu")
    with pytest.raises(ConfigError, match=r"resources_per_replica\['num_gpus'\]=-1"):
        RayOptions(resources_per_replica={"num_gpus": -1})
    with pytest.raises(ConfigError, match="replicas=0"):
        RayOptions(replicas=0)
    assert actor_options({"num_gpus": 1, "TPU": 4}) == {"num_gpus": 1, "resources": {"TPU": 4}}
    assert actor_options({}) == {"num_cpus": 1}
    assert _nodes_that_fit(ray, actor_options({})) == 1  # the default replica count: one per node
    with pytest.raises(ConfigError, match="no node of the Ray cluster has the resources"):
        _nodes_that_fit(ray, actor_options({"num_gpus": 1}))
    with pytest.raises(ConfigError, match="not a loaded model"):
        run_batch(object(), "in.jsonl", "out.jsonl", ray=RayOptions())
    with pytest.raises(ConfigError, match=r"directory .*no-such-dir does not exist; create it first"):
        run_batch(setup["model"], setup["input"], setup["root"] / "no-such-dir" / "o.jsonl", ray=RayOptions())
    # The input scan runs while the replicas load: its error still ends the run before any row.
    dup = setup["root"] / "dup.jsonl"
    dup.write_text(setup["input"].read_text().splitlines()[0] + "\n" + setup["input"].read_text())
    with pytest.raises(DuplicateIdError, match='"q00" on lines 1, 2'):
        run_batch(setup["model"], dup, setup["root"] / "dup-out.jsonl", ray=RayOptions(replicas=1))
    assert not (setup["root"] / "dup-out.jsonl").exists()
    missing = setup["root"] / "no-such-model"
    with pytest.raises(ReplicaLostError, match=r"a replica could not load the model .*no-such-model"):
        run_batch(missing, setup["input"], setup["root"] / "never.jsonl", ray=RayOptions(replicas=1))
    assert not (setup["root"] / "never.jsonl").exists()
