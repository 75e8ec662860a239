"""Parity of converted Hugging Face checkpoints with transformers (golden fixtures, no torch needed).

tests/fixtures/hf/<name>/ holds a tiny random model (config.json, *.safetensors) and golden.npz
written by scripts/make_golden.py with transformers (float32, eager attention). Tolerances: logits
max abs diff <= 1e-4, greedy tokens identical, BERT pooled embeddings cosine >= 0.9999.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jinfer import checkpoint
from jinfer.convert import convert

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
DECODERS = ["llama_gqa", "llama3_tied", "qwen2", "gpt2", "llama_sharded", "llama_bf16"]
LOGITS_ATOL = 1e-4


def _fixture(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "golden.npz").is_file():
        pytest.skip(f"fixture {path} not generated (scripts/make_golden.py)")
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> converted jinfer model dir (float32), converted once per module."""
    out_root = tmp_path_factory.mktemp("parity")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = convert(_fixture(name), out_root / name, progress=False)
        return cache[name]

    return get


def _logits(model, params, ids: np.ndarray) -> np.ndarray:
    tokens = jnp.asarray(ids, jnp.int32)[None]
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    hidden, _ = model.apply_fn()(params, tokens, positions)
    return np.asarray(model.apply_fn("logits")(params, hidden))[0]


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_logits_match_transformers(converted, name):
    golden = np.load(_fixture(name) / "golden.npz")
    model, params, meta = checkpoint.load_model_dir(converted(name))
    assert meta["dtype"] == "float32"
    for i in (0, 1):
        diff = np.abs(_logits(model, params, golden[f"input_ids_{i}"]) - golden[f"logits_{i}"]).max()
        assert diff <= LOGITS_ATOL, f"{name} prompt {i}: logits max abs diff {diff:.2e}"


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_greedy_tokens_match_transformers(converted, name):
    from jinfer.llm import LLM
    from jinfer.sampling import SamplingParams

    golden = np.load(_fixture(name) / "golden.npz")
    # float32 pinned: parity with float32 transformers (the CPU default may keep bfloat16 weights)
    llm = LLM(converted(name), dtype="float32", max_batch=2, max_len=32, buckets=(16,), decode_steps=8)
    prompts = [[int(t) for t in golden[f"input_ids_{i}"]] for i in (0, 1)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    for i, out in enumerate(outs):
        assert out.token_ids == [int(t) for t in golden[f"generated_{i}"]], f"{name} prompt {i}"


@pytest.mark.parametrize("name", ["qwen2", "gpt2", "llama_gqa"])
def test_decoders_run_with_the_default_precision(converted, name):
    """No dtype pinned: on a CPU with bfloat16 matrix instructions the matrices come back in
    bfloat16 and everything else in float32, including Qwen2's and GPT-2's [heads, head_dim] q/k/v
    biases (rank 2, not matrices), all output-major. A request alone decodes at bucket 1 (one row
    as two), two at bucket 2; a one-slot engine asked for bfloat16 weights holds every matrix
    narrow (widened to float32 on a CPU without bfloat16 instructions).
    Each first token's logprob stays within 5e-2 of transformers' float32 one."""
    from jinfer import precision
    from jinfer.llm import LLM
    from jinfer.sampling import SamplingParams

    golden = np.load(_fixture(name) / "golden.npz")
    prompts = [[int(t) for t in golden[f"input_ids_{i}"]] for i in (0, 1)]
    expected = []
    for i in (0, 1):
        logits = golden[f"logits_{i}"][-1].astype(np.float64)
        expected.append(logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max())
    sp = SamplingParams(temperature=0.0, max_tokens=8, logprobs=1)
    engines = {
        "default": dict(max_batch=2, max_len=32, buckets=(16,), decode_steps=8),
        "one-slot bfloat16": dict(weight_dtype="bfloat16", max_batch=1, max_len=32, buckets=(16,)),
    }
    for label, options in engines.items():
        with LLM(converted(name), **options) as llm:
            flat = checkpoint.flatten_params(llm.engine.params)
            biases = {k: v for k, v in flat.items() if k.endswith("bias")}
            if name != "llama_gqa":
                assert any(v.ndim == 2 for v in biases.values()), sorted(biases)
            assert {str(v.dtype) for v in biases.values()} <= {"float32"}, label
            q = next(v for k, v in flat.items() if k.startswith("layers/0/attn/q") and "bias" not in k)
            if label == "default" and precision.cpu_has_bf16_matmul():
                assert llm.engine_choices.dtype.value == "bfloat16 weights, float32 compute"
                assert str(q.dtype) == "bfloat16" and llm.model.transposed  # output-major, narrow
            outs = [llm.generate([prompts[0]], sp)[0], *llm.generate(prompts, sp)]
            assert llm.stats.decode_rounds.get(1, 0) > 0 or options["max_batch"] == 1
            for out, i in zip(outs, (0, 0, 1), strict=True):
                assert len(out.token_ids) == 8, label
                first = out.token_ids[0]
                assert abs(out.logprobs[0][first] - expected[i][first]) <= 5e-2, (label, i)
            if label != "default":  # output-major bfloat16 weights: narrow on a CPU with BF16, else widened
                narrow = "bfloat16" if precision.cpu_has_bf16_matmul() else "float32"
                matrices = {k: v for k, v in flat.items() if v.ndim >= 2 and k not in biases}
                assert {str(v.dtype) for v in matrices.values()} == {narrow}, label
                assert {str(v.dtype) for k, v in flat.items() if k not in matrices} == {"float32"}, label


def test_bf16_source_is_exact_in_bf16_output(converted, tmp_path):
    """A bf16 checkpoint converted with dtype=bfloat16 keeps its exact bits; float32 widens exactly."""
    from jinfer.convert.hf import SafetensorsSource

    src = _fixture("llama_bf16")
    out = convert(src, tmp_path / "bf16", dtype="bfloat16", progress=False)
    _, params16, meta = checkpoint.load_model_dir(out)
    _, params32, _ = checkpoint.load_model_dir(converted("llama_bf16"))
    assert meta["dtype"] == "bfloat16"
    raw = np.asarray(SafetensorsSource([src / "model.safetensors"]).read("model.embed_tokens.weight"))
    assert raw.dtype.name == "bfloat16"
    np.testing.assert_array_equal(np.asarray(params16["embed"]).view(np.uint16), raw.view(np.uint16))
    np.testing.assert_array_equal(np.asarray(params32["embed"]), raw.astype(np.float32))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_bert_embeddings_match_transformers(converted):
    golden = np.load(_fixture("bert") / "golden.npz")
    model, params, meta = checkpoint.load_model_dir(converted("bert"))
    assert (meta["pooling"], meta["normalize"]) == ("cls", False)  # plain BertModel directory
    mask = golden["attention_mask"]
    hidden = np.asarray(
        model.apply_fn()(
            params, jnp.asarray(golden["input_ids"]), jnp.asarray(mask), jnp.asarray(golden["token_type_ids"])
        )
    )
    diff = np.abs((hidden - golden["last_hidden_state"]) * mask[..., None]).max()
    assert diff <= LOGITS_ATOL, f"bert hidden max abs diff {diff:.2e}"
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    mean /= np.linalg.norm(mean, axis=-1, keepdims=True)
    assert _cosine(mean, golden["mean_pooled_normalized"]).min() >= 0.9999
    assert _cosine(hidden[:, 0], golden["cls_embedding"]).min() >= 0.9999
    segments = np.asarray(
        model.apply_fn()(
            params,
            jnp.asarray(golden["input_ids"]),
            jnp.asarray(mask),
            jnp.asarray(golden["segment_token_type_ids"]),
        )
    )
    assert np.abs((segments - golden["segment_last_hidden_state"]) * mask[..., None]).max() <= LOGITS_ATOL


def test_sentence_transformers_dir_records_pooling(tmp_path):
    """modules.json + 1_Pooling/config.json + Normalize -> pooling/normalize in config.json."""
    import json
    import shutil

    src = tmp_path / "st"
    shutil.copytree(_fixture("bert"), src)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (src / "modules.json").write_text(json.dumps(modules))
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 64,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
            }
        )
    )
    _, _, meta = checkpoint.load_config(convert(src, tmp_path / "out", progress=False))
    assert (meta["pooling"], meta["normalize"]) == ("mean", True)
