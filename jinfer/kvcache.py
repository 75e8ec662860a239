"""The KV cache: an explicit pytree passed into and returned from every decoder forward.

Layout per layer: k, v are [b, s, kv_heads, head_dim] (logical axes below). Slots are indexed by
absolute token position: the token at position p of a sequence lives at cache[:, p]. A forward
with positions `pos[b, t]` writes its keys/values at those positions (negative positions are
padding: not written) and lets the query at position p attend to cache slots j <= p. Stale entries
from an earlier occupant of a row sit at positions > p and are therefore never attended.

Letters: b batch (decode slots), s cache length, k kv heads, h head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

CACHE_AXES = ("batch", "cache_length", "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys and values, each [b, s, kv_heads, head_dim]."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(
        cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype: Any = jnp.float32
    ) -> KVCache:
        shape = (batch, max_len, kv_heads, head_dim)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
        )

    @classmethod
    def abstract(
        cls,
        num_layers: int,
        batch: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: Any = jnp.float32,
        sharding: Any = None,
    ) -> KVCache:
        spec = jax.ShapeDtypeStruct((batch, max_len, kv_heads, head_dim), dtype, sharding=sharding)
        return cls(k=(spec,) * num_layers, v=(spec,) * num_layers)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in (*self.k, *self.v))


def write(cache_layer: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Writes new[b, t, k, h] at cache_layer[b, positions[b, t]]; negative positions are dropped."""
    b, t = positions.shape
    s = cache_layer.shape[1]
    # Out-of-range indices are dropped by mode="drop"; map padding (-1) out of range, since
    # negative indices would otherwise wrap around to the end of the cache.
    pos = jnp.where(positions < 0, s, positions)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    return cache_layer.at[rows, pos].set(new.astype(cache_layer.dtype), mode="drop")


def attention_mask(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """Causal mask [b, t, s]: query at p sees keys at 0 <= j <= p; padding queries see nothing."""
    q = q_positions[:, :, None]
    k = k_positions[:, None, :]
    return (k <= q) & (k >= 0) & (q >= 0)
