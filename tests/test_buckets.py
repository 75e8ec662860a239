"""Buckets: validation, padding plans, and choose_buckets' exact DP."""

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from jinfer.buckets import (
    Buckets,
    _padded_tokens,
    choose_buckets,
    fit_example,
    pad_batch,
    plan_batches,
    smallest_bucket,
    unpad_outputs,
)
from jinfer.compile import ExecutableCache
from jinfer.errors import ConfigError, EmptyInputError, SequenceTooLongError


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_sizes": (2, 1)},
        {"batch_sizes": (1, 1, 2)},
        {"batch_sizes": (0, 2)},
        {"batch_sizes": ()},
        {"seq_lens": (16, -32)},
        {"seq_lens": (32, 16)},
        {"seq_lens": (16, "a")},  # was a bare ValueError from int()
        {"seq_lens": "16,32"},
        {"batch_sizes": (1.5,)},
    ],
)
def test_buckets_validation(kwargs):
    with pytest.raises(ConfigError):
        Buckets(**kwargs)


def test_buckets_fixed_shape_and_keys():
    b = Buckets(batch_sizes=(1, 4), seq_lens=None)
    assert b.seq_lens == () and not b.has_seq and b.max_seq_len is None
    assert b.keys() == [(1, None), (4, None)]
    full = Buckets()
    assert len(full) == 16 and full.keys()[:2] == [(1, 16), (2, 16)]
    assert full.seq_bucket(17) == 32 and full.batch_bucket(3) == 4


def test_fit_example_errors_and_truncation():
    b = Buckets(seq_lens=(8, 16))
    with pytest.raises(
        SequenceTooLongError, match=r"example 3 has length 20; the largest sequence bucket is 16"
    ):
        fit_example(np.zeros(20, np.int32), b, index=3)
    assert fit_example(np.arange(20), b, index=3, truncate=True).tolist() == list(range(16))
    with pytest.raises(EmptyInputError, match="example 1"):
        fit_example(np.zeros(0, np.int32), b, index=1)


def test_plan_groups_by_seq_bucket_and_splits_large_calls():
    b = Buckets(batch_sizes=(1, 2, 4), seq_lens=(4, 8))
    lengths = [7, 1, 2, 8, 3, 4, 1, 5]
    plans = plan_batches(lengths, b)
    got = [(p.indices, p.batch, p.seq_len) for p in plans]
    # short ones (<= 4): 1,6,2,4,5 sorted by length -> chunk of 4 + chunk of 1; long ones: 7,0,3
    assert got == [((1, 6, 2, 4), 4, 4), ((5,), 1, 4), ((7, 0, 3), 4, 8)]
    assert sorted(i for p in plans for i in p.indices) == list(range(len(lengths)))


def test_pad_and_unpad_roundtrip():
    ex = [np.array([1, 2, 3]), np.array([4])]
    inputs, mask = pad_batch(ex, 4, 8, np.int32)
    assert inputs.shape == (4, 8) and inputs.dtype == np.int32
    assert inputs[0, :4].tolist() == [1, 2, 3, 0] and inputs[1, :2].tolist() == [4, 0]
    assert mask.sum(axis=1).tolist() == [3, 1, 0, 0]
    per_token = np.arange(4 * 8 * 2).reshape(4, 8, 2)
    outs = unpad_outputs({"tok": per_token, "pooled": per_token[:, 0]}, [3, 1], 8, per_token=True)
    assert outs[0]["tok"].shape == (3, 2) and outs[1]["tok"].shape == (1, 2)
    assert outs[1]["pooled"].tolist() == per_token[1, 0].tolist()
    # without per_token the sequence axis is kept
    assert unpad_outputs(per_token, [3, 1], 8)[0].shape == (8, 2)
    images = [np.ones((2, 2, 3)), np.ones((2, 2, 3))]
    x, m = pad_batch(images, 4, None, np.float32)
    assert (
        x.shape == (4, 2, 2, 3) and m.shape == (4, 2) and m.all(axis=1).tolist() == [True, True, False, False]
    )


