"""Blocked attention of one cache row: multiply-reduce vs einsum contractions, by query count.

`layers.blocked_attention` contracts each cache block with a multiply-reduce for one decode token
(XLA:CPU's batched dots would copy the cache) and with einsums for a prefill chunk. This times
both forms on SmolLM2-135M's attention shapes (9 heads, 3 kv heads, head dim 64, 64-token blocks,
32 cache rows of 1024 positions), one layer, medians of 30 calls, and checks they agree.

    python scripts/bench_chunk_attention.py
"""

from __future__ import annotations

import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.models import layers

# (query tokens, first position) of prefill chunks; one decode token always takes the multiply-reduce
CASES = ((16, 64), (64, 64), (64, 512), (512, 512))


def _median_ms(fn, *args, repeats: int = 30) -> tuple[float, np.ndarray]:
    out = fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, np.asarray(out)


def main() -> None:
    rng = np.random.default_rng(0)
    blocks, rows, kv, h, block = 16, 32, 3, 64, 64
    cache_k = jnp.asarray(rng.standard_normal((blocks, rows, kv, h, block), np.float32))
    cache_v = jnp.asarray(rng.standard_normal((blocks, rows, kv, block, h), np.float32))
    row = jnp.array([5], jnp.int32)
    scores, values = layers._block_scores, layers._block_values
    print("| query tokens | first position | multiply-reduce ms | chosen ms | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|")
    for t, start in CASES:
        q = jnp.asarray(rng.standard_normal((1, t, 9, h), np.float32))
        positions = jnp.arange(start, start + t, dtype=jnp.int32)[None]
        results = []
        for reduce in (True, False):
            with (
                mock.patch.object(layers, "_block_scores", lambda q, k, o, r=reduce: scores(q, k, o or r)),
                mock.patch.object(layers, "_block_values", lambda p, v, o, r=reduce: values(p, v, o or r)),
            ):
                attend = jax.jit(lambda q, k, v, p, r: layers.blocked_attention(q, k, v, p, rows=r))
                results.append(_median_ms(attend, q, cache_k, cache_v, positions, row))
        (slow, a), (fast, b) = results
        print(f"| {t} | {start} | {slow:.2f} | {fast:.2f} | {slow / fast:.2f}x | {np.abs(a - b).max():.1e} |")


if __name__ == "__main__":
    main()
