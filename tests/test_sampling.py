"""The fused sampler against a sorting-based numpy reference, and SamplingParams validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer import sampling
from jinfer.errors import InvalidSamplingParamsError
from jinfer.sampling import SamplerState, SamplingParams


def reference_keep(logits, temperature, top_k, top_p, min_p):
    """What vLLM-style samplers keep: top-k, then top-p on the renormalised rest, then min-p."""
    scaled = logits / max(temperature, 1e-6)
    p = np.exp(scaled - scaled.max())
    p /= p.sum()
    keep = np.ones_like(p, bool)
    if top_k > 0:
        kth = np.sort(p)[::-1][min(top_k, len(p)) - 1]
        keep &= p >= kth
    if top_p < 1.0:
        masked = np.where(keep, p, 0.0)
        order = np.argsort(-masked, kind="stable")
        csum = np.cumsum(masked[order])
        cutoff = masked[order][np.searchsorted(csum, top_p * (1 - 1e-6))]
        keep &= masked >= cutoff
    keep &= p >= min_p * p.max()
    return keep


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (1.3, 0, 1.0, 0.1), (1.0, 20, 0.5, 0.05)],
)
def test_filter_matches_sorting_reference(temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 300)).astype(np.float32) * 3
    state = SamplerState.from_params(
        [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)] * 4,
        [sampling.request_key(0, i) for i in range(4)],
    )
    filtered = np.asarray(jax.jit(sampling.filter_logits)(logits, state))
    for row in range(4):
        expected = reference_keep(logits[row].astype(np.float64), temperature, top_k, top_p, min_p)
        np.testing.assert_array_equal(np.isfinite(filtered[row]), expected)


def test_sample_greedy_and_seeded_draws():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(3, 50)).astype(np.float32))
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0),
    ]
    keys = [sampling.request_key(7, 0), sampling.request_key(7, 0), sampling.request_key(8, 0)]
    state = SamplerState.from_params(params, keys)
    pos = jnp.array([5, 5, 5], jnp.int32)
    out = np.asarray(jax.jit(sampling.sample)(logits, state, pos))
    assert out[0] == int(np.argmax(logits[0]))
    # Same key, same position -> same draw regardless of the row's logits being in another row.
    again = np.asarray(
        jax.jit(sampling.sample)(logits[1:2], SamplerState.from_params([params[1]], [keys[1]]), pos[:1])
    )
    assert again[0] == out[1]
    # Draws follow the distribution: 2,000 draws of one row, frequency of the mode.
    many = SamplerState.from_params(
        [SamplingParams(temperature=1.0)] * 2000, [sampling.request_key(s, 0) for s in range(2000)]
    )
    rows = jnp.broadcast_to(logits[1], (2000, 50))
    draws = np.asarray(jax.jit(sampling.sample)(rows, many, jnp.zeros(2000, jnp.int32)))
    probs = np.asarray(jax.nn.softmax(logits[1]))
    freq = np.bincount(draws, minlength=50) / 2000
    assert np.abs(freq - probs).max() < 0.05


def test_top_k_one_is_greedy_even_when_sampling():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(8, 40)).astype(np.float32))
    state = SamplerState.from_params(
        [SamplingParams(temperature=1.0, top_k=1)] * 8, [sampling.request_key(s, 0) for s in range(8)]
    )
    out = np.asarray(sampling.sample(logits, state, jnp.zeros(8, jnp.int32)))
    np.testing.assert_array_equal(out, np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"min_p": 2.0}, "min_p"),
    ],
)
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(InvalidSamplingParamsError, match=f"SamplingParams.{field}="):
        SamplingParams(**kwargs)
    assert issubclass(InvalidSamplingParamsError, ValueError)
