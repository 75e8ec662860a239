"""Decode-batch buckets: decode runs at the smallest compiled active-slot count that holds the live
requests (kept in the lowest slots), with the same tokens as the one-shape engine
(`batch_invariant=True`). Tiny random-weight Llama."""

import dataclasses
import random

import jax
import pytest

from jinfer.compile import count_compiles
from jinfer.errors import ConfigError
from jinfer.generate import GenerationConfig
from jinfer.llm import LLM
from jinfer.modeling import FlaxModel
from jinfer.sampling import SamplingParams
from jinfer.sharding import make_mesh
from jinfer.testing import assert_outputs_close, perturbed_params, tiny_llama_config

CFG = tiny_llama_config(256, max_position_embeddings=256)
GEN = GenerationConfig(
    max_batch=8,
    max_len=96,
    prefill_buckets=(8, 16, 32),
    decode_steps=3,
    max_logprobs=2,
    decode_buckets=(1, 2, 4, 8),
)
# Greedy tokens must match the one-shape engine exactly; logprobs may differ in the last bits
# (other matrix shapes sum in another order on XLA:CPU): this is the tolerance we state.
LOGPROB_ATOL = 1e-5
# With bfloat16 weights the products round activations to bfloat16 (see the bfloat16 test).
BF16_LOGPROB_ATOL = 2e-2


@pytest.fixture(scope="module")
def weights():
    model = FlaxModel.from_name("Llama", CFG)
    return model, perturbed_params(model)


def _llm(weights, **changes):
    return LLM.from_params(*weights, config=dataclasses.replace(GEN, **changes))


@pytest.fixture(scope="module")
def bucketed(weights):
    with _llm(weights) as llm:
        yield llm


@pytest.fixture(scope="module")
def one_shape(weights):
    with _llm(weights, batch_invariant=True) as llm:
        yield llm


def _workload(seed, count, greedy=True):
    rng = random.Random(seed)
    prompts, sps = [], []
    for i in range(count):
        prompts.append([rng.randrange(256) for _ in range(rng.randint(1, 32))])
        sps.append(
            SamplingParams(
                max_tokens=rng.randint(1, 30),
                temperature=0.0 if greedy else 0.9,
                seed=i,
                logprobs=1,
                n=rng.choice([1, 1, 1, 2]),
                stop_token_ids=rng.choice([(), (rng.randrange(256),)]),
            )
        )
    return prompts, sps


def _assert_close(a, b):
    assert_outputs_close(a, b, LOGPROB_ATOL)


def test_automatic_buckets():
    assert GEN.decode_batch_buckets() == (1, 2, 4, 8)  # GEN sets them: the tests exercise more moves
    auto = dataclasses.replace(GEN, decode_buckets=None)
    assert auto.decode_batch_buckets() == (1, 8)
    assert dataclasses.replace(auto, max_batch=64).decode_batch_buckets() == (1, 8, 16, 32, 64)
    assert dataclasses.replace(auto, max_batch=48).decode_batch_buckets() == (1, 8, 16, 32, 48)
    assert dataclasses.replace(auto, max_batch=6).decode_batch_buckets() == (1, 6)
    assert dataclasses.replace(auto, max_batch=1).decode_batch_buckets() == (1,)
    assert dataclasses.replace(auto, max_batch=64).decode_batch_buckets(multiple=2) == (2, 8, 16, 32, 64)
    assert dataclasses.replace(auto, max_batch=64).decode_batch_buckets(multiple=16) == (16, 32, 64)
    assert dataclasses.replace(GEN, batch_invariant=True).decode_batch_buckets() == (8,)
    assert dataclasses.replace(GEN, decode_buckets=(3, 1)).decode_batch_buckets() == (1, 3, 8)
    with pytest.raises(ConfigError, match="decode_buckets"):
        dataclasses.replace(GEN, decode_buckets=(16,))


def test_same_tokens_as_one_shape_engine(bucketed, one_shape):
    """Mixed lengths, n=2, stop tokens: requests finish at different rounds, the survivors move to
    lower slots and decode at smaller buckets; tokens equal the one-shape engine's."""
    prompts, sps = _workload(0, 12)
    prompts.append([3, 1, 4])  # a long one: decodes alone (bucket 1) at the end
    sps.append(SamplingParams(max_tokens=90, temperature=0.0, logprobs=1))
    before = bucketed.stats.summary()
    _assert_close(bucketed.generate(prompts, sps), one_shape.generate(prompts, sps))
    after = bucketed.stats.summary()
    rounds = after["decode_rounds_per_bucket"]
    assert {1, 8} <= set(rounds), rounds  # the tail of the run decodes at small buckets
    assert after["slot_moves"] > before["slot_moves"]
    assert one_shape.stats.summary()["decode_rounds_per_bucket"].keys() == {8}
    assert one_shape.stats.summary()["slot_moves"] == 0


