"""Two small example models that ship with jinfer: an NNX text classifier and a Linen image classifier.

They show the forward contract the generic `Engine` expects:
`forward(params, inputs[b, t, ...], mask[b, t]) -> outputs[b, ...]`, where `mask` marks real
(non-padding) positions along the bucketed sequence dimension.

Einsum letters: b batch, t sequence, d model dim, f hidden (mlp), c classes.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jinfer.models.registry import ModelSpec, register


@dataclasses.dataclass(frozen=True)
class TextClassifierConfig:
    vocab_size: int = 1000
    embed_dim: int = 64
    hidden_dim: int = 128
    num_layers: int = 2
    num_classes: int = 4


class TextClassifier(nnx.Module):
    """Token embedding -> residual MLP blocks -> masked mean pool -> class logits."""

    def __init__(self, config: TextClassifierConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.config = config
        self.embed = nnx.Param(
            nnx.with_partitioning(init, ("vocab", "embed"))(
                rngs.params(), (config.vocab_size, config.embed_dim)
            )
        )
        self.up = nnx.List(
            [
                nnx.Param(
                    nnx.with_partitioning(init, ("embed", "mlp"))(
                        rngs.params(), (config.embed_dim, config.hidden_dim)
                    )
                )
                for _ in range(config.num_layers)
            ]
        )
        self.down = nnx.List(
            [
                nnx.Param(
                    nnx.with_partitioning(init, ("mlp", "embed"))(
                        rngs.params(), (config.hidden_dim, config.embed_dim)
                    )
                )
                for _ in range(config.num_layers)
            ]
        )
        self.head = nnx.Param(
            nnx.with_partitioning(init, ("embed", "classes"))(
                rngs.params(), (config.embed_dim, config.num_classes)
            )
        )

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """tokens [b, t] int32, mask [b, t] bool -> logits [b, c] float32."""
        x = jnp.take(self.embed[...], tokens, axis=0)
        for up, down in zip(self.up, self.down, strict=True):
            h = jax.nn.gelu(jnp.einsum("btd,df->btf", x, up[...]))
            x = x + jnp.einsum("btf,fd->btd", h, down[...])
        m = mask.astype(x.dtype)[..., None]
        pooled = (x * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)
        return jnp.einsum("bd,dc->bc", pooled, self.head[...]).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ImageClassifierConfig:
    height: int = 16
    width: int = 16
    channels: int = 3
    features: int = 16
    num_classes: int = 10


class ImageClassifier(nn.Module):
    """Conv -> ReLU -> global average pool -> Dense (Linen, logical axes annotated)."""

    config: ImageClassifierConfig

    @nn.compact
    def __call__(self, images: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """images [b, h, w, channels] -> logits [b, c]. `mask` is unused (fixed-size inputs)."""
        del mask
        cfg = self.config
        x = nn.Conv(
            cfg.features,
            (3, 3),
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, "channels", "features")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("features",)),
        )(images)
        x = nn.relu(x).mean(axis=(1, 2))
        x = nn.Dense(
            cfg.num_classes,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("features", "classes")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
        )(x)
        return x.astype(jnp.float32)


register(
    ModelSpec(
        name="TextClassifier", config_cls=TextClassifierConfig, module_cls=TextClassifier, task="classifier"
    )
)
register(
    ModelSpec(
        name="ImageClassifier",
        config_cls=ImageClassifierConfig,
        module_cls=ImageClassifier,
        task="classifier",
        framework="linen",
        example_inputs=lambda c: (jnp.zeros((1, c.height, c.width, c.channels), jnp.float32),),
    )
)
