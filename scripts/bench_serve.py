"""Online serving benchmark: `jinfer serve` vs llama.cpp's OpenAI server, same model, same requests.

Both servers serve SmolLM2-135M-Instruct: jinfer its converted directory (`jinfer.hub`), llama.cpp
(`llama-cpp-python[server]`) the Q4_1 GGUF it was converted from. The client sends streamed chat
requests (mixed prompt lengths, max_tokens drawn from a range, greedy, seeded) with Poisson
arrivals at each rate, then one closed-loop run at a fixed concurrency, and reports per run:
request throughput, output tokens/s, TTFT and TPOT p50/p99, and goodput (requests/s that met
TTFT < 1 s and TPOT < 100 ms). Each server runs as its own process, started and stopped here.

    python scripts/bench_serve.py                          # rates 0.5,1,2,4,8 + concurrency 16
    python scripts/bench_serve.py --quick                  # a short smoke run
    python scripts/bench_serve.py --systems jinfer --rates 1,2 --requests 32 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TTFT_SLO, TPOT_SLO = 1.0, 0.1
# fmt: off
WORDS = ("the", "model", "reads", "a", "prompt", "and", "writes", "an", "answer", "about", "cities", "rivers",
         "mountains", "history", "science", "music", "language", "computers", "gardens", "weather", "oceans",
         "trains", "books", "markets", "energy", "physics", "chemistry", "art", "food")
# fmt: on


def build_workload(n: int, seed: int, max_tokens: tuple[int, int]) -> list[dict]:
    """n chat requests: prompts of 8-32, 64-160 or 200-320 words (mixed), max_tokens in range."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lo, hi = rng.choice([(8, 32), (8, 32), (64, 160), (200, 320)])
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
        out.append(
            {
                "messages": [{"role": "user", "content": f"Request {i}. Summarize: {words}"}],
                "max_tokens": rng.randint(*max_tokens),
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
    return out


# -- servers ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gguf_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from jinfer import hub

    model = hub.KNOWN_MODELS[hub.DEFAULT_MODEL]
    return hub._obtain_gguf(model, hub.jinfer_home() / "downloads", progress=True)


# Every request generates exactly max_tokens on both servers (equal work; greedy output lengths of
# two differently quantized models would differ): jinfer via vLLM's `ignore_eos`, llama.cpp's server
# (which has no such field) via a -100 logit bias on SmolLM2's EOS, <|im_end|> = id 2.
FIXED_LENGTH = {"jinfer": {"ignore_eos": True}, "llama.cpp": {"logit_bias": {"2": -100}}}


def server_command(system: str, args: argparse.Namespace, port: int) -> tuple[list[str], str, str]:
    """(command, readiness path, model name to send)."""
    if system == "jinfer":
        cmd = [sys.executable, "-m", "jinfer.cli", "serve", "--model", args.model, "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-len", str(args.max_len), "--max-queue", "100000",
               "--served-model-name", "smollm2", "--log-level", "warning"]  # fmt: skip
        return cmd, "/health", "smollm2"
    gguf = str(gguf_path(args.gguf))
    # --interrupt_requests false: by default llama-cpp-python cuts a running stream when the next
    # request arrives; here requests queue as they do in jinfer.
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port), "--host",
           "127.0.0.1", "--n_ctx", str(args.max_len), "--n_threads", str(args.threads),
           "--model_alias", "smollm2", "--verbose", "false",
           "--interrupt_requests", "false"]  # fmt: skip
    return cmd, "/v1/models", "smollm2"


class Server:
    def __init__(self, system: str, args: argparse.Namespace, log_dir: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd, self.ready_path, self.model = server_command(system, args, self.port)
        self.extra = FIXED_LENGTH[system] if args.fixed_length else {}
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.log = log_dir / f"{system}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 900) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout} s; see {self.log}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# -- client ----------------------------------------------------------------------------------------
async def one_request(http: httpx.AsyncClient, server: Server, body: dict) -> dict:
    """Sends one streamed chat request; returns its timings and token count."""
    t0 = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    try:
        async with http.stream(
            "POST", "/v1/chat/completions", json={**body, **server.extra, "model": server.model}
        ) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "status": r.status_code}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                if any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                    first = first or time.perf_counter()
                    chunks += 1
    except httpx.HTTPError as e:
        return {"ok": False, "status": type(e).__name__}
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    first = first or end
    tpot = (end - first) / (tokens - 1) if tokens > 1 else 0.0
    return {"ok": True, "start": t0, "end": end, "ttft": first - t0, "tpot": tpot, "tokens": tokens}


