"""Files of a batch run: input pre-pass, resumable output, manifest, per-process shards, merge.

Memory is bounded by 8 bytes per line: ids are kept only as 64-bit hashes in numpy arrays
(10M lines -> 80 MB for the duplicate check, plus 8 bytes per already-finished row of this
process's shard on resume). Nothing else grows with the file.

Crash safety: rows are appended and flushed + fsynced in groups; a row is "done" once its full
line (with newline) is in the output. On resume a torn last line (no newline, or invalid JSON)
is truncated away and the done rows are read back as hashes.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jinfer.batch.records import MAX_LINE_BYTES, id_key, key_hash, line_identity, row_key
from jinfer.errors import ConfigError, InputError, JinferError

MANIFEST_VERSION = 1
_MAX_LISTED_DUPLICATES = 20


class DuplicateIdError(InputError):
    """The input has the same custom_id on several lines (found before any work)."""


class ManifestMismatchError(ConfigError):
    """An existing output was started with another configuration (resume refused without --force)."""


class CorruptOutputError(JinferError):
    """An existing output has an unreadable line that is not the last one."""


# -- reading lines ---------------------------------------------------------------------------------
def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Streams (1-based line number, raw bytes) of the non-blank lines of a file.

    A line longer than MAX_LINE_BYTES is yielded as its first MAX_LINE_BYTES + 1 bytes (the rest is
    skipped in bounded reads), so one huge line costs bounded memory and becomes an error row.
    """
    with open(path, "rb") as f:
        number = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass
            if raw.strip():
                yield number, raw


def _sorted(values: array.array) -> np.ndarray:
    """The hashes as a sorted uint64 array, sorted in place (it shares the array's memory)."""
    arr = np.frombuffer(values, dtype=np.uint64) if len(values) else np.zeros(0, np.uint64)
    arr.sort()
    return arr


def count_contained(sorted_values: np.ndarray, sorted_set: np.ndarray, chunk: int = 1 << 20) -> int:
    """How many of `sorted_values` are in `sorted_set` (chunked: ~16 bytes x chunk of scratch)."""
    total = 0
    for start in range(0, len(sorted_values), chunk):
        part = sorted_values[start : start + chunk]
        idx = np.minimum(np.searchsorted(sorted_set, part), max(len(sorted_set) - 1, 0))
        total += int((sorted_set[idx] == part).sum()) if len(sorted_set) else 0
    return total


def contains(sorted_hashes: np.ndarray, h: int) -> bool:
    """Membership in a sorted uint64 array (binary search)."""
    i = int(np.searchsorted(sorted_hashes, np.uint64(h)))
    return i < len(sorted_hashes) and int(sorted_hashes[i]) == h


@dataclasses.dataclass
class InputScan:
    """Result of the input pre-pass: line counts and this shard's sorted key hashes."""

    lines: int
    shard_lines: int
    shard_hashes: np.ndarray  # uint64, sorted: keys of this process's lines


def scan_input(path: str | os.PathLike, process: int = 0, processes: int = 1) -> InputScan:
    """Streams the input once: rejects duplicate custom_ids (DuplicateIdError, with line numbers)
    and collects the hashes of this process's lines. Memory: 8 bytes per line."""
    hashes = array.array("Q")  # every line's key: custom_ids, and line numbers of id-less lines
    for number, raw in iter_lines(path):
        key, _ = line_identity(raw, number)
        hashes.append(key_hash(key))
    arr = _sorted(hashes)
    dup = arr[1:][arr[1:] == arr[:-1]]
    if len(dup):
        _raise_duplicates(path, np.unique(dup))
    mine = arr if processes == 1 else arr[arr % np.uint64(processes) == np.uint64(process)]
    return InputScan(len(arr), len(mine), mine)


