"""Engine scheduling: deadlines, cancellation, admission limits (no gRPC in between)."""

import asyncio
import time

import grpc
import pytest
from steer.server.engine import Engine, EngineConfig, Finished, FinishReason, Overloaded, TextDelta

from steer.models import LoadedModel
from steer.sampling import SamplingParams
from steer.v1 import steer_pb2 as pb


@pytest.fixture(scope="module")
def slow_loaded(slow_tiny_loaded):
    return slow_tiny_loaded(0.02)


PROMPT = [1, 2, 3, 4]


async def collect(engine, params, deadline=None):
    events = [e async for e in engine.generate(PROMPT, params, deadline)]
    assert isinstance(events[-1], Finished) and all(isinstance(e, TextDelta) for e in events[:-1])
    return events


def run_engine(make_engine, body):
    """``await body(engine)`` in a new event loop, on the engine ``make_engine()`` makes there; closed afterwards."""
    async def main():
        engine = make_engine()
        try:
            return await body(engine)
        finally:
            engine.close()

    return asyncio.run(main())


def test_deadline_ends_with_time_limit(slow_loaded):
    async def body(engine):
        return await collect(engine, SamplingParams(max_new_tokens=60, seed=0), time.monotonic() + 0.2)

    events = run_engine(lambda: Engine(slow_loaded, EngineConfig()), body)
    fin = events[-1]
    assert fin.finish_reason == FinishReason.TIME_LIMIT
    assert 0 < fin.completion_tokens < 60
    assert "".join(e.text for e in events[:-1]) == fin.text


def test_leaving_the_stream_cancels_and_frees_the_slot(slow_loaded):
    async def body(engine):
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

    run_engine(lambda: Engine(slow_loaded, EngineConfig(max_concurrent=1, max_queue=0)), body)


def test_queue_overflow_is_rejected_while_admitted_requests_complete(slow_loaded):
    async def body(engine):
        params = SamplingParams(max_new_tokens=5, seed=0)
        running = asyncio.create_task(collect(engine, params))
        await asyncio.sleep(0.1)  # first request is running, queue is empty
        waiting = [asyncio.create_task(collect(engine, params)) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="max_queue=2"):
            await collect(engine, params)
        done = await asyncio.gather(running, *waiting)
        assert [d[-1].completion_tokens for d in done] == [5, 5, 5]

    run_engine(lambda: Engine(slow_loaded, EngineConfig(max_queue=2, max_concurrent=1)), body)


def test_a_request_cancelled_while_waiting_gives_its_queue_place_back_at_once(slow_loaded):
    async def body(engine):
        long = engine.generate(PROMPT, SamplingParams(max_new_tokens=500, seed=0))
        await long.__anext__()  # running: it holds the only slot for seconds
        queued = asyncio.create_task(collect(engine, SamplingParams(max_new_tokens=3, seed=0)))
        await asyncio.sleep(0.05)
        assert engine.stats() == {"waiting": 1, "running": 1}
        with pytest.raises(Overloaded, match="1 waiting"):  # the queue's one place is taken
            await collect(engine, SamplingParams(max_new_tokens=3, seed=0))
        queued.cancel()  # its caller leaves before it ever started
        with pytest.raises(asyncio.CancelledError):
            await queued
        # Gone from the queue now, not when the worker would have popped it (after the long one).
        assert engine.stats() == {"waiting": 0, "running": 1}
        replacement = asyncio.create_task(collect(engine, SamplingParams(max_new_tokens=3, seed=0)))
        await asyncio.sleep(0.05)
        assert not replacement.done() and engine.stats() == {"waiting": 1, "running": 1}  # admitted, waiting
        await long.aclose()
        assert (await replacement)[-1].completion_tokens == 3

    run_engine(lambda: Engine(slow_loaded, EngineConfig(max_concurrent=1, max_queue=1)), body)


