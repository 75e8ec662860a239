"""Hugging Face model ids ("org/name", "org/name@revision") -> converted jinfer model directories.

Files come through `huggingface_hub.snapshot_download`, so its cache (HF_HOME / HF_HUB_CACHE), its
token (HF_TOKEN or `hf auth login`), revisions and HF_HUB_OFFLINE behave as in every other HF
library. The snapshot is converted once into
`$JINFER_HOME/models/hf/<org>--<name>/<commit>-<dtype>` (keyed by repo id, resolved commit and
dtype) and reused afterwards; conversion is atomic and guarded by a lock file, so concurrent
processes convert once.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from jinfer.errors import JinferError

log = logging.getLogger("jinfer.hub")

# Hub repo ids: "org/name", names of letters, digits, "-", "_", "."; optional "@revision".
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*(@[A-Za-z0-9_.\-/]+)?$")
# What a conversion reads: configs, weights, tokenizer and sentence-transformers module files.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]  # fnmatch: * spans "/"
# Second copies of the weights some repos carry next to the transformers ones (Mistral, Llama 3).
IGNORE_PATTERNS = ["consolidated*", "original/*"]


class HubDownloadError(JinferError):
    """A Hugging Face model id could not be resolved (offline and not cached, unknown or gated repo)."""


def is_repo_id(name: str) -> bool:
    """True for strings shaped like a hub id ("org/name" or "org/name@revision")."""
    return bool(_REPO_ID.match(name)) and not name.startswith((".", "/")) and ".." not in name


def split_revision(name: str) -> tuple[str, str | None]:
    """ "org/name@rev" -> ("org/name", "rev"); "org/name" -> ("org/name", None)."""
    repo, _, revision = name.partition("@")
    return repo, revision or None


def download_snapshot(name: str, revision: str | None = None) -> Path:
    """The local snapshot directory of a hub model, downloaded unless cached (or HF_HUB_OFFLINE)."""
    import huggingface_hub
    from huggingface_hub import errors

    repo, rev = split_revision(name)
    revision = revision or rev
    try:
        snapshot = Path(
            huggingface_hub.snapshot_download(
                repo, revision=revision, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS
            )
        )
    except (errors.RepositoryNotFoundError, errors.GatedRepoError, errors.RevisionNotFoundError) as e:
        raise HubDownloadError(
            f"Hugging Face model {repo!r} (revision {revision or 'main'}) is not available: "
            f"{type(e).__name__}: {_first_line(e)}. Check the id, and for gated or private repos "
            "log in (`hf auth login`) or set HF_TOKEN"
        ) from e
    except Exception as e:  # LocalEntryNotFoundError (offline, not cached), network errors
        raise HubDownloadError(
            f"{name!r} is no local directory, and the Hugging Face model {repo!r} "
            f"(revision {revision or 'main'}) could not be downloaded: "
            f"{type(e).__name__}: {_first_line(e)}. To work offline, fetch it once with network "
            f"(`hf download {repo}` or `jinfer convert {repo} OUT`) and then set HF_HUB_OFFLINE=1 "
            "(files are found in the HF cache, HF_HOME / HF_HUB_CACHE), or pass a local directory "
            "converted with `jinfer convert SRC OUT`"
        ) from e
    check_snapshot(repo, snapshot)
    return snapshot


def check_snapshot(repo: str, snapshot: Path) -> None:
    """HubDownloadError for a cached snapshot whose files lost their data (links to blobs that
    were deleted: a pruned cache) or whose weights never finished downloading (`.incomplete`
    blobs and no weights linked), saying how to fetch it again."""
    broken = sorted(
        p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_symlink() and not p.exists()
    )
    partial = sorted(p.name for p in (snapshot.parent.parent / "blobs").glob("*.incomplete"))
    weights = any(snapshot.glob("*.safetensors"))
    if not broken and (weights or not partial):
        return
    what = f"files whose data is missing ({', '.join(broken[:5])})" if broken else "an unfinished download"
    raise HubDownloadError(
        f"the cached snapshot of {repo!r} ({snapshot}) has {what}: the download was interrupted "
        f"or the cache was pruned. Download it again (`hf download {repo} --revision "
        f"{snapshot.name} --force-download`, with network), or delete {snapshot} and retry"
    )


def cached_model_dir(repo: str, commit: str, dtype: str) -> Path:
    """Where the conversion of `repo` at `commit` in `dtype` lives in jinfer's cache."""
    from jinfer.hub import jinfer_home

    return jinfer_home() / "models" / "hf" / repo.replace("/", "--") / f"{commit}-{dtype}"


def conversion_dtype(dtype: Any) -> str:
    """The dtype a hub checkpoint is converted (and cached) in for an engine asking for `dtype`
    (any dtype jinfer accepts: a name, a NumPy/JAX dtype, a `jinfer.precision.Precision`, None):
    "bfloat16" when the engine runs wholly in bfloat16, else "float32", from which restoring casts
    losslessly to float16, to bfloat16 weight matrices, ..."""
    from jinfer import precision

    p = precision.as_precision(dtype)  # ConfigError naming the accepted dtypes
    return "bfloat16" if p.weights == p.compute == "bfloat16" else "float32"


def ensure_hub_model(name: str, dtype: str | None = None, progress: bool = True) -> Path:
    """A jinfer model directory for hub id `name`, converted from the HF snapshot on first use."""
    from jinfer.checkpoint import COMPLETE_MARKER
    from jinfer.convert import convert
    from jinfer.hub import _file_lock, _say

    dtype = conversion_dtype(dtype)
    repo, _ = split_revision(name)
    snapshot = download_snapshot(name)
    dest = cached_model_dir(repo, snapshot.name, dtype)
    if (dest / COMPLETE_MARKER).is_file() and not missed_files(snapshot, dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.parent / f".{dest.name}.lock"):
        missed = missed_files(snapshot, dest)
        if (dest / COMPLETE_MARKER).is_file() and not missed:  # another process finished meanwhile
            return dest
        if missed and dest.exists():
            _say(
                progress, f"jinfer: {repo}@{snapshot.name[:12]} now has {', '.join(missed)}: converting again"
            )
        _say(progress, f"jinfer: converting {repo}@{snapshot.name[:12]} to {dest} ({dtype}), once")
        convert(snapshot, dest, dtype=dtype, progress=progress, overwrite=dest.exists())
    return dest


def missed_files(snapshot: Path, dest: Path) -> list[str]:
    """Files of the snapshot that a conversion at `dest` did not see: a snapshot first used while
    its download was partial (no tokenizer.json yet, say) and completed since. [] when `dest` does
    not exist. Files of one commit never change, so their presence is all that is compared."""
    if not dest.is_dir():
        return []
    wanted = {
        "tokenizer.json": "tokenizer.json",
        "tokenizer_config.json": "tokenizer_config.json",
        "chat_template.jinja": "tokenizer_config.json",
        "generation_config.json": "generation_config.json",
    }
    return [src for src, out in wanted.items() if (snapshot / src).is_file() and not (dest / out).is_file()]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0].rstrip(".") if text else "no details"
