"""jinfer's XLA:CPU FFI kernels (jinfer/csrc/cpu_kernels.cc): values against a float64 reference
and XLA's own mixed product, the engines that use them, and the fallbacks when they cannot be
built."""

import dataclasses
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jinfer import cpu_kernels
from jinfer.generate import GenerationConfig
from jinfer.llm import LLM
from jinfer.modeling import FlaxModel
from jinfer.models.layers import out_major_matmul
from jinfer.sampling import SamplingParams
from jinfer.sharding import make_mesh
from jinfer.testing import assert_outputs_close, perturbed_params, tiny_llama_config

needs_kernels = pytest.mark.skipif(
    cpu_kernels.unavailable_reason() is not None or not cpu_kernels.available(),
    reason=f"jinfer's CPU kernels unavailable here: {cpu_kernels.unavailable_reason()}",
)


def _reference(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x rounded to bfloat16 (to nearest even) times bfloat16 w, in float64; and the sum of the
    products' magnitudes (the scale of the float32 rounding error)."""
    xr = x.astype(ml_dtypes.bfloat16).astype(np.float64)
    wr = np.asarray(w).astype(np.float64)
    return xr @ wr.T, np.abs(xr) @ np.abs(wr).T


@needs_kernels
@pytest.mark.parametrize(
    ("rows", "k", "c"),
    [(1, 64, 64), (2, 37, 100), (1, 1536, 576), (2, 576, 1536), (3, 200, 96), (1, 5, 31)],
)
def test_matvec_matches_float64_reference(rows, k, c):
    """Odd k (the 4-row blocks' tail), c not a multiple of 32 (the scalar tail), and products large
    enough to be split over the intra-op threads (576x1536: 1.7 MB of weights)."""
    rng = np.random.default_rng(rows * 1000 + k + c)
    x = rng.standard_normal((rows, c), dtype=np.float32)
    w = jnp.asarray(rng.standard_normal((k, c), dtype=np.float32), jnp.bfloat16)
    with cpu_kernels.enabled(True):
        assert cpu_kernels.matvec_applies(x, w) == (rows <= cpu_kernels.MATVEC_MAX_ROWS)
    got = np.asarray(jax.jit(cpu_kernels.bf16_matvec)(jnp.asarray(x), w))
    want, scale = _reference(x, w)
    assert got.shape == (rows, k) and got.dtype == np.float32
    # float32 accumulation of c exact products: |error| <= c * 2^-24 * sum|products|
    assert np.all(np.abs(got - want) <= c * 2.0**-24 * scale + 1e-30)


@needs_kernels
def test_matvec_agrees_with_xla_mixed_product_and_keeps_leading_axes():
    """The kernel inside a traced program equals XLA's mixed product (input rounded to bfloat16,
    float32 accumulation) up to the order of the sums, for x with leading axes ([1, 1, c])."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((1, 1, 576), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((1536, 576), dtype=np.float32), jnp.bfloat16)

    def traced(on):  # a new function each time: jax.jit caches traces by function, not context
        lowered = jax.jit(cpu_kernels.tracing_with(out_major_matmul, on)).lower(x, w)
        assert (cpu_kernels.MATVEC_TARGET in lowered.as_text()) == on
        return np.asarray(lowered.compile()(x, w))

    kernel, xla = traced(True), traced(False)
    assert kernel.shape == xla.shape == (1, 1, 1536)
    np.testing.assert_allclose(kernel, xla, rtol=0, atol=576 * 2.0**-22 * np.abs(xla).max())
    assert not np.array_equal(kernel, np.zeros_like(kernel))


@needs_kernels
def test_matvec_propagates_nan_and_inf():
    x = np.ones((1, 64), np.float32)
    x[0, 3] = np.nan
    w = jnp.ones((8, 64), jnp.bfloat16).at[5, 0].set(jnp.inf)
    got = np.asarray(jax.jit(cpu_kernels.bf16_matvec)(jnp.asarray(x), w))
    assert np.isnan(got).all()  # every output reads x[0, 3]
    x[0, 3] = 1.0
    got = np.asarray(jax.jit(cpu_kernels.bf16_matvec)(jnp.asarray(x), w))
    assert np.isposinf(got[0, 5]) and np.all(got[0, [0, 1, 2, 3, 4, 6, 7]] == 64.0)


CFG = tiny_llama_config(256, max_position_embeddings=256)
GEN = GenerationConfig(
    max_batch=4, max_len=96, prefill_buckets=(16, 32), decode_steps=3, decode_buckets=(1, 2, 4)
)


@pytest.fixture(scope="module")
def bf16_weights():
    model = FlaxModel.from_name("Llama", CFG)
    params = perturbed_params(model)
    return model, jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x, params)


@needs_kernels
def test_engine_uses_kernels_on_one_cpu_device_with_the_same_tokens(bf16_weights, monkeypatch):
    """An engine on one CPU device with bfloat16 weights (the CPU default here) decodes through the
    kernels (attention at every bucket, the products at bucket 1): the same greedy tokens as the
    engine without them, logprobs within the bfloat16 tolerance of tests/test_decode_buckets.py
    (each product rounds its input to bfloat16, so a different order of sums can move an
    activation by one bfloat16 step)."""
    from jinfer.precision import cpu_has_bf16_matmul

    if not cpu_has_bf16_matmul():
        pytest.skip("bfloat16 weights are held widened on this CPU")
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3], [40, 41, 42, 43, 44, 45, 46]]
    sps = [SamplingParams(max_tokens=n, temperature=0.0, logprobs=1) for n in (40, 12, 20)]
    with LLM.from_params(*bf16_weights, config=GEN) as on:
        assert on.engine.cpu_kernels
        one, four = on.engine._decode_exe(1).as_text(), on.engine._decode_exe(4).as_text()
        assert cpu_kernels.MATVEC_TARGET in one and cpu_kernels.MATVEC_TARGET not in four
        assert cpu_kernels.ATTENTION_TARGET in one and cpu_kernels.ATTENTION_TARGET in four
        got = on.generate(prompts, sps)
        assert on.stats.decode_rounds.get(1, 0) > 0  # the long request ends alone
    monkeypatch.setattr(cpu_kernels, "wanted", lambda mesh: False)
    with LLM.from_params(*bf16_weights, config=GEN) as off:
        assert not off.engine.cpu_kernels
        text = off.engine._decode_exe(1).as_text()
        assert cpu_kernels.MATVEC_TARGET not in text and cpu_kernels.ATTENTION_TARGET not in text
        assert_outputs_close(got, off.generate(prompts, sps), 2e-2)


@needs_kernels
def test_engines_on_a_mesh_do_not_use_the_kernels(bf16_weights):
    """A custom call is not partitioned: an engine over several devices keeps XLA's products."""
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    mesh = make_mesh({"data": 2}, jax.devices()[:2])
    assert not cpu_kernels.wanted(mesh)
    assert cpu_kernels.wanted(make_mesh({"data": 1}, jax.devices()[:1]))
    config = dataclasses.replace(GEN, max_batch=2, decode_buckets=(2,))
    with LLM.from_params(*bf16_weights, config=config, mesh=mesh) as llm:
        assert not llm.engine.cpu_kernels
        out = llm.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=4, temperature=0.0))
        assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]


