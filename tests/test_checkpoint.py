"""Model directories: round trips, sharded restore, dtype cast, every damage case, inspect."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.checkpoint import (
    COMPLETE_MARKER,
    PARAMS_DIR,
    describe_model_dir,
    flatten_params,
    inspect_model_dir,
    load_config,
    load_model_dir,
    restore_params,
    save_model_dir,
)
from jinfer.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    ParamMismatchError,
    UnknownModelError,
)
from jinfer.integrity import rehash_model_dir
from jinfer.modeling import FlaxModel
from jinfer.models.classifiers import ImageClassifierConfig, TextClassifierConfig
from jinfer.sharding import make_mesh

TEXT_CFG = TextClassifierConfig(vocab_size=100, embed_dim=64, hidden_dim=128, num_layers=2, num_classes=4)
IMAGE_CFG = ImageClassifierConfig(height=8, width=8, channels=3, features=8, num_classes=4)


@pytest.fixture(scope="module")
def text_model() -> FlaxModel:
    return FlaxModel.from_name("TextClassifier", TEXT_CFG)


@pytest.fixture(scope="module")
def text_params(text_model):
    return text_model.init_params(seed=1)


@pytest.fixture(scope="module")
def saved_text(tmp_path_factory, text_model, text_params) -> Path:
    """One saved TextClassifier directory shared by the read-only tests."""
    path = tmp_path_factory.mktemp("ckpt") / "text"
    save_model_dir(path, "TextClassifier", TEXT_CFG, text_params, extra_files={"tokenizer.json": {"v": 1}})
    return path


def _copy(src: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _largest_data_file(path: Path) -> Path:
    files = [p for p in (path / PARAMS_DIR).rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _tokens():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, TEXT_CFG.vocab_size, (2, 8)), jnp.int32)
    return tokens, jnp.ones((2, 8), bool)


def _assert_trees_equal(a, b):
    fa, fb = flatten_params(a), flatten_params(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


# -- round trips --------------------------------------------------------------------------------
def test_round_trip_nnx(saved_text, text_model, text_params):
    restored = restore_params(saved_text, text_model)
    _assert_trees_equal(restored, text_params)
    assert set(restored["up"]) == {0, 1}  # int list keys come back as ints
    meta = json.loads((saved_text / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["model_class"] == "TextClassifier"
    assert meta["dtype"] == "float32" and meta["config"]["hidden_dim"] == 128
    assert json.loads((saved_text / "tokenizer.json").read_text()) == {"v": 1}
    assert (saved_text / COMPLETE_MARKER).is_file()
    arrays = json.loads((saved_text / "integrity.json").read_text())["arrays"]
    embed = np.asarray(text_params["embed"])
    assert arrays["embed"] == {
        "shape": [100, 64],
        "dtype": "float32",
        "sha256": hashlib.sha256(embed.astype("<f4").tobytes()).hexdigest(),
    }


def test_round_trip_linen_and_load_model_dir(tmp_path):
    model = FlaxModel.from_name("ImageClassifier", IMAGE_CFG)
    params = model.init_params(seed=2)
    save_model_dir(tmp_path / "img", "ImageClassifier", IMAGE_CFG, params, extra_config={"family": "demo"})
    loaded, restored, meta = load_model_dir(tmp_path / "img")
    assert loaded.config == IMAGE_CFG and meta["family"] == "demo"
    _assert_trees_equal(restored, params)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    np.testing.assert_array_equal(model.apply_fn()(restored, images), model.apply_fn()(params, images))


def test_params_are_written_uncompressed_and_compressed_dirs_still_restore(tmp_path, text_model, monkeypatch):
    """save_model_dir writes the arrays uncompressed (no zstd to undo at every restore), and a
    directory written compressed (Orbax's default, as jinfer wrote before) restores the same."""
    import orbax.checkpoint as ocp

    from jinfer import checkpoint

    params = jax.tree.map(jnp.zeros_like, text_model.init_params(seed=3))  # zeros: compress to ~nothing
    raw_bytes = sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(params))

    def params_bytes(path: Path) -> int:
        return sum(f.stat().st_size for f in (path / PARAMS_DIR).rglob("*") if f.is_file())

    save_model_dir(tmp_path / "raw", "TextClassifier", TEXT_CFG, params)
    monkeypatch.setattr(checkpoint, "_uncompressed_handler", lambda ocp: ocp.PyTreeCheckpointHandler())
    save_model_dir(tmp_path / "zstd", "TextClassifier", TEXT_CFG, params)
    assert params_bytes(tmp_path / "raw") >= raw_bytes
    assert params_bytes(tmp_path / "zstd") < raw_bytes / 4
    for name in ("raw", "zstd"):
        _assert_trees_equal(restore_params(tmp_path / name, text_model), params)
        with ocp.StandardCheckpointer() as ckptr:  # still Orbax's standard layout, for other tools
            assert sorted(ckptr.metadata(tmp_path / name / PARAMS_DIR).item_metadata) == sorted(
                flatten_params(params)
            )


