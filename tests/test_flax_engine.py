"""Engine.from_flax: input specs from one example, pytree inputs/outputs, variable-size images."""

import concurrent.futures

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jinfer
from jinfer.buckets import Buckets
from jinfer.compile import count_compiles
from jinfer.errors import EmptyInputError, InputError, SequenceTooLongError
from jinfer.sharding import make_mesh


class SmallCNN(nn.Module):
    """An image classifier as research code writes it: no jinfer-specific arguments."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(5)(x.mean(axis=(1, 2)))


def test_image_model_needs_only_an_example():
    model = SmallCNN()
    images = np.random.default_rng(0).normal(size=(6, 12, 12, 3)).astype(np.float32)
    variables = model.init(jax.random.key(0), images[:1])
    engine = jinfer.Engine.from_flax(model, variables, example=images[0])
    want = np.asarray(model.apply(variables, images))
    got = np.stack(engine.predict(list(images)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    futures = [engine.submit(x) for x in images]
    np.testing.assert_allclose(np.stack([f.result(timeout=60) for f in futures]), want, rtol=1e-5, atol=1e-6)
    # The buckets of the issue's report (default seq_lens): no sequence axis unless one is declared.
    issue_engine = jinfer.Engine.from_flax(
        model, variables, example=images[0], buckets=Buckets(batch_sizes=(1, 4, 8))
    )
    np.testing.assert_allclose(
        np.stack(issue_engine.predict(list(images[:4]))), want[:4], rtol=1e-5, atol=1e-6
    )
    # uint8 pixels are accepted (cast to the example's float32); wrong shapes are refused by name.
    assert engine.predict([np.zeros((12, 12, 3), np.uint8)])[0].shape == (5,)
    with pytest.raises(InputError, match=r"example 0 has shape \(12, 12\); expected \(12, 12, 3\)"):
        engine.predict([np.zeros((12, 12))])
    engine.close()


class ImageText(nn.Module):
    """Two inputs: an image and token ids (variable length, pooled under the padding mask).

    The Dense layers declare logical axes, so on a mesh their kernels are tensor-parallel.
    """

    vocab: int = 50

    @nn.compact
    def __call__(self, batch, mask):
        img = nn.Conv(4, (3, 3))(batch["image"]).mean(axis=(1, 2))  # [b, 4]
        tok = nn.Embed(self.vocab, 16)(batch["tokens"])  # [b, t, 16]
        kernel = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        hidden = nn.relu(nn.Dense(32, kernel_init=kernel)(tok))  # [b, t, 32]
        m = mask[..., None].astype(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1)
        head = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed"))
        logits = nn.Dense(3, kernel_init=head)(jnp.concatenate([pooled, jnp.pad(img, ((0, 0), (0, 28)))], -1))
        return {"logits": logits, "per_token": hidden[..., :2]}


def _pair(rng, length):
    return {
        "image": rng.normal(size=(8, 8, 1)).astype(np.float32),
        "tokens": rng.integers(0, 50, size=length).astype(np.int32),
    }


@pytest.fixture(scope="module")
def image_text():
    model = ImageText()
    example = _pair(np.random.default_rng(0), 5)
    batch = jax.tree.map(lambda x: x[None], example)
    boxed = model.init(jax.random.key(0), batch, np.ones((1, 5), bool))
    return model, boxed, example


def _reference(model, variables, ex):
    """One example, unpadded, through module.apply."""
    out = model.apply(variables, jax.tree.map(lambda x: x[None], ex), np.ones((1, len(ex["tokens"])), bool))
    return jax.tree.map(lambda x: np.asarray(x[0]), out)


@pytest.mark.parametrize("mesh_spec", [None, "data=2,model=4"])
def test_two_input_model_with_pytree_example(image_text, mesh_spec):
    model, boxed, example = image_text
    mesh = None if mesh_spec is None else make_mesh(mesh_spec)
    engine = jinfer.Engine.from_flax(
        model,
        boxed,
        example=example,
        variable_axes={"tokens": {0: "length"}},
        buckets=Buckets(batch_sizes=(1, 2, 4), seq_lens=(4, 8, 16)),
        mask_arg="mask",
        mesh=mesh,
    )
    if mesh is not None:  # logical axes from the module: the Dense kernel is split over "model"
        kernel = engine.params["params"]["Dense_0"]["kernel"]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    rng = np.random.default_rng(1)
    examples = [_pair(rng, int(n)) for n in rng.integers(1, 17, size=9)]
    variables = nn.unbox(boxed)
    for ex, out in zip(examples, engine.predict(examples), strict=True):
        want = _reference(model, variables, ex)
        np.testing.assert_allclose(out["logits"], want["logits"], rtol=1e-5, atol=1e-5)
        assert out["per_token"].shape == (len(ex["tokens"]), 2)  # padding removed per example
        np.testing.assert_allclose(out["per_token"], want["per_token"], rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="dtype float32 but the model input is int32"):
        engine.predict([{"image": example["image"], "tokens": np.zeros(3, np.float32)}])
    with pytest.raises(InputError, match="structure"):
        engine.predict([{"image": example["image"]}])
    # Values the input's dtype cannot hold are refused, not wrapped around or truncated silently.
    wraps = r"input 'tokens' has values in \[5, 4294967301\], outside the model input's int32 range"
    with pytest.raises(InputError, match=wraps):
        engine.predict([{"image": example["image"], "tokens": np.array([5, 2**32 + 5])}])
    complex_ = "input 'image' has dtype complex64 but the model input is float32; pass real numbers"
    with pytest.raises(InputError, match=complex_):
        engine.predict([{"image": example["image"] + 1j, "tokens": example["tokens"]}])
    with pytest.raises(SequenceTooLongError, match="length 17; the largest length bucket is 16"):
        engine.predict([_pair(rng, 17)])
    with pytest.raises(EmptyInputError):
        engine.submit(_pair(rng, 0))
    assert engine.predict([example])[0]["logits"].shape == (3,)  # still serving


def test_logical_axes_apply_to_plain_restored_variables(image_text):
    """Variables restored from a checkpoint are plain arrays (no Partitioned boxes): the module's
    declared logical axes still shard them (they were replicated on every device)."""
    model, boxed, example = image_text
    engine = jinfer.Engine.from_flax(
        model,
        nn.unbox(boxed),
        example=example,
        variable_axes={"tokens": {0: "length"}},
        buckets=Buckets(batch_sizes=(1, 2), seq_lens=(8,)),
        mask_arg="mask",
        mesh=make_mesh("data=2,model=4"),
    )
    kernel = engine.params["params"]["Dense_0"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    want = _reference(model, nn.unbox(boxed), example)
    np.testing.assert_allclose(engine.predict([example])[0]["logits"], want["logits"], rtol=1e-5, atol=1e-5)


def test_random_sizes_compile_once_per_bucket_and_never_after_warmup(image_text):
    model, boxed, example = image_text
    buckets = Buckets(batch_sizes=(1, 2, 4), seq_lens=(4, 8, 16))
    engine = jinfer.Engine.from_flax(
        model,
        boxed,
        example=example,
        variable_axes={"tokens": {0: "length"}},
        buckets=buckets,
        mask_arg="mask",
    )
    rng = np.random.default_rng(2)
    requests = [_pair(rng, int(n)) for n in rng.integers(1, 17, size=500)]
    with count_compiles() as compiles:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # submit from several threads
            futures = list(pool.map(engine.submit, requests[:250]))
        outputs = [f.result(timeout=120) for f in futures]
        start = 250
        while start < 500:
            size = int(rng.integers(1, 9))
            outputs += engine.predict(requests[start : start + size])
            start += size
    assert len(outputs) == 500 and engine.stats.examples_served == 500
    assert 1 <= compiles.count <= 9 and engine.stats.compiles <= 9  # 3 batch x 3 length buckets
    assert [o["per_token"].shape[0] for o in outputs] == [len(r["tokens"]) for r in requests]
    engine.warmup()
    assert engine.stats.compiles == 9
    with count_compiles() as after:
        engine.predict([_pair(rng, int(n)) for n in rng.integers(1, 17, size=50)])
        engine.submit(_pair(rng, 3)).result(timeout=60)
    assert after.count == 0
    engine.close()


class MaskedPool(nn.Module):
    """Variable-size images: a conv feature map averaged over the real (unpadded) pixels only."""

    @nn.compact
    def __call__(self, x, mask):
        h = nn.relu(nn.Dense(8)(x))  # per pixel, so padding cannot leak into real pixels
        m = mask[..., None].astype(h.dtype)
        return {"pooled": (h * m).sum((1, 2)) / m.sum((1, 2)), "feature_map": h[..., :1]}


def test_variable_size_images_with_height_width_buckets_and_mask():
    model = MaskedPool()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.ones((1, 8, 8), bool))
    engine = jinfer.Engine.from_flax(
        model,
        variables,
        example=np.zeros((8, 8, 3), np.float32),
        variable_axes={0: "height", 1: "width"},
        dim_buckets={"height": (8, 16), "width": (8, 16)},
        buckets=Buckets(batch_sizes=(1, 4), seq_lens=()),
        mask_arg="mask",
    )
    rng = np.random.default_rng(3)
    images = [
        rng.normal(size=(int(h), int(w), 3)).astype(np.float32) for h, w in rng.integers(1, 17, size=(7, 2))
    ]
    for img, out in zip(images, engine.predict(images), strict=True):
        want = model.apply(variables, img[None], np.ones((1, *img.shape[:2]), bool))
        np.testing.assert_allclose(out["pooled"], np.asarray(want["pooled"][0]), rtol=1e-5, atol=1e-6)
        assert out["feature_map"].shape == (*img.shape[:2], 1)  # cut back to the image's size
    assert set(k[1] for k in engine.stats.bucket_hits) <= {(8, 8), (8, 16), (16, 8), (16, 16)}
    with pytest.raises(SequenceTooLongError, match="width 17; the largest width bucket is 16"):
        engine.predict([np.zeros((4, 17, 3), np.float32)])
    cropped = engine.predict([np.zeros((20, 4, 3), np.float32)], truncate=True)[0]
    assert cropped["feature_map"].shape == (16, 4, 1)


def test_unpadding_follows_the_length_not_a_coincidental_size():
    """Output axes are cut back to an example's length only when they follow it: a pooled
    [b, 64] embedding with a single 64-token bucket keeps its 64 features (it came back cut to
    the example's 10), and a pairwise [b, T, T] output is cut on both axes (it kept T padded
    columns)."""

    class Pooled(nn.Module):
        @nn.compact
        def __call__(self, tokens, mask):
            x = nn.Dense(64)(nn.Embed(100, 64)(tokens))
            m = mask[..., None].astype(x.dtype)
            return {"pooled": (x * m).sum(1) / m.sum(1), "pairs": jnp.einsum("btd,bsd->bts", x, x)}

    module, x = Pooled(), np.arange(1, 11, dtype=np.int32)
    variables = module.init(jax.random.key(0), x[None], np.ones((1, 10), bool))
    want = module.apply(variables, x[None], np.ones((1, 10), bool))
    for seq_lens in ((64,), (16, 64)):
        buckets = Buckets(batch_sizes=(1, 4), seq_lens=seq_lens)
        engine = jinfer.Engine.from_flax(
            module, variables, example=x, variable_axes={0: "length"}, buckets=buckets, mask_arg="mask"
        )
        got = engine.predict([x])[0]
        assert got["pooled"].shape == (64,) and got["pairs"].shape == (10, 10)
        np.testing.assert_allclose(got["pooled"], want["pooled"][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["pairs"], want["pairs"][0], rtol=1e-5, atol=1e-4)
