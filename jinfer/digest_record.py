"""Digests verified before: a warm start does not re-read files that have not changed since.

Loading a model directory checks every file against `integrity.json` (sha256 of 0.3-1 GB of
parameters on every start). After a file's sha256 has matched, its digest is recorded in
`DIR/.jinfer_verified.json` together with the file's identity and change stamps: size, inode,
device, modification time and status-change time (`st_ctime_ns`, which the kernel sets on every
write, rename-over, chmod or `utime` call and user code cannot set back). A later load re-hashes
only files whose stamps differ from the record, or whose recorded digest is not the one the
manifest expects now; a changed `integrity.json` invalidates the whole record.

What this still catches on a warm start: any change made through the file system (writing a
flipped byte, truncating, replacing or copying a file, even with its mtime set back, since ctime
moves). What it does not: bytes that change below the file system (disk or memory bit rot, writes
to the raw block device, a file system that does not maintain ctime, e.g. some FUSE or network
mounts). For those, `JINFER_VERIFY=full` (or `jinfer --verify ...`) re-hashes everything and
ignores the record; `jinfer rehash DIR` re-hashes too. A directory that is not writable gets no
record and is fully re-hashed on each load, as before. The record is not a security boundary:
whoever can write the directory can already rewrite `integrity.json` itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

RECORD_FILE = ".jinfer_verified.json"
RECORD_VERSION = 1
VERIFY_ENV = "JINFER_VERIFY"


def full_verify_requested() -> bool:
    """True when $JINFER_VERIFY is "full": every file is re-hashed, the record ignored."""
    return os.environ.get(VERIFY_ENV, "").strip().lower() == "full"


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns]


def manifest_digest(integrity: Any) -> str:
    """sha256 of the manifest's canonical JSON: a record is valid for one manifest only."""
    return hashlib.sha256(json.dumps(integrity, sort_keys=True).encode()).hexdigest()


class DigestRecord:
    """The verified digests of one model directory, keyed by path relative to it."""

    def __init__(self, model_dir: Path, integrity: Any, use_record: bool = True):
        self.path = Path(model_dir) / RECORD_FILE
        self._manifest = manifest_digest(integrity)
        self._files: dict[str, dict[str, Any]] = {}
        self._changed = False
        if not use_record or full_verify_requested():
            return  # everything is re-hashed (and recorded afresh)
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.path.read_text())
            if (
                isinstance(data, dict)
                and data.get("version") == RECORD_VERSION
                and data.get("manifest") == self._manifest
                and isinstance(data.get("files"), dict)
            ):
                self._files = data["files"]

    def verified(self, rel: str, st: os.stat_result, sha256: str) -> bool:
        """True if `rel` (stat result `st`) was verified with digest `sha256` and is unchanged."""
        rec = self._files.get(rel)
        return isinstance(rec, dict) and rec.get("sha256") == sha256 and rec.get("stamp") == _stamp(st)

    def add(self, rel: str, before: os.stat_result, sha256: str) -> None:
        """Records `rel` as verified with `sha256`, if its stat result `before` the hash still holds."""
        with contextlib.suppress(OSError):
            if _stamp(os.stat(self.path.parent / rel)) == _stamp(before):
                self._files[rel] = {"sha256": sha256, "stamp": _stamp(before)}
                self._changed = True

    def save(self) -> None:
        """Writes the record atomically; a read-only directory simply keeps none."""
        if not self._changed:
            return
        data = {"version": RECORD_VERSION, "manifest": self._manifest, "files": self._files}
        tmp = self.path.with_name(f"{RECORD_FILE}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._changed = False
