"""What `jinfer serve` serves: the settings, and the loaded model (a generation runtime or an embedder)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from jinfer.errors import ConfigError

log = logging.getLogger("jinfer.serve")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings of one `jinfer serve` process (the CLI flags)."""

    model: str | None = None
    served_model_name: str | None = None
    mesh: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    max_batch: int | None = None  # None: what the KV-cache budget holds (jinfer.defaults)
    max_len: int | None = None  # the model's context length within a memory budget (jinfer.defaults)
    buckets: tuple[int, ...] | None = None
    max_queue: int = 256
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    grace_period: float = 10.0

    @property
    def name(self) -> str:
        """The model name clients send (`model` field) and /v1/models lists."""
        from jinfer.hub import DEFAULT_MODEL

        return self.served_model_name or self.model or DEFAULT_MODEL


@dataclasses.dataclass
class Backend:
    """A loaded, warmed-up model. Exactly one of `runtime` (with `llm`) and `embedder` is set.

    `runtime` follows the generation-runtime contract: `generate_async(prompt, params)` (an async
    iterator of deltas), `submit`, `stats.summary()`, `close()`.
    """

    llm: Any = None
    runtime: Any = None
    embedder: Any = None
    warmup_seconds: float = 0.0

    @property
    def tokenizer(self) -> Any:
        return (self.llm or self.embedder).tokenizer

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()


def load_backend(config: ServeConfig) -> Backend:
    """Loads the model named by `config.model` and compiles what serving needs."""
    from jinfer import checkpoint
    from jinfer.loading import resolve

    path = resolve(config.model, config.dtype)
    spec, _, _ = checkpoint.load_config(path)
    t0 = time.perf_counter()
    if spec.task == "encoder":
        from jinfer.embed import Embedder

        embedder = Embedder(path, mesh=config.mesh, dtype=config.dtype)
        t0 = time.perf_counter()
        embedder.embed([[0]])  # token ids: the directory may have no tokenizer
        return Backend(embedder=embedder, warmup_seconds=time.perf_counter() - t0)
    if spec.task != "causal_lm":
        raise ConfigError(f"{path}: a {spec.task!r} model; jinfer serve serves causal_lm and encoder models")
    from jinfer.llm import LLM

    llm = LLM(
        path,
        mesh=config.mesh,
        dtype=config.dtype,
        max_batch=config.max_batch,
        max_len=config.max_len,
        buckets=config.buckets,
        quantize=config.quantize,
        max_queue=config.max_queue,
    )
    t0 = time.perf_counter()
    llm.warmup()
    warm = time.perf_counter() - t0
    log.info("loaded %s (%s), warmed up in %.1f s", path, spec.name, warm)
    return Backend(llm=llm, runtime=llm, warmup_seconds=warm)