async def poisson_run(server: Server, workload: list[dict], rate: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in workload:
        offsets.append(t)
        t += rng.expovariate(rate)
    limits = httpx.Limits(max_connections=len(workload) + 8)
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()

        async def at(offset: float, body: dict) -> dict:
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            return await one_request(http, server, body)

        return await asyncio.gather(*(at(o, b) for o, b in zip(offsets, workload, strict=True)))


async def concurrency_run(server: Server, workload: list[dict], concurrency: int) -> list[dict]:
    todo = list(workload)
    results: list[dict] = []
    async with httpx.AsyncClient(
        base_url=server.url, timeout=600, limits=httpx.Limits(max_connections=concurrency + 8)
    ) as h:

        async def worker():
            while todo:
                results.append(await one_request(h, server, todo.pop(0)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def summarize(results: list[dict]) -> dict:
    ok = [r for r in results if r["ok"]]
    if not ok:
        return {"requests": len(results), "errors": len(results)}
    span = max(r["end"] for r in ok) - min(r["start"] for r in ok)

    def pct(key: str, q: float) -> float:
        values = sorted(r[key] for r in ok)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    good = sum(r["ttft"] < TTFT_SLO and r["tpot"] < TPOT_SLO for r in ok)
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "req_per_s": len(ok) / span,
        "output_tok_per_s": sum(r["tokens"] for r in ok) / span,
        "ttft_p50": statistics.median(r["ttft"] for r in ok),
        "ttft_p99": pct("ttft", 0.99),
        "tpot_p50": statistics.median(r["tpot"] for r in ok),
        "tpot_p99": pct("tpot", 0.99),
        "goodput_req_per_s": good / span,
        "goodput_fraction": good / len(results),
    }


def bench_system(system: str, args: argparse.Namespace, log_dir: Path) -> dict:
    server = Server(system, args, log_dir)
    out: dict = {}
    try:
        out["ready_seconds"] = server.wait_ready()
        warm = build_workload(4, args.seed + 999, (8, 16))
        asyncio.run(concurrency_run(server, warm, 2))  # compile / page in
        runs = [(f"rate={r:g}", r) for r in args.rates] + ([(f"concurrency={args.concurrency}", None)]
                                                            if args.concurrency else [])  # fmt: skip
        for i, (name, rate) in enumerate(runs):
            workload = build_workload(args.requests, args.seed + i, tuple(args.max_tokens))
            if rate is None:
                results = asyncio.run(concurrency_run(server, workload, args.concurrency))
            else:
                results = asyncio.run(poisson_run(server, workload, rate, args.seed + i))
            out[name] = summarize(results)
            print(f"{system:10s} {name:16s} {fmt_row(out[name])}", flush=True)
    finally:
        out["exit_code"] = server.stop()
    return out


def fmt_row(s: dict) -> str:
    if "req_per_s" not in s:
        return f"all {s['errors']} requests failed"
    ms = {k: s[k] * 1000 for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")}
    return (
        f"{s['req_per_s']:6.2f} req/s {s['output_tok_per_s']:7.1f} tok/s  TTFT p50/p99 "
        f"{ms['ttft_p50']:6.0f}/{ms['ttft_p99']:6.0f} ms  TPOT p50/p99 {ms['tpot_p50']:5.1f}/"
        f"{ms['tpot_p99']:5.1f} ms  goodput {s['goodput_req_per_s']:5.2f} req/s "
        f"({s['goodput_fraction']:.0%})  errors {s['errors']}"
    )


def markdown(results: dict) -> str:
    lines = [
        "| system | run | req/s | out tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) "
        "| goodput req/s | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for system, runs in results.items():
        for name, s in runs.items():
            if not isinstance(s, dict) or "req_per_s" not in s:
                continue
            lines.append(
                f"| {system} | {name} | {s['req_per_s']:.2f} | {s['output_tok_per_s']:.1f} | "
                f"{s['ttft_p50'] * 1000:.0f} / {s['ttft_p99'] * 1000:.0f} | "
                f"{s['tpot_p50'] * 1000:.1f} / {s['tpot_p99'] * 1000:.1f} | "
                f"{s['goodput_req_per_s']:.2f} | {s['errors']} |"
            )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default="jinfer,llama.cpp")
    p.add_argument("--model", default="smollm2-135m-instruct", help="jinfer model name or directory")
    p.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: the one jinfer.hub converted)")
    p.add_argument("--rates", default="0.5,1,2,4,8", help="Poisson arrival rates, requests/s")
    p.add_argument("--requests", type=int, default=64, help="requests per run")
    p.add_argument(
        "--concurrency", type=int, default=16, help="closed-loop run at this concurrency (0: none)"
    )
    p.add_argument("--max-tokens", type=int, nargs=2, default=(32, 128), metavar=("MIN", "MAX"))
    p.add_argument("--max-batch", type=int, default=16, help="jinfer decode slots")
    p.add_argument("--max-len", type=int, default=1024, help="context per request (both servers)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-fixed-length",
        dest="fixed_length",
        action="store_false",
        help="let requests stop at EOS (default: exactly max_tokens each, see FIXED_LENGTH)",
    )
    p.add_argument("--quick", action="store_true", help="rates 1,2, 8 requests, concurrency 4")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if args.quick:
        args.rates, args.requests, args.concurrency, args.max_tokens = "1,2", 8, 4, (16, 48)
    args.rates = [float(r) for r in str(args.rates).split(",") if r]
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"server logs in {log_dir}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    results = {}
    for system in args.systems.split(","):
        if system == "llama.cpp":
            try:
                import llama_cpp.server  # noqa: F401
            except ImportError as e:
                print(f"skipping llama.cpp: {e} (pip install 'llama-cpp-python[server]')")
                continue
        results[system] = bench_system(system, args, log_dir)
    print()
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
