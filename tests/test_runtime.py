"""Generation runtime: many callers on one LLM (threads, submit, asyncio), cancel, local failures,
and automatic prefix caching that stays bitwise exact. Tiny random-weight Llama."""

import asyncio
import random
import threading
import time

import pytest

from jinfer import errors
from jinfer.compile import count_compiles
from jinfer.generate import GenerationConfig
from jinfer.llm import LLM
from jinfer.modeling import FlaxModel
from jinfer.sampling import SamplingParams
from jinfer.testing import live_device_arrays, perturbed_params, tiny_llama_config

CFG = tiny_llama_config(256, max_position_embeddings=128)
BLOCK = 16  # prefill block = prefix-cache block (prefill_chunk)
GEN = GenerationConfig(
    max_batch=4,
    max_len=96,
    prefill_buckets=(8, 16),
    prefill_chunk=BLOCK,
    decode_steps=4,
    max_logprobs=2,
    prefix_cache_blocks=6,
    batch_invariant=True,  # the mode that promises bitwise equality whatever the companions
)


@pytest.fixture(scope="module")
def model():
    return FlaxModel.from_name("Llama", CFG)


@pytest.fixture(scope="module")
def params(model):
    return perturbed_params(model)


def _open(model, params, **changes):
    import dataclasses

    llm = LLM.from_params(model, params, config=dataclasses.replace(GEN, **changes))
    llm.warmup()
    return llm


def _closed(llm):
    llm.close()
    assert not llm._loop._thread.is_alive()


@pytest.fixture(scope="module")
def cached(model, params):
    llm = _open(model, params)
    yield llm
    _closed(llm)


@pytest.fixture(scope="module")
def uncached(model, params):
    llm = _open(model, params, prefix_cache=False)
    yield llm
    _closed(llm)


def _same(a, b):
    """Tokens and logprobs bitwise equal, for every sample."""
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert [o.logprobs for o in a.outputs] == [o.logprobs for o in b.outputs]
    assert [o.finish_reason for o in a.outputs] == [o.finish_reason for o in b.outputs]


def _random_request(rng):
    prompt = [rng.randrange(256) for _ in range(rng.randint(1, 60))]
    sp = SamplingParams(
        max_tokens=rng.randint(1, 14),
        temperature=rng.choice([0.0, 0.7, 1.3]),
        top_k=rng.choice([0, 5]),
        top_p=rng.choice([1.0, 0.9]),
        seed=rng.randrange(10**6),
        logprobs=rng.choice([None, 0, 2]),
        n=rng.choice([1, 1, 2]),
        stop_token_ids=rng.choice([(), (rng.randrange(256),)]),
    )
    return prompt, sp


def _drained(llm, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = llm.stats.summary()
        if s["running"] == 0 and s["queue_depth"] == 0 and s["slots_free"] == llm.engine.config.max_batch:
            return s
        time.sleep(0.01)
    raise AssertionError(f"engine did not drain: {llm.stats.summary()}")


def test_threads_share_one_llm_bitwise(cached, uncached):
    """8 threads x 25 generate() calls on one LLM: each result equals the request alone, with the
    prefix cache off; no compile after warmup; the cache never exceeds its budget."""
    shared_prefix = [7] * 20  # some requests share a prefix, so the cache is hit across threads
    work = []
    for t in range(8):
        rng = random.Random(t)
        reqs = []
        for _ in range(25):
            prompt, sp = _random_request(rng)
            if rng.random() < 0.3:
                prompt = (shared_prefix + prompt)[:60]
            reqs.append((prompt, sp))
        work.append(reqs)
    results = [[None] * 25 for _ in range(8)]
    failures = []

    def run(t):
        try:
            for i, (prompt, sp) in enumerate(work[t]):
                results[t][i] = cached.generate([prompt], sp)[0]
        except BaseException as e:  # pragma: no cover - reported below
            failures.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    with count_compiles() as c:
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=600)
    assert not any(th.is_alive() for th in threads), "deadlock"
    assert not failures, failures
    assert c.count == 0
    s = cached.stats.summary()
    assert s["cache_blocks_used"] <= s["cache_blocks_total"] == 6
    assert s["prompt_tokens_cached"] > 0
    for t in range(8):
        for i, (prompt, sp) in enumerate(work[t]):
            _same(results[t][i], uncached.generate([prompt], sp)[0])


