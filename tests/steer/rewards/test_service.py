"""ScoringService: chunked scoring equals one pass; admission, deadlines, cancellation and close."""

import asyncio
import threading
import time

import pytest
import torch

from steer.rewards.scorer import Scorer
from steer.rewards.service import ScoringConfig, ScoringOverloaded, ScoringService, ScoringStopped

CONVERSATION = [{"role": "user", "content": "hi"}]


class GatedScorer(Scorer):
    """raw = (len(response), -len(response)); each call waits for ``gate`` and is counted."""

    objectives = ("a", "b")

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()
        self.calls = 0
        self.entered = threading.Event()

    def raw_scores(self, conversations, responses):
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(30), "gate never opened"
        lengths = torch.tensor([float(len(r)) for r in responses])
        return torch.stack([lengths, -lengths], dim=1)  # (n, 2)

    def describe(self):
        return "gated"


def responses(n):
    return [f"response {'x' * i}" for i in range(n)]


def test_chunked_scoring_equals_one_pass():
    scorer = GatedScorer()
    service = ScoringService(scorer, ScoringConfig(chunk_responses=3))
    got = asyncio.run(service.rewards_for(CONVERSATION, responses(10)))
    assert scorer.calls == 4  # 3 + 3 + 3 + 1
    want = scorer.rewards([CONVERSATION] * 10, responses(10))
    assert torch.equal(got.raw, want.raw) and torch.equal(got.scaled, want.scaled) and got.objectives == ("a", "b")
    assert service.pending_responses == 0


def test_admission_counts_work_in_flight():
    scorer = GatedScorer()
    scorer.gate.clear()
    service = ScoringService(scorer, ScoringConfig(max_pending_responses=10, chunk_responses=2))

    async def main():
        first = asyncio.create_task(service.rewards_for(CONVERSATION, responses(8), admit=True))
        while service.pending_responses == 0:
            await asyncio.sleep(0.01)
        with pytest.raises(ScoringOverloaded, match="max_pending_responses=10"):
            await service.rewards_for(CONVERSATION, responses(3), admit=True)
        # finishing a generation: never refused
        unadmitted = asyncio.create_task(service.rewards_for(CONVERSATION, responses(3)))
        await asyncio.sleep(0.05)
        assert service.pending_responses == 11
        scorer.gate.set()
        assert len(await first) == 8 and len(await unadmitted) == 3
        assert service.pending_responses == 0
        assert len(await service.rewards_for(CONVERSATION, responses(10), admit=True)) == 10

    asyncio.run(main())


def test_a_cancelled_caller_stops_its_work_before_the_next_chunk():
    scorer = GatedScorer()
    scorer.gate.clear()
    service = ScoringService(scorer, ScoringConfig(chunk_responses=2))

    async def main():
        task = asyncio.create_task(service.rewards_for(CONVERSATION, responses(64)))
        while not scorer.entered.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        scorer.gate.set()
        while service.pending_responses:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert scorer.calls == 1  # the chunk that was running, none after it


def test_a_caller_cancelled_before_its_thread_started_gives_its_admission_back(monkeypatch):
    """Cancelled before its work's thread began (held back here): that work never runs, and its
    responses must not stay counted against max_pending_responses for good."""
    from steer.rewards import service as service_module

    real = service_module.in_own_thread
    hold = None

    async def held_back(fn, *args):
        await hold.wait()
        return await real(fn, *args)

    monkeypatch.setattr(service_module, "in_own_thread", held_back)
    scorer = GatedScorer()
    service = ScoringService(scorer, ScoringConfig(max_pending_responses=8))

    async def main():
        nonlocal hold
        hold = asyncio.Event()
        task = asyncio.create_task(service.rewards_for(CONVERSATION, responses(8), admit=True))
        await asyncio.sleep(0.05)
        assert service.pending_responses == 8
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert service.pending_responses == 0  # at once, not when (or if) the thread runs
        hold.set()
        assert len(await service.rewards_for(CONVERSATION, responses(8), admit=True)) == 8  # admitted again
        assert service.pending_responses == 0

    asyncio.run(main())
    assert scorer.calls == 1  # only the second call's work ran


def test_deadline_and_close_stop_work_between_chunks():
    scorer = GatedScorer()
    service = ScoringService(scorer, ScoringConfig(chunk_responses=2))
    with pytest.raises(ScoringStopped, match="deadline passed after 0 of 4") as e:
        asyncio.run(service.rewards_for(CONVERSATION, responses(4), deadline=time.monotonic() - 1))
    assert e.value.reason == "deadline" and scorer.calls == 0

    scorer.gate.clear()

    async def main():
        task = asyncio.create_task(service.rewards_for(CONVERSATION, responses(8)))
        while not scorer.entered.is_set():
            await asyncio.sleep(0.01)
        service.close()
        scorer.gate.set()
        with pytest.raises(ScoringStopped, match="shutting down") as stopped:
            await task
        assert stopped.value.reason == "closed"
        with pytest.raises(ScoringStopped):  # and nothing new starts
            await service.rewards_for(CONVERSATION, responses(1))

    asyncio.run(main())
    assert scorer.calls == 1


@pytest.mark.parametrize("bad", [{"max_pending_responses": 0}, {"chunk_responses": 0}, {"chunk_responses": 2.5}])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="ScoringConfig"):
        ScoringConfig(**bad)


def test_scoring_runs_in_a_thread_that_ends_with_the_call():
    """Not the event loop's thread, nor a reused executor thread that would keep an OpenMP team beside
    the engine's (steer.threads): a thread of its own per call, gone when the call returns."""

    class Recording(GatedScorer):
        def __init__(self):
            super().__init__()
            self.threads = []

        def raw_scores(self, conversations, responses):
            self.threads.append(threading.current_thread())
            return super().raw_scores(conversations, responses)

    scorer = Recording()
    service = ScoringService(scorer, ScoringConfig(chunk_responses=2))

    async def main():
        for _ in range(2):
            await service.rewards_for(CONVERSATION, responses(3))

    asyncio.run(main())
    assert len(scorer.threads) == 4  # 2 calls x 2 chunks
    first, second = scorer.threads[0], scorer.threads[2]
    assert scorer.threads[1] is first and scorer.threads[3] is second  # one thread per call, for all its chunks
    assert first is not second and threading.main_thread() not in scorer.threads
    for t in (first, second):
        t.join(5)
        assert not t.is_alive()
