"""Model families (Llama, GPT-2, BERT): cache/decode equivalence, causality, padding, sharding, shapes.

Tolerances: f32 params; cached vs uncached and padded vs unpadded logits agree within atol=rtol=1e-5
(only the summation order / matmul kernel differs); sharded vs unsharded within atol=rtol=1e-5.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.kvcache import KVCache
from jinfer.modeling import FlaxModel
from jinfer.models import bert, gpt2, layers, llama
from jinfer.models.registry import config_from_dict, config_to_dict
from jinfer.sharding import make_mesh
from jinfer.testing import tiny_gpt2_config, tiny_llama_config

TOL = dict(atol=1e-5, rtol=1e-5)

TINY_LLAMA = tiny_llama_config(128, rope_theta=10000.0, max_position_embeddings=64)
LLAMA3_SCALING = llama.normalize_rope_scaling(
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
)
TINY_GPT2 = tiny_gpt2_config()
TINY_BERT = bert.BertConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    max_position_embeddings=64,
)

DECODERS = {
    "llama": ("Llama", TINY_LLAMA),
    "qwen2_bias": ("Llama", dataclasses.replace(TINY_LLAMA, attention_bias=True)),
    "llama3_rope": ("Llama", dataclasses.replace(TINY_LLAMA, rope_scaling=LLAMA3_SCALING)),
    "tied": ("Llama", dataclasses.replace(TINY_LLAMA, tie_word_embeddings=True)),
    "mistral_window": ("Llama", dataclasses.replace(TINY_LLAMA, sliding_window=3)),
    "gpt2": ("GPT2", TINY_GPT2),
}


def _random_params(model, seed=1):
    """Random f32 params of the model's structure, made with numpy (no per-shape XLA compiles).

    std 0.1 everywhere, so biases are non-zero too; norm scales are 1 + noise.
    """
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = 0.1 * rng.standard_normal(x.shape, dtype=np.float32)
        name = str(path[-1].key)
        is_scale = name.endswith("norm") or name == "scale"
        return jnp.asarray(noise + 1.0 if is_scale else noise)

    return jax.tree_util.tree_map_with_path(draw, model.abstract_params())


@functools.cache
def _setup(name, config):
    """(model, params, jitted step) shared by tests on the same config, so compiles are reused."""
    model = FlaxModel.from_name(name, config)
    fwd, head = model.apply_fn(), model.apply_fn("logits")

    @jax.jit
    def step(params, tokens, positions, cache=None):
        hidden, cache = fwd(params, tokens, positions, cache)
        return head(params, hidden), cache

    return model, _random_params(model), step


def _cache(config, batch=2, max_len=16):
    return KVCache.zeros(config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)


def _tokens(shape, vocab=128, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape, dtype=np.int32))


def _positions(b, start, stop):
    return jnp.broadcast_to(jnp.arange(start, stop, dtype=jnp.int32), (b, stop - start))


@pytest.mark.parametrize("case", list(DECODERS))
def test_prefill_then_decode_equals_full_forward(case):
    name, config = DECODERS[case]
    _, params, step = _setup(name, config)
    tokens = _tokens((2, 8))
    full, none_cache = step(params, tokens, _positions(2, 0, 8))
    assert none_cache is None and full.dtype == jnp.float32 and full.shape == (2, 8, 128)

    logits, cache = step(params, tokens[:, :5], _positions(2, 0, 5), _cache(config))
    outs = [logits]
    for p in range(5, 8):
        logits, cache = step(params, tokens[:, p : p + 1], _positions(2, p, p + 1), cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)
    assert float(jnp.abs(full[:, 1:] - full[:, :-1]).max()) > 1e-2  # logits are not trivially equal


def test_chunked_prefill_equals_one_prefill_and_is_causal():
    _, params, step = _setup("Llama", TINY_LLAMA)
    tokens = _tokens((2, 8))
    one, cache_one = step(params, tokens, _positions(2, 0, 8), _cache(TINY_LLAMA))
    first, cache = step(params, tokens[:, :3], _positions(2, 0, 3), _cache(TINY_LLAMA))
    second, cache = step(params, tokens[:, 3:], _positions(2, 3, 8), cache)
    np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), one, **TOL)
    for a, b in zip(cache.k + cache.v, cache_one.k + cache_one.v, strict=True):
        np.testing.assert_allclose(a, b, **TOL)

    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % 128)
    other, _ = step(params, changed, _positions(2, 0, 8))
    full, _ = step(params, tokens, _positions(2, 0, 8))
    np.testing.assert_array_equal(other[:, :5], full[:, :5])  # same shapes: bitwise equal
    assert float(jnp.abs(other[:, 5:] - full[:, 5:]).max()) > 1e-3


@pytest.mark.parametrize("name,config", [("Llama", TINY_LLAMA), ("GPT2", TINY_GPT2)])
def test_logits_do_not_depend_on_padding(name, config):
    _, params, step = _setup(name, config)
    prompt = _tokens((1, 5))
    ref, _ = step(params, prompt, _positions(1, 0, 5))
    pad = jnp.full((1, 3), -1, jnp.int32)
    # Right padding to a bucket of 8 (pad tokens 0 at position -1).
    right, _ = step(params, jnp.pad(prompt, ((0, 0), (0, 3))), jnp.concatenate([_positions(1, 0, 5), pad], 1))
    np.testing.assert_allclose(right[:, :5], ref, **TOL)
    # Left padding with position -1, through the cache, then one decode step.
    left_tokens = jnp.pad(prompt, ((0, 0), (3, 0)), constant_values=7)
    left, cache = step(params, left_tokens, jnp.concatenate([pad, _positions(1, 0, 5)], 1), _cache(config, 1))
    np.testing.assert_allclose(left[:, 3:], ref, **TOL)
    nxt = _tokens((1, 1), seed=3)
    dec, _ = step(params, nxt, _positions(1, 5, 6), cache)
    ref6, _ = step(params, jnp.concatenate([prompt, nxt], 1), _positions(1, 0, 6))
    np.testing.assert_allclose(dec[:, 0], ref6[:, 5], **TOL)


def test_sharded_equals_unsharded():
    config = dataclasses.replace(TINY_LLAMA, attention_bias=True)
    model, params, step = _setup("Llama", config)
    mesh = make_mesh("data=2,model=4")
    sharded = jax.device_put(params, model.shardings(mesh))
    assert sharded["layers"][0]["attn"]["q"].sharding.spec[1] == "model"
    assert sharded["embed"].sharding.spec[0] == "model"
    tokens = _tokens((2, 8))
    ref, ref_cache = step(params, tokens, _positions(2, 0, 8), _cache(config))
    with jax.set_mesh(mesh):
        out, cache = step(sharded, tokens, _positions(2, 0, 8), _cache(config))
    np.testing.assert_allclose(out, ref, **TOL)
    np.testing.assert_allclose(cache.k[1], ref_cache.k[1], **TOL)


@pytest.mark.parametrize(
    "name,config,count",
    [
        ("Llama", llama.SMOLLM2_135M, 134_515_008),
        ("Llama", llama.LLAMA3_8B, 8_030_261_248),
        ("GPT2", gpt2.GPT2Config(), 124_439_808),
        ("Bert", bert.BertConfig(), 108_891_648),  # bert-base-uncased without the pooler
    ],
)
def test_full_size_param_counts(name, config, count):
    model = FlaxModel.from_name(name, config)  # jax.eval_shape only: nothing is allocated
    assert model.param_count() == count
    if name == "Llama" and config.tie_word_embeddings:
        assert "lm_head" not in model.abstract_params()


def test_bert_hidden_shape_and_mask_invariance():
    model = FlaxModel.from_name("Bert", TINY_BERT)
    params = _random_params(model)
    fwd = jax.jit(model.apply_fn())
    tokens = _tokens((2, 5))
    ref = fwd(params, tokens, jnp.ones((2, 5), bool))
    assert ref.shape == (2, 5, 64) and ref.dtype == jnp.float32
    padded = jnp.concatenate([tokens, _tokens((2, 3), seed=5)], axis=1)
    mask = jnp.arange(8)[None, :] < 5
    out = fwd(params, padded, jnp.broadcast_to(mask, (2, 8)))
    np.testing.assert_allclose(out[:, :5], ref, **TOL)
    typed = fwd(params, tokens, jnp.ones((2, 5), bool), jnp.ones((2, 5), jnp.int32))
    assert float(jnp.abs(typed - ref).max()) > 1e-3  # token types matter


def test_from_hf_config_and_json_round_trip():
    hf_llama3 = {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    }
    cfg = llama.LlamaConfig.from_hf_config(hf_llama3)
    assert cfg.head_dim == 128 and cfg.rope_scaling_dict["factor"] == 8.0 and not cfg.attention_bias
    again = config_from_dict(llama.LlamaConfig, json.loads(json.dumps(config_to_dict(cfg))))
    assert again == cfg and hash(again) == hash(cfg)

    qwen = llama.LlamaConfig.from_hf_config(
        {
            **hf_llama3,
            "model_type": "qwen2",
            "rope_scaling": None,
            "use_sliding_window": False,
            "sliding_window": 4096,
        }
    )
    assert qwen.attention_bias and qwen.rope_scaling is None and qwen.sliding_window is None
    mistral = {**hf_llama3, "model_type": "mistral", "rope_scaling": None, "max_position_embeddings": 32768}
    assert llama.LlamaConfig.from_hf_config({**mistral, "sliding_window": 4096}).sliding_window == 4096
    assert llama.LlamaConfig.from_hf_config({**mistral, "sliding_window": None}).sliding_window is None
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        llama.LlamaConfig.from_hf_config({**hf_llama3, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})

    g = gpt2.GPT2Config.from_hf_config(
        {
            "model_type": "gpt2",
            "vocab_size": 50257,
            "n_embd": 768,
            "n_layer": 12,
            "n_head": 12,
            "n_positions": 1024,
            "layer_norm_epsilon": 1e-5,
        }
    )
    assert g == gpt2.GPT2Config()
    b = bert.BertConfig.from_hf_config(
        {
            "model_type": "bert",
            "vocab_size": 30522,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "hidden_act": "gelu",
        }
    )
    assert b == bert.BertConfig()


@pytest.mark.parametrize(
    "name,module,config",
    [
        ("Llama", llama, dataclasses.replace(TINY_LLAMA, attention_bias=True)),
        ("Llama", llama, dataclasses.replace(TINY_LLAMA, tie_word_embeddings=True)),
        ("GPT2", gpt2, TINY_GPT2),
        ("Bert", bert, TINY_BERT),
    ],
)
def test_hf_param_map_covers_every_param(name, module, config):
    shapes = {}
    jax.tree_util.tree_map_with_path(
        lambda p, x: shapes.setdefault("/".join(str(k.key) for k in p), x.shape),
        FlaxModel.from_name(name, config).abstract_params(),
    )
    mapping = module.hf_param_map(config)
    assert set(mapping) == set(shapes)
    assert {t for _, t in mapping.values()} <= set(layers.HF_TRANSFORMS)


def test_hf_transforms_match_torch_linear_semantics():
    rng = np.random.default_rng(0)
    d, n, h = 8, 2, 4
    x = rng.normal(size=(3, d)).astype(np.float32)
    w_q = rng.normal(size=(n * h, d)).astype(np.float32)  # torch Linear: y = x @ W.T
    q = layers.apply_hf_transform("transpose", w_q, (d, n, h))
    np.testing.assert_allclose(np.einsum("td,dnh->tnh", x, q), (x @ w_q.T).reshape(3, n, h), atol=1e-5)
    w_o = rng.normal(size=(d, n * h)).astype(np.float32)
    o = layers.apply_hf_transform("transpose", w_o, (n, h, d))
    a = rng.normal(size=(3, n, h)).astype(np.float32)
    np.testing.assert_allclose(np.einsum("tnh,nhd->td", a, o), a.reshape(3, -1) @ w_o.T, atol=1e-5)
    c_attn = rng.normal(size=(d, 3 * d)).astype(np.float32)  # GPT-2 Conv1D: y = x @ W, columns [q|k|v]
    k = layers.apply_hf_transform("split3_1", c_attn, (d, 2, 4))
    np.testing.assert_allclose(
        np.einsum("td,dnh->tnh", x, k), (x @ c_attn)[:, d : 2 * d].reshape(3, 2, 4), atol=1e-5
    )
