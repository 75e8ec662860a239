"""Side-by-side generation benchmark: jinfer (f32, bf16, int8) vs HF transformers vs llama.cpp.

Same model (SmolLM2-135M-Instruct: jinfer loads its converted directory via `jinfer.hub`, HF
transformers and llama.cpp load the Q4_1 GGUF it was converted from), same prompt token ids (built
once here with jinfer's tokenizer and chat template), greedy decoding. Each (system, workload) runs
in its own subprocess so peak RSS (`ru_maxrss` of the child) is per system; this parent process
orchestrates and collects JSON. Peers are skipped when they are not importable.

Workloads:
  batch1   one chat prompt, 128 new tokens, EOS ignored; TTFT, time per output token (TPOT), MBU.
  offline  256 chat prompts (mixed lengths, max_tokens drawn from 16..256, seeded), greedy, stop
           at EOS; aggregate output tokens/s. jinfer: llm.generate(all, params_list) with continuous
           batching; HF: generate() in batches of 16 sorted by length, left padded; llama.cpp:
           one prompt at a time.
  cli      `jinfer --compilation-cache DIR generate ...` in fresh processes, cold (empty DIR)
           then warm (populated DIR): process start -> first output byte.

--defaults: what a user who sets nothing gets. The only jinfer system is `jinfer.LLM(name)` with no
other argument and one plain `generate()` call per timed run (`llm.engine_choices` is recorded):
  batch1   one chat prompt, 128 greedy tokens (EOS ignored): generate() wall -> tokens/s.
  chat48   48 mixed chat prompts (max_tokens drawn from 16..256) in one generate() call; a warm-up
           set, then 3 other prompt sets (the prefix cache cannot replay a timed set). Peers:
           HF generate() in batches of 16, llama.cpp one prompt at a time, same sets.
  offline  `jinfer run-batch --input IN --output OUT` (default flags; greedy and max_tokens per
           line) as a subprocess over 256 prompts, 1 + 3 runs sharing one fresh compilation
           cache dir (the first, cold, is reported apart); medians of the process wall and of the
           run's own output tokens/s. Peers: the offline workers above on the same prompts.
  cli      the cold/warm CLI workload above.
Compilations after warm-up (`llm.warmup()` and one untimed generate()) are reported for every
jinfer row (run-batch: the compile seconds its summary prints for the warm-cache runs).

    python scripts/bench.py --defaults --quick                          # smoke test
    python scripts/bench.py --defaults --json defaults.json             # full run

Run in the benchmark venv (see BENCHMARKS.md):

    /work/venv-bench/bin/python scripts/bench.py --quick              # 32 offline prompts, 1 repeat
    /work/venv-bench/bin/python scripts/bench.py --json bench.json    # full run
    /work/venv-bench/bin/python scripts/bench.py --systems jinfer-f32,hf --workloads batch1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF = next(  # the benchmark machine's copy, else the one jinfer.hub downloaded (converted from)
    (
        p
        for p in (
            Path("/work/cache/smollm2") / GGUF_NAME,
            Path(os.environ.get("JINFER_HOME", "~/.cache/jinfer")).expanduser() / "downloads" / GGUF_NAME,
        )
        if p.is_file()
    ),
    Path("/work/cache/smollm2") / GGUF_NAME,
)
HF_TOKENIZER = Path("/work/cache/smollm2/hf_tokenizer")
MODEL_NAME = "smollm2-135m-instruct"
SYSTEMS = ("jinfer-f32", "jinfer-bf16", "jinfer-int8", "hf", "llama.cpp")
JINFER_OPTIONS = {  # tuned systems; --defaults passes nothing (bfloat16 weights on CPUs with BF16)
    "jinfer-f32": {"dtype": "float32"},
    "jinfer-bf16": {"dtype": "bfloat16"},
    "jinfer-int8": {"quantize": "int8"},
}
BATCH1_NEW_TOKENS = 128
BATCH1_MAX_LEN = 256  # prompt (< 64 tokens) + 128 new tokens; the cache is read whole every step
OFFLINE_MAX_LEN = 512  # prompts <= 240 tokens + max_tokens <= 256
OFFLINE_MAX_PROMPT = 240
HF_BATCH = 16
EOS_ID = 2  # <|im_end|>: generation_config.json eos_token_id of the converted model

# -- prompts --------------------------------------------------------------------------------------
TEMPLATES = (
    "What is {t}?",
    "Explain {t} in one paragraph.",
    "Give me three facts about {t}.",
    "Write a short poem about {t}.",
    "How would you explain {t} to a ten-year-old child who has never heard of it before?",
    "List the pros and cons of {t}, and end with a one-sentence recommendation.",
    "I am preparing a talk for a general audience. Summarize the history of {t}, mention two key "
    "people or events, and suggest a question the audience could discuss afterwards.",
    "Read the following notes and answer: what is the main point about {t}?\n\nNotes: {ctx}",
    "Context: {ctx}\n\nUsing only the context above, write a concise summary about {t} for a newsletter.",
)
TOPICS = (
    "photosynthesis",
    "the French revolution",
    "black holes",
    "compound interest",
    "the water cycle",
    "neural networks",
    "volcanoes",
    "the Roman empire",
    "climate change",
    "vaccines",
    "jazz music",
    "the printing press",
    "plate tectonics",
    "supply and demand",
    "the immune system",
    "quantum computing",
    "honey bees",
    "the Silk Road",
    "renewable energy",
    "the human heart",
    "chess openings",
    "coral reefs",
    "the Moon landing",
    "recycling",
    "prime numbers",
    "the Great Wall of China",
    "electric cars",
    "sleep",
    "coffee",
    "the internet",
    "earthquakes",
    "democracy",
)
SENTENCES = (
    "The committee met on Tuesday to review the quarterly figures.",
    "Several members raised concerns about rising costs and delayed deliveries.",
    "A pilot project in two regions showed promising early results.",
    "Researchers noted that the sample size was still small.",
    "Local volunteers collected data over a period of six weeks.",
    "The final report will be published before the end of the year.",
    "Funding for the next phase has not yet been confirmed.",
    "Participants described the process as clear but slow.",
)


def build_prompts(n: int, seed: int = 0) -> list[tuple[list[dict], int]]:
    """n (chat messages, max_tokens) pairs, deterministic for a seed; mixed prompt lengths."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        template = rng.choice(TEMPLATES)
        ctx = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(2, 14)))
        text = template.format(t=rng.choice(TOPICS), ctx=ctx)
        out.append(([{"role": "user", "content": text}], rng.randint(16, 256)))
    return out


