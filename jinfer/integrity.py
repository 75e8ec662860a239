"""The integrity manifest of a model directory (`integrity.json`), checked so that editing it
cannot switch it off.

Version 2 of the manifest records, besides the arrays and the files under params/, every
top-level file that decides outputs (`model_files`: config.json, generation_config.json, the
tokenizer files, ...). Loading refuses, with a `CorruptCheckpointError` naming the file:
  - a manifest that is missing, empty, partial (a file on disk it does not list) or malformed
    (entries of the wrong type, paths that leave the directory);
  - a file whose size or sha256 differs from the record (a file verified by an earlier load and
    unchanged since is not re-hashed: `jinfer.digest_record`);
  - a version-1 manifest (written by jinfer before 0.x; it covers the parameters only): run
    `jinfer rehash DIR` to record the current files, or convert the model again. Known models
    in $JINFER_HOME are converted again automatically (`jinfer.hub`).

`jinfer rehash DIR` (`rehash_model_dir`) is the explicit opt-out for users who edit a config or
tokenizer file on purpose: it re-records the top-level files (logging every change) after
checking the parameter files against their existing records, so it never blesses changed weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jinfer.digest_record import DigestRecord
from jinfer.errors import CheckpointNotFoundError, CorruptCheckpointError

log = logging.getLogger("jinfer.integrity")

INTEGRITY_VERSION = 2
INTEGRITY_FILE = "integrity.json"
_NOT_COVERED = {INTEGRITY_FILE, ".jinfer_complete", "params"}
_DOCS = re.compile(r"^(README|LICENSE|NOTICE|CHANGELOG)([._-].*)?$|\.md$", re.IGNORECASE)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class UnverifiedCheckpointError(CorruptCheckpointError):
    """A model directory whose manifest does not cover every file that decides its outputs."""


def inside(base: str | os.PathLike, relative: str, *, linked_files: bool = False) -> Path:
    """`base / relative`, refused (CorruptCheckpointError) unless it stays inside `base`.

    Absolute paths, `..` components and symlinks leading out are all refused: every path read from
    metadata (manifests, safetensors indexes, ...) goes through here. `linked_files`: the named
    file itself may be a symlink out of `base` (a Hugging Face hub snapshot links every file to
    the cache's blobs/); its name and the directories above it are still checked.
    """
    base = Path(base)
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise CorruptCheckpointError(f"{base}: invalid file name {relative!r} in metadata")
    target = base / relative
    try:
        (target.parent if linked_files else target).resolve().relative_to(base.resolve())
    except ValueError:
        raise CorruptCheckpointError(
            f"{base}: metadata names {relative!r}, which is outside the directory; refused"
        ) from None
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise CorruptCheckpointError(f"{base}: metadata names {relative!r} (absolute or with ..); refused")
    return target


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def covered_names(model_dir: Path) -> list[str]:
    """Top-level files that decide outputs: every regular file except the manifest, the marker,
    hidden files and documentation (README, LICENSE, *.md)."""
    return sorted(
        p.name
        for p in model_dir.iterdir()
        if p.is_file()
        and p.name not in _NOT_COVERED
        and not p.name.startswith(".")
        and not _DOCS.search(p.name)
    )


def model_file_manifest(model_dir: Path) -> dict[str, dict[str, Any]]:
    """{name: {size, sha256}} of the covered top-level files of `model_dir`."""
    return {
        name: {"size": (model_dir / name).stat().st_size, "sha256": sha256_file(model_dir / name)}
        for name in covered_names(model_dir)
    }


def _bad(path: Path, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path / INTEGRITY_FILE}: {what}; the manifest was damaged or edited (convert the model again)"
    )


def _check_file_record(path: Path, section: str, name: Any, rec: Any) -> None:
    if not isinstance(name, str) or not isinstance(rec, dict):
        raise _bad(path, f"'{section}' entry {name!r} is a {type(rec).__name__}, not an object")
    size, digest = rec.get("size"), rec.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad(path, f"'{section}' entry {name!r} has size {size!r}; expected an integer >= 0")
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise _bad(path, f"'{section}' entry {name!r} has sha256 {digest!r}; expected 64 hex digits")


def check_manifest(path: Path, integrity: Any, model_files: bool = True) -> None:
    """Structure of integrity.json: right types everywhere, paths inside, nothing empty.
    `model_files=False` skips the top-level files' section (for `rehash_model_dir`)."""
    if not isinstance(integrity, dict):
        raise _bad(path, f"expected a JSON object, found a {type(integrity).__name__}")
    arrays, files = integrity.get("arrays"), integrity.get("files")
    if not isinstance(arrays, dict) or not arrays:
        raise _bad(path, "'arrays' is missing, empty or not an object")
    for name, rec in arrays.items():
        shape = rec.get("shape") if isinstance(rec, dict) else None
        ok_shape = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        if not ok_shape or not isinstance(rec.get("dtype"), str):
            raise _bad(path, f"'arrays' entry {name!r} needs a 'shape' list of integers and a 'dtype' string")
    if not isinstance(files, dict) or not files:
        raise _bad(path, "'files' (the parameter files' hashes) is missing, empty or not an object")
    for name, rec in files.items():
        _check_file_record(path, "files", name, rec)
        inside(path / "params", name)
    if model_files:
        _check_model_files(path, integrity.get("model_files"))


def _check_model_files(path: Path, model_files: Any) -> None:
    if model_files is None:
        raise UnverifiedCheckpointError(
            f"{path}: {INTEGRITY_FILE} was written by an older jinfer and does not cover config.json or the "
            f"tokenizer files. If you trust this directory run `jinfer rehash {path}` to record them, or "
            "convert the model again"
        )
    if not isinstance(model_files, dict) or "config.json" not in model_files:
        raise _bad(path, "'model_files' is not an object listing config.json")
    for name, rec in model_files.items():
        _check_file_record(path, "model_files", name, rec)
        if "/" in name or "\\" in name or name in _NOT_COVERED:
            raise _bad(path, f"'model_files' names {name!r}; expected a plain file name of the directory")


def verify_model_files(path: Path, integrity: Mapping[str, Any]) -> None:
    """Every covered top-level file is listed and unchanged (sizes, then sha256)."""
    recorded: dict[str, dict] = integrity["model_files"]
    unlisted = [n for n in covered_names(path) if n not in recorded]
    if unlisted:
        raise CorruptCheckpointError(
            f"{path}: {', '.join(unlisted)} not covered by {INTEGRITY_FILE} (added, or the manifest was "
            f"edited); remove the file, or run `jinfer rehash {path}` if you added it on purpose"
        )
    record = DigestRecord(path, integrity)
    for name, rec in recorded.items():
        file = path / name
        if not file.is_file():
            raise CheckpointNotFoundError(f"{path}: {name} is listed in {INTEGRITY_FILE} but missing")
        st = file.stat()
        if st.st_size == rec["size"] and record.verified(name, st, rec["sha256"]):
            continue  # verified before, unchanged since (jinfer.digest_record)
        if st.st_size != rec["size"] or sha256_file(file) != rec["sha256"]:
            raise CorruptCheckpointError(
                f"{path}: {name} changed since the model was saved (sha256 mismatch); restore it, convert "
                f"again, or run `jinfer rehash {path}` if you edited it on purpose"
            )
        record.add(name, st, rec["sha256"])
    record.save()


def check_params_coverage(path: Path, params_dir: Path, files: Mapping[str, Any]) -> None:
    """Every file under params/ has a record: a dropped entry cannot hide a changed file."""
    on_disk = sorted(p.relative_to(params_dir).as_posix() for p in params_dir.rglob("*") if p.is_file())
    unlisted = [rel for rel in on_disk if rel not in files]
    if unlisted:
        raise CorruptCheckpointError(
            f"{path}: {len(unlisted)} parameter file(s) not covered by {INTEGRITY_FILE} "
            f"(e.g. params/{unlisted[0]}); the manifest is partial or was edited: convert the model again"
        )


def rehash_model_dir(path: str | os.PathLike) -> list[str]:
    """`jinfer rehash DIR`: re-records the top-level files in integrity.json; returns the changes.

    The parameter files must still match their records (CorruptCheckpointError otherwise: convert
    again). Every change is logged (WARNING) and kept in the manifest's "rehashed" history.
    """
    from jinfer import checkpoint

    path = Path(path).absolute()
    checkpoint._check_complete(path)
    manifest_path = path / INTEGRITY_FILE
    try:
        integrity = json.loads(manifest_path.read_text())
        check_manifest(
            path, {**integrity, "model_files": integrity.get("model_files", {"config.json": None})}
        )
    except UnverifiedCheckpointError:
        raise
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{manifest_path}: cannot be read ({e}); convert the model again") from e
    except CorruptCheckpointError as e:
        if "'model_files'" not in str(e):
            raise
    checkpoint.verify_files(path, integrity, full=True)
    old = integrity.get("model_files") if isinstance(integrity.get("model_files"), dict) else {}
    new = model_file_manifest(path)
    changes = [
        f"{n}: {'added' if n not in old else 'removed' if n not in new else 'changed'}"
        for n in sorted(set(old) | set(new))
        if (old.get(n) or {}).get("sha256") != (new.get(n) or {}).get("sha256")
    ]
    for change in changes:
        log.warning("jinfer rehash %s: %s (now trusted)", path, change)
    history = integrity.get("rehashed") if isinstance(integrity.get("rehashed"), list) else []
    integrity.update(
        format_version=INTEGRITY_VERSION,
        model_files=new,
        rehashed=[*history, {"at": time.time(), "changes": changes}],
    )
    tmp = manifest_path.with_name(f".{INTEGRITY_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(integrity, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    checkpoint.load_config(path)  # the re-recorded directory loads (config parses, coverage holds)
    return changes
