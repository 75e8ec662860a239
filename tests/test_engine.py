"""Engine: sharded parity, one executable per bucket, compile counts, input errors, fixed shapes."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer import checkpoint
from jinfer.buckets import Buckets
from jinfer.compile import count_compiles
from jinfer.engine import Engine
from jinfer.errors import ConfigError, EmptyInputError, EngineClosedError, InputError, SequenceTooLongError
from jinfer.modeling import FlaxModel
from jinfer.models.classifiers import ImageClassifierConfig, TextClassifierConfig
from jinfer.sharding import make_mesh

TEXT_CFG = TextClassifierConfig(vocab_size=64, embed_dim=16, hidden_dim=32, num_layers=1, num_classes=4)
BUCKETS = Buckets(batch_sizes=(1, 2, 4, 8), seq_lens=(8, 16, 32))


@pytest.fixture(scope="module")
def text_model():
    model = FlaxModel.from_name("TextClassifier", TEXT_CFG)
    return model, model.init_params(seed=0)


def _examples(n, seed=0, max_len=32):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, TEXT_CFG.vocab_size, size=int(rng.integers(1, max_len + 1))) for _ in range(n)]


def _reference(model, params, examples):
    """Unpadded, unbucketed, one example at a time."""
    fn = jax.jit(model.apply_fn())
    return [np.asarray(fn(params, x[None].astype(np.int32), np.ones((1, len(x)), bool))[0]) for x in examples]


def test_sharded_engine_matches_unsharded_and_unpadded(text_model):
    model, params = text_model
    examples = _examples(11, seed=1)
    plain = Engine(model, params, buckets=BUCKETS)
    sharded = Engine(model, params, buckets=BUCKETS, mesh=make_mesh("data=2,model=4"))
    assert sharded.params["up"][0].sharding.spec == jax.sharding.PartitionSpec(None, "model")
    a, b = plain.predict(examples), sharded.predict(examples)
    ref = _reference(model, params, examples)
    assert len(a) == len(b) == 11 and a[0].shape == (4,) and a[0].dtype == np.float32
    # f32 logits ~1e-2; sharded reductions and padding change the summation order only.
    np.testing.assert_allclose(np.stack(b), np.stack(a), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack(a), np.stack(ref), rtol=1e-5, atol=1e-6)
    # The same executable on the same inputs is deterministic: bitwise equal.
    assert all(np.array_equal(x, y) for x, y in zip(a, plain.predict(examples), strict=True))


def test_compiles_at_most_one_per_bucket_and_none_after_warmup(text_model):
    model, params = text_model
    engine = Engine(model, params, buckets=BUCKETS)
    rng = np.random.default_rng(2)
    examples = _examples(500, seed=3)
    with count_compiles() as compiles:
        start, outputs = 0, []
        while start < len(examples):
            size = int(rng.integers(1, 20))
            outputs += engine.predict(examples[start : start + size])
            start += size
    assert len(outputs) == 500
    assert 1 <= compiles.count <= len(BUCKETS) == 12
    stats = engine.stats
    assert stats.compiles <= 12 and stats.examples_served == 500
    assert sum(stats.bucket_hits.values()) == stats.calls
    assert stats.real_elements == sum(len(x) for x in examples)
    assert 0.3 < stats.padding_efficiency < 1.0
    times = engine.warmup()
    assert set(times) == set(BUCKETS.keys()) and engine.stats.compiles == 12
    with count_compiles() as after:
        engine.predict(_examples(100, seed=4))
        engine.predict([np.array([5])])
    assert after.count == 0


def test_input_errors_name_the_example_and_engine_keeps_serving(text_model):
    model, params = text_model
    engine = Engine(model, params, buckets=BUCKETS)
    good = _examples(3, seed=5)
    too_long = np.ones(40, np.int64)
    with pytest.raises(
        SequenceTooLongError, match=r"example 2 has length 40; the largest sequence bucket is 32"
    ):
        engine.predict([good[0], good[1], too_long])
    with pytest.raises(EmptyInputError, match="example 0"):
        engine.predict([np.zeros(0, np.int32)])
    with pytest.raises(InputError, match="dtype float32"):
        engine.predict([np.ones(4, np.float32)])
    with pytest.raises(InputError, match=r"shape \(2, 3\)"):
        engine.predict([np.ones((2, 3), np.int32)])
    assert engine.stats.calls == 0  # validation happens before any device work
    truncated = engine.predict([too_long, good[0]], truncate=True)
    expected = engine.predict([too_long[:32], good[0]])
    np.testing.assert_array_equal(truncated[0], expected[0])
    engine.close()
    with pytest.raises(EngineClosedError):
        engine.predict(good)


def test_plain_callable_per_token_outputs():
    def forward(params, tokens, mask):
        h = params["w"][tokens] * mask[..., None]
        return {"tokens": h, "pooled": h.sum(axis=1)}

    params = {"w": jnp.arange(20.0).reshape(10, 2)}
    engine = Engine(
        forward,
        params,
        buckets=Buckets((1, 2), (4, 8)),
        per_token_outputs=True,
        mesh=make_mesh("data=2,model=4"),
    )
    outs = engine.predict([np.array([1, 2, 3, 4, 5]), np.array([3])])
    assert outs[0]["tokens"].shape == (5, 2) and outs[1]["tokens"].shape == (1, 2)
    np.testing.assert_array_equal(outs[1]["tokens"], [[6.0, 7.0]])
    np.testing.assert_array_equal(outs[0]["pooled"], np.arange(20.0).reshape(10, 2)[1:6].sum(0))


def test_linen_image_classifier_fixed_shape():
    cfg = ImageClassifierConfig(height=8, width=8, channels=3, features=8, num_classes=5)
    model = FlaxModel.from_name("ImageClassifier", cfg)
    params = model.init_params(seed=0)
    engine = Engine(
        model, params, buckets=Buckets(batch_sizes=(1, 4), seq_lens=None), mesh=make_mesh("data=2,model=4")
    )
    assert engine.example_shape == (8, 8, 3) and engine.input_dtype == np.float32
    images = list(np.random.default_rng(0).normal(size=(5, 8, 8, 3)).astype(np.float32))
    with count_compiles() as compiles:
        outs = engine.predict(images)
    assert compiles.count == 2 and engine.stats.bucket_hits == {(4, None): 1, (1, None): 1}
    ref = np.asarray(model.apply_fn()(params, np.stack(images)))
    np.testing.assert_allclose(np.stack(outs), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="expected"):
        engine.predict([np.zeros((8, 8, 1), np.float32)])


def test_from_model_dir(tmp_path, text_model):
    from jinfer.checkpoint import save_model_dir

    model, params = text_model
    save_model_dir(tmp_path / "m", "TextClassifier", TEXT_CFG, params)
    engine = Engine.from_model_dir(tmp_path / "m", mesh=make_mesh("data=2,model=4"), buckets=BUCKETS)
    examples = _examples(5, seed=6)
    np.testing.assert_allclose(
        np.stack(engine.predict(examples)),
        np.stack(_reference(model, params, examples)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_persistent_cache_from_env(tmp_path):
    """Second process loads every executable from $JINFER_COMPILATION_CACHE."""
    script = textwrap.dedent("""
        import numpy as np
        from jinfer.buckets import Buckets
        from jinfer.compile import COMPILES
        from jinfer.engine import Engine
        eng = Engine(lambda p, x, m: (p["w"] * x * m).sum(-1), {"w": np.float32(2.0)},
                     buckets=Buckets((1, 2), (4,)), input_dtype=np.float32)
        eng.warmup()
        print("HITS", COMPILES.cache_hits)
    """)
    env = {**os.environ, "JINFER_COMPILATION_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = [
        subprocess.run(
            [sys.executable, "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
        )
        for _ in range(2)
    ]
    hits = [int(r.stdout.split("HITS")[-1]) if r.returncode == 0 else r.stderr for r in runs]
    assert hits == [0, 2]


def test_registered_nnx_model_runs_in_eval_mode(tmp_path):
    """A registered NNX class with BatchNorm and Dropout, served through Engine(FlaxModel, state),
    runs as `module.eval()` does (running statistics, no dropout): not in training mode on the
    padded bucket, where an example's output depended on the padding beside it."""
    import dataclasses

    from flax import nnx

    from jinfer.models.registry import ModelSpec, register

    @dataclasses.dataclass(frozen=True)
    class TaggerConfig:
        vocab_size: int = 50
        dim: int = 16

    class EvalModeTagger(nnx.Module):
        def __init__(self, cfg, rngs):
            self.emb = nnx.Embed(cfg.vocab_size, cfg.dim, rngs=rngs)
            self.bn = nnx.BatchNorm(cfg.dim, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.out = nnx.Linear(cfg.dim, 3, rngs=rngs)

        def __call__(self, tokens, mask):
            x = self.drop(self.bn(self.emb(tokens)))
            m = mask[..., None]
            return self.out((x * m).sum(1) / m.sum(1))

    register(
        ModelSpec(
            name="EvalModeTagger", config_cls=TaggerConfig, module_cls=EvalModeTagger, task="classifier"
        )
    )
    module = EvalModeTagger(TaggerConfig(), nnx.Rngs(0))
    module.bn.mean[...], module.bn.var[...] = jnp.ones(16), jnp.full(16, 4.0)  # "trained" statistics
    engine = Engine(
        FlaxModel.from_name("EvalModeTagger", TaggerConfig()), nnx.to_pure_dict(nnx.state(module))
    )
    x = np.arange(1, 6)
    module.eval()
    want = np.asarray(module(x[None].astype(np.int32), np.ones((1, 5), bool)))[0]
    np.testing.assert_allclose(engine.predict([x])[0], want, atol=1e-5)
    np.testing.assert_allclose(engine.predict([x, np.arange(7, 20)])[0], want, atol=1e-5)  # batch-independent
    # Random parameters of the same class (examples, tests) have the whole structure: BatchNorm's
    # statistics too (init_params returned only the Params, and Engine raised a pytree mismatch).
    model = FlaxModel.from_name("EvalModeTagger", TaggerConfig())
    params = model.init_params(0)
    assert set(params["bn"]) == {"scale", "bias", "mean", "var"}
    fresh = EvalModeTagger(TaggerConfig(), nnx.Rngs(0))
    fresh.eval()
    want = np.asarray(fresh(x[None].astype(np.int32), np.ones((1, 5), bool)))[0]
    np.testing.assert_allclose(Engine(model, params).predict([x])[0], want, atol=1e-5)
    # The module's whole state (Dropout's RNG stream included) saves and restores as a model dir.
    checkpoint.save_model_dir(
        tmp_path / "tagger", "EvalModeTagger", TaggerConfig(), nnx.to_pure_dict(nnx.state(fresh))
    )
    restored_model, restored, _ = checkpoint.load_model_dir(tmp_path / "tagger")
    np.testing.assert_allclose(Engine(restored_model, restored).predict([x])[0], want, atol=1e-5)
    # Params only (no BatchNorm statistics): an error naming what is missing.
    with pytest.raises(ConfigError, match=r"missing \['bn/mean', 'bn/var'\], unexpected \[\]"):
        Engine(model, nnx.to_pure_dict(nnx.state(fresh, nnx.Param)))