def encode_prompts(model_dir: Path, n: int) -> tuple[list[list[int]], list[int]]:
    """Token ids (jinfer chat template) and max_tokens of n offline prompts plus the batch-1 prompt."""
    from jinfer.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    ids, max_tokens = [], []
    for messages, m in build_prompts(n):
        p = tok.encode_chat(messages)
        ids.append(p[: OFFLINE_MAX_PROMPT - 8] + p[-8:] if len(p) > OFFLINE_MAX_PROMPT else p)
        max_tokens.append(m)
    return ids, max_tokens


def batch1_prompt(model_dir: Path) -> list[int]:
    from jinfer.tokenizer import Tokenizer

    msg = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    return Tokenizer.from_dir(model_dir).encode_chat(msg)


# -- helpers used by workers -----------------------------------------------------------------------
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def med(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def batch1_summary(ttfts: list[float], totals: list[float], produced: int) -> dict:
    """Medians; TPOT = (total - TTFT) / (produced - 1); decode tokens/s = 1 / TPOT."""
    tpots = [(t - f) / max(produced - 1, 1) for t, f in zip(totals, ttfts, strict=True)]
    return {
        "produced_tokens": produced,
        "ttft_s": med(ttfts),
        "tpot_s": med(tpots),
        "decode_tokens_per_s": 1.0 / med(tpots),
        "e2e_tokens_per_s": produced / med(totals),
        "wall_s": med(totals),
        "runs": len(totals),
    }


def offline_summary(walls: list[float], tokens: int, n_prompts: int) -> dict:
    return {
        "prompts": n_prompts,
        "output_tokens": tokens,
        "wall_s": med(walls),
        "tokens_per_s": tokens / med(walls),
        "runs": len(walls),
    }


# -- jinfer worker ---------------------------------------------------------------------------------
def jinfer_llm(system: str, max_batch: int, max_len: int, buckets=None):
    from jinfer.llm import LLM

    return LLM(MODEL_NAME, max_batch=max_batch, max_len=max_len, buckets=buckets, **JINFER_OPTIONS[system])


def jinfer_bytes(llm, positions: range | None = None) -> tuple[int, int, float]:
    """(weight bytes, whole KV cache bytes, mean KV bytes read per decode step).

    Decode attention reads the cache blocks up to the furthest live position (jinfer.kvcache);
    `positions` are the decode positions of a one-request run (None: count the whole cache).
    """
    import jax

    weights = sum(x.nbytes for x in jax.tree.leaves(llm.engine.params))
    cache = llm.engine.cache
    full = cache.nbytes()
    if positions is None:
        return weights, full, float(full)
    read = [(p // cache.block + 1) * cache.block for p in positions]
    return weights, full, full * statistics.mean(read) / cache.max_len


def jinfer_batch1(cfg: dict) -> dict:
    from jinfer.sampling import SamplingParams

    t0 = time.perf_counter()
    llm = jinfer_llm(cfg["system"], 1, BATCH1_MAX_LEN)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.warmup()
    warmup_s = time.perf_counter() - t0
    prompt = cfg["batch1_prompt"]
    params = SamplingParams(max_tokens=BATCH1_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    produced = len(llm.generate([prompt], params)[0].token_ids)  # also the untimed warm run
    ttfts, totals = [], []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        first = None
        for _piece in llm.stream(prompt, params):
            if first is None:
                first = time.perf_counter() - t0
        totals.append(time.perf_counter() - t0)
        ttfts.append(first)
    out = batch1_summary(ttfts, totals, produced)
    # Decode steps run at positions len(prompt) .. len(prompt) + produced - 2 (the first token
    # comes from prefill).
    weights, kv_full, kv_read = jinfer_bytes(llm, range(len(prompt), len(prompt) + produced - 1))
    out.update(
        load_s=load_s,
        warmup_s=warmup_s,
        compile_s=llm.stats.compile_time,
        compiles=llm.stats.compiles,
        weight_bytes=weights,
        kv_bytes=kv_read,
        kv_cache_bytes=kv_full,
        decode_steps=llm.engine.config.decode_steps,
    )
    return out


def jinfer_offline(cfg: dict) -> dict:
    from jinfer.buckets import choose_buckets
    from jinfer.compile import COMPILES
    from jinfer.sampling import SamplingParams

    prompts = cfg["prompts"]
    # Prefill buckets chosen for the workload's prompt lengths (exact DP, 6 buckets), as a user of
    # jinfer.choose_buckets would; the report also gives the powers-of-two padding for comparison.
    buckets, bucket_report = choose_buckets([len(p) for p in prompts], max_buckets=6)
    llm = jinfer_llm(cfg["system"], cfg["slots"], OFFLINE_MAX_LEN, buckets=buckets)
    t0 = time.perf_counter()
    llm.warmup()
    warmup_s = time.perf_counter() - t0
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in cfg["max_tokens"]]
    start = COMPILES.snapshot()
    walls, tokens = [], 0
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        walls.append(time.perf_counter() - t0)
        tokens = sum(len(o.token_ids) for o in outs)
    after = COMPILES.snapshot()
    out = offline_summary(walls, tokens, len(prompts))
    weights, kv, _ = jinfer_bytes(llm)
    out.update(
        slots=cfg["slots"],
        warmup_s=warmup_s,
        compile_s=llm.stats.compile_time,
        compiles=llm.stats.compiles,
        compiles_after_warmup=after[0] - start[0],
        compile_s_after_warmup=after[1] - start[1],
        padding_efficiency=llm.stats.padding_efficiency,
        prefill_buckets=list(buckets),
        bucket_report=str(bucket_report),
        weight_bytes=weights,
        kv_bytes=kv,
        first_output_ids=outs[0].token_ids[:16],
    )
    return out


# -- HF transformers worker --------------------------------------------------------------------------
def hf_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(
        str(GGUF.parent), gguf_file=GGUF.name, torch_dtype=torch.float32
    )
    model.eval()
    if HF_TOKENIZER.is_dir():
        tok = AutoTokenizer.from_pretrained(str(HF_TOKENIZER))
    else:  # the GGUF carries the same tokenizer
        tok = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def hf_batch1(cfg: dict) -> dict:
    import torch

    t0 = time.perf_counter()
    model, _ = hf_model()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([cfg["batch1_prompt"]])
    mask = torch.ones_like(ids)
    common = dict(attention_mask=mask, do_sample=False, pad_token_id=EOS_ID, eos_token_id=EOS_ID)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, **common)  # warm-up
        ttfts, totals, produced = [], [], 0
        for _ in range(cfg["repeats"]):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, **common)
            ttfts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.generate(
                ids, max_new_tokens=BATCH1_NEW_TOKENS, min_new_tokens=BATCH1_NEW_TOKENS, **common
            )
            totals.append(time.perf_counter() - t0)
            produced = out.shape[1] - ids.shape[1]
    res = batch1_summary(ttfts, totals, produced)
    res["load_s"] = load_s
    res["torch_threads"] = torch.get_num_threads()
    return res


def hf_offline(cfg: dict) -> dict:
    import torch

    model, tok = hf_model()
    prompts, max_tokens = cfg["prompts"], cfg["max_tokens"]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    walls, tokens, generated = [], 0, 0
    with torch.inference_mode():
        for _ in range(cfg["repeats"]):
            tokens = generated = 0
            t0 = time.perf_counter()
            for start in range(0, len(order), HF_BATCH):
                group = order[start : start + HF_BATCH]
                batch = tok.pad({"input_ids": [prompts[i] for i in group]}, return_tensors="pt")
                limit = max(max_tokens[i] for i in group)  # one max_new_tokens per generate() call
                out = model.generate(
                    **batch,
                    max_new_tokens=limit,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=EOS_ID,
                )
                new = out[:, batch["input_ids"].shape[1] :].tolist()
                for i, row in zip(group, new, strict=True):
                    generated += len(row)
                    row = row[: max_tokens[i]]  # what the user keeps: own max_tokens, up to EOS
                    tokens += row.index(EOS_ID) + 1 if EOS_ID in row else len(row)
            walls.append(time.perf_counter() - t0)
    res = offline_summary(walls, tokens, len(prompts))
    res.update(batch_size=HF_BATCH, generated_incl_padding_rows=generated)
    return res


# -- llama.cpp worker -----------------------------------------------------------------------------
def llama_model():
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(GGUF), n_ctx=OFFLINE_MAX_LEN + 16, n_threads=2, n_batch=512, verbose=False
    )