def test_load_config(saved_text):
    spec, config, meta = load_config(saved_text)
    assert spec.name == "TextClassifier" and config == TEXT_CFG and meta["dtype"] == "float32"


def test_save_refuses_existing_dir_unless_overwrite(tmp_path, text_params):
    path = tmp_path / "m"
    save_model_dir(path, "TextClassifier", TEXT_CFG, text_params)
    with pytest.raises(CheckpointError, match="already exists"):
        save_model_dir(path, "TextClassifier", TEXT_CFG, text_params)
    doubled = jax.tree.map(lambda x: x * 2, text_params)
    save_model_dir(path, "TextClassifier", TEXT_CFG, doubled, overwrite=True)
    _assert_trees_equal(restore_params(path, FlaxModel.from_name("TextClassifier", TEXT_CFG)), doubled)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no tmp/old dirs left behind


def test_two_saves_into_one_directory_keep_the_first_complete_one(tmp_path, text_params, monkeypatch):
    """Two processes converting into one OUT: the one finishing second gets a CheckpointError
    saying so (it was a raw 'Directory not empty'); the first output stays whole, no temp left."""
    import jinfer.checkpoint as ckpt

    path = tmp_path / "m"
    real = ckpt._write_contents
    doubled = jax.tree.map(lambda x: x * 2, text_params)

    def write_while_another_finishes(tmp, *args, **kwargs):
        real(tmp, *args, **kwargs)
        monkeypatch.setattr(ckpt, "_write_contents", real)
        save_model_dir(path, "TextClassifier", TEXT_CFG, doubled)  # the other process, done first

    monkeypatch.setattr(ckpt, "_write_contents", write_while_another_finishes)
    with pytest.raises(CheckpointError, match="written by another process while this one"):
        save_model_dir(path, "TextClassifier", TEXT_CFG, text_params)
    _assert_trees_equal(restore_params(path, FlaxModel.from_name("TextClassifier", TEXT_CFG)), doubled)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# -- sharding and dtype -------------------------------------------------------------------------
