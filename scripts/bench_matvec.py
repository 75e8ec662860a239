"""XLA:CPU matrix products by weight dtype, layout and row count: the kernels a decode step runs.

Default mode: for SmolLM2-135M's matrix shapes (576x1536, 1536x576 and the 576x49152 output
head), times a jitted `x @ W` with float32 activations of 1, 2 and 8 rows against weights stored
as float32 or bfloat16 (a bfloat16 x bfloat16 -> float32 product, as jinfer's bfloat16 weights
run), in the output-major layout ([out, in]). Medians of `--repeats` calls; the weights of the
small shapes stay in the CPU's caches, the head's do not on most CPUs.

`--chain`: the products of a whole SmolLM2-135M decode step (30 layers of q, k, v, o, gate, up,
down, then the head: 269 MB of bfloat16 weights, more than the caches hold) in one program, by
jinfer's own `layers.linear` on bfloat16 weights under float32 compute, canonical ([in, out])
against output-major (`OutMajor`), at `--chain-rows` rows (one row runs as two rows,
`layers.two_rows`, in both), and float32 output-major weights at one row (the layout a one-slot
float32 engine runs). Medians of `--repeats` calls per layout, the layouts alternating.

`--kernel`: jinfer's own CPU kernel (`jinfer.cpu_kernels.bf16_matvec`, AVX512-BF16 through the
XLA FFI) against XLA:CPU's mixed product (`layers.out_major_matmul` traced without the kernel),
per product shape and for a whole decode step's products (the `--chain` program), at `--rows`
rows, the two alternating.

`--embed`: a decode call's embedding lookups (a loop of 8 steps, one row each) from SmolLM2's
bfloat16 49152x576 table, by a plain `jnp.take` against `layers.embed_lookup` (which ties the
table to the ids with an optimization barrier): XLA:CPU has no bfloat16 gather, so the plain take
widens the whole table to float32 and hoists that conversion out of the loop, once per call.

    python scripts/bench_matvec.py
    python scripts/bench_matvec.py --chain --repeats 15
    python scripts/bench_matvec.py --embed --repeats 30
    python scripts/bench_matvec.py --kernel --rows 1,2,4 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = ((576, 1536), (1536, 576), (576, 49152))
LAYERS = 30
LAYER_SHAPES = ((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576))
HEAD = (576, 49152)


def median_us(f, *args, repeats: int) -> float:
    f(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def products(repeats: int, rows_list: list[int]) -> None:
    f32 = jax.jit(lambda x, w: jnp.einsum("bk,nk->bn", x, w))
    bf16 = jax.jit(
        lambda x, w: jnp.einsum("bk,nk->bn", x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)
    )
    print("in x out, rows: float32 weights | bfloat16 weights (us; GB/s of weight bytes)")
    rng = np.random.default_rng(0)
    for k, n in SHAPES:
        w32 = jnp.asarray(rng.standard_normal((n, k), dtype=np.float32))
        w16 = w32.astype(jnp.bfloat16)
        for rows in rows_list:
            x = jnp.ones((rows, k), jnp.float32)
            a = median_us(f32, x, w32, repeats=repeats)
            b = median_us(bf16, x, w16, repeats=repeats)
            print(
                f"{k}x{n}, {rows} row(s): {a:8.0f} us ({w32.nbytes / a / 1e3:5.1f} GB/s) | "
                f"{b:8.0f} us ({w16.nbytes / b / 1e3:5.1f} GB/s)"
            )


def chain_weights(dtype, out_major: bool) -> list:
    from jinfer.models.weights import OutMajor

    rng = np.random.default_rng(0)
    out = []
    for k, n in [*LAYER_SHAPES * LAYERS, HEAD]:
        w = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32) * 0.05, dtype)
        out.append(OutMajor(jnp.asarray(w.T)) if out_major else w)
    return out


def chain_step(ws: list, x: jax.Array) -> jax.Array:
    """The step's products in order, with a cheap elementwise stand-in for the rest of a layer."""
    from jinfer.models.layers import linear

    def mm(h, w):
        return linear("bd,dk->bk", h, w)

    h = x
    for i in range(0, len(ws) - 1, len(LAYER_SHAPES)):
        q, k, v, o, gate, up, down = ws[i : i + len(LAYER_SHAPES)]
        attn = mm(mm(h, q) * 0.01 + h, o) + (mm(h, k).sum() + mm(h, v).sum()) * 1e-6
        h = h + attn
        h = h + mm(jax.nn.silu(mm(h, gate)) * mm(h, up), down) * 0.01
    return mm(h, ws[-1])


