"""Decode attention over the blocked KV cache: today's layout against one array per block (issue 15).

Today each layer's keys are one array [blocks, rows, kv_heads, head_dim, block] and decode loops over
the blocks reached with a runtime index (`layers.blocked_attention`); XLA:CPU copies every block it
reads before the YNNPACK fusion that uses it. The candidate keeps each block a separate array (a
tuple per layer) and visits the blocks statically, each under `lax.cond(block < reached)`, so a
block is a whole buffer the fusion reads in place. Same math, same order: the results are bitwise
equal (printed). SmolLM2-135M's attention shapes (3 kv heads of 64, 9 query heads, 64-position
blocks, 16 blocks), `--rows` decode rows, 30 layers chained in one program; medians of 15 calls,
best of 3 alternating rounds.

    python scripts/bench_attention_blocks.py --rows 32
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.models import layers

K, G, H, L, NB = 3, 3, 64, 64, 16


def tuple_attn(q, bk, bv, positions):
    b, t, n, h = q.shape
    kv_heads, block = bk[0].shape[1], bk[0].shape[-1]
    g = n // kv_heads
    q32 = (q * (1.0 / np.sqrt(h))).astype(jnp.float32).reshape(b, t, kv_heads, g, h)
    q32 = jnp.swapaxes(q32, 1, 2).reshape(b, kv_heads, t * g, h)
    reached = jnp.clip(jnp.max(positions) // block + 1, 1, len(bk))

    def visit(i, keys, values, carry):
        top, total, out = carry
        k_positions = jnp.broadcast_to(i * block + jnp.arange(block, dtype=positions.dtype), (b, block))
        mask = positions[:, :, None] >= k_positions[:, None, :]
        mask = jnp.broadcast_to(mask[:, None, :, None], (b, 1, t, g, block)).reshape(b, 1, t * g, block)
        scores = jnp.where(mask, layers._block_scores(q32, keys, True), layers.MASK_VALUE)
        new_top = jnp.maximum(top, scores.max(axis=-1, keepdims=True))
        rescale = jnp.exp(top - new_top)
        p = jnp.exp(scores - new_top)
        total = total * rescale + p.sum(axis=-1, keepdims=True)
        out = out * rescale + layers._block_values(p, values, True)
        return new_top, total, out

    carry = (
        jnp.full((*q32.shape[:3], 1), layers.MASK_VALUE, jnp.float32),
        jnp.zeros((*q32.shape[:3], 1), jnp.float32),
        jnp.zeros(q32.shape, jnp.float32),
    )
    for i in range(len(bk)):
        carry = jax.lax.cond(
            i < reached, lambda c, k=bk[i], v=bv[i], i=i: visit(i, k, v, c), lambda c: c, carry
        )
    _, total, out = carry
    out = (out / total).reshape(b, kv_heads, t, g, h)
    return jnp.swapaxes(out, 1, 2).reshape(b, t, n, h).astype(q.dtype)


def many(fn, n=30):
    def f(q, ck, cv, pos):
        acc = q
        for _ in range(n):
            acc = acc + fn(acc, ck, cv, pos)
        return acc

    return jax.jit(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--positions", default="100,250,400")
    args = ap.parse_args()
    b = args.rows
    rng = np.random.default_rng(0)
    ck = jnp.asarray(rng.normal(size=(NB, b, K, H, L)).astype(np.float32))
    cv = jnp.asarray(rng.normal(size=(NB, b, K, L, H)).astype(np.float32))
    tk, tv = tuple(ck[i] + 0 for i in range(NB)), tuple(cv[i] + 0 for i in range(NB))
    q = jnp.asarray(rng.normal(size=(b, 1, K * G, H)).astype(np.float32))
    cur = many(lambda q, ck, cv, pos: layers.blocked_attention(q, ck, cv, pos))
    tup = many(tuple_attn)
    for p in map(int, args.positions.split(",")):
        pos = jnp.full((b, 1), p, jnp.int32)
        same = bool(jnp.array_equal(cur(q, ck, cv, pos), tup(q, tk, tv, pos)))
        res: dict[str, list[float]] = {}
        for _ in range(3):
            for name, f, a in (("current", cur, (ck, cv)), ("tuple", tup, (tk, tv))):
                ts = []
                for _ in range(15):
                    t0 = time.perf_counter()
                    f(q, *a, pos).block_until_ready()
                    ts.append(time.perf_counter() - t0)
                res.setdefault(name, []).append(float(np.median(ts)) * 1e3)
        a, t = min(res["current"]), min(res["tuple"])
        print(
            f"position {p}: one array {a:.2f} ms, array per block {t:.2f} ms ({a / t:.2f}x), "
            f"bitwise equal: {same}",
            flush=True,
        )


if __name__ == "__main__":
    main()