def test_sharded_restore_matches_unsharded(saved_text, text_model, text_params):
    mesh = make_mesh("data=2,model=4")
    sharded = restore_params(saved_text, text_model, mesh=mesh)
    up0 = sharded["up"][0]  # [embed=64, mlp=128], mlp split 4 ways over "model"
    assert len(up0.addressable_shards) == 8
    assert all(s.data.shape == (64, 32) for s in up0.addressable_shards)
    assert sharded["head"].addressable_shards[0].data.shape == (64, 4)  # replicated
    tokens, mask = _tokens()
    fwd = jax.jit(text_model.apply_fn())
    np.testing.assert_allclose(
        np.asarray(fwd(sharded, tokens, mask)),
        np.asarray(fwd(text_params, tokens, mask)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_save_sharded_params(saved_text, text_model, text_params, tmp_path):
    sharded = restore_params(saved_text, text_model, mesh=make_mesh("data=2,model=4"))
    save_model_dir(tmp_path / "resaved", "TextClassifier", TEXT_CFG, sharded)
    _assert_trees_equal(restore_params(tmp_path / "resaved", text_model), text_params)
    before = json.loads((saved_text / "integrity.json").read_text())["arrays"]
    after = json.loads((tmp_path / "resaved" / "integrity.json").read_text())["arrays"]
    assert after == before  # same content hashes whether saved from host or sharded arrays


def test_f32_checkpoint_restored_as_bf16(saved_text, text_model, text_params):
    restored = restore_params(saved_text, text_model, dtype=jnp.bfloat16)
    expected = jax.tree.map(lambda x: x.astype(jnp.bfloat16), text_params)
    _assert_trees_equal(restored, expected)


def test_save_with_dtype_records_bf16(tmp_path, text_model, text_params):
    save_model_dir(tmp_path / "bf", "TextClassifier", TEXT_CFG, text_params, dtype="bfloat16")
    _, _, meta = load_config(tmp_path / "bf")
    assert meta["dtype"] == "bfloat16"
    restored = restore_params(tmp_path / "bf", text_model)
    assert restored["embed"].dtype == jnp.bfloat16


# -- damage -------------------------------------------------------------------------------------
def test_flipped_byte_is_corrupt(saved_text, text_model, tmp_path):
    path = _copy(saved_text, tmp_path)
    data = _largest_data_file(path)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    rel = data.relative_to(path / PARAMS_DIR).as_posix()
    with pytest.raises(CorruptCheckpointError, match="sha256 mismatch") as e:
        restore_params(path, text_model)
    assert str(path) in str(e.value) and rel in str(e.value)
    # The message names the parameters whose data the damaged file holds (Orbax decides which
    # arrays share a file, so read the mapping recorded at save time).
    holders = json.loads((path / "integrity.json").read_text())["files"][rel]["params"]
    assert holders and all(name in str(e.value) for name in holders)


def test_truncated_file_is_corrupt(saved_text, text_model, tmp_path):
    path = _copy(saved_text, tmp_path)
    data = _largest_data_file(path)
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CorruptCheckpointError, match="truncated") as e:
        restore_params(path, text_model)
    assert data.relative_to(path / PARAMS_DIR).as_posix() in str(e.value)
    # Without the hash check, TensorStore's read error is still wrapped with the path.
    with pytest.raises(CorruptCheckpointError) as e:
        restore_params(path, text_model, verify=False)
    assert str(path) in str(e.value)


def test_ctrl_c_during_the_restore_is_an_interrupt_not_damage(saved_text, text_model, monkeypatch):
    """Orbax wraps a KeyboardInterrupt raised in its restore into a bare Exception; that used to
    read as a damaged checkpoint (a user might delete a good cache). It is the interrupt again."""
    import orbax.checkpoint as ocp

    def interrupted(self, *args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise Exception("Error in restore") from e

    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", interrupted)
    with pytest.raises(KeyboardInterrupt):
        restore_params(saved_text, text_model, verify=False)


def test_missing_file_is_not_found(saved_text, text_model, tmp_path):
    path = _copy(saved_text, tmp_path)
    data = _largest_data_file(path)
    data.unlink()
    with pytest.raises(CheckpointNotFoundError, match="missing") as e:
        restore_params(path, text_model)
    assert data.relative_to(path / PARAMS_DIR).as_posix() in str(e.value) and str(path) in str(e.value)


def test_missing_dir_and_config(tmp_path, saved_text, text_model):
    with pytest.raises(CheckpointNotFoundError, match="does not exist") as e:
        load_config(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    path = _copy(saved_text, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"config\.json"):
        load_config(path)


def test_a_checkpoint_to_convert_is_named_as_such(tmp_path):
    """Loading a .gguf file or a Hugging Face directory as a model directory says to convert it
    (it said "does not exist", or "the save was interrupted")."""
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    (hf_dir / "model.safetensors").write_bytes(b"")
    for path in (gguf_file, hf_dir):
        with pytest.raises(CheckpointNotFoundError, match=r"is a checkpoint to convert.*jinfer convert"):
            load_config(path)


def test_leftovers_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    """A save killed with SIGKILL leaves `.NAME.tmp-PID-*` (515 MB for SmolLM2) that nothing
    removed: the next save to NAME deletes those whose process is gone and which nothing wrote
    to for an hour; a live process's, or a fresh one (another host), stays."""
    from jinfer.checkpoint import remove_dead_leftovers

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    old = tmp_path / f".model.tmp-{dead_pid}-aaaa"
    (old / "params").mkdir(parents=True)
    (old / "params" / "d").write_bytes(b"x" * 100)
    fresh = tmp_path / f".model.tmp-{dead_pid}-bbbb"
    fresh.mkdir()
    (fresh / "f").write_bytes(b"y")
    alive = tmp_path / f".model.tmp-{os.getpid()}-cccc"
    alive.mkdir()
    hour_ago = time.time() - 7200
    for path in (old, old / "params", old / "params" / "d", alive):
        os.utime(path, (hour_ago, hour_ago))
    remove_dead_leftovers(tmp_path / "model")
    assert not old.exists() and fresh.exists() and alive.exists()


def test_bad_json_is_corrupt(saved_text, tmp_path):
    path = _copy(saved_text, tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON") as e:
        load_config(path)
    assert str(path / "config.json") in str(e.value)


def test_half_written_save_is_incomplete(saved_text, text_model, tmp_path):
    path = _copy(saved_text, tmp_path)
    (path / COMPLETE_MARKER).unlink()
    for load in (load_config, lambda p: restore_params(p, text_model), inspect_model_dir):
        with pytest.raises(IncompleteCheckpointError, match="interrupted") as e:
            load(path)
        assert str(path) in str(e.value)
    # A crash before the rename leaves only the sibling tmp dir.
    leftover = tmp_path / ".crashed.tmp-123-abcd"
    os.rename(path, leftover)
    with pytest.raises(IncompleteCheckpointError, match="interrupted") as e:
        load_config(tmp_path / "crashed")
    assert str(tmp_path / "crashed") in str(e.value) and leftover.name in str(e.value)
    with pytest.raises(IncompleteCheckpointError):
        load_config(leftover)


def test_failed_save_leaves_nothing(tmp_path, text_params):
    bad = dict(text_params, broken=object())  # Orbax cannot save this leaf
    with pytest.raises(Exception):  # noqa: B017 - whatever Orbax raises; the point is cleanup
        save_model_dir(tmp_path / "m", "TextClassifier", TEXT_CFG, bad)
    assert list(tmp_path.iterdir()) == []


def test_extra_and_missing_params(tmp_path, text_model, text_params):
    extra = dict(text_params, bonus={"w": np.zeros((3,), np.float32)})
    save_model_dir(tmp_path / "extra", "TextClassifier", TEXT_CFG, extra)
    with pytest.raises(ParamMismatchError, match="extra on disk") as e:
        restore_params(tmp_path / "extra", text_model)
    assert "bonus/w" in str(e.value) and str(tmp_path / "extra") in str(e.value)

    missing = {k: v for k, v in text_params.items() if k != "head"}
    missing["up"] = {0: text_params["up"][0]}
    save_model_dir(tmp_path / "missing", "TextClassifier", TEXT_CFG, missing)
    with pytest.raises(ParamMismatchError, match="missing on disk") as e:
        restore_params(tmp_path / "missing", text_model)
    assert "head" in str(e.value) and "up/1" in str(e.value) and str(tmp_path / "missing") in str(e.value)


def test_wrong_shape(tmp_path, text_model):
    other_cfg = TextClassifierConfig(vocab_size=100, embed_dim=64, hidden_dim=96, num_layers=2, num_classes=4)
    other = FlaxModel.from_name("TextClassifier", other_cfg).init_params(seed=0)
    save_model_dir(tmp_path / "other", "TextClassifier", other_cfg, other)
    with pytest.raises(ParamMismatchError, match="shape mismatch") as e:
        restore_params(tmp_path / "other", text_model)
    msg = str(e.value)
    assert "up/0 expected (64, 128), found (64, 96)" in msg
    assert "down/1 expected (128, 64), found (96, 64)" in msg and str(tmp_path / "other") in msg


def test_unknown_model_class(saved_text, tmp_path):
    path = _copy(saved_text, tmp_path)
    meta = json.loads((path / "config.json").read_text())
    meta["model_class"] = "NoSuchModel"
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match=r"config\.json changed since the model was saved"):
        load_config(path)  # an edited config is refused until it is re-recorded on purpose
    with pytest.raises(UnknownModelError, match="NoSuchModel"):
        rehash_model_dir(path)  # records the edit, then loads the directory to check it
    with pytest.raises(UnknownModelError, match="NoSuchModel") as e:
        load_config(path)
    assert str(path / "config.json") in str(e.value)


# -- inspect ------------------------------------------------------------------------------------
def test_inspect_per_device_bytes(saved_text):
    info = describe_model_dir(saved_text, "data=2,model=4")
    by_path = {p.path: p for p in info.params}
    assert by_path["up/0"].nbytes == 64 * 128 * 4 == 32768
    assert by_path["up/0"].per_device_bytes == 8192
    assert by_path["head"].per_device_bytes == 1024  # replicated
    assert info.param_count == 100 * 64 + 2 * 2 * 64 * 128 + 64 * 4 == 39424
    assert info.total_bytes == 39424 * 4
    assert info.per_device_bytes == (100 * 64 + 4 * 64 * 128) // 4 * 4 + 64 * 4 * 4 == 40192

    text = inspect_model_dir(saved_text, "data=2,model=4")
    assert "TextClassifier" in text and "mesh: data=2,model=4 (8 devices)" in text
    up0_line = next(line for line in text.splitlines() if line.startswith("up/0 "))
    assert "(64, 128)" in up0_line and "32768" in up0_line and "8192" in up0_line
    assert "total: 6 arrays, 39424 params, 157696 bytes" in text
    assert "per device on mesh data=2,model=4: 40192 bytes" in text

    plain = inspect_model_dir(saved_text)
    assert "embed" in plain and "bytes/device" not in plain and "total: 6 arrays" in plain