def _blocking_listener(gate: threading.Event, seen: threading.Event):
    """A listener that holds the engine loop at its first delta until `gate` opens."""

    def listen(delta):
        if not seen.is_set():
            seen.set()
            gate.wait(timeout=60)

    return listen


def test_request_submitted_while_decoding_gets_its_first_token_before_others_finish(cached):
    long = SamplingParams(max_tokens=70, temperature=0.0, ignore_eos=True)
    gate, seen = threading.Event(), threading.Event()
    (req,), _ = cached._requests([[1, 2, 3]], [long])
    a = cached._loop.submit(req, listener=_blocking_listener(gate, seen))
    b = cached.submit([4, 5, 6], long)
    assert seen.wait(timeout=60)  # the loop is decoding a (and b), held at a's first delta
    c = cached.submit([9, 8, 7], SamplingParams(max_tokens=3, temperature=0.0))
    gate.set()
    first = next(iter(c))
    assert first.token_ids and not a.finished and not b.finished
    assert c.result().token_ids[0] == first.token_ids[0]
    assert len(a.result().token_ids) == len(b.result().token_ids) == 70


@pytest.fixture(scope="module")
def two_slots(model, params):
    llm = _open(model, params, max_batch=2, max_queue=1)
    yield llm
    _closed(llm)


def test_cancel_frees_the_slot_for_the_next_request_within_one_step(two_slots):
    llm = two_slots
    long = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=5, temperature=0.0)
    ref_b = llm.generate([[4, 5, 6]], long)[0]
    ref_c = llm.generate([[9, 8, 7]], short)[0]
    gate, seen = threading.Event(), threading.Event()
    (req,), _ = llm._requests([[1, 2, 3]], [long])
    b = llm.submit([4, 5, 6], long)  # first: admitted no later than a
    a = llm._loop.submit(req, listener=_blocking_listener(gate, seen), bounded=False)
    assert seen.wait(timeout=60)  # a and b hold both slots; the loop waits at a's first delta
    c_first_step = []
    (creq,), _ = llm._requests([[9, 8, 7]], [short])
    c = llm._loop.submit(creq, listener=lambda d: c_first_step.append(llm.stats.steps))
    with pytest.raises(errors.OverloadedError, match="max_queue=1"):
        llm.submit([1], short)  # c already waits: the queue is full
    a.cancel()
    steps_at_cancel = llm.stats.steps
    gate.set()
    assert c.result().token_ids == ref_c.token_ids
    assert c_first_step[0] - steps_at_cancel <= 1  # admitted at the step that applied the abort
    assert a.result().finish_reason == "abort" and len(a.result().token_ids) < 80
    _same(b.result(), ref_b)
    s = _drained(llm)
    assert s["requests_aborted"] >= 1