def test_close_says_whether_the_worker_stopped(slow_tiny_loaded):
    async def main():
        idle = Engine(slow_tiny_loaded(0.0), EngineConfig())
        assert idle.close(timeout=5) is True

        engine = Engine(slow_tiny_loaded(1.0), EngineConfig())  # every forward takes a second
        stream = engine.generate(PROMPT, SamplingParams(max_new_tokens=50, seed=0))
        first = asyncio.create_task(stream.__anext__())
        await asyncio.sleep(0.3)  # the worker is inside the prefill forward
        started = time.monotonic()
        assert engine.close(timeout=0.1) is False  # still inside the model call
        assert time.monotonic() - started < 0.5  # the timeout bounds the wait
        assert engine.close(timeout=10) is True  # it stops once that call returns
        events = [await first] + [e async for e in stream]
        assert events[-1].finish_reason == FinishReason.CANCELLED
        assert engine.stats() == {"waiting": 0, "running": 0} and engine.cache.blocks_in_use == 0

    asyncio.run(main())


def test_stream_sees_time_limit_before_the_call_deadline(start_tiny_server, slow_loaded):
    """Over gRPC, a stream whose deadline passes ends with a TIME_LIMIT chunk, then the server serves on."""
    from steer.server.app import ServerConfig

    server = start_tiny_server(ServerConfig(port=0), loaded=slow_loaded)
    with grpc.insecure_channel(server.target) as channel:
        from steer.v1 import steer_pb2_grpc

        stub = steer_pb2_grpc.SteerStub(channel)
        req = pb.GenerateRequest(prompt="hi", weights={"helpfulness": 1},
                                 sampling=pb.SamplingParams(max_new_tokens=200, seed=1))
        chunks = list(stub.GenerateStream(req, timeout=3.0))  # 200 slow steps take >= 4 s
        assert chunks[-1].finish_reason == pb.FINISH_REASON_TIME_LIMIT
        assert 0 < chunks[-1].usage.completion_tokens < 200
        ok = stub.Generate(pb.GenerateRequest(prompt="hi", weights={"helpfulness": 1},
                                              sampling=pb.SamplingParams(max_new_tokens=2)), timeout=30)
        assert ok.usage.completion_tokens == 2


# -- one request never fails another ---------------------------------------------------------------

import math  # noqa: E402
import threading  # noqa: E402

import steer.server.engine as engine_module  # noqa: E402
import torch  # noqa: E402
from steer.server.engine import SequenceFailed  # noqa: E402

from steer.sampling import StopStringDetokenizer  # noqa: E402


def token_ids(n, seed):
    """``n`` ordinary (non-special) token ids."""
    return torch.randint(300, 5000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def run_one(engine, prompt, params, deadline=None):
    """All events of one request, or the exception it ended with (as the last element)."""
    events = []
    try:
        async for event in engine.generate(prompt, params, deadline):
            events.append(event)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        events.append(exc)
    return events


def alone(loaded, prompt, params, config=EngineConfig()):
    """What a request gives on an engine of its own."""
    async def body(engine):
        return await run_one(engine, prompt, params)

    return run_engine(lambda: Engine(loaded, config), body)


def together(engine_factory, requests):
    async def body(engine):
        results = await asyncio.gather(*(run_one(engine, p, s) for p, s in requests))
        for _ in range(500):
            if engine.stats() == {"waiting": 0, "running": 0}:
                break
            await asyncio.sleep(0.01)
        return results, engine.stats(), engine.cache.blocks_in_use

    return run_engine(engine_factory, body)


NORMAL = [(token_ids(9, 1), SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=1)),
          (token_ids(4, 2), SamplingParams(max_new_tokens=8, temperature=1.2, top_k=20, seed=2)),
          (token_ids(17, 3), SamplingParams(max_new_tokens=8, temperature=0.0))]


