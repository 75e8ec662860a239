"""Reduced-precision quality on SmolLM2-135M-Instruct: int8 weight-only, and bfloat16 weight
matrices under float32 compute (the CPU default where the CPU has bfloat16 matrix instructions,
jinfer.precision): perplexity and top-1 next-token agreement against float32 on held-out text:
the paragraphs below (written for this benchmark) followed by the docstrings of a fixed list of
Python standard-library modules (real English prose that ships with every Python), up to
--tokens tokens.

    python scripts/bench_quant_quality.py [--model DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from jinfer import checkpoint, hub, quant
from jinfer.tokenizer import Tokenizer

HELD_OUT = """\
The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a tin of oil and a
cloth for the lens. For thirty years the routine had not changed, although the ships that passed
the point had grown larger and quieter, and most of them no longer needed the light at all.

A compiler translates a program written in one language into another, usually lower-level,
language. Modern compilers perform many optimisations: they remove dead code, hoist invariant
computations out of loops, and choose how values are laid out in memory so that the processor can
read them quickly. Just-in-time compilers do this work while the program runs.

In the spring the river rose over its banks and flooded the low meadows, leaving behind a layer of
dark silt. Farmers waited until the water receded before planting, knowing that the soil would be
richer for it. Children walked along the new shoreline collecting smooth stones and lost shoes.

To bake a simple loaf of bread, mix flour, water, salt and yeast, then knead the dough until it is
smooth and elastic. Let it rise in a warm place for about an hour, shape it, let it rise again, and
bake it in a hot oven until the crust is golden and the loaf sounds hollow when tapped underneath.

The committee met on Tuesday to review the budget for the coming year. After a long discussion
about the cost of repairs to the library roof, the members agreed to postpone the purchase of new
computers and to ask the city council for an additional grant to cover the difference.
"""


STDLIB_MODULES = (
    "argparse",
    "json",
    "logging",
    "collections",
    "functools",
    "itertools",
    "pathlib",
    "subprocess",
    "threading",
    "unittest",
    "dataclasses",
    "contextlib",
    "typing",
    "heapq",
)


def held_out_text() -> str:
    import importlib
    import inspect

    docs = [inspect.getdoc(importlib.import_module(m)) or "" for m in STDLIB_MODULES]
    return HELD_OUT + "\n\n".join(docs)


def next_token_logprobs(model, params, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log p(ids[i+1] | ids[:i+1]), argmax prediction at i) for one sequence."""
    fwd, logits_fn = model.apply_fn(), model.apply_fn("logits")

    @jax.jit
    def run(p, tokens):
        pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        logits = logits_fn(p, fwd(p, tokens, pos, None)[0])[0]
        logp = jax.nn.log_softmax(logits, axis=-1)
        target = tokens[0, 1:]
        return jnp.take_along_axis(logp[:-1], target[:, None], axis=-1)[:, 0], jnp.argmax(logits[:-1], -1)

    lp, pred = run(params, jnp.asarray(ids)[None])
    return np.asarray(lp), np.asarray(pred)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir (default: the SmolLM2 default model)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens to score")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    path = hub.resolve_model(args.model)
    model, params, _ = checkpoint.load_model_dir(path)
    qmodel = model.quantized("int8")
    qparams = jax.jit(lambda p: quant.quantize_params(p, model.float_logical_axes()))(params)
    bparams = jax.tree.map(lambda x, m: x.astype(jnp.bfloat16) if m else x, params, model.weight_matrices())
    ids = np.asarray(Tokenizer.from_dir(path).encode(held_out_text(), add_special_tokens=False), np.int32)
    ids = ids[: args.tokens + 1]
    lp_f, lp_q, lp_b, agree, agree_b = [], [], [], [], []
    for start in range(0, len(ids) - 1, args.chunk):
        chunk = ids[start : start + args.chunk + 1]
        if len(chunk) < 2:
            break
        f, pf = next_token_logprobs(model, params, chunk)
        q, pq = next_token_logprobs(qmodel, qparams, chunk)
        b, pb = next_token_logprobs(model, bparams, chunk)
        lp_f.append(f)
        lp_q.append(q)
        lp_b.append(b)
        agree.append(pf == pq)
        agree_b.append(pf == pb)
    lp_f, lp_q, lp_b, agree, agree_b = (np.concatenate(x) for x in (lp_f, lp_q, lp_b, agree, agree_b))
    ppl_f, ppl_q, ppl_b = (float(np.exp(-x.mean())) for x in (lp_f, lp_q, lp_b))
    result = {
        "tokens": int(lp_f.size),
        "perplexity_f32": round(ppl_f, 4),
        "perplexity_int8": round(ppl_q, 4),
        "perplexity_increase_pct": round(100 * (ppl_q / ppl_f - 1), 3),
        "top1_agreement_pct": round(100 * float(agree.mean()), 2),
        "perplexity_bf16_weights": round(ppl_b, 4),
        "perplexity_increase_bf16_weights_pct": round(100 * (ppl_b / ppl_f - 1), 3),
        "top1_agreement_bf16_weights_pct": round(100 * float(agree_b.mean()), 2),
        "weight_mb_f32": round(sum(x.nbytes for x in jax.tree.leaves(params)) / 1e6, 1),
        "weight_mb_int8": round(sum(x.nbytes for x in jax.tree.leaves(qparams)) / 1e6, 1),
        "weight_mb_bf16_weights": round(sum(x.nbytes for x in jax.tree.leaves(bparams)) / 1e6, 1),
    }
    for k, v in result.items():
        print(f"{k:<26} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
