"""Bearer-token auth, TLS, Prometheus metrics and request ids over a real server."""

import shutil
import subprocess
import time
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


def test_metrics_and_request_ids(start_tiny_server):
    import socket

    from steer.server.app import ServerConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_tiny_server(ServerConfig(port=0, metrics_port=port))
    with grpc.insecure_channel(server.target) as channel:
        stub = steer_pb2_grpc.SteerStub(channel)
        reply, call = stub.Generate.with_call(GEN, timeout=30, metadata=(("x-request-id", "abc123"),))
        assert ("x-request-id", "abc123") in tuple(call.trailing_metadata())
        _, call = stub.Generate.with_call(GEN, timeout=30)
        assert dict(call.trailing_metadata())["x-request-id"]  # generated when the client sends none
        with pytest.raises(grpc.RpcError):
            stub.Generate(pb.GenerateRequest(prompt="hi", weights={"x": 1}), timeout=10)
    # context.abort() sends the status to the client before the interceptor's bookkeeping runs, so
    # the failed call is counted a moment after the client sees it: read until it is (or 10 s pass).
    deadline = time.monotonic() + 10
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if 'code="INVALID_ARGUMENT"' in text or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert 'steer_requests_total{code="OK",method="/steer.v1.Steer/Generate"} 2.0' in text
    assert 'steer_requests_total{code="INVALID_ARGUMENT",method="/steer.v1.Steer/Generate"} 1.0' in text
    assert "steer_generated_tokens_total 4.0" in text
    assert "steer_time_to_first_token_seconds_count 2.0" in text
    assert "steer_queue_depth 0.0" in text and "steer_batch_size 0.0" in text