def test_tiny_temperatures_do_not_fail_the_batch(tiny_loaded):
    """The issue's reproducer: 1e-38 with top-k/top-p and 1e-45 alone, beside three normal requests.
    All five finish; the normal ones give what they give alone, the tiny ones decode greedily."""
    bad = [(token_ids(6, 4), SamplingParams(max_new_tokens=8, temperature=1e-38, top_k=5, top_p=0.5, seed=4)),
           (token_ids(11, 5), SamplingParams(max_new_tokens=8, temperature=1e-45, seed=5))]
    results, stats, blocks = together(lambda: Engine(tiny_loaded, EngineConfig(max_concurrent=8)), NORMAL + bad)
    assert all(isinstance(r[-1], Finished) for r in results), [r[-1] for r in results]
    for (prompt, params), got in zip(NORMAL, results):
        assert got[-1].token_ids == alone(tiny_loaded, prompt, params)[-1].token_ids
    for (prompt, params), got in zip(bad, results[len(NORMAL):]):
        greedy = alone(tiny_loaded, prompt, SamplingParams(max_new_tokens=8, temperature=0.0))[-1]
        assert got[-1].token_ids == greedy.token_ids and len(greedy.token_ids) > 0
    assert stats == {"waiting": 0, "running": 0} and blocks == 0


POISON_SEED = 666


def test_a_sequence_whose_sampling_raises_fails_alone(tiny_loaded, monkeypatch):
    """Whatever makes sampling raise for one row (here the issue's old IndexError, injected), only
    that request fails, with a message naming the problem; the batch goes on unchanged."""
    expected = [alone(tiny_loaded, p, s)[-1].token_ids for p, s in NORMAL]
    real = engine_module.sample_tokens

    def sample_tokens(logits, params, generators):
        if any(p.seed == POISON_SEED for p in params):
            raise IndexError("index -1 is out of bounds for dimension 1 with size 256")
        return real(logits, params, generators)

    monkeypatch.setattr(engine_module, "sample_tokens", sample_tokens)
    poisoned = (token_ids(7, 6), SamplingParams(max_new_tokens=8, temperature=1.0, seed=POISON_SEED))
    results, stats, blocks = together(lambda: Engine(tiny_loaded, EngineConfig()), [NORMAL[0], poisoned, *NORMAL[1:]])
    failure = results[1][-1]
    assert isinstance(failure, SequenceFailed)
    assert "sampling" in str(failure) and "index -1 is out of bounds" in str(failure)
    assert [r[-1].token_ids for r in (results[0], *results[2:])] == expected
    assert stats == {"waiting": 0, "running": 0} and blocks == 0


def test_a_sequence_whose_detokenizer_raises_fails_alone(tiny_loaded, monkeypatch):
    expected = [alone(tiny_loaded, p, s)[-1].token_ids for p, s in NORMAL]
    real = StopStringDetokenizer.push

    def push(self, token_id):
        if self.stop == ("POISON",) and len(self.ids) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return real(self, token_id)

    monkeypatch.setattr(StopStringDetokenizer, "push", push)
    poisoned = (token_ids(5, 7), SamplingParams(max_new_tokens=8, temperature=0.0, stop=("POISON",)))
    results, stats, blocks = together(lambda: Engine(tiny_loaded, EngineConfig()), [poisoned, *NORMAL])
    failure = results[0][-1]
    assert (isinstance(failure, SequenceFailed) and "detokenizing" in str(failure)
            and "UnicodeDecodeError" in str(failure))
    assert [r[-1].token_ids for r in results[1:]] == expected
    assert stats == {"waiting": 0, "running": 0} and blocks == 0


class PoisonedModel:
    """Wraps a model: its forward raises whenever its input holds ``token`` (a broken prompt); logs its calls."""

    def __init__(self, model, token):
        self._model, self._token = model, token
        self.calls = []

    def __call__(self, *args, **kwargs):
        if bool((kwargs["input_ids"] == self._token).any()):
            self.calls.append("raised")
            raise RuntimeError("the model cannot read this prompt")
        self.calls.append("decode" if kwargs["input_ids"].shape[1] == 1 else "prefill")
        return self._model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_a_failed_prefill_forward_fails_only_its_sequences(tiny_loaded, slow_tiny_loaded):
    bad_token = 4999
    model = PoisonedModel(slow_tiny_loaded(0.01).model, bad_token)  # forwards that get through take >= 10 ms
    loaded = LoadedModel(model, tiny_loaded.tokenizer, "poisoned", None, tiny_loaded.context_length)
    prompt, params = token_ids(9, 1), SamplingParams(max_new_tokens=30, temperature=0.9, seed=1)
    expected = alone(tiny_loaded, prompt, params)[-1]

    async def body(engine):
        first = asyncio.create_task(run_one(engine, prompt, params))
        while engine.generated_tokens < 2:  # the first request is decoding
            await asyncio.sleep(0.005)
        broken = await run_one(engine, [5, 6, bad_token, 7], SamplingParams(max_new_tokens=4))
        return await first, broken

    first, broken = run_engine(lambda: Engine(loaded, EngineConfig()), body)
    assert (isinstance(broken[-1], SequenceFailed) and "prefill" in str(broken[-1])
            and "cannot read this prompt" in str(broken[-1]))
    assert first[-1].token_ids == expected.token_ids and len(expected.token_ids) == 30
    assert "decode" in model.calls[model.calls.index("raised"):]  # the first request kept decoding after it


