"""Tokenizers (the `tokenizers` library, from a local tokenizer.json) and Jinja chat templates.

Never downloads anything: a model directory carries `tokenizer.json` and, for chat models,
`tokenizer_config.json` with `chat_template`, `bos_token`, `eos_token`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import numpy as np

from jinfer.errors import CheckpointNotFoundError, ConfigError, InputError

Message = dict[str, Any]


class Tokenizer:
    """Text <-> token ids, special tokens and chat rendering for one model."""

    def __init__(self, backend: Any, config: dict[str, Any] | None = None):
        self.backend = backend
        self.config = dict(config or {})
        self.chat_template: str | None = _default_template(self.config.get("chat_template"))
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self._template: jinja2.Template | None = None
        self._byte_table: dict[str, int] | None = None
        self._added: set[int] | None = None

    @classmethod
    def from_dir(cls, path: str | Path, max_length: int | None = None) -> Tokenizer:
        """Loads DIR/tokenizer.json (+ DIR/tokenizer_config.json when present).

        The tokenizer.json's own padding and truncation settings are switched off (jinfer pads to
        its buckets; a file's fixed padding would otherwise count pad tokens as text). `max_length`
        truncates encodings to that many tokens, special tokens included (sentence-transformers'
        `max_seq_length`); None never truncates.
        """
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointNotFoundError(f"{tok_file} not found: the model directory has no tokenizer")
        backend = HFTokenizer.from_file(str(tok_file))
        backend.no_padding()
        backend.no_truncation()
        if max_length is not None:
            backend.enable_truncation(int(max_length))
        config = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            config = json.loads(cfg_file.read_text())
        return cls(backend, config)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        tid = self.token_id(self.eos_token)
        return () if tid is None else (tid,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            if isinstance(text, str):
                _check_encodable(text)
            raise

    def token_bytes(self, tid: int) -> bytes:
        """The bytes token `tid` stands for, as the model's vocabulary holds them: a byte-level BPE
        token's bytes (possibly part of a UTF-8 character, e.g. a third of an emoji), a
        SentencePiece byte-fallback token's one byte ("<0xF0>"), a piece's text with its leading
        space ("\u2581Paris" -> b" Paris"). Joined over a generation they give the UTF-8 of its
        text (special tokens: their text)."""
        if self._byte_table is None:
            self._byte_table = _byte_table(self.backend)
        piece = self.backend.id_to_token(int(tid))
        if piece is None or int(tid) in self._added_ids:
            return self.decode([tid], skip_special_tokens=False).encode("utf-8")
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        table = self._byte_table
        if table and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return piece.replace("\u2581", " ").encode("utf-8")

    @property
    def _added_ids(self) -> set[int]:
        if self._added is None:
            self._added = set(self.backend.get_added_tokens_decoder())
        return self._added

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Renders chat messages with the model's Jinja chat template."""
        if not self.chat_template:
            raise ConfigError(
                "this model has no chat template (tokenizer_config.json 'chat_template'); "
                "pass a plain string prompt instead of chat messages"
            )
        messages = checked_messages(messages)
        from jinfer.templates import compile_chat_template, render_chat_template

        if self._template is None:
            globals_ = {"raise_exception": _raise_template_error}
            self._template = compile_chat_template(self.chat_template, globals_)
        return render_chat_template(
            self._template,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """Chat messages -> prompt ids. The template writes special tokens itself."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _byte_table(backend: Any) -> dict[str, int]:
    """{character: byte} of a byte-level BPE vocabulary (GPT-2's printable stand-ins for the 256
    bytes: "\u0120" is b" "); {} for other tokenizers."""
    from tokenizers import decoders

    if not isinstance(backend.decoder, decoders.ByteLevel):
        return {}
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _check_encodable(text: str) -> None:
    """InputError for text that is not valid Unicode: a lone surrogate ("\\ud800", which JSON and
    Python strings allow, and which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"the text holds a lone surrogate {text[e.start]!r} at character {e.start}; "
            "text must be valid Unicode (a surrogate pair, or the character itself)"
        ) from None


def _default_template(template: Any) -> str | None:
    """`chat_template` as one string. Some tokenizer configs (Hermes, Command-R) hold a list of
    named templates, `[{"name": "default", "template": ...}, {"name": "tool_use", ...}]`, as
    transformers accepts: the one named "default" is used (else the first)."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) and template else None


def _token_text(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _raise_template_error(message: str) -> None:
    raise InputError(f"chat template rejected the messages: {message}")


def checked_messages(messages: Any) -> list[dict[str, Any]]:
    """Chat messages checked, with OpenAI-style content parts ([{"type": "text", "text": ...}])
    joined into one string; InputError naming the message otherwise."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InputError("chat messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise InputError(
                f"chat message {i} is {m!r}; each message must be a dict with a string 'role' and a 'content'"
            )
        out.append({**m, "content": message_text(m["content"], i)})
    return out


def message_text(content: Any, i: int) -> str:
    """A message's content as text: a string (None: empty), or a list of text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise InputError(
        f"chat message {i} content is {type(content).__name__}; expected a string or a list of "
        '{"type": "text", "text": ...} parts (only text is supported)'
    )


def token_ids(value: Any, what: str, accepted: str) -> list[int]:
    """`value` as a list of int token ids; InputError naming `what` and `accepted` for anything
    else (floats, bools, bytes, strings: 1.5 and True would pass int())."""
    try:
        if isinstance(value, (str, bytes, bytearray)) or any(
            isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) for t in value
        ):
            raise TypeError("token ids must be integers")
        return [int(t) for t in value]
    except (TypeError, ValueError) as e:
        raise InputError(f"{what} is {type(value).__name__}; expected {accepted}") from e


class IncrementalDecoder:
    """Turns a growing list of token ids into text increments that are always valid UTF-8.

    Decodes a window of recent tokens and holds back text that ends in an incomplete multi-byte
    character (decoded as U+FFFD) until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, prefix_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prefix_ids)
        self.prefix_offset = len(self.ids)
        self.read_offset = len(self.ids)
        self.text = ""

    def push(self, token_ids: Iterable[int]) -> str:
        """Adds tokens; returns the new complete text (possibly empty)."""
        self.ids.extend(token_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta
