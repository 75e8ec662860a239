"""Engine.from_flax and restore_checkpoint on a ViT-S/16-sized Linen model (random weights), CPU.

(1) predict throughput: `Engine.from_flax(...).predict(images)` vs a hand-written `jax.jit` loop
    over batches of the same size (same model, same images; both already compiled). Target: the
    engine within 10 % of the loop.
(2) submit under Poisson arrivals at 3 rates (fractions of the measured batch-8 capacity), for
    several `max_queue_delay_ms`: p50/p99 latency (submit -> result) and achieved throughput.
(3) restore: `restore_checkpoint(select="params")` vs restoring the full train state (params +
    adam mu/nu + step) of the same CheckpointManager checkpoint. Target: >= 2x faster when the
    optimizer state is 2x the params. Bytes read are from /proc/self/io (read syscalls; the files
    are in the page cache after the save, so this measures decode + copy, not the disk).

Every timing is the median of `--repeats` runs in this process. Run:
`python scripts/bench_engine.py` (full ViT-S, 12 layers), `--quick` (2 layers, fewer requests).
Einsum-free model; letters in comments: b batch, n patches, d model dim.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jinfer
from jinfer.batcher import BatcherConfig


class Block(nn.Module):
    dim: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x):  # [b, n, d]
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(y, y)
        y = nn.gelu(nn.Dense(self.mlp)(nn.LayerNorm()(x)))
        return x + nn.Dense(self.dim)(y)


class ViT(nn.Module):
    """ViT-S/16: 16x16 patches, d=384, 12 layers, 6 heads, MLP 1536 (22M parameters)."""

    depth: int = 12
    dim: int = 384
    heads: int = 6
    mlp: int = 1536
    classes: int = 1000

    @nn.compact
    def __call__(self, images):  # [b, 224, 224, 3]
        x = nn.Conv(self.dim, (16, 16), strides=16, padding="VALID")(images)
        x = x.reshape(x.shape[0], -1, self.dim)  # [b, n, d]
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), x], axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
        for _ in range(self.depth):
            x = Block(self.dim, self.heads, self.mlp)(x)
        return nn.Dense(self.classes)(nn.LayerNorm()(x[:, 0]))


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_predict(model, variables, images, batch, repeats) -> tuple[float, float, jinfer.Engine]:
    """(engine images/s, jit-loop images/s, the engine) on the same images."""
    apply = jax.jit(model.apply)
    stacked = np.stack(images)

    def jit_loop():
        outs = [apply(variables, stacked[i : i + batch]) for i in range(0, len(stacked), batch)]
        return [np.asarray(o) for o in outs]

    engine = jinfer.Engine.from_flax(
        model, variables, example=images[0], buckets=jinfer.Buckets(batch_sizes=(1, 2, 4, batch), seq_lens=())
    )
    engine.warmup()
    jit_loop()  # compile
    np.testing.assert_allclose(
        np.stack(engine.predict(images)), np.concatenate(jit_loop()), rtol=2e-4, atol=2e-4
    )
    # Interleaved, so that a change in the machine's load hits both sides alike.
    loop_s, engine_s = [], []
    for _ in range(repeats):
        loop_s.append(_median_time(jit_loop, 1))
        engine_s.append(_median_time(lambda: engine.predict(images), 1))
    return len(images) / statistics.median(engine_s), len(images) / statistics.median(loop_s), engine


def bench_submit(model, variables, image, rate, delay_ms, n, seed) -> dict:
    engine = jinfer.Engine.from_flax(
        model,
        variables,
        example=image,
        buckets=jinfer.Buckets(batch_sizes=(1, 2, 4, 8), seq_lens=()),
        batcher_config=BatcherConfig(max_queue_delay_ms=delay_ms),
    )
    engine.warmup()  # compiles are cached by XLA's in-process cache after the first engine
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=n)
    latencies: list[float] = []
    lock = threading.Lock()
    done = threading.Event()

    def record(start):
        def callback(_):
            with lock:
                latencies.append(time.perf_counter() - start)
                if len(latencies) == n:
                    done.set()

        return callback

    t0 = time.perf_counter()
    next_at = t0
    for gap in gaps:
        next_at += gap
        time.sleep(max(0.0, next_at - time.perf_counter()))
        engine.submit(image).add_done_callback(record(time.perf_counter()))
    done.wait(600)
    elapsed = time.perf_counter() - t0
    engine.close()
    lat = np.asarray(latencies) * 1000
    return {
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "throughput": n / elapsed,
        "calls": engine.stats.calls,
    }


def bench_restore(variables, repeats) -> dict:
    import optax
    import orbax.checkpoint as ocp

    params = variables["params"]
    # After training, adam's mu/nu hold as many (incompressible) numbers as the params.
    rng = np.random.default_rng(0)
    opt_state = jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        optax.adam(1e-3).init(params),
    )
    tmp = tempfile.mkdtemp(prefix="jinfer-bench-restore-")
    try:
        with ocp.CheckpointManager(tmp + "/ckpt") as mngr:
            mngr.save(0, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state, "step": 0}))
            mngr.wait_until_finished()
        full_keys = ("params", "opt_state", "step")
        jinfer.restore_checkpoint(tmp + "/ckpt", select=full_keys)  # warm metadata paths once

        def rchar():
            with open("/proc/self/io") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("rchar"))

        r0 = rchar()
        jinfer.restore_checkpoint(tmp + "/ckpt", select="params")
        params_read, r0 = rchar() - r0, rchar()
        jinfer.restore_checkpoint(tmp + "/ckpt", select=full_keys)
        full_read = rchar() - r0
        params_s = _median_time(lambda: jinfer.restore_checkpoint(tmp + "/ckpt", select="params"), repeats)
        full_s = _median_time(lambda: jinfer.restore_checkpoint(tmp + "/ckpt", select=full_keys), repeats)
        # The fixed cost of any restore (find the step, read metadata, start TensorStore): one
        # 384-float array.
        fixed_s = _median_time(lambda: jinfer.restore_checkpoint(tmp + "/ckpt", select="params/cls"), repeats)
        with ocp.StandardCheckpointer() as ckptr:  # what the training code would do: everything
            orbax_s = _median_time(lambda: ckptr.restore(tmp + "/ckpt/0/default"), repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))  # noqa: E731
    return {
        "params_mb": nbytes(params) / 1e6,
        "opt_mb": nbytes(opt_state) / 1e6,
        "params_s": params_s,
        "full_s": full_s,
        "orbax_full_s": orbax_s,
        "fixed_s": fixed_s,
        "params_read_mb": params_read / 1e6,
        "full_read_mb": full_read / 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 layers, fewer images and requests")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--delays", default="2,20", help="max_queue_delay_ms values")
    args = p.parse_args()
    # One engine per submit setting: the persistent cache makes their compiles disk hits.
    cache = tempfile.mkdtemp(prefix="jinfer-bench-xla-")
    jinfer.enable_compilation_cache(cache)
    try:
        run(args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run(args: argparse.Namespace) -> None:
    depth = 2 if args.quick else 12
    n_images = 16 if args.quick else args.images
    n_requests = 16 if args.quick else args.requests
    model = ViT(depth=depth)
    images = list(np.random.default_rng(0).normal(size=(n_images, 224, 224, 3)).astype(np.float32))
    variables = jax.jit(model.init)(jax.random.key(0), images[0][None])
    n_params = sum(x.size for x in jax.tree.leaves(variables))
    print(f"ViT depth={depth} d=384 heads=6: {n_params / 1e6:.1f}M params; {jax.device_count()} device(s)")

    engine_ips, loop_ips, _ = bench_predict(model, variables, images, 8, args.repeats)
    print(
        f"[predict] {n_images} images, batch 8: engine {engine_ips:.2f} img/s, "
        f"jit loop {loop_ips:.2f} img/s, ratio {engine_ips / loop_ips:.3f} (target >= 0.90)"
    )

    print("[submit] Poisson arrivals; rate as a fraction of the batch-8 capacity")
    print("  rate(img/s)  delay_ms   p50_ms   p99_ms  throughput  device_calls")
    for fraction in (0.25, 0.5, 0.8):
        rate = fraction * loop_ips
        for delay in (float(d) for d in args.delays.split(",")):
            r = bench_submit(model, variables, images[0], rate, delay, n_requests, seed=int(fraction * 100))
            print(
                f"  {rate:10.2f}  {delay:8.0f}  {r['p50_ms']:7.0f}  {r['p99_ms']:7.0f}  "
                f"{r['throughput']:10.2f}  {r['calls']:12d}"
            )

    r = bench_restore(variables, args.repeats)
    print(
        f"[restore] params {r['params_mb']:.0f} MB, optimizer state {r['opt_mb']:.0f} MB: "
        f"params only {r['params_s']:.3f} s ({r['params_read_mb']:.0f} MB read), full train state "
        f"{r['full_s']:.3f} s ({r['full_read_mb']:.0f} MB read), plain Orbax full restore "
        f"{r['orbax_full_s']:.3f} s; speedup {r['full_s'] / r['params_s']:.2f}x (target >= 2x); "
        f"fixed cost (one 384-float array) {r['fixed_s']:.3f} s"
    )


if __name__ == "__main__":
    main()
