"""Mixture-of-experts decoders (jinfer.models.moe): parity with transformers (Mixtral, Qwen3-MoE
golden fixtures from scripts/make_golden_moe.py), grouped vs dense dispatch, batch invariance,
expert-parallel sharding, int8 experts, zero compiles after warm-up."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer import checkpoint, quant
from jinfer.compile import count_compiles
from jinfer.convert import convert
from jinfer.kvcache import KVCache
from jinfer.llm import LLM
from jinfer.modeling import FlaxModel
from jinfer.models import moe
from jinfer.sampling import SamplingParams
from jinfer.sharding import make_mesh

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
FAMILIES = ("mixtral", "qwen3_moe")
BIAS = "qwen3_moe_bias"  # qwen3_moe with attention_bias: true (q/k/v/o biases)
TINY = moe.MoEConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=40,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    rope_theta=10000.0,
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {name: convert(FIXTURES / name, root / name, progress=False) for name in (*FAMILIES, BIAS)}


def _logits(model, params, ids) -> np.ndarray:
    tokens = jnp.asarray(ids, jnp.int32)[None]
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    hidden, _ = model.apply_fn()(params, tokens, positions)
    return np.asarray(model.apply_fn("logits")(params, hidden))[0]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


@pytest.mark.parametrize("name", (*FAMILIES, BIAS))
def test_logits_greedy_and_score_match_transformers(converted, name):
    golden = np.load(FIXTURES / name / "golden.npz")
    model, params, _ = checkpoint.load_model_dir(converted[name])
    assert model.spec.name == "MoE"
    prompts = [[int(t) for t in golden[f"input_ids_{i}"]] for i in (0, 1)]
    for i, ids in enumerate(prompts):
        diff = np.abs(_logits(model, params, ids) - golden[f"logits_{i}"]).max()
        assert diff <= 1e-4, f"{name} prompt {i}: logits max abs diff {diff:.2e}"

    llm = LLM(converted[name], max_batch=2, max_len=32, buckets=(16,))
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    for i, out in enumerate(outs):
        assert out.token_ids == [int(t) for t in golden[f"generated_{i}"]], f"{name} prompt {i}"

    ids = prompts[1]
    scored = llm.score([ids[:5]], [ids[5:]])[0]
    expected = _log_softmax(golden["logits_1"])[np.arange(4, len(ids) - 1), ids[5:]]
    np.testing.assert_allclose(scored.logprobs, expected, atol=1e-4, rtol=0)


def test_qwen3_moe_layers_follow_sparse_step_and_mlp_only_layers(converted):
    model, params, _ = checkpoint.load_model_dir(converted["qwen3_moe"])
    c = model.config
    assert (c.qk_norm, c.norm_topk_prob, c.mlp_only_layers) == (True, False, (1,))
    assert [set(params["layers"][i]) >= {"moe"} for i in range(3)] == [True, False, True]
    assert params["layers"][1]["mlp"]["gate"].shape == (c.hidden_size, c.intermediate_size)
    assert params["layers"][0]["moe"]["gate"].shape == (8, c.hidden_size, c.moe_intermediate_size)


@functools.cache
def _tiny(config: moe.MoEConfig = TINY):
    model = FlaxModel.from_name("MoE", config)
    rng = np.random.default_rng(0)

    def draw(path, x):
        noise = 0.2 * rng.standard_normal(x.shape, dtype=np.float32)
        return jnp.asarray(noise + 1.0 if str(path[-1].key).endswith("norm") else noise)

    params = jax.tree_util.tree_map_with_path(draw, model.abstract_params())
    fwd, head = model.apply_fn(), model.apply_fn("logits")

    @jax.jit
    def step(params, tokens, positions, cache=None):
        hidden, cache = fwd(params, tokens, positions, cache)
        return head(params, hidden), cache

    return model, params, step


def _positions(b, start, stop):
    return jnp.broadcast_to(jnp.arange(start, stop, dtype=jnp.int32), (b, stop - start))


def _cache(config, batch=2, max_len=16):
    return KVCache.zeros(config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)


def test_grouped_dispatch_equals_dense_and_a_loop_over_chosen_experts():
    rng = np.random.default_rng(1)
    e, d, f, m, k = 8, 16, 24, 13, 2
    x = jnp.asarray(rng.standard_normal((m, d), np.float32))
    router, gate, up = (
        jnp.asarray(rng.standard_normal(s, np.float32)) for s in ((d, e), (e, d, f), (e, d, f))
    )
    down = jnp.asarray(rng.standard_normal((e, f, d), np.float32))
    weights, experts = moe.route(x, router, k, normalize=True)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    dense = moe.dense_experts(x, gate, up, down, weights, experts)
    grouped = moe.grouped_experts(x, gate, up, down, weights, experts)
    np.testing.assert_allclose(grouped, dense, rtol=1e-5, atol=1e-5)
    tiled = moe.tiled_experts(x, gate, up, down, weights, experts)
    np.testing.assert_allclose(tiled, dense, rtol=1e-5, atol=1e-5)
    xs, ws, es = np.asarray(x), np.asarray(weights), np.asarray(experts)
    loop = np.zeros((m, d), np.float32)
    for t in range(m):
        for j in range(k):
            g, u, dn = (np.asarray(a[es[t, j]]) for a in (gate, up, down))
            h = xs[t] @ g
            loop[t] += ws[t, j] * ((h / (1 + np.exp(-h))) * (xs[t] @ u)) @ dn
    np.testing.assert_allclose(grouped, loop, rtol=1e-4, atol=1e-4)


def test_router_ties_pick_lower_expert_index_and_stay_per_token():
    x = jnp.ones((3, 4), jnp.float32)
    router = jnp.zeros((4, 6), jnp.float32)  # every expert equally likely
    weights, experts = moe.route(x, router, 2, normalize=False)
    assert experts.tolist() == [[0, 1]] * 3
    np.testing.assert_allclose(weights, 1 / 6, rtol=1e-6)


def test_prefill_then_decode_equals_full_forward_every_dispatch():
    for dispatch in ("tiled", "ragged", "dense"):
        config = dataclasses.replace(TINY, dispatch=dispatch, qk_norm=dispatch == "dense")
        _, params, step = _tiny(config)
        tokens = jnp.asarray(np.random.default_rng(2).integers(0, 128, (2, 8), dtype=np.int32))
        full, _ = step(params, tokens, _positions(2, 0, 8))
        logits, cache = step(params, tokens[:, :5], _positions(2, 0, 5), _cache(config))
        outs = [logits]
        for p in range(5, 8):
            logits, cache = step(params, tokens[:, p : p + 1], _positions(2, p, p + 1), cache)
            outs.append(logits)
        np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=1e-5)


def test_a_tokens_result_does_not_depend_on_its_batch_companions():
    """Decode rows: one request's logits are bitwise the same whatever its companions route to."""
    _, params, step = _tiny()
    rng = np.random.default_rng(3)
    target = jnp.asarray(rng.integers(0, 128, (1, 6), dtype=np.int32))
    results = []
    for seed in range(3):
        others = jnp.asarray(np.random.default_rng(10 + seed).integers(0, 128, (3, 6), dtype=np.int32))
        tokens = jnp.concatenate([target, others])
        logits, cache = step(params, tokens, _positions(4, 0, 6), _cache(TINY, batch=4))
        nxt = jnp.asarray([[7], [seed], [seed + 1], [seed + 2]], jnp.int32)
        logits2, _ = step(params, nxt, _positions(4, 6, 7), cache)
        results.append((np.asarray(logits[0]), np.asarray(logits2[0])))
    for a, b in results[1:]:
        np.testing.assert_array_equal(a, results[0][0])
        np.testing.assert_array_equal(b, results[0][1])


