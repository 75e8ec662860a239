"""Generation engine: correctness against recomputation, sharding, reproducibility, compile counts,
bad input. Tiny random-weight Llama configs."""

import dataclasses
import random

import jax
import numpy as np
import pytest

from jinfer import errors
from jinfer.compile import count_compiles
from jinfer.generate import GenerationConfig
from jinfer.llm import LLM
from jinfer.modeling import FlaxModel
from jinfer.sampling import SamplingParams
from jinfer.sharding import make_mesh
from jinfer.testing import perturbed_params, tiny_llama_config

CFG = tiny_llama_config(256, max_position_embeddings=512)
GEN = GenerationConfig(max_batch=4, max_len=96, prefill_buckets=(8, 16, 32), decode_steps=4, max_logprobs=3)


@pytest.fixture(scope="module")
def model():
    return FlaxModel.from_name("Llama", CFG)


@pytest.fixture(scope="module")
def params(model):
    return perturbed_params(model)


@pytest.fixture(scope="module")
def llm(model, params):
    return LLM.from_params(model, params, config=GEN)


_RECOMPUTE_LEN = 64


@jax.jit
def _full_forward_logits(params, tokens, n_valid):
    model = FlaxModel.from_name("Llama", CFG)
    idx = np.arange(_RECOMPUTE_LEN, dtype=np.int32)
    positions = jax.numpy.where(idx < n_valid, idx, -1)[None]
    hidden, _ = model.apply_fn()(params, tokens, positions, None)
    return model.apply_fn("logits")(params, hidden)[0]


def recompute_greedy(model, params, prompt, n):
    """Baseline: a full forward over the whole prefix for every new token (no cache), one shape."""
    ids = list(prompt)
    for _ in range(n):
        tokens = np.zeros((1, _RECOMPUTE_LEN), np.int32)
        tokens[0, : len(ids)] = ids
        logits = _full_forward_logits(params, tokens, len(ids))
        ids.append(int(np.argmax(logits[len(ids) - 1])))
    return ids[len(prompt) :]


def test_greedy_equals_recomputation_without_cache(llm, model, params):
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7], list(range(10, 30))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
    for prompt, out in zip(prompts, outs, strict=True):
        expected = recompute_greedy(model, params, prompt, 12)
        assert out.token_ids == expected
        assert out.finish_reason == "length"
        assert out.usage == {"prompt_tokens": len(prompt), "completion_tokens": 12}
    assert len(set(outs[0].token_ids)) > 1, "random weights should not produce one repeated token"


def test_prompt_longer_than_every_bucket_runs_in_chunks(llm, model, params):
    """The default config sets no prefill_chunk: a prompt longer than the largest bucket (32) is
    still accepted, prefilled in blocks, and decodes what a full recomputation gives, alone and
    beside a short prompt."""
    long = [(7 * i + 3) % 256 for i in range(50)]
    assert len(long) > GEN.prefill_buckets[-1] and GEN.prefill_chunk is None
    expected = recompute_greedy(model, params, long, 10)
    p = SamplingParams(max_tokens=10, temperature=0.0)
    assert llm.generate(long, p)[0].token_ids == expected
    together = llm.generate([[2, 7], long], p)
    assert together[1].token_ids == expected
    assert together[1].usage == {"prompt_tokens": 50, "completion_tokens": 10}
    longest = list(range(1, 96))  # max_len - 1 tokens: room for exactly one generated token
    assert len(llm.generate(longest, SamplingParams(max_tokens=1, temperature=0.0))[0].token_ids) == 1


@jax.jit
def _full_logprobs(params, ids):
    """Baseline: log p(ids[i + 1] | ids[: i + 1]) from one forward over all of ids [1, t]."""
    model = FlaxModel.from_name("Llama", CFG)
    positions = jax.numpy.arange(ids.shape[1], dtype=np.int32)[None]
    hidden, _ = model.apply_fn()(params, ids, positions, None)
    logp = jax.nn.log_softmax(model.apply_fn("logits")(params, hidden)[0], axis=-1)
    return jax.numpy.take_along_axis(logp[:-1], ids[0, 1:, None], axis=-1)[:, 0]