def test_prefix_cache_bitwise_on_vs_off(cached, uncached):
    rng = random.Random(5)
    sp = SamplingParams(max_tokens=6, temperature=0.8, seed=3, logprobs=2)

    def both(prompts, params=sp):
        before = cached.stats.prompt_tokens_cached
        on, off = cached.generate(prompts, params), uncached.generate(prompts, params)
        for a, b in zip(on, off, strict=True):
            _same(a, b)
        s = cached.stats.summary()
        assert s["cache_blocks_used"] <= s["cache_blocks_total"]
        return cached.stats.prompt_tokens_cached - before

    # 32 requests sharing a 40-token system prompt (2 full blocks), questions of 3-8 tokens.
    system = [rng.randrange(256) for _ in range(40)]
    prompts = [system + [rng.randrange(256) for _ in range(rng.randint(3, 8))] for _ in range(32)]
    assert both(prompts) >= 31 * 2 * BLOCK
    # The same prompt twice: the second reuses every block but the one holding the last token.
    prompt = [rng.randrange(256) for _ in range(40)]
    both([prompt])
    assert both([prompt]) == 2 * BLOCK
    # Prompts that diverge in the middle of a block share only the blocks before it.
    base = [rng.randrange(256) for _ in range(50)]
    both([base])
    assert both([base[:24] + [(t + 1) % 256 for t in base[24:50]]]) == BLOCK
    # A prefix evicted by later traffic (6-block budget) is recomputed, and still bitwise equal.
    evicted = cached.stats.summary()["cache_blocks_evicted"]
    for _ in range(4):
        both([[rng.randrange(256) for _ in range(49)]])
    assert cached.stats.summary()["cache_blocks_evicted"] > evicted
    assert both([base]) == 0
    # n > 1 samples share one prefill (prompt tokens computed once), through the cache or not.
    computed = uncached.stats.prompt_tokens_computed
    assert both([base], sp.replace(n=3)) == 3 * BLOCK
    assert uncached.stats.prompt_tokens_computed - computed == len(base)
    s = cached.stats.summary()
    assert s["prefix_cache_hit_rate"] > 0 and s["prompt_tokens_computed"] > 0
    assert uncached.stats.summary()["prompt_tokens_cached"] == 0


def test_compile_bound_with_prefix_cache(cached):
    chunk_buckets = len(GEN.prefill_chunk_buckets)
    # fresh + continuation prefill per chunk bucket; first token, slot copy, block save/load, and
    # decode per decode bucket
    assert cached.stats.compiles <= 2 * chunk_buckets + 4 + len(cached.engine.decode_buckets)


def test_failure_stays_local(cached, uncached, monkeypatch):
    runner = cached.engine
    real = runner.prefill

    def prefill(slot, piece, start, total=None):
        if start == 0 and piece[0] == 255:
            raise RuntimeError("injected prefill failure")
        return real(slot, piece, start, total)

    monkeypatch.setattr(runner, "prefill", prefill)
    sp = SamplingParams(max_tokens=8, temperature=0.0)
    good = [cached.submit([1, 2, 3, 4], sp), cached.submit([5, 6], sp)]
    bad = cached.submit([255, 1, 2], sp)
    with pytest.raises(RuntimeError, match="injected"):
        bad.result()
    assert bad.output().finish_reason == "error"
    for h, prompt in zip(good, ([1, 2, 3, 4], [5, 6]), strict=True):
        _same(h.result(), uncached.generate([prompt], sp)[0])
    assert cached.stats.requests_failed >= 1
    _same(cached.generate([[7, 7, 7]], sp)[0], uncached.generate([[7, 7, 7]], sp)[0])


def test_generate_async_deltas_and_abort(cached, uncached):
    sp = SamplingParams(max_tokens=9, temperature=1.0, seed=4, logprobs=0)
    prompts = [[3, 4, 5], [6, 7], list(range(30))]

    async def collect(prompt):
        tokens, logprobs, reasons = [], [], []
        async for d in cached.generate_async(prompt, sp):
            tokens += d.token_ids
            logprobs += d.logprobs or []
            reasons.append(d.finish_reason)
        return tokens, logprobs, reasons

    async def abandon():
        agen = cached.generate_async([1, 2, 3], SamplingParams(max_tokens=60, ignore_eos=True))
        first = await agen.__anext__()
        await agen.aclose()
        return first

    async def main():
        return await asyncio.gather(*(collect(p) for p in prompts), abandon())

    *outs, first = asyncio.run(main())
    assert first.token_ids
    for prompt, (tokens, logprobs, reasons) in zip(prompts, outs, strict=True):
        ref = uncached.generate([prompt], sp)[0]
        assert tokens == ref.token_ids and logprobs == ref.logprobs
        assert reasons[-1] == ref.finish_reason and all(r is None for r in reasons[:-1])
    _drained(cached)