def test_expert_sharded_equals_unsharded_and_each_device_holds_its_experts():
    model, params, step = _tiny()
    mesh = make_mesh("data=2,expert=4")
    sharded = jax.device_put(params, model.shardings(mesh))
    gate = sharded["layers"][0]["moe"]["gate"]
    assert gate.sharding.spec[0] == "expert"
    shards = {s.device.id: s.data.shape for s in gate.addressable_shards}
    assert len(shards) == 8 and set(shards.values()) == {(2, TINY.hidden_size, TINY.moe_intermediate_size)}
    assert {(s.index[0].start, s.index[0].stop) for s in gate.addressable_shards} == {
        (2 * i, 2 * i + 2) for i in range(4)
    }
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 128, (2, 8), dtype=np.int32))
    ref, _ = step(params, tokens, _positions(2, 0, 8), _cache(TINY))
    with jax.set_mesh(mesh):
        out, _ = step(sharded, tokens, _positions(2, 0, 8), _cache(TINY))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    tp = jax.device_put(params, model.shardings(make_mesh("data=2,model=4")))
    assert tp["layers"][0]["moe"]["gate"].sharding.spec[2] == "model"  # no expert axis: split like an MLP
    with jax.set_mesh(make_mesh("data=2,model=4")):
        out_tp, _ = step(tp, tokens, _positions(2, 0, 8), _cache(TINY))
    np.testing.assert_allclose(out_tp, ref, atol=1e-5, rtol=1e-5)


def test_int8_quantizes_each_expert_per_channel(converted):
    model, params, _ = checkpoint.load_model_dir(converted["mixtral"])
    axes = model.float_logical_axes()
    q = quant.quantize_params(params, axes)
    gate, down = q["layers"][0]["moe"]["gate"], q["layers"][0]["moe"]["down"]
    e, d, f = params["layers"][0]["moe"]["gate"].shape
    assert gate.q8.dtype == jnp.int8 and gate.scale.shape == (e, d // quant.GROUP_SIZE, f)
    assert down.q8.shape == (e, f, d) and down.scale.shape == (e, f // quant.GROUP_SIZE, d)
    assert not quant.is_quantized(q["layers"][0]["moe"]["router"])  # routing stays float
    golden = np.load(FIXTURES / "mixtral" / "golden.npz")
    llm = LLM(converted["mixtral"], max_batch=2, max_len=32, buckets=(16,), quantize="int8")
    ids = [int(t) for t in golden["input_ids_0"]]
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=8))[0]
    agree = np.mean(np.asarray(out.token_ids) == golden["generated_0"])
    assert agree >= 0.75, (out.token_ids, golden["generated_0"].tolist())


