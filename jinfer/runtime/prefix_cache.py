"""Automatic prefix caching: full prompt blocks keyed by a hash chain, least-recently-used eviction.

A block's key hashes its token ids, the previous block's key and the model's identity, so equal
keys mean an equal whole prefix on the same model. Each cached block owns one pool block on
device (see ModelRunner.save_block / load_block). Blocks pinned by a request being admitted are
never evicted; the number of blocks never exceeds the budget.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


def block_hashes(token_ids: Sequence[int], block: int, model_identity: bytes, count: int) -> list[bytes]:
    """Keys of the first `count` full blocks of `token_ids` (a chain: each covers its whole prefix)."""
    keys, prev = [], model_identity
    ids = np.asarray(token_ids[: count * block], np.int64)
    for i in range(count):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(ids[i * block : (i + 1) * block].tobytes())
        prev = h.digest()
        keys.append(prev)
    return keys


class PrefixCache:
    """Host-side index of cached prompt blocks: key -> pool block, LRU order, pins, budget."""

    def __init__(self, budget: int):
        self.budget = budget
        self._blocks: OrderedDict[bytes, int] = OrderedDict()  # key -> pool index, oldest first
        self._pins: dict[bytes, int] = {}
        self._free = list(range(budget - 1, -1, -1))
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """Pool indices of the longest cached run keys[0..m); pins them and marks them recently used."""
        found = []
        for key in keys:
            index = self._blocks.get(key)
            if index is None:
                break
            self._pins[key] = self._pins.get(key, 0) + 1
            found.append(index)
        return found

    def touch(self, keys: Sequence[bytes]) -> None:
        """Marks cached `keys` most recently used, the first given last: pass a chain leaf-first so
        that eviction takes the ends of chains before their shared beginnings."""
        for key in keys:
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def unpin(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            left = self._pins[key] - 1
            if left:
                self._pins[key] = left
            else:
                del self._pins[key]

    def contains(self, key: bytes) -> bool:
        return key in self._blocks

    def insert(self, key: bytes) -> int | None:
        """A pool index for a new block `key` (evicting the least recently used unpinned block if the
        budget is full), or None when every block is pinned (the block is then not cached)."""
        if not self._free:
            victim = next((k for k in self._blocks if k not in self._pins), None)
            if victim is None:
                return None
            self._free.append(self._blocks.pop(victim))
            self.evicted += 1
        index = self._free.pop()
        self._blocks[key] = index
        return index

    def discard(self, key: bytes) -> None:
        """Forgets `key` (its pool block could not be written)."""
        index = self._blocks.pop(key, None)
        if index is not None:
            self._free.append(index)
