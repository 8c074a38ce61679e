"""Steering strategies: what work a request asks of the engine.

A strategy (the :class:`Strategy` protocol) turns a validated :class:`SteerRequest` into engine
calls and a :class:`SteerResult`: ``run`` returns it, and ``stream`` (where ``streams`` is true)
yields the text as :class:`TextDelta` events and then the same :class:`SteerResult` as its last
event. A result carries everything a transport answers with (text, finish, usage, timing, rewards,
candidates), so the transports translate it once and compute nothing themselves.

``CONDITIONED`` writes the direction into the system prompt (the DPA format of
:mod:`steer.conditioning`) and samples once. ``RERANK`` (offered when the server runs a reward
scorer) samples ``candidates`` times from the same conditioned prompt, as concurrent engine calls
so that a batching engine runs them in one batch, scores every candidate's reward vector and
returns the one with the highest ``v . r`` (scaled rewards, ties to the lower candidate index).
With a seed, candidate ``i`` samples with ``seed + i``, so candidate 0 is exactly the CONDITIONED
output for that seed and the whole result is reproducible. RERANK does not stream
(``streams = False``): its answer exists only once every candidate is finished and scored, so
streaming it would only add a delay before one chunk; each transport refuses a streamed RERANK
request in its own words (GenerateStream: UNIMPLEMENTED, "use Generate"). ``MIXTURE``
(offered when the model carries mixture adapters, :mod:`steer.mixture`) sends the plain
conversation (no direction line) and has the engine mix the per-objective adapters by the
request's own weights, row by row inside the shared batch.

A request with ``return_rewards`` gets the reward vector of the text it returns (one scorer pass
after generation, streamed or not); without it CONDITIONED pays nothing for scoring. RERANK scores
its candidates anyway and always returns the winner's vector. A generation the server cut short
(``CANCELLED``: shutting down) is returned at once, unscored.

Prompts are rendered and tokenised in a worker thread (a prompt can be hundreds of kilobytes;
the event loop keeps answering other calls meanwhile), through :class:`steer.chat_tokens.ChatTokenizer`:
control-token strings typed into a message stay plain text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Protocol

from steer.server.engine import Engine, Finished, FinishReason, TextDelta

from steer.chat_tokens import ChatTokenizer
from steer.conditioning import condition_messages
from steer.errors import InvalidInput
from steer.objectives import Direction
from steer.rewards.service import ScoringService
from steer.sampling import SamplingParams

CONDITIONED = "conditioned"
RERANK = "rerank"
MIXTURE = "mixture"
STRATEGIES = (CONDITIONED, RERANK, MIXTURE)  # every strategy name, in the order errors list them

DEFAULT_CANDIDATES = 4  # RERANK samples when a request leaves `candidates` at 0


class StrategyUnavailable(Exception):
    """The requested strategy is not offered by this server."""


@dataclass(frozen=True)
class SteerRequest:
    conversation: list[dict[str, str]]
    direction: Direction
    params: SamplingParams
    strategy: str = CONDITIONED
    candidates: int = 0
    return_candidates: bool = False
    return_rewards: bool = False  # measure the returned text's reward vector (a scorer pass; RERANK always has it)
    deadline: float | None = None  # time.monotonic() value
    input_field: str = "prompt"  # the request field the conversation came from, for errors


@dataclass(frozen=True)
class ScoredCandidate:
    text: str
    rewards: dict[str, float]  # common scale
    weighted_reward: float  # direction . rewards
    finished: Finished


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @classmethod
    def of(cls, finished: Finished) -> Usage:
        return cls(finished.prompt_tokens, finished.completion_tokens)


@dataclass(frozen=True)
class Timing:
    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float

    @classmethod
    def of(cls, finished: Finished) -> Timing:
        return cls(finished.queue_seconds, finished.time_to_first_token_seconds, finished.total_seconds)


@dataclass(frozen=True)
class SteerResult:
    text: str
    direction: Direction
    finished: Finished  # the returned text's own generation
    usage: Usage  # RERANK: completion tokens over all candidates (else finished's)
    timing: Timing  # RERANK: total_seconds from arrival to result, scoring included (else finished's)
    rewards: dict[str, float] | None = None  # common scale; None when not measured
    candidates: tuple[ScoredCandidate, ...] = ()  # RERANK with return_candidates: all, best first

    @classmethod
    def of(cls, request: SteerRequest, finished: Finished, rewards: dict[str, float] | None = None) -> SteerResult:
        """The result of one sample: its generation's own usage and timing."""
        return cls(text=finished.text, direction=request.direction, finished=finished, usage=Usage.of(finished),
                   timing=Timing.of(finished), rewards=rewards)


