"""Keep-alive workers: `jinfer generate` keeps the engine loaded between commands.

A fresh `jinfer generate` process pays for importing JAX, restoring the weights and loading the
compiled programs before its first token (seconds, see BENCHMARKS "Warm start"). With a keep-alive
duration (the flag, `JINFER_KEEP_ALIVE=10m` in the environment, or by default 5 minutes where JAX
runs only on the CPU: `cli.default_keep_alive`), the command instead:

1. looks for a worker holding an engine built from the same engine flags (model, mesh, dtype,
   quantization, slots, context), the same environment variables that change what loads
   (`ENGINE_ENV`) and the same jinfer sources; the worker is found by a key hashed from all that;
2. if there is none, starts one (`python -m jinfer.keepalive`, in its own session, so a Ctrl-C in
   the terminal does not reach it), relays what it prints while it loads, and waits until it
   listens; two commands starting at once start one worker (a lock file);
3. sends the prompts and sampling flags over the worker's Unix socket and prints what comes back:
   the same bytes an in-process command prints (`cli.generate_with` runs in the worker), the same
   error messages and exit codes. The client imports no JAX.

A worker exits after `keep_alive` seconds without a request (each request sets the period anew),
on `jinfer stop`, or, at the next request, when its model directory changed on disk (that request
is then answered by a new worker). Its files live in `runtime_dir()` (a private directory: mode
0700, owned by the user): `KEY.sock`, `KEY.json` (what `jinfer ps` lists), `KEY.lock` and `KEY.log`
(all the worker printed: while it loaded, the starting command showed it too).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from jinfer.cli import SAMPLING_FLAGS
from jinfer.errors import ConfigError, JinferError
from jinfer.osutil import pid_alive

RUNTIME_DIR_ENV = "JINFER_RUNTIME_DIR"
# Environment variables that may change what a worker loads or how it runs (those whose names
# start so): part of the worker's key. The keep-alive settings themselves are not.
ENGINE_ENV_PREFIXES = ("JINFER_", "JAX_", "XLA_", "TPU_", "LIBTPU_", "CUDA_", "NVIDIA_", "HF_", "OMP_")
NOT_ENGINE_ENV = ("JINFER_KEEP_ALIVE", RUNTIME_DIR_ENV)
# `generate` flags that build the engine (the key) and those each request brings.
ENGINE_FLAGS = ("model", "mesh", "dtype", "quantize", "max_len")
REQUEST_FLAGS = (*SAMPLING_FLAGS, "logprobs", "raw", "json", "verbose", "max_batch", "debug")
# The engine's counters `jinfer ps --json` reports (jinfer.runtime.stats.GenerationStats).
ENGINE_COUNTERS = ("requests_finished", "requests_aborted", "requests_failed", "generated_tokens")
SOCKET_PATH_LIMIT = 100  # sun_path holds 104-108 bytes depending on the OS


class RuntimeDirError(ConfigError):
    """No usable place for workers' sockets (a shared, foreign, unwritable or too long path): an
    explicit keep-alive fails with it; the default one loads in the command's process instead."""


class WorkerError(JinferError):
    """A keep-alive worker could not be started or ended a request without an answer."""


# ---------------------------------------------------------------------------------------------
# Where workers live and how they are named


def runtime_dir() -> Path:
    """$JINFER_RUNTIME_DIR, else $XDG_RUNTIME_DIR/jinfer, else /tmp/jinfer-UID; created private.
    Refuses a directory another user owns or others can write to (a socket there could be
    someone else's worker)."""
    if os.environ.get(RUNTIME_DIR_ENV):
        path = Path(os.environ[RUNTIME_DIR_ENV])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "jinfer"
    else:
        import tempfile

        path = Path(tempfile.gettempdir()) / f"jinfer-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RuntimeDirError(
            f"keep-alive directory {path} is not a directory; set {RUNTIME_DIR_ENV} to a private directory"
        ) from None
    except OSError as e:
        raise RuntimeDirError(
            f"keep-alive directory {path} cannot be created ({e.strerror}); set {RUNTIME_DIR_ENV} to a "
            "private directory"
        ) from None
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise RuntimeDirError(
            f"keep-alive directory {path} is owned by another user or writable by others; set "
            f"{RUNTIME_DIR_ENV} to a private directory"
        )
    return path