def _brute_force(lengths, k):
    values = sorted(set(lengths))
    top = values[-1]
    return min(
        _padded_tokens(np.asarray(lengths), [*combo, top])
        for r in range(k)
        for combo in itertools.combinations(values[:-1], r)
    )


def test_choose_buckets_dp_is_exact_vs_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(25):
        lengths = rng.integers(1, 60, size=int(rng.integers(1, 25))).tolist()
        k = int(rng.integers(1, 5))
        buckets, report = choose_buckets(lengths, max_buckets=k)
        assert len(buckets) <= k and buckets[-1] == max(lengths)
        assert report.padded_tokens == _brute_force(lengths, k)
        assert report.real_tokens == sum(lengths)


def test_choose_buckets_beats_powers_of_two_on_skewed_lengths():
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(4.0, 0.7, size=5000).astype(int), 1, 1000)
    buckets, report = choose_buckets(lengths, max_buckets=8)
    assert len(buckets) == 8
    # 8 chosen buckets: 0.80 vs 0.70 for the 11 power-of-two buckets this range needs.
    assert report.efficiency > report.pow2_efficiency + 0.08
    assert len(report.pow2_buckets) == 11
    assert report.efficiency == pytest.approx(report.real_tokens / report.padded_tokens)


def test_choose_buckets_quantizes_many_distinct_lengths():
    lengths = np.arange(1, 5001)
    buckets, report = choose_buckets(lengths, max_buckets=4, max_distinct=1000)
    assert report.quantum == 8 and report.distinct_lengths <= 1000
    assert all(b % 8 == 0 for b in buckets) and buckets[-1] == 5000
    # uniform lengths: 4 near-equal-width buckets
    assert report.efficiency > 0.8


def test_smallest_bucket_is_the_first_size_that_holds_n():
    sizes = (16, 32, 64)
    assert [smallest_bucket(sizes, n) for n in (1, 16, 17, 32, 33, 64)] == [16, 16, 32, 32, 64, 64]
    assert smallest_bucket(sizes, 65) is None
    assert smallest_bucket((), 1) is None
    # Buckets and the generation runtime both pick through it (same errors as before).
    assert Buckets(batch_sizes=(1, 4), seq_lens=(8, 32)).seq_bucket(9) == 32
    msg = "example 3 has length 33; the largest sequence bucket is 32"
    with pytest.raises(SequenceTooLongError, match=msg):
        Buckets(seq_lens=(8, 32)).seq_bucket(33, 3)
    with pytest.raises(ValueError, match=r"5 rows do not fit batch buckets \(1, 4\)"):
        Buckets(batch_sizes=(1, 4)).batch_bucket(5)


def test_executable_cache_builds_each_key_once_across_threads():
    compiles, hits, builds = [], [], []
    cache = ExecutableCache(on_compile=lambda k, s: compiles.append((k, s)), on_hit=hits.append)
    gate = threading.Barrier(8)

    def build():
        builds.append(1)
        time.sleep(0.05)  # widen the race window: the other threads must wait, not build again
        return object()

    def worker():
        gate.wait()
        return cache.get((4, 32), build)

    with ThreadPoolExecutor(8) as pool:
        results = [f.result() for f in [pool.submit(worker) for _ in range(8)]]
    assert len(builds) == 1 and all(r is results[0] for r in results)
    assert [k for k, _ in compiles] == [(4, 32)] and compiles[0][1] >= 0.05
    assert hits == [(4, 32)] * 8
    assert len(cache) == 1 and cache.keys() == [(4, 32)] and (4, 32) in cache

    # A failing build caches nothing and records no compile; the next get builds again.
    def broken():
        raise RuntimeError("XLA said no")

    with pytest.raises(RuntimeError, match="XLA said no"):
        cache.get("bad", broken)
    assert "bad" not in cache and len(compiles) == 1
    assert cache.get("bad", lambda: "ok") == "ok" and [k for k, _ in compiles] == [(4, 32), "bad"]
    # A build may fetch another key (a nested get on the same thread does not deadlock).
    assert cache.get("outer", lambda: ("o", cache.get("inner", lambda: "i"))) == ("o", "i")
    assert cache.keys() == [(4, 32), "bad", "inner", "outer"]
