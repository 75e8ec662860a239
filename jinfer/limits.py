"""Bounds on untrusted model files, checked before anything is allocated from them.

- `check_gguf_header(path)`: walks a GGUF's metadata and tensor table through a memory map with
  every count and length checked against the bytes left in the file and against sane limits, so a
  250-byte file claiming a 2**40-element array, or 16 MB of 2M empty strings, is refused in
  milliseconds instead of making the GGUF reader allocate gigabytes.
- `check_hyperparameters(config, where)`: integer fields of a model config within sane ranges
  (`num_layers: 10**7` is refused before any parameter tree is built).
- `check_implied_size(model, source_elements, where)`: the parameters a config implies against the
  elements the checkpoint actually holds.

Every failure is a ConversionError (files being converted) or a CorruptCheckpointError (a jinfer
model directory), naming the file, the field and the accepted range.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import struct
from pathlib import Path
from typing import Any

from jinfer.errors import ConversionError

# GGUF value types: fixed sizes; 8 = string, 9 = array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
MAX_GGUF_KEYS = 1 << 16
MAX_GGUF_TENSORS = 1 << 20
MAX_GGUF_DIMS = 8
MAX_KEY_BYTES = 1 << 16
# Metadata strings always allowed (the GGUF reader costs ~1.5 KB each, so at most ~400 MB): a
# small test GGUF with a real vocabulary (49k tokens + 48k merges in 3.3 MB) must pass.
MIN_STRING_BUDGET = 1 << 18
BYTES_PER_STRING = 128  # ... and one more per 128 bytes of file

# Config integer fields and their sane upper bounds (by field name; the rest: < 2**31).
_HYPERPARAMETER_BOUNDS = {
    "num_layers": 1024,
    "num_hidden_layers": 1024,
    "num_heads": 1024,
    "num_attention_heads": 1024,
    "num_kv_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 23,
    "num_experts": 1 << 12,
    "max_position_embeddings": 1 << 27,
}
_DEFAULT_INT_BOUND = (1 << 31) - 1


class _Cursor:
    """Reads little-endian values from a memory map; every read checked against the file end."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def left(self) -> int:
        return len(self.buf) - self.pos

    def fail(self, what: str) -> ConversionError:
        return ConversionError(
            f"{self.path}: corrupt or hostile GGUF: {what} (at byte {self.pos}, file has {len(self.buf)})"
        )

    def unpack(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if size > self.left():
            raise self.fail("truncated")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise self.fail(f"{what} claims {n:,} bytes")
        self.pos += n

    def string(self, what: str) -> None:
        self.skip(self.unpack("<Q"), what)


def check_gguf_header(path: str | Path) -> None:
    """ConversionError unless every count/length in the GGUF's metadata and tensor table fits the
    file and the limits above. Reads only the header region through a memory map."""
    path = Path(path)
    with open(path, "rb") as f:
        if path.stat().st_size < 24:
            raise ConversionError(f"{path}: truncated GGUF file ({path.stat().st_size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _walk_gguf(_Cursor(buf, path))


def _walk_gguf(c: _Cursor) -> None:
    c.skip(4, "magic")
    if c.unpack("<I") < 2:
        raise c.fail("GGUF version 1 is not supported")
    n_tensors, n_keys = c.unpack("<Q"), c.unpack("<Q")
    if n_tensors > MAX_GGUF_TENSORS or n_keys > MAX_GGUF_KEYS:
        raise c.fail(
            f"{n_tensors:,} tensors / {n_keys:,} metadata keys "
            f"(limits {MAX_GGUF_TENSORS:,} / {MAX_GGUF_KEYS:,})"
        )
    budget = [max(MIN_STRING_BUDGET, len(c.buf) // BYTES_PER_STRING)]
    for _ in range(n_keys):
        key_len = c.unpack("<Q")
        if key_len > MAX_KEY_BYTES:
            raise c.fail(f"a metadata key of {key_len:,} bytes")
        c.skip(key_len, "a metadata key")
        _skip_value(c, c.unpack("<I"), budget)
    file_elements = 8 * len(c.buf)  # the densest GGUF type needs > 1/8 byte per element
    for _ in range(n_tensors):
        c.string("a tensor name")
        n_dims = c.unpack("<I")
        if n_dims > MAX_GGUF_DIMS:
            raise c.fail(f"a tensor with {n_dims:,} dimensions")
        dims = [c.unpack("<Q") for _ in range(n_dims)]
        if math.prod(dims) > file_elements:
            raise c.fail(f"a tensor of shape {dims} (more elements than the file can hold)")
        c.skip(12, "a tensor's type and offset")


def _skip_value(c: _Cursor, vtype: int, budget: list[int]) -> None:
    if vtype in _GGUF_SIZES:
        c.skip(_GGUF_SIZES[vtype], "a value")
    elif vtype == _GGUF_STRING:
        _spend(c, budget, 1)
        c.string("a string value")
    elif vtype == _GGUF_ARRAY:
        etype, count = c.unpack("<I"), c.unpack("<Q")
        if etype in _GGUF_SIZES:
            c.skip(count * _GGUF_SIZES[etype], f"an array of {count:,} elements")
        elif etype == _GGUF_STRING:
            if count * 8 > c.left():
                raise c.fail(f"an array of {count:,} strings")
            _spend(c, budget, count)
            for _ in range(count):
                c.string("an array string")
        else:
            raise c.fail(f"an array of element type {etype} (nested arrays are not supported)")
    else:
        raise c.fail(f"unknown metadata value type {vtype}")


def _spend(c: _Cursor, budget: list[int], strings: int) -> None:
    budget[0] -= strings
    if budget[0] < 0:
        raise c.fail(
            f"more metadata strings than a file of {len(c.buf):,} bytes may hold "
            f"({max(MIN_STRING_BUDGET, len(c.buf) // BYTES_PER_STRING):,})"
        )


def check_hyperparameters(config: Any, where: str, error: type[Exception] = ConversionError) -> None:
    """Every integer field of a config dataclass within its sane range (`error` names `where`)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type in ("int", int) and (not isinstance(value, int) or isinstance(value, bool)):
            raise error(f"{where}: {f.name}={value!r} is a {type(value).__name__}; accepted: an integer")
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        bound = _HYPERPARAMETER_BOUNDS.get(f.name, _DEFAULT_INT_BOUND)
        low = 1 if f.name in _HYPERPARAMETER_BOUNDS else -_DEFAULT_INT_BOUND
        if not low <= value <= bound:
            raise error(f"{where}: {f.name}={value} is out of range; accepted: {low}..{bound:,}")


def _first_layers(config: Any, n: int) -> Any:
    """`config` cut to its first n layers, per-layer fields (e.g. Gemma's layer_types) included."""
    changes: dict[str, Any] = {"num_layers": n}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if (
            isinstance(value, (tuple, list))
            and len(value) == config.num_layers
            and f.name.startswith("layer")
        ):
            changes[f.name] = type(value)(value[:n])
    return dataclasses.replace(config, **changes)


def check_implied_size(make_model: Any, config: Any, source_elements: int | None, where: str) -> None:
    """ConversionError when `config` implies far more parameters than the checkpoint holds (a hostile
    or mismatched config would otherwise allocate them before failing). `make_model(config)` builds
    the FlaxModel; the count is extrapolated from 1 and 2 layers, so 900 layers cost as little as 2."""
    if source_elements is None:
        return
    layers = getattr(config, "num_layers", None)
    if isinstance(layers, int) and layers > 2:
        one, two = (_param_count(make_model(_first_layers(config, n))) for n in (1, 2))
        implied = one + (layers - 1) * (two - one)
    else:
        implied = _param_count(make_model(config))
    # Tied embeddings, fused or omitted tensors: allow 2x and some slack, never 10x.
    if implied > 2 * source_elements + (1 << 20):
        raise ConversionError(
            f"{where}: the config implies {implied:,} parameters but the checkpoint holds "
            f"{source_elements:,} values; the config does not match the weights"
        )


def _param_count(model: Any) -> int:
    import jax

    return sum(math.prod(x.shape) for x in jax.tree.leaves(model.abstract_params()))


def source_elements(source: Any) -> int | None:
    """Elements stored by a converter's tensor source, from its headers (None when unknown)."""
    records = getattr(source, "_records", None)
    if isinstance(records, dict):
        return sum(math.prod(r.shape) for r in records.values())
    reader = getattr(source, "reader", None)
    if reader is not None and hasattr(reader, "tensors"):
        return sum(int(t.n_elements) for t in reader.tensors)
    return None
