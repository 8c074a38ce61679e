"""gRPC servicer: translates ``steer.v1`` messages to domain calls and back, nothing more.

Validation lives in the domain (:func:`steer.server.validation.build_steer_request`, shared with
the HTTP API, and the domain types it calls), which raises :class:`~steer.errors.InvalidInput`
naming the request field; this module maps domain errors to status codes:

====================  =====================
InvalidInput          INVALID_ARGUMENT
Overloaded            RESOURCE_EXHAUSTED
ScoringOverloaded     RESOURCE_EXHAUSTED
StrategyUnavailable   UNIMPLEMENTED
ScorerUnavailable     FAILED_PRECONDITION
ScoringStopped        DEADLINE_EXCEEDED (deadline) / UNAVAILABLE (server shutting down)
====================  =====================

A refusal sets the status and returns (never ``context.abort()``, which sends the status before
the interceptor has counted the call). The interceptor (:mod:`steer.server.observability`) cuts
status details to ``MAX_DETAILS_BYTES`` (1,024 UTF-8 bytes) and turns anything unexpected into ``INTERNAL``.

Text limits are checked before any rendering or tokenising: the conversation (and each Score
response) may hold at most ``ServiceInfo.max_input_bytes`` bytes of UTF-8 text
(:func:`steer.chat_tokens.text_byte_limit`: more cannot fit the context).

Score (and the rewards in Generate/GenerateStream) go through the server's
:class:`~steer.rewards.service.ScoringService`; without one, Score is UNIMPLEMENTED. Score is
admitted only while fewer than ``ScoringConfig.max_pending_responses`` responses wait to be
scored, and a cancelled call (or one past its deadline) stops scoring before the next chunk.
"""

from __future__ import annotations

import contextlib
import logging
import time

import grpc
from steer.server.engine import FinishReason, Overloaded, TextDelta
from steer.server.strategies import (
    CONDITIONED,
    MIXTURE,
    RERANK,
    SteerRequest,
    SteerResult,
    Strategy,
    StrategyUnavailable,
    Timing,
    Usage,
)
from steer.server.validation import (
    SAMPLING_FIELDS,
    ScorerUnavailable,
    Transport,
    check_text_bytes,
    offered_strategy,
)

from steer.conditioning import FORMAT as CONDITIONING_FORMAT
from steer.conversation import build_conversation
from steer.errors import InvalidInput
from steer.objectives import Direction
from steer.rewards.service import ScoringOverloaded, ScoringStopped
from steer.v1 import steer_pb2, steer_pb2_grpc

log = logging.getLogger(__name__)

MAX_SCORE_RESPONSES = 64  # responses one Score call may carry (each is a scorer forward)

_STRATEGY_NAMES = {
    steer_pb2.STRATEGY_UNSPECIFIED: CONDITIONED,
    steer_pb2.STRATEGY_CONDITIONED: CONDITIONED,
    steer_pb2.STRATEGY_RERANK: RERANK,
    steer_pb2.STRATEGY_MIXTURE: MIXTURE,
}
_STRATEGY_ENUMS = {CONDITIONED: steer_pb2.STRATEGY_CONDITIONED, RERANK: steer_pb2.STRATEGY_RERANK,
                   MIXTURE: steer_pb2.STRATEGY_MIXTURE}
