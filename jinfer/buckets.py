"""Static shape buckets: padding variable-size examples to a few compiled shapes, and choosing them.

An example is a numpy array whose axis 0 is the sequence axis (`[t, ...]`, e.g. token ids `[t]`),
or, with no sequence buckets, a fixed-shape array (e.g. an image `[h, w, c]`). A device batch has
shape `[b, t, ...]` with `b` a batch bucket and `t` a sequence bucket, plus `mask[b, t]` (True on
real positions; padding rows are all False). Fixed-shape batches are `[b, *example_shape]` with
`mask[b, example_shape[0]]` (or `[b, 1]` for 0-d examples).

`choose_buckets` picks sequence buckets for a length distribution by exact dynamic programming.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jinfer.errors import ConfigError, EmptyInputError, SequenceTooLongError

BucketKey = tuple[int, int | None]  # (batch, seq_len); seq_len is None for fixed-shape inputs


def smallest_bucket(sizes: Sequence[int], n: int) -> int | None:
    """The smallest of the ascending `sizes` that holds `n` (is >= n); None when none does."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def _validated_sizes(name: str, values: Sequence[int] | None, allow_empty: bool) -> tuple[int, ...]:
    values = () if values is None else values
    if isinstance(values, (str, bytes)) or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values
    ):
        raise ConfigError(
            f"Buckets: {name}={values!r} must be a sequence of positive integers, e.g. (16, 32, 64)"
        )
    sizes = tuple(int(v) for v in values)
    if not sizes and not allow_empty:
        raise ConfigError(f"Buckets: {name} must not be empty")
    if any(v <= 0 for v in sizes):
        raise ConfigError(f"Buckets: {name}={sizes} must all be positive")
    if list(sizes) != sorted(set(sizes)):
        raise ConfigError(f"Buckets: {name}={sizes} must be sorted ascending with no duplicates")
    return sizes


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The compiled shapes: every (batch size, sequence length) pair is one executable.

    Attributes:
      batch_sizes: sorted, positive, unique batch (row) buckets.
      seq_lens: sorted, positive, unique sequence-length buckets; empty or None for fixed-shape
        inputs (images), which are padded along the batch axis only.
    """

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    seq_lens: tuple[int, ...] | None = (16, 32, 64, 128)

    def __post_init__(self):
        object.__setattr__(self, "batch_sizes", _validated_sizes("batch_sizes", self.batch_sizes, False))
        object.__setattr__(self, "seq_lens", _validated_sizes("seq_lens", self.seq_lens, True))

    @property
    def has_seq(self) -> bool:
        """True when examples have a padded sequence axis."""
        return bool(self.seq_lens)

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    @property
    def max_seq_len(self) -> int | None:
        return self.seq_lens[-1] if self.seq_lens else None

    def keys(self) -> list[BucketKey]:
        """Every (batch, seq_len) pair, smallest first; seq_len is None for fixed-shape inputs."""
        seqs: tuple[int | None, ...] = self.seq_lens or (None,)
        return [(b, t) for t in seqs for b in self.batch_sizes]

    def __len__(self) -> int:
        return len(self.keys())

    def batch_bucket(self, rows: int) -> int:
        """Smallest batch bucket holding `rows` (1 <= rows <= max_batch)."""
        bucket = smallest_bucket(self.batch_sizes, rows)
        if rows < 1 or bucket is None:
            raise ValueError(f"{rows} rows do not fit batch buckets {self.batch_sizes}")
        return bucket

    def seq_bucket(self, length: int, index: int | str = "?") -> int | None:
        """Smallest sequence bucket >= length (None for fixed-shape); SequenceTooLongError if none."""
        if not self.seq_lens:
            return None
        bucket = smallest_bucket(self.seq_lens, length)
        if bucket is None:
            raise SequenceTooLongError(
                f"example {index} has length {length:,}; the largest sequence bucket is "
                f"{self.seq_lens[-1]:,} (pass truncate=True or add a larger bucket)"
            )
        return bucket


def fit_example(example: np.ndarray, buckets: Buckets, index: int | str = "?", truncate: bool = False):
    """Checks one example's sequence length against the buckets; truncates it when asked.

    Returns the (possibly truncated) example. Raises EmptyInputError for a zero-length sequence
    and SequenceTooLongError (naming the index, the length and the largest bucket) otherwise.
    """
    if not buckets.has_seq:
        return example
    if example.ndim == 0 or example.shape[0] == 0:
        raise EmptyInputError(f"example {index} is empty (shape {example.shape}); it needs length >= 1")
    length = example.shape[0]
    if length > buckets.max_seq_len and truncate:
        return example[: buckets.max_seq_len]
    buckets.seq_bucket(length, index)
    return example


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """One device call: which examples (input indices) go into which bucket."""

    indices: tuple[int, ...]
    batch: int
    seq_len: int | None

    @property
    def key(self) -> BucketKey:
        return (self.batch, self.seq_len)


def plan_batches(lengths: Sequence[int | None], buckets: Buckets) -> list[BatchPlan]:
    """Splits examples into bucketed device calls.

    Examples are sorted by length (stable) and grouped by sequence bucket, so short examples are
    never padded to the longest one of the call; each group is cut into chunks of `max_batch` rows,
    the last chunk padded to the smallest batch bucket that holds it. `lengths` must already fit.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i] or 0)
    groups: dict[int | None, list[int]] = {}
    for i in order:
        groups.setdefault(buckets.seq_bucket(lengths[i], i) if buckets.has_seq else None, []).append(i)
    plans = []
    for seq_len, idx in groups.items():
        for start in range(0, len(idx), buckets.max_batch):
            chunk = tuple(idx[start : start + buckets.max_batch])
            plans.append(BatchPlan(chunk, buckets.batch_bucket(len(chunk)), seq_len))
    return plans


