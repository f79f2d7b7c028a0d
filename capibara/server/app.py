"""The ASGI app: OpenAI's completions, chat completions and models, plus health/metrics.

``create_app(engine, model_name=...)`` builds a FastAPI app over one
``CapibaraInference``; ``capibara serve`` runs it under uvicorn. Request bodies are
read and parsed here (not by FastAPI's body injection) so that every failure -- a body
over the size limit, invalid UTF-8, malformed JSON, a wrong field -- is answered in
OpenAI's error JSON with the right status and the field named.

Lifecycle of one generation request:
1. auth (``--api-key``: ``Authorization: Bearer KEY`` on ``/v1/*``, else 401);
2. body -> pydantic request -> prompt ids (the chat template for chat) -> SamplingParams;
3. ``engine.open_stream`` submits it; submission errors map to 400 (bad field or a
   prompt past the context) or 429 (``QueueFullError``, with ``Retry-After``);
4. a watcher task waits for the client's ``http.disconnect``: a client that goes away
   aborts its request at once (slot and pages freed), streamed or not;
5. the first event is awaited before answering, so a request the engine fails before
   its first token gets a plain 500; a failure later in a stream ends it with an error
   event. Other requests never see either.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from capibara.core.inference import ContextLengthError, Generation, QueueFullError
from capibara.server import streaming
from capibara.server.chat import render
from capibara.server.errors import APIError, bad_request, from_validation
from capibara.server.metrics import ServerMetrics
from capibara.server.schemas import ChatCompletionRequest, CompletionRequest

MAX_BODY_BYTES = 2 * 2**20  # far above any prompt that fits a context (token ids included)
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first"


@dataclasses.dataclass(eq=False)
class _Active:
    """One generation request being served (the server's leak check counts these)."""

    events: object  # the engine's EventStream
    endpoint: str
    start: float
    watcher: asyncio.Task | None = None
    disconnected: bool = False
    ended: bool = False


class _Server:
    def __init__(self, engine, model_name, api_key, max_body_bytes, retry_after, defaults):
        self.engine, self.model_name = engine, model_name
        self.defaults = dict(defaults or {})
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.retry_after = retry_after
        self.created = int(time.time())
        self.active: set[_Active] = set()
        self.metrics = ServerMetrics(engine, self.active)

    # -- request parsing -----------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip(), self.api_key):
            message = "missing or incorrect API key: send 'Authorization: Bearer KEY'"
            raise APIError(401, message, code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        length = request.headers.get("content-length", "")
        too_big = length.isdigit() and int(length) > self.max_body_bytes
        chunks, size = [], 0
        # Drain the whole body even when too big: answering before the client has sent
        # it makes the client fail on a reset connection instead of reading the 413.
        async for chunk in request.stream():
            size += len(chunk)
            if size <= self.max_body_bytes:
                chunks.append(chunk)
        if too_big or size > self.max_body_bytes:
            message = f"request body of {size} bytes exceeds the limit of {self.max_body_bytes}"
            raise APIError(413, message, code="body_too_large")
        raw = b"".join(chunks)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise bad_request(f"request body is not valid UTF-8 (byte {e.start})") from None
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise bad_request(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise bad_request(f"request body must be a JSON object, got {type(body).__name__}")
        return body

    def prompt(self, req) -> tuple[list[int], tuple[str, ...], str]:
        """``(prompt ids, extra stop strings, the field it came from)``."""
        tokenizer = self.engine.tokenizer
        if isinstance(req, ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            text, extra = render(tokenizer, messages)
            return tokenizer.encode(text), extra, "messages"
        prompt = req.single_prompt()
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return ids, (), "prompt"

    def submit(self, req):
        if req.model != self.model_name:
            message = f"model {req.model!r} does not exist: this server serves {self.model_name!r}"
            raise APIError(404, message, param="model", code="model_not_found")
        ids, extra_stop, field = self.prompt(req)
        if not ids:
            raise bad_request(f"{field}: the prompt is empty", field)
        chat = isinstance(req, ChatCompletionRequest)
        max_tokens = req.requested_max_tokens if chat else req.max_tokens
        if max_tokens is None and "max_tokens" in self.defaults:
            max_tokens = self.defaults["max_tokens"]
        if max_tokens is None:
            # OpenAI's defaults: 16 for completions, the rest of the context for chat.
            max_tokens = max(1, self.engine.max_context - len(ids)) if chat else 16
        try:
            sampling = req.sampling(max_tokens, extra_stop, self.defaults)
        except (ValueError, TypeError) as e:
            raise bad_request(str(e)) from None
        try:
            return self.engine.open_stream(ids, sampling)
        except ContextLengthError as e:
            raise APIError(400, str(e), param=field, code="context_length_exceeded") from None
        except QueueFullError as e:
            headers = {"Retry-After": str(self.retry_after)}
            raise APIError(
                429, str(e), type="rate_limit_error", code="queue_full", headers=headers
            ) from None
        except (ValueError, TypeError) as e:
            raise bad_request(f"{field}: {e}", field) from None
        except RuntimeError as e:  # the engine is closed: the server is shutting down
            raise APIError(503, str(e), type="server_error") from None

    # -- serving -------------------------------------------------------------------------
    async def _watch(self, request: Request, active: _Active) -> None:
        """Waits for the client to go away (or the response to complete: uvicorn then
        answers ``http.disconnect`` too), then aborts the request if it still runs."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if not active.ended:
            active.disconnected = True
            active.events.abort()
            self._end(active, None)

    def _end(self, active: _Active, generation: Generation | None) -> None:
        """Cleans up one request, exactly once, however it ended."""
        if active.ended:
            return
        active.ended = True
        if active.watcher is not None and active.watcher is not asyncio.current_task():
            active.watcher.cancel()
        active.events.abort()  # a no-op when it finished
        self.active.discard(active)
        gone = generation is None or (
            active.disconnected and generation.finish_reason == "cancelled"
        )
        if gone:
            self.metrics.disconnects.labels(active.endpoint).inc()
        self.metrics.duration.labels(active.endpoint).observe(time.perf_counter() - active.start)

    async def generate(self, request: Request, chat: bool) -> Response:
        start = time.perf_counter()
        self.check_key(request)
        body = await self.read_json(request)
        try:
            req = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
        except ValidationError as e:
            raise from_validation(e) from None
        events = self.submit(req)
        endpoint = "chat" if chat else "completions"
        active = _Active(events, endpoint, start)
        self.active.add(active)
        active.watcher = asyncio.create_task(self._watch(request, active))
        call = streaming.Call(
            chat=chat,
            id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_name,
        )
        try:
            event = await anext(events)
            if req.stream and event.generation is None:
                # From here on the stream's ``on_end`` cleans up, however it ends.
                return StreamingResponse(
                    streaming.sse(
                        call,
                        event,
                        events,
                        include_usage=req.include_usage,
                        on_end=lambda g: self._end(active, g),
                    ),
                    media_type="text/event-stream",
                    # No caching, and no buffering by a reverse proxy (nginx honours it).
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            while event.generation is None:
                event = await anext(events)
        except BaseException:  # cancelled (the connection went away) or a bug
            self._end(active, None)
            raise
        generation = event.generation
        self._end(active, generation)
        if active.disconnected:
            return Response(status_code=CLIENT_CLOSED)
        if generation.finish_reason in ("error", "cancelled"):
            raise streaming.failure(generation)
        return JSONResponse(streaming.response_body(call, generation))


class _CountRequests:
    """Counts answered requests by endpoint and status (a plain ASGI middleware:
    Starlette's ``BaseHTTPMiddleware`` wraps ``receive`` and would hide a streaming
    client's disconnect from the watcher)."""

    PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": CLIENT_CLOSED}  # no response started: the client left first

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            status["code"] = 500
            raise
        finally:
            # Unknown paths share one label: a scanner must not grow the series forever.
            path = scope["path"] if scope["path"] in self.PATHS else "other"
            self.metrics.http_requests.labels(path, str(status["code"])).inc()


def create_app(
    engine,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    retry_after: int = 1,
    defaults: dict | None = None,
    close_engine: bool = True,
) -> FastAPI:
    """The OpenAI-compatible app over ``engine`` (a ``CapibaraInference``).

    Args:
      model_name: the id ``/v1/models`` lists; requests must name it (else 404).
      api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
      max_body_bytes: larger request bodies get 413.
      retry_after: seconds in the ``Retry-After`` header of a 429 (queue full).
      defaults: ``max_tokens``, ``temperature``, ``top_k``, ``top_p`` of requests that
        omit them (else OpenAI's: 16 tokens for completions, the rest of the context
        for chat, temperature 1).
      close_engine: close the engine when the app shuts down.
    """
    server = _Server(engine, model_name, api_key, max_body_bytes, retry_after, defaults)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if close_engine:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="capibara", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):  # unknown routes, wrong methods
        return APIError(e.status_code, str(e.detail), code=None).response()

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        return APIError(500, f"internal error: {e!r}", type="server_error").response()

    app.add_middleware(_CountRequests, metrics=server.metrics)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.generate(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        server.check_key(request)
        card = {
            "id": model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "capibara",
            "max_model_len": engine.max_context,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict:
        m = engine.metrics()
        return {
            "status": "ok",
            "model": model_name,
            "pages": engine.page_counts(),
            "running": m.running,
            "waiting": m.queue_depth,
            "active_http_requests": len(server.active),
            "asyncio_tasks": len(asyncio.all_tasks()),
            "compilations": m.compilations,
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    return app
