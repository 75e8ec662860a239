"""Input lines -> work items, and results -> output rows (jinfer and OpenAI Batch formats).

Every line has a stable identity `key` (bytes): `b"id:" + canonical JSON of custom_id`, or
`b"line:<n>"` for a line whose custom_id is missing or unusable (invalid JSON, wrong type). The
64-bit blake2b hash of the key names the line in the duplicate check, the done-set read back from
the output on resume, the process shard (hash mod processes) and the derived sampling seed.

Rows are serialised deterministically (fixed key order, compact separators, no timestamps), so a
resumed run writes byte-identical lines for the rows it computes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any

import numpy as np

from jinfer.errors import (
    EmptyInputError,
    InputError,
    InvalidSamplingParamsError,
    InvalidTokenError,
    JinferError,
    SequenceTooLongError,
)
from jinfer.sampling import SamplingParams

# Sampling fields a line may set (OpenAI spellings included); anything else unknown is metadata.
_SAMPLING_FIELDS = (
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "n",
    "ignore_eos",
    "logprobs",
    "top_logprobs",
)
_INPUT_FIELDS = ("custom_id", "prompt", "messages", "continuation", "text", "input", "metadata")
_OPENAI_FIELDS = ("custom_id", "method", "url", "body", "metadata")
_OPENAI_IGNORED_BODY = ("model", "stream")

# Bounds on one input line: deeper JSON would overflow the decoder's (and every later walker's)
# recursion; longer lines are skipped without being held in memory (files.iter_lines).
MAX_JSON_DEPTH = 64
MAX_LINE_BYTES = 16 << 20
_MAX_MESSAGE_CHARS = 500
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


class LineError(InputError):
    """A line that cannot run; becomes an output row with `"error": {"code", "message", "line"}`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class Item:
    """One parsed input line.

    `prompt` is a string, token ids or chat messages (generate/score), or the text (embed);
    `overrides` are the line's SamplingParams fields; `chat` marks messages (chat.completion).
    """

    line: int
    key: bytes
    custom_id: Any
    prompt: Any = None
    chat: bool = False
    continuation: Any = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    metadata: dict[str, Any] | None = None
    error: LineError | None = None


# -- identity ------------------------------------------------------------------------------------
def valid_custom_id(custom_id: Any) -> bool:
    """custom_id must be a non-empty string or an integer."""
    if isinstance(custom_id, bool):
        return False
    return (isinstance(custom_id, str) and custom_id != "") or isinstance(custom_id, int)


def id_key(custom_id: Any) -> bytes:
    return b"id:" + json.dumps(custom_id, ensure_ascii=False, separators=(",", ":")).encode()


def line_key(line: int) -> bytes:
    return b"line:%d" % line


