"""Bearer-token auth, TLS, Prometheus metrics and request ids over a real server."""

import json
import logging
import shutil
import socket
import subprocess
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from steer.v1 import steer_pb2 as pb
from steer.v1 import steer_pb2_grpc

TOKEN = "s3cret-token"
GEN = pb.GenerateRequest(prompt="hi", weights={"helpfulness": 1}, sampling=pb.SamplingParams(max_new_tokens=2, seed=0))


@pytest.fixture(scope="module")
def auth_server(start_tiny_server):
    from steer.server.app import ServerConfig

    return start_tiny_server(ServerConfig(port=0, auth_token=TOKEN))


@pytest.mark.parametrize("metadata, message", [
    ((), "missing authorization metadata"),
    ((("authorization", "Bearer wrong"),), "invalid bearer token"),
    ((("authorization", TOKEN),), "invalid bearer token"),  # scheme missing
])
def test_missing_or_wrong_token_is_unauthenticated(auth_server, metadata, message):
    with grpc.insecure_channel(auth_server.target) as channel:
        stub = steer_pb2_grpc.SteerStub(channel)
        for call in (lambda: stub.Generate(GEN, timeout=10, metadata=metadata),
                     lambda: list(stub.GenerateStream(GEN, timeout=10, metadata=metadata)),
                     lambda: stub.Describe(pb.DescribeRequest(), timeout=10, metadata=metadata)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert message in e.value.details()


def test_right_token_passes_and_health_stays_open(auth_server):
    with grpc.insecure_channel(auth_server.target) as channel:
        stub = steer_pb2_grpc.SteerStub(channel)
        reply = stub.Generate(GEN, timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert reply.usage.completion_tokens == 2
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_token_file_validation(tmp_path):
    from steer.server.security import read_token_file

    (tmp_path / "t").write_text("  abc \n")
    assert read_token_file(tmp_path / "t") == "abc"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token_file(tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot read"):
        read_token_file(tmp_path / "missing")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_tls(start_tiny_server, tmp_path):
    from steer.server.app import ServerConfig

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = start_tiny_server(ServerConfig(port=0, tls_cert=str(cert), tls_key=str(key)))
    creds = grpc.ssl_channel_credentials(cert.read_bytes())
    with grpc.secure_channel(server.target, creds) as channel:
        assert steer_pb2_grpc.SteerStub(channel).Generate(GEN, timeout=30).usage.completion_tokens == 2
    with grpc.insecure_channel(server.target) as channel:  # plaintext to a TLS port fails
        with pytest.raises(grpc.RpcError) as e:
            steer_pb2_grpc.SteerStub(channel).Generate(GEN, timeout=5)
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_tls_config_needs_both_files(tmp_path):
    from steer.server.app import ServerConfig

    with pytest.raises(ValueError, match="go together"):
        ServerConfig(tls_cert=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="no such file"):
        ServerConfig(tls_cert=str(tmp_path / "c"), tls_key=str(tmp_path / "k"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_and_request_ids(start_tiny_server):
    from steer.server.app import ServerConfig

    port = free_port()
    server = start_tiny_server(ServerConfig(port=0, metrics_port=port))
    with grpc.insecure_channel(server.target) as channel:
        stub = steer_pb2_grpc.SteerStub(channel)
        reply, call = stub.Generate.with_call(GEN, timeout=30, metadata=(("x-request-id", "abc123"),))
        assert ("x-request-id", "abc123") in tuple(call.trailing_metadata())
        _, call = stub.Generate.with_call(GEN, timeout=30)
        assert dict(call.trailing_metadata())["x-request-id"]  # generated when the client sends none
        with pytest.raises(grpc.RpcError):
            stub.Generate(pb.GenerateRequest(prompt="hi", weights={"x": 1}), timeout=10)
    # Read at once: the servicer sets the status and returns, so the interceptor counted the call
    # before the client could see its status.
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'steer_requests_total{code="OK",method="/steer.v1.Steer/Generate"} 2.0' in text
    assert 'steer_requests_total{code="INVALID_ARGUMENT",method="/steer.v1.Steer/Generate"} 1.0' in text
    assert "steer_generated_tokens_total 4.0" in text
    assert "steer_time_to_first_token_seconds_count 2.0" in text
    assert "steer_queue_depth 0.0" in text and "steer_batch_size 0.0" in text


def requests_total(server, method: str, code: str) -> float:
    return server.running.metrics.registry.get_sample_value(
        "steer_requests_total", {"method": method, "code": code}) or 0.0


def wait_for(condition, seconds: float = 20):
    """Poll ``condition`` until true (for what the server learns asynchronously: a client's cancel)."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_every_refusal_is_counted_before_the_client_sees_its_status(auth_server):
    """Servicer refusals, abort() from the health service and the auth interceptor: each call is in
    the metrics the moment the client has its status (no polling)."""
    bearer = (("authorization", f"Bearer {TOKEN}"),)
    cases = [
        ("/steer.v1.Steer/Generate", "INVALID_ARGUMENT", grpc.StatusCode.INVALID_ARGUMENT,
         lambda ch: steer_pb2_grpc.SteerStub(ch).Generate(pb.GenerateRequest(prompt="hi", weights={"x": 1}),
                                                          timeout=10, metadata=bearer)),
        ("/grpc.health.v1.Health/Check", "NOT_FOUND", grpc.StatusCode.NOT_FOUND,
         lambda ch: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)),
        ("/steer.v1.Steer/Describe", "UNAUTHENTICATED", grpc.StatusCode.UNAUTHENTICATED,
         lambda ch: steer_pb2_grpc.SteerStub(ch).Describe(pb.DescribeRequest(), timeout=10)),
    ]
    with grpc.insecure_channel(auth_server.target) as channel:
        for method, label, code, call in cases:
            before = requests_total(auth_server, method, label)
            for i in range(1, 31):
                with pytest.raises(grpc.RpcError) as e:
                    call(channel)
                assert e.value.code() == code
                assert requests_total(auth_server, method, label) == before + i, (method, i)


UNDECODABLE = [
    b"\xff",  # a field tag that never ends
    b"\x0a\x05ab",  # field 1 says 5 bytes, 2 follow
    # field 1 is not UTF-8 (a string field in every request below but DescribeRequest, which skips it)
    b"\x0a\x02\xc3\x28",
]


@pytest.mark.parametrize("payload", UNDECODABLE)
def test_undecodable_request_bytes_are_invalid_argument_with_a_log_line_and_metric(tiny_server, caplog, payload):
    caplog.set_level(logging.INFO, logger="steer.access")
    methods = {"/steer.v1.Steer/Generate": "unary", "/steer.v1.Steer/Score": "unary",
               "/steer.v1.Steer/Describe": "unary", "/grpc.health.v1.Health/Check": "unary",
               "/steer.v1.Steer/GenerateStream": "stream", "/grpc.health.v1.Health/Watch": "stream",
               "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "bidi"}
    with grpc.insecure_channel(tiny_server.target) as channel:
        for method, kind in methods.items():
            if method.endswith("/Describe") and payload == UNDECODABLE[2]:
                continue  # DescribeRequest has no field 1: an unknown field is skipped, as protobuf must
            before = requests_total(tiny_server, method, "INVALID_ARGUMENT")
            with pytest.raises(grpc.RpcError) as e:
                if kind == "unary":
                    channel.unary_unary(method)(payload, timeout=10)  # no serializers: the bytes go as they are
                elif kind == "stream":
                    list(channel.unary_stream(method)(payload, timeout=10))
                else:
                    list(channel.stream_stream(method)(iter([payload]), timeout=10))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, e.value.details())
            assert "not a valid" in e.value.details() and method in e.value.details()
            assert requests_total(tiny_server, method, "INVALID_ARGUMENT") == before + 1
            lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "steer.access"]
            assert lines and lines[-1]["method"] == method and lines[-1]["code"] == "INVALID_ARGUMENT"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # a refusal, not a traceback


def test_unexpected_error_is_internal_with_the_request_id(start_tiny_server, monkeypatch, caplog):
    server = start_tiny_server()

    async def broken_generate(*args, **kwargs):
        raise RuntimeError("something nobody planned for")
        yield  # pragma: no cover

    monkeypatch.setattr(server.running.engine, "generate", broken_generate)
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(server.target) as channel:
        stub = steer_pb2_grpc.SteerStub(channel)
        for rpc in (stub.Generate, stub.GenerateStream):
            with pytest.raises(grpc.RpcError) as e:
                reply = rpc(GEN, timeout=30, metadata=(("x-request-id", "req-42"),))
                list(reply) if rpc is stub.GenerateStream else None
            assert e.value.code() == grpc.StatusCode.INTERNAL
            assert "request id req-42" in e.value.details()
            assert "something nobody planned for" not in e.value.details()  # internals stay in the log
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all("req-42" in r.getMessage() and r.exc_info for r in errors)
    for method in ("/steer.v1.Steer/Generate", "/steer.v1.Steer/GenerateStream"):
        assert requests_total(server, method, "INTERNAL") == 1
        assert requests_total(server, method, "UNKNOWN") == 0


def test_unknown_method_is_unimplemented_and_counted_under_one_label(tiny_server):
    with grpc.insecure_channel(tiny_server.target) as channel:
        before = requests_total(tiny_server, "unknown", "UNIMPLEMENTED")
        for name in ("/steer.v1.Steer/Nope", "/x.Y/Z"):
            with pytest.raises(grpc.RpcError) as e:
                channel.unary_unary(name)(b"", timeout=10)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and name in e.value.details()
    assert requests_total(tiny_server, "unknown", "UNIMPLEMENTED") == before + 2


def test_health_watch_streams_serving(tiny_server):
    with grpc.insecure_channel(tiny_server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="steer.v1.Steer"), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    wait_for(lambda: requests_total(tiny_server, "/grpc.health.v1.Health/Watch", "CANCELLED") >= 1)
    assert requests_total(tiny_server, "/grpc.health.v1.Health/Watch", "UNKNOWN") == 0


def test_cancelled_streams_count_as_cancelled(start_tiny_server, slow_tiny_loaded):
    """Cancel at different moments (right after the first chunk, a few chunks in): never UNKNOWN."""
    server = start_tiny_server(loaded=slow_tiny_loaded(0.01))
    method = "/steer.v1.Steer/GenerateStream"
    request = pb.GenerateRequest(prompt="hi", weights={"helpfulness": 1},
                                 sampling=pb.SamplingParams(max_new_tokens=400, seed=0))
    with grpc.insecure_channel(server.target) as channel:
        stub = steer_pb2_grpc.SteerStub(channel)
        for i in range(12):
            call = stub.GenerateStream(request, timeout=60)
            for _ in range(1 + i % 4):
                next(call)
            call.cancel()
    wait_for(lambda: requests_total(server, method, "CANCELLED") == 12)
    assert requests_total(server, method, "UNKNOWN") == 0 and requests_total(server, method, "OK") == 0


def test_error_details_are_capped(tiny_server):
    from steer.server.observability import MAX_DETAILS_BYTES

    key = "k" * 1_000_000
    with grpc.insecure_channel(tiny_server.target) as channel:
        with pytest.raises(grpc.RpcError) as e:
            steer_pb2_grpc.SteerStub(channel).Generate(pb.GenerateRequest(prompt="hi", weights={key: 1}), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = e.value.details()
    assert details.startswith("weights[kkk") and len(details.encode()) <= MAX_DETAILS_BYTES
    assert "bytes cut]" in details


@pytest.mark.parametrize("text", ["short", "é" * 2000, "x" * 5000, "€" * 341 + "x"])
def test_cap_details(text):
    from steer.server.observability import MAX_DETAILS_BYTES, cap_details

    capped = cap_details(text)
    assert len(capped.encode()) <= MAX_DETAILS_BYTES
    if len(text.encode()) <= MAX_DETAILS_BYTES:
        assert capped == text
    else:
        head = capped.split(" ... [")[0]
        assert text.startswith(head) and len(head) > 100
        assert capped.endswith(f"of {len(text.encode())} bytes cut]")


class FakeContext:
    """What the interceptor reads of a grpc.aio context, for driving a wrapped handler by hand."""

    def __init__(self):
        self._code = None
        self.details = None

    def set_trailing_metadata(self, metadata):
        self.trailing = metadata

    def time_remaining(self):
        return None

    def peer(self):
        return "test"

    def code(self):
        return self._code

    def set_code(self, code):
        self._code = code

    def set_details(self, details):
        self.details = details


def test_a_stream_closed_between_messages_counts_as_cancelled():
    """grpc closes the handler's generator at a yield when the client cancels while the server is
    sending (the cancellation lands outside the generator): GeneratorExit, not an error."""
    import asyncio
    from types import SimpleNamespace

    from steer.server.observability import Metrics, ObservabilityInterceptor

    async def numbers(request, context):
        for i in range(10):
            yield i

    async def continuation(details):
        return grpc.unary_stream_rpc_method_handler(numbers)

    async def main():
        metrics = Metrics()
        details = SimpleNamespace(method="/t.T/Numbers", invocation_metadata=())
        handler = await ObservabilityInterceptor(metrics).intercept_service(continuation, details)
        stream = handler.unary_stream(b"", FakeContext())
        assert await stream.__anext__() == 0
        await stream.aclose()
        return metrics.registry.get_sample_value("steer_requests_total",
                                                 {"method": "/t.T/Numbers", "code": "CANCELLED"})

    assert asyncio.run(main()) == 1.0
