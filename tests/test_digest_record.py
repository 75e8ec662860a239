"""Recorded digests (jinfer.digest_record): a warm load re-reads no unchanged file, yet every
change made through the file system is re-hashed and caught."""

import json
import os
import shutil
from pathlib import Path

import pytest

from jinfer import checkpoint, integrity
from jinfer.digest_record import RECORD_FILE
from jinfer.errors import CorruptCheckpointError
from jinfer.testing import make_tiny_llm_dir


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    return make_tiny_llm_dir(tmp_path_factory.mktemp("digest") / "tiny")


@pytest.fixture
def model_dir(saved_dir, tmp_path):
    path = Path(shutil.copytree(saved_dir, tmp_path / "m"))
    (path / RECORD_FILE).unlink(missing_ok=True)
    return path


@pytest.fixture
def hashed(monkeypatch):
    """Names of the files whose bytes were hashed (both hash functions of the load path)."""
    seen: list[str] = []

    def counting(original):
        def wrapper(path):
            seen.append(Path(path).name)
            return original(path)

        return wrapper

    monkeypatch.setattr(checkpoint, "_sha256_file", counting(checkpoint._sha256_file))
    monkeypatch.setattr(integrity, "sha256_file", counting(integrity.sha256_file))
    return seen


def _param_files(path: Path) -> list[Path]:
    return sorted(p for p in (path / "params").rglob("*") if p.is_file())


def _largest(path: Path) -> Path:
    return max(_param_files(path), key=lambda p: p.stat().st_size)


def _flip_byte_keeping_mtime(file: Path) -> None:
    st = file.stat()
    with open(file, "r+b") as f:  # same inode, same size
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back: only ctime moved
    assert file.stat().st_mtime_ns == st.st_mtime_ns and file.stat().st_size == st.st_size


def test_warm_load_reads_no_file_bytes_and_restores_the_same_params(model_dir, hashed):
    _, cold, _ = checkpoint.load_model_dir(model_dir)
    n_params = len(_param_files(model_dir))
    top_level = set(json.loads((model_dir / "integrity.json").read_text())["model_files"])
    assert sorted(hashed) == sorted([p.name for p in _param_files(model_dir)] + list(top_level))
    record = json.loads((model_dir / RECORD_FILE).read_text())
    assert len(record["files"]) == n_params + len(top_level)
    hashed.clear()
    _, warm, _ = checkpoint.load_model_dir(model_dir)
    assert hashed == []  # nothing re-read
    assert checkpoint.flatten_params(warm).keys() == checkpoint.flatten_params(cold).keys()
    for name, x in checkpoint.flatten_params(cold).items():
        assert (checkpoint.flatten_params(warm)[name] == x).all(), name


def test_changed_file_is_rehashed_and_a_flipped_byte_is_caught(model_dir, hashed):
    checkpoint.verify_files(model_dir)
    checkpoint.load_config(model_dir)
    target = _largest(model_dir)
    _flip_byte_keeping_mtime(target)
    hashed.clear()
    with pytest.raises(CorruptCheckpointError, match=rf"sha256 mismatch.*{target.name}"):
        checkpoint.verify_files(model_dir)
    assert hashed == [target.name]  # only the changed file was read again
    # Truncation (changed size) is caught before any hashing.
    target.write_bytes(target.read_bytes()[:-1])
    with pytest.raises(CorruptCheckpointError, match="truncated or overwritten"):
        checkpoint.verify_files(model_dir)


def test_edited_config_with_same_size_is_caught_after_a_warm_load(model_dir, hashed):
    checkpoint.load_config(model_dir)
    config = model_dir / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"Llama"', '"Llamb"'))
    assert len(config.read_text()) == len(text)
    hashed.clear()
    with pytest.raises(CorruptCheckpointError, match=r"config\.json changed"):
        checkpoint.load_config(model_dir)
    assert hashed == ["config.json"]


def test_full_verify_and_a_new_manifest_ignore_the_record(model_dir, hashed, monkeypatch):
    checkpoint.verify_files(model_dir)
    n_params = len(_param_files(model_dir))
    hashed.clear()
    monkeypatch.setenv("JINFER_VERIFY", "full")
    checkpoint.verify_files(model_dir)
    assert len(hashed) == n_params
    monkeypatch.delenv("JINFER_VERIFY")
    hashed.clear()
    checkpoint.verify_files(model_dir, full=True)  # what `jinfer rehash` runs
    assert len(hashed) == n_params
    hashed.clear()
    manifest = json.loads((model_dir / "integrity.json").read_text())
    manifest["note"] = "edited"
    (model_dir / "integrity.json").write_text(json.dumps(manifest))
    checkpoint.verify_files(model_dir)  # the record belongs to the old manifest
    assert len(hashed) == n_params


def test_a_copied_directory_or_a_damaged_record_is_hashed_again(model_dir, hashed, tmp_path):
    checkpoint.verify_files(model_dir)
    n_params = len(_param_files(model_dir))
    copy = Path(shutil.copytree(model_dir, tmp_path / "copy"))  # copy2 keeps mtimes, not inodes
    hashed.clear()
    checkpoint.verify_files(copy)
    assert len(hashed) == n_params
    (model_dir / RECORD_FILE).write_text("{not json")
    hashed.clear()
    checkpoint.verify_files(model_dir)
    assert len(hashed) == n_params
    record = json.loads((model_dir / RECORD_FILE).read_text())
    rel = next(iter(record["files"]))
    record["files"][rel]["sha256"] = "0" * 64  # a record that disagrees with the manifest is not trusted
    (model_dir / RECORD_FILE).write_text(json.dumps(record))
    hashed.clear()
    checkpoint.verify_files(model_dir)
    assert hashed == [Path(rel).name]
