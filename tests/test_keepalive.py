"""`jinfer generate --keep-alive`: a background worker keeps the engine loaded between commands
(jinfer.keepalive). Real processes, a real model directory, real Unix sockets."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jinfer import cli, keepalive
from jinfer.errors import ConfigError
from jinfer.testing import make_tiny_llm_dir

CLI = [sys.executable, "-m", "jinfer.cli"]


@pytest.fixture
def env(tmp_path):
    """A private runtime directory (short: Unix socket paths are limited) and compilation cache,
    no worker unless a command asks (JINFER_KEEP_ALIVE=0: the default on a CPU-only machine is a
    worker, tested on its own below); every worker left at the end is stopped."""
    run_dir = tempfile.mkdtemp(prefix="jka")
    environ = {
        **os.environ,
        "JINFER_RUNTIME_DIR": run_dir,
        "JINFER_COMPILATION_CACHE": str(tmp_path / "xla"),
        "JAX_PLATFORMS": "cpu",
        "JINFER_KEEP_ALIVE": "0",
    }
    environ.pop("XLA_FLAGS", None)
    yield environ
    subprocess.run([*CLI, "stop"], env=environ, capture_output=True, timeout=120)
    for info in Path(run_dir).glob("*.json"):  # a worker `stop` could not reach
        with contextlib.suppress(ProcessLookupError, ValueError, KeyError):
            os.kill(json.loads(info.read_text())["pid"], signal.SIGKILL)
    shutil.rmtree(run_dir, ignore_errors=True)


def jinfer(env, *args, check=True, python=()) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, *python, "-m", "jinfer.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def workers(env) -> list[dict]:
    return [json.loads(line) for line in jinfer(env, "ps", "--json").stdout.splitlines()]


def gone(pid: int, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def imported_modules(importtime_stderr: str) -> set[str]:
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime_stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def test_worker_prints_what_the_command_prints_and_the_client_imports_no_jax(tmp_path, env):
    model = make_tiny_llm_dir(tmp_path / "model")
    gen = ["generate", "--model", str(model), "--max-tokens", "8"]
    # references: the same commands in this process's way (no worker)
    ref_json = jinfer(env, *gen, "--json", "hello there").stdout
    ref_stream = jinfer(env, *gen, "--temperature", "0.7", "--seed", "3", "say more").stdout
    ref_pair = jinfer(env, *gen, "--json", "one", "two").stdout
    bad = jinfer(env, *gen, "--top-p", "5", "hi", check=False)
    assert bad.returncode == cli.EXIT_USAGE and "top_p" in bad.stderr
    verified = jinfer({**env, "JINFER_KEEP_ALIVE": "1m"}, "--verify", *gen, "--json", "hello there")
    assert verified.stdout == ref_json and "keep-alive" not in verified.stderr  # re-hashed here
    assert not workers(env)

    first = jinfer(env, *gen, "--keep-alive", "60", "--json", "hello there")
    assert first.stdout == ref_json
    assert "starting a keep-alive worker" in first.stderr
    [worker] = workers(env)
    assert worker["flags"]["max_batch"] == 1 and worker["requests"] == 1 and worker["active"] == 0
    for path in (worker["socket"], worker["log"], Path(worker["socket"]).with_suffix(".json")):
        assert os.stat(path).st_mode & 0o777 == 0o600, path  # only this user connects or reads

    # the environment variable turns it on too; the second command streams from the same worker
    second = jinfer(
        {**env, "JINFER_KEEP_ALIVE": "1m"},
        *gen,
        "--temperature",
        "0.7",
        "--seed",
        "3",
        "say more",
        python=("-X", "importtime"),
    )
    assert second.stdout == ref_stream
    assert "starting" not in second.stderr
    modules = imported_modules(second.stderr)
    assert "jinfer.keepalive" in modules and not {"jax", "numpy", "flax"} & modules
    [worker] = workers(env)
    assert worker["requests"] == 2 and worker["keep_alive_s"] == 60.0

    # a request error comes back with the in-process message and exit code; the worker goes on
    again = jinfer(env, *gen, "--keep-alive", "60", "--top-p", "5", "hi", check=False)
    assert (again.returncode, again.stderr.splitlines()[-1]) == (bad.returncode, bad.stderr.splitlines()[-1])
    # --debug: the traceback and exit status of an uncaught error, as in-process
    debug = [*gen, "--top-p", "5", "hi", "--debug"]
    plain, kept = jinfer(env, *debug, check=False), jinfer(env, *debug, "--keep-alive", "60", check=False)
    assert plain.returncode == kept.returncode == 1
    assert "Traceback" in kept.stderr and kept.stderr.splitlines()[-1] == plain.stderr.splitlines()[-1]
    verbose = jinfer(env, *gen, "--keep-alive", "60", "--verbose", "--json", "hello there")
    assert verbose.stdout == ref_json
    assert f"answered by keep-alive worker pid {worker['pid']} (request 5)" in verbose.stderr
    assert "jinfer: max_batch=1: jinfer generate's 1 prompt(s) need no more slots" in verbose.stderr

    # two prompts need two slots: another engine, another worker
    assert jinfer(env, *gen, "--keep-alive", "60", "--json", "one", "two").stdout == ref_pair
    listed = workers(env)
    assert sorted(w["flags"]["max_batch"] for w in listed) == [1, 2]

    stopped = jinfer(env, "stop").stdout.splitlines()
    assert len(stopped) == 2 and all(line.startswith("stopped pid ") for line in stopped)
    assert all(gone(w["pid"], timeout=5) for w in listed)  # `stop` waited for them
    assert not workers(env) and not list(Path(env["JINFER_RUNTIME_DIR"]).glob("*.sock"))


def test_a_load_error_is_reported_like_in_process_and_leaves_no_worker(tmp_path, env):
    missing = ["generate", "--model", str(tmp_path / "nope"), "hi"]
    plain = jinfer(env, *missing, check=False)
    kept = jinfer(env, *missing, "--keep-alive", "30", check=False)
    assert plain.returncode == kept.returncode == cli.EXIT_USAGE
    assert plain.stderr.splitlines()[-1] == kept.stderr.splitlines()[-1]
    assert "does not exist" in kept.stderr
    assert not workers(env)
    bad_env = jinfer({**env, "JINFER_KEEP_ALIVE": "soon"}, *missing, check=False)
    assert bad_env.returncode == cli.EXIT_USAGE
    assert "JINFER_KEEP_ALIVE='soon'" in bad_env.stderr and "5m" in bad_env.stderr


# Big enough that 1,000 tokens take about a second on this CPU (the 2-layer default: 0.1 s), so an
# interrupted request is still running when its client goes.
SLOWER = dict(num_layers=8, hidden_size=256, intermediate_size=1024, num_heads=8, head_dim=32)


def test_clients_at_once_share_one_worker_which_survives_an_abandoned_stream(tmp_path, env):
    model = make_tiny_llm_dir(tmp_path / "model", **SLOWER)
    gen = ["generate", "--model", str(model), "--keep-alive", "60", "--max-tokens", "8"]
    ref = jinfer(env, "generate", "--model", str(model), "--max-tokens", "8", "--json", "hello").stdout
    starts = [
        subprocess.Popen(
            [*CLI, *gen, "--json", "hello"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in starts]
    assert [p.returncode for p in starts] == [0, 0, 0]
    assert [o.decode() for o, _ in outs] == [ref] * 3
    assert sum(b"starting a keep-alive worker" in e for _, e in outs) == 1  # the lock: one worker
    [worker] = workers(env)

    # a client stopped mid-stream (Ctrl-C) aborts its request; the worker goes on serving
    long = subprocess.Popen(
        [*CLI, *gen[:-2], "--max-tokens", "1000", "--ignore-eos", "hello"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert long.stdout.read(1)  # it is streaming
    long.send_signal(signal.SIGINT)
    assert long.wait(timeout=60) == cli.EXIT_INTERRUPTED
    assert jinfer(env, *gen, "--json", "hello").stdout == ref
    deadline = time.monotonic() + 60
    while (status := workers(env))[0]["active"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [(w["pid"], w["active"]) for w in status] == [(worker["pid"], 0)]
    engine = status[0]["engine"]
    assert (
        engine["requests_finished"] == 4 and engine["requests_aborted"] == 1 and not engine["requests_failed"]
    )
    assert engine["generated_tokens"] < 4 * 8 + 1000  # the long request stopped early

    # a --json command prints nothing before its output is done: the worker sees the closed
    # connection and cancels it all the same
    long = subprocess.Popen([*CLI, *gen, "--max-tokens", "1000", "--ignore-eos", "--json", "hello"], env=env)
    deadline = time.monotonic() + 60
    while not workers(env)[0]["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    long.send_signal(signal.SIGINT)
    assert long.wait(timeout=60) == cli.EXIT_INTERRUPTED
    deadline = time.monotonic() + 60
    while (status := workers(env))[0]["active"] and time.monotonic() < deadline:
        time.sleep(0.2)
    engine = status[0]["engine"]
    assert engine["requests_finished"] == 4 and engine["requests_aborted"] == 2
    assert engine["generated_tokens"] < 4 * 8 + 1000  # both long requests together stopped early

    # a worker that does not answer (here: stopped) is listed as such and its files are kept
    os.kill(worker["pid"], signal.SIGSTOP)
    try:
        [frozen] = workers(env)
    finally:
        os.kill(worker["pid"], signal.SIGCONT)
    assert (frozen["pid"], frozen["responding"]) == (worker["pid"], False)
    assert [(w["pid"], w["responding"]) for w in workers(env)] == [(worker["pid"], True)]


def test_a_command_stopped_while_its_worker_loads_leaves_one_worker_that_serves(tmp_path, env):
    model = make_tiny_llm_dir(tmp_path / "model")
    gen = [*CLI, "generate", "--model", str(model), "--keep-alive", "60", "--max-tokens", "8", "--json", "hi"]
    first = subprocess.Popen(gen, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = Path(env["JINFER_RUNTIME_DIR"])
    deadline = time.monotonic() + 60
    while not list(log.glob("*.log")) and time.monotonic() < deadline:  # the worker is starting
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) == cli.EXIT_INTERRUPTED and first.stdout.read() == b""
    # the next command waits for that worker (it holds the start lock while it loads) and uses it
    second = jinfer(env, *gen[3:])
    assert "starting a keep-alive worker" not in second.stderr
    assert second.stdout == jinfer(env, *[a for a in gen[3:] if a not in ("--keep-alive", "60")]).stdout
    [worker] = workers(env)
    assert worker["requests"] == 1


def test_stop_ends_a_worker_that_is_still_loading(tmp_path, env):
    model = make_tiny_llm_dir(tmp_path / "model")
    cmd = [*CLI, "generate", "--model", str(model), "--keep-alive", "10m", "--max-tokens", "8", "hi"]
    client = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (found := workers(env)) and time.monotonic() < deadline:
        time.sleep(0.05)
    [loading] = found
    assert loading["loading"] and not loading["responding"]
    stopped = jinfer(env, "stop").stdout
    assert stopped.startswith(f"stopped pid {loading['pid']}: ") and "loading the model" in stopped
    out, err = client.communicate(timeout=60)
    assert client.returncode == cli.EXIT_RUNTIME and out == ""
    assert "worker ended with exit status" in err and "jinfer stop" in err
    assert gone(loading["pid"], timeout=5) and not workers(env)


def test_worker_replaced_when_its_model_changes_and_gone_when_idle(tmp_path, env):
    model = make_tiny_llm_dir(tmp_path / "model")
    gen = ["generate", "--model", str(model), "--max-tokens", "8", "--json", "hello"]
    old_out = jinfer(env, *gen, "--keep-alive", "60").stdout
    [old] = workers(env)
    make_tiny_llm_dir(model, seed=1)  # converted again: other weights at the same path
    new_ref = jinfer(env, *gen).stdout
    assert new_ref != old_out
    assert jinfer(env, *gen, "--keep-alive", "60").stdout == new_ref
    [new] = workers(env)
    assert new["pid"] != old["pid"] and gone(old["pid"])
    # a model directory deleted under its worker: the message and exit code of a fresh process
    doomed = shutil.copytree(model, tmp_path / "doomed")
    doomed_gen = ["generate", "--model", str(doomed), "--max-tokens", "8", "--json", "hello"]
    jinfer(env, *doomed_gen, "--keep-alive", "60")
    doomed_pid = next(w["pid"] for w in workers(env) if w["flags"]["model"] == str(doomed))
    shutil.rmtree(doomed)
    plain = jinfer(env, *doomed_gen, check=False)
    kept = jinfer(env, *doomed_gen, "--keep-alive", "60", check=False)
    assert plain.returncode == kept.returncode == cli.EXIT_USAGE and "does not exist" in kept.stderr
    assert kept.stderr.splitlines()[-1] == plain.stderr.splitlines()[-1]
    assert gone(doomed_pid) and [w["pid"] for w in workers(env)] == [new["pid"]]
    # a request with a short keep-alive sets the worker's period: it exits once idle that long
    assert jinfer(env, *gen, "--keep-alive", "1s").stdout == new_ref
    assert gone(new["pid"])
    assert not workers(env) and not list(Path(env["JINFER_RUNTIME_DIR"]).glob("*.sock"))


def test_by_default_a_cpu_only_machine_keeps_a_worker_that_goes_first_when_memory_runs_out(tmp_path, env):
    model = make_tiny_llm_dir(tmp_path / "model")
    gen = ["generate", "--model", str(model), "--max-tokens", "8", "--json", "hello"]
    plain = jinfer(env, *gen)  # JINFER_KEEP_ALIVE=0: loads in this process
    assert "keep-alive" not in plain.stderr and not workers(env)
    default = {k: v for k, v in env.items() if k != "JINFER_KEEP_ALIVE"}  # nothing set; JAX_PLATFORMS=cpu
    first = jinfer(default, *gen)
    assert first.stdout == plain.stdout
    assert "starting a keep-alive worker" in first.stderr and "for 5 min after" in first.stderr
    assert "--keep-alive 0 runs without one" in first.stderr
    [worker] = workers(env)
    assert worker["keep_alive_s"] == cli.DEFAULT_KEEP_ALIVE == 300 and worker["requests"] == 1
    assert Path(f"/proc/{worker['pid']}/oom_score_adj").read_text().strip() == "1000"
    second = jinfer(default, *gen)  # answered by that worker, same bytes, nothing said on stderr
    assert second.stdout == plain.stdout and "keep-alive" not in second.stderr
    [again] = workers(env)
    assert again["pid"] == worker["pid"] and again["requests"] == 2
    off = jinfer(default, *gen, "--keep-alive", "0")  # the flag turns it off for one command
    assert off.stdout == plain.stdout and workers(env)[0]["requests"] == 2
    # no private directory for sockets: the default loads in the command's process, saying why;
    # a keep-alive asked for fails as before
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    nowhere = {**default, "JINFER_RUNTIME_DIR": str(shared)}
    fallback = jinfer(nowhere, *gen)
    assert fallback.stdout == plain.stdout and not list(shared.iterdir())
    assert (
        "no keep-alive worker: keep-alive directory" in fallback.stderr
        and "loading in this process" in fallback.stderr
    )
    asked = jinfer(nowhere, *gen, "--keep-alive", "1m", check=False)
    assert asked.returncode == cli.EXIT_USAGE and "writable by others" in asked.stderr and not asked.stdout


def test_default_keep_alive_follows_the_platforms_jax_may_use(tmp_path, monkeypatch):
    monkeypatch.delenv("JINFER_KEEP_ALIVE", raising=False)
    args = cli.build_parser().parse_args(["generate", "hi"])
    for platforms, expected in [("cpu", 300), (" CPU ", 300), ("tpu", 0), ("cuda", 0), ("cuda,cpu", 0)]:
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        assert cli.keep_alive_seconds(args) == expected, platforms
    assert cli.keep_alive_seconds(cli.build_parser().parse_args(["--verify", "generate", "hi"])) == 0
    monkeypatch.setenv("JINFER_KEEP_ALIVE", "off")
    assert cli.keep_alive_seconds(args) == 0
    monkeypatch.delenv("JINFER_KEEP_ALIVE")
    # JAX_PLATFORMS unset: decided by the accelerator plugins installed. This venv has none (the
    # test install is CPU-only); a PJRT plugin package as jax[cuda12] installs it turns it off.
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    assert cli.accelerator_plugins() == [] and cli.keep_alive_seconds(args) == 300
    plugin = tmp_path / "site" / "jax_plugins" / "xla_cuda12"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert cli.accelerator_plugins() == ["jax_plugins.xla_cuda12"] and cli.keep_alive_seconds(args) == 0
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # asked for the CPU anyway
    assert cli.keep_alive_seconds(args) == 300


def test_durations_and_runtime_dir_checks(tmp_path, monkeypatch):
    assert [cli.duration(t) for t in ("90", "90s", "5m", "1.5h", "0", "off")] == [90, 90, 300, 5400, 0, 0]
    for text in ("-1", "soon", "5d", "inf", ""):
        with pytest.raises(Exception, match="is not a duration"):
            cli.duration(text)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv(keepalive.RUNTIME_DIR_ENV, str(shared))
    with pytest.raises(ConfigError, match="writable by others"):
        keepalive.runtime_dir()
    monkeypatch.setenv(keepalive.RUNTIME_DIR_ENV, str(tmp_path / ("x" * 120)))
    with pytest.raises(ConfigError, match="longer than 100 bytes"):
        keepalive._files(keepalive.runtime_dir(), "0" * 16)