def llama_tokens(llm, prompt: list[int], limit: int, stop_at_eos: bool, reset: bool):
    """Yields up to `limit` greedy tokens (Llama.generate never stops by itself: EOS is ours)."""
    if reset:
        llm.reset()  # no prefix reuse from the previous call (cold prefill for TTFT)
    for n, token in enumerate(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)):
        yield token
        if n + 1 >= limit or (stop_at_eos and token == EOS_ID):
            return


def llama_batch1(cfg: dict) -> dict:
    t0 = time.perf_counter()
    llm = llama_model()
    load_s = time.perf_counter() - t0
    prompt = cfg["batch1_prompt"]
    list(llama_tokens(llm, prompt, 8, False, True))  # warm-up
    ttfts, totals, produced = [], [], 0
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        first, n = None, 0
        for _tok in llama_tokens(llm, prompt, BATCH1_NEW_TOKENS, False, True):
            if first is None:
                first = time.perf_counter() - t0
            n += 1
        totals.append(time.perf_counter() - t0)
        ttfts.append(first)
        produced = n
    res = batch1_summary(ttfts, totals, produced)
    res.update(load_s=load_s, n_threads=2)
    return res


def llama_offline(cfg: dict) -> dict:
    llm = llama_model()
    prompts, max_tokens = cfg["prompts"], cfg["max_tokens"]
    walls, tokens = [], 0
    for _ in range(cfg["repeats"]):
        tokens = 0
        t0 = time.perf_counter()
        for p, m in zip(prompts, max_tokens, strict=True):
            # As a user calling it in a loop: llama-cpp-python reuses a shared prompt prefix.
            tokens += sum(1 for _ in llama_tokens(llm, p, m, True, False))
        walls.append(time.perf_counter() - t0)
    return offline_summary(walls, tokens, len(prompts))


