"""OpenAI request bodies -> (prompt, SamplingParams), and runtime deltas -> OpenAI response bodies.

Pure functions on JSON-like dicts: no HTTP and no device work here. Every rejected field raises
`APIError` with `param` set to the field's name as the client wrote it, so the HTTP layer can answer
400 with OpenAI's error body.
"""

from __future__ import annotations

import base64
import codecs
import dataclasses
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from jinfer.errors import InputError, InvalidSamplingParamsError, SequenceTooLongError
from jinfer.sampling import SamplingParams
from jinfer.tokenizer import message_text

MAX_STOP_STRINGS = 16


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_field(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """A parsed /v1/chat/completions or /v1/completions body.

    `prompt` is what the runtime takes (chat messages or token ids); `top_logprobs` is the number of
    alternatives to report per token (None: no logprobs).
    """

    chat: bool
    prompt: Any
    overrides: dict[str, Any]  # SamplingParams fields the client set
    stream: bool
    include_usage: bool
    top_logprobs: int | None
    model: str | None
    fields: dict[str, str]  # SamplingParams field -> the client's field name


# -- field readers ---------------------------------------------------------------------------------
def _int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise bad_field(name, f"expected an integer, got {v!r}")
    return v


def _number(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise bad_field(name, f"expected a number, got {v!r}")
    return v


def _bool(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise bad_field(name, f"expected true or false, got {v!r}")
    return v


def _stop(body: dict) -> tuple[str, ...] | None:
    v = body.get("stop")
    if v is None:
        return None
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_field("stop", f"expected a non-empty string or a list of them, got {v!r}")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_field("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    return tuple(stops)


def _token_ids(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _reject_unsupported(body: dict) -> None:
    """Fields OpenAI defines that jinfer cannot honour: accepted only at their neutral value."""
    neutral = {
        "presence_penalty": (0, 0.0),
        "frequency_penalty": (0, 0.0),
        "repetition_penalty": (1, 1.0),
        "logit_bias": ({},),
        "echo": (False,),
        "suffix": ("",),
        "tools": ([],),
        "functions": ([],),
    }
    for name, ok in neutral.items():
        if body.get(name) is not None and body[name] not in ok:
            raise bad_field(name, f"is not supported by jinfer serve (accepted: {ok[0]!r} or omitted)")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad_field("response_format", 'only {"type": "text"} is supported')
    if body.get("best_of") is not None and body["best_of"] != body.get("n", 1):
        raise bad_field("best_of", "is not supported (accepted: equal to n, or omitted)")


def _sampling_overrides(body: dict, chat: bool) -> tuple[dict[str, Any], dict[str, str], int | None]:
    """SamplingParams fields set by the body, their client names, and the top-logprobs count."""
    kw: dict[str, Any] = {}
    fields: dict[str, str] = {}
    max_names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    for name in max_names:
        v = _int(body, name)
        if v is not None and "max_tokens" not in kw:
            kw["max_tokens"], fields["max_tokens"] = v, name
    for name in ("temperature", "top_p", "min_p"):
        if (v := _number(body, name)) is not None:
            kw[name] = float(v)
    for name in ("top_k", "seed", "n"):
        if (v := _int(body, name)) is not None:
            kw[name] = v
    if (v := _bool(body, "ignore_eos")) is not None:
        kw["ignore_eos"] = v
    if (stop := _stop(body)) is not None:
        kw["stop"] = stop
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not _token_ids(ids):
            raise bad_field("stop_token_ids", f"expected a list of token ids, got {ids!r}")
        kw["stop_token_ids"] = tuple(ids)
    top = _chat_logprobs(body) if chat else _int(body, "logprobs")
    if top is not None:
        kw["logprobs"] = top
        fields["logprobs"] = "top_logprobs" if chat else "logprobs"
    return kw, fields, top


def _chat_logprobs(body: dict) -> int | None:
    want = _bool(body, "logprobs")
    top = _int(body, "top_logprobs")
    if top is not None and not want:
        raise bad_field("top_logprobs", "needs logprobs=true")
    return (top or 0) if want else None


def _messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_field("messages", "expected a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_field("messages", f"message {i} must be an object with a string 'role'")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    return out


def _content(content: Any, i: int) -> str:
    try:
        return message_text(content, i)
    except InputError as e:
        raise bad_field("messages", str(e)) from None


def _prompt(body: dict) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and (isinstance(p[0], str) or _token_ids(p[0])):
        p = p[0]  # a batch of one prompt
    if isinstance(p, str) or (_token_ids(p) and p):
        return p
    raise bad_field("prompt", "expected a string or a non-empty list of token ids (one prompt per request)")


def parse_generation(body: Any, chat: bool) -> GenerationRequest:
    """Validates the types of a chat/completions body; ranges are checked by SamplingParams."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_field("model", f"expected a string, got {model!r}")
    _reject_unsupported(body)
    prompt = _messages(body) if chat else _prompt(body)
    overrides, fields, top = _sampling_overrides(body, chat)
    stream = bool(_bool(body, "stream"))
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or not stream):
        raise bad_field("stream_options", "expected an object, and only with stream=true")
    include_usage = bool(_bool(opts or {}, "include_usage"))
    return GenerationRequest(chat, prompt, overrides, stream, include_usage, top, model, fields)


def sampling_params(req: GenerationRequest, defaults: SamplingParams, max_tokens: int) -> SamplingParams:
    """The request's SamplingParams over the model's defaults; errors name the client's field."""
    kw = {"max_tokens": max_tokens, **req.overrides}
    try:
        return defaults.replace(**kw)
    except InvalidSamplingParamsError as e:
        field = re.search(r"SamplingParams\.(\w+)=", str(e))
        name = field.group(1) if field else "request"
        raise bad_field(req.fields.get(name, name), str(e)) from e


def input_error(e: InputError, req: GenerationRequest) -> APIError:
    """Maps a runtime InputError (see GenerationEngine.check_request) to the client field it is about."""
    msg = str(e)
    param = "messages" if req.chat else "prompt"  # empty, bad token id, too long, chat template
    if isinstance(e, InvalidSamplingParamsError):
        m = re.search(r"\b(n|logprobs|max_tokens|seed|top_k|top_p|min_p|temperature|stop_token_ids)=", msg)
        name = m.group(1) if m else "request"
        param = req.fields.get(name, name)
    elif isinstance(e, SequenceTooLongError) and "max_tokens=" in msg and "max_tokens" in req.fields:
        param = req.fields["max_tokens"]
    return bad_field(param, msg)


# -- responses -------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class LogprobFormatter:
    """Runtime logprobs ({token_id: logprob} per token, chosen first) in OpenAI's two shapes."""

    def __init__(self, tokenizer: Any, top: int):
        self.tokenizer, self.top = tokenizer, top

    def token(self, tid: int) -> str:
        return self.token_bytes(tid).decode("utf-8", errors="replace")

    def token_bytes(self, tid: int) -> bytes:
        """The token's own bytes (a byte-level token may hold part of a character: joined over
        the output they give its UTF-8, which is what OpenAI's `bytes` field is for)."""
        if self.tokenizer is None:
            return f"<{tid}>".encode()
        return self.tokenizer.token_bytes(tid)

    def _alternatives(self, entry: dict[int, float]) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda kv: -kv[1])[: self.top]

    def chat(self, token_ids: Sequence[int], logprobs: Sequence[dict[int, float]]) -> list[dict]:
        def item(tid: int, lp: float) -> dict:
            raw = self.token_bytes(tid)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}

        return [
            {**item(t, e[t]), "top_logprobs": [item(a, lp) for a, lp in self._alternatives(e)]}
            for t, e in zip(token_ids, logprobs, strict=True)
        ]

    def completion(self, token_ids: Sequence[int], logprobs: Sequence[dict[int, float]], offset: int) -> dict:
        raws = [self.token_bytes(t) for t in token_ids]
        # text_offset: characters of the text before each token (a token that ends inside a
        # character counts it once, when the character completes)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offsets, at = [], offset
        for raw in raws:
            offsets.append(at)
            at += len(decoder.decode(raw))
        return {
            "tokens": [r.decode("utf-8", errors="replace") for r in raws],
            "token_logprobs": [e[t] for t, e in zip(token_ids, logprobs, strict=True)],
            "top_logprobs": [{self.token(a): lp for a, lp in self._alternatives(e)} for e in logprobs],
            "text_offset": offsets,
        }


def chat_response(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
    }


def completion_response(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
    }


def chunk(rid: str, model: str, chat: bool, choices: list[dict], use: Any = None, with_usage=False) -> dict:
    out = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if with_usage:
        out["usage"] = use
    return out


# -- embeddings ------------------------------------------------------------------------------------
def parse_embedding_inputs(body: Any) -> tuple[list[str | list[int]], str, str | None]:
    """(inputs, encoding_format, model) of a /v1/embeddings body."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    inp = body.get("input")
    if isinstance(inp, str) or (_token_ids(inp) and inp):
        inputs = [inp]
    elif isinstance(inp, list) and inp and all(isinstance(x, str) or (_token_ids(x) and x) for x in inp):
        inputs = list(inp)
    else:
        raise bad_field("input", "expected a string, a list of strings, or token-id list(s), non-empty")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad_field("encoding_format", f"expected 'float' or 'base64', got {fmt!r}")
    if body.get("dimensions") is not None:
        raise bad_field("dimensions", "is not supported (the model's dimension is fixed)")
    return inputs, fmt, body.get("model")


def embedding_item(i: int, vec: np.ndarray, fmt: str) -> dict:
    vec = np.asarray(vec, "<f4")
    data = base64.b64encode(vec.tobytes()).decode() if fmt == "base64" else vec.tolist()
    return {"object": "embedding", "index": i, "embedding": data}
