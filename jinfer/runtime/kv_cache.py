"""The KV cache manager: decode slots, the prefix cache's blocks, and prefill through them.

A prompt is prefilled in blocks of `prefill_block` tokens at fixed split points (multiples of the
block), each block by the same executable whatever the prefix cache holds: so a block taken from
the cache holds exactly the bits that recomputing it would give, and a request's tokens and
logprobs are bitwise identical with the cache on or off. The block that holds the prompt's last
token is always computed (its logits sample the first token); every full block computed is
offered to the cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import jax
import numpy as np

from jinfer.runtime.prefix_cache import PrefixCache, block_hashes
from jinfer.runtime.runner import ModelRunner


class KVCacheManager:
    """Allocates decode slots (rows of the runner's KV cache) and prefix-cache pool blocks."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        cfg = runner.config
        self.block = cfg.prefill_block
        self._free_slots = list(range(cfg.max_batch - 1, -1, -1))
        budget = cfg.cache_budget_blocks
        self.prefix = PrefixCache(budget) if budget else None
        identity = repr((runner.model.spec.name, runner.model.config, str(runner.dtype), self.block))
        self._identity = hashlib.blake2b(identity.encode(), digest_size=16).digest()

    # -- slots -------------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def _identity_for(self, prompt_len: int) -> bytes:
        """What a prompt's cached blocks are keyed under besides their tokens: the model, and for
        a LongRoPE model whether the prompt is past the original context (its keys are then
        rotated with the long factors, and must not serve a shorter prompt's, nor the reverse)."""
        since = getattr(self.runner.model.config, "long_rope_from", None)
        return self._identity if since is None or prompt_len <= since else self._identity + b"long"

    def allocate_slots(self, n: int) -> list[int]:
        """n free slots (lowest first); the caller checked `free_slots >= n`."""
        return [self._free_slots.pop() for _ in range(n)]

    def move_slot(self, src: int, dst: int) -> None:
        """The request in slot `src` now lives in the free slot `dst` (its row was copied)."""
        self._free_slots.remove(dst)
        self.free_slot(src)

    def free_slot(self, slot: int) -> None:
        self._free_slots.append(slot)
        self._free_slots.sort(reverse=True)

    # -- prefill -----------------------------------------------------------------------------------
    def prefill(self, slot: int, prompt: Sequence[int]) -> tuple[jax.Array, int]:
        """Fills `slot`'s row with the prompt's keys/values; returns (last token's logits, prompt
        tokens taken from the prefix cache)."""
        p, n = self.block, len(prompt)
        keys: list[bytes] = []
        hit: list[int] = []
        if self.prefix is not None:
            keys = block_hashes(prompt, p, self._identity_for(n), n // p)
            hit = self.prefix.match(keys[: (n - 1) // p])  # never the last token's block
        try:
            for i, index in enumerate(hit):
                self.runner.load_block(slot, i * p, index)
            logits = None
            for start in range(len(hit) * p, n, p):
                piece = prompt[start : start + p]
                logits = self.runner.prefill(slot, piece, start, n)
                if len(piece) == p and self.prefix is not None:
                    self._offer(keys[start // p], slot, start)
        finally:
            if self.prefix is not None:
                self.prefix.touch(keys[::-1])
                self.prefix.unpin(keys[: len(hit)])
        return logits, len(hit) * p

    def prefill_many(
        self, slots: Sequence[int], prompts: Sequence[Sequence[int]]
    ) -> list[tuple[jax.Array | np.ndarray, int]]:
        """`prefill` of several prompts, each into its slot, in order. Prompts of one block or
        less (the prefix cache never holds anything for them: their last token's block is always
        computed) run `runner.prefill_rows` per call when at least two do; the others run as in
        `prefill`, each looking up the prefix cache at its turn. Returns what `prefill` returns,
        per prompt."""
        p, rows = self.block, self.runner.prefill_rows
        out: list = [None] * len(prompts)
        short = sorted((i for i, x in enumerate(prompts) if len(x) <= p), key=lambda i: len(prompts[i]))
        if rows > 1 and len(short) > 1:
            for g in range(0, len(short), rows):
                group = short[g : g + rows]
                if len(group) == 1:
                    break  # alone: the one-prompt program, below
                group_slots = [slots[i] for i in group]
                logits = self.runner.prefill_first_pieces(group_slots, [prompts[i] for i in group])
                for j, i in enumerate(group):
                    out[i] = (logits[j : j + 1], 0)
                    if len(prompts[i]) == p and self.prefix is not None:
                        identity = self._identity_for(len(prompts[i]))
                        self._offer(block_hashes(prompts[i], p, identity, 1)[0], slots[i], 0)
        for i, (slot, prompt) in enumerate(zip(slots, prompts, strict=True)):
            if out[i] is None:
                out[i] = self.prefill(slot, prompt)
        return out

    def _offer(self, key: bytes, slot: int, start: int) -> None:
        if self.prefix.contains(key):
            return
        index = self.prefix.insert(key)
        if index is None:
            return
        try:
            self.runner.save_block(slot, start, index)
        except BaseException:
            self.prefix.discard(key)
            raise

    # -- accounting --------------------------------------------------------------------------------
    def gauges(self) -> dict[str, int]:
        cfg = self.runner.config
        return {
            "cache_blocks_used": len(self.prefix) if self.prefix else 0,
            "cache_blocks_total": cfg.cache_budget_blocks,
            "cache_blocks_evicted": self.prefix.evicted if self.prefix else 0,
            "slots_free": self.free_slots,
        }
