"""The real default model end to end (slow: loads SmolLM2-135M and generates on CPU)."""

import pytest

from steer.v1 import steer_pb2 as pb

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_server(start_tiny_server):
    from steer.server.app import ServerConfig

    from steer.models import load_model

    return start_tiny_server(ServerConfig(port=0), loaded=load_model("default"))


def test_two_weight_mixes_give_text(default_server):
    import grpc

    from steer.v1 import steer_pb2_grpc

    with grpc.insecure_channel(default_server.target) as channel:
        stub = steer_pb2_grpc.SteerStub(channel)
        texts = []
        for weights in ({"helpfulness": 0.8, "creativity": 0.2}, {"creativity": 0.3, "conciseness": 0.7}):
            reply = stub.Generate(
                pb.GenerateRequest(prompt="What is the capital of France?", weights=weights,
                                   sampling=pb.SamplingParams(max_new_tokens=24, temperature=0.0)),
                timeout=300,
            )
            assert reply.text.strip()
            assert dict(reply.direction) == pytest.approx(
                {k: weights.get(k, 0.0) for k in ("helpfulness", "creativity", "conciseness")})
            texts.append(reply.text)
        assert any("Paris" in t for t in texts)
