"""Bucketing benchmark: a stream of random-length requests through raw jax.jit vs jinfer's Engine.

(a) baseline: `jax.jit(forward)` called on each request's raw shape [1, t] (recompiles per length);
(b) Engine.predict per request: the same stream padded to sequence buckets (batch bucket 1);
(c) Engine.submit: the same stream through the real-time batcher (all batch buckets).
Engine times include compiling (warmup). Prints compile counts, wall times, ratios and padding
efficiency. Run: `python scripts/bench_bucketing.py --n 1000` (or `--quick`).

Model: a small NNX transformer encoder (2 layers, d=128, 4 heads, masked attention), so the cost
depends on length. Einsum letters: b batch, t query, s key, d model, h heads, k head dim, f mlp.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jinfer.batcher import BatcherConfig
from jinfer.buckets import Buckets, choose_buckets
from jinfer.compile import COMPILES, compiles_since
from jinfer.engine import Engine


@dataclasses.dataclass(frozen=True)
class TinyEncoderConfig:
    vocab_size: int = 1000
    dim: int = 128
    heads: int = 4
    mlp: int = 512
    layers: int = 2


class Block(nnx.Module):
    def __init__(self, cfg: TinyEncoderConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        k = cfg.dim // cfg.heads
        self.qkv = nnx.Param(init(rngs.params(), (3, cfg.dim, cfg.heads, k)))
        self.out = nnx.Param(init(rngs.params(), (cfg.heads, k, cfg.dim)))
        self.up = nnx.Param(init(rngs.params(), (cfg.dim, cfg.mlp)))
        self.down = nnx.Param(init(rngs.params(), (cfg.mlp, cfg.dim)))

    def __call__(self, x, mask):
        q, k, v = jnp.einsum("btd,ndhk->nbthk", _norm(x), self.qkv[...])
        scores = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
        scores = jnp.where(mask[:, None, None, :], scores, -1e9)
        attn = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(scores, axis=-1), v)
        x = x + jnp.einsum("bthk,hkd->btd", attn, self.out[...])
        return x + jnp.einsum("btf,fd->btd", jax.nn.gelu(_norm(x) @ self.up[...]), self.down[...])


def _norm(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


class TinyEncoder(nnx.Module):
    """tokens [b, t], mask [b, t] -> masked mean-pooled features [b, d]."""

    def __init__(self, cfg: TinyEncoderConfig, rngs: nnx.Rngs):
        self.embed = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (cfg.vocab_size, cfg.dim)))
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])

    def __call__(self, tokens, mask):
        x = self.embed[...][tokens]
        for block in self.blocks:
            x = block(x, mask)
        m = mask[..., None].astype(x.dtype)
        return (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def make_forward():
    """Pure forward + params: nnx.split once, nnx.merge inside the traced function."""
    graphdef, state = nnx.split(TinyEncoder(TinyEncoderConfig(), nnx.Rngs(0)))

    def forward(params, tokens, mask):
        return nnx.merge(graphdef, params)(tokens, mask)

    return forward, nnx.to_pure_dict(state)


def run_baseline(forward, params, requests):
    fn = jax.jit(forward)
    start, c0 = time.perf_counter(), COMPILES.snapshot()
    outs = [np.asarray(fn(params, x[None], np.ones((1, len(x)), bool))[0]) for x in requests]
    return time.perf_counter() - start, compiles_since(c0).count, outs


def run_engine_predict(forward, params, buckets, requests):
    jax.clear_caches()  # every run compiles from scratch (jax caches executables in memory)
    start, c0 = time.perf_counter(), COMPILES.snapshot()
    engine = Engine(forward, params, buckets=buckets)
    outs = [engine.predict([x])[0] for x in requests]
    return time.perf_counter() - start, compiles_since(c0).count, outs, engine.stats


def run_engine_submit(forward, params, buckets, requests):
    jax.clear_caches()
    start, c0 = time.perf_counter(), COMPILES.snapshot()
    engine = Engine(forward, params, buckets=buckets, batcher_config=BatcherConfig(2.0, len(requests) + 1))
    engine.warmup()
    futures = [engine.submit(x) for x in requests]
    outs = [f.result() for f in futures]
    engine.close()
    return time.perf_counter() - start, compiles_since(c0).count, outs, engine.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="number of requests")
    parser.add_argument("--quick", action="store_true", help="100 requests, one repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the bucketed runs (median)")
    parser.add_argument("--max-len", type=int, default=512)
    args = parser.parse_args()
    n, repeats = (100, 1) if args.quick else (args.n, args.repeats)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, args.max_len + 1, size=n)
    requests = [rng.integers(0, 1000, size=int(t)).astype(np.int32) for t in lengths]
    forward, params = make_forward()
    seq_lens = (*(b for b in (16, 32, 64, 128, 256, 512) if b < args.max_len), args.max_len)
    buckets = Buckets(batch_sizes=(1, 2, 4, 8), seq_lens=seq_lens)
    print(
        f"{n} requests, lengths 1..{args.max_len} ({len(set(lengths.tolist()))} distinct); "
        f"backend {jax.default_backend()}, {jax.device_count()} devices"
    )

    base_s, base_c, base_out = run_baseline(forward, params, requests)
    print(f"(a) raw jax.jit per shape:  {base_s:8.2f} s  compiles {base_c}")
    runs = [run_engine_predict(forward, params, buckets, requests) for _ in range(repeats)]
    pred_s = statistics.median(r[0] for r in runs)
    _, pred_c, pred_out, pred_stats = runs[0]
    print(
        f"(b) Engine.predict per req: {pred_s:8.2f} s  compiles {pred_c} (<= {len(seq_lens)} batch-1 "
        f"buckets)  padding efficiency {pred_stats.padding_efficiency:.3f}  "
        f"[median of {repeats}: {', '.join(f'{r[0]:.2f}' for r in runs)}]"
    )
    subs = [run_engine_submit(forward, params, buckets, requests) for _ in range(repeats)]
    sub_s = statistics.median(r[0] for r in subs)
    _, sub_c, sub_out, sub_stats = subs[0]
    print(
        f"(c) Engine.submit batched:  {sub_s:8.2f} s  compiles {sub_c} (<= {len(buckets)} buckets)  "
        f"calls {sub_stats.calls}  padding efficiency {sub_stats.padding_efficiency:.3f}"
    )
    print(f"speedup (a)/(b): {base_s / pred_s:.1f}x   (a)/(c): {base_s / sub_s:.1f}x")
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(base_out, pred_out, strict=True))
    err_c = max(float(np.max(np.abs(a - b))) for a, b in zip(base_out, sub_out, strict=True))
    print(f"max |a-b| {err:.2e}  max |a-c| {err_c:.2e}")
    chosen, report = choose_buckets(lengths, max_buckets=len(seq_lens))
    print(
        f"choose_buckets({len(seq_lens)}) for this stream: {chosen}  efficiency {report.efficiency:.3f} "
        f"vs powers of two {report.pow2_efficiency:.3f}"
    )


if __name__ == "__main__":
    main()