class Strategy(Protocol):
    """What the transports call. ``stream`` yields TextDelta events, then the SteerResult ``run`` would
    return; a strategy with ``streams = False`` raises StrategyUnavailable from ``stream`` (the transports
    check ``streams`` first, to refuse in their own words)."""

    name: str
    streams: bool

    async def run(self, request: SteerRequest) -> SteerResult: ...

    def stream(self, request: SteerRequest) -> AsyncIterator[TextDelta | SteerResult]: ...


def prompt_ids(chat: ChatTokenizer, context_length: int, request: SteerRequest, messages: list[dict[str, str]],
               direction_line: bool) -> list[int]:
    """The prompt ids of ``messages`` (what the model answers for ``request``), refused with InvalidInput when
    they leave no room to generate (CPU work: call it off the event loop)."""
    ids = chat(messages, fields=_message_fields(request, len(messages)))
    if len(ids) >= context_length:
        raise InvalidInput(
            request.input_field,
            f"is {len(ids)} tokens with the chat template"
            f"{' and direction line' if direction_line else ''}; "
            f"this model's context is {context_length} tokens and at least one must be left to generate",
        )
    return ids


def conditioned_messages(request: SteerRequest) -> list[dict[str, str]]:
    """The request's conversation with the direction line in the system prompt (CONDITIONED and RERANK)."""
    return condition_messages(request.conversation, request.direction)


class ConditionedStrategy:
    """One sample from the direction-conditioned policy."""

    name = CONDITIONED
    streams = True

    def __init__(self, engine: Engine, scoring: ScoringService | None = None, chat: ChatTokenizer | None = None):
        self.engine = engine
        self.scoring = scoring
        self.chat = chat if chat is not None else ChatTokenizer(engine.tokenizer)

    def messages(self, request: SteerRequest) -> list[dict[str, str]]:
        """The conversation the model answers: the request's, with the direction line in the system prompt."""
        return conditioned_messages(request)

    def mix(self, request: SteerRequest) -> list[float] | None:
        """The engine's adapter row for this request (None: the model's default)."""
        return None

    def prompt_ids(self, request: SteerRequest) -> list[int]:
        """The prompt ids of :meth:`messages` (CPU work: call it off the event loop)."""
        return prompt_ids(self.chat, self.engine.context_length, request, self.messages(request),
                          direction_line=self.name == CONDITIONED)

    async def stream(self, request: SteerRequest) -> AsyncIterator[TextDelta | SteerResult]:
        ids = await asyncio.to_thread(self.prompt_ids, request)  # validates before admission
        finished = None
        async for event in self.engine.generate(ids, request.params, request.deadline, mix=self.mix(request)):
            if isinstance(event, Finished):
                finished = event
            else:
                yield event
        if finished is not None:
            wanted = request.return_rewards and finished.finish_reason is not FinishReason.CANCELLED
            rewards = await self.rewards(request, finished.text) if wanted else None
            yield SteerResult.of(request, finished, rewards)

    async def run(self, request: SteerRequest) -> SteerResult:
        async for event in self.stream(request):
            if isinstance(event, SteerResult):
                return event
        raise RuntimeError("engine stream ended without a Finished event")

    async def rewards(self, request: SteerRequest, text: str) -> dict[str, float] | None:
        """The common-scale reward vector of ``text`` as an answer to the request (None without a scorer)."""
        if self.scoring is None:
            return None
        return (await self.scoring.rewards_for(request.conversation, [text])).row(0)


class MixtureStrategy(ConditionedStrategy):
    """One sample of the plain conversation, the mixture's adapters weighted by the request's direction."""

    name = MIXTURE

    def __init__(self, engine: Engine, scoring: ScoringService | None = None, chat: ChatTokenizer | None = None):
        super().__init__(engine, scoring, chat)
        self.mixture = engine.loaded.mixture
        if self.mixture is None:
            raise ValueError("MIXTURE needs a model with mixture adapters (steer.models.load_model(mixture=...))")

    def messages(self, request: SteerRequest) -> list[dict[str, str]]:
        return [dict(m) for m in request.conversation]

    def mix(self, request: SteerRequest) -> list[float]:
        weights = request.direction.as_dict()
        return self.mixture.row([weights[o] for o in self.mixture.objectives])


