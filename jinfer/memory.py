"""Memory planned before it is used: parameters + KV cache + workspace vs the memory available.

`plan_llm_memory` runs in `LLM.__init__` before any parameter is restored or cache allocated. It
estimates, per device, the bytes of
  - the parameters (floating leaves in the load dtype; sharded over the mesh's "model" axis);
  - the KV cache: layers x 2 x max_batch x max_len x kv_heads x head_dim (sharded over all devices);
  - a workspace: logits for every slot and the activations of the largest prefill bucket;
and compares them with what the device has: `bytes_limit - bytes_in_use` from the accelerator's
memory stats, or on CPU the host's available RAM (MemAvailable; all simulated devices share it).
When the plan does not fit, a `MemoryPlanError` says how much is needed, how much is available and
the largest max_batch that fits for that max_len. `JINFER_SKIP_MEMORY_CHECK=1` skips the check.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jinfer.errors import ConfigError

_MARGIN = 1.10  # compiled programs and fragmentation: ask for 10% more than the estimate
_PREFILL_ACTIVATION_FACTOR = 8  # live [t, hidden]-sized float32 buffers during one prefill layer


class MemoryPlanError(ConfigError):
    """The requested engine does not fit in device (or host) memory; the message says what fits."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes per device of one engine, and the bytes available there."""

    params: int
    kv_cache: int
    workspace: int
    available: int | None
    where: str

    @property
    def total(self) -> int:
        return self.params + self.kv_cache + self.workspace

    @property
    def fits(self) -> bool:
        return self.available is None or self.total * _MARGIN <= self.available


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def available_bytes(device: Any) -> tuple[int | None, str]:
    """(free bytes, description) of `device`: accelerator memory stats, else host MemAvailable."""
    stats = None
    if device.platform != "cpu":
        try:
            stats = device.memory_stats()
        except Exception:  # some backends have no stats: no check rather than a wrong one
            stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.device_kind} memory"
    return host_available_bytes(), "host RAM (CPU devices)"


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (psutil when installed), None when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _kv_bytes_per_slot(cfg: Any, max_len: int, itemsize: int) -> int:
    heads = getattr(cfg, "num_heads", 1)
    kv_heads = getattr(cfg, "num_kv_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 0) // max(heads, 1)
    return getattr(cfg, "num_layers", 1) * 2 * max_len * kv_heads * head_dim * itemsize


def plan_llm_memory(
    model: Any, gen_config: Any, mesh: Any, dtype: Any = None, extra_param_bytes: int = 0
) -> MemoryPlan:
    """The MemoryPlan of an LLM engine (no device memory touched); raises MemoryPlanError when it
    does not fit. `dtype`: the load dtype of floating params (None: as saved; or a
    `jinfer.precision.Precision`);
    `extra_param_bytes`: weights held besides the params (e.g. a one-row decode copy)."""
    import jax
    import jax.numpy as jnp

    from jinfer import defaults, precision

    cfg = model.config
    params = defaults.params_bytes(model, dtype)
    devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
    model_axis = dict(mesh.shape).get("model", 1) if mesh is not None else 1
    cache_dtype = getattr(gen_config, "cache_dtype", None) or precision.compute_dtype(dtype) or "float32"
    itemsize = jnp.dtype(cache_dtype).itemsize
    max_batch, max_len = gen_config.max_batch, gen_config.max_len
    vocab = getattr(cfg, "vocab_size", 0)
    per_slot = _kv_bytes_per_slot(cfg, max_len, itemsize) + vocab * 4 * 2  # + its logits (f32, x2)
    fixed = _prefill_workspace(cfg, gen_config)
    available, where = available_bytes(devices[0])
    if devices[0].platform != "cpu":  # each accelerator holds its shard of params and cache
        params //= model_axis
        per_slot //= len(devices)
    params += extra_param_bytes
    # (simulated CPU devices share one host: the totals are compared with host RAM)
    kv = max_batch * _kv_bytes_per_slot(cfg, max_len, itemsize)
    kv //= len(devices) if devices[0].platform != "cpu" else 1
    plan = MemoryPlan(params, kv, fixed + max_batch * vocab * 4 * 2, available, where)
    if os.environ.get("JINFER_SKIP_MEMORY_CHECK") != "1" and not plan.fits:
        raise MemoryPlanError(_explain(plan, max_batch, max_len, per_slot, fixed))
    return plan


def _prefill_workspace(cfg: Any, gen_config: Any) -> int:
    """Activations of the largest prefill bucket (float32): a few [t, hidden] and [t, mlp] buffers
    and the bucket's logits."""
    vocab, hidden = getattr(cfg, "vocab_size", 0), getattr(cfg, "hidden_size", 0)
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    bucket = max(getattr(gen_config, "prefill_buckets", (gen_config.max_len,)))
    return bucket * (hidden * _PREFILL_ACTIVATION_FACTOR + inter * 2 + vocab) * 4


def _explain(plan: MemoryPlan, max_batch: int, max_len: int, per_slot: int, fixed: int) -> str:
    budget = plan.available / _MARGIN - plan.params - fixed
    largest = int(budget // per_slot) if per_slot and budget > 0 else 0
    head = (
        f"the engine needs about {_gib(plan.total * _MARGIN)} per device (parameters {_gib(plan.params)}, "
        f"KV cache {_gib(plan.kv_cache)} for max_batch={max_batch} x max_len={max_len}, workspace "
        f"{_gib(plan.workspace)}) but {plan.where} has {_gib(plan.available)} available"
    )
    if largest >= 1:
        return (
            f"{head}; the largest max_batch that fits with max_len={max_len} is {min(largest, max_batch - 1)}"
        )
    return (
        f"{head}; even max_batch=1 does not fit: lower max_len, load in bfloat16, or shard the model "
        "over more devices (--mesh)"
    )
