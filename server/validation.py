"""One validation for every transport: the fields of a generate request become a :class:`SteerRequest`.

The gRPC servicer and the HTTP API (both a :class:`Transport`) decode their wire formats into plain
Python values and call :func:`build_steer_request` through :meth:`Transport.steer_request`. The
rules live here and in the domain types it calls (:func:`~steer.conversation.build_conversation`,
:meth:`Direction.from_weights <steer.objectives.Direction.from_weights>`,
:class:`~steer.sampling.SamplingParams`); they raise
:class:`~steer.errors.InvalidInput` naming the field as the gRPC contract spells it
(``weights[creativity]``, ``sampling.max_new_tokens``, ``messages[1].role``). A transport whose
requests spell a field differently renames ``InvalidInput.field`` for its users and nothing more.

Checks run in a fixed order (conversation, text size, weights, strategy, candidates, rewards,
sampling), so a request with several faults gets the same first error from either transport.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from steer.server.engine import Engine
from steer.server.strategies import SteerRequest, Strategy, StrategyUnavailable

from steer.conversation import build_conversation
from steer.errors import InvalidInput
from steer.objectives import Direction
from steer.rewards.service import ScoringService
from steer.sampling import SamplingParams

# Overrides a request may give for SamplingParams (None: the server's default).
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "dry_multiplier", "dry_base",
                   "dry_allowed_length")


@dataclass(frozen=True)
class ServiceInfo:
    """What the server describes beyond the engine's own limits, and the request limits both transports apply."""

    model_id: str
    adapter: str | None
    objectives: tuple[str, ...]
    sampling_defaults: SamplingParams
    max_message_bytes: int
    max_candidates: int = 16
    scorer: str = ""
    version: str = ""
    max_input_bytes: int | None = None  # UTF-8 bytes of text per conversation (and per Score response); None: no check


class ScorerUnavailable(Exception):
    """The request asks for something only a reward scorer can give (``field``), and this server runs none."""

    def __init__(self, field: str, reason: str):
        self.field = field
        super().__init__(f"{field}: {reason}")


def check_text_bytes(texts: Sequence[str], field: str, limit: int | None) -> None:
    """Refuse text that cannot fit the context before any CPU is spent rendering or tokenising it."""
    if limit is None:
        return
    size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
    if size > limit:
        raise InvalidInput(field, f"is {size} bytes of text; this server takes at most {limit} bytes here; shorten it")


def sampling_params(overrides: Mapping[str, object], defaults: SamplingParams,
                    max_new_tokens_limit: int) -> SamplingParams:
    """``defaults`` with the request's overrides (keys of :data:`SAMPLING_FIELDS`; None keeps the default)."""
    params = defaults.with_overrides(**overrides)
    if params.max_new_tokens > max_new_tokens_limit:
        raise InvalidInput(
            "sampling.max_new_tokens",
            f"must be <= {max_new_tokens_limit} (this server's limit), got {params.max_new_tokens}"
        )
    return params


def offered_strategy(strategies: Mapping[str, Strategy], name: str, spell=str.upper) -> Strategy:
    """The strategy object this server offers under ``name``; ``spell`` writes names as the transport does."""
    strategy = strategies.get(name)
    if strategy is None:
        offered = ", ".join(spell(s) for s in strategies)
        how = {"mixture": "; it needs per-objective adapters: start the server with --mixture DIR "
                          "(a python -m steer.train mixture output) or --mixture default where the package ships one",
               "rerank": "; it needs a reward scorer: start the server with --scorer default"}.get(name, "")
        raise StrategyUnavailable(f"strategy: {spell(name)} is not offered by this server (offered: {offered}){how}")
    return strategy


def build_steer_request(
    info: ServiceInfo,
    *,
    max_new_tokens_limit: int,
    has_scorer: bool,
    prompt: str | None,
    messages: Sequence[Mapping[str, str]] | None,
    weights: Mapping[str, float],
    strategy: object,
    strategy_names: Mapping[object, str],
    candidates: object = 0,
    return_candidates: object = False,
    return_rewards: object = False,
    sampling: Mapping[str, object] | None = None,
    deadline: float | None = None,
) -> SteerRequest:
    """Validate one generate request and return it as a :class:`SteerRequest`.

    ``strategy`` is the request's own value (a gRPC enum number, an HTTP string) and
    ``strategy_names`` maps the values the transport knows to strategy names. ``deadline`` is a
    ``time.monotonic()`` value or None. Raises :class:`InvalidInput` or :class:`ScorerUnavailable`.
    """
    conversation = build_conversation(prompt, messages)
    input_field = "messages" if messages else "prompt"
    check_text_bytes([m["content"] for m in conversation], input_field, info.max_input_bytes)
    direction = Direction.from_weights(weights, info.objectives)
    try:
        known_strategy = strategy in strategy_names
    except TypeError:  # an unhashable value (a JSON list or object)
        known_strategy = False
    if not known_strategy:
        known = ", ".join(repr(k) if isinstance(k, str) else str(k) for k in strategy_names)
        shown = repr(strategy) if isinstance(strategy, str) else strategy
        raise InvalidInput("strategy", f"unknown value {shown} (known: {known})")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 0:
        raise InvalidInput("candidates", f"must be an integer >= 0 (0: the server's default), got {candidates!r}")
    if candidates > info.max_candidates:
        raise InvalidInput("candidates", f"must be <= {info.max_candidates}, got {candidates}")
    for name, value in (("return_candidates", return_candidates), ("return_rewards", return_rewards)):
        if not isinstance(value, bool):
            raise InvalidInput(name, f"must be true or false, got {value!r}")
    if return_rewards and not has_scorer:
        raise ScorerUnavailable(
            "return_rewards",
            "this server runs no reward scorer (it was started with --scorer none), so it cannot measure rewards; "
            "start it with --scorer default, flr or a reward model directory",
        )
    params = sampling_params(sampling or {}, info.sampling_defaults, max_new_tokens_limit)
    return SteerRequest(
        conversation=conversation,
        direction=direction,
        params=params,
        strategy=strategy_names[strategy],
        candidates=candidates,
        return_candidates=return_candidates,
        return_rewards=return_rewards,
        deadline=deadline,
        input_field=input_field,
    )


class Transport:
    """What the gRPC servicer and the HTTP API both serve from: the engine, the strategies this
    server offers (by name), its description, and its reward scorer (None: it runs none)."""

    def __init__(self, engine: Engine, strategies: dict[str, Strategy], info: ServiceInfo,
                 scoring: ScoringService | None = None):
        self.engine = engine
        self.strategies = strategies
        self.info = info
        self.scoring = scoring

    def steer_request(self, **fields: Any) -> SteerRequest:
        """:func:`build_steer_request` under this server's limits: the engine's max_new_tokens, whether it scores."""
        return build_steer_request(self.info, max_new_tokens_limit=self.engine.config.max_new_tokens,
                                   has_scorer=self.scoring is not None, **fields)
