"""Async access to a scorer for an asyncio server: forwards run off the event loop, one at a time.

Scoring is a model forward (tens of milliseconds to seconds on CPU), so it runs in a worker
thread (``asyncio.to_thread``) to keep the event loop answering other calls. A lock serialises
scorer forwards: the scorer's model may be the served model itself, whose decoding runs on the
engine's own threads; concurrent inference-mode forwards on one module are safe in torch, but
two scoring passes at once would only fight for the same cores and double peak memory.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from steer.rewards.scorer import Conversation, Rewards, Scorer


class ScoringService:
    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self._lock = threading.Lock()

    @property
    def objectives(self) -> tuple[str, ...]:
        return self.scorer.objectives

    def describe(self) -> str:
        return self.scorer.describe()

    def rewards_sync(self, conversations: Sequence[Conversation], responses: Sequence[str]) -> Rewards:
        with self._lock:
            return self.scorer.rewards(conversations, responses)

    async def rewards(self, conversations: Sequence[Conversation], responses: Sequence[str]) -> Rewards:
        """Reward vectors (raw and common-scale) for each pair, computed in a worker thread."""
        return await asyncio.to_thread(self.rewards_sync, list(conversations), list(responses))

    async def rewards_for(self, conversation: Conversation, responses: Sequence[str]) -> Rewards:
        """Several responses to one conversation."""
        return await self.rewards([conversation] * len(responses), responses)
