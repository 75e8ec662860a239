"""int8 weight-only quantization: structure, sharding, checkpoint round trip, quality."""

import jax
import numpy as np
import pytest

from jinfer import checkpoint, quant
from jinfer.llm import LLM
from jinfer.modeling import FlaxModel
from jinfer.sampling import SamplingParams
from jinfer.sharding import make_mesh
from jinfer.testing import make_tiny_llm_dir, perturbed_params, tiny_llama_config


def test_reduced_axes_follow_logical_names():
    assert quant.reduced_axes(("embed", "heads", "head_dim")) == (0,)
    assert quant.reduced_axes(("heads", "head_dim", "embed")) == (0, 1)
    assert quant.reduced_axes(("vocab", "embed")) == (1,)
    assert quant.reduced_axes(("embed", "vocab")) == (0,)
    assert quant.reduced_axes(("embed",)) is None


def test_quantize_error_is_bounded_per_channel():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 32)).astype(np.float32) * rng.uniform(0.1, 3, size=(1, 32)).astype(np.float32)
    q = quant.quantize_array(w, (0,), group=0)  # per output channel only
    assert q.q8.dtype == np.int8 and q.scale.shape == (1, 32)
    err = np.abs(np.asarray(quant.dequantize_array(q, np.float32)) - w)
    assert (err <= q.scale / 2 + 1e-7).all()  # round-to-nearest: at most half a step


@pytest.fixture(scope="module")
def tiny():
    model = FlaxModel.from_name("Llama", tiny_llama_config(256))
    return model, perturbed_params(model, 0)


def test_quantized_model_structure_sharding_and_agreement(tiny):
    model, params = tiny
    qmodel = model.quantized()
    qparams = quant.quantize_params(params, model.float_logical_axes())
    assert jax.tree.map(lambda x: (x.shape, x.dtype), qmodel.abstract_params()) == jax.tree.map(
        lambda x: (x.shape, x.dtype), qparams
    )
    shard = qmodel.shardings(make_mesh("data=2,model=4"))
    up = shard["layers"][0]["mlp"]["up"]
    assert up.q8.spec == shard["layers"][0]["mlp"]["up"].scale.spec  # both split on "mlp"
    assert "model" in str(up.q8.spec)
    tokens = np.arange(3, 40, dtype=np.int32)[None]
    positions = np.arange(tokens.shape[1], dtype=np.int32)[None]

    def logits(m, p):
        return np.asarray(m.apply_fn("logits")(p, m.apply_fn()(p, tokens, positions, None)[0]))[0]

    ref, q = logits(model, params), logits(qmodel, qparams)
    assert (ref.argmax(-1) == q.argmax(-1)).mean() >= 0.9
    assert np.abs(ref - q).max() < 0.1 * np.abs(ref).max()


def test_int8_checkpoint_round_trip_and_load_time_quantization(tmp_path):
    src = make_tiny_llm_dir(tmp_path / "f32")
    model, params, _ = checkpoint.load_model_dir(src)
    qparams = quant.quantize_params(jax.tree.map(np.asarray, params), model.float_logical_axes())
    qdir = checkpoint.save_model_dir(
        tmp_path / "int8",
        "Llama",
        model.config,
        qparams,
        extra_config={"quantization": "int8"},
        extra_files={
            f: (src / f).read_text()
            for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
        },
    )
    loaded, restored, meta = checkpoint.load_model_dir(qdir)
    assert loaded.quantization == "int8" and meta["quantization"] == "int8"
    assert restored["layers"][0]["attn"]["q"].q8.dtype == np.int8
    np.testing.assert_array_equal(restored["embed"].q8, qparams["embed"].q8)
    p = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    from_disk = LLM(qdir, max_len=64, buckets=(16,), max_batch=2).generate("Paris is", p)[0]
    at_load = LLM(src, max_len=64, buckets=(16,), max_batch=2, quantize="int8").generate("Paris is", p)[0]
    assert from_disk.token_ids == at_load.token_ids


def test_convert_with_int8_matches_load_time_quantization(tmp_path):
    from pathlib import Path

    from jinfer.convert import convert

    src = Path(__file__).parent / "fixtures" / "hf" / "llama_gqa"
    fdir = convert(src, tmp_path / "f32", progress=False)
    qdir = convert(src, tmp_path / "q8", quantize="int8", progress=False)
    fmodel, fparams, _ = checkpoint.load_model_dir(fdir)
    qmodel, qparams, meta = checkpoint.load_model_dir(qdir)
    assert meta["quantization"] == "int8" and qmodel.quantization == "int8"
    expected = quant.quantize_params(jax.tree.map(np.asarray, fparams), fmodel.float_logical_axes())
    # Same quantization up to float rounding of the scale (host numpy vs XLA arithmetic).
    got = jax.tree.map(np.asarray, qparams)
    for path in (("embed",), ("layers", 0, "attn", "q"), ("layers", 1, "mlp", "down")):
        a, b = got, expected
        for k in path:
            a, b = a[k], b[k]
        np.testing.assert_allclose(a.scale, b.scale, rtol=1e-6)
        assert np.abs(a.q8.astype(int) - b.q8.astype(int)).max() <= 1
    with pytest.raises(Exception, match="quantize='int4'"):
        convert(src, tmp_path / "bad", quantize="int4", progress=False)
    # The recorded dtype is the float weights' (norms), not that of the int8 weights' scales.
    assert meta["dtype"] == "float32"
    bf16 = convert(src, tmp_path / "q8bf16", dtype="bfloat16", quantize="int8", progress=False)
    assert checkpoint.load_model_dir(bf16)[2]["dtype"] == "bfloat16"
    assert checkpoint.describe_model_dir(bf16).dtype == "bfloat16"


def test_grouped_scales_bound_the_error_per_group():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(256, 8)).astype(np.float32)
    w[: quant.GROUP_SIZE] *= 50  # one loud group must not coarsen the others
    q = quant.quantize_array(w, (0,))
    assert q.scale.shape == (256 // quant.GROUP_SIZE, 8)
    deq = np.asarray(quant.dequantize_array(q, np.float32))
    step = np.repeat(q.scale, quant.GROUP_SIZE, axis=0)
    assert (np.abs(deq - w) <= step / 2 + 1e-6).all()
    assert np.abs(deq[quant.GROUP_SIZE :] - w[quant.GROUP_SIZE :]).max() < 0.05
