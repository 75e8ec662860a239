"""XLA:CPU matrix-vector products by weight dtype and row count: the kernels a decode step runs.

For SmolLM2-135M's matrix shapes (576x1536, 1536x576 and the 576x49152 output head), times a
jitted `x @ W` with float32 activations of 1, 2 and 8 rows against weights stored as float32
or bfloat16 (a bfloat16 x bfloat16 -> float32 product, as jinfer's bfloat16 weights run), in
the output-major layout jinfer's one-row decode uses ([out, in]). Medians of `--repeats` calls;
the weights of the small shapes stay in the CPU's caches, the head's do not on most CPUs.

    python scripts/bench_matvec.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = ((576, 1536), (1536, 576), (576, 49152))


def median_us(f, *args, repeats: int) -> float:
    f(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--rows", default="1,2,8")
    args = ap.parse_args()
    f32 = jax.jit(lambda x, w: jnp.einsum("bk,nk->bn", x, w))
    bf16 = jax.jit(
        lambda x, w: jnp.einsum("bk,nk->bn", x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)
    )
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    print("in x out, rows: float32 weights | bfloat16 weights (us; GB/s of weight bytes)")
    rng = np.random.default_rng(0)
    for k, n in SHAPES:
        w32 = jnp.asarray(rng.standard_normal((n, k), dtype=np.float32))
        w16 = w32.astype(jnp.bfloat16)
        for rows in (int(r) for r in args.rows.split(",")):
            x = jnp.ones((rows, k), jnp.float32)
            a = median_us(f32, x, w32, repeats=args.repeats)
            b = median_us(bf16, x, w16, repeats=args.repeats)
            print(
                f"{k}x{n}, {rows} row(s): {a:8.0f} us ({w32.nbytes / a / 1e3:5.1f} GB/s) | "
                f"{b:8.0f} us ({w16.nbytes / b / 1e3:5.1f} GB/s)"
            )


if __name__ == "__main__":
    main()
