"""Weight types (jinfer.models.weights) and the one loading path (jinfer.loading)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer import checkpoint, loading, quant
from jinfer.errors import ConfigError
from jinfer.generate import GenerationConfig
from jinfer.llm import LLM
from jinfer.modeling import FlaxModel
from jinfer.models import layers
from jinfer.models.classifiers import TextClassifierConfig
from jinfer.models.weights import OutMajor, QuantArray
from jinfer.sharding import make_mesh
from jinfer.testing import make_tiny_llm_dir, tiny_llama_config

NAMES = ("embed", "heads", "head_dim")  # a q projection [d, n, h]


def _weight_and_input(rows: int):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 4, 16)).astype(np.float32)
    x = rng.normal(size=(rows, 1, 64)).astype(np.float32)
    return jnp.asarray(w), jnp.asarray(x)


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3])  # 1: the fused matrix-vector form of an OutMajor weight
def test_linear_dispatches_on_the_weight_type(rows):
    w, x = _weight_and_input(rows)
    spec = "btd,dnh->btnh"
    q = quant.quantize_array(w, quant.reduced_axes(NAMES))
    assert isinstance(q, QuantArray) and q.q8.dtype == jnp.int8
    # int8: exactly dequantize-then-matmul, in the dtype the QuantArray says
    deq = q.dequantize(jnp.float32)
    np.testing.assert_array_equal(layers.linear(spec, x, q), layers.linear(spec, x, deq))
    _close(layers.linear(spec, x, deq), jnp.einsum(spec, x, deq))
    assert layers.linear(spec, x, quant.quantize_array(w.astype(jnp.bfloat16), (0,))).dtype == jnp.float32
    as_bf16 = layers.weights.astype(q, jnp.bfloat16)  # a QuantArray that dequantizes to bfloat16
    assert layers.linear(spec, x.astype(jnp.bfloat16), as_bf16).dtype == jnp.bfloat16
    # OutMajor: the same product from the [n, h, d] copy, float and int8
    packed = quant.transpose_params({"f": w, "q": q}, {"f": NAMES, "q": NAMES})
    assert isinstance(packed["f"], OutMajor) and packed["f"].shape == (4, 16, 64)
    assert isinstance(packed["q"], OutMajor) and isinstance(packed["q"].w, QuantArray)
    _close(layers.linear(spec, x, packed["f"]), jnp.einsum(spec, x, w))
    _close(layers.linear(spec, x, packed["q"]), jnp.einsum(spec, x, deq))
    with pytest.raises(ConfigError, match=r"OutMajor weight is read only by layers\.linear"):
        layers.embed_lookup(packed["f"], jnp.zeros((1, 2), jnp.int32))


def test_weight_types_are_visible_in_params_and_keep_checkpoint_names():
    model = FlaxModel.from_name("Llama", tiny_llama_config(128))
    params = quant.quantize_params(model.init_params(0), model.float_logical_axes())
    qmodel = model.quantized()
    assert isinstance(params["layers"][0]["attn"]["q"], QuantArray)
    assert not isinstance(params["layers"][0]["attn_norm"], QuantArray)  # norms stay float
    names = checkpoint.flatten_params(params)
    assert "layers/0/attn/q/q8" in names and "layers/0/attn/q/scale" in names and "final_norm" in names
    config = GenerationConfig(max_batch=1, max_len=32, prefill_buckets=(16,))
    canonical = LLM.from_params(qmodel, params, config=config, layout="canonical").engine.params
    out_major = LLM.from_params(qmodel, params, config=config, layout="out_major").engine.params
    assert isinstance(canonical["layers"][0]["mlp"]["down"], QuantArray)
    down = out_major["layers"][0]["mlp"]["down"]
    assert isinstance(down, OutMajor) and isinstance(down.w, QuantArray) and down.shape == (64, 128)
    assert isinstance(out_major["embed"], QuantArray)  # a [vocab, d] table is already output-major


def test_models_without_typed_weights_get_dequantized_arrays():
    model = FlaxModel.from_name(
        "TextClassifier", TextClassifierConfig(vocab_size=50, embed_dim=32, hidden_dim=64)
    )
    params = model.init_params(0)
    qparams = quant.quantize_params(params, model.float_logical_axes())
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
    mask = np.ones((2, 6), bool)
    got = model.quantized().apply_fn()(qparams, tokens, mask)
    want = model.apply_fn()(_dequantized(qparams), tokens, mask)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ConfigError, match="cannot hold output-major weights"):
        model.out_major()
    assert not loading.wants_out_major("auto", model, max_batch=1)  # auto stays canonical for it


def _dequantized(tree):
    return jax.tree.map(
        lambda x: x.dequantize(jnp.float32) if isinstance(x, QuantArray) else x,
        tree,
        is_leaf=lambda x: isinstance(x, QuantArray),
    )


def test_quant_array_dtype_survives_export_serialization():
    from jax import export

    q = QuantArray(jnp.ones((4, 2), jnp.int8), jnp.full((1, 2), 0.5), jnp.dtype(jnp.bfloat16))
    exported = export.export(jax.jit(lambda w: w.dequantize()))(q)
    restored = export.deserialize(bytearray(exported.serialize()))
    assert restored.in_tree == exported.in_tree
    out = restored.call(q)
    assert out.dtype == jnp.bfloat16 and float(out[0, 0]) == 0.5


def test_load_restores_quantizes_into_shards_and_rejects_bad_input(tmp_path):
    path = make_tiny_llm_dir(tmp_path / "llm")
    mesh = make_mesh("data=2,model=4")
    loaded = loading.load(path, mesh=mesh, quantize="int8")
    assert (
        loaded.path == path and loaded.model.quantization == "int8" and loaded.meta["model_class"] == "Llama"
    )
    up = loaded.params["layers"][0]["mlp"]["up"]
    assert isinstance(up, QuantArray) and "model" in str(up.q8.sharding.spec)
    with pytest.raises(ConfigError, match="quantization='int4'"):
        loading.load(path, quantize="int4")
    with pytest.raises(ConfigError, match="Embedder needs an encoder"):
        loading.load(path, task="encoder", user="Embedder")
    with pytest.raises(ConfigError, match="layout='rows' is not one of"):
        loading.wants_out_major("rows", loaded.model, max_batch=1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_embed_lookup_inside_a_loop_reads_only_its_rows(dtype):
    # XLA:CPU has no bfloat16 gather: it widens the table around the gather, and inside a decode
    # loop it hoisted that whole-table conversion out of the loop (SmolLM2: 23 ms per decode call).
    # embed_lookup ties the table to the ids, so the conversion stays fused with the gather: the
    # compiled loop holds no temporary the size of the table. Values equal jnp.take's, bit for bit.
    v, d = 4096, 96
    table = jnp.asarray(np.random.default_rng(0).normal(size=(v, d)), dtype)
    ids = jnp.asarray([[5, -1, 4095, 17]], jnp.int32)
    got = layers.embed_lookup(table, ids, jnp.float32)
    want = jnp.take(table, jnp.maximum(ids, 0), axis=0).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.dtype == jnp.float32 and got.shape == (1, 4, d)

    def steps(lookup):
        def run(table, ids):
            def body(i, x):
                return x + lookup(table, (ids + i) % v).astype(jnp.float32).sum()

            return jax.lax.fori_loop(0, 8, body, jnp.zeros((), jnp.float32))

        return jax.jit(run)

    ours = steps(layers.embed_lookup)
    plain = steps(lambda t, i: jnp.take(t, i, axis=0))
    temp = ours.lower(table, ids).compile().memory_analysis().temp_size_in_bytes
    assert temp < table.nbytes // 8, temp
    if dtype == jnp.bfloat16:  # the plain take does widen the whole table (what this guards against)
        assert plain.lower(table, ids).compile().memory_analysis().temp_size_in_bytes >= v * d * 4
    np.testing.assert_allclose(float(ours(table, ids)), float(plain(table, ids)), rtol=1e-6)
