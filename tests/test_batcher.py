"""Real-time batching: concurrent submits, overload, timeouts, close."""

import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np
import pytest

from jinfer.batcher import BatcherConfig
from jinfer.buckets import Buckets
from jinfer.engine import Engine
from jinfer.errors import ConfigError, EngineClosedError, OverloadedError, SequenceTooLongError
from jinfer.modeling import FlaxModel
from jinfer.models.classifiers import TextClassifierConfig

CFG = TextClassifierConfig(vocab_size=64, embed_dim=16, hidden_dim=32, num_layers=1, num_classes=4)
BUCKETS = Buckets(batch_sizes=(1, 2, 4, 8), seq_lens=(8, 16, 32))


@pytest.fixture(scope="module")
def model_params():
    model = FlaxModel.from_name("TextClassifier", CFG)
    return model, model.init_params(seed=0)


def _examples(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, size=int(rng.integers(1, 33))) for _ in range(n)]


def engine_predict(model, params, examples):
    return Engine(model, params, buckets=BUCKETS).predict(examples)


def _closes_within(engine, seconds, **kwargs):
    """Runs engine.close in a thread and checks it returns within `seconds`."""
    t = threading.Thread(target=engine.close, kwargs=kwargs, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "close() hung"
    return time.monotonic() - start


def test_concurrent_submits_match_predict(model_params):
    model, params = model_params
    engine = Engine(
        model,
        params,
        buckets=BUCKETS,
        batcher_config=BatcherConfig(max_queue_delay_ms=2.0, max_queue_size=4096),
    )
    engine.warmup()
    examples = _examples(1600, seed=0)
    expected = engine.predict(examples)
    predict_calls = engine.stats.calls

    def client(k):
        return [engine.submit(x) for x in examples[k * 200 : (k + 1) * 200]]

    with ThreadPoolExecutor(8) as pool:
        futures = [f for fs in pool.map(client, range(8)) for f in fs]
    results = [f.result(timeout=60) for f in futures]
    # A request's rows may land in a different batch bucket than in predict(); XLA:CPU matmuls can
    # differ in the last bits when the row count changes, so compare at f32 rounding tolerance.
    np.testing.assert_allclose(np.stack(results), np.stack(expected), rtol=1e-5, atol=1e-6)
    stats = engine.stats
    assert stats.compiles == len(BUCKETS) and stats.examples_served == 3200
    assert stats.calls - predict_calls < 1600  # submitted requests shared device calls
    assert _closes_within(engine, 10) < 10
    with pytest.raises(EngineClosedError):
        engine.submit(examples[0])


def test_full_queue_rejects_and_close_without_drain_cancels(model_params):
    model, params = model_params
    # A 60 s delay and 8-row buckets: three short requests never trigger a batch on their own.
    engine = Engine(
        model,
        params,
        buckets=BUCKETS,
        batcher_config=BatcherConfig(max_queue_delay_ms=60_000, max_queue_size=3),
    )
    futures = [engine.submit(np.array([1, 2, 3])) for _ in range(3)]
    with pytest.raises(OverloadedError, match="queue is full \\(3 waiting\\)"):
        engine.submit(np.array([1]))
    _closes_within(engine, 10, drain=False)
    assert all(f.cancelled() for f in futures)
    with pytest.raises(CancelledError):
        futures[0].result(timeout=1)


def test_close_with_drain_runs_queued_requests(model_params):
    model, params = model_params
    engine = Engine(model, params, buckets=BUCKETS, batcher_config=BatcherConfig(max_queue_delay_ms=60_000))
    examples = _examples(5, seed=1)
    futures = [engine.submit(x) for x in examples]
    assert _closes_within(engine, 30, drain=True) < 30
    np.testing.assert_allclose(
        np.stack([f.result(timeout=0) for f in futures]),
        np.stack(engine_predict(model, params, examples)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_invalid_example_fails_alone_and_timeouts(model_params):
    model, params = model_params
    engine = Engine(model, params, buckets=BUCKETS, batcher_config=BatcherConfig(max_queue_delay_ms=60_000))
    with pytest.raises(SequenceTooLongError, match="length 40; the largest sequence bucket is 32"):
        engine.submit(np.ones(40, np.int32))
    # Not started within 50 ms (the batch waits up to 60 s for companions) -> TimeoutError.
    late = engine.submit(np.array([1, 2]), timeout=0.05)
    kept = engine.submit(np.array([3, 4]))
    assert isinstance(late.exception(timeout=10), TimeoutError)
    # Eight requests of one bucket fill the largest batch: it runs without waiting for the delay.
    more = [engine.submit(np.array([5, 6, i])) for i in range(7)]
    assert kept.result(timeout=10).shape == (4,)
    assert all(f.result(timeout=10).shape == (4,) for f in more)
    assert engine.stats.bucket_hits == {(8, 8): 1}
    _closes_within(engine, 10)


def test_batcher_config_validation():
    with pytest.raises(ConfigError):
        BatcherConfig(max_queue_size=0)
    with pytest.raises(ConfigError):
        BatcherConfig(max_queue_delay_ms=-1)


def test_an_engine_used_with_submit_is_collected_and_a_future_keeps_it(model_params):
    """The batcher thread holds its engine weakly: an engine dropped after submit() is collected
    (it used to live on with its thread: one leaked engine per re-run notebook cell), while a
    pending Future keeps its engine alive (`Engine(...).submit(x).result()` works)."""
    import gc
    import threading
    import time
    import weakref

    model, params = model_params
    x = _examples(1, 5)[0]
    want = engine_predict(model, params, [x])[0]
    got = Engine(model, params, buckets=BUCKETS).submit(x).result(timeout=60)  # nothing else holds it
    np.testing.assert_array_equal(got, want)
    gc.collect()

    def batchers():
        return {t for t in threading.enumerate() if t.name == "jinfer-batcher"}

    before = batchers()
    engine = Engine(model, params, buckets=BUCKETS)
    engine.submit(x).result(timeout=60)
    assert len(batchers() - before) == 1
    ref = weakref.ref(engine)
    del engine
    gc.collect()
    assert ref() is None
    deadline = time.monotonic() + 10  # the finalizer stops the batcher's thread
    while batchers() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not batchers() - before