# -- chunked prefill -------------------------------------------------------------------------------

class Recording(Engine):
    """Logs each prefill chunk and sampled token in order; can pause the worker (between two forwards,
    as a slow forward would) after the first prefill chunk of a prompt of ``pause_at`` tokens or more."""

    def __init__(self, loaded, config, pause_at=None):
        self.log = []
        self.logits = {}
        self.pause_at = pause_at
        self.paused, self.go = threading.Event(), threading.Event()
        super().__init__(loaded, config)

    def _prefill(self, chunks):
        budget = self.max_prefill_tokens
        assert len(chunks) * max(c for _, c in chunks) <= budget  # padded tokens of this forward
        super()._prefill(chunks)
        for seq, count in chunks:
            self.log.append(("prefill", len(seq.job.prompt_ids), count))
        if (self.pause_at and not self.paused.is_set()
                and any(len(s.job.prompt_ids) >= self.pause_at for s, _ in chunks)):
            self.paused.set()
            assert self.go.wait(30)

    def _advance(self, seqs, logits):
        for seq, row in zip(seqs, logits):
            self.log.append(("token", len(seq.job.prompt_ids)))
            self.logits.setdefault(tuple(seq.job.prompt_ids), []).append(row.clone())
        super()._advance(seqs, logits)


def test_chunked_prefill_matches_one_shot_and_hf_generate(tiny_loaded, tokenizer):
    """Prompts prefilled in chunks of 7 or 64 tokens (several prompts per forward, chunks of one
    prompt across iterations) give the logits and greedy tokens of a one-shot prefill, and the tokens
    of transformers' own generate()."""
    prompts = [token_ids(150, 11), token_ids(37, 12), token_ids(5, 13), token_ids(64, 14)]
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    runs = {}
    for budget in (4096, 64, 7):
        async def body(engine):
            results = await asyncio.gather(*(run_one(engine, p, greedy) for p in prompts))
            return results, engine.logits, engine.prefill_forwards

        runs[budget] = run_engine(lambda: Recording(tiny_loaded, EngineConfig(max_prefill_tokens=budget)), body)
    one_shot, one_shot_logits, one_shot_forwards = runs[4096]
    assert one_shot_forwards == 1
    for budget in (64, 7):
        results, logits, forwards = runs[budget]
        assert forwards >= math.ceil(max(map(len, prompts)) / budget)  # the longest prompt really was chunked
        for prompt, a, b in zip(prompts, one_shot, results):
            assert b[-1].token_ids == a[-1].token_ids
            torch.testing.assert_close(torch.stack(logits[tuple(prompt)]), torch.stack(one_shot_logits[tuple(prompt)]),
                                       atol=1e-4, rtol=1e-4)
    for prompt, result in zip(prompts, one_shot):
        with torch.no_grad():
            out = tiny_loaded.model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        hf = [t for t in out[0, len(prompt):].tolist() if t not in tiny_loaded.eos_token_ids]
        assert list(result[-1].token_ids) == hf


LONG = 300


