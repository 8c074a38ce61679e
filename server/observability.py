"""Prometheus metrics, structured request logs and deliberate status codes for every call.

One interceptor wraps every handler. It gives the call a request id (the client's
``x-request-id`` metadata when it is a short plain token, else a new one; returned in trailing
metadata), times it, records ``steer_requests_total{method,code}`` and ``steer_request_seconds``
and logs one JSON line per call -- every call, including ones that never reach a servicer:

* request bytes that do not parse as the method's message: ``INVALID_ARGUMENT`` (the interceptor
  decodes requests itself, so a decode error is a refusal, not a traceback);
* an exception nobody expected: ``INTERNAL`` with the request id in the details (the traceback
  goes to the server log under that id), never ``UNKNOWN``;
* a call the client cancelled (or whose deadline passed) while it was running: ``CANCELLED``
  (``DEADLINE_EXCEEDED``);
* a method this server does not have: ``UNIMPLEMENTED``, counted as method ``unknown``.

Handlers see the call through a thin view of the grpc context that records the call *before*
``abort()`` sends the status, so a client that has its answer can already read the metric, and
that caps status details at :data:`MAX_DETAILS_BYTES` (a message echoing a megabyte of request
text would otherwise exceed the client's metadata limit). Handlers that stream by writing through
the context and return ``None`` (``grpc.health.v1.Health/Watch``) keep that form.

The engine reports queue depth, batch size and generated tokens through callbacks, and time to
first token on every finished sequence. ``--metrics-port`` serves them over HTTP for Prometheus.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import re
import time
import uuid

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
access_log = logging.getLogger("steer.access")
log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)

# Status details are cut to this many UTF-8 bytes. They travel percent-encoded in a trailer
# (up to 3 characters per byte), and clients refuse trailers beyond 8 KiB by default.
MAX_DETAILS_BYTES = 1024
UNKNOWN_METHOD = "unknown"  # metric label for methods this server does not have (names are client input)
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# A client's own deadline fires first and cancels the call; the server's copy of that deadline is
# later by the request's transit time. A cancel this close to the deadline counts as the deadline.
_DEADLINE_SLACK_SECONDS = 0.25


def cap_details(details: str | None, limit: int = MAX_DETAILS_BYTES) -> str:
    """``details`` if it fits in ``limit`` UTF-8 bytes, else its start and how much was cut."""
    if not details:
        return details or ""
    data = details.encode("utf-8", "replace")
    if len(data) <= limit:
        return details
    note = f" ... [{{}} of {len(data)} bytes cut]"
    keep = limit - len(note.format(len(data)))
    return data[:keep].decode("utf-8", "ignore") + note.format(len(data) - keep)


def request_id(client_value: str | None) -> str:
    """The client's request id when it is a short plain token (``[A-Za-z0-9._:-]{1,64}``), else a new one."""
    return client_value if client_value and _CLIENT_REQUEST_ID.fullmatch(client_value) else uuid.uuid4().hex[:16]


class Metrics:
    """Metrics of one server, in their own registry (several servers can live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("steer_requests", "RPCs by method and status code", ["method", "code"],
                                registry=self.registry)
        self.latency = Histogram("steer_request_seconds", "RPC wall time", ["method"], buckets=_LATENCY_BUCKETS,
                                 registry=self.registry)
        self.ttft = Histogram("steer_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("steer_queue_depth", "Requests waiting for a batch slot", registry=self.registry)
        self.batch_size = Gauge("steer_batch_size", "Sequences in the running batch", registry=self.registry)

    def watch_engine(self, engine) -> None:
        self.queue_depth.set_function(lambda: engine.stats()["waiting"])
        self.batch_size.set_function(lambda: engine.stats()["running"])

        class _Tokens:
            def collect(self):
                # A counter: rate(steer_generated_tokens_total[1m]) is the generation throughput.
                yield CounterMetricFamily("steer_generated_tokens", "Tokens generated", value=engine.generated_tokens)

        self.registry.register(_Tokens())
        engine.on_finish = lambda finished: self.ttft.observe(finished.time_to_first_token_seconds)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)


class _Undecodable(Exception):
    """The request bytes are not a valid message of the method's request type."""