def test_close_joins_the_loop_and_rejects_new_requests(two_slots):
    llm = two_slots
    with llm:
        handle = llm.submit([1, 2], SamplingParams(max_tokens=2, temperature=0.0))
        assert len(handle.result().token_ids) == 2
    assert not llm._loop._thread.is_alive()
    with pytest.raises(errors.EngineClosedError):
        llm.generate([[1, 2]], SamplingParams(max_tokens=2))


def test_every_method_of_a_closed_llm_raises_closed_once(model, params):
    """`score_iter` on a closed LLM yielded (key, EngineClosedError) for every pair and went on;
    it now raises once, as generate, generate_iter and score do, also when the LLM is closed
    while the stream runs (the pairs scored before are kept)."""
    llm = LLM.from_params(model, params, config=GEN)
    pairs = [("a", [1, 2], [3]), ("b", [4, 5], [6]), ("c", [7], [8, 9])]
    want = llm.score([p for _, p, _ in pairs], [c for _, _, c in pairs])

    def closing_after_the_first():
        yield pairs[0]
        llm.close()
        yield from pairs[1:]

    got = []
    with pytest.raises(errors.EngineClosedError, match="the engine is closed; create a new LLM"):
        for key, out in llm.score_iter(closing_after_the_first(), window=1):
            got.append((key, out))
    assert [k for k, _ in got] == ["a"] and got[0][1].logprobs == want[0].logprobs
    sp = SamplingParams(max_tokens=2)
    calls = {
        "generate": lambda: llm.generate([[1, 2]], sp),
        "generate_iter": lambda: list(llm.generate_iter([("a", [1, 2], sp), ("b", [3], sp)])),
        "score": lambda: llm.score([[1, 2], [4, 5]], [[3], [6]]),
        "score_iter": lambda: list(llm.score_iter(iter(pairs))),
    }
    for call in calls.values():
        with pytest.raises(errors.EngineClosedError, match="the engine is closed; create a new LLM"):
            call()


def test_close_frees_the_device_memory_and_what_is_alive_sees_it_closed(model, params):
    """close() kept the KV cache, the prefix-cache pool (and an owned copy of the weights) alive
    until the LLM object was dropped; now they are freed at close(). A handle and a score_iter
    still alive get "abort" / EngineClosedError, never a crash on the freed arrays."""
    import jax

    before = live_device_arrays()
    llm = LLM.from_params(model, params, config=GEN)
    llm.generate([list(range(1, 2 * BLOCK + 3))], SamplingParams(max_tokens=2))  # fills pool blocks
    runner = llm.engine
    engine_bytes = sum(a.nbytes for a in jax.tree.leaves((runner.cache, runner.pool)))
    assert runner.pool is not None and live_device_arrays()[1] >= before[1] + engine_bytes
    scores = llm.score_iter(iter([("a", [1, 2], [3]), ("b", [4, 5], [6])]), window=1)
    assert next(scores)[0] == "a"
    # Hold the loop in a call, queue a request behind it, close, then let the loop go on.
    running, gate = threading.Event(), threading.Event()
    holder = threading.Thread(target=llm._loop.call, args=(lambda: (running.set(), gate.wait(30)),))
    holder.start()
    assert running.wait(30)
    handle = llm.submit([1, 2, 3], SamplingParams(max_tokens=8, temperature=0.0))
    closer = threading.Thread(target=llm.close)
    closer.start()
    while not llm._loop.closed:
        time.sleep(0.001)
    gate.set()
    closer.join(30)
    holder.join(30)
    assert not closer.is_alive() and not llm._loop._thread.is_alive()
    assert runner.params is None and runner.cache is None and runner.pool is None
    out = handle.result(timeout=30)
    assert out.finish_reason == "abort" and len(out.outputs[0].token_ids) < 8  # cut short
    with pytest.raises(errors.EngineClosedError, match="the engine is closed; create a new LLM"):
        next(scores)
    with pytest.raises(errors.EngineClosedError, match="the engine is closed; create a new LLM"):
        llm.warmup()
    llm.close()  # twice is fine
    # Nothing is left on the device (the iterator's frame held its last scores until it ended).
    assert live_device_arrays() == before
    # Closed from the loop's own thread (a done-callback): freed as that thread ends.
    llm = LLM.from_params(model, params, config=GEN)
    handle = llm.submit([1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0))
    handle.add_done_callback(lambda h: h.owner.close())
    assert len(handle.result(timeout=30).outputs[0].token_ids) == 2
    llm._loop._thread.join(30)
    assert not llm._loop._thread.is_alive() and llm.engine.params is None and llm.engine.cache is None
    with pytest.raises(errors.EngineClosedError, match="the engine is closed; create a new LLM"):
        llm.generate([[1, 2]], SamplingParams(max_tokens=2))
    del handle, llm
    assert live_device_arrays() == before