def test_short_request_streams_while_a_long_prompt_is_prefilled(tiny_loaded):
    """A 4-token request sent while a 300-token prompt is being prefilled in 32-token chunks gets all
    its tokens before that prefill ends (ordering of forwards, not wall-clock time)."""
    long_prompt, short_prompt = token_ids(LONG, 21), token_ids(4, 22)

    async def main():
        engine = Recording(tiny_loaded, EngineConfig(max_prefill_tokens=32), pause_at=LONG)
        try:
            long_task = asyncio.create_task(run_one(engine, long_prompt,
                                                    SamplingParams(max_new_tokens=2, temperature=0.0)))
            assert await asyncio.to_thread(engine.paused.wait, 30)  # the first chunk of the long prompt is in
            short_task = asyncio.create_task(run_one(engine, short_prompt,
                                                     SamplingParams(max_new_tokens=3, temperature=0.0)))
            while engine.stats()["waiting"] < 1:
                await asyncio.sleep(0.001)
            engine.go.set()
            return await long_task, await short_task, engine.log
        finally:
            engine.go.set()
            engine.close()

    long_events, short_events, log = asyncio.run(main())
    assert long_events[-1].completion_tokens == 2 and short_events[-1].completion_tokens == 3
    long_chunks = [i for i, e in enumerate(log) if e[:2] == ("prefill", LONG)]
    short_tokens = [i for i, e in enumerate(log) if e == ("token", 4)]
    assert sum(log[i][2] for i in long_chunks) == LONG and len(long_chunks) >= LONG // 32
    assert len(short_tokens) == 3 and short_tokens[-1] < long_chunks[-1]
    assert sum(1 for i in long_chunks if i > short_tokens[-1]) >= 5  # most of the long prefill was still to come


def test_cancel_during_a_long_prefill_frees_the_slot_at_once(tiny_loaded):
    long_prompt = token_ids(LONG, 31)

    async def main():
        engine = Recording(tiny_loaded, EngineConfig(max_prefill_tokens=16, max_concurrent=1, max_queue=0),
                           pause_at=LONG)
        try:
            call = asyncio.create_task(run_one(engine, long_prompt, SamplingParams(max_new_tokens=5)))
            assert await asyncio.to_thread(engine.paused.wait, 30)
            assert engine.cache.blocks_in_use == 1  # 16 prompt tokens are in
            call.cancel()  # what a cancelled gRPC call does to its handler task
            await asyncio.gather(call, return_exceptions=True)
            engine.go.set()
            while engine.stats()["running"]:
                await asyncio.sleep(0.001)
            freed = (engine.prefill_forwards, engine.cache.blocks_in_use, engine.cache.nbytes)
            after = await run_one(engine, [1, 2, 3], SamplingParams(max_new_tokens=3, temperature=0.0))
            return freed, after
        finally:
            engine.go.set()
            engine.close()

    (forwards, blocks, nbytes), after = asyncio.run(main())
    assert forwards == 1 and blocks == 0  # left before its second chunk of 19
    assert after[-1].completion_tokens == 3


def test_deadline_during_a_long_prefill_ends_it_before_the_next_chunk(tiny_loaded):
    long_prompt = token_ids(LONG, 32)

    async def main():
        engine = Recording(tiny_loaded, EngineConfig(max_prefill_tokens=16), pause_at=LONG)
        try:
            call = asyncio.create_task(run_one(engine, long_prompt, SamplingParams(max_new_tokens=5),
                                               deadline=time.monotonic() + 60))
            assert await asyncio.to_thread(engine.paused.wait, 30)
            engine._running[0].job.deadline = time.monotonic()  # the deadline passes during this chunk
            engine.go.set()
            return await call, engine.prefill_forwards, engine.cache.blocks_in_use
        finally:
            engine.go.set()
            engine.close()

    events, forwards, blocks = asyncio.run(main())
    fin = events[-1]
    assert fin.finish_reason == FinishReason.TIME_LIMIT and fin.completion_tokens == 0 and fin.text == ""
    assert forwards == 1 and blocks == 0


