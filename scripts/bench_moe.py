"""Mixture-of-experts decode speed on this machine: grouped-matmul dispatch vs computing every
expert, and vs a dense model with the same active parameters.

Three models, random weights, float32, one decode step (one new token per row, KV cache of
`--context` positions already filled) timed at 1 and 32 rows:

- moe-tiled:   jinfer.models.moe with dispatch="tiled" (the CPU default: only the chosen experts,
               fixed-size tiles of rows sorted by expert);
- moe-ragged:  dispatch="ragged" (only the chosen experts through jax.lax.ragged_dot, the TPU/GPU
               default; XLA:CPU expands it into a dense product);
- moe-dense:   the same weights with dispatch="dense" (every expert on every token: the baseline);
- dense:       a Llama with intermediate_size = top_k * moe_intermediate_size (the MoE's active
               parameters), same attention, embeddings and depth.

Default config: d=512, 8 layers, 8 experts of f=1024, top-2, vocab 8192 tied: ~111M parameters in
all, ~35M active per token. Reports median ms per step over --repeats and tokens/s = rows / step.

    python scripts/bench_moe.py [--repeats 20] [--context 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.kvcache import KVCache
from jinfer.modeling import FlaxModel
from jinfer.models.llama import LlamaConfig
from jinfer.models.moe import MoEConfig

MOE = MoEConfig(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=2048,
    moe_intermediate_size=1024,
    num_layers=8,
    num_heads=8,
    num_kv_heads=4,
    head_dim=64,
    num_experts=8,
    num_experts_per_tok=2,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
)


def dense_equivalent(c: MoEConfig) -> LlamaConfig:
    """A Llama whose MLP has the MoE's active parameters (top_k experts' worth)."""
    return LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.num_experts_per_tok * c.moe_intermediate_size,
        num_layers=c.num_layers,
        num_heads=c.num_heads,
        num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rope_theta=c.rope_theta,
        tie_word_embeddings=True,
        max_position_embeddings=c.max_position_embeddings,
    )


def random_params(model: FlaxModel, seed: int = 0):
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = 0.02 * rng.standard_normal(x.shape, dtype=np.float32)
        return jnp.asarray(noise + 1.0 if str(path[-1].key).endswith("norm") else noise)

    return jax.tree_util.tree_map_with_path(draw, model.abstract_params())


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def time_decode(model: FlaxModel, params, rows: int, context: int, repeats: int) -> float:
    """Median seconds of one decode step of `rows` rows at position `context`."""
    fwd, head = model.apply_fn(), model.apply_fn("logits")
    c = model.config

    @jax.jit
    def step(params, tokens, positions, cache):
        hidden, cache = fwd(params, tokens, positions, cache)
        return head(params, hidden).argmax(-1), cache

    cache = KVCache.zeros(c.num_layers, rows, context + 8, c.num_kv_heads, c.head_dim)
    rng = np.random.default_rng(rows)
    prompt = jnp.asarray(rng.integers(0, c.vocab_size, (rows, context), dtype=np.int32))
    positions = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (rows, context))
    tokens, cache = step(params, prompt, positions, cache)
    pos = jnp.full((rows, 1), context, jnp.int32)
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        out, _ = step(params, tokens[:, -1:], pos, cache)
        out.block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--rows", default="1,32")
    args = ap.parse_args()
    moe_model = FlaxModel.from_name("MoE", MOE)
    moe_params = random_params(moe_model)
    dense_model = FlaxModel.from_name("Llama", dense_equivalent(MOE))
    dense_params = random_params(dense_model)
    experts = count([layer["moe"] for layer in moe_params["layers"].values()])
    total = count(moe_params)
    active = total - experts + experts * MOE.num_experts_per_tok // MOE.num_experts
    print(
        f"moe: {total / 1e6:.1f}M params, {active / 1e6:.1f}M active; dense: {count(dense_params) / 1e6:.1f}M"
    )
    systems = {
        f"moe-{d}": (FlaxModel.from_name("MoE", dataclasses.replace(MOE, dispatch=d)), moe_params)
        for d in ("tiled", "ragged", "dense")
    }
    systems["dense"] = (dense_model, dense_params)
    results = {}
    for rows in (int(r) for r in args.rows.split(",")):
        for name, (model, params) in systems.items():
            seconds = time_decode(model, params, rows, args.context, args.repeats)
            results[f"{name}@{rows}"] = {"ms_per_step": seconds * 1e3, "tokens_per_s": rows / seconds}
            print(f"{name:12s} rows={rows:3d}  {seconds * 1e3:8.2f} ms/step  {rows / seconds:8.1f} tok/s")
        speedup = results[f"moe-dense@{rows}"]["ms_per_step"] / results[f"moe-tiled@{rows}"]["ms_per_step"]
        print(f"  rows={rows}: tiled / dense-all-experts speedup {speedup:.2f}x")
    print(json.dumps({"config": dataclasses.asdict(MOE), "results": results}, default=str))


if __name__ == "__main__":
    main()