def test_zero_compiles_after_warmup_with_random_prompts(converted):
    llm = LLM(converted["qwen3_moe"], max_batch=4, max_len=64, buckets=(8, 32))
    llm.warmup()
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, 256, int(n))] for n in rng.integers(1, 30, 10)]
    params = [
        SamplingParams(max_tokens=int(n), temperature=0.7, seed=int(n)) for n in rng.integers(1, 12, 10)
    ]
    with count_compiles() as c:
        outs = llm.generate(prompts, params)
    assert c.count == 0
    assert [len(o.token_ids) for o in outs] == [p.max_tokens for p in params]


def test_inspect_shows_per_device_expert_bytes(converted):
    from jinfer.checkpoint import describe_model_dir

    info = describe_model_dir(converted["mixtral"], "data=2,expert=4")
    experts = [p for p in info.params if p.logical_axes and p.logical_axes[0] == "expert"]
    assert len(experts) == 2 * 3  # gate, up, down in both layers
    total = sum(p.nbytes for p in experts)
    assert all(p.per_device_bytes * 4 == p.nbytes for p in experts)
    assert f"expert weights: 6 arrays, {total} bytes" in info.render()
    assert f"per device on mesh data=2,expert=4: {total // 4} bytes" in info.render()


def _write_gguf(name: str, path: Path) -> Path:
    """The fixture as llama.cpp's convert_hf_to_gguf writes it: experts stacked per layer into
    ffn_{gate,up,down}_exps, Mixtral as architecture "llama" (q/k rows permuted), F32 tensors."""
    import json

    import gguf
    from safetensors.numpy import load_file

    from jinfer.convert.gguf import permute_rope_rows

    cfg = json.loads((FIXTURES / name / "config.json").read_text())
    arch = gguf.MODEL_ARCH.LLAMA if name == "mixtral" else gguf.MODEL_ARCH.QWEN3MOE
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_expert_count(cfg.get("num_experts") or cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if name == "qwen3_moe":
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_weights_norm(cfg["norm_topk_prob"])
    names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    # llama.cpp's qwen3moe has no dense-MLP layers (mlp_only_layers); the fixture's layer 1 gets the
    # dense FFN names every other architecture uses.
    dense_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    tensors = load_file(FIXTURES / name / "model.safetensors")
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for hf_name, x in tensors.items():
        if ".experts." in hf_name:  # model.layers.{i}.<moe>.experts.{j}.<proj>.weight
            head, tail = hf_name.split(".experts.")
            expert, proj = tail.split(".", 1)
            stacks.setdefault(f"{head}.experts.{proj}", {})[int(expert)] = x
            continue
        if name == "mixtral" and ".q_proj." in hf_name:
            x = permute_rope_rows(x, cfg["num_attention_heads"])
        elif name == "mixtral" and ".k_proj." in hf_name:
            x = permute_rope_rows(x, cfg["num_key_value_heads"])
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        gguf_name = gguf_name or dense_names.get_name(hf_name, try_suffixes=(".weight",))
        w.add_tensor(gguf_name, np.ascontiguousarray(x, np.float32))
    for stacked_name, experts in stacks.items():
        x = np.stack([experts[j] for j in sorted(experts)])
        w.add_tensor(
            names.get_name(stacked_name, try_suffixes=(".weight",)), np.ascontiguousarray(x, np.float32)
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("name", FAMILIES)
def test_gguf_round_trip_gives_the_same_logits(converted, tmp_path, name):
    out = convert(_write_gguf(name, tmp_path / f"{name}.gguf"), tmp_path / "out", progress=False)
    _, from_gguf, _ = checkpoint.load_config(out)
    _, from_hf, _ = checkpoint.load_config(converted[name])
    assert from_gguf.rms_norm_eps == pytest.approx(from_hf.rms_norm_eps, rel=1e-6)  # stored as float32
    assert dataclasses.replace(from_gguf, rms_norm_eps=from_hf.rms_norm_eps) == from_hf
    model, params, _ = checkpoint.load_model_dir(out)
    golden = np.load(FIXTURES / name / "golden.npz")
    for i in (0, 1):
        diff = np.abs(_logits(model, params, golden[f"input_ids_{i}"]) - golden[f"logits_{i}"]).max()
        assert diff <= 1e-4, f"{name} GGUF prompt {i}: logits max abs diff {diff:.2e}"
