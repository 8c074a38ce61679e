"""Prometheus metrics and structured request logs.

One interceptor gives every call a request id (the client's ``x-request-id`` metadata, else a new
one; returned in trailing metadata), times it, records ``steer_requests_total{method,code}`` and
``steer_request_seconds``, and logs one JSON line per call. The engine reports queue depth,
batch size and generated tokens through callbacks, and time to first token on every finished
sequence. ``--metrics-port`` serves them over HTTP for Prometheus.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
import uuid

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
access_log = logging.getLogger("steer.access")

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Metrics of one server, in their own registry (several servers can live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("steer_requests", "RPCs by method and status code", ["method", "code"], registry=self.registry)
        self.latency = Histogram("steer_request_seconds", "RPC wall time", ["method"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("steer_time_to_first_token_seconds", "Arrival to first generated token", buckets=_LATENCY_BUCKETS, registry=self.registry)
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


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics | None):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        client_rid = metadata.get("x-request-id")

        def begin(context):
            rid = client_rid or uuid.uuid4().hex[:16]
            request_id_var.set(rid)
            context.set_trailing_metadata((("x-request-id", rid),))
            # Read the peer now: on a call the client has cancelled, context.peer() reaches into a
            # released core call and can crash the process.
            return rid, time.perf_counter(), context.peer()

        def end(context, rid, started, peer, error=None):
            code = context.code()
            if code is None:
                if error is None:
                    code = grpc.StatusCode.OK
                else:
                    code = grpc.StatusCode.CANCELLED if isinstance(error, asyncio.CancelledError) else grpc.StatusCode.UNKNOWN
            elapsed = time.perf_counter() - started
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            if self.metrics is not None:
                self.metrics.requests.labels(method, name).inc()
                self.metrics.latency.labels(method).observe(elapsed)
            access_log.info(json.dumps({"request_id": rid, "method": method, "code": name, "seconds": round(elapsed, 4), "peer": peer}))

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                rid, started, peer = begin(context)
                try:
                    response = await inner(request, context)
                except BaseException as e:
                    end(context, rid, started, peer, e)
                    raise
                end(context, rid, started, peer)
                return response

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                rid, started, peer = begin(context)
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except BaseException as e:
                    end(context, rid, started, peer, e)
                    raise
                end(context, rid, started, peer)

            return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
        return handler  # streaming-request methods (reflection) pass through untouched