def pad_batch(
    examples: Sequence[np.ndarray], batch: int, seq_len: int | None, dtype: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Pads examples to `inputs[batch, seq_len, ...]` (zeros) and `mask[batch, seq_len]` (True = real).

    Fixed-shape examples (`seq_len=None`) are stacked to `[batch, *shape]` with a mask that is True
    on real rows.
    """
    first = np.asarray(examples[0])
    if seq_len is None:
        inputs = np.zeros((batch, *first.shape), dtype)
        mask = np.zeros((batch, first.shape[0] if first.ndim else 1), bool)
        for r, ex in enumerate(examples):
            inputs[r] = ex
            mask[r] = True
        return inputs, mask
    inputs = np.zeros((batch, seq_len, *first.shape[1:]), dtype)
    mask = np.zeros((batch, seq_len), bool)
    for r, ex in enumerate(examples):
        inputs[r, : ex.shape[0]] = ex
        mask[r, : ex.shape[0]] = True
    return inputs, mask


def unpad_outputs(
    outputs: Any, lengths: Sequence[int | None], seq_len: int | None, per_token: bool = False
) -> list[Any]:
    """Per-example outputs: row r of every output leaf, and with `per_token` the first
    `lengths[r]` entries of axis 1 for leaves whose axis 1 equals the bucket length `seq_len`."""
    import jax

    def take(x, r):
        row = np.asarray(x[r])
        if per_token and seq_len is not None and row.ndim >= 1 and row.shape[0] == seq_len:
            row = row[: lengths[r]]
        return row

    return [jax.tree.map(lambda x, r=r: take(x, r), outputs) for r in range(len(lengths))]


# -- choosing buckets --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BucketReport:
    """How well `choose_buckets`' buckets fit the lengths, against powers of two.

    Efficiencies are real tokens / padded tokens (1.0 = no padding). `quantum` > 1 means lengths were
    rounded up to multiples of it before the search (see `choose_buckets`).
    """

    buckets: tuple[int, ...]
    real_tokens: int
    padded_tokens: int
    efficiency: float
    pow2_buckets: tuple[int, ...]
    pow2_padded_tokens: int
    pow2_efficiency: float
    distinct_lengths: int
    quantum: int


def _padded_tokens(lengths: np.ndarray, buckets: Sequence[int]) -> int:
    b = np.asarray(sorted(buckets))
    return int(b[np.searchsorted(b, lengths, side="left")].sum())


def _pow2_buckets(max_len: int) -> tuple[int, ...]:
    return tuple(2**i for i in range(math.ceil(math.log2(max_len)) + 1))


def _quantum_for(values: np.ndarray, max_distinct: int) -> int:
    quantum = 1
    while len(np.unique(values)) > max_distinct:
        quantum = 8 if quantum == 1 else quantum * 2
        values = -(-values // quantum) * quantum
    return quantum


def _optimal_buckets(values: np.ndarray, counts: np.ndarray, k: int) -> list[int]:
    """Exact DP: best <= k of the distinct sorted `values` (the last always chosen), O(k n^2).

    cover[i, j] = values[j] * (C[j+1] - C[i]) is the padded size of a bucket at values[j] covering
    values[i..j] (C: prefix sums of counts). With exactly m+1 buckets covering values[0..j],
    best[m][j] = min_i best[m-1][i-1] + cover[i, j]; the answer is the best layer at j = n-1.
    """
    n = len(values)
    k = min(k, n)
    prefix = np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)
    v = values.astype(np.float64)
    cover = v[None, :] * (prefix[None, 1:] - prefix[:-1, None])
    cover[np.tril_indices(n, -1)] = np.inf
    layers = [cover[0].copy()]
    starts = [np.zeros(n, np.int64)]  # first index i covered by the last bucket
    for _ in range(1, k):
        cand = layers[-1][:-1, None] + cover[1:, :]  # cand[i-1, j]: last bucket covers i..j
        arg = np.argmin(cand, axis=0)
        layers.append(cand[arg, np.arange(n)])
        starts.append(arg + 1)
    m = int(np.argmin([layer[-1] for layer in layers]))
    chosen, j = [], n - 1
    while m >= 0:
        chosen.append(int(values[j]))
        j, m = int(starts[m][j]) - 1, m - 1
    return sorted(chosen)


def choose_buckets(
    lengths: Sequence[int], max_buckets: int = 4, max_distinct: int = 2048
) -> tuple[tuple[int, ...], BucketReport]:
    """Sequence buckets (at most `max_buckets`) minimising total padded tokens for `lengths`.

    Each length is padded to the smallest chosen bucket >= it and the largest length is always a
    bucket. The search is an exact dynamic program over the sorted distinct lengths, O(k * n^2)
    time and O(n^2) memory with prefix sums. When there are more than `max_distinct` distinct
    lengths they are first rounded up to multiples of a quantum (8, 16, 32, ...) until at most
    `max_distinct` remain; the result is then exact for the rounded lengths and every bucket is a
    multiple of the quantum (the largest one is max(lengths) rounded up).

    Returns `(buckets, report)`; the report compares padding efficiency with power-of-two buckets.
    """
    raw = np.asarray(lengths, np.int64)
    if raw.size == 0 or raw.min() < 1:
        raise ConfigError("choose_buckets: lengths must be a non-empty list of positive integers")
    if max_buckets < 1:
        raise ConfigError(f"choose_buckets: max_buckets={max_buckets} must be >= 1")
    quantum = _quantum_for(raw, max_distinct)
    rounded = -(-raw // quantum) * quantum
    values, counts = np.unique(rounded, return_counts=True)
    chosen = tuple(_optimal_buckets(values, counts, max_buckets))
    real = int(raw.sum())
    padded = _padded_tokens(raw, chosen)
    pow2 = _pow2_buckets(int(raw.max()))
    pow2_padded = _padded_tokens(raw, pow2)
    report = BucketReport(
        chosen, real, padded, real / padded, pow2, pow2_padded, real / pow2_padded, len(values), quantum
    )
    return chosen, report