def test_score_longer_than_every_bucket_runs_in_chunks(llm, params):
    """Prompt + continuation longer than the largest bucket (32) are scored one 32-token chunk per
    call through a KV cache of their own: the log-probabilities equal one full forward's wherever
    the prompt ends (first, second or third chunk), and requests before and after are unchanged."""
    ids = [(11 * i + 5) % 256 for i in range(90)]
    full = np.asarray(_full_logprobs(params, np.asarray([ids], np.int32)))
    p = SamplingParams(max_tokens=6, temperature=0.0)
    before = [o.token_ids for o in llm.generate([[3, 1, 4], ids[:40]], p)]
    for split in (1, 30, 33, 70, 89):
        out = llm.score([ids[:split]], [ids[split:]])[0]
        assert out.token_ids == ids[split:]
        np.testing.assert_allclose(out.logprobs, full[split - 1 :], atol=2e-5)
    assert [o.token_ids for o in llm.generate([[3, 1, 4], ids[:40]], p)] == before
    with pytest.raises(errors.SequenceTooLongError, match=r"has 100 tokens but max_len is 96"):
        llm.score([list(range(1, 91))], [list(range(1, 11))])
    assert len(llm.score([[1, 2, 3]], [[4, 5]])[0].logprobs) == 2  # still serving


def test_sharded_greedy_equals_unsharded(llm, model, params):
    mesh = make_mesh("data=2,model=4")
    sharded = LLM.from_params(model, params, config=GEN, mesh=mesh)
    leaf = sharded.engine.params["layers"][0]["mlp"]["up"]
    assert (
        len({s.data.shape for s in leaf.addressable_shards}) == 1
        and leaf.addressable_shards[0].data.shape != leaf.shape
    )
    prompts = [[5, 6, 7, 8], [100, 101, 102, 103, 104, 105], [9] * 17]
    p = SamplingParams(max_tokens=10, temperature=0.0)
    assert [o.token_ids for o in sharded.generate(prompts, p)] == [
        o.token_ids for o in llm.generate(prompts, p)
    ]


def test_a_mesh_from_jax_make_mesh_runs_like_jinfers(llm, model, params, caplog):
    """jax.make_mesh gives Explicit axes (jax >= 0.7); jinfer runs on them as on its own Auto mesh
    (they failed at the first request inside JAX's tracing), and an axis no rule uses is named."""
    explicit = jax.make_mesh((2, 4), ("data", "model"))
    assert set(explicit.axis_types) == {jax.sharding.AxisType.Explicit}
    sharded = LLM.from_params(model, params, config=GEN, mesh=explicit)
    prompts = [[5, 6, 7, 8], [9] * 17]
    p = SamplingParams(max_tokens=6, temperature=0.0)
    assert [o.token_ids for o in sharded.generate(prompts, p)] == [
        o.token_ids for o in llm.generate(prompts, p)
    ]
    with caplog.at_level("WARNING", logger="jinfer.sharding"):
        typo = LLM.from_params(model, params, config=GEN, mesh="dta=2,model=4")
    assert "mesh axes ['dta']" in caplog.text and "used by no sharding rule" in caplog.text
    assert typo.generate(prompts[:1], p)[0].token_ids == llm.generate(prompts[:1], p)[0].token_ids
    with pytest.raises(errors.MeshError, match=r"mesh is a tuple; expected a jax\.sharding\.Mesh"):
        LLM.from_params(model, params, config=GEN, mesh=(2, 4))