_FINISH = {
    FinishReason.STOP: steer_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: steer_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: steer_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: steer_pb2.FINISH_REASON_CANCELLED,
    FinishReason.TIME_LIMIT: steer_pb2.FINISH_REASON_TIME_LIMIT,
}
_SCORING_STOPPED = {"deadline": grpc.StatusCode.DEADLINE_EXCEEDED, "closed": grpc.StatusCode.UNAVAILABLE,
                    "cancelled": grpc.StatusCode.CANCELLED}


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def _domain_errors():
    """Map domain exceptions to gRPC status codes (raised as _Refusal, answered by the caller)."""
    try:
        yield
    except InvalidInput as e:
        raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
    except (Overloaded, ScoringOverloaded) as e:
        raise _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from e
    except StrategyUnavailable as e:
        raise _Refusal(grpc.StatusCode.UNIMPLEMENTED, str(e)) from e
    except ScorerUnavailable as e:
        raise _Refusal(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from e
    except ScoringStopped as e:
        raise _Refusal(_SCORING_STOPPED[e.reason], str(e)) from e


def _refuse(context: grpc.aio.ServicerContext, refusal: _Refusal) -> None:
    """Set the call's status; it is sent when the handler returns (after the interceptor counted it)."""
    context.set_code(refusal.code)
    context.set_details(str(refusal))


class SteerServicer(Transport, steer_pb2_grpc.SteerServicer):
    """Constructed as ``SteerServicer(engine, strategies, info, scoring=None)`` (:class:`Transport`)."""

    # -- RPCs -------------------------------------------------------------------------------

    async def Generate(self, request: steer_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> steer_pb2.GenerateResponse:
        try:
            with _domain_errors():
                steer_request = self._steer_request(request, context)
                result: SteerResult = await self._strategy(steer_request.strategy).run(steer_request)
        except _Refusal as e:
            _refuse(context, e)
            return steer_pb2.GenerateResponse()  # not sent: the status is not OK
        return steer_pb2.GenerateResponse(
            text=result.text,
            rewards=result.rewards or {},
            direction=result.direction.as_dict(),
            finish_reason=_FINISH[result.finished.finish_reason],
            usage=_usage(result.usage),
            timing=_timing(result.timing),
            strategy=_STRATEGY_ENUMS[steer_request.strategy],
            candidates=[
                steer_pb2.Candidate(text=c.text, rewards=c.rewards, weighted_reward=c.weighted_reward,
                                    finish_reason=_FINISH[c.finished.finish_reason])
                for c in result.candidates
            ],
        )

    async def GenerateStream(self, request: steer_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        first = True
        try:
            with _domain_errors():
                steer_request = self._steer_request(request, context)
                strategy = self._strategy(steer_request.strategy)
                if not strategy.streams:
                    raise StrategyUnavailable(
                        f"strategy {steer_request.strategy.upper()} does not stream; use Generate")
                async for event in strategy.stream(steer_request):
                    if isinstance(event, TextDelta):
                        chunk = steer_pb2.GenerateChunk(delta=event.text)
                    elif isinstance(event, SteerResult):  # the last event: the strategy measured its rewards
                        chunk = steer_pb2.GenerateChunk(
                            finish_reason=_FINISH[event.finished.finish_reason], usage=_usage(event.usage),
                            timing=_timing(event.timing), rewards=event.rewards or {},
                        )
                    else:
                        continue
                    if first:
                        chunk.direction.update(steer_request.direction.as_dict())
                        first = False
                    yield chunk
        except _Refusal as e:
            _refuse(context, e)

    async def Score(self, request: steer_pb2.ScoreRequest,
                    context: grpc.aio.ServicerContext) -> steer_pb2.ScoreResponse:
        try:
            with _domain_errors():
                if self.scoring is None:
                    raise _Refusal(
                        grpc.StatusCode.UNIMPLEMENTED,
                        "Score is not available: this server runs no reward scorer (Describe.scorer is empty; "
                        "start it with --scorer default, flr or a reward model directory)",
                    )
                conversation = build_conversation(
                    request.prompt, [{"role": m.role, "content": m.content} for m in request.messages]
                )
                self._check_text_bytes([m["content"] for m in conversation],
                                       "messages" if request.messages else "prompt")
                responses = list(request.responses)
                if not responses:
                    raise InvalidInput("responses", "is empty: give at least one response to score")
                if len(responses) > MAX_SCORE_RESPONSES:
                    raise InvalidInput("responses", f"at most {MAX_SCORE_RESPONSES} per call, got {len(responses)}")
                for i, text in enumerate(responses):
                    if not text.strip():
                        raise InvalidInput(f"responses[{i}]", "is empty")
                    self._check_text_bytes([text], f"responses[{i}]")
                objectives = self.scoring.objectives
                direction = Direction.from_weights(dict(request.weights), objectives) if request.weights else None
                rewards = await self.scoring.rewards_for(conversation, responses, deadline=_deadline(context),
                                                         admit=True)
        except _Refusal as e:
            _refuse(context, e)
            return steer_pb2.ScoreResponse()  # not sent: the status is not OK
        response = steer_pb2.ScoreResponse(objectives=list(objectives))
        if direction is not None:
            response.direction.update(direction.as_dict())
        for i in range(len(rewards)):
            vector = response.scores.add(rewards=rewards.row(i), raw_rewards=rewards.row(i, scaled=False))
            if direction is not None:
                vector.weighted_reward = direction.dot(rewards.scaled[i].tolist())
        return response

    async def Describe(self, request: steer_pb2.DescribeRequest,
                       context: grpc.aio.ServicerContext) -> steer_pb2.DescribeResponse:
        cfg = self.engine.config
        defaults = self.info.sampling_defaults
        return steer_pb2.DescribeResponse(
            model_id=self.info.model_id,
            adapter=self.info.adapter or "",
            objectives=list(self.info.objectives),
            strategies=[_STRATEGY_ENUMS[name] for name in self.strategies],
            scorer=self.info.scorer,
            limits=steer_pb2.Limits(
                max_new_tokens=cfg.max_new_tokens,
                context_length=self.engine.context_length,
                max_candidates=self.info.max_candidates,
                max_stop_sequences=8,
                max_queue=cfg.max_queue,
                max_concurrent=cfg.max_concurrent,
                max_message_bytes=self.info.max_message_bytes,
            ),
            sampling_defaults=steer_pb2.SamplingParams(
                max_new_tokens=defaults.max_new_tokens,
                temperature=defaults.temperature,
                top_p=defaults.top_p,
                top_k=defaults.top_k,
                dry_multiplier=defaults.dry_multiplier,
                dry_base=defaults.dry_base,
                dry_allowed_length=defaults.dry_allowed_length,
            ),
            conditioning_format=CONDITIONING_FORMAT,
            version=self.info.version,
        )

    # -- translation ------------------------------------------------------------------------

    def _strategy(self, name: str) -> Strategy:
        return offered_strategy(self.strategies, name)

    def _steer_request(self, request: steer_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> SteerRequest:
        remaining = context.time_remaining()
        if remaining is not None:
            # Stop a little before the call's deadline so the last chunk (TIME_LIMIT) still reaches
            # the client instead of the call ending as DEADLINE_EXCEEDED with nothing.
            remaining -= min(0.5, 0.2 * remaining)
        s = request.sampling
        sampling = {name: getattr(s, name) if s.HasField(name) else None for name in SAMPLING_FIELDS if name != "stop"}
        if s.stop:
            sampling["stop"] = tuple(s.stop)
        return self.steer_request(
            prompt=request.prompt,
            messages=[{"role": m.role, "content": m.content} for m in request.messages],
            weights=dict(request.weights),
            strategy=request.strategy,
            strategy_names=_STRATEGY_NAMES,
            candidates=request.candidates,
            return_candidates=request.return_candidates,
            return_rewards=request.return_rewards,
            sampling=sampling,
            deadline=None if remaining is None else time.monotonic() + remaining,
        )

    def _check_text_bytes(self, texts: list[str], field: str) -> None:
        check_text_bytes(texts, field, self.info.max_input_bytes)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _usage(usage: Usage) -> steer_pb2.Usage:
    return steer_pb2.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)


def _timing(timing: Timing) -> steer_pb2.Timing:
    return steer_pb2.Timing(
        queue_seconds=timing.queue_seconds,
        time_to_first_token_seconds=timing.time_to_first_token_seconds,
        total_seconds=timing.total_seconds,
    )
