"""The ASGI application of `jinfer serve`: OpenAI routes over the generation runtime.

Starlette rather than FastAPI: every request field is validated once, by jinfer (protocol.py, then
SamplingParams and the runtime), so each bad field answers OpenAI's 400 body naming it; a pydantic
layer would validate a second time and answer FastAPI's 422 shape, to be translated back.
Streaming and disconnect handling are written against ASGI directly (`_EventStream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jinfer.errors import ConfigError, EngineClosedError, InputError, OverloadedError
from jinfer.serve import protocol
from jinfer.serve.backend import Backend, ServeConfig
from jinfer.serve.metrics import ServerMetrics
from jinfer.serve.protocol import APIError, GenerationRequest

log = logging.getLogger("jinfer.serve")

RETRY_AFTER_SECONDS = 1


class _ClientGone(Exception):
    """The client closed the connection before the response was complete."""


class _Tracker:
    """Timing and token counts of one request: its metrics and its one log line."""

    def __init__(self, route: str, metrics: ServerMetrics, rid: str = "-"):
        self.route, self.metrics, self.rid = route, metrics, rid
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.t_last = self.t0
        self.prompt_tokens = self.completion_tokens = 0
        self.n = 1
        self.reasons: list[str] = []
        self.param: str | None = None

    def delta(self, d: Any) -> None:
        if d.token_ids:
            now = time.perf_counter()
            self.t_first = self.t_first or now
            self.t_last = now
            self.completion_tokens += len(d.token_ids)
        if d.finish_reason is not None:
            self.reasons.append(d.finish_reason)

    def done(self, status: int) -> None:
        m, latency = self.metrics, time.perf_counter() - self.t0
        if status == 499 and self.rid != "-":  # the client left: its unfinished samples were aborted
            self.reasons += ["abort"] * (self.n - len(self.reasons))
        m.requests.labels(self.route, str(status)).inc()
        m.latency.observe(latency)
        for reason in self.reasons:
            m.finished.labels(reason).inc()
        if status < 400 or status in (499, 500):  # admitted requests (not a rejected or refused one)
            m.prompt_tokens.inc(self.prompt_tokens)
        m.generated_tokens.inc(self.completion_tokens)
        ttft = tpot = None
        if self.t_first is not None:
            ttft = self.t_first - self.t0
            m.ttft.observe(ttft)
            per_sample = self.completion_tokens / max(1, self.n)
            if per_sample > 1:
                tpot = (self.t_last - self.t_first) / (per_sample - 1)
                m.tpot.observe(tpot)
        log.info(
            "request id=%s route=%s status=%d prompt_tokens=%d completion_tokens=%d finish=%s ttft=%s "
            "tpot=%s latency=%.3fs%s",
            self.rid,
            self.route,
            status,
            self.prompt_tokens,
            self.completion_tokens,
            ",".join(self.reasons) or "-",
            "-" if ttft is None else f"{ttft:.3f}s",
            "-" if tpot is None else f"{tpot * 1000:.1f}ms",
            latency,
            f" param={self.param}" if self.param else "",
        )


async def _wait_disconnect(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, coro) -> Any:
    """Awaits `coro`; if the client disconnects first, cancels it and raises _ClientGone."""
    task = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone()
    return task.result()


class _EventStream(Response):
    """Server-Sent Events from an async iterator of bytes; a client disconnect closes the iterator."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]):
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        async def pump():
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        task = asyncio.ensure_future(pump())
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, watch):
                t.cancel()
            await asyncio.gather(task, watch, return_exceptions=True)
            await self.events.aclose()


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class _Samples:
    """Per-sample text, token ids and logprobs accumulated from deltas."""

    def __init__(self, n: int):
        self.text = [""] * n
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[dict]] = [[] for _ in range(n)]
        self.reason: list[str | None] = [None] * n

    def add(self, d: Any) -> None:
        self.text[d.index] += d.text
        self.ids[d.index] += d.token_ids
        self.logprobs[d.index] += d.logprobs or []
        self.reason[d.index] = d.finish_reason or self.reason[d.index]