def test_cache_memory_follows_the_running_sequences(tiny_loaded):
    """Long prompts grow the cache by their own blocks (not every slot to the longest), and the
    cache returns to its initial size once they finish (tensor sizes, not RSS)."""
    seen = []

    class Watching(Engine):
        def _forward(self, *args):
            c = self.cache
            seen.append((c.nbytes, c.blocks_in_use, c.capacity_blocks))
            return super()._forward(*args)

    requests = [(token_ids(450, 40 + i), SamplingParams(max_new_tokens=30, temperature=0.0)) for i in range(3)]
    requests += [(token_ids(10, 50 + i), SamplingParams(max_new_tokens=4, temperature=0.0)) for i in range(3)]

    async def body(engine):
        initial = engine.cache.nbytes
        results = await asyncio.gather(*(run_one(engine, p, s) for p, s in requests))
        while engine.stats()["running"]:
            await asyncio.sleep(0.001)
        return initial, results, engine.cache

    initial, results, cache = run_engine(lambda: Watching(tiny_loaded, EngineConfig(max_prefill_tokens=128)), body)
    assert [r[-1].completion_tokens for r in results] == [s.max_new_tokens for _, s in requests]
    peak = max(nbytes for nbytes, _, _ in seen)
    assert peak > initial  # three 450-token prompts do not fit the initial pool
    assert cache.nbytes == initial and cache.blocks_in_use == 0
    block = cache.BLOCK
    running_bound = sum(math.ceil((len(p) + s.max_new_tokens) / block) for p, s in requests)
    assert max(used for _, used, _ in seen) <= running_bound  # not 6 slots x the longest
    assert all(capacity <= max(cache.initial_blocks, 4 * used + 1) for _, used, capacity in seen)


def test_prefill_budget_by_device():
    import torch
    from steer.server.engine import prefill_budget

    assert prefill_budget(EngineConfig(), torch.device("cpu")) == 256
    assert prefill_budget(EngineConfig(), torch.device("cuda")) == 2048
    assert prefill_budget(EngineConfig(max_prefill_tokens=64), torch.device("cpu")) == 64
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        EngineConfig(max_prefill_tokens=0)


def test_heap_is_trimmed_once_when_the_engine_goes_idle(slow_loaded, monkeypatch):
    """Freed memory is kept for reuse while the engine works; after work, the engine gives the heap's
    free pages back once it has nothing to run -- not between steps, and not again while it stays idle."""
    from steer import heap

    seen = []
    settings = []

    class FakeLibc:
        def malloc_trim(self, pad):
            seen.append((pad, engine.stats()))
            return 1

        def mallopt(self, param, value):
            settings.append(param)
            return 1

    monkeypatch.setattr("steer.server.engine.glibc", lambda: FakeLibc())

    async def main():
        await asyncio.gather(collect(engine, SamplingParams(max_new_tokens=5, seed=0)),
                             collect(engine, SamplingParams(max_new_tokens=9, seed=1)))
        for _ in range(500):
            if seen:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # idle: no second trim
        assert seen == [(0, {"waiting": 0, "running": 0})]
        await collect(engine, SamplingParams(max_new_tokens=3, seed=2))
        for _ in range(500):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(seen) == 2 and engine.heap_trims == 2

    engine = Engine(slow_loaded, EngineConfig())
    # While it works, freed step tensors stay in the heap (steer.heap.keep_freed_memory): both thresholds set.
    assert sorted(settings) == sorted([heap.M_MMAP_THRESHOLD, heap.M_TRIM_THRESHOLD])
    try:
        asyncio.run(main())
    finally:
        engine.close()


def test_close_ends_running_sequences_after_the_cache_grew(slow_loaded):
    """Shutdown with sequences running in a KV pool that grew (tensors made by the worker): every
    caller still gets its final CANCELLED event."""

    async def main():
        engine = Engine(slow_loaded, EngineConfig(max_prefill_tokens=512))
        initial = engine.cache.capacity_blocks
        # 1,200 tokens > the initial pool's 1,024
        prompts = [[(7 * i + j) % 200 + 3 for j in range(300)] for i in range(4)]
        streams = [engine.generate(p, SamplingParams(max_new_tokens=150, seed=i)) for i, p in enumerate(prompts)]
        firsts = [await s.__anext__() for s in streams]
        assert engine.cache.capacity_blocks > initial
        assert await asyncio.to_thread(engine.close, 30)

        async def rest(stream):
            return [e async for e in stream]

        events = [[first, *await asyncio.wait_for(rest(s), 30)] for first, s in zip(firsts, streams)]
        for ev in events:
            assert isinstance(ev[-1], Finished) and ev[-1].finish_reason == FinishReason.CANCELLED

    asyncio.run(main())