def key_hash(key: bytes) -> int:
    """64-bit blake2b of a line key (an unsigned int)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def derived_seed(run_seed: int, key: bytes) -> int:
    """The sampling seed of a line without its own: blake2b(run seed, key) as a 63-bit int."""
    digest = hashlib.blake2b(key, digest_size=8, key=str(int(run_seed)).encode()).digest()
    return int.from_bytes(digest, "little") >> 1


def row_key(row: dict[str, Any]) -> bytes | None:
    """The key of an output row (None if the row names neither a custom_id nor a line)."""
    cid = row.get("custom_id")
    if valid_custom_id(cid):
        return id_key(cid)
    err = row.get("error")
    if isinstance(err, dict) and isinstance(err.get("line"), int):
        return line_key(err["line"])
    return None


class Unparsed:
    """Why a raw line was not parsed (too long, too deep, not JSON): becomes its error row."""

    def __init__(self, code: str, message: str):
        self.code, self.message = code, message


def json_depth(raw: bytes) -> int:
    """Deepest nesting of [ and { outside strings (linear time, no recursion)."""
    stripped = _JSON_STRING.sub(b'""', raw)
    arr = np.frombuffer(stripped, dtype=np.uint8)
    step = np.isin(arr, (ord("["), ord("{"))).astype(np.int32) - np.isin(arr, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def parse_json_line(raw: bytes, line: int) -> Any:
    """The parsed JSON of one input line, or an `Unparsed` saying why not; never raises."""
    if len(raw) > MAX_LINE_BYTES:
        return Unparsed("line_too_long", f"line {line} is longer than {MAX_LINE_BYTES:,} bytes; skipped")
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(raw) > MAX_JSON_DEPTH:
        return Unparsed(
            "invalid_json", f"line {line} nests JSON deeper than {MAX_JSON_DEPTH} levels; flatten it"
        )
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, huge int literals are ValueErrors
        return Unparsed("invalid_json", f"line {line} is not valid JSON ({_clip(str(e), 120)})")


def _clip(text: str, limit: int = _MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} chars)"


def line_identity(raw: bytes, line: int) -> tuple[bytes, Any]:
    """(key, parsed JSON or an `Unparsed`) of a raw input line; never raises."""
    obj = parse_json_line(raw, line)
    if isinstance(obj, Unparsed):
        return line_key(line), obj
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return (id_key(cid) if valid_custom_id(cid) else line_key(line)), obj


# -- parsing -------------------------------------------------------------------------------------
def parse_line(raw: bytes, line: int, task: str) -> Item:
    """Parses one input line; problems are recorded in `Item.error` (never raised)."""
    key, obj = line_identity(raw, line)
    return build_item(key, obj, line, task)


def build_item(key: bytes, obj: Any, line: int, task: str) -> Item:
    """An Item from a line's key and parsed JSON (None if it was not valid JSON)."""
    item = Item(line=line, key=key, custom_id=None)
    try:
        _fill(item, obj, task)
    except LineError as e:
        item.error = e
    except Exception as e:  # a shape of JSON no check foresaw: still only this line's error row
        item.error = LineError("invalid_request", _clip(f"line {line}: {type(e).__name__}: {e}"))
    return item


def _fill(item: Item, obj: Any, task: str) -> None:
    if isinstance(obj, Unparsed):
        raise LineError(obj.code, obj.message)
    if obj is None:
        raise LineError("invalid_json", f"line {item.line} is not valid JSON")
    if not isinstance(obj, dict):
        raise LineError("invalid_request", f"line {item.line} is a JSON {type(obj).__name__}, not an object")
    cid = obj.get("custom_id")
    if not valid_custom_id(cid):
        what = "has no custom_id" if cid is None else f"has custom_id {cid!r}"
        raise LineError(
            "invalid_custom_id", f"line {item.line} {what}; give a non-empty string or an integer"
        )
    item.custom_id = cid
    openai = isinstance(obj.get("body"), dict)
    fields = obj["body"] if openai else obj
    known = _OPENAI_FIELDS if openai else (*_INPUT_FIELDS, *_SAMPLING_FIELDS)
    meta = dict(obj["metadata"]) if isinstance(obj.get("metadata"), dict) else {}
    meta.update({k: v for k, v in obj.items() if k not in known})
    if openai:
        ignored = (*_INPUT_FIELDS, *_SAMPLING_FIELDS, *_OPENAI_IGNORED_BODY)
        meta.update({k: v for k, v in fields.items() if k not in ignored})
    item.metadata = meta or None
    item.overrides = {k: fields[k] for k in _SAMPLING_FIELDS if k in fields}
    _fill_inputs(item, fields, task)


def _fill_inputs(item: Item, fields: dict[str, Any], task: str) -> None:
    if task == "embed":
        text = fields.get("text", fields.get("input"))
        if not isinstance(text, str):
            raise LineError(
                "invalid_request", f"line {item.line}: an embed line needs a string 'text' or 'input'"
            )
        if not text:
            raise LineError("empty_prompt", f"line {item.line}: the text to embed is empty")
        item.prompt = text
        return
    if "messages" in fields:
        item.prompt, item.chat = fields["messages"], True
    elif "prompt" in fields:
        item.prompt = fields["prompt"]
        if not isinstance(item.prompt, (str, list)):
            raise LineError(
                "invalid_request", f"line {item.line}: 'prompt' must be a string or a list of token ids"
            )
    else:
        raise LineError("invalid_request", f"line {item.line} has neither 'prompt' nor 'messages'")
    if task == "score":
        item.continuation = fields.get("continuation")
        if not isinstance(item.continuation, (str, list)) or not item.continuation:
            raise LineError(
                "invalid_request", f"line {item.line}: a score line needs a non-empty 'continuation'"
            )


def sampling_params(item: Item, defaults: SamplingParams, run_seed: int) -> SamplingParams:
    """The line's SamplingParams: defaults, then the line's fields; seed derived unless given."""
    o = dict(item.overrides)
    changes: dict[str, Any] = {}
    if "max_completion_tokens" in o:
        changes["max_tokens"] = o.pop("max_completion_tokens")
    top = o.pop("top_logprobs", None)
    if "logprobs" in o:
        lp = o.pop("logprobs")
        changes["logprobs"] = (top or 0) if lp is True else None if lp is False else lp
    changes.update(o)
    if "stop" in changes and isinstance(changes["stop"], list):
        changes["stop"] = tuple(changes["stop"])
    if changes.get("seed") is None:
        changes["seed"] = derived_seed(run_seed, item.key)
    try:
        return defaults.replace(**changes)
    except Exception as e:  # unknown field types included: this line's error row, never the run's
        raise LineError("invalid_sampling_params", f"line {item.line}: {e}") from e


def error_code(e: Exception) -> str:
    """A short stable code for an error row."""
    if isinstance(e, LineError):
        return e.code
    for cls, code in (
        (EmptyInputError, "empty_prompt"),
        (SequenceTooLongError, "prompt_too_long"),
        (InvalidSamplingParamsError, "invalid_sampling_params"),
        (InvalidTokenError, "invalid_token"),
    ):
        if isinstance(e, cls):
            return code
    return "invalid_request" if isinstance(e, (InputError, JinferError)) else "internal_error"


# -- output rows ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RowOptions:
    """How rows are written: format, extra fields, and the model name for OpenAI bodies."""

    format: str = "jinfer"
    return_token_ids: bool = False
    model_name: str = ""
    tokenizer: Any = None  # token texts of OpenAI logprobs (None: "<id>")


def dumps(row: dict[str, Any]) -> bytes:
    """One output line (deterministic bytes, newline-terminated)."""
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _with_meta(row: dict[str, Any], item: Item) -> dict[str, Any]:
    if item.metadata:
        row["metadata"] = item.metadata
    return row


def _logprobs_json(logprobs) -> list[dict[str, float]] | None:
    return None if logprobs is None else [{str(k): v for k, v in entry.items()} for entry in logprobs]


def error_row(item: Item, e: Exception, opts: RowOptions) -> dict[str, Any]:
    """The row of a failed line."""
    cid = item.custom_id if valid_custom_id(item.custom_id) else None
    message = _clip(str(e) if isinstance(e, LineError) else f"line {item.line}: {e}")
    err = {"code": error_code(e), "message": message, "line": item.line}
    if opts.format == "openai":
        return _with_meta({"id": _request_id(item), "custom_id": cid, "response": None, "error": err}, item)
    row = {"custom_id": cid, "text": None, "finish_reason": None, "usage": None, "error": err}
    return _with_meta(row, item)


def generate_row(item: Item, out: Any, opts: RowOptions, top_logprobs: int = 0) -> dict[str, Any]:
    """The row of a finished generation (`out` is a RequestOutput; `top_logprobs` alternatives
    per token were asked for)."""
    if opts.format == "openai":
        return _openai_row(item, _openai_generate_body(item, out, opts, top_logprobs))
    row: dict[str, Any] = {
        "custom_id": item.custom_id,
        "text": out.text,
        "finish_reason": out.finish_reason,
        "usage": dict(out.usage),
        "error": None,
    }
    _add_sample_fields(row, out.outputs[0], opts)
    if len(out.outputs) > 1:
        choices = []
        for o in out.outputs:
            choice = {"index": o.index, "text": o.text, "finish_reason": o.finish_reason}
            choices.append(_add_sample_fields(choice, o, opts))
        row["choices"] = choices
    return _with_meta(row, item)


def _add_sample_fields(row: dict[str, Any], sample: Any, opts: RowOptions) -> dict[str, Any]:
    if opts.return_token_ids:
        row["token_ids"] = list(sample.token_ids)
    if sample.logprobs is not None:
        row["logprobs"] = _logprobs_json(sample.logprobs)
    return row


def score_row(item: Item, prompt_ids: list[int], out: Any, opts: RowOptions) -> dict[str, Any]:
    """The row of a scored continuation (`out` is a ScoreOutput)."""
    row: dict[str, Any] = {
        "custom_id": item.custom_id,
        "logprobs": list(out.logprobs),
        "total": out.total,
        "usage": {"prompt_tokens": len(prompt_ids), "continuation_tokens": len(out.token_ids)},
        "error": None,
    }
    if opts.return_token_ids:
        row["token_ids"] = list(out.token_ids)
    return _with_meta(row, item)


def embed_row(item: Item, vector: Any, opts: RowOptions) -> dict[str, Any]:
    """The row of an embedded text (floats rounded to 7 digits, as `jinfer embed` prints)."""
    emb = [round(float(x), 7) for x in vector]
    if opts.format == "openai":
        body = {
            "object": "list",
            "model": opts.model_name,
            "data": [{"object": "embedding", "index": 0, "embedding": emb}],
        }
        return _openai_row(item, body)
    return _with_meta({"custom_id": item.custom_id, "embedding": emb, "error": None}, item)


def _request_id(item: Item) -> str:
    return "batch_req_" + hashlib.blake2b(item.key, digest_size=12).hexdigest()


def _openai_row(item: Item, body: dict[str, Any]) -> dict[str, Any]:
    response = {"status_code": 200, "request_id": _request_id(item)[len("batch_req_") :], "body": body}
    return _with_meta(
        {"id": _request_id(item), "custom_id": item.custom_id, "response": response, "error": None}, item
    )


def _openai_generate_body(item: Item, out: Any, opts: RowOptions, top: int) -> dict[str, Any]:
    """OpenAI's body, logprobs in its shapes as `jinfer serve` writes them."""
    from jinfer.serve.protocol import LogprobFormatter

    fmt = LogprobFormatter(opts.tokenizer, top)
    choices = []
    for o in out.outputs:
        if item.chat:
            choice = {"index": o.index, "message": {"role": "assistant", "content": o.text}}
            lp = None if o.logprobs is None else {"content": fmt.chat(o.token_ids, o.logprobs)}
        else:
            choice = {"index": o.index, "text": o.text}
            lp = None if o.logprobs is None else fmt.completion(o.token_ids, o.logprobs, 0)
        choice.update({"logprobs": lp, "finish_reason": o.finish_reason})
        if opts.return_token_ids:
            choice["token_ids"] = list(o.token_ids)
        choices.append(choice)
    usage = dict(out.usage)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    kind = "chat.completion" if item.chat else "text_completion"
    prefix = "chatcmpl-" if item.chat else "cmpl-"
    # "created" is 0: rows carry no timestamps, so resumed runs write identical bytes.
    return {
        "id": prefix + _request_id(item)[len("batch_req_") :],
        "object": kind,
        "created": 0,
        "model": opts.model_name,
        "choices": choices,
        "usage": usage,
    }