def bandwidth_worker(cfg: dict) -> dict:
    """Bytes/s XLA reads reducing a 512 MB f32 array (median of 7); the decode roofline."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((512 * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda a: a.sum())
    f(x).block_until_ready()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"bandwidth_bytes_per_s": x.nbytes / med(times), "bytes": x.nbytes}


WORKERS = {
    ("jinfer", "batch1"): jinfer_batch1,
    ("jinfer", "offline"): jinfer_offline,
    ("hf", "batch1"): hf_batch1,
    ("hf", "offline"): hf_offline,
    ("llama.cpp", "batch1"): llama_batch1,
    ("llama.cpp", "offline"): llama_offline,
    ("bandwidth", "bandwidth"): bandwidth_worker,
}


def jinfer_commit() -> str:
    """HEAD of the repository holding this script, with '+dirty' when jinfer/ has local changes."""
    repo = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(repo)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    head = head.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "jinfer"], capture_output=True, text=True).stdout
    return head + ("+dirty" if dirty.strip() else "")


def run_worker(cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    family = "jinfer" if cfg["system"].startswith("jinfer") else cfg["system"]
    try:
        res = {"status": "ok", **WORKERS[(family, cfg["workload"])](cfg)}
    except Exception as e:
        # int8 is "n/a" until LLM(quantize="int8") exists; anything else is a real failure.
        import traceback

        res = {
            "status": "n/a" if cfg["system"] == "jinfer-int8" else "error",
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc()[-2000:],
        }
    res["peak_rss_mb"] = peak_rss_mb()
    res["jinfer_commit"] = jinfer_commit()  # the repo moves under long runs: record what ran
    Path(cfg["out"]).write_text(json.dumps(res))


# -- parent ---------------------------------------------------------------------------------------
def importable(system: str) -> str | None:
    """None when the system can run in this interpreter, else why not."""
    import importlib.util

    need = {"hf": ("torch", "transformers", "gguf", "accelerate"), "llama.cpp": ("llama_cpp",)}.get(
        system, ("jax",)
    )
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    return f"not importable: {', '.join(missing)}" if missing else None


def spawn(system: str, workload: str, cfg: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {**cfg, "system": system, "workload": workload, "out": os.path.join(tmp, "out.json")}
        cfg_path = os.path.join(tmp, "cfg.json")
        Path(cfg_path).write_text(json.dumps(cfg))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", cfg_path],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"timed out after {timeout:.0f} s"}
        if not os.path.exists(cfg["out"]):
            return {"status": "error", "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
        res = json.loads(Path(cfg["out"]).read_text())
        res["process_s"] = time.perf_counter() - t0
        return res


def cli_cold_warm(repeats: int, timeout: float) -> dict:
    """Process start -> first stdout byte of `jinfer generate` with default flags, empty vs
    populated cache dir. On a CPU-only machine the first command starts a keep-alive worker
    (the default) and the second is answered by it; the worker is stopped after each pair."""
    cmd = [
        sys.executable,
        "-m",
        "jinfer.cli",
        "--compilation-cache",
        "DIR",
        "generate",
        "Write one sentence about the sea.",
        "--max-tokens",
        "32",
        "--temperature",
        "0",
    ]
    unset = ("JINFER_COMPILATION_CACHE", "JINFER_KEEP_ALIVE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    runs: dict[str, list[dict]] = {"cold": [], "warm": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory(prefix="jka-") as run_dir:
            env["JINFER_RUNTIME_DIR"] = run_dir
            for kind in ("cold", "warm"):
                argv = [cache if a == "DIR" else a for a in cmd]
                t0 = time.perf_counter()
                proc = subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0
                )
                proc.stdout.read(1)
                first = time.perf_counter() - t0
                _, err = proc.communicate(timeout=timeout)
                runs[kind].append(
                    {
                        "first_output_s": first,
                        "total_s": time.perf_counter() - t0,
                        "rc": proc.returncode,
                        "stderr_tail": err.decode()[-300:] if proc.returncode else "",
                    }
                )
            subprocess.run([sys.executable, "-m", "jinfer.cli", "stop"], env=env, check=True)
    cold = med([r["first_output_s"] for r in runs["cold"]])
    warm = med([r["first_output_s"] for r in runs["warm"]])
    return {
        "cold_first_output_s": cold,
        "warm_first_output_s": warm,
        "ratio": cold / warm,
        "cold_total_s": med([r["total_s"] for r in runs["cold"]]),
        "warm_total_s": med([r["total_s"] for r in runs["warm"]]),
        "runs": runs,
    }


def machine_info() -> dict:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "?",
    )
    mem = next(
        ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gb": round(int(mem) / 2**20, 1),
        "python": sys.version.split()[0],
    }


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def add_mbu(row: dict, bandwidth: float | None) -> None:
    """Decode MBU = (weight + KV bytes read per step) / step time / measured bandwidth."""
    if row.get("status") != "ok" or "tpot_s" not in row or "weight_bytes" not in row or not bandwidth:
        return
    step_bytes = row["weight_bytes"] + row["kv_bytes"]
    row["bytes_per_step"] = step_bytes
    row["roofline_tokens_per_s"] = bandwidth / step_bytes
    row["mbu"] = step_bytes / row["tpot_s"] / bandwidth


def ratios(results: dict) -> dict:
    """jinfer rows over each peer: batch-1 decode tokens/s, TTFT (peer/jinfer) and offline tokens/s."""
    out = {}
    for j in (s for s in results if s.startswith("jinfer")):
        for peer in ("hf", "llama.cpp"):
            r = {}
            for wl, key in (
                ("batch1", "decode_tokens_per_s"),
                ("batch1", "e2e_tokens_per_s"),
                ("offline", "tokens_per_s"),
            ):
                a, b = results[j].get(wl, {}), results.get(peer, {}).get(wl, {})
                if a.get("status") == "ok" and b.get("status") == "ok":
                    r[f"{wl}_{key}"] = a[key] / b[key]
            a, b = results[j].get("batch1", {}), results.get(peer, {}).get("batch1", {})
            if a.get("status") == "ok" and b.get("status") == "ok":
                r["batch1_ttft_speedup"] = b["ttft_s"] / a["ttft_s"]
            if r:
                out[f"{j} / {peer}"] = r
    return out


def fmt(v, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def print_table(results: dict) -> None:
    head = (
        "system",
        "b1 dec tok/s",
        "b1 e2e tok/s",
        "TTFT ms",
        "TPOT ms",
        "b1 wall s",
        "MBU",
        "b1 RSS MB",
        "off tok/s",
        "off wall s",
        "off out tok",
        "off RSS MB",
        "compiles",
        "post-warm",
        "pad eff",
    )
    rows = []
    for sys_name, r in results.items():
        b, o = r.get("batch1", {}), r.get("offline", {})
        bo, oo = b.get("status") == "ok", o.get("status") == "ok"
        rows.append(
            (
                sys_name,
                fmt(b.get("decode_tokens_per_s")) if bo else b.get("status", "-"),
                fmt(b.get("e2e_tokens_per_s")) if bo else "",
                fmt(b["ttft_s"] * 1e3) if bo else "",
                fmt(b["tpot_s"] * 1e3, ".2f") if bo else "",
                fmt(b.get("wall_s"), ".2f") if bo else "",
                fmt(b.get("mbu"), ".2f") if bo and "mbu" in b else "",
                fmt(b.get("peak_rss_mb"), ".0f") if b else "",
                fmt(o.get("tokens_per_s")) if oo else o.get("status", "-"),
                fmt(o.get("wall_s"), ".1f") if oo else "",
                str(o.get("output_tokens", "")) if oo else "",
                fmt(o.get("peak_rss_mb"), ".0f") if o else "",
                (
                    f"{b.get('compiles', o.get('compiles'))}/"
                    f"{fmt(b.get('compile_s', o.get('compile_s')), '.1f')}s"
                    if "compiles" in b or "compiles" in o
                    else ""
                ),
                str(o.get("compiles_after_warmup", "")),
                fmt(o.get("padding_efficiency"), ".3f") if "padding_efficiency" in o else "",
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    for line in (head, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True)))


# -- --defaults mode: `jinfer.LLM(name)` with no other argument ---------------------------------------
DEFAULTS_SYSTEMS = ("jinfer", "hf", "llama.cpp")
DEFAULTS_WORKLOADS = ("batch1", "chat48", "offline", "cli")
CHAT_PROMPTS = 48
CHAT_SEED = 100  # sets CHAT_SEED, +1, ...: the first warms up; each timed run gets its own set
BATCH1_MESSAGES = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
TARGETS = {  # issue 15 acceptance: jinfer with defaults over each peer
    ("batch1", "hf"): 2.5,
    ("chat48", "hf"): 4.0,
    ("chat48", "llama.cpp"): 2.0,
    ("offline", "hf"): 4.0,
    ("offline", "llama.cpp"): 2.0,
}


def jinfer_default_llm():
    """`jinfer.LLM(name)` exactly as a user who sets nothing writes it, and its load seconds."""
    import jinfer

    t0 = time.perf_counter()
    llm = jinfer.LLM(MODEL_NAME)
    return llm, time.perf_counter() - t0


def warmup_compile(llm) -> float:
    """Seconds of `llm.warmup()`: every program the engine can run, compiled before timing."""
    t0 = time.perf_counter()
    llm.warmup()
    return time.perf_counter() - t0


def timed_generate(llm, prompts, params) -> tuple[float, int]:
    """(seconds, output tokens) of one plain generate() call."""
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t0, sum(len(o.token_ids) for o in outs)


def jinfer_defaults_batch1(cfg: dict) -> dict:
    from jinfer.compile import COMPILES
    from jinfer.sampling import SamplingParams

    llm, load_s = jinfer_default_llm()
    compile_s = warmup_compile(llm)
    params = SamplingParams(max_tokens=BATCH1_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    warmup_s, produced = timed_generate(llm, BATCH1_MESSAGES, params)
    start = COMPILES.snapshot()
    walls = [timed_generate(llm, BATCH1_MESSAGES, params)[0] for _ in range(cfg["repeats"])]
    after = COMPILES.snapshot()
    return {
        "produced_tokens": produced,
        "wall_s": med(walls),
        "e2e_tokens_per_s": produced / med(walls),
        "walls": walls,
        "load_s": load_s,
        "warmup_compile_s": compile_s,
        "warmup_s": warmup_s,
        "compiles_after_warmup": after[0] - start[0],
        "engine_choices": llm.engine_choices.as_dict(),
    }


def jinfer_defaults_chat48(cfg: dict) -> dict:
    from jinfer.compile import COMPILES
    from jinfer.sampling import SamplingParams

    llm, load_s = jinfer_default_llm()
    compile_s = warmup_compile(llm)

    def run(chat: list) -> tuple[float, int]:
        params = [SamplingParams(max_tokens=m, temperature=0.0) for _, m in chat]
        return timed_generate(llm, [messages for messages, _ in chat], params)

    warmup_s, _ = run(cfg["chat_sets"][0])
    start = COMPILES.snapshot()
    runs = [run(chat) for chat in cfg["chat_sets"][1:]]
    after = COMPILES.snapshot()
    return {
        **sets_summary(runs),
        "load_s": load_s,
        "warmup_compile_s": compile_s,
        "warmup_s": warmup_s,
        "compiles_after_warmup": after[0] - start[0],
        "engine_choices": llm.engine_choices.as_dict(),
    }


def sets_summary(runs: list[tuple[float, int]]) -> dict:
    """Median tokens/s over runs of (seconds, output tokens), one prompt set each."""
    return {
        "tokens_per_s": med([t / w for w, t in runs]),
        "wall_s": med([w for w, _ in runs]),
        "output_tokens": [t for _, t in runs],
        "runs": len(runs),
    }


def peer_chat48(cfg: dict) -> dict:
    """A peer's offline worker over the chat sets: the first warms up, the others are timed."""
    worker = WORKERS[(cfg["system"], "offline")]
    runs = []
    for i, (ids, max_tokens) in enumerate(cfg["chat_ids"]):
        r = worker({**cfg, "prompts": ids, "max_tokens": max_tokens, "repeats": 1})
        if i:
            runs.append((r["wall_s"], r["output_tokens"]))
    return sets_summary(runs)