class _Call:
    """One call's bookkeeping, and the context its handler sees.

    Attribute access falls through to grpc's context; ``abort`` records the call before grpc sends
    the status, ``set_details`` and ``abort`` cap the details, ``read`` decodes (reader-style
    streaming handlers get messages, not the raw bytes the interceptor asks grpc for).
    """

    def __init__(self, context, method: str, label: str, client_rid: str | None, metrics: Metrics | None, decode):
        self._context = context
        self._method = method
        self._label = label
        self._metrics = metrics
        self._decode = decode
        self._recorded = False
        self.rid = request_id(client_rid)
        request_id_var.set(self.rid)
        context.set_trailing_metadata((("x-request-id", self.rid),))
        self._started = time.perf_counter()
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining
        # Read the peer now: on a call the client has cancelled, context.peer() reaches into a
        # released core call and can crash the process.
        self._peer = context.peer()

    def __getattr__(self, name):
        return getattr(self._context, name)

    # -- the handler's view ---------------------------------------------------------------------

    def set_details(self, details: str) -> None:
        self._context.set_details(cap_details(details))

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        self.record(code)  # abort sends the status before it raises: count the call first
        await self._context.abort(code, cap_details(details), trailing_metadata)

    async def abort_with_status(self, status: grpc.Status):
        self.record(status.code)
        await self._context.abort_with_status(status)

    async def read(self):
        message = await self._context.read()
        return message if message is grpc.aio.EOF else self.decode(message)

    # -- the interceptor's side -----------------------------------------------------------------

    def decode(self, raw: bytes):
        try:
            return self._decode(raw)
        except Exception as e:  # protobuf's DecodeError, or anything a custom deserializer raises
            raise _Undecodable(
                f"request: {len(raw)} bytes that are not a valid {self._method} request message ({type(e).__name__})"
            ) from None

    def refuse(self, code: grpc.StatusCode, details: str) -> None:
        """End the call with ``code`` once the handler returns (recorded now, sent after)."""
        self._context.set_code(code)
        self._context.set_details(cap_details(details))
        self.record(code)

    def internal_error(self) -> None:
        log.exception("unexpected error in %s (request id %s)", self._method, self.rid)
        self.refuse(grpc.StatusCode.INTERNAL, f"internal error (request id {self.rid}); the server log has the details")

    def interrupted(self) -> None:
        """The handler was cancelled or closed mid-call: the client went away or the deadline passed."""
        late = self._deadline is not None and time.monotonic() >= self._deadline - _DEADLINE_SLACK_SECONDS
        self.record(grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED)

    def record(self, code=None) -> None:
        """Count and log the call once; ``code`` defaults to what the handler set (else OK)."""
        if self._recorded:
            return
        self._recorded = True
        if code is None:
            code = self._context.code()
        if code is None:
            code = grpc.StatusCode.OK
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        elapsed = time.perf_counter() - self._started
        if self._metrics is not None:
            self._metrics.requests.labels(self._label, name).inc()
            self._metrics.latency.labels(self._label).observe(elapsed)
        access_log.info(json.dumps({
            "request_id": self.rid, "method": self._method, "code": name, "seconds": round(elapsed, 4),
            "peer": self._peer,
        }))


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics | None):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if isinstance(method, bytes):
            method = method.decode("utf-8", "replace")
        method = method[:200]  # a client-chosen string when the method does not exist
        metadata = dict(handler_call_details.invocation_metadata or ())
        client_rid = metadata.get("x-request-id")
        if not isinstance(client_rid, str):
            client_rid = None
        if handler is None:
            return self._unknown_method(method, client_rid)
        deserialize = handler.request_deserializer or (lambda raw: raw)

        def begin(context) -> _Call:
            return _Call(context, method, method, client_rid, self.metrics, deserialize)

        behaviour = (handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream)
        streaming_requests = handler.request_streaming

        def call_inner(call: _Call, raw):
            request = _decoded_stream(call, raw) if streaming_requests else call.decode(raw)
            return behaviour(request, call)

        if not handler.response_streaming or inspect.iscoroutinefunction(behaviour):
            # One response, or a stream the handler writes through the context (health Watch).
            async def unary_response(raw, context):
                call = begin(context)
                try:
                    response = await call_inner(call, raw)
                except _Undecodable as e:
                    call.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                    return None
                except (asyncio.CancelledError, GeneratorExit):
                    call.interrupted()
                    raise
                except grpc.aio.AbortError:  # abort() already recorded the call and sent the status
                    raise
                except Exception:
                    call.internal_error()
                    return None
                call.record()
                return response

            wrapped = unary_response
        else:

            async def stream_response(raw, context):
                call = begin(context)
                responses = None
                try:
                    responses = call_inner(call, raw)
                    async for item in responses:
                        yield item
                except _Undecodable as e:
                    call.refuse(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                    return
                except (asyncio.CancelledError, GeneratorExit):
                    # GeneratorExit: grpc closed this generator while it waited at a yield (the
                    # client cancelled between two messages).
                    call.interrupted()
                    raise
                except grpc.aio.AbortError:
                    raise
                except Exception:
                    call.internal_error()
                    return
                finally:
                    if responses is not None and hasattr(responses, "aclose"):
                        await responses.aclose()  # the handler's own cleanup runs now, not at GC
                call.record()

            wrapped = stream_response
        return _handler(handler.request_streaming, handler.response_streaming, wrapped, handler.response_serializer)

    def _unknown_method(self, method: str, client_rid: str | None) -> grpc.RpcMethodHandler:
        metrics = self.metrics

        async def unknown(requests, context):
            call = _Call(context, method, UNKNOWN_METHOD, client_rid, metrics, lambda raw: raw)
            call.refuse(grpc.StatusCode.UNIMPLEMENTED, f"method {method} is not served here (see server reflection)")
            return
            yield  # pragma: no cover  (an async generator; the wire format is the same for every cardinality)

        return grpc.stream_stream_rpc_method_handler(unknown)


async def _decoded_stream(call: _Call, raw_requests):
    async for raw in raw_requests:
        yield call.decode(raw)


def _handler(request_streaming: bool, response_streaming: bool, behaviour,
             response_serializer) -> grpc.RpcMethodHandler:
    """A handler of the given cardinality that receives raw request bytes (decoded by the wrapper)."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(request_streaming, response_streaming)]
    return make(behaviour, request_deserializer=None, response_serializer=response_serializer)
