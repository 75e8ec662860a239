"""The blocked KV cache: layout and writes, decode attention over blocks (visiting only the blocks
some query has reached) against a dense reference, and engines with different block sizes agreeing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer import errors, kvcache
from jinfer.generate import GenerationConfig
from jinfer.llm import LLM
from jinfer.modeling import FlaxModel
from jinfer.models.layers import blocked_attention
from jinfer.sampling import SamplingParams
from jinfer.testing import perturbed_params, tiny_llama_config


def test_cache_shapes_round_up_to_whole_blocks():
    cache = kvcache.KVCache.zeros(2, batch=3, max_len=10, kv_heads=2, head_dim=4, block=4)
    assert cache.k[1].shape == (3, 3, 2, 4, 4)  # [blocks, b, k, h, block]: 12 positions >= 10
    assert cache.v[0].shape == (3, 3, 2, 4, 4)
    assert (cache.batch, cache.block, cache.max_len) == (3, 4, 12)
    assert cache.nbytes() == 2 * 2 * 3 * 2 * 12 * 4 * 4
    one = kvcache.KVCache.zeros(1, batch=2, max_len=10, kv_heads=2, head_dim=4)
    assert (one.k[0].shape, one.max_len) == ((1, 2, 2, 4, 10), 10)


def test_writes_land_at_their_positions():
    cache = kvcache.KVCache.zeros(1, batch=2, max_len=10, kv_heads=1, head_dim=2, block=4)
    new = jnp.arange(1, 13, dtype=jnp.float32).reshape(2, 3, 1, 2)  # [b, t, k, h]
    positions = jnp.array([[3, 4, -1], [8, 9, 0]])
    keys = np.asarray(kvcache.contiguous_keys(kvcache.write_keys(cache.k[0], new, positions)))
    values = np.asarray(kvcache.contiguous_values(kvcache.write_values(cache.v[0], new, positions)))
    assert keys.shape == (2, 1, 2, 12) and values.shape == (2, 1, 12, 2)
    expected = np.zeros((2, 12, 2), np.float32)
    expected[0, 3], expected[0, 4] = new[0, 0, 0], new[0, 1, 0]
    expected[1, 8], expected[1, 9], expected[1, 0] = new[1, 0, 0], new[1, 1, 0], new[1, 2, 0]
    np.testing.assert_array_equal(values[:, 0], expected)
    np.testing.assert_array_equal(np.swapaxes(keys[:, 0], 1, 2), expected)


def _dense_reference(q, keys, values, positions, window=None):
    """q [b, n, h], keys/values [b, s, k, h], positions [b] -> [b, n, h] in float64."""
    b, n, h = q.shape
    g = n // keys.shape[2]
    out = np.zeros((b, n, h))
    for i in range(b):
        j = np.arange(keys.shape[1])
        ok = (j <= positions[i]) & ((positions[i] - j < window) if window else True)
        for head in range(n):
            s = keys[i, :, head // g] @ q[i, head] / np.sqrt(h)
            s = np.where(ok, s, -np.inf)
            p = np.exp(s - s.max())
            out[i, head] = (p / p.sum()) @ values[i, :, head // g]
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_blocked_attention_matches_dense_and_skips_exactly(window):
    rng = np.random.default_rng(0)
    b, s, kv, g, h, block = 4, 22, 2, 3, 8, 6
    q = rng.standard_normal((b, kv * g, h)).astype(np.float32)
    keys = rng.standard_normal((b, s, kv, h)).astype(np.float32)
    values = rng.standard_normal((b, s, kv, h)).astype(np.float32)
    blocks = kvcache.num_blocks(s, block)
    pad = np.zeros((b, blocks * block - s, kv, h), np.float32)  # the capacity is whole blocks
    keys_p, values_p = np.concatenate([keys, pad], 1), np.concatenate([values, pad], 1)
    cache_k = np.transpose(keys_p.reshape(b, blocks, block, kv, h), (1, 0, 3, 4, 2))
    cache_v = np.transpose(values_p.reshape(b, blocks, block, kv, h), (1, 0, 3, 2, 4))
    np.testing.assert_array_equal(
        np.asarray(kvcache.contiguous_keys(cache_k))[..., :s], np.transpose(keys, (0, 2, 3, 1))
    )
    attend = jax.jit(lambda q, k, v, pos: blocked_attention(q, k, v, pos, window))

    near = np.array([0, 3, 7, 2], np.int32)  # reach 7: the loop visits blocks 0-1 of 0-3
    far = near.copy()
    far[3] = 21  # another row reaches the last block: every block runs
    out_near = np.asarray(attend(q[:, None], cache_k, cache_v, near[:, None]))[:, 0]
    out_far = np.asarray(attend(q[:, None], cache_k, cache_v, far[:, None]))[:, 0]
    for out, pos in ((out_near, near), (out_far, far)):
        np.testing.assert_allclose(out, _dense_reference(q, keys, values, pos, window), atol=2e-6)
    # Rows 0-2 did not change their positions: skipping blocks left them bitwise equal.
    np.testing.assert_array_equal(out_near[:3], out_far[:3])

    idle = near.copy()
    idle[1] = -1  # an inactive slot attends to nothing: finite output, no NaN
    assert np.isfinite(np.asarray(attend(q[:, None], cache_k, cache_v, idle[:, None]))).all()


CHUNK_POSITIONS = {
    "within-blocks": [[7, 8, 9, 10, 11], [3, 4, 5, -1, -1]],  # row 1: 2 padding queries
    # row 0 crosses from block 1 into block 2, row 1 into block 3 (the furthest query sets the
    # trip count); with the window the loop starts at block 1 (the earliest live query is 10)
    "across-blocks": [[10, 11, 12, 13, 14], [16, 17, 18, -1, -1]],
}


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("positions", list(CHUNK_POSITIONS), ids=str)
@pytest.mark.parametrize("rows", [None, (2, 0)], ids=["rows-default", "rows-2-0"])
def test_blocked_attention_of_a_chunk_matches_dense(window, positions, rows):
    """A later prefill chunk (t queries per row) attends to its cache row's prefix and to itself
    over the blocks it reaches, in the cache row `rows` names (default: its own index); padding
    queries (position -1) stay finite."""
    rng = np.random.default_rng(1)
    b, c, t, s, kv, g, h, block = 2, 3, 5, 24, 2, 3, 8, 6
    q = rng.standard_normal((b, t, kv * g, h)).astype(np.float32)
    keys = rng.standard_normal((c, s, kv, h)).astype(np.float32)
    values = rng.standard_normal((c, s, kv, h)).astype(np.float32)
    cache_k = np.transpose(keys.reshape(c, s // block, block, kv, h), (1, 0, 3, 4, 2))
    cache_v = np.transpose(values.reshape(c, s // block, block, kv, h), (1, 0, 3, 2, 4))
    positions = np.array(CHUNK_POSITIONS[positions], np.int32)
    row_ids = np.arange(b) if rows is None else np.array(rows, np.int32)

    def attend(q, k, v, pos, row_map):
        return blocked_attention(q, k, v, pos, window, rows=None if rows is None else row_map)

    out = np.asarray(jax.jit(attend)(q, cache_k, cache_v, positions, row_ids))
    assert np.isfinite(out).all()
    live = positions >= 0
    expected = _dense_reference(
        q.reshape(b * t, kv * g, h)[live.ravel()],
        np.repeat(keys[row_ids], t, 0)[live.ravel()],
        np.repeat(values[row_ids], t, 0)[live.ravel()],
        positions.ravel()[live.ravel()],
        window,
    )
    np.testing.assert_allclose(out[live], expected, atol=2e-6)


def test_writes_through_a_row_map_land_in_those_rows_only():
    """write_keys/write_values with `rows`: row r of the new tokens goes to cache row rows[r]; a
    row id outside [0, c) (negative included) writes nothing."""
    c, block = 3, 4
    cache = kvcache.KVCache.zeros(1, batch=c, max_len=8, kv_heads=1, head_dim=2, block=block)
    new = jnp.arange(1, 13, dtype=jnp.float32).reshape(2, 3, 1, 2)  # [b, t, k, h]
    positions = jnp.array([[3, 4, 5], [0, 1, -1]])
    expected = np.zeros((c, 8, 2), np.float32)
    expected[2, 3:6] = new[0, :, 0]
    expected[0, 0:2] = new[1, :2, 0]
    only_row_2, only_row_0 = expected.copy(), expected.copy()
    only_row_2[0], only_row_0[2] = 0, 0
    # (2, 3): row 3 is past the cache; (-1, 0): row -1 is dropped, not wrapped to the last row
    for rows, want in (((2, 0), expected), ((2, 3), only_row_2), ((-1, 0), only_row_0)):
        rows = jnp.array(rows, jnp.int32)
        keys = np.asarray(kvcache.contiguous_keys(kvcache.write_keys(cache.k[0], new, positions, rows)))
        values = np.asarray(kvcache.contiguous_values(kvcache.write_values(cache.v[0], new, positions, rows)))
        np.testing.assert_array_equal(values[:, 0], want)
        np.testing.assert_array_equal(np.swapaxes(keys[:, 0], 1, 2), want)


def test_block_config_automatic_and_checked():
    assert GenerationConfig(max_batch=1, max_len=512).block == 64  # one slot too (1.6x at max_len 2048)
    assert GenerationConfig(max_batch=1, max_len=48, prefill_buckets=(16,)).block == 48
    assert GenerationConfig(max_batch=8, max_len=512).block == 64
    assert GenerationConfig(max_batch=8, max_len=40, prefill_buckets=(8,)).block == 40
    assert GenerationConfig(max_batch=1, max_len=512, cache_block=100).block == 100
    with pytest.raises(errors.ConfigError, match="cache_block=0"):
        GenerationConfig(max_len=512, cache_block=0)


def test_engines_with_different_blocks_agree():
    config = tiny_llama_config(256, max_position_embeddings=256)
    model = FlaxModel.from_name("Llama", config)
    params = perturbed_params(model)
    # the 25-token prompt crosses blocks; the 40-token one is prefilled in two pieces, the second
    # attending to the first through the cache's blocks
    prompts = [[3, 1, 4, 1, 5], list(range(20, 45)), [9] * 12, list(range(50, 90))]
    p = SamplingParams(max_tokens=20, temperature=0.0, logprobs=1)
    outs = {}
    for block in (7, 16, 64):
        gen = GenerationConfig(
            max_batch=4,
            max_len=64,
            prefill_buckets=(8, 32),
            prefill_chunk=32,
            decode_steps=4,
            cache_block=block,
        )
        llm = LLM.from_params(model, params, config=gen)
        assert llm.engine.cache.k[0].shape[0] == -(-64 // block)
        outs[block] = llm.generate(prompts, p)
    for block in (7, 16):
        for got, ref in zip(outs[block], outs[64], strict=True):
            assert got.token_ids == ref.token_ids
            lp = [e[t] for t, e in zip(got.token_ids, got.logprobs, strict=True)]
            lp_ref = [e[t] for t, e in zip(ref.token_ids, ref.logprobs, strict=True)]
            np.testing.assert_allclose(lp, lp_ref, atol=2e-5)


def test_fresh_prefill_equals_prefill_through_the_cache():
    """A prompt's first piece attends within the call; the same piece through the (empty) cached
    prefix gives the same cache contents and logits."""
    config = tiny_llama_config(256, max_position_embeddings=128)
    model = FlaxModel.from_name("Llama", config)
    gen = GenerationConfig(max_batch=2, max_len=64, prefill_buckets=(16,), cache_block=16)
    llm = LLM.from_params(model, perturbed_params(model), config=gen)
    engine = llm.engine
    tokens = np.arange(3, 19, dtype=np.int32)[None]
    results = []
    for continuation in (False, True):
        exe = engine._prefill_exe(16, continuation=continuation)
        cache = jax.tree.map(jnp.zeros_like, engine.cache)
        n = np.int32(13)
        cache, logits = exe(engine.params, cache, np.int32(1), tokens, np.int32(0), n, n)
        results.append((cache, np.asarray(logits)))
    (fresh, fresh_logits), (through, through_logits) = results
    np.testing.assert_allclose(fresh_logits, through_logits, atol=1e-5)
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(through), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    keys = np.asarray(kvcache.contiguous_keys(fresh.k[0]))  # [b, k, h, s]
    assert np.abs(keys[1, ..., :13]).sum() > 0 and not keys[1, ..., 13:].any() and not keys[0].any()


def test_chunked_prefill_in_a_later_slot_equals_one_piece():
    """A 29-token prompt prefilled into slot 2 as one piece, and as a 16-token first piece plus a
    13-token continuation (which reads and writes slot 2's row of the whole cache, crossing from
    cache block 2 into 3), leaves the same cache and the same last-token logits; the other
    slots stay zero."""
    config = tiny_llama_config(256, max_position_embeddings=128)
    model = FlaxModel.from_name("Llama", config)
    gen = GenerationConfig(max_batch=3, max_len=64, prefill_buckets=(16, 32), cache_block=8)
    engine = LLM.from_params(model, perturbed_params(model), config=gen).engine
    prompt = list(range(5, 34))
    zeros = jax.tree.map(jnp.zeros_like, engine.cache)
    engine.cache = jax.tree.map(jnp.copy, zeros)
    whole = np.asarray(engine.prefill(2, prompt, 0))
    one_piece = jax.tree.map(np.asarray, engine.cache)
    engine.cache = jax.tree.map(jnp.copy, zeros)
    engine.prefill(2, prompt[:16], 0)
    chunked = np.asarray(engine.prefill(2, prompt[16:], 16))
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    for a, b in zip(jax.tree.leaves(engine.cache), jax.tree.leaves(one_piece), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-5)
    keys = np.asarray(kvcache.contiguous_keys(engine.cache.k[0]))  # [b, k, h, s]
    assert (np.abs(keys[2, ..., :29]).sum(axis=(0, 1)) > 0).all()  # every prompt position written
    assert not keys[:2].any() and not keys[2, ..., 29:].any()
