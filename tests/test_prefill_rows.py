"""Batched prefill: prompts admitted together share prefill calls (`prefill_rows` of them per call,
each into its own slot), with the same tokens as one prompt per call. Tiny random-weight Llama."""

import dataclasses
import threading
import time

import jax
import numpy as np
import pytest

from jinfer.errors import ConfigError
from jinfer.generate import GenerationConfig
from jinfer.llm import LLM
from jinfer.modeling import FlaxModel
from jinfer.sampling import SamplingParams
from jinfer.sharding import make_mesh
from jinfer.testing import assert_outputs_close, perturbed_params, tiny_llama_config

CFG = tiny_llama_config(256, max_position_embeddings=256)
GEN = GenerationConfig(
    max_batch=8, max_len=96, prefill_buckets=(8, 16, 32), prefill_chunk=32, decode_steps=3, max_logprobs=2
)
BLOCK = GEN.prefill_block  # 32
LOGPROB_ATOL = 1e-5  # rows of one call may sum in another order than one prompt alone (XLA:CPU)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, logprobs=1)
# Short prompts (one block or less, batched) and long ones (several pieces, one per call).
PROMPTS = [[(7 * i + j) % 256 for j in range(n)] for i, n in enumerate([3, 9, 17, 32, 5, 40, 12, 70, 30, 1])]


@pytest.fixture(scope="module")
def new_llm():
    """LLM(**GenerationConfig changes) over one tiny model; each is closed at the module's end."""
    model = FlaxModel.from_name("Llama", CFG)
    params, made = perturbed_params(model), []

    def make(**changes):
        made.append(LLM.from_params(model, params, config=dataclasses.replace(GEN, **changes)))
        return made[-1]

    yield make
    for llm in made:
        llm.close()


@pytest.fixture(scope="module")
def batched(new_llm):
    return new_llm()


@pytest.fixture(scope="module")
def alone(new_llm):
    return new_llm(prefill_rows=1)


def _assert_close(a, b):
    assert_outputs_close(a, b, LOGPROB_ATOL)


def _row_calls(llm) -> int:
    return sum(v for k, v in llm.stats.summary()["executables"].items() if k.startswith("prefill_rows/"))


def test_automatic_rows():
    assert GEN.prefill_batch_rows() == 4
    assert GEN.prefill_batch_rows(devices=2) == 1  # a mesh prefills one prompt per call
    assert dataclasses.replace(GEN, max_batch=7).prefill_batch_rows() == 1
    assert dataclasses.replace(GEN, batch_invariant=True).prefill_batch_rows() == 1
    assert dataclasses.replace(GEN, batch_invariant=True, prefill_rows=4).prefill_batch_rows() == 1
    assert dataclasses.replace(GEN, prefill_rows=2).prefill_batch_rows() == 2
    with pytest.raises(ConfigError, match="prefill_rows=9"):
        dataclasses.replace(GEN, prefill_rows=9)


def test_same_tokens_as_one_prompt_per_call(batched, alone):
    assert batched.engine_choices.prefill_rows.value == 4
    assert "automatic" in batched.engine_choices.prefill_rows.reason
    assert alone.engine_choices.prefill_rows.value == 1
    before = _row_calls(batched)
    out = batched.generate(PROMPTS, GREEDY)
    # admitted 4 at a time while the 8 slots last: prompts 0-3 (all short) share a call, 4-7 (two
    # short, two long) one more (padded); the last two share one if they are admitted together
    assert _row_calls(batched) - before in (2, 3)
    assert _row_calls(alone) == 0
    _assert_close(out, alone.generate(PROMPTS, GREEDY))
    # sampled tokens too (the random stream depends on seed and sample index only)
    sp = SamplingParams(max_tokens=10, temperature=0.9, seed=3, n=2, logprobs=1)
    _assert_close(batched.generate(PROMPTS[:6], sp), alone.generate(PROMPTS[:6], sp))


def test_a_call_writes_its_slots_and_nothing_else(new_llm):
    """Padding rows (2 prompts in a call of 4) write no slot; the other slots keep their bits."""
    llm = new_llm()
    runner = llm.engine
    runner.prefill(0, PROMPTS[5][:BLOCK], 0)  # a live row
    runner.prefill(0, PROMPTS[5][BLOCK:], BLOCK)
    before = jax.tree.map(np.array, runner.cache)
    logits = runner.prefill_first_pieces([2, 5], [PROMPTS[1], PROMPTS[2]])
    after = jax.tree.map(np.array, runner.cache)
    changed = {
        slot
        for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
        for slot in range(GEN.max_batch)
        if not np.array_equal(b[:, slot], a[:, slot])
    }
    assert changed == {2, 5}
    for slot, prompt, row in zip((2, 5), (PROMPTS[1], PROMPTS[2]), logits, strict=True):
        alone = np.asarray(runner.prefill(6, prompt, 0))[0]
        np.testing.assert_allclose(row, alone, atol=1e-5)
        n = len(prompt)
        now = jax.tree.map(np.array, runner.cache)
        for b, a in zip(after.k, now.k, strict=True):  # keys [n, b, k, h, l]
            np.testing.assert_allclose(b[0, slot, :, :, :n], a[0, 6, :, :, :n], atol=1e-5)


