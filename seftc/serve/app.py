"""The HTTP layer: a FastAPI app over one `Engine` running on its own thread.

Handlers validate a request (pydantic, strict types; every failure is a 4xx in OpenAI's error
shape), turn it into prompt token ids and `SamplingParams`, and submit it to the engine with a
sink that hands each token to the handler's asyncio queue (`call_soon_threadsafe`). A full engine
queue answers 429. A streamed response whose client disconnects is cancelled in the generator's
`finally`; a non-streamed one polls for the disconnect while it waits. Tokens go out as
server-sent events, one chunk per token, then `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from seftc.errors import SeftcError
from seftc.runtime.engine import Engine, EngineClosed, EngineFull, Sequence, TokenEvent
from seftc.runtime.generate import encode_chat, encode_prompt
from seftc.runtime.sampling import SamplingParams
from seftc.serve import protocol as p
from seftc.serve.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("seftc.serve")

MAX_BODY = 8 << 20  # bytes of JSON one request may send
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclass(frozen=True)
class AppSettings:
    model_name: str
    max_tokens: int = 1024  # the most new tokens one request may ask for
    api_key: str | None = None
    drain_timeout: float = 60.0  # seconds the engine gets to finish its sequences at shutdown


class _Gate:
    """Pure ASGI middleware: the API key check on /v1 (before the body is read), and the request
    counter by endpoint and status (it does not buffer streamed bodies)."""

    def __init__(self, app: Any, settings: AppSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self._expected = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        if self._expected is not None and path.startswith("/v1"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not secrets.compare_digest(given, self._expected):
                body = p.error_body("missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                    "invalid_request_error", None, "invalid_api_key")
                await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, counted)
                return
        await self.app(scope, receive, counted)


def _validation_error(errors: Any) -> p.APIError:
    """The first pydantic error as a 400, naming the field."""
    err = errors[0] if errors else {}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if not loc:
        return p.APIError(400, f"the request body is not valid: {err.get('msg', 'invalid')}")
    return p.APIError(400, f"{'.'.join(loc)}: {err.get('msg', 'invalid value')}", param=loc[0])


async def _parse(request: Request, cls: type[BaseModel]) -> Any:
    """The JSON body as `cls` (whatever the Content-Type says, as clients are not all careful)."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise p.APIError(413, f"the request body is larger than {MAX_BODY >> 20} MiB")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise p.APIError(413, f"the request body is larger than {MAX_BODY >> 20} MiB")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise p.APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise p.APIError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def create_app(engine: Engine, tokenizer: Any, settings: AppSettings) -> FastAPI:
    """The app; its lifespan starts the engine thread and, at shutdown, drains it."""
    metrics = Metrics(engine)
    created = int(time.time())
    state = {"thread": None}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(target=engine.run_forever, name="seftc-engine", daemon=True)
        state["thread"] = thread
        thread.start()
        try:
            yield
        finally:
            engine.shutdown(drain=True)
            await asyncio.to_thread(thread.join, settings.drain_timeout)
            if thread.is_alive():
                log.warning("engine did not drain within %.0f s; cancelling what is left", settings.drain_timeout)
                engine.shutdown(drain=False)
                await asyncio.to_thread(thread.join, 10.0)

    app = FastAPI(title="seftc serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Gate, settings=settings, metrics=metrics)

    # --- errors: always OpenAI's shape, never a traceback -------------------------------------------
    @app.exception_handler(p.APIError)
    async def _api_error(_request: Request, exc: p.APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(exc.errors()).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(p.error_body(f"{message}: {_request.method} {_request.url.path}", "invalid_request_error"),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(p.error_body("internal server error", "server_error"), status_code=500)

    # --- plain endpoints -------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        thread = state["thread"]
        ok = thread is not None and thread.is_alive() and not engine.closed
        return JSONResponse({"status": "ok" if ok else "unavailable", "running": engine.running,
                             "waiting": engine.waiting}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def _model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "seftc",
                "max_model_len": engine.context}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != settings.model_name:
            raise _unknown_model(model_id)
        return _model_card()

    # --- generation ------------------------------------------------------------------------------------
    def _unknown_model(name: str) -> p.APIError:
        return p.APIError(404, f"the model '{name}' does not exist; this server serves '{settings.model_name}'",
                          param="model", code="model_not_found")

    def _check(body: p._Common) -> None:
        if body.model != settings.model_name:
            raise _unknown_model(body.model)
        bad = body.unsupported()
        if bad is not None:
            raise p.APIError(400, f"{bad[1]} by seftc serve", param=bad[0])

    def _params(body: p._Common, prompt_len: int, requested: int | None, default: int, prompt_param: str) -> SamplingParams:
        room = engine.context - prompt_len
        if room <= 0:
            raise p.APIError(400, f"the prompt has {prompt_len} tokens; the model's context is {engine.context} "
                                  f"tokens (prompt and completion together)", param=prompt_param,
                             code="context_length_exceeded")
        if requested is None:
            requested = min(default, room)
        elif requested > settings.max_tokens:
            raise p.APIError(400, f"max_tokens is {requested}; this server allows at most {settings.max_tokens} "
                                  f"(seftc serve --max-tokens)", param="max_tokens")
        elif requested > room:
            raise p.APIError(400, f"the prompt ({prompt_len} tokens) and max_tokens ({requested}) exceed the model's "
                                  f"context of {engine.context} tokens", param="max_tokens",
                             code="context_length_exceeded")
        return SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, max_tokens=requested,
                              stop=body.stops(), seed=body.seed, ignore_eos=body.ignore_eos)

    def _submit(ids: list[int], params: SamplingParams) -> tuple[Sequence, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def sink(event: TokenEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        try:
            seq = engine.submit(ids, params, sink)
        except EngineFull as e:
            metrics.rejected.labels("queue_full").inc()
            raise p.APIError(429, f"the server is at capacity ({e}); retry later", "rate_limit_error",
                             code="rate_limit_exceeded") from None
        except EngineClosed:
            metrics.rejected.labels("shutting_down").inc()
            raise p.APIError(503, "the server is shutting down", "server_error", code="unavailable") from None
        except SeftcError as e:
            raise p.APIError(400, str(e), param="prompt") from None
        metrics.prompt_tokens.inc(len(ids))
        return seq, queue

    def _observe(seq: Sequence, event: TokenEvent, last: float | None) -> float | None:
        if event.token is None:
            return last
        metrics.generation_tokens.inc()
        if last is None:
            metrics.ttft.observe(event.time - seq.submitted_at)
        else:
            metrics.itl.observe(event.time - last)
        if event.finish_reason in ("stop", "length"):
            metrics.duration.observe(event.time - seq.submitted_at)
        return event.time

    def _cancel(seq: Sequence) -> None:
        if not seq.done:
            engine.cancel(seq)
            metrics.cancelled.inc()

    async def _collect(request: Request, seq: Sequence, queue: asyncio.Queue) -> Sequence | None:
        """Wait for the whole sequence; None when the client went away first (the sequence is cancelled)."""
        last = None
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return None
                    continue
                last = _observe(seq, event, last)
                if event.finish_reason is not None:
                    return seq
        finally:
            _cancel(seq)

    def _failed(seq: Sequence) -> p.APIError:
        if seq.finish_reason == "cancelled":  # only a shutdown that gave up draining cancels a live request
            return p.APIError(503, "the request was cancelled: the server is shutting down", "server_error",
                              code="unavailable")
        return p.APIError(500, seq.error or "generation failed", "server_error")

    def _sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    def _stream(seq: Sequence, queue: asyncio.Queue, first: list[dict], chunk, final, usage_chunk) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            last = None
            try:
                for obj in first:
                    yield _sse(obj)
                while True:
                    event = await queue.get()
                    last = _observe(seq, event, last)
                    if event.token is not None:
                        yield _sse(chunk(event.text))
                    if event.finish_reason == "error":
                        yield _sse(_failed(seq).body())
                        break
                    if event.finish_reason is not None:
                        if event.finish_reason != "cancelled":
                            yield _sse(final(event.finish_reason))
                            if usage_chunk is not None:
                                yield _sse(usage_chunk(p.usage(len(seq.prompt), len(seq.tokens))))
                        break
                yield "data: [DONE]\n\n"
            finally:
                _cancel(seq)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _finished(request: Request, seq: Any, queue: Any) -> Any:
        """Wait for a non-streamed sequence: its result, 499 if the client left, or the API error."""
        done = await _collect(request, seq, queue)
        if done is None:
            return Response(status_code=499)
        if done.finish_reason in ("error", "cancelled"):
            raise _failed(done)
        return done

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await _parse(request, p.CompletionRequest)
        _check(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise p.APIError(400, "one prompt per request is supported; send the prompts as separate requests",
                                 param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = encode_prompt(tokenizer, prompt)
        else:
            ids = list(prompt)
            vocab = len(tokenizer)
            if not ids or any(t < 0 or t >= vocab for t in ids):
                raise p.APIError(400, f"prompt token ids must be a non-empty list of ids in [0, {vocab})", param="prompt")
        params = _params(body, len(ids), body.max_tokens, 16, "prompt")
        seq, queue = _submit(ids, params)
        rid = p.new_id("cmpl")
        if body.stream:
            made = int(time.time())
            usage_chunk = None
            if body.stream_options is not None and body.stream_options.include_usage:
                def usage_chunk(u: dict) -> dict:
                    return {"id": rid, "object": "text_completion", "created": made, "model": settings.model_name,
                            "choices": [], "usage": u}
            return _stream(seq, queue, [],
                           lambda text: p.completion(rid, settings.model_name, text, None, None, made, chunk=True),
                           lambda reason: p.completion(rid, settings.model_name, "", reason, None, made, chunk=True),
                           usage_chunk)
        done = await _finished(request, seq, queue)
        if isinstance(done, Response):
            return done
        return p.completion(rid, settings.model_name, done.text, done.finish_reason,
                            p.usage(len(done.prompt), len(done.tokens)))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await _parse(request, p.ChatRequest)
        _check(body)
        try:
            ids = encode_chat(tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
        except SeftcError as e:
            raise p.APIError(400, str(e), param="messages") from None
        params = _params(body, len(ids), body.requested_max_tokens(), settings.max_tokens, "messages")
        seq, queue = _submit(ids, params)
        rid = p.new_id("chatcmpl")
        if body.stream:
            made = int(time.time())
            name = settings.model_name
            usage_chunk = None
            if body.stream_options is not None and body.stream_options.include_usage:
                def usage_chunk(u: dict) -> dict:
                    return p.chat_chunk(rid, name, made, None, None, u)
            return _stream(seq, queue, [p.chat_chunk(rid, name, made, {"role": "assistant", "content": ""}, None)],
                           lambda text: p.chat_chunk(rid, name, made, {"content": text}, None),
                           lambda reason: p.chat_chunk(rid, name, made, {}, reason),
                           usage_chunk)
        done = await _finished(request, seq, queue)
        if isinstance(done, Response):
            return done
        return p.chat_completion(rid, settings.model_name, done.text, done.finish_reason,
                                 p.usage(len(done.prompt), len(done.tokens)))

    app.state.engine = engine
    app.state.metrics = metrics
    return app
