"""A tiny research-style training run, so the notebook and docs can start from a real checkpoint.

`TinyResNet` is written the way research code is (BatchNorm, Dropout, a `train` flag);
`train_tiny_resnet(dir)` trains it a few steps with optax adam on random data and saves a
`TrainState` with `ocp.CheckpointManager` every step. Nothing here is used by jinfer itself.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SHAPE = (32, 32, 3)


class TinyResNet(nn.Module):
    """One residual block of two 3x3 convs with BatchNorm, Dropout before the classifier."""

    num_classes: int = 10
    width: int = 16

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.relu(nn.Conv(self.width, (3, 3))(x))
        y = nn.Conv(self.width, (3, 3), use_bias=False)(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
        y = nn.Conv(self.width, (3, 3), use_bias=False)(y)
        y = nn.BatchNorm(use_running_average=not train)(y)
        x = nn.relu(x + y).mean(axis=(1, 2))
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


def train_tiny_resnet(ckpt_dir: str | os.PathLike, steps: int = 3, batch: int = 8, seed: int = 0) -> Any:
    """Trains `TinyResNet` for `steps` steps, saving every step; returns the final train state."""
    import optax
    import orbax.checkpoint as ocp
    from flax.training import train_state

    class TrainState(train_state.TrainState):
        batch_stats: Any

    model = TinyResNet()
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *IMAGE_SHAPE)), train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    state = TrainState.create(
        apply_fn=model.apply, params=params, tx=optax.adam(1e-3), batch_stats=batch_stats
    )

    @jax.jit
    def step_fn(state, images, labels, key):
        def loss_fn(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                rngs={"dropout": key},
                mutable=["batch_stats"],
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads).replace(batch_stats=updates["batch_stats"])

    rng = np.random.default_rng(seed)
    with ocp.CheckpointManager(os.fspath(os.path.abspath(ckpt_dir))) as mngr:
        for step in range(steps):
            images = rng.normal(size=(batch, *IMAGE_SHAPE)).astype(np.float32)
            labels = rng.integers(0, 10, size=batch)
            state = step_fn(state, images, labels, jax.random.key(step))
            mngr.save(step, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
    return state
