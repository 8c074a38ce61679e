"""OpenAI-compatible HTTP API beside gRPC: the same process, engine, strategies and validation.

Routes (Starlette, served by uvicorn inside the gRPC server's event loop):

* ``POST /v1/chat/completions``: OpenAI's chat completion, plain or ``stream: true`` (server-sent
  events: ``chat.completion.chunk`` objects, then ``data: [DONE]``; ``stream_options.include_usage``
  adds a last chunk with ``usage`` and no choices). Steering fields sit in the body beside the
  standard ones (the openai SDK sends them with ``extra_body``): ``weights``, ``strategy``
  (``conditioned``/``rerank``/``mixture``), ``candidates``, ``return_rewards``,
  ``return_candidates``, and ``top_k`` as in the gRPC sampling message. The response, and the
  chunk with the finish reason (and the usage chunk), carry ``steer``: the direction used, the
  strategy, the rewards (or null) and the engine's own finish reason.
* ``GET /v1/models`` (and ``/v1/models/{id}``): the one served model, with its adapter,
  objectives, strategies and context length as extra fields.
* ``GET /health``: 200 while serving, 503 from the start of a drain (it needs no token).

This module only translates: JSON is checked for shape (is ``messages`` a list, is ``stop`` a
string or a list; :mod:`steer.server.http_request`) and turned into plain values for
:func:`steer.server.validation.build_steer_request`, the same call the gRPC servicer makes.
``InvalidInput.field`` is renamed into the request's own spelling (``weights[helpfulness]`` ->
``weights.helpfulness``, ``sampling.max_new_tokens`` -> ``max_tokens``). Errors are OpenAI-shaped
(``{"error": {"message", "type", "param", "code"}}``):

====================================  ====  ==========================
InvalidInput, ScorerUnavailable       400   param: the field
StrategyUnavailable                   400   param: strategy (or stream)
missing or wrong bearer token         401   same token as gRPC
Overloaded, ScoringOverloaded         429   Retry-After: 1
server stopping (after the drain)     503   in-flight calls finish
anything unexpected                   500   request id in the message
====================================  ====  ==========================

A streamed answer sends its headers once the engine admitted the request and produced the first
event, so a refusal is a status code, never an error inside a 200 stream; a failure after that
is one ``data: {"error": ...}`` event before ``[DONE]``. A client that disconnects cancels its
generation (the engine frees the slot), streamed or not. Shutdown follows the gRPC server's
(:mod:`steer.server.app`): ``/health`` says 503 during the drain while calls are still served;
then new calls get 503, the listener closes, and calls in flight get the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from steer.server.engine import Engine, FinishReason, Overloaded, TextDelta
from steer.server.http_request import IGNORED_FIELDS as IGNORED_FIELDS
from steer.server.http_request import STANDARD_FIELDS as STANDARD_FIELDS
from steer.server.http_request import STEERING_FIELDS as STEERING_FIELDS
from steer.server.http_request import UNSUPPORTED_FIELDS as UNSUPPORTED_FIELDS
from steer.server.http_request import HttpError, _ChatRequest, _json_body
from steer.server.observability import Metrics, access_log, request_id
from steer.server.security import bearer_denial
from steer.server.strategies import (
    STRATEGIES,
    SteerRequest,
    SteerResult,
    Strategy,
    StrategyUnavailable,
    Usage,
)
from steer.server.validation import ScorerUnavailable, ServiceInfo, Transport, offered_strategy

from steer.errors import InvalidInput
from steer.rewards.service import ScoringOverloaded, ScoringService, ScoringStopped

log = logging.getLogger(__name__)

SERVING, DRAINING, STOPPING = "serving", "draining", "stopping"
STRATEGY_NAMES = {name: name for name in STRATEGIES}  # the JSON spelling is the domain name
# OpenAI knows "stop" and "length"; what the engine says exactly goes into steer.finish_reason.
FINISH_REASONS = {
    FinishReason.STOP: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.TIME_LIMIT: "length",
    FinishReason.CANCELLED: "length",  # the server cut the text short (shutting down)
}


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class OpenAIApi(Transport):
    """The Starlette application: OpenAI JSON in, domain calls, OpenAI JSON out."""

    def __init__(self, engine: Engine, strategies: dict[str, Strategy], info: ServiceInfo,
                 scoring: ScoringService | None = None, auth_token: str | None = None, metrics: Metrics | None = None):
        super().__init__(engine, strategies, info, scoring)
        self.metrics = metrics
        self.phase = SERVING
        self.created = int(time.time())
        self._expected = f"Bearer {auth_token}".encode() if auth_token else None
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ]
        self.paths = frozenset(r.path for r in routes)
        app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})
        self.app = _Observed(app, self)

    # -- routes -----------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.phase == SERVING:
            return JSONResponse({"status": "serving"})
        return JSONResponse({"status": self.phase}, status_code=503)

    async def models(self, request: Request) -> Response:
        try:
            self._authorise(request)
        except HttpError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        try:
            self._authorise(request)
            if request.path_params["model_id"] != self.info.model_id:
                raise HttpError(404, f"model: {request.path_params['model_id']!r} is not served here; "
                                f"this server serves {self.info.model_id!r}", "model", "model_not_found")
        except HttpError as e:
            return e.response()
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request) -> Response:
        chat = None
        rid = request.scope["state"]["request_id"]
        try:
            self._authorise(request)
            if self.phase == STOPPING:
                raise _shutting_down()
            chat = _ChatRequest(await _json_body(request, self.info.max_message_bytes))
            steer_request = self.steer_request(
                prompt=None,
                messages=chat.messages,
                weights=chat.weights if chat.weights is not None else dict.fromkeys(self.info.objectives, 1.0),
                strategy=chat.strategy,
                strategy_names=STRATEGY_NAMES,
                candidates=chat.candidates,
                return_candidates=chat.return_candidates,
                return_rewards=chat.return_rewards,
                sampling=chat.sampling,
            )
            strategy = offered_strategy(self.strategies, steer_request.strategy, spell=str)
            if chat.stream:
                if not strategy.streams:
                    raise HttpError(400, f"stream: strategy {steer_request.strategy} does not stream; "
                                    "send stream: false", "stream")
                return await self._stream(request, rid, chat, steer_request, strategy)
            result: SteerResult = await _unless_disconnected(request, strategy.run(steer_request))
            return JSONResponse(self._completion(rid, steer_request, result))
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it; the access log and metrics do
        except Exception as e:  # noqa: BLE001  (every failure becomes an OpenAI-shaped answer)
            return self._refusal(e, chat, rid).response()

    # -- translation ------------------------------------------------------------------------------

    def _authorise(self, request: Request) -> None:
        if self._expected is None:
            return
        denial = bearer_denial(request.headers.get("authorization"), self._expected,
                               missing="missing Authorization header: send 'Authorization: Bearer <token>'")
        if denial is not None:
            raise HttpError(401, denial, None, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _refusal(self, e: Exception, chat: _ChatRequest | None, rid: str) -> HttpError:
        """The OpenAI-shaped answer for a domain error (see the module docstring's table)."""
        if isinstance(e, HttpError):
            return e
        if isinstance(e, InvalidInput):
            param = chat.param(e.field) if chat is not None else e.field
            return HttpError(400, f"{param}: {e.reason}", param, "invalid_value")
        if isinstance(e, ScorerUnavailable):
            return HttpError(400, str(e), e.field, "scorer_unavailable")
        if isinstance(e, StrategyUnavailable):
            return HttpError(400, str(e), "strategy", "strategy_unavailable")
        if isinstance(e, (Overloaded, ScoringOverloaded)):
            if self.phase == STOPPING:
                return _shutting_down()
            return HttpError(429, str(e), None, "overloaded", "rate_limit_error", headers={"Retry-After": "1"})
        if isinstance(e, ScoringStopped):
            return HttpError(503, str(e), None, "unavailable", "server_error")
        log.error("unexpected error in a chat completion (request id %s)", rid, exc_info=e)
        return HttpError(500, f"internal error (request id {rid}); the server log has the details", None,
                         "internal_error", "server_error")

    def _model_card(self) -> dict:
        return {
            "id": self.info.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "steer",
            "adapter": self.info.adapter,
            "objectives": list(self.info.objectives),
            "strategies": list(self.strategies),
            "max_model_len": self.engine.context_length,
        }

    def _steer(self, request: SteerRequest, result: SteerResult) -> dict:
        return {
            "direction": request.direction.as_dict(),
            "strategy": request.strategy,
            "rewards": result.rewards,
            "finish_reason": result.finished.finish_reason.value,
        }

    def _completion(self, rid: str, request: SteerRequest, result: SteerResult) -> dict:
        steer = self._steer(request, result)
        if request.return_candidates:
            steer["candidates"] = [
                {"text": c.text, "rewards": c.rewards, "weighted_reward": c.weighted_reward,
                 "finish_reason": FINISH_REASONS[c.finished.finish_reason]}
                for c in result.candidates
            ]
        return {
            "id": f"chatcmpl-{rid}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.info.model_id,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": FINISH_REASONS[result.finished.finish_reason],
                "logprobs": None,
            }],
            "usage": _usage(result.usage),
            "steer": steer,
        }

    async def _stream(self, request: Request, rid: str, chat: _ChatRequest, steer_request: SteerRequest,
                      strategy: Strategy) -> Response:
        events = strategy.stream(steer_request)
        try:
            # Admission (429) and the prompt's token count (400) are settled before any header is sent.
            first = await _unless_disconnected(request, events.__anext__())
        except BaseException:
            await events.aclose()
            raise
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        body = self._sse(rid, chat, steer_request, events, first)
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)

    async def _sse(self, rid: str, chat: _ChatRequest, steer_request: SteerRequest, events: AsyncIterator,
                   first) -> AsyncIterator[str]:
        created = int(time.time())
        extra = {"usage": None} if chat.include_usage else {}

        def chunk(delta: dict, finish_reason: str | None = None, **more) -> str:
            body = {
                "id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": created,
                "model": self.info.model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
                **extra, **more,
            }
            return _event(body)

        try:
            yield chunk({"role": "assistant", "content": ""})
            event = first
            while True:
                if isinstance(event, TextDelta) and event.text:
                    yield chunk({"content": event.text})
                elif isinstance(event, SteerResult):  # the last event: the strategy measured its rewards
                    steer = self._steer(steer_request, event)
                    yield chunk({}, FINISH_REASONS[event.finished.finish_reason], steer=steer)
                    if chat.include_usage:
                        yield _event({
                            "id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": created,
                            "model": self.info.model_id, "choices": [], "usage": _usage(event.usage), "steer": steer,
                        })
                    break
                event = await events.__anext__()
        except Exception as e:  # noqa: BLE001  (headers are sent: the error travels as an event)
            if isinstance(e, StopAsyncIteration):
                e = RuntimeError("the engine's stream ended without a finish event")
            yield _event(self._refusal(e, chat, rid).body())
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def _shutting_down() -> HttpError:
    return HttpError(503, "the server is shutting down; retry on another replica", None, "unavailable", "server_error")


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (unknown path 404, wrong method 405), OpenAI-shaped."""
    if exc.status_code == 404:
        message = (f"{request.method} {request.url.path}: no such route "
                   "(routes: /v1/chat/completions, /v1/models, /health)")
    elif exc.status_code == 405:
        message = f"{request.url.path}: method {request.method} is not allowed here"
    else:
        message = str(exc.detail)
    return HttpError(exc.status_code, message, None, "not_found" if exc.status_code == 404 else None,
                     headers=exc.headers).response()


async def _unless_disconnected(request: Request, awaitable):
    """Await ``awaitable``; if the client disconnects first, cancel it (freeing its batch slot) and raise
    _ClientGone."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    if work.cancelled():
        raise _ClientGone()
    return work.result()


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (the body was read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Observed:
    """ASGI wrapper: a request id (``x-request-id``, the client's when it is a plain token), the
    ``steer_requests_total``/``steer_request_seconds`` metrics (method ``HTTP <path>``, code = the
    HTTP status) and one JSON access-log line per request, as the gRPC interceptor gives every call."""

    def __init__(self, app, api: OpenAIApi):
        self.app, self.api = app, api

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        client_rid = headers.get(b"x-request-id", b"").decode("latin-1") or None
        rid = request_id(client_rid)
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = 499  # the client left before the response began

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = dict(message, headers=[*message.get("headers", []), (b"x-request-id", rid.encode())])
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            elapsed = time.perf_counter() - started
            path = scope.get("path", "")
            label = f"HTTP {path}" if path in self.api.paths else (
                "HTTP /v1/models/{id}" if path.startswith("/v1/models/") else "HTTP unknown")
            if self.api.metrics is not None:
                self.api.metrics.requests.labels(label, str(status)).inc()
                self.api.metrics.latency.labels(label).observe(elapsed)
            client = scope.get("client")
            access_log.info(json.dumps({
                "request_id": rid, "method": f"{scope.get('method')} {path[:200]}", "code": status,
                "seconds": round(elapsed, 4), "peer": f"{client[0]}:{client[1]}" if client else None,
            }))


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside the gRPC server's loop: SIGTERM/SIGINT belong to the one shutdown sequence
    (:func:`steer.server.app.serve`) that stops both transports, so uvicorn installs no handlers."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    def install_signal_handlers(self) -> None:  # the same, for uvicorn releases before capture_signals
        pass


class HttpServer:
    """The HTTP listener of a running server (:meth:`start`, :meth:`drain`, :meth:`stop`)."""

    def __init__(self, api: OpenAIApi, server: _EmbeddedUvicorn, sock: socket.socket, task: asyncio.Task):
        self.api, self._server, self._sock, self._task = api, server, sock, task
        self.port = sock.getsockname()[1]

    @classmethod
    async def start(cls, api: OpenAIApi, host: str, port: int, tls_cert: str | None = None,
                    tls_key: str | None = None) -> HttpServer:
        """Bind ``host:port`` (0: a free port) and serve ``api`` there; returns once it accepts connections."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise OSError(f"--http-port {port}: could not bind {host}:{port} ({e.strerror})") from None
        config = uvicorn.Config(
            api.app, host=host, port=sock.getsockname()[1], lifespan="off", log_config=None, access_log=False,
            ssl_certfile=tls_cert, ssl_keyfile=tls_key, server_header=False,
        )
        server = _EmbeddedUvicorn(config)
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():  # uvicorn gave up during startup; its reason is in the log
                sock.close()
                task.result()
                raise OSError(f"the HTTP server on {host}:{port} did not start")
            await asyncio.sleep(0.01)
        return cls(api, server, sock, task)

    def drain(self) -> None:
        """``/health`` says 503 from now on; calls are still served."""
        if self.api.phase == SERVING:
            self.api.phase = DRAINING

    async def stop(self, grace: float) -> None:
        """Refuse new calls (503), close the listener and give calls in flight ``grace`` seconds."""
        self.api.phase = STOPPING
        self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        try:
            await self._task
        finally:
            self._sock.close()
