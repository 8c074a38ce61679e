"""Shutdown: a drain window (health NOT_SERVING, calls still served), streams that end with their
final chunk, and a clean exit of ``python -m steer.serve`` on SIGTERM even when a model step
outlasts the grace period."""

import asyncio
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from steer.v1 import steer_pb2 as pb
from steer.v1 import steer_pb2_grpc

SHORT = pb.GenerateRequest(prompt="hi", weights={"helpfulness": 1},
                           sampling=pb.SamplingParams(max_new_tokens=2, seed=0))
LONG = pb.GenerateRequest(prompt="hi", weights={"helpfulness": 1},
                          sampling=pb.SamplingParams(max_new_tokens=400, seed=0))


def test_drain_then_streams_end_with_their_final_chunk(start_tiny_server, slow_tiny_loaded):
    server = start_tiny_server(loaded=slow_tiny_loaded(0.02))  # 400 tokens take >= 8 s: longer than drain + grace
    with grpc.insecure_channel(server.target) as channel, ThreadPoolExecutor(1) as pool:
        stub = steer_pb2_grpc.SteerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        stream = stub.GenerateStream(LONG, timeout=60)
        first = next(stream)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="steer.v1.Steer"), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

        stopping = asyncio.run_coroutine_threadsafe(server.running.stop(grace=1.5, drain=2.0), server.loop)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        # Draining: health says NOT_SERVING, and the listener still serves new calls.
        assert (health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert stub.Generate(SHORT, timeout=10).usage.completion_tokens == 2
        # The long stream is not cut off: it ends with a final chunk and status OK.
        rest = list(pool.submit(list, stream).result(30))
        assert stream.code() == grpc.StatusCode.OK
        final = rest[-1]
        assert final.finish_reason == pb.FINISH_REASON_CANCELLED
        assert 0 < final.usage.completion_tokens < 400 and first.direction
        assert stopping.result(30) is True  # the engine's worker stopped
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(SHORT, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


# Runs ``python -m steer.serve``'s main() with the tiny model, whose forwards hang for a minute
# when their input holds the token of " zebra" (a prefill that outlasts any grace period).
SERVE_SCRIPT = """
import dataclasses, sys, time
import steer.models as models

class Stalling:
    def __init__(self, model, magic):
        self._model, self._magic = model, magic
    def __call__(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and bool((ids == self._magic).any()):
            time.sleep(60)
        return self._model(*args, **kwargs)
    def __getattr__(self, name):
        return getattr(self._model, name)

def load_model(*args, **kwargs):
    loaded = models_load(*args, **kwargs)
    magic = loaded.tokenizer(" zebra", add_special_tokens=False)["input_ids"][0]
    return dataclasses.replace(loaded, model=Stalling(loaded.model, magic))

models_load, models.load_model = models.load_model, load_model
from steer.serve import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_drains_and_exits_0_while_a_model_step_hangs(tiny_model_dir, serve_process):
    from steer.server.app import ENGINE_STOP_SECONDS

    drain, grace = 1.5, 1.0
    proc, match, output = serve_process(
        ["-c", SERVE_SCRIPT, "--model", str(tiny_model_dir), "--adapter", "none", "--scorer", "none",
         "--port", "0", "--drain", str(drain), "--grace", str(grace), "--log-level", "WARNING"],
        r"steer: serving .* on 127\.0\.0\.1:(\d+)")
    target = f"127.0.0.1:{match.group(1)}"
    with grpc.insecure_channel(target) as channel:
        stub = steer_pb2_grpc.SteerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stuck = stub.GenerateStream(pb.GenerateRequest(prompt="a zebra", weights={"helpfulness": 1}), timeout=60)
        time.sleep(0.5)  # the prefill forward is under way (it hangs for a minute)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        assert stub.Describe(pb.DescribeRequest(), timeout=5).model_id  # still answering while draining
        with pytest.raises(grpc.RpcError) as e:
            list(stuck)
        assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    rc = proc.wait(timeout=drain + grace + ENGINE_STOP_SECONDS + 15)
    elapsed = time.monotonic() - sent
    rest = proc.stdout.read()
    assert rc == 0, "".join(output) + rest  # not -6 (SIGABRT)
    # Bounded by drain + grace + the engine's stop time (plus slack for a busy machine), not by the hung step.
    assert elapsed < drain + grace + ENGINE_STOP_SECONDS + 10, elapsed
    assert "still inside a model step" in rest