def test_a_failed_call_retries_each_prompt_alone(new_llm, alone, monkeypatch):
    llm = new_llm()
    runner = llm.engine
    real = runner.prefill

    calls = []

    def rows_fail(slots, pieces):
        calls.append(len(pieces))
        raise RuntimeError("injected batched prefill failure")

    def prefill(slot, piece, start, total=None):
        if start == 0 and piece[0] == 255:
            raise RuntimeError("injected prefill failure")
        return real(slot, piece, start, total)

    monkeypatch.setattr(runner, "prefill_first_pieces", rows_fail)
    monkeypatch.setattr(runner, "prefill", prefill)
    handles = [llm.submit(p, GREEDY) for p in PROMPTS[:3]]
    bad = llm.submit([255, 1, 2], GREEDY)
    handles += [llm.submit(p, GREEDY) for p in PROMPTS[4:7]]
    with pytest.raises(RuntimeError, match="injected prefill failure"):
        bad.result()
    good = [h.result() for h in handles]
    _assert_close(good, alone.generate(PROMPTS[:3] + PROMPTS[4:7], GREEDY))
    assert llm.stats.requests_failed == 1
    assert calls  # the group's shared call failed, then each prompt ran alone
    monkeypatch.undo()
    _assert_close(llm.generate(PROMPTS[:4], GREEDY), alone.generate(PROMPTS[:4], GREEDY))
    assert _row_calls(llm) >= 1


def test_a_full_block_prefilled_in_a_call_is_offered_to_the_prefix_cache(new_llm):
    llm = new_llm()
    block = PROMPTS[3]  # exactly one block
    assert len(block) == BLOCK
    llm.generate([block, PROMPTS[0], PROMPTS[1]], GREEDY)
    assert _row_calls(llm) == 1
    cached = llm.stats.prompt_tokens_cached
    llm.generate([[*block, 1, 2, 3]], GREEDY)
    assert llm.stats.prompt_tokens_cached - cached == BLOCK


def test_threads_on_the_default_engine(batched):
    """8 threads share the default engine (shared prefill calls, decode buckets, the one-row copy
    for a lone request): each result equals the same request run alone on it."""
    assert batched.engine.one_row is not None and batched.engine.decode_buckets == (1, 8)
    rng = np.random.default_rng(5)
    work = [
        (
            [int(t) for t in rng.integers(0, 256, int(rng.integers(1, 70)))],
            SamplingParams(max_tokens=int(rng.integers(1, 16)), temperature=0.8, seed=i, logprobs=1),
        )
        for i in range(32)
    ]
    alone = [batched.generate([p], sp)[0] for p, sp in work]
    results: dict[int, object] = {}

    def worker(k: int) -> None:
        for i in range(k, len(work), 8):
            results[i] = batched.generate([work[i][0]], work[i][1])[0]

    before = _row_calls(batched)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _row_calls(batched) > before  # some prompts did share calls
    _assert_close([results[i] for i in range(len(work))], alone)


def test_an_iterator_abandoned_half_way_cancels_only_its_requests(batched, alone):
    """generate_iter over 12 prompts on the default engine, closed after 3 results: the requests
    still in flight are aborted, the engine goes on, and later results equal one prompt per call."""
    sp = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, logprobs=1)
    aborted = batched.stats.requests_aborted
    it = batched.generate_iter((i, p, sp) for i, p in enumerate(PROMPTS + PROMPTS[:2]))
    first = [next(it) for _ in range(3)]
    it.close()
    for key, out in first:
        _assert_close([out], alone.generate([(PROMPTS + PROMPTS[:2])[key]], sp))
    deadline = time.monotonic() + 60
    while batched.scheduler.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not batched.scheduler.has_unfinished()
    assert batched.stats.requests_aborted > aborted
    _assert_close(batched.generate(PROMPTS[:5], sp), alone.generate(PROMPTS[:5], sp))


@pytest.mark.parametrize("slots, mesh", [(8, None), (1, None), (8, "data=2,model=4")])
def test_warmup_runs_each_program_once_and_writes_nothing(alone, slots, mesh):
    """warmup() runs every prefill and decode program once (so a first request pays no first-run
    cost): the cache keeps its bits, live rows included; generation afterwards is unchanged."""
    model = FlaxModel.from_name("Llama", CFG)
    llm = LLM.from_params(
        model,
        perturbed_params(model),
        config=dataclasses.replace(GEN, max_batch=slots),
        mesh=mesh and make_mesh(mesh),
    )
    runner = llm.engine
    runner.prefill(0, PROMPTS[5][:BLOCK], 0)  # a live row, two pieces
    runner.prefill(0, PROMPTS[5][BLOCK:], BLOCK)
    before = jax.tree.map(np.array, runner.cache)
    ran = []
    real_executable = runner._executable

    def executable(key, build):
        exe = real_executable(key, build)
        return lambda *args: (ran.append(key), exe(*args))[1]

    runner._executable = executable
    try:
        llm.warmup()
    finally:
        del runner._executable
    programs = {k for k in ran if k[0] in ("prefill", "prefill_continuation", "prefill_rows", "decode")}
    expected = {("decode", b) for b in runner.decode_buckets}
    expected |= {(name, b) for b in GEN.prefill_chunk_buckets for name in ("prefill", "prefill_continuation")}
    if runner.prefill_rows > 1:
        expected |= {("prefill_rows", 4, b) for b in GEN.prefill_chunk_buckets}
    assert programs == expected
    after = jax.tree.map(np.array, runner.cache)
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    _assert_close(llm.generate(PROMPTS[:4], GREEDY), alone.generate(PROMPTS[:4], GREEDY))
    llm.close()
