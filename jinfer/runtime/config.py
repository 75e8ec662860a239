"""GenerationConfig: the static shape of the generation runtime (what gets compiled) and its budgets."""

from __future__ import annotations

import dataclasses

from jinfer.errors import ConfigError

SMALL_DECODE_BUCKET = 8  # automatic decode buckets: 1, then 8, 16, ... (see decode_buckets)
PREFILL_ROWS = 4  # automatic prefill_rows (see GenerationConfig)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Static shape of the generation runtime (everything that decides what gets compiled).

    Attributes:
      max_batch: decode slots (requests generating at once).
      max_len: cache length per slot: prompt + generated tokens must fit.
      prefill_buckets: prompt lengths prefill is compiled for.
      decode_steps: decode steps run on device per host round trip.
      max_logprobs: top-n log-probabilities computed on device (a request may ask for <= this).
      prefill_chunk: prompt tokens per prefill call (must be a bucket); it is then also the
        prefill block (below). Every prompt is prefilled in chunks, so prompts of up to
        max_len - 1 tokens are accepted whether it is set or not (None: the automatic block).
      cache_dtype: dtype of the KV cache; None = the params' compute dtype (that of the norms:
        float32 when only the weight matrices are bfloat16).
      cache_block: positions per KV-cache block (decode skips the blocks no slot has reached; see
        jinfer.kvcache); None = automatic: 64 positions (or max_len if smaller). Measured on
        SmolLM2-135M: 32 slots at max_len 512 decode 1.3-1.5x faster than with one block; one
        slot at max_len 2048 (what `jinfer generate` builds) 1.6x faster (43 vs 24-28 tok/s), and
        at max_len 256 the same (see BENCHMARKS.md). The cache holds max_len rounded up to whole
        blocks.
      prefix_block: prompt tokens per prefill block (`prefill_block`); None = `prefill_chunk` if
        set, else the largest bucket <= 64 (else the smallest bucket). Every prompt is prefilled
        in chunks at multiples of this size, whatever the prefix cache holds, so that a cached
        block holds exactly the bits that recomputing it gives.
      prefix_cache: reuse the keys/values of full prompt blocks across requests (automatic prefix
        caching; outputs are bitwise identical with it on or off).
      prefix_cache_blocks: blocks the prefix cache may hold (its memory budget); None = a quarter
        of the positions the decode slots hold, at least max_len (allocated at the first block
        saved).
      max_queue: requests that may wait for a slot before `LLM.submit` raises OverloadedError
        (None: unbounded). `generate()` calls are not bounded by it.
      decode_buckets: active-slot counts the decode step is compiled for; each decode round runs
        at the smallest one holding the live requests (kept in the lowest slots), so one request
        alone on a many-slot engine decodes at one-slot speed. None = automatic: 1, then 8, 16,
        32, ... and max_batch (on a mesh: the data-parallel size d instead of 1, and multiples of
        d). No 2 or 4: a decode step of 2-8 rows costs about the same, bound by reading the
        weights (SmolLM2-135M f32 on XLA:CPU: 2, 4 and 8 rows within 20 % per round, 1 row 1.5x
        cheaper), and each bucket is one more compile. max_batch is always included.
      batch_invariant: one decode shape (max_batch rows) for every round, as in a fixed-shape
        engine: a request's tokens and logprobs are then bitwise independent of how many requests
        decode beside it (decode buckets run different matrix shapes, whose results may differ in
        the last bits on XLA:CPU). Off by default: buckets are faster for few live requests.
      prefill_rows: prompts prefilled together in one call (their first block each, padded to
        one bucket), when that many are admitted at once; the rest run one per call. None =
        automatic: `PREFILL_ROWS` on a one-device engine of at least 8 slots, else 1 (and always 1
        with `batch_invariant`: rows of one call may differ in the last bits from the same
        prompt run alone). On XLA:CPU the matrix products of 4 prompts of 64 tokens cost 0.71 ms
        per token against 1.22 ms for one (SmolLM2-135M f32, BENCHMARKS.md).
    """

    max_batch: int = 8
    max_len: int = 1024
    prefill_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    decode_steps: int = 8
    max_logprobs: int = 5
    prefill_chunk: int | None = None
    cache_dtype: str | None = None
    cache_block: int | None = None
    prefix_block: int | None = None
    prefix_cache: bool = True
    prefix_cache_blocks: int | None = None
    max_queue: int | None = None
    decode_buckets: tuple[int, ...] | None = None
    batch_invariant: bool = False
    prefill_rows: int | None = None

    def __post_init__(self):
        buckets = tuple(sorted(set(int(b) for b in self.prefill_buckets)))
        object.__setattr__(self, "prefill_buckets", buckets)
        if self.max_batch < 1 or self.max_len < 2 or self.decode_steps < 1 or not buckets:
            raise ConfigError(
                f"GenerationConfig: max_batch={self.max_batch}, max_len={self.max_len}, "
                f"decode_steps={self.decode_steps}, prefill_buckets={buckets}: need max_batch >= 1, "
                "max_len >= 2, decode_steps >= 1 and at least one prefill bucket"
            )
        if buckets[0] < 1 or buckets[-1] > self.max_len:
            raise ConfigError(f"prefill buckets {buckets} must lie in [1, max_len={self.max_len}]")
        if self.prefill_chunk is not None and self.prefill_chunk not in buckets:
            raise ConfigError(f"prefill_chunk={self.prefill_chunk} must be one of the buckets {buckets}")
        if self.cache_block is not None and not 1 <= self.cache_block <= self.max_len:
            raise ConfigError(f"cache_block={self.cache_block} must lie in [1, max_len={self.max_len}]")
        if self.prefix_block is not None and self.prefix_block not in buckets:
            raise ConfigError(f"prefix_block={self.prefix_block} must be one of the buckets {buckets}")
        if self.prefix_cache_blocks is not None and self.prefix_cache_blocks < 0:
            raise ConfigError(f"prefix_cache_blocks={self.prefix_cache_blocks} must be >= 0")
        if self.decode_buckets is not None:
            sizes = tuple(sorted(set(int(b) for b in self.decode_buckets) | {self.max_batch}))
            if sizes[0] < 1 or sizes[-1] > self.max_batch:
                raise ConfigError(
                    f"decode_buckets {tuple(self.decode_buckets)} must lie in [1, max_batch={self.max_batch}]"
                )
            object.__setattr__(self, "decode_buckets", sizes)
        if self.prefill_rows is not None and not 1 <= self.prefill_rows <= self.max_batch:
            raise ConfigError(f"prefill_rows={self.prefill_rows} must lie in [1, max_batch={self.max_batch}]")
        if self.max_queue is not None and self.max_queue < 0:
            raise ConfigError(f"max_queue={self.max_queue} must be >= 0 (or None: unbounded)")

    @property
    def block(self) -> int:
        """Positions per KV-cache block (`cache_block`, or the automatic choice)."""
        if self.cache_block is not None:
            return self.cache_block
        return min(self.max_len, 64)

    @property
    def prefill_block(self) -> int:
        """Prompt tokens per prefill chunk and per prefix-cache block (see `prefix_block`)."""
        if self.prefix_block is not None:
            return self.prefix_block
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        small = [b for b in self.prefill_buckets if b <= 64]
        return small[-1] if small else self.prefill_buckets[0]

    @property
    def prefill_chunk_buckets(self) -> tuple[int, ...]:
        """The buckets prefill chunks run at (those up to `prefill_block`)."""
        return tuple(b for b in self.prefill_buckets if b <= self.prefill_block)

    @property
    def cache_budget_blocks(self) -> int:
        """Blocks the prefix cache holds (0 when it is off)."""
        if not self.prefix_cache:
            return 0
        if self.prefix_cache_blocks is not None:
            return self.prefix_cache_blocks
        positions = max(self.max_len, self.max_batch * self.max_len // 4)
        return -(-positions // self.prefill_block)

    def decode_batch_buckets(self, multiple: int = 1) -> tuple[int, ...]:
        """Active-slot counts decode is compiled for (see `decode_buckets`); automatic ones are
        multiples of `multiple` (the mesh's data-parallel size, which the slot rows are split over)."""
        if self.batch_invariant:
            return (self.max_batch,)
        if self.decode_buckets is not None:
            return self.decode_buckets
        sizes, b = {self.max_batch, min(multiple, self.max_batch)}, SMALL_DECODE_BUCKET
        while b < self.max_batch:
            if b % multiple == 0:
                sizes.add(b)
            b *= 2
        return tuple(sorted(sizes))

    def prefill_batch_rows(self, devices: int = 1) -> int:
        """Prompts per batched prefill call on an engine of `devices` devices (1: no batching)."""
        if self.batch_invariant:
            return 1
        if self.prefill_rows is not None:
            return self.prefill_rows
        return PREFILL_ROWS if devices == 1 and self.max_batch >= 2 * PREFILL_ROWS else 1

    @property
    def max_prompt_len(self) -> int:
        """Prompts are prefilled in chunks of `prefill_block`: any length the cache holds with
        room for one generated token."""
        return self.max_len - 1

    def compiled_shape(self) -> GenerationConfig:
        """This config without the host-side budgets (they change no compiled program)."""
        return dataclasses.replace(self, prefix_cache=True, prefix_cache_blocks=None, max_queue=None)
