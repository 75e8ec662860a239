"""`jinfer.Embedder`: sentence embeddings from an encoder model (BERT family).

Texts are tokenized, padded to length buckets and batched by the core `Engine`; pooling (mean over
real tokens, or the first/CLS token) and L2 normalisation follow the model directory's config
(`pooling`, `normalize`, recorded at conversion from the sentence-transformers settings, as are
`max_seq_length`, to which texts are truncated, and `do_lower_case`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jinfer.buckets import Buckets
from jinfer.engine import Engine
from jinfer.errors import ConfigError, EmptyInputError, EngineClosedError, InputError, InvalidTokenError
from jinfer.sharding import ShardingRules, resolve_mesh
from jinfer.tokenizer import Tokenizer, token_ids

POOLINGS = ("mean", "cls")


def pool(hidden: jnp.ndarray, mask: jnp.ndarray, pooling: str, normalize: bool) -> jnp.ndarray:
    """hidden [b, t, d], mask [b, t] -> embeddings [b, d] (float32)."""
    hidden = hidden.astype(jnp.float32)
    if pooling == "cls":
        out = hidden[:, 0]
    else:
        m = mask.astype(jnp.float32)[..., None]
        out = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    if normalize:
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out


class Embedder:
    """Embeds texts (or token-id lists) into float32 vectors, one row per input.

    Args:
      model: a jinfer model directory of an encoder model (task "encoder"), or a Hugging Face
        id of one ("sentence-transformers/all-MiniLM-L6-v2"), fetched and converted once.
      mesh, dtype, rules: as for `LLM`.
      buckets: length/batch buckets (default: batch 1..32, lengths 16 up to the model's positions,
        at most 512, or up to a sentence-transformers max_seq_length).
      pooling / normalize: override the directory's settings.
      truncate: cut token-id inputs longer than the largest bucket (else SequenceTooLongError).
    """

    def __init__(
        self,
        model: str | Path,
        mesh: Mesh | str | None = None,
        dtype: str | None = None,
        buckets: Buckets | None = None,
        rules: ShardingRules | None = None,
        pooling: str | None = None,
        normalize: bool | None = None,
        truncate: bool = True,
    ):
        from jinfer import loading

        mesh = resolve_mesh(mesh, rules)
        if pooling is not None:  # checked before any array is read
            _check_pooling(pooling)
        loaded = loading.load(model, mesh=mesh, rules=rules, dtype=dtype, task="encoder", user="Embedder")
        path, flax_model, params, meta = loaded.path, loaded.model, loaded.params, loaded.meta
        config = flax_model.config
        self.vocab_size, self.dim = int(config.vocab_size), int(config.hidden_size)
        self.pooling = pooling or meta.get("pooling", "mean")
        self.normalize = meta.get("normalize", True) if normalize is None else normalize
        _check_pooling(self.pooling)
        # The tokenizer truncates only to a sentence-transformers max_seq_length (keeping [SEP]);
        # `truncate` is the engine's cut of token inputs longer than the largest bucket.
        self.max_seq_length = meta.get("max_seq_length")
        self.lowercase = bool(meta.get("do_lower_case", False))
        has_tokenizer = (path / "tokenizer.json").is_file()
        self.tokenizer = Tokenizer.from_dir(path, self.max_seq_length) if has_tokenizer else None
        buckets = buckets or Buckets(batch_sizes=(1, 4, 16, 32), seq_lens=default_seq_lens(config, meta))
        apply = flax_model.apply_fn()
        pooling_, normalize_ = self.pooling, self.normalize

        def forward(p, tokens, mask):
            return pool(apply(p, tokens, mask), mask, pooling_, normalize_)

        self.engine = Engine(
            forward,
            params,
            buckets=buckets,
            mesh=mesh,
            rules=rules,
            param_shardings=flax_model.shardings(mesh or _default_mesh(), rules),
            truncate=truncate,
        )

    @property
    def stats(self) -> Any:
        return self.engine.stats

    def close(self) -> None:
        """Frees the device memory (the engine drops the weights, as `LLM.close` does); later
        `embed` calls raise EngineClosedError. Idempotent; also on leaving a `with` block."""
        self.engine.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def embed(self, texts: str | Sequence[str | Sequence[int]]) -> np.ndarray:
        """float32 [len(texts), d] embeddings (normalised rows when the model says so); a single
        string is one input ([1, d])."""
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, Sequence) or isinstance(texts, (bytes, bytearray)):
            raise InputError(
                f"texts is a {type(texts).__name__}; expected a string, or a list of strings or of "
                "token-id lists"
            )
        if self.engine.closed:
            raise EngineClosedError("the Embedder is closed; create a new Embedder")
        ids = [self.encode(t, i) for i, t in enumerate(texts)]
        if not ids:
            return np.zeros((0, self.dim), np.float32)
        rows = self.engine.predict([np.asarray(x, np.int32) for x in ids])
        return np.stack([np.asarray(r, np.float32) for r in rows])

    def encode(self, text: str | Sequence[int], index: int = 0) -> list[int]:
        """The token ids `embed` runs for one input (a string is tokenized and truncated to the
        model's max_seq_length); InputError / ConfigError naming input `index` if it cannot."""
        if isinstance(text, str):
            if self.tokenizer is None:
                raise ConfigError(
                    "text input needs a tokenizer, and this model directory has no tokenizer.json"
                )
            try:
                ids = self.tokenizer.encode(text.lower() if self.lowercase else text)
            except InputError as e:
                raise type(e)(f"input {index}: {e}") from None
        else:
            ids = token_ids(text, f"input {index}", "a string or a list of token ids")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidTokenError(
                    f"input {index} has token id {bad[0]} outside the vocabulary [0, {self.vocab_size})"
                )
        if not ids:
            raise EmptyInputError(f"input {index} is empty")
        return ids


def default_seq_lens(config: Any, meta: dict[str, Any]) -> tuple[int, ...]:
    """Length buckets 16, 32, ... up to the longest input: the model's positions, at most 512, or
    the sentence-transformers max_seq_length (which is then a bucket itself)."""
    longest = min(512, int(getattr(config, "max_position_embeddings", 512)))
    if meta.get("max_seq_length"):
        longest = min(longest, int(meta["max_seq_length"]))
    lens = [b for b in (16, 32, 64, 128, 256, 512) if b < longest]
    return (*lens, longest)


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling={pooling!r} is not one of {POOLINGS}")


def _default_mesh() -> Mesh:
    from jinfer.sharding import single_device_mesh

    return single_device_mesh()
