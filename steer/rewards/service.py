"""Async access to a scorer for an asyncio server: forwards off the event loop, admitted, cancellable.

Scoring is a model forward (tens of milliseconds to seconds on CPU), so it runs in a thread of
its own that ends with the call (:func:`steer.threads.in_own_thread`, not a reused executor
thread, which would keep an OpenMP team alive beside the engine's and slow every decode step; see
:mod:`steer.threads`), to keep the event loop answering other calls. The work of a call
is cut into chunks of ``chunk_responses`` responses; a lock serialises the chunks (the scorer's
model may be the served model itself, whose decoding runs on the engine's own threads; two
scoring passes at once would only fight for the same cores and double peak memory). Between
chunks the thread checks whether its caller is still there:

* a caller that is cancelled (the client cancelled, or grpc gave up at the deadline) stops its
  work before the next chunk, so an abandoned 64-response Score costs at most one more chunk;
  one cancelled before its thread began gives its admission back at once (that work never runs);
* a ``deadline`` that passes ends the work with :class:`ScoringStopped` (``reason="deadline"``);
* :meth:`ScoringService.close` (server shutdown) ends every call's work the same way
  (``reason="closed"``) and refuses new work.

Admission: calls that ask for it (``admit=True``: Score) are refused with
:class:`ScoringOverloaded` when the responses already waiting or being scored plus their own
would exceed ``max_pending_responses``. Rewards that finish a generation (``admit=False``) are
never refused -- that generation was admitted by the engine -- but they count toward the limit.
Scoring in chunks gives the same rewards as one pass: every pair is scored on its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from steer.rewards.scorer import Conversation, Rewards, Scorer
from steer.threads import in_own_thread


@dataclass(frozen=True)
class ScoringConfig:
    # responses waiting or being scored before Score gets RESOURCE_EXHAUSTED (two full Score calls)
    max_pending_responses: int = 128
    # responses per scorer call; cancellation and deadlines are checked between chunks (FLR's prefix batch)
    chunk_responses: int = 8

    def __post_init__(self):
        for name in ("max_pending_responses", "chunk_responses"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ScoringConfig.{name} must be an integer >= 1, got {value!r}")


class ScoringOverloaded(Exception):
    """More responses are waiting to be scored than the service admits."""


class ScoringStopped(Exception):
    """Scoring ended before every response was scored: ``reason`` is ``"deadline"``, ``"closed"``, or
    ``"cancelled"`` (the caller is gone and never sees it)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class _Work:
    """One call's responses in the admission count, until they are settled (scored, stopped or dropped)."""

    n: int
    stop: threading.Event = field(default_factory=threading.Event)  # the caller left: stop before the next chunk
    started: bool = False  # the worker thread began (guarded by ScoringService._count_lock)
    settled: bool = False  # n was given back to the count


class ScoringService:
    def __init__(self, scorer: Scorer, config: ScoringConfig = ScoringConfig()):
        self.scorer = scorer
        self.config = config
        self._lock = threading.Lock()  # one scorer forward at a time
        self._count_lock = threading.Lock()
        self._pending = 0  # responses admitted and not yet done (their thread may outlive a cancelled caller)
        self._closed = threading.Event()

    @property
    def objectives(self) -> tuple[str, ...]:
        return self.scorer.objectives

    @property
    def pending_responses(self) -> int:
        return self._pending

    def describe(self) -> str:
        return self.scorer.describe()

    def close(self) -> None:
        """Refuse new work; running work stops before its next chunk (ScoringStopped, reason "closed")."""
        self._closed.set()

    def rewards_sync(self, conversations: Sequence[Conversation], responses: Sequence[str]) -> Rewards:
        with self._lock:
            return self.scorer.rewards(conversations, responses)

    async def rewards(
        self, conversations: Sequence[Conversation], responses: Sequence[str], *, deadline: float | None = None,
        admit: bool = False,
    ) -> Rewards:
        """Reward vectors (raw and common-scale) for each pair, computed in a worker thread.

        ``deadline`` is a ``time.monotonic()`` value; ``admit`` applies the admission limit.
        Cancelling the awaiting task stops the thread's work before its next chunk.
        """
        conversations, responses = list(conversations), list(responses)
        n = len(responses)
        with self._count_lock:
            if self._closed.is_set():
                raise ScoringStopped("closed", "the server is shutting down; retry on another replica")
            if admit and self._pending + n > self.config.max_pending_responses:
                raise ScoringOverloaded(
                    f"scoring is at capacity: {self._pending} responses waiting or being scored, {n} more would exceed "
                    f"max_pending_responses={self.config.max_pending_responses}; retry with backoff"
                )
            self._pending += n
        work = _Work(n)
        try:
            return await in_own_thread(self._score_in_chunks, conversations, responses, work, deadline)
        except BaseException:  # cancelled (the caller left) or never scheduled
            work.stop.set()  # a thread that is running finishes its current chunk and stops there
            with self._count_lock:
                if not work.started:
                    # Cancelled before its thread began: it stops at once when it does, so nothing
                    # else gives its count back.
                    self._settle(work)
            raise

    async def rewards_for(self, conversation: Conversation, responses: Sequence[str], **kwargs) -> Rewards:
        """Several responses to one conversation (keywords as :meth:`rewards`)."""
        return await self.rewards([conversation] * len(responses), responses, **kwargs)

    def _settle(self, work: _Work) -> None:
        """Give ``work``'s responses back to the admission count, once (called with ``_count_lock``)."""
        if not work.settled:
            work.settled = True
            self._pending -= work.n

    def _score_in_chunks(self, conversations, responses, work: _Work, deadline: float | None) -> Rewards:
        with self._count_lock:
            work.started = True
        parts: list[Rewards] = []
        try:
            step = self.config.chunk_responses
            for start in range(0, max(len(responses), 1), step):
                if work.stop.is_set():
                    raise ScoringStopped("cancelled", "the caller went away")
                if self._closed.is_set():
                    raise ScoringStopped("closed", "the server is shutting down; retry on another replica")
                if deadline is not None and time.monotonic() >= deadline:
                    raise ScoringStopped("deadline",
                                         f"the deadline passed after {start} of {len(responses)} responses were scored")
                with self._lock:
                    parts.append(self.scorer.rewards(conversations[start: start + step],
                                                     responses[start: start + step]))
        finally:
            with self._count_lock:
                self._settle(work)
        if len(parts) == 1:
            return parts[0]
        return Rewards(parts[0].objectives, torch.cat([p.raw for p in parts]),
                       torch.cat([p.scaled for p in parts]))  # (n, k)
