"""Output-major runtime weight layout (jinfer.quant.transpose_params, LLM(layout=...))."""

import jax
import numpy as np
import pytest

from jinfer import quant
from jinfer.errors import ConfigError
from jinfer.generate import GenerationConfig
from jinfer.llm import LLM
from jinfer.modeling import FlaxModel
from jinfer.models.weights import OutMajor
from jinfer.sampling import SamplingParams
from jinfer.sharding import make_mesh
from jinfer.testing import perturbed_params, tiny_gpt2_config, tiny_llama_config

CONFIG = GenerationConfig(max_batch=1, max_len=64, prefill_buckets=(16,), decode_steps=4)
PROMPTS = [[5, 9, 17, 3, 44, 2, 81], [7, 7, 1]]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, logprobs=3, ignore_eos=True)


def _tokens_and_logprobs(llm):
    outs = [o.outputs[0] for o in llm.generate(PROMPTS, GREEDY)]
    return [o.token_ids for o in outs], [[sorted(d.values()) for d in o.logprobs] for o in outs]


def _models():
    llama = FlaxModel.from_name("Llama", tiny_llama_config(128))
    return {"llama": llama, "gpt2": FlaxModel.from_name("GPT2", tiny_gpt2_config())}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_out_major_matches_canonical(name, quantization):
    model = _models()[name]
    params = jax.device_put(perturbed_params(model, 0))
    if quantization:
        params = quant.quantize_params(params, model.float_logical_axes())
        model = model.quantized(quantization)
    canonical = LLM.from_params(model, params, config=CONFIG, layout="canonical")
    out_major = LLM.from_params(model, params, config=CONFIG, layout="out_major")
    assert not canonical.model.transposed and out_major.model.transposed
    tokens_c, lp_c = _tokens_and_logprobs(canonical)
    tokens_t, lp_t = _tokens_and_logprobs(out_major)
    assert tokens_c == tokens_t
    np.testing.assert_allclose(np.asarray(lp_c), np.asarray(lp_t), atol=2e-5)
    # The caller's params are left as they were (from_params never donates or mutates them).
    assert all(not x.is_deleted() for x in jax.tree.leaves(params))


def test_out_major_structure_and_sharding():
    model = _models()["llama"]
    for m in (model, model.quantized()):
        t = m.out_major()
        params = t.init_params(0)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), t.abstract_params()) == jax.tree.map(
            lambda x: (x.shape, x.dtype), params
        )
        layer = params["layers"][0]

        def stored(w, quantized=m.quantization is not None):  # an OutMajor's values (int8: q8)
            assert isinstance(w, OutMajor)
            return w.w.q8 if quantized else w.w

        c = tiny_llama_config(128)
        # [out..., in] with the contracted axes merged: q [n, h, d], o [d, n*h], down [d, f]
        assert stored(layer["attn"]["q"]).shape == (c.num_heads, c.head_dim, c.hidden_size)
        assert stored(layer["attn"]["o"]).shape == (c.hidden_size, c.num_heads * c.head_dim)
        assert stored(layer["mlp"]["down"]).shape == (c.hidden_size, c.intermediate_size)
        embed = params["embed"] if m.quantization is None else params["embed"].q8
        assert embed.shape == (c.vocab_size, c.hidden_size)  # [vocab, d] table: not transposed
        shard = t.shardings(make_mesh("data=2,model=4"))
        assert "model" in str(stored(shard["layers"][0]["mlp"]["up"]).spec)


def test_grouped_scales_survive_merged_axes():
    """o [n, h, d] is grouped along h; merged to [d, n*h] its groups must stay contiguous."""
    rng = np.random.default_rng(0)
    names = ("heads", "head_dim", "embed")
    w = rng.normal(size=(3, 64, 8)).astype(np.float32) * rng.uniform(0.1, 5, size=(3, 64, 1)).astype(
        np.float32
    )
    q = quant.quantize_array(w, quant.reduced_axes(names))
    assert q.scale.shape == (1, 2, 8)  # two groups of 32 along head_dim
    packed = quant.transpose_params({"o": q}, {"o": names})["o"]
    assert packed.w.q8.shape == (8, 3 * 64) and packed.w.scale.shape == (8, 3 * 2)
    deq = np.asarray(packed.w.dequantize(np.float32))  # [d, n*h]
    ref = np.asarray(quant.dequantize_array(q, np.float32)).transpose(2, 0, 1).reshape(8, -1)
    np.testing.assert_array_equal(deq, ref)


def test_sharded_out_major_equals_unsharded():
    model = _models()["llama"]
    params = perturbed_params(model, 1)
    ref, _ = _tokens_and_logprobs(LLM.from_params(model, params, config=CONFIG, layout="canonical"))
    mesh = make_mesh("data=2,model=4")
    sharded = LLM.from_params(model, params, config=CONFIG, mesh=mesh, layout="out_major")
    assert _tokens_and_logprobs(sharded)[0] == ref


def test_layout_choice_and_errors():
    model = _models()["llama"]
    params = model.init_params(0)
    assert LLM.from_params(model, params, config=CONFIG).model.transposed  # auto: one slot on CPU
    eight = GenerationConfig(max_batch=8, max_len=64, prefill_buckets=(16,))
    assert not LLM.from_params(model, params, config=eight).model.transposed
    with pytest.raises(ConfigError, match="layout='rows'"):
        LLM.from_params(model, params, config=CONFIG, layout="rows")