def _raise_duplicates(path, dup_hashes: np.ndarray) -> None:
    """Second pass over the file to name the duplicated ids and their lines (only on a hit)."""
    where: dict[bytes, list[int]] = {}
    for number, raw in iter_lines(path):
        key, _ = line_identity(raw, number)
        if key.startswith(b"id:") and contains(dup_hashes, key_hash(key)):
            where.setdefault(key, []).append(number)
    dups = {k: v for k, v in where.items() if len(v) > 1}
    if not dups:  # 64-bit hash collision between different keys: harmless, nothing to reject
        return
    listed = [
        f"{k[3:].decode()} on lines {', '.join(map(str, v))}"
        for k, v in list(dups.items())[:_MAX_LISTED_DUPLICATES]
    ]
    more = f" (and {len(dups) - _MAX_LISTED_DUPLICATES} more)" if len(dups) > _MAX_LISTED_DUPLICATES else ""
    raise DuplicateIdError(
        f"{path}: {len(dups)} custom_id(s) appear more than once: {'; '.join(listed)}{more}. "
        "Every custom_id must be unique; nothing was run."
    )


def lock_output(output: Path, process: int = 0, processes: int = 1) -> Any:
    """Holds an exclusive lock on `output` for this run (on `<output>.lock`, or one per process of
    a multi-process run) until the returned file is closed or the process ends; ConfigError if
    another run holds it (two runs appending to one file would write every row twice). Where
    `fcntl` is missing (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return None
    suffix = ".lock" if processes == 1 else f".{process}.lock"
    f = open(output.with_name(output.name + suffix), "a+")  # noqa: SIM115 (held for the whole run)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(
            f"--output {output} is being written by another run-batch ({holder}); wait for it to end, "
            "or write to another --output"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def check_output_path(input_path: Path, output: Path) -> None:
    """ConfigError unless `output` can be written: its directory exists and is writable, it is not
    a directory, and it is not the input file (a resume would read its own rows as requests)."""
    parent = output.absolute().parent
    if output.is_dir():
        raise ConfigError(f"--output {output} is a directory; give a file path, e.g. {output}/out.jsonl")
    if not parent.is_dir():
        raise ConfigError(f"--output {output}: directory {parent} does not exist; create it first")
    try:  # a real probe: os.access says yes to root on read-only mounts
        if output.exists():
            open(output, "ab").close()
        else:
            probe = parent / f".{output.name}.probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output {output} is not writable ({e.strerror}); choose another path") from e
    if output.exists() and os.path.samefile(input_path, output):
        raise ConfigError(
            f"--output {output} is the input file; rows would be appended to the requests. "
            "Choose another --output (--force does not change this)"
        )


# -- existing output -----------------------------------------------------------------------------
def scan_output(path: str | os.PathLike, repair: bool, process: int = 0, processes: int = 1) -> np.ndarray:
    """Sorted hashes of the rows already in `path` (those of this process's shard).

    With `repair`, a torn last line (no trailing newline or invalid JSON) is truncated away;
    without, it is ignored. An unreadable line before the last raises CorruptOutputError.
    """
    path = Path(path)
    done = array.array("Q")
    if not path.exists():
        return _sorted(done)
    good_end, bad_at = 0, None
    with open(path, "rb") as f:
        offset = 0
        for number, raw in enumerate(f, start=1):
            key = _complete_row_key(raw)
            if key is None:
                if bad_at is not None:
                    raise CorruptOutputError(
                        f"{path}: line {bad_at} is not a complete JSON row and is not "
                        "the last line; the output is damaged (move it away to start over)"
                    )
                bad_at = number
            else:
                if bad_at is not None:
                    raise CorruptOutputError(
                        f"{path}: line {bad_at} is not a complete JSON row and is not "
                        "the last line; the output is damaged (move it away to start over)"
                    )
                h = key_hash(key)
                if h % processes == process:
                    done.append(h)
                good_end = offset + len(raw)
            offset += len(raw)
    if bad_at is not None and repair:
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return _sorted(done)


def _complete_row_key(raw: bytes) -> bytes | None:
    if not raw.endswith(b"\n"):
        return None
    try:
        row = json.loads(raw)
    except ValueError:
        return None
    return row_key(row) if isinstance(row, dict) else None


class RowWriter:
    """Appends rows; flushes + fsyncs every `flush_every` rows or `flush_seconds` seconds."""

    def __init__(self, path: str | os.PathLike, flush_every: int = 64, flush_seconds: float = 2.0):
        path = Path(path)
        created = not path.exists()
        self._f = open(path, "ab")  # noqa: SIM115 - closed in close()
        if created:
            _fsync_dir(path.parent)
        self._buffer: list[bytes] = []
        self._flush_every = max(1, flush_every)
        self._flush_seconds = flush_seconds
        self._last_flush = time.monotonic()

    def write(self, line: bytes) -> None:
        self._buffer.append(line)
        if (
            len(self._buffer) >= self._flush_every
            or time.monotonic() - self._last_flush >= self._flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._f.write(b"".join(self._buffer))
            self._buffer.clear()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self.flush()
            self._f.close()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- manifest ------------------------------------------------------------------------------------
def manifest_path(output: str | os.PathLike) -> Path:
    return Path(f"{output}.manifest.json")


def summary_path(output: str | os.PathLike) -> Path:
    return Path(f"{output}.summary.json")


def model_fingerprint(model_dir: str | os.PathLike | None) -> str | None:
    """sha256 over the files that decide a model's outputs (config, weight hashes, tokenizer)."""
    if model_dir is None:
        return None
    h = hashlib.sha256()
    names = (
        "config.json",
        "integrity.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    )
    for name in names:
        p = Path(model_dir) / name
        if p.is_file():
            h.update(name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def check_manifest(output: str | os.PathLike, manifest: dict[str, Any], force: bool, write: bool) -> None:
    """Refuses to resume `output` under another configuration (unless `force`); writes it if asked.

    The manifest must exist before any row is written, so an output (or shard) without one was
    not started by run-batch and is refused too.
    """
    path = manifest_path(output)
    started = Path(output).exists() or bool(shard_files(output))
    old = json.loads(path.read_text()) if path.is_file() else None
    if old is None and started and not force:
        raise ManifestMismatchError(
            f"{output} already exists but has no {path.name}: it was not started by run-batch; "
            "move it away or pass --force to append to it"
        )
    if old is not None:
        diffs = _diff(old, manifest)
        if diffs and not force:
            raise ManifestMismatchError(
                f"{output} was started with another configuration ({'; '.join(diffs)}); resuming would mix "
                "outputs. Use the original settings, choose a new --output, or pass --force"
            )
        if not diffs:
            return
        manifest = {**manifest, "previous": old}
    if write:
        write_json_atomic(path, manifest)


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        if not prefix and k == "previous":
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} before, {b!r} now")
    return out


# -- shards --------------------------------------------------------------------------------------
_SHARD_RE = re.compile(r"\.shard-(\d{5})-of-(\d{5})$")


def shard_path(output: str | os.PathLike, process: int, processes: int) -> Path:
    """`out.jsonl.shard-00001-of-00002`."""
    return Path(f"{output}.shard-{process:05d}-of-{processes:05d}")


def shard_files(output: str | os.PathLike, exclude_processes: int | None = None) -> list[Path]:
    """Existing shard files of `output`, ordered by (processes, index); optionally skipping a count."""
    out = Path(output)
    found = []
    if out.parent.is_dir():
        for p in out.parent.iterdir():
            m = _SHARD_RE.search(p.name) if p.name.startswith(out.name + ".shard-") else None
            if m and (exclude_processes is None or int(m.group(2)) != exclude_processes):
                found.append(((int(m.group(2)), int(m.group(1))), p))
    return [p for _, p in sorted(found)]


def merge_shards(output: str | os.PathLike, shards: list[Path] | None = None) -> int:
    """Appends the rows of `output`'s shard files that the output lacks, then deletes the shards.

    Safe to repeat after a crash at any point: rows already in the output are skipped (by
    custom_id hash), a torn tail is repaired first. Returns the number of rows appended.
    """
    shards = shard_files(output) if shards is None else shards
    if not shards:
        return 0
    done = scan_output(output, repair=True)
    appended = 0
    writer = RowWriter(output, flush_every=4096)
    try:
        for shard in shards:
            added = array.array("Q")
            with open(shard, "rb") as f:
                for raw in f:
                    key = _complete_row_key(raw)
                    if key is None:
                        continue  # torn tail of a crashed process: that row is not done
                    h = key_hash(key)
                    if not contains(done, h):
                        writer.write(raw)
                        added.append(h)
                        appended += 1
            if len(added):
                done = np.union1d(done, _sorted(added))
    finally:
        writer.close()
    for shard in shards:
        shard.unlink(missing_ok=True)
        summary_path(shard).unlink(missing_ok=True)
    return appended


def id_hash(custom_id: Any) -> int:
    """The hash of a custom_id as stored in done-sets (for tests and tools)."""
    return key_hash(id_key(custom_id))