def test_sampled_requests_reproducible_alone(bucketed, one_shape):
    """A sampled request alone runs at bucket 1 every time: the same tokens on every call."""
    prompt, sp = [5, 6, 7, 8], SamplingParams(max_tokens=20, temperature=1.0, seed=9, logprobs=1)
    first = bucketed.generate([prompt], sp)[0]
    rounds = dict(bucketed.stats.summary()["decode_rounds_per_bucket"])
    again = bucketed.generate([prompt], sp)[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert again.outputs[0].logprobs == first.outputs[0].logprobs
    new = bucketed.stats.summary()["decode_rounds_per_bucket"]
    assert new[1] > rounds.get(1, 0) and {k: v for k, v in new.items() if k != 1} == {
        k: v for k, v in rounds.items() if k != 1
    }
    _assert_close([first], one_shape.generate([prompt], sp))


def test_lone_request_decodes_in_bucket_one_after_others_leave(bucketed):
    """A long request admitted last (highest slot) moves to slot 0 when the short ones finish."""
    short = SamplingParams(max_tokens=2, temperature=0.0)
    long = SamplingParams(max_tokens=40, temperature=0.0)
    before = bucketed.stats.summary()
    outs = bucketed.generate([[1, 2, 3]] * 5 + [[9, 8, 7]], [short] * 5 + [long])
    assert [len(o.outputs[0].token_ids) for o in outs] == [2] * 5 + [40]
    after = bucketed.stats.summary()
    assert after["slot_moves"] > before["slot_moves"]
    assert after["decode_rounds_per_bucket"][1] - before["decode_rounds_per_bucket"].get(1, 0) >= 10
    assert outs[-1].outputs[0].token_ids == bucketed.generate([[9, 8, 7]], long)[0].outputs[0].token_ids


def test_compile_bound_and_zero_after_warmup(weights):
    llm = _llm(weights)
    compiled = llm.warmup()
    assert {k[1] for k in compiled if k[0] == "decode"} == set(GEN.decode_batch_buckets())
    # per chunk bucket: one-prompt, 4-prompt and continuation prefill (prompts longer than one
    # block run in chunks); decode per bucket; first token, slot copy, block save and load
    assert GEN.prefill_batch_rows() == 4
    assert {k[2] for k in compiled if k[0] == "prefill_rows"} == set(GEN.prefill_chunk_buckets)
    assert len(compiled) <= 3 * len(GEN.prefill_chunk_buckets) + len(GEN.decode_batch_buckets()) + 4
    prompts, sps = _workload(1, 40, greedy=False)
    with count_compiles() as c:
        outs = llm.generate(prompts, sps)
    assert c.count == 0
    assert all(len(o.outputs) == s.n for o, s in zip(outs, sps, strict=True))
    llm.close()


def test_buckets_on_a_data_parallel_mesh(weights, one_shape):
    """Slots split over data=2: automatic buckets are multiples of 2; tokens unchanged."""
    llm = LLM.from_params(
        *weights, config=dataclasses.replace(GEN, decode_buckets=None), mesh=make_mesh("data=2,model=4")
    )
    assert llm.engine.decode_buckets == (2, 8)
    assert llm.engine.one_row is None  # no bucket 1 (and several devices): no one-row copy
    prompts, sps = _workload(2, 10)
    _assert_close(llm.generate(prompts, sps), one_shape.generate(prompts, sps))
    assert set(llm.stats.summary()["decode_rounds_per_bucket"]) == {2, 8}
    llm.close()


def test_one_row_copy_decodes_bucket_one_on_output_major_weights(weights, bucketed, one_shape):
    """On CPU, layout "auto" adds an output-major copy of the weights for bucket-1 decode (faster
    matrix-vector products); prefill and larger buckets keep the canonical weights. An explicit
    layout, one decode shape, or a data-parallel mesh make no copy."""
    runner = bucketed.engine
    assert runner.one_row is not None and runner.one_row[0].transposed and not runner.model.transposed
    assert "out_major copy for decode bucket 1" in bucketed.engine_choices.layout.value
    # the matrices are new (transposed) arrays; other leaves (norm scales, ...) are shared
    leaves, row_leaves = jax.tree.leaves(runner.params), jax.tree.leaves(runner.one_row[1])
    shared = [a is b for a, b in zip(leaves, row_leaves, strict=True)]
    assert any(shared) and not all(shared)
    prompt, greedy = [7, 3, 9, 1], SamplingParams(max_tokens=40, temperature=0.0, logprobs=1)
    with _llm(weights, decode_buckets=None) as auto, _llm(weights, decode_buckets=None) as again:
        assert auto.engine.one_row is not None
        _assert_close(auto.generate([prompt], greedy), one_shape.generate([prompt], greedy))
        assert auto.stats.summary()["decode_rounds_per_bucket"] == {1: 13}  # 40 tokens: 1 + 13 rounds x 3
        # the same engine built again gives the same bits
        assert auto.generate([prompt], greedy)[0].outputs[0].logprobs == (
            again.generate([prompt], greedy)[0].outputs[0].logprobs
        )
    for kwargs in ({"layout": "canonical"}, {"layout": "out_major"}):
        with LLM.from_params(*weights, config=dataclasses.replace(GEN, decode_buckets=None), **kwargs) as llm:
            assert llm.engine.one_row is None
    assert one_shape.engine.one_row is None


@pytest.mark.parametrize("native", [True, False], ids=["bf16-cpu", "no-bf16-cpu"])
def test_bfloat16_weights_decode_the_same_tokens_in_every_bucket(weights, native, monkeypatch):
    """bfloat16 weight matrices under float32 compute (the CPU default where the CPU has bfloat16
    matrix instructions).

    `native` (a CPU with bfloat16 matrix instructions, whichever this host is): layout "auto" holds
    every weight output-major and bfloat16, for every bucket (one row runs as two rows,
    `layers.two_rows`), and makes no one-row copy. Otherwise bucket 1 runs a one-row copy whose
    weights are widened to float32 and whose products round their inputs to bfloat16, while the
    other buckets multiply bfloat16 directly.

    Tokens equal the one-shape engine's and the canonical layout's, logprobs within
    BF16_LOGPROB_ATOL: every product first rounds its float32 input to bfloat16, so where two
    matrix shapes sum in another order the last bit of an activation can move it to the
    neighbouring bfloat16 value (a 2^-9 relative step), and that difference propagates. Measured on
    this tiny model: up to 9.5e-4 apart between bucket 1 and the one-shape engine, 7.6e-3 for a
    one-slot engine (whose prefill multiplies the widened copy too); most positions bitwise equal
    or within 1e-6."""
    import jax.numpy as jnp

    from jinfer import precision, quant
    from jinfer.models.weights import OutMajor, Widened

    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: native)
    model, params = weights
    mixed = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x, params)
    prompts, sps = _workload(11, 12)
    sps[0] = SamplingParams(max_tokens=60, temperature=0.0, logprobs=1)  # a tail that runs alone

    def matrices(params):  # the rank >= 2 weights, as held (OutMajor unwrapped)
        typed = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, (OutMajor, Widened)))
        return [w.w if isinstance(w, OutMajor) else w for w in typed if not hasattr(w, "ndim") or w.ndim >= 2]

    with LLM.from_params(model, mixed, config=GEN) as a:
        if native:
            assert a.engine.one_row is None and a.model.transposed
            assert a.engine_choices.layout.value == "out_major"
            held = matrices(a.engine.params)
            assert held and all(isinstance(w, jax.Array) and w.dtype == jnp.bfloat16 for w in held)
            assert quant.has_narrow_weights(a.engine.params)
        else:
            _, row = a.engine.one_row
            widened = matrices(row)
            assert widened and all(isinstance(w, Widened) and w.w.dtype == jnp.float32 for w in widened)
            assert not a.model.transposed
        assert a.engine_choices.dtype.value == "bfloat16 weights, float32 compute"
        got = a.generate(prompts, sps)
        assert a.stats.decode_rounds.get(1, 0) > 0 and len(a.stats.decode_rounds) > 1  # a tail alone
    with LLM.from_params(model, mixed, config=dataclasses.replace(GEN, batch_invariant=True)) as b:
        assert_outputs_close(got, b.generate(prompts, sps), BF16_LOGPROB_ATOL)
    with LLM.from_params(model, mixed, config=GEN, layout="canonical") as canonical:
        assert not canonical.model.transposed and canonical.engine.one_row is None
        assert_outputs_close(got, canonical.generate(prompts, sps), BF16_LOGPROB_ATOL)
    # A one-slot engine holds all its weights output-major: narrow, or widened the same way.
    single = [i for i, sp in enumerate(sps) if sp.n == 1][:3]
    with LLM.from_params(
        model, mixed, config=dataclasses.replace(GEN, max_batch=1, decode_buckets=None)
    ) as c:
        kinds = {
            type(w.w).__name__
            for w in jax.tree.leaves(c.engine.params, is_leaf=lambda x: isinstance(x, OutMajor))
            if isinstance(w, OutMajor)
        }
        assert kinds == ({"ArrayImpl"} if native else {"Widened"})
        alone = c.generate([prompts[i] for i in single], [sps[i] for i in single])
        assert_outputs_close([got[i] for i in single], alone, BF16_LOGPROB_ATOL)