def _fresh_process(env: dict, code: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != cpu_kernels.DIR_ENV}  # the default location
    return subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=300
    )


CHECK = (
    "import logging; logging.basicConfig(level=logging.INFO)\n"
    "from jinfer import cpu_kernels\n"
    "print('available', cpu_kernels.available(), cpu_kernels.unavailable_reason())\n"
)


def test_switched_off_by_environment(tmp_path):
    proc = _fresh_process({"JINFER_CPU_KERNELS": "0", "JINFER_HOME": str(tmp_path)}, CHECK)
    assert proc.returncode == 0, proc.stderr
    assert "available False JINFER_CPU_KERNELS=0" in proc.stdout
    assert "CPU kernels off (JINFER_CPU_KERNELS=0)" in proc.stderr
    assert not (tmp_path / "kernels").exists()


@needs_kernels
def test_a_failing_compiler_leaves_the_kernels_off_with_the_reason(tmp_path):
    """$CXX that fails: available() is False, the log names the command, and nothing half-built
    is left where the next process would load it."""
    proc = _fresh_process({"CXX": "/bin/false", "JINFER_HOME": str(tmp_path)}, CHECK)
    assert proc.returncode == 0, proc.stderr
    assert "available False None" in proc.stdout
    assert "CPU kernels off (RuntimeError: /bin/false -O3" in proc.stderr
    assert not list((tmp_path / "kernels").rglob("*.so"))


@needs_kernels
def test_built_once_per_digest_and_reused(tmp_path):
    """The first process compiles into $JINFER_HOME/kernels/<digest>/ and removes the builds of
    other versions not used for UNUSED_DAYS; a second one loads it and marks it as used."""
    env = {"JINFER_HOME": str(tmp_path)}
    day = 86400
    kernels = tmp_path / "kernels"
    stale, recent, other = (kernels / n for n in ("0123456789abcdef", "fedcba9876543210", "notes"))
    for d, age in ((stale, cpu_kernels.UNUSED_DAYS + 1), (recent, cpu_kernels.UNUSED_DAYS - 1), (other, 400)):
        d.mkdir(parents=True)
        (d / "libjinfer_cpu_kernels.so").write_bytes(b"old build")
        os.utime(d, (time.time() - age * day,) * 2)
    first = _fresh_process(env, CHECK)
    assert "available True None" in first.stdout and "compiling CPU kernels" in first.stderr
    assert f"removed CPU kernel build {stale}" in first.stderr
    assert not stale.exists() and recent.is_dir() and other.is_dir()
    (lib,) = (p for p in kernels.glob("*/libjinfer_cpu_kernels.so") if p.parent not in (recent, other))
    os.utime(lib.parent, (time.time() - 2 * day,) * 2)
    second = _fresh_process(env, CHECK)
    assert "available True None" in second.stdout and "compiling" not in second.stderr
    assert lib.is_file() and time.time() - lib.parent.stat().st_mtime < day  # marked as used
    assert sorted(p.parent for p in kernels.glob("*/*.so")) == sorted([lib.parent, recent, other])
    elsewhere = tmp_path / "elsewhere"
    third = _fresh_process({**env, cpu_kernels.DIR_ENV: str(elsewhere)}, CHECK)
    assert "available True None" in third.stdout and "compiling CPU kernels" in third.stderr
    assert [p.name for p in elsewhere.rglob("*.so")] == [lib.name]


