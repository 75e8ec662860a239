"""Qwen3, Gemma, Gemma 2, Gemma 3 and Phi-3 against transformers golden fixtures (scripts/make_golden.py).

Every parameter of the fixtures is perturbed (zero-initialised Gemma norms included). Tolerances:
logits and score logprobs max abs diff <= 1e-4 (f32), greedy tokens identical; prefill + decode vs
one full forward and sharded (data=2, model=4) vs unsharded within 1e-5. Prompts are longer than
the sliding windows (4 for Gemma, 8 for Phi-3), the KV cache is split into blocks of 4 positions
so that local layers skip blocks, and Phi-3's prompts start below, across and past its LongRoPE
original context (16). GGUF files are written from the same weights with the `gguf` library,
named and shifted as llama.cpp's convert_hf_to_gguf does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jinfer import checkpoint
from jinfer.convert import convert
from jinfer.errors import ConversionError, UnsupportedArchitectureError
from jinfer.kvcache import KVCache
from jinfer.modeling import FlaxModel
from jinfer.sharding import make_mesh

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
FAMILIES = ["qwen3", "gemma", "gemma2", "gemma3", "phi3"]
# Config variants transformers supports and jinfer once dropped silently: o_proj biases (Llama),
# GPT-2's optional attention scalings and untied heads (GPT-2, Gemma 2).
VARIANTS = ["llama_bias", "gpt2_scaled", "gemma2_untied"]
WINDOWS = {"gemma2": 4, "gemma2_untied": 4, "gemma3": 4, "phi3": 8}
ATOL = 1e-4
TOL = dict(atol=1e-5, rtol=1e-5)


def _fixture(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "golden.npz").is_file():
        pytest.skip(f"fixture {path} not generated (scripts/make_golden.py)")
    return path


def _prompts(golden) -> list[np.ndarray]:
    return [golden[f"input_ids_{i}"] for i in range(sum(k.startswith("input_ids_") for k in golden.files))]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")

    @functools.cache
    def get(name: str) -> Path:
        return convert(_fixture(name), root / name, progress=False)

    return get


@functools.cache
def _loaded(path: Path):
    model, params, _ = checkpoint.load_model_dir(path)
    fwd, head = model.apply_fn(), model.apply_fn("logits")

    @jax.jit
    def step(params, tokens, positions, cache=None):
        hidden, cache = fwd(params, tokens, positions, cache)
        return head(params, hidden), cache

    return model, params, step


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    _, params, step = _loaded(path)
    out, _ = step(params, jnp.asarray(ids, jnp.int32)[None], jnp.arange(len(ids), dtype=jnp.int32)[None])
    return np.asarray(out)[0]


@pytest.mark.parametrize("name", FAMILIES + VARIANTS)
def test_logits_match_transformers(converted, name):
    golden = np.load(_fixture(name) / "golden.npz")
    for i, ids in enumerate(_prompts(golden)):
        diff = np.abs(_logits(converted(name), ids) - golden[f"logits_{i}"]).max()
        assert diff <= ATOL, f"{name} prompt {i}: logits max abs diff {diff:.2e}"


@pytest.mark.parametrize("name", FAMILIES + VARIANTS)
def test_greedy_tokens_and_score_match_transformers(converted, name):
    from jinfer.llm import LLM
    from jinfer.sampling import SamplingParams

    golden = np.load(_fixture(name) / "golden.npz")
    prompts = [[int(t) for t in p] for p in _prompts(golden)]
    assert max(map(len, prompts)) > WINDOWS.get(name, 0)
    # float32 pinned: parity with float32 transformers (the CPU default may keep bfloat16 weights)
    llm = LLM(
        converted(name),
        dtype="float32",
        max_batch=4,
        max_len=32,
        buckets=(32,),
        decode_steps=4,
        cache_block=4,
    )
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    generated = [[int(t) for t in golden[f"generated_{i}"]] for i in range(len(prompts))]
    # Phi-3 prompt 1 crosses the LongRoPE original context while generating: transformers'
    # generate() then re-encodes the whole sequence, its cached forward (and jinfer) does not.
    key = "stepwise_generated" if name == "phi3" else "generated"
    expected = [[int(t) for t in golden[f"{key}_{i}"]] for i in range(len(prompts))]
    assert [o.token_ids for o in outs] == expected
    if name == "phi3":
        assert expected[0] == generated[0] and expected[2] == generated[2] and expected[1] != generated[1]
    scores = llm.score(prompts, generated)
    for i, s in enumerate(scores):
        diff = np.abs(np.asarray(s.logprobs) - golden[f"score_logprobs_{i}"]).max()
        assert diff <= ATOL, f"{name} prompt {i}: score logprobs max abs diff {diff:.2e}"


def _cache(model, batch: int, max_len: int) -> KVCache:
    c = model.config
    return KVCache.zeros(c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim, block=4)


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_then_decode_equals_full_forward(converted, name):
    model, params, step = _loaded(converted(name))
    # Phi-3: every position past the LongRoPE original context (16), so one forward uses the same
    # (long) factors as the incremental one.
    start, stop = (17, 22) if name == "phi3" else (9, 15)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, stop), dtype=np.int32))
    pos = jnp.broadcast_to(jnp.arange(stop, dtype=jnp.int32), (2, stop))
    full, _ = step(params, tokens, pos)
    logits, cache = step(params, tokens[:, :start], pos[:, :start], _cache(model, 2, 24))
    outs = [logits]
    for p in range(start, stop):
        logits, cache = step(params, tokens[:, p : p + 1], pos[:, p : p + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)


@pytest.mark.parametrize("name", FAMILIES)
def test_sharded_equals_unsharded(converted, name):
    model, params, step = _loaded(converted(name))
    mesh = make_mesh("data=2,model=4")
    sharded = jax.device_put(params, model.shardings(mesh))
    assert sharded["layers"][0]["attn"]["q"].sharding.spec[1] == "model"
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 12), dtype=np.int32))
    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    ref, _ = step(params, tokens, pos, _cache(model, 2, 16))
    with jax.set_mesh(mesh):
        out, _ = step(sharded, tokens, pos, _cache(model, 2, 16))
    np.testing.assert_allclose(out, ref, **TOL)


def test_local_layer_decode_attends_to_the_window_only():
    """A local layer's decode (window 4, blocks of 4) equals masked attention over the whole cache,
    ignores keys outside the window, and a row's result is bitwise the same beside a row far
    behind (whose window makes the block loop start at block 0) as beside a row close by (the
    loop starts at block 6)."""
    from jinfer.models import layers

    rng = np.random.default_rng(0)
    blocks, block, window = 8, 4, 4
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 8), dtype=np.float32))
    keys = rng.standard_normal((blocks, 2, 2, 8, block), dtype=np.float32)
    values = rng.standard_normal((blocks, 2, 2, block, 8), dtype=np.float32)
    positions = jnp.asarray([[29], [5]], jnp.int32)

    def decode(k, pos=positions):
        out = layers.blocked_attention(q, jnp.asarray(k), jnp.asarray(values), pos, window, 0.3, 2.0)
        return np.asarray(out)

    pair = decode(keys)
    np.testing.assert_array_equal(decode(keys, jnp.asarray([[29], [28]], jnp.int32))[0], pair[0])
    np.testing.assert_array_equal(decode(keys, jnp.asarray([[29], [-1]], jnp.int32))[0], pair[0])  # idle slot
    outside = keys.copy()
    outside[:6, 0] = 100.0  # positions 0..23: outside row 0's window (26..29)
    np.testing.assert_array_equal(decode(outside)[0], pair[0])
    flat_k = np.moveaxis(keys, 0, -2).reshape(2, 2, 8, blocks * block)  # [b, k, h, s]
    flat_v = np.moveaxis(values, 0, 2).reshape(2, 2, blocks * block, 8)  # [b, k, s, h]
    s = np.arange(blocks * block)
    mask = (s[None] <= np.asarray(positions)) & (np.asarray(positions) - s[None] < window)
    ref = layers.cached_attention(
        q, jnp.asarray(flat_k), jnp.asarray(flat_v), jnp.asarray(mask[:, None]), 0.3, 2.0
    )
    np.testing.assert_allclose(pair, np.asarray(ref), **TOL)


# -- GGUF ---------------------------------------------------------------------------------------
_GGUF_ARCH = {
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "gemma": gguf.MODEL_ARCH.GEMMA,
    "gemma2": gguf.MODEL_ARCH.GEMMA2,
    "gemma3": gguf.MODEL_ARCH.GEMMA3,
    "phi3": gguf.MODEL_ARCH.PHI3,
}


def _write_gguf(name: str, path: Path, split_max_tensors: int = 0) -> Path:
    """The fixture as llama.cpp's convert_hf_to_gguf writes it (F32 tensors, no tokenizer); with
    `split_max_tensors`, as gguf-split parts PATH-00001-of-0000N.gguf, ... (returns the first)."""
    src = _fixture(name)
    cfg = json.loads((src / "config.json").read_text())
    arch = _GGUF_ARCH[name]
    w = gguf.GGUFWriter(
        None if split_max_tensors else str(path),
        gguf.MODEL_ARCH_NAMES[arch],
        split_max_tensors=split_max_tensors,
    )
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg["rope_parameters"]
    if name == "phi3":
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        w.add_rope_dimension_count(int(head_dim * rope["partial_rotary_factor"]))
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(64 / 16) / math.log(16)))
        w.add_sliding_window(cfg["sliding_window"])
        for kind in ("long", "short"):
            w.add_tensor(f"rope_factors_{kind}.weight", np.asarray(rope[f"{kind}_factor"], np.float32))
    else:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    if name in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg["sliding_window"])
        if cfg["final_logit_softcapping"]:
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        if cfg["attn_logit_softcapping"]:
            w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        if cfg["query_pre_attn_scalar"] != cfg["head_dim"]:  # llama.cpp would assume head_dim
            w.add_attention_scale(cfg["query_pre_attn_scalar"] ** -0.5)
    if name == "gemma3":
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["full_attention"]["factor"])
    names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    tensors = load_file(src / "model.safetensors")
    for hf_name, x in sorted(tensors.items(), key=lambda kv: kv[0] == "lm_head.weight"):  # head last
        if name.startswith("gemma") and hf_name.endswith("norm.weight"):
            x = x + 1.0  # llama.cpp folds Gemma's (1 + w) into the stored norm weight
        w.add_tensor(names.get_name(hf_name, try_suffixes=(".weight",)), np.ascontiguousarray(x, np.float32))
    w.write_header_to_file(path if split_max_tensors else None)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        parts = sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))
        assert len(parts) > 1, parts
        return parts[0]
    return path


def _rounded(value):
    """Floats to 6 significant digits (GGUF keeps float metadata and LongRoPE factors as float32)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_rounded(v) for v in value)
    return value