def chain(repeats: int, rows_list: list[int]) -> None:
    step = jax.jit(chain_step)
    cases = {
        "bfloat16 canonical": chain_weights(jnp.bfloat16, False),
        "bfloat16 out_major": chain_weights(jnp.bfloat16, True),
    }
    mb = sum(w.size * 2 for w in cases["bfloat16 canonical"]) / 1e6
    print(f"one decode step's products, {LAYERS} layers + head, {mb:.0f} MB of bfloat16 weights (ms)")
    print("rows | " + " | ".join(cases) + " | out_major speed-up")
    for rows in rows_list:
        x = jnp.ones((rows, HEAD[0]), jnp.float32) * 0.1
        runs: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(2):  # alternate the layouts: the machine's load moves
            for name, ws in cases.items():
                runs[name].append(median_us(step, ws, x, repeats=repeats) / 1e3)
        a, b = (min(runs[name]) for name in cases)
        print(f"{rows:4d} | {a:8.2f} | {b:8.2f} | {a / b:5.2f}x")
    del cases
    f32 = chain_weights(jnp.float32, True)
    x = jnp.ones((1, HEAD[0]), jnp.float32) * 0.1
    t = median_us(step, f32, x, repeats=repeats) / 1e3
    print(f"float32 out_major, 1 row: {t:.2f} ms ({2 * mb:.0f} MB)")


def kernel(repeats: int, rows_list: list[int]) -> None:
    from jinfer import cpu_kernels
    from jinfer.models.layers import out_major_matmul

    if not cpu_kernels.available():
        raise SystemExit(f"jinfer's CPU kernels are unavailable here: {cpu_kernels.unavailable_reason()}")
    xla = jax.jit(cpu_kernels.tracing_with(out_major_matmul, False))
    ffi = jax.jit(cpu_kernels.tracing_with(out_major_matmul, True))
    print("in x out, rows: XLA:CPU mixed product | jinfer kernel (us; GB/s of weight bytes) | speed-up")
    rng = np.random.default_rng(0)
    for k, n in sorted({*SHAPES, *LAYER_SHAPES}):
        w = jnp.asarray(rng.standard_normal((n, k), dtype=np.float32), jnp.bfloat16)
        for rows in rows_list:
            x = jnp.asarray(rng.standard_normal((rows, k), dtype=np.float32))
            a = min(median_us(xla, x, w, repeats=repeats) for _ in range(2))
            b = min(median_us(ffi, x, w, repeats=repeats) for _ in range(2))
            print(
                f"{k}x{n}, {rows} row(s): {a:8.0f} us ({w.nbytes / a / 1e3:5.1f} GB/s) | "
                f"{b:8.0f} us ({w.nbytes / b / 1e3:5.1f} GB/s) | {a / b:5.2f}x"
            )
    ws = chain_weights(jnp.bfloat16, True)
    steps = {
        "XLA:CPU": jax.jit(cpu_kernels.tracing_with(chain_step, False)),
        "jinfer kernel": jax.jit(cpu_kernels.tracing_with(chain_step, True)),
    }
    mb = sum(w.w.size * 2 for w in ws) / 1e6
    print(f"one decode step's products, {LAYERS} layers + head, {mb:.0f} MB of bfloat16 weights (ms)")
    print("rows | " + " | ".join(steps) + " | speed-up")
    for rows in rows_list:
        x = jnp.ones((rows, HEAD[0]), jnp.float32) * 0.1
        runs: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(3):  # alternating: the machine's load moves
            for name, step in steps.items():
                runs[name].append(median_us(step, ws, x, repeats=repeats) / 1e3)
        a, b = (statistics.median(runs[name]) for name in steps)
        print(f"{rows:4d} | {a:8.2f} | {b:8.2f} | {a / b:5.2f}x")


def embed(repeats: int) -> None:
    from jinfer.models import layers

    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((49152, 576), dtype=np.float32), jnp.bfloat16)
    ids = jnp.asarray([[7]], jnp.int32)

    def loop(lookup):
        def run(table, ids):
            def step(i, x):
                rows = lookup(table, (ids + i) % table.shape[0]).astype(jnp.float32)
                return x + rows[0, 0]

            return jax.lax.fori_loop(0, 8, step, jnp.zeros((576,), jnp.float32))

        return jax.jit(run)

    plain = loop(lambda t, i: jnp.take(t, i, axis=0))
    ours = loop(layers.embed_lookup)
    a = median_us(plain, table, ids, repeats=repeats)
    b = median_us(ours, table, ids, repeats=repeats)
    print(f"8 lookups, bfloat16 49152x576 table, in a loop: jnp.take {a:7.0f} us | embed_lookup {b:5.0f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--rows", default="1,2,8")
    ap.add_argument("--chain", action="store_true", help="a whole decode step's products by layout")
    ap.add_argument("--chain-rows", default="1,2,8,32,128,512")
    ap.add_argument("--embed", action="store_true", help="embedding lookups from a bfloat16 table in a loop")
    ap.add_argument("--kernel", action="store_true", help="jinfer's CPU kernel against XLA:CPU's product")
    args = ap.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    if args.embed:
        embed(args.repeats)
    elif args.kernel:
        kernel(args.repeats, [int(r) for r in args.rows.split(",")])
    elif args.chain:
        chain(args.repeats, [int(r) for r in args.chain_rows.split(",")])
    else:
        products(args.repeats, [int(r) for r in args.rows.split(",")])


if __name__ == "__main__":
    main()