def test_seeds_reproducible_and_distinct(llm):
    prompt = [11, 12, 13, 14]
    a = llm.generate(prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=123))[0].token_ids
    b = llm.generate(prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=123))[0].token_ids
    c = llm.generate(prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=124))[0].token_ids
    assert a == b
    assert a != c


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_bitwise_identical_alone_and_in_random_batches(model, params, weights):
    """The promise of batch_invariant=True, also with bfloat16 weight matrices under float32 compute
    (the CPU default where the CPU has bfloat16 matrix instructions): rounding activations to
    bfloat16 turns last-bit differences between matrix shapes into logprob and token differences,
    so only one decode shape keeps a request's bits (scripts/bench_companions.py measures both)."""
    if weights == "bfloat16":
        params = jax.tree.map(lambda x: x.astype("bfloat16") if x.ndim >= 2 else x, params)
    llm = LLM.from_params(model, params, config=dataclasses.replace(GEN, batch_invariant=True))
    target_prompt = [21, 22, 23, 24, 25, 26]
    target = SamplingParams(max_tokens=14, temperature=0.9, top_p=0.9, seed=7, logprobs=3)
    alone = llm.generate([target_prompt], target)[0]
    rng = random.Random(0)
    for trial in range(2):
        companions = []
        for _ in range(15):
            prompt = [rng.randrange(256) for _ in range(rng.randint(1, 30))]
            sp = SamplingParams(
                max_tokens=rng.randint(1, 20),
                temperature=rng.choice([0.0, 0.7, 1.2]),
                top_k=rng.choice([0, 5]),
                seed=rng.randrange(1000),
            )
            companions.append((prompt, sp))
        batch = [*companions, (target_prompt, target)]
        rng.shuffle(batch)
        outs = llm.generate([p for p, _ in batch], [s for _, s in batch])
        mine = outs[next(i for i, (_, s) in enumerate(batch) if s is target)]
        assert mine.token_ids == alone.token_ids, f"trial {trial}"
        assert mine.logprobs == alone.logprobs, f"trial {trial}: logprobs must be bitwise equal"


def test_n_samples_share_prefill_and_differ(llm):
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=10, temperature=1.0, seed=5, n=3))[0]
    assert len(out.outputs) == 3
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    again = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=10, temperature=1.0, seed=5, n=1))[0]
    assert again.outputs[0].token_ids == out.outputs[0].token_ids  # sample 0 is the n=1 sample
    assert out.usage["completion_tokens"] == 30


def test_stop_token_ids_and_logprobs(llm, model, params):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    greedy = recompute_greedy(model, params, prompt, 8)
    stop_at = greedy[4]
    out = llm.generate(
        prompt, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop_at,), logprobs=2)
    )[0]
    first = greedy.index(stop_at)
    assert out.token_ids == greedy[: first + 1]
    assert out.finish_reason == "stop"
    assert len(out.logprobs) == len(out.token_ids)
    for tok, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert tok in entry and entry[tok] == max(entry.values())  # greedy token is the top-1
        assert all(v <= 0 for v in entry.values())


def test_compile_count_bounded_and_zero_on_second_pass(model, params):
    cfg = GenerationConfig(max_batch=4, max_len=64, prefill_buckets=(8, 16, 32), decode_steps=4)
    llm = LLM.from_params(model, params, config=cfg)
    rng = random.Random(1)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(1, 32))] for _ in range(300)]
    sps = [
        SamplingParams(max_tokens=rng.randint(1, 24), temperature=rng.choice([0.0, 1.0]), seed=i)
        for i in range(300)
    ]
    with count_compiles() as first:
        outs = llm.generate(prompts, sps)
    # prefill per bucket (3) + decode per decode bucket (1, 2, 4) + first-token sampler + the
    # prefix cache's block save (the 32-token prompts fill a block); plus a small constant (4) for
    # host-side eager ops such as key derivation and cache creation.
    executables = len(cfg.prefill_buckets) + len(llm.engine.decode_buckets) + 2
    assert llm.stats.compiles <= executables
    assert first.count <= executables + 4, first.count
    assert all(len(o.token_ids) == s.max_tokens for o, s in zip(outs, sps, strict=True))
    with count_compiles() as second:
        again = llm.generate(prompts, sps)
    assert second.count == 0
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]


