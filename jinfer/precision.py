"""Parameter dtypes on restore: one dtype for everything, or matrices in a narrower one.

A `Precision(compute, weights)` restores the weight matrices (projections, embeddings: what
`FlaxModel.weight_matrices` marks, from the logical axes) in `weights` and every other floating
param (norms, biases, also the [heads, head_dim] attention biases) in `compute`. The model
then computes in `compute`: activations, norms and the KV cache take the norms' dtype, and each
matrix product of a narrower weight casts its input to the weight's dtype and accumulates in
`compute` (`jinfer.models.layers.linear`). A plain dtype string (or None: as
saved) is the same dtype for both, which every `dtype=` argument of jinfer accepts too.

Why: on CPUs that multiply bfloat16 in hardware (x86 AVX512_BF16 / AMX-BF16, Arm BF16), XLA:CPU's
bfloat16 x bfloat16 -> float32 products run 1.7-2x faster than float32 ones at 32-256 rows (at one
row they have no fast path, so one row runs as two: `jinfer.models.layers.two_rows`), while its
half-precision elementwise work (norms, softmax, attention over the cache) is slower than float32
(BENCHMARKS.md). bfloat16 weights with float32 compute keep each where it is fast: on SmolLM2-135M
the next-token perplexity moves by 0.01 % and the top-1 prediction agrees with float32 on 99.5 %
of 4,042 held-out tokens (`scripts/bench_quant_quality.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from jinfer.errors import ConfigError

CPUINFO = Path("/proc/cpuinfo")


@dataclasses.dataclass(frozen=True)
class Precision:
    """Restore dtypes: `weights` for the weight matrices, `compute` for the other floating params
    (None: as saved)."""

    compute: str | None = None
    weights: str | None = None

    def __post_init__(self):  # each a floating dtype's name (or None), else a ConfigError naming it
        for field, value in (("dtype", self.compute), ("weight_dtype", self.weights)):
            if value is not None:
                object.__setattr__(
                    self, "compute" if field == "dtype" else "weights", _float_dtype(value, field).name
                )

    def __str__(self) -> str:
        if self.weights == self.compute:
            return str(self.compute or "as saved")
        return f"{self.weights or 'saved'} weights, {self.compute or 'saved'} compute"


Dtype = str | None | Precision


def as_precision(dtype: Dtype) -> Precision:
    """`dtype` as a Precision (a plain dtype: the same for weights and the rest)."""
    if isinstance(dtype, Precision):
        return dtype
    name = None if dtype is None else np.dtype(_float_dtype(dtype)).name
    return Precision(name, name)


def _float_dtype(name: Any, field: str = "dtype") -> Any:
    """A dtype asked for by a caller as `field`: a floating one, or a ConfigError saying what is
    accepted."""
    import jax.numpy as jnp

    try:
        dtype = jnp.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        hint = "; for int8 weights use quantize='int8'" if str(name).startswith(("int", "uint")) else ""
        raise ConfigError(
            f"{field} {name!r} is not a floating-point dtype; accepted: 'float32', 'bfloat16', "
            f"'float16' (or a jinfer.precision.Precision), or None for the checkpoint's{hint}"
        )
    return dtype


def leaf_dtype(dtype: Dtype, matrix: bool, saved: Any) -> Any:
    """The dtype a floating param saved as `saved` is restored in; `matrix`: a weight matrix
    (`FlaxModel.weight_matrices`)."""
    p = as_precision(dtype)
    chosen = p.weights if matrix else p.compute
    return _jnp_dtype(chosen) if chosen is not None else _jnp_dtype(saved)


def compute_dtype(dtype: Dtype) -> str | None:
    """The compute (KV cache, activations) dtype of `dtype`; None: as saved."""
    return as_precision(dtype).compute


def _jnp_dtype(name: Any) -> Any:
    import jax.numpy as jnp

    return jnp.dtype(name)


def cpu_flags() -> frozenset[str]:
    """The words of /proc/cpuinfo (its feature flags among them); empty where there is none."""
    return frozenset(CPUINFO.read_text(errors="replace").split()) if CPUINFO.is_file() else frozenset()


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """True when the host CPU multiplies bfloat16 in hardware (x86 AVX512_BF16 or AMX-BF16; Arm
    BF16), read from /proc/cpuinfo on Linux and sysctl on macOS."""
    if CPUINFO.is_file():
        return bool({"avx512_bf16", "amx_bf16", "bf16"} & cpu_flags())
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return out.stdout.strip() == "1"
    return False
