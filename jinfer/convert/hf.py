"""Hugging Face checkpoints (config.json + *.safetensors) -> jinfer model directories.

One code path maps tensors for every source: a `TensorSource` yields tensors under their Hugging
Face names and layouts (`SafetensorsSource` here, the GGUF reader in `jinfer.convert.gguf`), and
`convert_source` turns them into jinfer params with each model module's `hf_param_map(config)` and
`layers.apply_hf_transform`, then saves the directory with `checkpoint.save_model_dir`.

Memory stays bounded: safetensors files are parsed by their JSON header and each tensor is read
through its own memory map, converted, and unmapped before the next one, so the peak is the output
params plus about one source tensor (the raw checkpoint is never held). bf16/fp8 tensors are read
with `ml_dtypes` (numpy has no bfloat16), which is also why `safe_open(framework="numpy")` is not used.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import jax
import ml_dtypes
import numpy as np

from jinfer.errors import (
    CheckpointNotFoundError,
    ConversionError,
    JinferError,
    MissingTensorError,
    UnsupportedArchitectureError,
)
from jinfer.osutil import json_object

log = logging.getLogger("jinfer.convert")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")
# Buffers some checkpoints store that are not weights (GPT-2's causal mask, cached RoPE tables).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", "embeddings.position_ids")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A supported Hugging Face architecture and the jinfer model class it converts to.

    renames: (prefix, replacement) pairs tried when a tensor named by `hf_param_map` is absent,
    e.g. GPT-2 saved from `GPT2Model` lacks "transformer.", BERT task models add "bert.".
    param_map: the function of `module` that maps the config to {jinfer param: (HF tensor, transform)}.
    """

    hf_name: str
    model_class: str
    module: str
    renames: tuple[tuple[str, str], ...] = ()
    param_map: str = "hf_param_map"


_LLAMA = "jinfer.models.llama"
_GEMMA = "jinfer.models.gemma"
ARCHITECTURES: dict[str, Architecture] = {
    a.hf_name: a
    for a in (
        Architecture("LlamaForCausalLM", "Llama", _LLAMA),
        Architecture("MistralForCausalLM", "Llama", _LLAMA),
        Architecture("Qwen2ForCausalLM", "Llama", _LLAMA),
        Architecture("MixtralForCausalLM", "MoE", "jinfer.models.moe"),
        Architecture("Qwen3MoeForCausalLM", "MoE", "jinfer.models.moe"),
        Architecture("Qwen3ForCausalLM", "Llama", _LLAMA),
        Architecture("Phi3ForCausalLM", "Llama", _LLAMA, param_map="phi3_hf_param_map"),
        Architecture("GemmaForCausalLM", "Gemma", _GEMMA),
        Architecture("Gemma2ForCausalLM", "Gemma", _GEMMA),
        Architecture("Gemma3ForCausalLM", "Gemma", _GEMMA),
        # The text decoder of a multimodal Gemma 3 (the vision tower is not converted): transformers
        # 5 names it model.language_model.*, checkpoints saved before 4.52 language_model.model.*.
        Architecture(
            "Gemma3ForConditionalGeneration",
            "Gemma",
            _GEMMA,
            (("model.", "model.language_model."), ("model.", "language_model.model.")),
        ),
        Architecture("GPT2LMHeadModel", "GPT2", "jinfer.models.gpt2", (("transformer.", ""),)),
        Architecture("GPT2Model", "GPT2", "jinfer.models.gpt2", (("transformer.", ""),)),
        Architecture("BertModel", "Bert", "jinfer.models.bert", (("", "bert."),)),
        Architecture("BertForMaskedLM", "Bert", "jinfer.models.bert", (("", "bert."),)),
    )
}
_MODEL_TYPE_DEFAULT = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
}
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "qwen3moe")


