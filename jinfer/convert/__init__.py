"""Checkpoint conversion: Hugging Face directories and GGUF files -> jinfer model directories.

    from jinfer.convert import convert
    convert("path/to/hf_model", "models/my_model")                 # config.json + *.safetensors
    convert("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2")   # llama / qwen2 GGUF

See `jinfer.convert.hf` (safetensors, tensor mapping) and `jinfer.convert.gguf` (dequantization,
q/k un-permutation, tokenizer from metadata).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from jinfer.convert.hf import ARCHITECTURES, GGUF_ARCHITECTURES, supported_text
from jinfer.errors import CheckpointNotFoundError, ConversionError

__all__ = ["ARCHITECTURES", "GGUF_ARCHITECTURES", "convert", "detect_format", "supported_text"]

QUANTIZATIONS: tuple[str, ...] = ()  # weight-only quantization is not implemented by the models yet


def detect_format(src: str | os.PathLike) -> str:
    """ "gguf" for a .gguf file (or any file starting with the GGUF magic), "hf" for a directory with
    config.json or modules.json; CheckpointNotFoundError / ConversionError otherwise."""
    path = Path(src)
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if path.suffix.lower() == ".gguf" or magic == b"GGUF":
            return "gguf"
        raise ConversionError(
            f"{path}: unknown checkpoint file (expected a .gguf file or a Hugging Face directory)"
        )
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "modules.json").is_file():
            return "hf"
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; it holds {[p.name for p in ggufs]}: pass one of those files" if ggufs else ""
        raise CheckpointNotFoundError(f"{path}: no config.json (not a Hugging Face model directory){hint}")
    raise CheckpointNotFoundError(f"{path} does not exist")


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "float32",
    quantize: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Converts a checkpoint to a jinfer model directory and returns its path.

    Args:
      src: a Hugging Face directory (config.json + *.safetensors, single file or sharded with
        model.safetensors.index.json, or a sentence-transformers directory), a .gguf file, or a
        Hugging Face model id ("org/name[@revision]", fetched with huggingface_hub), or a known
        name (`jinfer.hub.KNOWN_MODELS`, e.g. "smollm2-135m-instruct": the file it comes from).
      out: the model directory to write (atomically; see `checkpoint.save_model_dir`).
      dtype: "float32" or "bfloat16" for the saved floating params.
      quantize: None, or "int8" for per-channel int8 weight-only quantization (jinfer.quant).
      progress: show a progress bar over tensors.
      overwrite: replace `out` if it exists.

    Raises UnsupportedArchitectureError, MissingTensorError, CheckpointNotFoundError or
    ConversionError (corrupt/truncated files), each naming the file or tensor involved.
    """
    from jinfer import quant
    from jinfer.convert import gguf, hf

    if quantize in ("none", ""):
        quantize = None
    if quantize is not None and quantize not in quant.METHODS:
        raise ConversionError(f"quantize={quantize!r} is not supported; use one of {quant.METHODS} or None")
    if isinstance(src, str) and not Path(src).exists():
        from jinfer import hf_hub, hub

        if src.lower() in hub.KNOWN_MODELS:  # a known name: the file it is converted from
            src = hub.known_model_source(src.lower(), progress)
        elif hf_hub.is_repo_id(src):  # "org/name[@revision]": the snapshot in the HF cache
            src = hf_hub.download_snapshot(src)
    if overwrite and Path(out).exists():  # checked before any conversion work
        from jinfer.checkpoint import check_replaceable

        check_replaceable(Path(out), [src])
    kind = detect_format(src)
    start = time.perf_counter()
    fn = gguf.convert_gguf if kind == "gguf" else hf.convert_hf
    result = fn(src, out, dtype=dtype, progress=progress, overwrite=overwrite, quantize=quantize)
    hf.log.info("converted %s -> %s in %.1f s", src, result, time.perf_counter() - start)
    return result