@pytest.mark.parametrize("how", ["interrupt_main", "SIGINT"])
def test_ctrl_c_stops_the_warmup_and_the_llm_goes_on(model, params, how):
    """Ctrl-C during warmup(): `_thread.interrupt_main()` (how IDEs and Windows deliver it) woke
    no one until the whole warm-up had run; a real SIGINT did, but the warm-up went on in the
    engine's thread and the next request waited for all of it. Now both raise at once, the warm-up
    stops before its next program, and the LLM serves (and warms up in full) afterwards."""
    import _thread
    import os
    import signal

    llm = LLM.from_params(model, params, config=GEN)
    fire = _thread.interrupt_main if how == "interrupt_main" else lambda: os.kill(os.getpid(), signal.SIGINT)

    def interrupt_after_the_first_compile():
        deadline = time.monotonic() + 60
        while not llm.stats.compile_seconds and time.monotonic() < deadline:
            time.sleep(0.001)
        fire()

    thread = threading.Thread(target=interrupt_after_the_first_compile)
    thread.start()
    with pytest.raises(KeyboardInterrupt):
        llm.warmup(score=True)
    thread.join()
    llm._loop.call(lambda: None)  # queued behind the warm-up: returns once it has stopped
    partial = len(llm.stats.compile_seconds)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0.0))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.finish_reason == "length"
    full = llm.warmup(score=True)
    assert 1 <= partial < len(full)
    with count_compiles() as after:
        llm.score([[1, 2]], [[3]])
        llm.generate([[4, 5, 6]], SamplingParams(max_tokens=5, temperature=0.0))
    assert after.count == 0
    llm.close()


def test_interrupt_main_stops_a_generate_at_once_and_the_llm_goes_on(model, params):
    """`_thread.interrupt_main()` (an IDE's or Windows' Ctrl-C) while `generate` waits for one
    long request: the handle's wait had no timeout, so nothing woke the caller until the request
    had finished, and the KeyboardInterrupt then cancelled nothing. The engine loop is held up
    for a second here (a call queued between steps), far longer than the wait's 0.1 s slices."""
    import _thread

    llm = LLM.from_params(model, params, config=GEN)
    llm.warmup()
    long = SamplingParams(max_tokens=GEN.max_len - 8, temperature=0.0, ignore_eos=True)

    def hold_up_the_loop_then_interrupt():
        deadline = time.monotonic() + 60
        while not llm.stats.generated_tokens and time.monotonic() < deadline:
            time.sleep(0.001)
        threading.Thread(target=llm._loop.call, args=(lambda: time.sleep(1.0),)).start()
        time.sleep(0.05)
        _thread.interrupt_main()

    thread = threading.Thread(target=hold_up_the_loop_then_interrupt)
    thread.start()
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2, 3]], long)
    thread.join()
    llm._loop.call(lambda: None)  # the loop has handled the cancellation
    assert llm.stats.requests_finished == 0 and llm.stats.requests_aborted == 1
    out = llm.generate([[4, 5, 6]], SamplingParams(max_tokens=5, temperature=0.0))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.finish_reason == "length"
    llm.close()
