"""Engine scheduling: deadlines, cancellation, admission limits (no gRPC in between)."""

import asyncio
import time

import grpc
import pytest

from steer.models import LoadedModel
from steer.sampling import SamplingParams
from steer.server.engine import Engine, EngineConfig, Finished, FinishReason, Overloaded, TextDelta
from steer.v1 import steer_pb2 as pb


class SlowModel:
    """Wraps a model so each forward takes at least ``delay`` seconds (makes timing tests deterministic)."""

    def __init__(self, model, delay):
        self._model, self._delay = model, delay

    def __call__(self, *args, **kwargs):
        time.sleep(self._delay)
        return self._model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.fixture(scope="module")
def slow_loaded(tiny_loaded):
    return LoadedModel(SlowModel(tiny_loaded.model, 0.02), tiny_loaded.tokenizer, "slow-tiny", None, tiny_loaded.context_length)


PROMPT = [1, 2, 3, 4]


async def collect(engine, params, deadline=None):
    events = [e async for e in engine.generate(PROMPT, params, deadline)]
    assert isinstance(events[-1], Finished) and all(isinstance(e, TextDelta) for e in events[:-1])
    return events


def test_deadline_ends_with_time_limit(slow_loaded):
    async def main():
        engine = Engine(slow_loaded, EngineConfig())
        try:
            events = await collect(engine, SamplingParams(max_new_tokens=60, seed=0), time.monotonic() + 0.2)
        finally:
            engine.close()
        fin = events[-1]
        assert fin.finish_reason == FinishReason.TIME_LIMIT
        assert 0 < fin.completion_tokens < 60
        assert "".join(e.text for e in events[:-1]) == fin.text

    asyncio.run(main())


def test_leaving_the_stream_cancels_and_frees_the_slot(slow_loaded):
    async def main():
        engine = Engine(slow_loaded, EngineConfig(max_concurrent=1, max_queue=0))
        try:
            stream = engine.generate(PROMPT, SamplingParams(max_new_tokens=500, seed=0))
            await stream.__anext__()
            with pytest.raises(Overloaded):  # the only slot is taken and nothing may wait
                await collect(engine, SamplingParams(max_new_tokens=3, seed=0))
            await stream.aclose()  # what a cancelled gRPC call does to the handler
            for _ in range(500):  # the sequence leaves at its next step
                if engine.stats()["running"] == 0:
                    break
                await asyncio.sleep(0.01)
            assert engine.stats() == {"waiting": 0, "running": 0}
            events = await collect(engine, SamplingParams(max_new_tokens=3, seed=0))
            assert events[-1].completion_tokens == 3
            assert engine.generated_tokens < 500  # the cancelled one really stopped early
        finally:
            engine.close()

    asyncio.run(main())


def test_queue_overflow_is_rejected_while_admitted_requests_complete(slow_loaded):
    async def main():
        engine = Engine(slow_loaded, EngineConfig(max_queue=2, max_concurrent=1))
        try:
            params = SamplingParams(max_new_tokens=5, seed=0)
            running = asyncio.create_task(collect(engine, params))
            await asyncio.sleep(0.1)  # first request is running, queue is empty
            waiting = [asyncio.create_task(collect(engine, params)) for _ in range(2)]
            await asyncio.sleep(0.01)
            with pytest.raises(Overloaded, match="max_queue=2"):
                await collect(engine, params)
            done = await asyncio.gather(running, *waiting)
            assert [d[-1].completion_tokens for d in done] == [5, 5, 5]
        finally:
            engine.close()

    asyncio.run(main())


def test_stream_sees_time_limit_before_the_call_deadline(start_tiny_server, slow_loaded):
    """Over gRPC, a stream whose deadline passes ends with a TIME_LIMIT chunk, then the server serves on."""
    from steer.server.app import ServerConfig

    server = start_tiny_server(ServerConfig(port=0), loaded=slow_loaded)
    with grpc.insecure_channel(server.target) as channel:
        from steer.v1 import steer_pb2_grpc

        stub = steer_pb2_grpc.SteerStub(channel)
        req = pb.GenerateRequest(prompt="hi", weights={"helpfulness": 1}, sampling=pb.SamplingParams(max_new_tokens=200, seed=1))
        chunks = list(stub.GenerateStream(req, timeout=3.0))  # 200 slow steps take >= 4 s
        assert chunks[-1].finish_reason == pb.FINISH_REASON_TIME_LIMIT
        assert 0 < chunks[-1].usage.completion_tokens < 200
        ok = stub.Generate(pb.GenerateRequest(prompt="hi", weights={"helpfulness": 1}, sampling=pb.SamplingParams(max_new_tokens=2)), timeout=30)
        assert ok.usage.completion_tokens == 2
