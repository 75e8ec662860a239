"""Engine defaults derived from the model: cache length per slot and prefill buckets.

`LLM(model)` with no `max_len` uses the model's context length (`max_position_embeddings`), capped
by two budgets:

- the KV cache of all slots together stays within `KV_CACHE_BUDGET_BYTES` (512 MiB):
  `max_batch * max_len * layers * 2 (k and v) * kv_heads * head_dim * bytes per element`;
- one slot holds at most `MAX_LEN_CAP` (2,048) tokens: a one-slot engine's decode step reads the
  whole slot, so a longer default would slow every token of short chats.

The result is rounded down to a power of two (when the cap binds) and never falls below
min(context, 256) tokens, so a default never raises. SmolLM2-135M (8,192 positions, 30 layers,
3 kv heads of 64, float32) gets 1,024 with 8 slots and 2,048 with one; a 512-position model
gets 512. Pass `max_len=` to choose yourself (a value above the context length is an error).
"""

from __future__ import annotations

from typing import Any

KV_CACHE_BUDGET_BYTES = 512 * 2**20
MAX_LEN_CAP = 2048
MIN_DEFAULT_LEN = 256
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)


def model_context_length(config: Any) -> int | None:
    """The model's maximum positions, or None when its config does not say."""
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if n else None


def kv_bytes_per_token(config: Any, cache_bytes: int) -> int:
    """KV-cache bytes one token takes in one slot (all layers, keys and values)."""
    heads = getattr(config, "num_kv_heads", None) or getattr(config, "num_heads", 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_heads
    return int(config.num_layers) * 2 * int(heads) * int(head_dim) * int(cache_bytes)


def default_max_len(config: Any, max_batch: int, cache_bytes: int = 4) -> int:
    """Tokens per slot when the caller gives no max_len (see the module docstring)."""
    context = model_context_length(config)
    try:
        per_token = kv_bytes_per_token(config, cache_bytes)
    except (AttributeError, TypeError, ZeroDivisionError):
        per_token = 0
    budget = KV_CACHE_BUDGET_BYTES // max(1, per_token * max(1, max_batch)) if per_token else MAX_LEN_CAP
    cap = min(MAX_LEN_CAP, budget)
    if context is not None and context <= cap:
        return max(2, context)
    cap = 1 << max(1, cap.bit_length() - 1)  # round down to a power of two
    floor = MIN_DEFAULT_LEN if context is None else min(context, MIN_DEFAULT_LEN)
    return max(2, cap, floor)


def default_prefill_buckets(max_len: int) -> tuple[int, ...]:
    """Prompt-length buckets 16, 32, ... 512 that fit in max_len (max_len itself when none does)."""
    return tuple(b for b in PREFILL_BUCKETS if b <= max_len) or (max_len,)


def cache_itemsize(params: Any, cache_dtype: str | None = None) -> int:
    """Bytes per KV-cache element: `cache_dtype`'s, else the params' widest floating dtype's."""
    import jax
    import numpy as np

    if cache_dtype:
        return int(np.dtype(cache_dtype).itemsize) if cache_dtype != "bfloat16" else 2
    sizes = [
        np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(params)
        if hasattr(x, "dtype") and jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
    ]
    return max(sizes, default=4)
