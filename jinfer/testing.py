"""Tiny, fully local models for tests, examples and smoke runs (no downloads).

`make_tiny_llm_dir(path)` writes a complete jinfer model directory: a random-weight Llama-style
model, a byte-level BPE tokenizer trained on a small built-in corpus (multi-byte characters
included), a chat template and a generation config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Café, naïve, façade, über, smörgåsbord — accents everywhere.",
    "日本語のテキストと中文文本，还有한국어 문장.",
    "Emoji: 🙂 🚀 🌍 and symbols ∑ ∞ ≈ €.",
    "def add(a, b):\n    return a + b\n",
    "JAX compiles functions with XLA; jit, vmap and pmap transform them.",
] * 4

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer with <|endoftext|>, <|im_start|>, <|im_end|> special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


def tiny_llama_config(vocab_size: int, **overrides):
    from jinfer.models.llama import LlamaConfig

    base = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return dataclasses.replace(base, **overrides)


def tiny_gpt2_config(vocab_size: int = 128, **overrides):
    from jinfer.models.gpt2 import GPT2Config

    base = GPT2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        max_position_embeddings=64,
        intermediate_size=128,
    )
    return dataclasses.replace(base, **overrides)


def perturbed_params(model, seed: int = 0, scale: float = 0.15):
    """Random params with enough spread that greedy decoding is not one repeated token."""
    params = model.init_params(seed)
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [np.asarray(x) + rng.normal(0, scale, x.shape).astype(np.float32) for x in leaves]
    return jax.tree.unflatten(tree, leaves)


def make_tiny_llm_dir(path: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Writes a complete tiny chat model directory at `path` and returns it."""
    from jinfer.checkpoint import save_model_dir
    from jinfer.modeling import FlaxModel

    tok = train_tokenizer()
    vocab = tok.get_vocab_size()
    config = tiny_llama_config(vocab, **config_overrides)
    model = FlaxModel.from_name("Llama", config)
    params = perturbed_params(model, seed)
    eos = tok.token_to_id("<|im_end|>")
    extra = {
        "tokenizer.json": tok.to_str(),
        "tokenizer_config.json": {
            "chat_template": CHAT_TEMPLATE,
            "bos_token": None,
            "eos_token": "<|im_end|>",
        },
        "generation_config.json": {"eos_token_id": eos, "do_sample": False, "max_new_tokens": 16},
    }
    return save_model_dir(path, "Llama", config, params, extra_files=extra, overwrite=True)


def assert_outputs_close(a, b, atol: float) -> None:
    """Two lists of RequestOutputs agree: the same tokens and finish reasons, and logprob dicts
    with the same keys whose values differ by at most `atol`."""
    for x, y in zip(a, b, strict=True):
        for sa, sb in zip(x.outputs, y.outputs, strict=True):
            assert sa.token_ids == sb.token_ids
            assert sa.finish_reason == sb.finish_reason
            for da, db in zip(sa.logprobs, sb.logprobs, strict=True):
                assert da.keys() == db.keys()
                np.testing.assert_allclose(list(da.values()), list(db.values()), atol=atol)


def live_device_arrays() -> tuple[int, int]:
    """(count, bytes) of the device arrays alive now, after a garbage collection: what a closed
    engine must have given back."""
    import gc

    gc.collect()
    arrays = jax.live_arrays()
    return len(arrays), sum(a.nbytes for a in arrays)