class RerankStrategy:
    """Best of ``candidates`` conditioned samples by ``v . r`` (see the module docstring)."""

    name = RERANK
    streams = False

    def __init__(self, engine: Engine, scoring: ScoringService, default_candidates: int = DEFAULT_CANDIDATES,
                 chat: ChatTokenizer | None = None):
        self.engine = engine
        self.scoring = scoring
        self.default_candidates = default_candidates
        self.chat = chat if chat is not None else ChatTokenizer(engine.tokenizer)

    def prompt_ids(self, request: SteerRequest) -> list[int]:
        """The CONDITIONED prompt's ids (CPU work: call it off the event loop)."""
        return prompt_ids(self.chat, self.engine.context_length, request, conditioned_messages(request),
                          direction_line=True)

    def stream(self, request: SteerRequest) -> AsyncIterator[TextDelta | SteerResult]:
        raise StrategyUnavailable(f"strategy {self.name.upper()} does not stream; use Generate")

    async def run(self, request: SteerRequest) -> SteerResult:
        started = time.monotonic()
        n = request.candidates or self.default_candidates
        ids = await asyncio.to_thread(self.prompt_ids, request)
        params = request.params
        per_candidate = [params if params.seed is None else params.with_overrides(seed=(params.seed + i) % 2**64)
                         for i in range(n)]
        finished = await _all_or_none([self._sample(ids, p, request.deadline) for p in per_candidate])
        rewards = (await self.scoring.rewards_for(request.conversation, [f.text for f in finished])).select(
            request.direction.objectives)
        weighted = [request.direction.dot(rewards.scaled[i].tolist()) for i in range(n)]
        order = sorted(range(n), key=lambda i: (-weighted[i], i))
        best = order[0]
        candidates = ()
        if request.return_candidates:
            candidates = tuple(ScoredCandidate(finished[i].text, rewards.row(i), weighted[i], finished[i])
                               for i in order)
        winner = finished[best]
        return SteerResult(
            text=winner.text,
            direction=request.direction,
            finished=winner,
            usage=Usage(winner.prompt_tokens, sum(f.completion_tokens for f in finished)),
            timing=Timing(winner.queue_seconds, winner.time_to_first_token_seconds, time.monotonic() - started),
            rewards=rewards.row(best),
            candidates=candidates,
        )

    async def _sample(self, ids: list[int], params: SamplingParams, deadline: float | None) -> Finished:
        async for event in self.engine.generate(ids, params, deadline):
            if isinstance(event, Finished):
                return event
        raise RuntimeError("engine stream ended without a Finished event")


async def _all_or_none(calls: list[Awaitable[Finished]]) -> list[Finished]:
    """Run the calls concurrently; if one fails (e.g. Overloaded), cancel the rest before raising,
    so no orphaned candidate keeps a batch slot."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _message_fields(request: SteerRequest, n: int) -> list[str]:
    """Request field of each conditioned message, for errors (a system turn may have been added first)."""
    if request.input_field == "prompt":
        return ["system prompt"] * (n - 1) + ["prompt"]
    own = [f"{request.input_field}[{i}].content" for i in range(len(request.conversation))]
    return own if n == len(own) else ["system prompt"] + own


def build_strategies(engine: Engine, scoring: ScoringService | None = None,
                     chat: ChatTokenizer | None = None) -> dict[str, Strategy]:
    """The strategies this server offers, by name (RERANK only with a scorer, MIXTURE only with mixture
    adapters); they share one ChatTokenizer."""
    chat = chat if chat is not None else ChatTokenizer(engine.tokenizer)
    strategies: dict[str, Strategy] = {CONDITIONED: ConditionedStrategy(engine, scoring, chat)}
    if scoring is not None:
        strategies[RERANK] = RerankStrategy(engine, scoring, chat=chat)
    if getattr(engine.loaded, "mixture", None) is not None:
        strategies[MIXTURE] = MixtureStrategy(engine, scoring, chat)
    return strategies