def _cache(rng, blocks, rows, kv_heads, head_dim, block):
    k = rng.standard_normal((blocks, rows, kv_heads, head_dim, block), dtype=np.float32)
    v = rng.standard_normal((blocks, rows, kv_heads, block, head_dim), dtype=np.float32)
    return jnp.asarray(k), jnp.asarray(v)


def _attention_reference(q, ck, cv, positions, rows, softcap, window):
    """float64 softmax attention of each query row over its cache row's positions start .. p."""
    q, ck, cv = (np.asarray(a, np.float64) for a in (q, ck, cv))
    b, kv, _, h = q.shape
    keys = np.moveaxis(ck, 4, 1).reshape(-1, *ck.shape[1:4])  # [s, c, k, h]
    values = np.moveaxis(cv, 3, 1).reshape(-1, cv.shape[1], kv, h)  # [s, c, k, h]
    out = np.zeros_like(q)
    for r in range(b):
        p = positions[r]
        if p < 0:
            continue
        start = max(0, p - window + 1) if window else 0
        kr, vr = keys[start : p + 1, rows[r]], values[start : p + 1, rows[r]]  # [j, k, h]
        s = np.einsum("kgh,jkh->kgj", q[r], kr)
        if softcap:
            s = softcap * np.tanh(s / softcap)
        e = np.exp(s - s.max(-1, keepdims=True))
        out[r] = np.einsum("kgj,jkh->kgh", e / e.sum(-1, keepdims=True), vr)
    return out


@needs_kernels
@pytest.mark.parametrize(
    ("softcap", "window", "block", "head_dim"),
    [(None, None, 64, 64), (30.0, None, 64, 64), (None, 40, 16, 64), (50.0, 7, 24, 40)],
)
def test_decode_attention_matches_float64_reference(softcap, window, block, head_dim):
    """Rows at varied positions (one padding row, -1), read from permuted cache rows, block
    boundaries and partial blocks, a sliding window and Gemma's soft cap, a head_dim that is not
    a multiple of 16."""
    rng = np.random.default_rng(block + head_dim)
    blocks, slots, kv, g = 5, 6, 2, 3
    ck, cv = _cache(rng, blocks, slots, kv, head_dim, block)
    positions = np.array([0, block - 1, block, 3 * block + 5, -1, blocks * block - 1], np.int32)
    rows = np.array([5, 0, 3, 1, 2, 4], np.int32)
    q = jnp.asarray(rng.standard_normal((6, kv, g, head_dim), dtype=np.float32) * 0.3)
    got = jax.jit(cpu_kernels.decode_attention, static_argnums=(5, 6))(
        q, ck, cv, jnp.asarray(positions), jnp.asarray(rows), softcap, window
    )
    want = _attention_reference(q, ck, cv, positions, rows, softcap, window)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6)
    assert np.all(np.asarray(got)[4] == 0)  # the padding row


@needs_kernels
def test_decode_attention_agrees_with_blocked_attention():
    """`layers.blocked_attention` of one token per row, traced with and without the kernels: the
    same values up to float32 rounding, and the kernel's rows do not depend on their companions
    (a row alone gives the same bits as in the batch)."""
    from jinfer.models.layers import blocked_attention

    rng = np.random.default_rng(3)
    ck, cv = _cache(rng, 4, 3, 3, 64, 64)
    q = jnp.asarray(rng.standard_normal((3, 1, 9, 64), dtype=np.float32))
    positions = jnp.asarray([[70], [200], [5]], jnp.int32)

    def run(on, q, positions, rows=None):
        fn = cpu_kernels.tracing_with(blocked_attention, on)
        return np.asarray(jax.jit(fn)(q, ck, cv, positions, None, None, None, rows))

    kernel, xla = run(True, q, positions), run(False, q, positions)
    np.testing.assert_allclose(kernel, xla, rtol=0, atol=2e-6)
    alone = run(True, q[1:2], positions[1:2], jnp.asarray([1], jnp.int32))
    assert np.array_equal(alone[0], kernel[1])