class OpenAIServer:
    """Routes, auth, limits and metrics around one Backend (loaded in a background thread)."""

    def __init__(self, config: ServeConfig, load: Callable[[], Backend], on_load_error: Callable[[], None]):
        self.config = config
        self.backend: Backend | None = None
        self.metrics = ServerMetrics(self._runtime_stats)
        self._load, self._on_load_error = load, on_load_error
        self._embed_lock = threading.Lock()
        self._created = int(time.time())
        self._loader: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def _load_in_background(self) -> None:
        try:
            self.backend = self._load()
        except Exception as e:
            log.error("could not load the model: %s", e, exc_info=not isinstance(e, ConfigError))
            self._on_load_error()

    @property
    def loading(self) -> bool:
        """True while the model is still loading (the background thread runs)."""
        return self._loader is not None and self._loader.is_alive()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        self._loader = threading.Thread(target=self._load_in_background, name="jinfer-load", daemon=True)
        self._loader.start()
        yield
        if self.backend is not None:
            await asyncio.to_thread(self.backend.close)

    def abort_in_flight(self) -> None:
        """Ends every running and waiting request (finish_reason "abort"); later ones get 503.
        Called from a worker thread when the shutdown grace period is over."""
        if self.backend is not None:
            log.warning("grace period over: aborting the requests still in flight")
            self.backend.close()

    def _runtime_stats(self) -> dict[str, Any] | None:
        b = self.backend
        return b.runtime.stats.summary() if b is not None and b.runtime is not None else None

    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
        ]
        return Starlette(
            routes=routes, lifespan=self.lifespan, exception_handlers={HTTPException: self._http_error}
        )

    # -- small routes ----------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if self.backend is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "warmup_seconds": round(self.backend.warmup_seconds, 3)})

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def _model_card(self) -> dict:
        card = {"id": self.config.name, "object": "model", "created": self._created, "owned_by": "jinfer"}
        if self.backend is not None and self.backend.llm is not None:
            card["max_model_len"] = self.backend.llm.engine.config.max_len
        return card

    async def models(self, request: Request) -> Response:
        return await self._handle(request, "/v1/models", lambda t: self._models(request))

    async def _models(self, request: Request) -> Response:
        self._check_auth(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        async def one(t):
            self._check_auth(request)
            self._check_model(request.path_params["model"])
            return JSONResponse(self._model_card())

        return await self._handle(request, "/v1/models", one)

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        err = APIError(
            exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=str(exc.status_code)
        )
        return JSONResponse(err.body(), status_code=exc.status_code)

    # -- common checks ---------------------------------------------------------------------------
    async def _handle(self, request: Request, route: str, handler) -> Response:
        """Runs `handler(tracker)`; APIErrors become OpenAI error bodies; counts and logs the request."""
        tracker = _Tracker(route, self.metrics)
        try:
            response = await handler(tracker)
        except APIError as e:
            tracker.param = e.param
            response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except _ClientGone:
            tracker.done(499)  # nginx's "client closed request"
            return Response(status_code=499)
        if not isinstance(response, _EventStream):  # a stream reports when it ends
            tracker.done(response.status_code)
        return response

    def _ready(self) -> Backend:
        if self.backend is None:
            raise APIError(
                503,
                "the model is still loading",
                type="server_error",
                code="loading",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        return self.backend

    def _check_auth(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(
                401,
                "missing or wrong API key (send 'Authorization: Bearer KEY')",
                type="authentication_error",
                code="invalid_api_key",
            )

    def _check_model(self, model: Any) -> None:
        if model is not None and model != self.config.name:
            raise APIError(
                404,
                f"model {model!r} does not exist; this server serves {self.config.name!r}",
                param="model",
                code="model_not_found",
            )

    async def _read_json(self, request: Request) -> Any:
        """The JSON body; 413 past max_body_bytes (the rest is drained, never kept)."""
        limit, size, chunks = self.config.max_body_bytes, 0, []
        declared = request.headers.get("content-length", "")
        too_big = declared.isdigit() and int(declared) > limit
        async for piece in request.stream():
            size += len(piece)
            too_big = too_big or size > limit
            if not too_big:
                chunks.append(piece)
            elif size > 16 * limit:  # stop reading a flood; the connection is closed after the reply
                break
        if too_big:
            raise APIError(
                413,
                f"request body is larger than {limit:,} bytes (--max-body-bytes)",
                code="request_too_large",
            )
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:  # RecursionError: nested thousands deep
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e

    async def _read_request(self, request: Request) -> tuple[Backend, Any]:
        self._check_auth(request)
        backend = self._ready()
        body = await self._read_json(request)
        if isinstance(body, dict):
            self._check_model(body.get("model"))
        return backend, body

    # -- generation ------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, "/v1/chat/completions", lambda t: self._generate(request, t, True))

    async def completions(self, request: Request) -> Response:
        return await self._handle(request, "/v1/completions", lambda t: self._generate(request, t, False))

    async def _generate(self, request: Request, tracker: _Tracker, chat: bool) -> Response:
        backend, body = await self._read_request(request)
        if backend.runtime is None:
            raise protocol.bad_field(
                "model", f"{self.config.name!r} is an embedding model: use /v1/embeddings"
            )
        req = protocol.parse_generation(body, chat)
        ids = self._prompt_ids(backend, req)
        params = self._params(backend, req, len(ids))
        tracker.rid, tracker.prompt_tokens, tracker.n = protocol.new_id(chat), len(ids), params.n
        deltas, first = await _unless_disconnected(request, self._open(backend, req, ids, params))
        if req.stream:
            return _EventStream(self._events(backend, req, tracker, deltas, first, params.n))
        samples = _Samples(params.n)
        tracker.delta(first)
        samples.add(first)
        try:
            await _unless_disconnected(request, self._collect(deltas, samples, tracker))
        finally:
            await deltas.aclose()
        if "error" in samples.reason:
            raise APIError(500, "generation failed", type="server_error", code="generation_error")
        if "abort" in samples.reason:  # (only the server aborts: at the end of a shutdown's grace period)
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        return JSONResponse(self._response(backend, req, tracker, samples))

    def _prompt_ids(self, backend: Backend, req: GenerationRequest) -> list[int]:
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], int):
            return req.prompt
        field = "messages" if req.chat else "prompt"
        tok = backend.tokenizer
        try:
            if tok is None:
                raise ConfigError("this model has no tokenizer: send token ids")
            return tok.encode_chat(req.prompt) if req.chat else tok.encode(req.prompt)
        except (InputError, ConfigError) as e:
            raise protocol.bad_field(field, str(e)) from e

    def _params(self, backend: Backend, req: GenerationRequest, prompt_len: int):
        llm = backend.llm
        room = llm.engine.config.max_len - prompt_len
        model_default = llm.generation_defaults.get("max_new_tokens")
        max_tokens = max(1, min(room, int(model_default)) if model_default else room)
        return protocol.sampling_params(req, llm.default_params(), max_tokens)

    async def _open(self, backend: Backend, req: GenerationRequest, ids, params):
        """Submits the request and awaits its first delta, so errors answer before any header."""
        deltas = backend.runtime.generate_async(ids, params)
        try:
            return deltas, await deltas.__anext__()
        except BaseException as e:
            await deltas.aclose()
            if isinstance(e, InputError):
                raise protocol.input_error(e, req) from e
            if isinstance(e, (OverloadedError, EngineClosedError)):
                raise APIError(
                    503,
                    f"server overloaded: {e}",
                    type="server_error",
                    code="overloaded",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                ) from e
            raise

    @staticmethod
    async def _collect(deltas, samples: _Samples, tracker: _Tracker) -> None:
        async for d in deltas:
            tracker.delta(d)
            samples.add(d)

    def _response(self, backend: Backend, req: GenerationRequest, tracker: _Tracker, s: _Samples) -> dict:
        fmt = protocol.LogprobFormatter(backend.tokenizer, req.top_logprobs or 0)
        use = protocol.usage(tracker.prompt_tokens, tracker.completion_tokens)
        choices = []
        for i in range(len(s.text)):
            if req.chat:
                lp = None if req.top_logprobs is None else {"content": fmt.chat(s.ids[i], s.logprobs[i])}
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": s.text[i]},
                        "logprobs": lp,
                        "finish_reason": s.reason[i],
                    }
                )
            else:
                lp = None if req.top_logprobs is None else fmt.completion(s.ids[i], s.logprobs[i], 0)
                choices.append({"index": i, "text": s.text[i], "logprobs": lp, "finish_reason": s.reason[i]})
        make = protocol.chat_response if req.chat else protocol.completion_response
        return make(tracker.rid, self.config.name, choices, use)

    async def _events(self, backend, req: GenerationRequest, tracker: _Tracker, deltas, first, n: int):
        """SSE chunks: a role chunk per choice (chat), one chunk per delta, usage, [DONE]."""
        fmt = protocol.LogprobFormatter(backend.tokenizer, req.top_logprobs or 0)
        offsets = [0] * n
        status = 499

        def chunk(choices, use=None):
            return _sse(
                protocol.chunk(tracker.rid, self.config.name, req.chat, choices, use, req.include_usage)
            )

        def choice(d) -> dict | None:
            lp = None
            if req.top_logprobs is not None and d.token_ids:
                lp = (
                    {"content": fmt.chat(d.token_ids, d.logprobs)}
                    if req.chat
                    else fmt.completion(d.token_ids, d.logprobs, offsets[d.index])
                )
            if not (d.text or lp or d.finish_reason):
                return None
            offsets[d.index] += len(d.text)
            body = (
                {"delta": {"content": d.text} if d.text or not d.finish_reason else {}}
                if req.chat
                else {"text": d.text}
            )
            return {"index": d.index, **body, "logprobs": lp, "finish_reason": d.finish_reason}

        try:
            if req.chat:
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for i in range(n)
                    ]
                )
            d = first
            while d is not None:
                tracker.delta(d)
                if (c := choice(d)) is not None:
                    yield chunk([c])
                d = await anext(deltas, None)
            if req.include_usage:
                yield chunk([], protocol.usage(tracker.prompt_tokens, tracker.completion_tokens))
            yield b"data: [DONE]\n\n"
            status = 200
        finally:
            await deltas.aclose()
            tracker.done(status)

    # -- embeddings ------------------------------------------------------------------------------
    async def embeddings(self, request: Request) -> Response:
        return await self._handle(request, "/v1/embeddings", lambda t: self._embed(request, t))

    async def _embed(self, request: Request, tracker: _Tracker) -> Response:
        backend, body = await self._read_request(request)
        if backend.embedder is None:
            raise protocol.bad_field("model", f"{self.config.name!r} is not an embedding model")
        inputs, fmt, _ = protocol.parse_embedding_inputs(body)
        try:
            count = sum(len(backend.embedder.encode(x, i)) for i, x in enumerate(inputs))
            vectors = await asyncio.to_thread(self._embed_locked, backend, inputs)
        except InputError as e:
            raise protocol.bad_field("input", str(e)) from e
        except ConfigError as e:
            raise protocol.bad_field("input", str(e)) from e
        tracker.prompt_tokens = count
        data = [protocol.embedding_item(i, v, fmt) for i, v in enumerate(vectors)]
        use = {"prompt_tokens": count, "total_tokens": count}
        return JSONResponse({"object": "list", "data": data, "model": self.config.name, "usage": use})

    def _embed_locked(self, backend: Backend, inputs):
        with self._embed_lock:
            return backend.embedder.embed(inputs)


def create_app(
    config: ServeConfig,
    load: Callable[[], Backend] | None = None,
    on_load_error: Callable[[], None] = lambda: None,
) -> Starlette:
    """The Starlette app for `config`; the model loads in a background thread at startup."""
    from jinfer.serve.backend import load_backend

    server = OpenAIServer(config, load or (lambda: load_backend(config)), on_load_error)
    app = server.app()
    app.state.openai_server = server
    return app