@pytest.mark.parametrize("name", FAMILIES)
def test_gguf_round_trip_gives_the_same_logits(converted, tmp_path, name):
    golden = np.load(_fixture(name) / "golden.npz")
    out = convert(_write_gguf(name, tmp_path / f"{name}.gguf"), tmp_path / "out", progress=False)
    _, from_gguf, _ = checkpoint.load_config(out)
    _, from_hf, _ = checkpoint.load_config(converted(name))
    assert _rounded(dataclasses.asdict(from_gguf)) == _rounded(dataclasses.asdict(from_hf))
    for i, ids in enumerate(_prompts(golden)):
        diff = np.abs(_logits(out, ids) - golden[f"logits_{i}"]).max()
        assert diff <= ATOL, f"{name} GGUF prompt {i}: logits max abs diff {diff:.2e}"


def test_split_gguf_parts_convert_as_one_file(tmp_path):
    """A model split by gguf-split (the untied output layer in a later part) converts from any
    of its parts to the logits of the one-file model; a missing part is named (the first part
    alone converted silently, tying the output layer to the embeddings)."""
    golden = np.load(_fixture("phi3") / "golden.npz")
    first = _write_gguf("phi3", tmp_path / "phi3.gguf", split_max_tensors=8)
    parts = sorted(tmp_path.glob("phi3-*-of-*.gguf"))
    assert first == parts[0] and len(parts) >= 3
    holder = next(p for p in parts if "output.weight" in {t.name for t in gguf.GGUFReader(p).tensors})
    assert holder != parts[0]  # not in the part holding the metadata
    out = convert(parts[1], tmp_path / "out", progress=False)
    assert json.loads((out / "config.json").read_text())["config"]["tie_word_embeddings"] is False
    for i, ids in enumerate(_prompts(golden)):
        assert np.abs(_logits(out, ids) - golden[f"logits_{i}"]).max() <= ATOL
    holder.unlink()
    with pytest.raises(ConversionError, match=rf"missing \['{holder.name}'\].*download every part"):
        convert(first, tmp_path / "out2", progress=False)