@pytest.mark.parametrize(
    "prompt,sp,error,match",
    [
        ([], SamplingParams(), errors.EmptyInputError, "empty"),
        (
            list(range(96)),
            SamplingParams(max_tokens=1),
            errors.SequenceTooLongError,
            "max_len is 96, so a prompt may have at most 95",
        ),
        (list(range(30)), SamplingParams(max_tokens=80), errors.SequenceTooLongError, "max_len"),
        ([1, 2, 256], SamplingParams(), errors.InvalidTokenError, "256"),
        ([1, -1], SamplingParams(), errors.InvalidTokenError, "-1"),
        ([1, 2], SamplingParams(n=5), errors.InvalidSamplingParamsError, "n=5"),
        ([1, 2], SamplingParams(logprobs=9), errors.InvalidSamplingParamsError, "logprobs=9"),
    ],
)
def test_bad_input_rejected_and_engine_keeps_serving(llm, prompt, sp, error, match):
    with pytest.raises(error, match=match):
        llm.generate([[1, 2, 3], prompt], sp)
    assert issubclass(error, ValueError)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert len(out.token_ids) == 3


def test_chunked_prefill_matches_single_prefill(model, params):
    one = LLM.from_params(
        model, params, config=GenerationConfig(max_batch=2, max_len=96, prefill_buckets=(8, 64))
    )
    chunked = LLM.from_params(
        model,
        params,
        config=GenerationConfig(max_batch=2, max_len=96, prefill_buckets=(8, 16), prefill_chunk=16),
    )
    prompt = list(range(40, 90))
    p = SamplingParams(max_tokens=8, temperature=0.0)
    assert chunked.generate(prompt, p)[0].token_ids == one.generate(prompt, p)[0].token_ids


def test_score_matches_generation_logprobs(llm):
    prompt = [3, 1, 4, 1, 5]
    out = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0, logprobs=0))[0]
    scored = llm.score([prompt], [out.token_ids])[0]
    generated_lp = [entry[t] for t, entry in zip(out.token_ids, out.logprobs, strict=True)]
    np.testing.assert_allclose(scored.logprobs, generated_lp, atol=2e-5)
    assert scored.total == pytest.approx(sum(scored.logprobs))


def test_score_groups_pairs_and_equals_each_alone(model, params):
    """Pairs of one bucket share a score call (an 8-slot engine scores up to 4 per call, at most
    256 tokens); each pair's log-probabilities are bitwise those of the pair scored alone (a lone
    pair runs padded to the same rows), in the caller's order, with a pair longer than every
    bucket among them. With batch_invariant every call has one row."""
    cfg = dataclasses.replace(GEN, max_batch=8)
    rng = random.Random(3)
    lengths = [3, 9, 5, 40, 12, 7, 30, 2, 16, 8, 6]
    prompts = [[rng.randrange(256) for _ in range(n)] for n in lengths]
    conts = [[rng.randrange(256) for _ in range(1 + i % 3)] for i in range(len(lengths))]
    for invariant in (False, True):
        llm8 = LLM.from_params(model, params, config=dataclasses.replace(cfg, batch_invariant=invariant))
        runner = llm8.engine
        totals = [len(p) + len(c) for p, c in zip(prompts, conts, strict=True)]
        groups = runner.score_groups(totals)
        assert sorted(i for g in groups for i in g) == list(range(len(totals)))
        for g in groups:  # one bucket per call: a pair never runs at a larger bucket than alone
            buckets = {min([b for b in GEN.prefill_buckets if b >= totals[i]], default=None) for i in g}
            assert len(buckets) == 1 and len(g) <= (runner.score_rows(*buckets) if None not in buckets else 1)
        assert max(map(len, groups)) == (1 if invariant else 4)
        together = llm8.score(prompts, conts)
        alone = [llm8.score([p], [c])[0] for p, c in zip(prompts, conts, strict=True)]
        for t, a, c in zip(together, alone, conts, strict=True):
            assert t.token_ids == c and len(t.logprobs) == len(c)
            assert t.logprobs == a.logprobs  # bitwise: a lone pair runs padded, at the same shape
        llm8.close()