def _sources_signature() -> list:
    """(path, size, mtime) of jinfer's own sources: an upgraded or edited jinfer gets new workers."""
    root = Path(__file__).parent
    return sorted(
        (str(p.relative_to(root)), st.st_size, st.st_mtime_ns)
        for p in root.rglob("*.py")
        for st in (p.stat(),)
    )


def engine_spec(args: argparse.Namespace, max_batch: int | None) -> dict[str, Any]:
    """What a worker's engine is built from; equal specs share a worker."""
    model = args.model
    if model is not None and os.path.exists(model):
        model = os.path.abspath(model)  # a relative path means the same directory from anywhere
    flags = {k: getattr(args, k, None) for k in ENGINE_FLAGS}
    return {
        "flags": {**flags, "model": model, "max_batch": max_batch},
        "env": {k: v for k, v in os.environ.items() if _engine_env(k)},
        "python": [sys.prefix, sys.version],  # the environment (venv), however python was named
        "sources": hashlib.sha256(json.dumps(_sources_signature()).encode()).hexdigest(),
    }


def _engine_env(name: str) -> bool:
    secret = any(word in name for word in ("TOKEN", "KEY", "SECRET", "PASSWORD"))
    return name.startswith(ENGINE_ENV_PREFIXES) and name not in NOT_ENGINE_ENV and not secret


def worker_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _files(directory: Path, key: str) -> dict[str, Path]:
    files = {ext: directory / f"{key}.{ext}" for ext in ("sock", "json", "lock", "log")}
    if len(os.fsencode(files["sock"])) > SOCKET_PATH_LIMIT:
        raise RuntimeDirError(
            f"keep-alive socket path {files['sock']} is longer than {SOCKET_PATH_LIMIT} bytes, the "
            f"Unix socket limit; set {RUNTIME_DIR_ENV} to a shorter directory"
        )
    return files


# ---------------------------------------------------------------------------------------------
# The client: `jinfer generate` with a keep-alive duration


def run(args: argparse.Namespace, prompts: list[str], max_batch: int | None, keep_alive: float) -> int:
    """Runs `jinfer generate` on a keep-alive worker (started if needed); returns the exit code."""
    if os.name != "posix" or not hasattr(socket, "AF_UNIX"):
        raise ConfigError("--keep-alive needs Unix sockets and file locks (Linux, macOS); leave it unset")
    spec = engine_spec(args, max_batch)
    files = _files(runtime_dir(), worker_key(spec))
    request = {
        "generate": {"prompts": prompts, **{k: getattr(args, k, None) for k in REQUEST_FLAGS}},
        "keep_alive": keep_alive,
    }
    for _ in range(2):  # a second time when the first worker found its model changed on disk
        conn = _connect(files["sock"]) or _start_worker(spec, files, args, keep_alive)
        if isinstance(conn, int):  # the worker failed to load; it said why
            return conn
        with conn:
            code = _converse(conn, request, files)
        if code is not None:
            return code
    raise WorkerError(f"the keep-alive worker at {files['sock']} kept reporting a changed model")


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):  # none, or a dead worker's socket
        sock.close()
        return None
    return sock


