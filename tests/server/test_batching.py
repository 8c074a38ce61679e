"""Continuous batching: concurrent requests give what they give alone; limits and cancellation."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from steer.server.engine import Engine, EngineConfig, Finished

from steer.sampling import SamplingParams
from steer.v1 import steer_pb2 as pb
from steer.v1 import steer_pb2_grpc

PROMPTS = ["Tell me a joke.", "What is rain?", "List three fruits and explain each one in a sentence.", "Hi"]
WEIGHTS = [{"helpfulness": 1}, {"creativity": 0.6, "helpfulness": 0.4}, {"conciseness": 1}, {"creativity": 1}]


def requests():
    """Different prompts (different lengths), weights, seeds, temperatures and lengths."""
    out = []
    for i in range(12):
        sampling = pb.SamplingParams(max_new_tokens=6 + 3 * (i % 5), seed=100 + i)
        if i % 3 == 0:
            sampling.temperature = 0.0
        else:
            sampling.temperature = 0.8 + 0.1 * (i % 3)
            sampling.top_p = 0.9
        out.append(pb.GenerateRequest(prompt=PROMPTS[i % 4] * (1 + i % 3), weights=WEIGHTS[i % 4], sampling=sampling))
    return out


def test_concurrent_requests_match_sequential(stub):
    reqs = requests()
    alone = [stub.Generate(r, timeout=60) for r in reqs]
    with ThreadPoolExecutor(len(reqs)) as pool:
        together = list(pool.map(lambda r: stub.Generate(r, timeout=60), reqs))
    for a, b in zip(alone, together):
        assert (b.text, b.usage.completion_tokens, b.finish_reason) == (
            a.text, a.usage.completion_tokens, a.finish_reason)


def test_batched_engine_logprobs_match_single_sequence_forward(tiny_loaded):
    """Per-step logits of a sequence decoded inside a batch equal a plain full forward of it alone."""
    seen = {}

    class Recording(Engine):
        def _advance(self, seqs, logits):
            for s, row in zip(seqs, logits):
                seen.setdefault(tuple(s.job.prompt_ids), []).append(torch.log_softmax(row.float(), -1))
            super()._advance(seqs, logits)

    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [4, 4, 4, 4]]

    async def run():
        engine = Recording(tiny_loaded, EngineConfig(max_concurrent=4))
        try:
            async def one(ids, delay):
                await asyncio.sleep(delay)  # join a batch that is already running
                events = [e async for e in
                          engine.generate(ids, SamplingParams(max_new_tokens=8, temperature=1.0, seed=len(ids)))]
                return events[-1]

            return await asyncio.gather(*(one(p, 0.002 * i) for i, p in enumerate(prompts)))
        finally:
            engine.close()

    finished = asyncio.run(run())
    model = tiny_loaded.model
    for prompt, fin in zip(prompts, finished):
        assert isinstance(fin, Finished)
        ids = torch.tensor([prompt + list(fin.token_ids)])
        with torch.no_grad():
            ref = torch.log_softmax(model(ids).logits[0].float(), -1)  # (T, V)
        steps = seen[tuple(prompt)]
        assert len(steps) == len(fin.token_ids) == 8
        for t, step_logprobs in enumerate(steps):
            torch.testing.assert_close(step_logprobs, ref[len(prompt) - 1 + t], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def slow_server(start_tiny_server, slow_tiny_loaded):
    from steer.server.app import ServerConfig

    return start_tiny_server(ServerConfig(port=0, engine=EngineConfig(max_concurrent=2, max_queue=1)),
                             loaded=slow_tiny_loaded(0.03))


def gen(max_new_tokens):
    return pb.GenerateRequest(prompt="hi", weights={"helpfulness": 1},
                              sampling=pb.SamplingParams(max_new_tokens=max_new_tokens, seed=1))


def test_overflow_is_resource_exhausted_while_admitted_requests_complete(slow_server, wait_until):
    with grpc.insecure_channel(slow_server.target) as channel:
        stub = steer_pb2_grpc.SteerStub(channel)
        admitted = [stub.Generate.future(gen(20), timeout=60) for _ in range(3)]  # 2 running + 1 waiting
        wait_until(lambda: sum(slow_server.running.engine.stats().values()) == 3)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(gen(2), timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue=1" in e.value.details()
        assert [f.result().usage.completion_tokens for f in admitted] == [20, 20, 20]


def test_cancelled_stream_frees_its_slot(slow_server, wait_until):
    with grpc.insecure_channel(slow_server.target) as channel:
        stub = steer_pb2_grpc.SteerStub(channel)
        streams = [stub.GenerateStream(gen(200), timeout=60) for _ in range(3)]  # fills 2 slots + queue
        for s in streams[:2]:
            next(s)
        for s in streams:
            s.cancel()
        # The cancelled sequences leave the batch at their next step.
        wait_until(lambda: slow_server.running.engine.stats() == {"waiting": 0, "running": 0})
        reply = stub.Generate(gen(3), timeout=30)
        assert reply.usage.completion_tokens == 3
