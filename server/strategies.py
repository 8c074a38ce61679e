"""Steering strategies: what work a request asks of the engine.

A strategy turns a validated :class:`SteerRequest` into engine calls and a :class:`SteerResult`.
``CONDITIONED`` writes the direction into the system prompt (the DPA format of
:mod:`steer.conditioning`) and samples once. ``RERANK`` and ``MIXTURE`` are reserved names until
a reward scorer and per-objective adapters are available.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from steer.conditioning import render_prompt
from steer.errors import InvalidInput
from steer.objectives import Direction
from steer.sampling import SamplingParams

from steer.server.engine import Engine, Finished, TextDelta

CONDITIONED = "conditioned"
RERANK = "rerank"
MIXTURE = "mixture"


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
    deadline: float | None = None  # time.monotonic() value
    input_field: str = "prompt"  # the request field the conversation came from, for errors


@dataclass(frozen=True)
class SteerResult:
    text: str
    direction: Direction
    finished: Finished
    rewards: dict[str, float] | None = None


class ConditionedStrategy:
    """One sample from the direction-conditioned policy."""

    name = CONDITIONED

    def __init__(self, engine: Engine):
        self.engine = engine

    def prompt_ids(self, request: SteerRequest) -> list[int]:
        tokenizer = self.engine.tokenizer
        text = render_prompt(tokenizer, request.conversation, request.direction)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        context = self.engine.context_length
        if len(ids) >= context:
            raise InvalidInput(
                request.input_field,
                f"is {len(ids)} tokens with the chat template and direction line; this model's context is "
                f"{context} tokens and at least one must be left to generate",
            )
        return ids

    async def stream(self, request: SteerRequest) -> AsyncIterator[TextDelta | Finished]:
        ids = self.prompt_ids(request)  # validates before admission
        async for event in self.engine.generate(ids, request.params, request.deadline):
            yield event

    async def run(self, request: SteerRequest) -> SteerResult:
        async for event in self.stream(request):
            if isinstance(event, Finished):
                return SteerResult(text=event.text, direction=request.direction, finished=event)
        raise RuntimeError("engine stream ended without a Finished event")


def build_strategies(engine: Engine) -> dict[str, object]:
    """The strategies this server offers, by name."""
    return {CONDITIONED: ConditionedStrategy(engine)}