def test_score_checks_every_pair_first_and_score_iter_goes_on(llm):
    """`score` raises for a bad pair, naming it, before scoring any; `score_iter` yields the error
    for that key and scores the others."""
    good = ([3, 1, 4], [1, 5])
    with pytest.raises(errors.InvalidTokenError, match=r"score pair 1 has token id 999"):
        llm.score([good[0], [2, 7]], [good[1], [999]])
    with pytest.raises(errors.InputError, match=r"continuation 0 is float; expected a string or a list"):
        llm.score([[2]], [1.5])
    with pytest.raises(errors.EmptyInputError, match=r"score pair 2 needs a non-empty prompt"):
        llm.score([[1], [2], [3]], [[4], [5], []])
    items = [("a", *good), ("b", [2, 7], [999]), ("c", [], [5]), ("d", [6, 6], [7])]
    got = dict(llm.score_iter(iter(items), window=3))
    assert isinstance(got["b"], errors.InvalidTokenError) and isinstance(got["c"], errors.InputError)
    assert got["a"].logprobs == llm.score([good[0]], [good[1]])[0].logprobs
    assert got["d"].token_ids == [7] and len(got["d"].logprobs) == 1


def test_bitwise_identical_next_to_long_companions(model, params):
    """A short request's output does not change when companions fill far more of the cache."""
    DECODE_BLOCK = 128  # the companions reach the second block, the short request does not
    cfg = GenerationConfig(
        max_batch=4,
        max_len=3 * DECODE_BLOCK,
        prefill_buckets=(8, 32, 256),
        decode_steps=4,
        cache_block=DECODE_BLOCK,
        batch_invariant=True,
    )
    llm = LLM.from_params(model, params, config=cfg)
    target = ([5, 4, 3, 2, 1], SamplingParams(max_tokens=12, temperature=0.8, seed=11, logprobs=2))
    alone = llm.generate([target[0]], target[1])[0]
    long_prompts = [[(7 * i + j) % 256 for j in range(DECODE_BLOCK + 60 + i)] for i in range(3)]
    p_long = SamplingParams(max_tokens=20, temperature=0.0)
    outs = llm.generate([long_prompts[0], target[0], *long_prompts[1:]], [p_long, target[1], p_long, p_long])
    assert outs[1].token_ids == alone.token_ids
    assert outs[1].logprobs == alone.logprobs


def test_zero_compilations_after_warmup(model, params):
    cfg = GenerationConfig(max_batch=2, max_len=64, prefill_buckets=(8, 32), decode_steps=4)
    llm = LLM.from_params(model, params, config=cfg)
    llm.warmup()
    sps = [SamplingParams(max_tokens=6, temperature=0), SamplingParams(max_tokens=9, temperature=1, seed=1)]
    with count_compiles() as c:
        llm.generate([[1, 2, 3], list(range(20))], sps)
    assert c.count == 0
    with count_compiles() as c:  # score's programs compile on first use ...
        llm.score([[1, 2, 3]], [[4, 5]])
    assert c.count >= 1
    scoring = LLM.from_params(model, params, config=cfg)
    scoring.warmup(score=True)  # ... or in the warm-up
    with count_compiles() as c:
        scoring.score([[1, 2, 3], list(range(20))], [[4, 5], list(range(30))])
        scoring.generate([[1, 2, 3]], sps[0])
    assert c.count == 0
