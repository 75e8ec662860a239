"""Chat templates rendered in a bounded Jinja sandbox.

A chat template comes with the model files, so it is untrusted code. Jinja's sandbox already stops
attribute escapes; on top of it `BoundedSandbox` bounds what a template can make the process do:
  - `**` with an exponent above 256 or a base above 2**64, and `*`/`+` whose result would exceed
    MAX_OBJECT_CHARS characters/items (or 4096-bit integers) -> refused before computing;
  - any call with an integer argument above MAX_OBJECT_CHARS (`"x".center(10**9)`) or whose
    result is larger than MAX_OBJECT_CHARS -> refused;
  - at most MAX_RENDER_SECONDS of rendering (a timer interrupts loops of any shape, at no cost per
    step) and MAX_OUTPUT_CHARS of output.
Every violation, and every other failure of the template, is a `TemplateError` naming the limit.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import operator
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
import jinja2.sandbox

from jinfer.errors import InputError

MAX_OUTPUT_CHARS = 2 << 20
MAX_OBJECT_CHARS = 4 << 20
MAX_RENDER_SECONDS = 2.0
MAX_EXPONENT = 256
MAX_INT_BITS = 4096


class TemplateError(InputError):
    """A chat template failed, or exceeded a limit of the bounded sandbox."""


def _size(x: Any) -> int:
    if isinstance(x, int) and not isinstance(x, bool):
        return x.bit_length() // 8
    return len(x) if isinstance(x, (str, bytes, list, tuple, dict)) else 0


class BoundedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment with bounded arithmetic, calls and sizes (see module doc)."""

    intercepted_binops = frozenset(["**", "*", "+"])

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
        if op == "**" and ints and (right > MAX_EXPONENT or abs(left).bit_length() > 64):
            raise TemplateError(
                f"chat template computes x ** y with y > {MAX_EXPONENT} or x > 2**64: refused"
            )
        if op == "*" and ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateError(f"chat template multiplies integers of more than {MAX_INT_BITS} bits")
        if op == "*" and not ints:
            count = right if isinstance(right, int) else left if isinstance(left, int) else 1
            if isinstance(count, int) and count * max(_size(left), _size(right), 1) > MAX_OBJECT_CHARS:
                raise TemplateError(
                    f"chat template repeats a value into over {MAX_OBJECT_CHARS:,} chars/items: refused"
                )
        if op == "+" and _size(left) + _size(right) > MAX_OBJECT_CHARS:
            raise TemplateError(f"chat template builds a value over {MAX_OBJECT_CHARS:,} chars/items")
        return {"**": operator.pow, "*": operator.mul, "+": operator.add}[op](left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        for v in (*args, *kwargs.values()):
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_OBJECT_CHARS:
                raise TemplateError(
                    f"chat template passes an integer above {MAX_OBJECT_CHARS:,} to a call: refused"
                )
        result = super().call(__context, __obj, *args, **kwargs)
        if _size(result) > MAX_OBJECT_CHARS:
            raise TemplateError(f"chat template built a value over {MAX_OBJECT_CHARS:,} chars/items")
        return result


def compile_chat_template(
    source: str, extra_globals: Mapping[str, Callable] | None = None
) -> jinja2.Template:
    """The template compiled in a BoundedSandbox (TemplateError on a syntax error)."""
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.globals.update(extra_globals or {})
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not compile: {e}") from e


class _RenderTimeout(Exception):
    """Raised asynchronously in the rendering thread when its time budget is spent."""


class _Deadline:
    """Interrupts the current thread with _RenderTimeout after `seconds` (a timer thread sets an
    asynchronous exception, delivered between two bytecodes: a loop of any shape stops, at no cost
    per step). Leaving the block in time cancels it, and clears an exception set but not yet
    delivered, so nothing fires outside the block."""

    def __init__(self, seconds: float):
        self.seconds, self.lock, self.active, self.fired = seconds, threading.Lock(), False, False
        self.thread_id = threading.get_ident()

    def _fire(self) -> None:
        with self.lock:
            if self.active:
                self.fired = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self.thread_id), ctypes.py_object(_RenderTimeout)
                )

    def __enter__(self) -> _Deadline:
        self.active = True
        self.timer = threading.Timer(self.seconds, self._fire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timer.cancel()
        with self.lock:
            self.active = False
            if self.fired:  # set but maybe not delivered yet: clear it
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id), None)


def render_chat_template(template: jinja2.Template, **context: Any) -> str:
    """Renders with the step and output bounds; every failure is a TemplateError (InputError
    subclasses raised by the template itself, e.g. raise_exception, pass through)."""
    parts, total = [], 0
    try:
        with _Deadline(MAX_RENDER_SECONDS):
            for piece in template.generate(**context):
                total += len(piece)
                if total > MAX_OUTPUT_CHARS:
                    raise TemplateError(f"chat template output exceeds {MAX_OUTPUT_CHARS:,} chars")
                parts.append(piece)
    except _RenderTimeout:
        raise TemplateError(
            f"chat template ran longer than {MAX_RENDER_SECONDS:g} s (a runaway loop?)"
        ) from None
    except InputError:
        raise
    except jinja2.sandbox.SecurityError as e:
        raise TemplateError(f"chat template tried an unsafe operation: {e}") from e
    except (jinja2.TemplateError, ArithmeticError, TypeError, ValueError, MemoryError, RecursionError) as e:
        raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
    return "".join(parts)