def test_the_worker_thread_does_all_of_the_engines_torch_work(tiny_model_dir, monkeypatch):
    """The KV cache and the fused projections are made on the worker thread (so the event loop's thread
    never needs an OpenMP team; see steer.threads), and a failure there is raised by the constructor,
    leaving no thread behind."""
    import threading

    from steer.server import engine as engine_module

    from steer.models import load_model

    tiny_loaded = load_model(str(tiny_model_dir))  # its own copy: no engine has fused its projections yet
    built_on = []
    real = engine_module.PagedKVCache.for_model

    def recording(*args, **kwargs):
        built_on.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module.PagedKVCache, "for_model", recording)
    from steer.server import llama_forward

    fused_on = []
    real_fused_init = llama_forward.FusedProjections.__init__

    def recording_fused(self, *args, **kwargs):
        fused_on.append(threading.current_thread())
        real_fused_init(self, *args, **kwargs)

    monkeypatch.setattr(llama_forward.FusedProjections, "__init__", recording_fused)

    async def body(engine):
        assert built_on == [engine._worker] and engine.cache is not None
        qkv = engine._lean._fused[0][0]  # the fused projections' buffer, made on the worker, is a normal tensor
        assert fused_on == [engine._worker] * len(fused_on) and fused_on and not qkv.buffer.is_inference()
        return [e async for e in engine.generate(PROMPT, SamplingParams(max_new_tokens=3, temperature=0.0))]

    assert isinstance(run_engine(lambda: Engine(tiny_loaded, EngineConfig()), body)[-1], Finished)

    def failing(*args, **kwargs):
        built_on.append(threading.current_thread())
        raise MemoryError("no room for the KV pool")

    monkeypatch.setattr(engine_module.PagedKVCache, "for_model", failing)
    with pytest.raises(MemoryError, match="KV pool"):
        Engine(tiny_loaded, EngineConfig())
    assert built_on[-1] is not threading.current_thread() and not built_on[-1].is_alive()


def test_dry_in_the_engine_equals_dry_in_generate(looping_loaded, tokenizer):
    """A looping model's greedy answer under a prohibitive DRY penalty: the engine (penalty from each
    sequence's own generated tokens, in a batch with a request without DRY) gives the tokens of
    transformers' generate() with steer.dry's logits processor, and no token continues a repeat of 2
    or more; the request without DRY in the same batch keeps its own (repeating) answer."""
    from transformers import LogitsProcessorList

    from steer.dry import DryLogitsProcessor, sequence_breaker_ids

    prompt = token_ids(9, 31)
    dry = SamplingParams(max_new_tokens=24, temperature=0.0, dry_multiplier=1e4)
    plain = SamplingParams(max_new_tokens=24, temperature=0.0)

    async def body(engine):
        return await asyncio.gather(run_one(engine, prompt, dry), run_one(engine, prompt, plain))

    with_dry, without = run_engine(lambda: Engine(looping_loaded, EngineConfig()), body)
    breakers = sequence_breaker_ids(looping_loaded.tokenizer)
    outputs = {}
    for name, params in (("dry", dry), ("plain", plain)):
        procs = LogitsProcessorList([DryLogitsProcessor(params, len(prompt), breakers)])
        with torch.no_grad():
            out = looping_loaded.model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                                logits_processor=procs, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id)
        outputs[name] = out[0, len(prompt):].tolist()
    assert list(with_dry[-1].token_ids) == outputs["dry"]
    assert list(without[-1].token_ids) == outputs["plain"]
    assert outputs["dry"] != outputs["plain"]

    def repeating_tokens(ids):  # tokens that continue a repeat of 2 or more tokens before them
        from steer.dry import dry_match_lengths
        return sum(dry_match_lengths(ids[:n], breakers).get(ids[n], 0) >= 2 for n in range(len(ids)))

    assert repeating_tokens(outputs["plain"]) >= 3  # the plain answer repeats itself
    assert repeating_tokens(outputs["dry"]) == 0  # a prohibitive penalty: no repeat is ever continued