def supported_text() -> str:
    """Human-readable list of what `convert` accepts (for error messages)."""
    return (
        f"supported Hugging Face architectures: {', '.join(ARCHITECTURES)}; "
        f"GGUF architectures: {', '.join(GGUF_ARCHITECTURES)}"
    )


def get_architecture(name: str, where: str) -> Architecture:
    """The Architecture named `name`, or UnsupportedArchitectureError naming `where` and the options."""
    if name not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{where}: architecture {name!r} is not supported; {supported_text()}"
        )
    return ARCHITECTURES[name]


# -- tensor sources -------------------------------------------------------------------------------
class TensorSource(Protocol):
    """Tensors under Hugging Face names, in Hugging Face layout (torch Linear weights [out, in])."""

    def names(self) -> list[str]: ...

    def read(self, name: str) -> np.ndarray: ...

    def describe(self) -> str: ...


_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _TensorRecord:
    file: Path
    dtype: Any
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`


class SafetensorsSource:
    """Tensors of one or several .safetensors files, each read through its own memory map."""

    def __init__(self, files: Iterable[Path]):
        self.files = [Path(f) for f in files]
        self._records: dict[str, _TensorRecord] = {}
        for f in self.files:
            self._records.update(read_safetensors_header(f))

    def names(self) -> list[str]:
        return list(self._records)

    def read(self, name: str) -> np.ndarray:
        rec = self._records[name]
        if math.prod(rec.shape) == 0:
            return np.zeros(rec.shape, rec.dtype)
        return np.memmap(rec.file, dtype=rec.dtype, mode="r", offset=rec.offset, shape=rec.shape)

    def describe(self) -> str:
        return ", ".join(str(f) for f in self.files)


def read_safetensors_header(path: Path) -> dict[str, _TensorRecord]:
    """Parses a safetensors header; ConversionError naming the file when it is corrupt or truncated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise ConversionError(f"{path}: corrupt safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(size - 8, 100 << 20):
            raise ConversionError(
                f"{path}: corrupt or truncated safetensors file "
                f"(header says {header_len} bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path}: corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = _tensor_record(path, name, info, data_start, size)
    return out


def _tensor_record(path: Path, name: str, info: Any, data_start: int, size: int) -> _TensorRecord:
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        if min(shape, default=0) < 0 or not isinstance(begin, int) or not isinstance(end, int):
            raise ValueError("negative dimension or non-integer offsets")
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{path}: corrupt safetensors header entry for {name!r}: {info!r}") from e
    if dtype not in _SAFETENSORS_DTYPES:
        raise ConversionError(
            f"{path}: tensor {name!r} has dtype {dtype}; supported: {sorted(_SAFETENSORS_DTYPES)}"
        )
    np_dtype = np.dtype(_SAFETENSORS_DTYPES[dtype])
    if end - begin != math.prod(shape) * np_dtype.itemsize or begin < 0:
        raise ConversionError(
            f"{path}: corrupt safetensors header: {name!r} {shape} {dtype} spans {begin}..{end}"
        )
    if data_start + end > size:
        raise ConversionError(
            f"{path}: truncated safetensors file: tensor {name!r} needs bytes up to {data_start + end}, "
            f"the file has {size} (re-download it)"
        )
    return _TensorRecord(path, np_dtype, shape, data_start + begin)


def _shard_path(index: Path, model_dir: Path, name: Any) -> Path:
    """A file named by `index` (a metadata file), refused unless its name stays inside `model_dir`
    (the file may be a symlink out: a Hugging Face hub snapshot links each file to blobs/)."""
    from jinfer.errors import CheckpointError
    from jinfer.integrity import inside

    try:
        return inside(model_dir, name, linked_files=True)
    except CheckpointError as e:
        raise ConversionError(f"{index}: {name!r} is not a path inside {model_dir}; refused") from e


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a HF directory: the sharded index's files, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index}: corrupt sharded-checkpoint index: {e}") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConversionError(f"{index}: 'weight_map' must be an object of tensor name -> file name")
        files = [_shard_path(index, model_dir, f) for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointNotFoundError(f"{index} lists shard(s) that do not exist: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(
            p.name for p in model_dir.glob("*.pt")
        )
        hint = f" (found {found}: re-save the model with safetensors)" if found else ""
        raise CheckpointNotFoundError(f"{model_dir}: no *.safetensors weight files{hint}")
    return files


# -- tensor mapping (shared by every source) -----------------------------------------------------
def _resolve_name(name: str, available: set[str], arch: Architecture) -> str | None:
    if name in available:
        return name
    for old, new in arch.renames:
        if name.startswith(old) and (candidate := new + name[len(old) :]) in available:
            return candidate
    return None


def _check_shape(
    jpath: str, hf_name: str, transform: str, tensor: np.ndarray, shape: tuple[int, ...]
) -> None:
    src = tensor.shape[::-1] if transform == "transpose" else tensor.shape
    if transform == "expert_transpose":
        src = (*tensor.shape[:-2], tensor.shape[-1], tensor.shape[-2])
    if transform.startswith("rows:") and src:
        start, stop = (int(i) for i in transform.split(":")[1:])
        src = (*tensor.shape[1:][::-1], min(stop, tensor.shape[0]) - start)
    if transform.startswith("split3_") and src:
        src = (*src[:-1], src[-1] // 3)
    ok = math.prod(src) == math.prod(shape) and (
        len(src) <= 1 or not shape or src[0] == shape[0] or src[-1] == shape[-1]
    )
    if not ok:
        raise ConversionError(
            f"tensor {hf_name!r} has shape {tensor.shape}; jinfer param {jpath!r} needs {shape} "
            f"(via {transform}): the checkpoint does not match its config.json"
        )


def convert_tensors(
    model: Any,
    param_map: Mapping[str, tuple[str, str]],
    source: TensorSource,
    arch: Architecture,
    dtype: Any,
    progress: bool = True,
) -> Any:
    """Reads, transforms and casts every param of `model` (a FlaxModel) from `source`; nested dict.

    Raises MissingTensorError naming the tensor and the files searched.
    """
    from jinfer.models.layers import apply_hf_transform
    from jinfer.sharding import path_str

    abstract = model.abstract_params()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    unmapped = [path_str(p) for p, _ in leaves if path_str(p) not in param_map]
    if unmapped:
        raise ConversionError(f"{model.spec.name}: hf_param_map has no entry for params {unmapped}")
    available = set(source.names())
    used: set[str] = set()
    out = []
    for p, x in _progress(leaves, progress, f"converting {model.spec.name}"):
        jpath = path_str(p)
        hf_name, transform = param_map[jpath]
        names = [_find_tensor(n, jpath, available, source, arch) for n in _stacked_names(hf_name, x.shape)]
        used.update(names)
        name = names[0]
        tensor = source.read(name) if len(names) == 1 else np.stack([source.read(n) for n in names])
        _check_shape(jpath, name, transform, tensor, tuple(x.shape))
        converted = np.asarray(apply_hf_transform(transform, tensor, x.shape)).astype(dtype, copy=False)
        # Hand Orbax jax arrays: it would otherwise copy every numpy leaf to a device at save time,
        # doubling the peak. The numpy copy and the source map are freed before the next tensor.
        out.append(jax.device_put(converted))
        del tensor, converted
    unused = sorted(n for n in available - used if not n.endswith(_IGNORED_SUFFIXES))
    layers = getattr(model.config, "num_layers", None)
    extra = sorted({int(m.group(1)) for n in unused if (m := _LAYER_INDEX.search(n))})
    if layers is not None and extra and extra[-1] >= layers:
        raise ConversionError(
            f"config.json gives {layers} layers but the checkpoint holds tensors of layer "
            f"{extra[-1]} (e.g. {next(n for n in unused if _LAYER_INDEX.search(n))}): the config does "
            "not match these weights (a truncated num_hidden_layers would drop layers silently)"
        )
    if unused:
        log.warning("ignored %d source tensors not used by %s: %s", len(unused), model.spec.name, unused[:8])
    return jax.tree_util.tree_unflatten(treedef, out)


def _stacked_names(hf_name: str, shape: tuple[int, ...]) -> list[str]:
    """One tensor name, or for a name with "{expert}" one per expert (the param's leading axis)."""
    if "{expert}" not in hf_name:
        return [hf_name]
    return [hf_name.format(expert=j) for j in range(shape[0])]


def _find_tensor(
    hf_name: str, jpath: str, available: set[str], source: TensorSource, arch: Architecture
) -> str:
    name = _resolve_name(hf_name, available, arch)
    if name is None:
        raise MissingTensorError(
            f"tensor {hf_name!r} (for jinfer param {jpath!r} of {arch.hf_name}) not found; searched "
            f"{source.describe()} ({len(available)} tensors)"
        )
    return name


def _progress(items: list, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor", leave=False)


def convert_source(
    arch: Architecture,
    hf_config: Mapping[str, Any],
    source: TensorSource,
    out: str | os.PathLike,
    *,
    dtype: str = "float32",
    extra_files: Mapping[str, Any] | None = None,
    extra_config: Mapping[str, Any] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    quantize: str | None = None,
    where: str = "config.json",
) -> Path:
    """HF config dict + tensor source -> a jinfer model directory at `out` (atomic)."""
    from jinfer.checkpoint import save_model_dir
    from jinfer.modeling import FlaxModel
    from jinfer.models.registry import get_spec

    spec = get_spec(arch.model_class)
    try:
        config = spec.config_cls.from_hf_config(dict(hf_config))
    except KeyError as e:
        raise ConversionError(f"{where}: missing key {e.args[0]!r} needed by {arch.hf_name}") from e
    except ConversionError as e:  # a refusal (e.g. UnsupportedArchitectureError): its own words
        raise type(e)(f"{where}: {e}") from e
    except JinferError as e:  # a value the config class rejects (ConfigError)
        raise ConversionError(f"{where}: {e}") from e
    except (TypeError, ValueError, AttributeError) as e:  # e.g. hidden_size "64" or null
        raise ConversionError(
            f"{where}: a value has the wrong type for {arch.hf_name} ({type(e).__name__}: {e}); "
            "numbers must be JSON numbers, names strings"
        ) from e
    from jinfer import limits

    limits.check_hyperparameters(config, where)
    limits.check_implied_size(lambda c: FlaxModel(spec, c), config, limits.source_elements(source), where)
    param_map = getattr(importlib.import_module(arch.module), arch.param_map)(config)
    model = FlaxModel(spec, config)
    np_dtype = _np_dtype(dtype)
    params = convert_tensors(model, param_map, source, arch, np_dtype, progress)
    source = {"architecture": arch.hf_name, "model_type": hf_config.get("model_type")}
    meta = {"source": source, **dict(extra_config or {})}
    if quantize:
        from jinfer import quant

        params = quant.quantize_params(params, model.float_logical_axes())
        meta["quantization"] = quantize
    return save_model_dir(
        out, spec.name, config, params, extra_files=extra_files, extra_config=meta, overwrite=overwrite
    )


def _np_dtype(dtype: Any) -> np.dtype:
    name = np.dtype(ml_dtypes.bfloat16).name if str(dtype) in ("bfloat16", "bf16") else str(dtype)
    if name not in ("float32", "bfloat16"):
        raise ConversionError(f"dtype {dtype!r} is not supported; use 'float32' or 'bfloat16'")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(np.float32)


# -- Hugging Face directories ---------------------------------------------------------------------
def read_hf_config(model_dir: Path) -> tuple[dict[str, Any], Architecture]:
    """config.json and its Architecture (from `architectures`, else from `model_type`)."""
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise CheckpointNotFoundError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{cfg_file}: not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ConversionError(f"{cfg_file} holds a JSON {type(cfg).__name__}; expected an object")
    archs = cfg.get("architectures") or []
    if isinstance(archs, str):  # a bare name instead of a list of one
        archs = [archs]
    name = (
        archs[0] if archs else _MODEL_TYPE_DEFAULT.get(cfg.get("model_type", ""), repr(cfg.get("model_type")))
    )
    return cfg, get_architecture(name, str(cfg_file))


def sentence_transformers_layout(root: Path) -> tuple[Path, dict[str, Any]]:
    """(directory holding the transformer weights, embedding settings for the model directory).

    Reads modules.json (Transformer, Pooling, Normalize modules) into {"pooling": "mean"|"cls",
    "normalize": bool}, plus the Transformer module's sentence_bert_config.json `max_seq_length`
    (encodings are truncated to it, as sentence-transformers does) and `do_lower_case` when set.
    Without modules.json the directory is a plain model: CLS pooling, no normalization, and no
    truncation.
    """
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return root, {"pooling": "cls", "normalize": False}
    weights_dir, pooling, normalize, extra = root, "cls", False, {}
    for module in json.loads(modules_file.read_text()):
        rel = module.get("path", "") if isinstance(module, dict) else None
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        sub = _shard_path(modules_file, root, rel) if rel else root  # metadata paths stay inside
        if kind.endswith("models.Transformer"):
            weights_dir = sub if (sub / "config.json").is_file() else root
            extra = _sentence_bert_config(sub if (sub / "sentence_bert_config.json").is_file() else root)
        elif kind.endswith("models.Pooling"):
            pooling = _pooling_mode(sub / "config.json")
        elif kind.endswith("models.Normalize"):
            normalize = True
        else:
            raise UnsupportedArchitectureError(
                f"{modules_file}: sentence-transformers module {kind!r} is not supported "
                "(supported: Transformer, Pooling (mean or cls), Normalize)"
            )
    return weights_dir, {"pooling": pooling, "normalize": normalize, **extra}


def _sentence_bert_config(model_dir: Path) -> dict[str, Any]:
    """{"max_seq_length": n, "do_lower_case": True} as far as sentence_bert_config.json sets them."""
    path = model_dir / "sentence_bert_config.json"
    try:
        cfg = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON: {e}") from e
    out: dict[str, Any] = {}
    if cfg.get("max_seq_length") is not None:
        out["max_seq_length"] = int(cfg["max_seq_length"])
    if cfg.get("do_lower_case"):
        out["do_lower_case"] = True
    return out


def _pooling_mode(path: Path) -> str:
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    modes = sorted(
        k.removeprefix("pooling_mode_") for k, v in cfg.items() if k.startswith("pooling_mode_") and v
    )
    if modes == ["mean_tokens"]:
        return "mean"
    if modes == ["cls_token"]:
        return "cls"
    raise UnsupportedArchitectureError(
        f"{path}: pooling modes {modes} are not supported (only mean_tokens or cls_token)"
    )


def tokenizer_files(model_dir: Path, extra_dirs: Iterable[Path] = ()) -> dict[str, Any]:
    """tokenizer.json, tokenizer_config.json (with chat_template and bos/eos filled in from
    chat_template.jinja / special_tokens_map.json when needed) and generation_config.json."""
    found: dict[str, Any] = {}
    for d in (model_dir, *extra_dirs):
        for name in TOKENIZER_FILES:
            if name not in found and (d / name).is_file():
                found[name] = (d / name).read_bytes()
    if "generation_config.json" in found:  # copied as is: checked now, not at every later load
        _json_object(found["generation_config.json"], model_dir / "generation_config.json")
    if "tokenizer_config.json" in found or (model_dir / "chat_template.jinja").is_file():
        tok_cfg = _json_object(found.get("tokenizer_config.json", b"{}"), model_dir / "tokenizer_config.json")
        template = model_dir / "chat_template.jinja"
        if not tok_cfg.get("chat_template") and template.is_file():
            tok_cfg["chat_template"] = template.read_text()
        special = model_dir / "special_tokens_map.json"
        if special.is_file():
            for key, value in _json_object(special.read_bytes(), special).items():
                tok_cfg.setdefault(key, value)
        found["tokenizer_config.json"] = tok_cfg
    if "tokenizer.json" not in found:
        vocab = next((d / "vocab.txt" for d in (model_dir, *extra_dirs) if (d / "vocab.txt").is_file()), None)
        if vocab is not None and _is_wordpiece_vocab(vocab):
            found["tokenizer.json"] = _wordpiece_tokenizer(vocab, found.get("tokenizer_config.json") or {})
            log.info("%s: tokenizer.json built from vocab.txt (BERT WordPiece)", model_dir)
        else:
            log.warning("%s has no tokenizer.json: the converted model will accept token ids only", model_dir)
    return found


def _is_wordpiece_vocab(path: Path) -> bool:
    """A BERT vocab.txt (one token per line, with [CLS] and [SEP]) — not some other .txt."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = {f.readline().strip() for _ in range(2000)}
    return {"[CLS]", "[SEP]"} <= head


def _wordpiece_tokenizer(vocab: Path, tok_cfg: Mapping[str, Any]) -> bytes:
    """tokenizer.json for a BERT repo that ships only vocab.txt (older sentence-transformers and
    BERT checkpoints): what transformers' BertTokenizerFast builds from it (BERT normalizer with
    the repo's do_lower_case / strip_accents / tokenize_chinese_chars, WordPiece, [CLS] .. [SEP])."""
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(
        str(vocab),
        lowercase=tok_cfg.get("do_lower_case", True) is not False,
        strip_accents=tok_cfg.get("strip_accents"),
        handle_chinese_chars=tok_cfg.get("tokenize_chinese_chars", True) is not False,
        clean_text=True,
    )
    return tok.to_str().encode()


def _json_object(data: bytes, path: Path) -> dict[str, Any]:
    """A JSON object file's content, or a ConversionError naming the file."""
    return json_object(data, path, ConversionError)


def _refuse_quantized(cfg: Mapping[str, Any], where: Path) -> None:
    """A pre-quantized checkpoint (FP8, GPTQ, AWQ, bitsandbytes: `quantization_config`) stores
    weights that mean nothing without their scales and packing, which jinfer does not read: refuse
    it rather than write a model that runs and answers garbage."""
    qc = cfg.get("quantization_config")
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, Mapping) else "unknown"
        raise ConversionError(
            f"{where}: quantization_config.quant_method={method!r}: pre-quantized checkpoints are "
            "not supported (their weights need scales jinfer does not apply); convert the "
            "unquantized (float16/bfloat16) release, optionally with --quantize int8"
        )


def convert_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "float32",
    progress: bool = True,
    overwrite: bool = False,
    quantize: str | None = None,
) -> Path:
    """Converts a Hugging Face directory (config.json + *.safetensors, single or sharded, or a
    sentence-transformers directory) to a jinfer model directory; returns its path."""
    root = Path(src)
    weights_dir, pooling = sentence_transformers_layout(root)
    cfg, arch = read_hf_config(weights_dir)
    _refuse_quantized(cfg, weights_dir / "config.json")
    source = SafetensorsSource(safetensors_files(weights_dir))
    extra_config = pooling if arch.model_class == "Bert" else {}
    extra_config = {**extra_config, "source_format": "huggingface"}
    return convert_source(
        arch,
        cfg,
        source,
        out,
        dtype=dtype,
        extra_files=tokenizer_files(weights_dir, [root]),
        extra_config=extra_config,
        progress=progress,
        overwrite=overwrite,
        quantize=quantize,
        where=str(weights_dir / "config.json"),
    )