WORKERS.update(
    {
        ("jinfer", "defaults_batch1"): jinfer_defaults_batch1,
        ("jinfer", "defaults_chat48"): jinfer_defaults_chat48,
        ("hf", "defaults_batch1"): hf_batch1,
        ("llama.cpp", "defaults_batch1"): llama_batch1,
        ("hf", "defaults_chat48"): peer_chat48,
        ("llama.cpp", "defaults_chat48"): peer_chat48,
        ("hf", "defaults_offline"): hf_offline,
        ("llama.cpp", "defaults_offline"): llama_offline,
    }
)

_SUMMARY = re.compile(
    r"(\d+) ok, (\d+) failed.*?(\d+) prompt \+ (\d+) output tokens in ([\d.]+)s .*?"
    r"([\d.]+) output tokens/s\), compile ([\d.]+)s",
    re.DOTALL,
)


def jinfer_defaults_offline(chat: list, repeats: int, timeout: float) -> dict:
    """`jinfer run-batch --input IN --output OUT` (default flags) in fresh processes."""
    env = {k: v for k, v in os.environ.items() if k != "JINFER_COMPILATION_CACHE"}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "in.jsonl"
        rows = (
            {"custom_id": f"r{i}", "messages": m, "max_tokens": n, "temperature": 0}
            for i, (m, n) in enumerate(chat)
        )
        inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for r in range(repeats):
            out = Path(tmp) / f"out{r}.jsonl"
            cache = str(Path(tmp) / "xla")  # fresh for this benchmark: the first run is cold
            cmd = [sys.executable, "-m", "jinfer.cli", "--compilation-cache", cache, "run-batch"]
            t0 = time.perf_counter()
            proc = subprocess.run(
                [*cmd, "--input", str(inp), "--output", str(out)],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
            )
            wall = time.perf_counter() - t0
            m = _SUMMARY.search(proc.stderr)
            if proc.returncode or m is None:
                return {"status": "error", "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
            ok, failed, _, tokens, run_s, tok_s, compile_s = m.groups()
            runs.append(
                {
                    "process_wall_s": wall,
                    "run_s": float(run_s),
                    "output_tokens": int(tokens),
                    "tokens_per_s": float(tok_s),
                    "compile_s": float(compile_s),
                    "ok": int(ok),
                    "failed": int(failed),
                }
            )
    timed = runs[1:] or runs  # the first run compiles (cold cache)
    return {
        "status": "ok",
        "tokens_per_s": med([r["tokens_per_s"] for r in timed]),
        "process_tokens_per_s": med([r["output_tokens"] / r["process_wall_s"] for r in timed]),
        "wall_s": med([r["process_wall_s"] for r in timed]),
        "cold_process_wall_s": runs[0]["process_wall_s"],
        "compile_s_after_warmup": med([r["compile_s"] for r in timed]),
        "prompts": len(chat),
        "runs": runs,
    }


def run_defaults(args) -> None:
    """--defaults: every jinfer row is `jinfer.LLM(name)` + one plain generate() (see the docstring)."""
    from jinfer import hub
    from jinfer.tokenizer import Tokenizer

    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)
    systems = [s for s in (args.systems or ",".join(DEFAULTS_SYSTEMS)).split(",") if s]
    workloads = [w for w in (args.workloads or ",".join(DEFAULTS_WORKLOADS)).split(",") if w]
    model_dir = hub.resolve_model(MODEL_NAME)
    tok = Tokenizer.from_dir(model_dir)
    n_chat = 8 if quick else CHAT_PROMPTS
    chat_sets = [build_prompts(n_chat, CHAT_SEED + i) for i in range(repeats + 1)]
    chat_ids = [([tok.encode_chat(m) for m, _ in c], [n for _, n in c]) for c in chat_sets]
    n_off = args.prompts or (16 if quick else 256)
    off_ids, off_max = encode_prompts(model_dir, n_off)
    base = {"repeats": repeats, "batch1_prompt": tok.encode_chat(BATCH1_MESSAGES)}
    cfgs = {
        "batch1": base,
        "chat48": {"chat_sets": chat_sets, "chat_ids": chat_ids},
        "offline": {"prompts": off_ids, "max_tokens": off_max, "repeats": repeats},
    }
    report = {"mode": "defaults", "machine": machine_info(), "uptime_start": uptime(), "args": vars(args)}
    print(f"# --defaults: {report['machine']}\n# load at start: {report['uptime_start']}", flush=True)
    results: dict[str, dict] = {s: {} for s in systems}
    for wl in (w for w in workloads if w != "cli"):
        for system in systems:
            print(f"# {system} {wl} ...", flush=True)
            why = importable("jinfer-f32" if system == "jinfer" else system)
            if why:
                results[system][wl] = {"status": "skipped", "error": why}
            elif system == "jinfer" and wl == "offline":
                chat = build_prompts(n_off)
                results[system][wl] = jinfer_defaults_offline(chat, repeats + 1, args.timeout)
            else:
                results[system][wl] = spawn(system, f"defaults_{wl}", cfgs[wl], args.timeout)
            r = results[system][wl]
            if r.get("status") != "ok":
                print(f"#   {r.get('status')}: {str(r.get('error', ''))[:300]}", flush=True)
    report["results"] = results
    if "cli" in workloads:
        print("# CLI cold vs warm compilation cache ...", flush=True)
        report["cli_compilation_cache"] = cli_cold_warm(repeats, args.timeout)
    report["ratios"] = defaults_ratios(results)
    report["uptime_end"] = uptime()
    print_defaults(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


def defaults_ratios(results: dict) -> dict:
    """jinfer over each peer per workload (batch1: end-to-end tokens/s; others: output tokens/s)."""
    key = {"batch1": "e2e_tokens_per_s", "chat48": "tokens_per_s", "offline": "tokens_per_s"}
    out = {}
    for wl, k in key.items():
        j = results.get("jinfer", {}).get(wl, {})
        for peer in ("hf", "llama.cpp"):
            p = results.get(peer, {}).get(wl, {})
            if j.get("status") == "ok" and p.get("status") == "ok":
                ratio = j[k] / p[k]
                target = TARGETS.get((wl, peer))
                out[f"{wl} jinfer/{peer}"] = {
                    "ratio": ratio,
                    "target": target,
                    "met": target is None or ratio >= target,
                }
    return out


def print_defaults(report: dict) -> None:
    key = {"batch1": "e2e_tokens_per_s", "chat48": "tokens_per_s", "offline": "tokens_per_s"}
    print("\nworkload  system      tok/s    wall s  compiles after warm-up")
    for system, by_wl in report["results"].items():
        for wl, r in by_wl.items():
            if r.get("status") != "ok":
                print(f"{wl:8}  {system:10}  {r.get('status')}")
                continue
            post = r.get("compiles_after_warmup", r.get("compile_s_after_warmup", ""))
            if wl == "offline" and system == "jinfer":
                post = f"compile {post:.2f} s in warm runs"
            print(f"{wl:8}  {system:10}  {r[key[wl]]:7.1f}  {r['wall_s']:7.2f}  {post}")
    for name, r in report["ratios"].items():
        target = (
            "" if r["target"] is None else f" (target >= {r['target']}x: {'met' if r['met'] else 'MISSED'})"
        )
        print(f"{name}: {r['ratio']:.2f}x{target}")
    if "cli_compilation_cache" in report:
        c = report["cli_compilation_cache"]
        print(
            f"CLI first output: cold {c['cold_first_output_s']:.2f} s, warm {c['warm_first_output_s']:.2f} s"
        )
    choices = next(
        (
            r.get("engine_choices")
            for r in report["results"].get("jinfer", {}).values()
            if r.get("engine_choices")
        ),
        None,
    )
    for name, c in (choices or {}).items():
        print(
            f"jinfer default backend={c}"
            if name == "backend"
            else f"jinfer default {name}={c['value']}: {c['reason']}"
        )
    print(f"# load at end: {report['uptime_end']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="32 offline prompts, 1 repeat, 1 CLI cold/warm pair")
    ap.add_argument(
        "--defaults", action="store_true", help="jinfer.LLM(name) with no other argument (see above)"
    )
    ap.add_argument(
        "--systems", default=None, help=f"comma list of {SYSTEMS} (--defaults: {DEFAULTS_SYSTEMS})"
    )
    ap.add_argument(
        "--workloads",
        default=None,
        help=f"comma list of batch1,offline,cli (--defaults: {','.join(DEFAULTS_WORKLOADS)})",
    )
    ap.add_argument("--prompts", type=int, default=None, help="offline prompts (default 256, quick 32)")
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed repetitions, median reported (default 3)"
    )
    ap.add_argument("--offline-repeats", type=int, default=None, help="repetitions of the offline run")
    ap.add_argument("--slots", default="32,64", help="jinfer decode slots to try offline (f32); best is used")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args()
    if args.worker:
        return run_worker(args.worker)
    if args.defaults:
        return run_defaults(args)
    args.systems = args.systems or ",".join(SYSTEMS)
    args.workloads = args.workloads or "batch1,offline,cli"

    from jinfer import hub

    n_prompts = args.prompts or (32 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 3)
    off_repeats = args.offline_repeats or repeats
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    model_dir = hub.resolve_model(MODEL_NAME)
    prompts, max_tokens = encode_prompts(model_dir, n_prompts)
    report = {
        "machine": machine_info(),
        "uptime_start": uptime(),
        "args": vars(args),
        "model_dir": str(model_dir),
        "gguf": str(GGUF),
        "offline_prompt_tokens": {
            "n": len(prompts),
            "min": min(map(len, prompts)),
            "max": max(map(len, prompts)),
            "mean": statistics.mean(map(len, prompts)),
            "max_tokens_sum": sum(max_tokens),
        },
    }
    print(f"# {report['machine']}\n# load at start: {report['uptime_start']}", flush=True)
    bw = spawn("bandwidth", "bandwidth", {}, args.timeout)
    bandwidth = bw.get("bandwidth_bytes_per_s")
    report["bandwidth"] = bw
    print(f"# XLA read bandwidth (sum over 512 MB): {fmt(bandwidth and bandwidth / 1e9)} GB/s", flush=True)
    base = {"repeats": repeats, "batch1_prompt": batch1_prompt(model_dir)}
    offline_cfg = {"prompts": prompts, "max_tokens": max_tokens, "repeats": off_repeats}
    results: dict[str, dict] = {}
    slot_sweep: dict[int, dict] = {}
    for system in systems:
        why = importable(system)
        results[system] = {}
        for wl in (w for w in ("batch1", "offline") if w in workloads):
            if why:
                results[system][wl] = {"status": "skipped", "error": why}
                continue
            if system.startswith("jinfer") and wl == "offline":
                slots = [int(s) for s in args.slots.split(",")]
                if system != "jinfer-f32" and slot_sweep:
                    slots = [max(slot_sweep, key=lambda s: slot_sweep[s].get("tokens_per_s", 0))]
                for s in slots:
                    print(f"# {system} offline, {s} slots ...", flush=True)
                    res = spawn(system, wl, {**offline_cfg, "slots": s}, args.timeout)
                    if system == "jinfer-f32":
                        slot_sweep[s] = res
                    if res.get("status") != "ok" or res["tokens_per_s"] >= results[system].get(wl, {}).get(
                        "tokens_per_s", -1
                    ):
                        results[system][wl] = res
                continue
            print(f"# {system} {wl} ...", flush=True)
            cfg = offline_cfg if wl == "offline" else base
            results[system][wl] = spawn(system, wl, {**cfg, "repeats": cfg["repeats"]}, args.timeout)
            add_mbu(results[system][wl], bandwidth)
            r = results[system][wl]
            if r.get("status") != "ok":
                print(f"#   {r.get('status')}: {r.get('error', '')[:300]}", flush=True)
    report["results"] = results
    report["jinfer_offline_slot_sweep"] = {
        s: {k: r.get(k) for k in ("tokens_per_s", "wall_s", "peak_rss_mb", "kv_bytes", "status", "error")}
        for s, r in slot_sweep.items()
    }
    report["ratios"] = ratios(results)
    if "cli" in workloads and not importable("jinfer-f32"):
        print("# CLI cold vs warm compilation cache ...", flush=True)
        report["cli_compilation_cache"] = cli_cold_warm(1 if args.quick else 3, args.timeout)
    report["uptime_end"] = uptime()
    print()
    print_table(results)
    for name, r in report["ratios"].items():
        print(f"{name}: " + ", ".join(f"{k}={v:.2f}x" for k, v in r.items()))
    if slot_sweep:
        print(
            "jinfer-f32 offline slot sweep: "
            + ", ".join(f"{s} slots {fmt(r.get('tokens_per_s'))} tok/s" for s, r in slot_sweep.items())
        )
    if "cli_compilation_cache" in report:
        c = report["cli_compilation_cache"]
        print(
            f"CLI first output: cold {c['cold_first_output_s']:.2f} s, "
            f"warm {c['warm_first_output_s']:.2f} s, "
            f"ratio {c['ratio']:.2f}x"
        )
    print(f"# load at end: {report['uptime_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