def _start_worker(spec, files, args, keep_alive) -> socket.socket | int:
    """Starts a worker under the key's lock (unless another command just did) and connects to it;
    returns the exit code instead when the worker could not load the model."""
    import fcntl

    with open(files["lock"], "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        conn = _connect(files["sock"])  # another command may have started one meanwhile
        if conn is not None:
            return conn
        files["sock"].unlink(missing_ok=True)  # a dead worker's socket
        config = {  # on the worker's command line, which `ps` shows: no environment values
            "spec": {"flags": spec["flags"]},
            "files": {k: str(v) for k, v in files.items()},
            "keep_alive": keep_alive,
            "compilation_cache": getattr(args, "compilation_cache", None),
            "debug": bool(getattr(args, "debug", False)),
            "lock_fd": lock.fileno(),
        }
        print(
            f"jinfer: starting a keep-alive worker; it keeps the model loaded for "
            f"{_format_duration(keep_alive)} after the last request (`jinfer stop` ends it; "
            "--keep-alive 0 runs without one)",
            file=sys.stderr,
        )
        log_fd = os.open(files["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(log_fd, "wb") as log:  # its output while it loads; shown here as it comes
            proc = subprocess.Popen(
                [sys.executable, "-m", "jinfer.keepalive", json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,  # one line: ready, or the error that stopped it
                stderr=log,  # a file, not a pipe: a command stopped meanwhile breaks nothing
                start_new_session=True,  # the terminal's Ctrl-C and hangup do not reach it
                pass_fds=(lock.fileno(),),  # it holds the lock until it listens, even if we stop
            )
        loaded = threading.Event()
        relay = threading.Thread(target=_relay, args=(files["log"], loaded), daemon=True)
        relay.start()  # downloads, conversion progress, warnings
        line = proc.stdout.readline()
        proc.stdout.close()
        loaded.set()
        relay.join(timeout=5)
        try:
            message = json.loads(line)
        except ValueError:
            code = proc.wait()
            raise WorkerError(
                f"the keep-alive worker ended with exit status {code} before it listened (stopped by "
                "`jinfer stop`, or see its output above); run without --keep-alive to load the model "
                "in this process"
            ) from None
        if "exit" in message:
            proc.wait()
            return _finish(message)
        conn = _connect(files["sock"])
        if conn is None:
            raise WorkerError(f"the keep-alive worker said it was ready but {files['sock']} does not answer")
        return conn


def _relay(path: Path, done: threading.Event) -> None:
    """Copies what a starting worker writes to its log onto this command's stderr until `done`."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(path, "rb") as log:
        while True:
            finished = done.wait(0.1)
            chunk = log.read()
            if chunk:
                sys.stderr.write(decoder.decode(chunk))
                sys.stderr.flush()
            if finished:
                return


def _converse(conn: socket.socket, request: dict, files: dict[str, Path]) -> int | None:
    """Sends one request and prints the answer; the exit code, or None when the worker's model
    changed on disk (the worker is exiting; ask a new one)."""
    _send(conn, request)
    for message in _messages(conn):
        if "out" in message:
            sys.stdout.write(message["out"])
            sys.stdout.flush()
        elif "err" in message:
            sys.stderr.write(message["err"])
        elif message.get("stale"):
            return None
        elif "exit" in message:
            return _finish(message)
    raise WorkerError(
        "the keep-alive worker ended the request without an answer (stopped, or ended by the kernel "
        f"when memory ran out: it is the first to go); its log: {files['log']}. Rerun the command; "
        "with --keep-alive 0 it loads the model in its own process"
    )


def _finish(message: dict) -> int:
    """Prints a worker's final answer's error, as `cli.main` would have; the exit code."""
    if message.get("traceback"):  # --debug: the traceback, and the exit status of an uncaught error
        sys.stderr.write(message["traceback"])
        return 1
    if message.get("error"):
        print(f"jinfer: error: {message['error']}", file=sys.stderr)
    return message["exit"]


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message, ensure_ascii=False).encode() + b"\n")


def _messages(conn: socket.socket):
    """The JSON lines a peer sends, until it closes the connection."""
    with conn.makefile("rb") as lines:
        for line in lines:
            yield json.loads(line)


# ---------------------------------------------------------------------------------------------
# `jinfer ps` and `jinfer stop`


def _ask(path: Path, message: dict, timeout: float | None = 10.0) -> dict | None:
    """One request to a worker and its last answer; None if nothing answers there."""
    conn = _connect(path)
    if conn is None:
        return None
    with conn:
        conn.settimeout(timeout)
        _send(conn, message)
        answers = list(_messages(conn))
        return answers[-1] if answers else None


def workers() -> list[dict[str, Any]]:
    """The workers: what each reports of itself, or (`"responding": False`) what it recorded when
    it started, if it does not answer within 10 s (stopped, or stuck) or still loads its model
    (`"loading": True`). Files of dead ones are removed."""
    found = []
    for info in sorted(runtime_dir().glob("*.json")):
        try:
            status = _ask(info.with_suffix(".sock"), {"status": True})
        except OSError:  # it accepted but did not answer: alive, so its files stay
            status = None
        else:
            if status is not None:
                found.append({**status, "responding": True})
                continue
        try:  # not answering, or not listening yet: a worker still loading its model
            recorded = {**json.loads(info.read_text()), "responding": False}
        except (OSError, ValueError):
            continue
        if _is_worker(recorded["pid"]):
            found.append(recorded)
        else:  # nothing listens there and no worker runs: a dead one's files
            _remove_files(info.with_suffix(""))
    return found


def _is_worker(pid: int) -> bool:
    """Whether `pid` runs a keep-alive worker (not another process that got a dead one's pid)."""
    if not Path("/proc/self").exists():  # no /proc (macOS): whether it runs at all
        return pid_alive(pid)
    try:
        return b"jinfer.keepalive" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # no such process
        return False


def stop_all(timeout: float = 90.0) -> list[dict[str, Any]]:
    """Asks every worker to exit once its requests are done (SIGTERM to one that does not answer)
    and waits until their processes are gone (up to `timeout` s); returns those stopped."""
    import signal

    stopped = []
    for worker in workers():
        with contextlib.suppress(OSError):
            if not worker["responding"]:
                os.kill(worker["pid"], signal.SIGTERM)
                stopped.append(worker)
            elif _ask(Path(worker["socket"]), {"stop": True}, timeout=None) is not None:
                stopped.append(worker)
    deadline = time.monotonic() + timeout
    for worker in stopped:
        while pid_alive(worker["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
    return stopped


def describe(worker: dict[str, Any]) -> str:
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in worker["flags"].items() if v is not None)
    if worker.get("loading"):
        return f"pid {worker['pid']}: {flags}; loading the model (its log: {worker['log']})"
    if not worker["responding"]:
        return f"pid {worker['pid']}: {flags}; not answering (stopped or stuck; its log: {worker['log']})"
    return (
        f"pid {worker['pid']}: {flags}; {worker['requests']} request(s), idle {worker['idle_s']:.0f} s "
        f"of {_format_duration(worker['keep_alive_s'])}"
    )


def _format_duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _remove_files(stem: Path) -> None:
    for ext in ("sock", "json"):
        stem.with_suffix(f".{ext}").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The worker: `python -m jinfer.keepalive CONFIG_JSON`


def _model_signature(path: Path) -> list | None:
    """What changes when a model directory is converted again, edited or replaced: every file's
    size, mtime and inode (what jinfer's own warm start trusts before re-hashing, see
    jinfer.digest_record); None when it is gone."""
    try:
        entries = [path, *sorted(path.rglob("*"))]
        return [(str(p), st.st_ino, st.st_size, st.st_mtime_ns) for p in entries for st in (p.stat(),)]
    except OSError:
        return None


class Worker:
    """Holds one engine and answers requests on a Unix socket until idle for `keep_alive` s."""

    def __init__(self, llm, spec: dict, files: dict[str, Path], keep_alive: float):
        self.llm, self.spec, self.files, self.keep_alive = llm, spec, files, keep_alive
        self.signature = _model_signature(Path(llm.path))
        self.lock = threading.Lock()
        self.active = 0  # open connections
        self.generating = 0  # of which generate requests
        self.requests = 0
        self.last = time.monotonic()
        self.started = time.time()
        self.stopping = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(files["sock"]))
        os.chmod(files["sock"], 0o600)  # connecting needs write permission: only this user
        self.listener.listen(16)
        self.identity = os.stat(files["sock"]).st_ino
        files["json"].write_text(json.dumps(self.status()))

    def status(self) -> dict[str, Any]:
        stats = self.llm.stats
        return {
            "pid": os.getpid(),
            "socket": str(self.files["sock"]),
            "log": str(self.files["log"]),
            "flags": self.spec["flags"],
            "model_path": str(self.llm.path),
            "requests": self.requests,
            "active": self.generating,
            "idle_s": 0.0 if self.generating else time.monotonic() - self.last,
            "keep_alive_s": self.keep_alive,
            "started": self.started,
            "engine": {k: getattr(stats, k) for k in ENGINE_COUNTERS},
        }

    def serve(self) -> None:
        self.listener.settimeout(0.25)  # how often an idle worker checks its keep-alive period
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                self._expire_if_idle()
                continue
            conn.settimeout(None)
            with self.lock:
                self.active += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        self.listener.close()
        self._unlink()
        deadline = time.monotonic() + 60  # requests already running finish first
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)
        self.llm.close()

    def _unlink(self) -> None:
        """Removes the socket and info files if they are still this worker's (a new worker may
        have replaced them)."""
        with contextlib.suppress(OSError):
            if os.stat(self.files["sock"]).st_ino == self.identity:
                _remove_files(self.files["sock"].with_suffix(""))

    def _expire_if_idle(self) -> None:
        with self.lock:
            if not self.generating and time.monotonic() - self.last >= self.keep_alive:
                self.stop()

    def stop(self) -> None:
        self.stopping.set()
        self._unlink()  # new commands start a new worker instead of waiting on this one

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                message = json.loads(conn.makefile("rb").readline() or b"{}")
                if "generate" in message:
                    self._generate(conn, message)
                elif message.get("stop"):
                    self.stop()
                    _send(conn, {"exit": 0, "pid": os.getpid()})
                else:
                    _send(conn, self.status())
        except (OSError, ValueError):  # the client went away or sent garbage: nothing to answer
            pass
        finally:
            with self.lock:
                self.active -= 1

    def _generate(self, conn: socket.socket, message: dict) -> None:
        if self.stopping.is_set() or _model_signature(Path(self.llm.path)) != self.signature:
            # the next command loads it again, or reports why it cannot
            self.stop()
            _send(conn, {"stale": True})
            return
        with self.lock:
            self.keep_alive = float(message.get("keep_alive", self.keep_alive))
            self.requests += 1
            self.generating += 1
        try:
            self._run(conn, message)
        finally:
            with self.lock:
                self.generating -= 1
                self.last = time.monotonic()

    def _run(self, conn: socket.socket, message: dict) -> None:
        from jinfer import cli

        request = message["generate"]
        args = argparse.Namespace(**{k: request.get(k) for k in REQUEST_FLAGS}, command="generate")
        if args.verbose:
            note = f"jinfer: answered by keep-alive worker pid {os.getpid()} (request {self.requests})\n"
            _send(conn, {"err": note})
        try:
            sink = cli.Sink(
                lambda text: _send(conn, {"out": text}),
                lambda text: _send(conn, {"err": text}),
                lambda handles: _cancel_when_closed(conn, handles),
            )
            slots = self.spec["flags"]["max_batch"]
            code = cli.generate_with(self.llm, args, request["prompts"], slots, sink)
            answer = {"exit": code}
        except (BrokenPipeError, ConnectionResetError):
            return  # the client is gone (its Ctrl-C); the stream was closed, the engine goes on
        except Exception as e:
            answer = _error_answer(e, args)
        _send(conn, answer)


def _cancel_when_closed(conn: socket.socket, handles) -> None:
    """Cancels the requests once the client closes the connection (it sends nothing after its
    request): a --json or several-prompt command writes nothing until an output is done, so a
    Ctrl-C would otherwise go unnoticed until the work is finished. Cancelling finished requests
    does nothing, so the client's normal close is harmless."""

    def wait() -> None:
        with contextlib.suppress(OSError):
            while conn.recv(4096):
                pass
        for handle in handles:
            handle.cancel()

    threading.Thread(target=wait, name="jinfer-keepalive-watch", daemon=True).start()


def _error_answer(e: Exception, args: argparse.Namespace) -> dict:
    from jinfer import cli

    code, text = cli.error_report(e, args)
    answer: dict[str, Any] = {"exit": code, "error": text}
    if getattr(args, "debug", False):
        import traceback

        answer["traceback"] = "".join(traceback.format_exception(e))
    return answer


def worker_main(config: dict) -> int:
    """Loads the engine, listens, tells the starting command (one JSON line on stdout), then
    serves until idle; its later output goes to the log file."""
    import signal

    from jinfer import cli

    os.umask(0o077)  # its info file and log: this user's only
    _first_to_go()
    spec, files = config["spec"], {k: Path(v) for k, v in config["files"].items()}
    ready = os.fdopen(os.dup(1), "w")  # stderr is already the log file
    flags = argparse.Namespace(**spec["flags"], debug=config["debug"], command="generate")
    loading = {"pid": os.getpid(), "socket": str(files["sock"]), "log": str(files["log"])}
    files["json"].write_text(json.dumps({**loading, "flags": spec["flags"], "loading": True}))  # for ps/stop
    try:
        cli.setup_compilation_cache(config["compilation_cache"])
        llm = cli.generate_llm(flags, spec["flags"]["max_batch"])
        worker = Worker(llm, spec, files, config["keep_alive"])
    except Exception as e:
        files["json"].unlink(missing_ok=True)
        _tell(ready, _error_answer(e, flags))
        return 1
    finally:  # listening (or failed): other commands may look now
        os.close(config["lock_fd"])
    os.dup2(2, 1)  # stdout into the log too: nobody reads the pipe after the next line
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    _tell(ready, {"ready": os.getpid()})
    worker.serve()
    return 0


def _first_to_go() -> None:
    """Marks this process the first the kernel ends when memory runs out (Linux; best effort):
    an idle worker's memory must not cost the user's next program its own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")


def _tell(ready, message: dict) -> None:
    """The starting command's one line; it may have been stopped (Ctrl-C) meanwhile."""
    with contextlib.suppress(OSError):
        ready.write(json.dumps(message) + "\n")
        ready.close()


if __name__ == "__main__":
    sys.exit(worker_main(json.loads(sys.argv[1])))