# -- configs of published checkpoints -------------------------------------------------------------
def _abstract_count(name: str, config) -> int:
    abstract = FlaxModel.from_name(name, config).abstract_params()
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))


def test_published_configs_map_to_the_published_sizes():
    from jinfer.models.gemma import GEMMA2_2B, GemmaConfig
    from jinfer.models.llama import LlamaConfig

    gemma3_1b = GemmaConfig.from_hf_config(
        {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": 262144,
            "hidden_size": 1152,
            "intermediate_size": 6912,
            "num_hidden_layers": 26,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 32768,
            "query_pre_attn_scalar": 256,
            "rope_local_base_freq": 10000,
            "rope_scaling": None,
            "rope_theta": 1000000,
            "sliding_window": 512,
            "sliding_window_pattern": 6,
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
        }
    )
    assert gemma3_1b == GemmaConfig()  # the module's Gemma 3 1B defaults
    assert gemma3_1b.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    gemma3_4b = GemmaConfig.from_hf_config(
        {
            "model_type": "gemma3_text",
            "vocab_size": 262208,
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 34,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "rope_local_base_freq": 10000.0,
            "rope_theta": 1000000.0,
            "sliding_window": 1024,
            "query_pre_attn_scalar": 256,
        }
    )
    assert dict(gemma3_4b.rope_scaling) == {"factor": 8.0, "rope_type": "linear"}
    assert (gemma3_4b.rope_theta, gemma3_4b.rope_local_theta) == (1e6, 1e4)
    assert _abstract_count("Gemma", gemma3_1b) == 999_885_952
    gemma2_2b = GemmaConfig.from_hf_config(
        {
            "model_type": "gemma2",
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "head_dim": 256,
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "max_position_embeddings": 8192,
            "num_attention_heads": 8,
            "num_hidden_layers": 26,
            "num_key_value_heads": 4,
            "query_pre_attn_scalar": 256,
            "rms_norm_eps": 1e-06,
            "rope_theta": 10000.0,
            "sliding_window": 4096,
            "vocab_size": 256000,
        }
    )
    assert gemma2_2b == GEMMA2_2B
    assert gemma2_2b.layer_types[:2] == ("sliding_attention", "full_attention")
    assert _abstract_count("Gemma", gemma2_2b) == 2_614_341_888
    phi3_128k = LlamaConfig.from_hf_config(
        {
            "model_type": "phi3",
            "vocab_size": 32064,
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096,
            "rope_theta": 10000.0,
            "rope_scaling": {"type": "longrope", "long_factor": [1.5] * 48, "short_factor": [1.0] * 48},
            "sliding_window": 262144,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
        }
    )
    scaling = dict(phi3_128k.rope_scaling)
    assert scaling["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert phi3_128k.sliding_window is None  # larger than the context: never binds
    assert _abstract_count("Llama", phi3_128k) == 3_821_079_552
    qwen3 = LlamaConfig.from_hf_config(
        {
            "model_type": "qwen3",
            "vocab_size": 151936,
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "rope_theta": 1000000,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_position_embeddings": 40960,
        }
    )
    assert qwen3.qk_norm and not qwen3.attention_bias
    assert _abstract_count("Llama", qwen3) == 596_049_920


def test_multimodal_gemma3_checkpoint_converts_its_text_decoder(tmp_path):
    """A Gemma3ForConditionalGeneration directory (hub layout: text_config listing only non-default
    values, tensors under language_model.model.*, plus vision tensors) converts to the decoder."""
    from safetensors.numpy import save_file

    src = _fixture("gemma3")
    text = json.loads((src / "config.json").read_text())
    rope = text.pop("rope_parameters")
    text.update(
        rope_theta=rope["full_attention"]["rope_theta"],
        rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
        rope_scaling={k: v for k, v in rope["full_attention"].items() if k != "rope_theta"},
        sliding_window_pattern=6,
    )
    del text["layer_types"], text["architectures"]
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"}
    config["text_config"] = text
    (tmp_path / "mm").mkdir()
    (tmp_path / "mm" / "config.json").write_text(json.dumps(config))
    tensors = {"language_model." + k: v for k, v in load_file(src / "model.safetensors").items()}
    tensors["vision_tower.vision_model.post_layernorm.weight"] = np.ones(4, np.float32)
    save_file(tensors, tmp_path / "mm" / "model.safetensors")
    out = convert(tmp_path / "mm", tmp_path / "out", progress=False)
    golden = np.load(src / "golden.npz")
    diff = np.abs(_logits(out, golden["input_ids_1"]) - golden["logits_1"]).max()
    assert diff <= ATOL


# -- errors and inspect ----------------------------------------------------------------------------
def test_unsupported_architecture_lists_the_new_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3nForCausalLM"]}))
    with pytest.raises(UnsupportedArchitectureError) as err:
        convert(tmp_path, tmp_path / "out", progress=False)
    for family in ("Qwen3ForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "gemma3"):
        assert family in str(err.value)
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gemma3n")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match=r"'gemma3n'.*gemma2, gemma3"):
        convert(tmp_path / "m.gguf", tmp_path / "out2", progress=False)


def test_cli_inspect_names_the_family(converted):
    out = subprocess.run(
        [sys.executable, "-m", "jinfer.cli", "inspect", str(converted("gemma3"))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "model_class: Gemma" in out
    assert "layers/5/q_norm" in out and "layers/0/post_mlp_norm" in out


def test_longrope_prompt_prefilled_in_chunks_rotates_with_the_long_factors(converted):
    """A Phi-3 prompt longer than the original context (20 tokens of 16) prefilled in 8-token
    chunks: every chunk rotates with the long factors, as one forward over the prompt does (the
    first chunks end inside the original context and took the short ones: greedy diverged from
    transformers at the first token). Prefix-cache blocks of such a prompt (long-rotated) never
    serve a shorter prompt with the same tokens, nor the reverse."""
    from jinfer.llm import LLM
    from jinfer.sampling import SamplingParams

    golden = np.load(_fixture("phi3") / "golden.npz")
    long_prompt = [int(t) for t in golden["input_ids_2"]]
    assert len(long_prompt) == 20  # original context 16
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    kw = dict(dtype="float32", max_batch=2, max_len=32, buckets=(8, 16, 32), prefill_chunk=8, cache_block=8)
    llm = LLM(converted("phi3"), **kw)
    assert llm.engine.config.prefill_block == 8
    want = [int(t) for t in golden["generated_2"]]
    assert llm.generate([long_prompt], greedy)[0].token_ids == want
    assert llm.generate([long_prompt], greedy)[0].token_ids == want  # its blocks from the prefix cache
    assert llm.stats.prompt_tokens_cached >= 16
    diff = np.abs(np.asarray(llm.score([long_prompt], [want])[0].logprobs) - golden["score_logprobs_2"]).max()
    assert diff <= ATOL
    short = long_prompt[:12]  # inside the original context: short factors, its own blocks
    alone = LLM(converted("phi3"), **kw).generate([short], greedy)[0].token_ids
    assert llm.generate([short], greedy)[0].token_ids == alone
