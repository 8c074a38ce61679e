"""The scorer interface: ``(conversation, response)`` pairs in, one reward per named objective out.

A scorer returns two matrices of shape ``(n, k)`` (n pairs, k objectives, in ``scorer.objectives``
order):

* ``raw``: the scorer's own units (FLR: a difference of mean token log-likelihoods in nats; the
  length signal: ``-ln(1 + tokens)``; a trained reward model: its label scale).
* ``scaled``: the **common scale** every objective shares, so that a direction's weights mean
  something: ``(raw - mean) / std`` with per-objective statistics measured on a calibration set of
  prompts and responses (:mod:`steer.rewards.calibration`). 0 is the calibration set's average
  response, +1 is one standard deviation better than that. A scorer without calibration reports
  ``scaled == raw`` and says so in :meth:`Scorer.describe`.

Scorers compose: :class:`CompositeScorer` takes disjoint objective sets from several scorers
(e.g. FLR for helpfulness and creativity, the length signal for conciseness) and presents them as
one scorer over the union.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from steer.errors import InvalidInput
from steer.objectives import validate_objectives

Conversation = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class Rewards:
    """Reward vectors for n pairs: ``raw`` and ``scaled`` are ``(n, k)`` float32, columns in ``objectives`` order."""

    objectives: tuple[str, ...]
    raw: torch.Tensor  # (n, k)
    scaled: torch.Tensor  # (n, k)

    def __post_init__(self):
        k = len(self.objectives)
        for name in ("raw", "scaled"):
            t = getattr(self, name)
            if t.dim() != 2 or t.shape[1] != k:
                raise ValueError(f"Rewards.{name} must be (n, {k}), got {tuple(t.shape)}")
        if self.raw.shape != self.scaled.shape:
            raise ValueError(f"Rewards.raw {tuple(self.raw.shape)} and .scaled {tuple(self.scaled.shape)} differ")

    def __len__(self) -> int:
        return self.raw.shape[0]

    def row(self, i: int, scaled: bool = True) -> dict[str, float]:
        """Objective -> reward of pair ``i``."""
        values = (self.scaled if scaled else self.raw)[i].tolist()
        return dict(zip(self.objectives, values))

    def select(self, objectives: Sequence[str]) -> Rewards:
        """The same rewards with columns in the order of ``objectives`` (a permutation or subset)."""
        try:
            idx = [self.objectives.index(o) for o in objectives]
        except ValueError as e:
            raise KeyError(f"objectives {list(objectives)} are not all in {list(self.objectives)}") from e
        return Rewards(tuple(objectives), self.raw[:, idx], self.scaled[:, idx])

    @staticmethod
    def concat_objectives(parts: Sequence[Rewards]) -> Rewards:
        """Side by side: the objectives of every part, in order (the parts score the same n pairs)."""
        objectives = tuple(o for p in parts for o in p.objectives)
        return Rewards(objectives, torch.cat([p.raw for p in parts], dim=1),
                       torch.cat([p.scaled for p in parts], dim=1))


def check_pairs(conversations: Sequence[Conversation], responses: Sequence[str]) -> None:
    """The scorer input contract: equally many conversations and responses; each conversation a
    non-empty list of role/content turns ending with the user's; each response a string (may be
    empty: a generation can stop at once). Errors name ``conversations[i]`` / ``responses[i]``."""
    if isinstance(responses, str):
        raise InvalidInput("responses", "must be a sequence of strings, got one string")
    if len(conversations) != len(responses):
        raise InvalidInput("responses", f"{len(responses)} responses for {len(conversations)} conversations")
    for i, conv in enumerate(conversations):
        if not conv or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in conv):
            raise InvalidInput(f"conversations[{i}]", "must be a non-empty list of {role, content} turns")
        if conv[-1]["role"] != "user":
            raise InvalidInput(f"conversations[{i}]", f"must end with the user's turn, got {conv[-1]['role']!r}")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise InvalidInput(f"responses[{i}]", f"must be a string, got {type(r).__name__}")


class Scorer(abc.ABC):
    """Maps ``(conversation, response)`` pairs to reward vectors over ``objectives``.

    Subclasses implement :meth:`raw_scores` (batched over all pairs) and :meth:`describe`; scaling
    to the common scale is shared here through ``calibration``.
    """

    objectives: tuple[str, ...]
    calibration = None  # steer.rewards.calibration.Calibration | None; None: scaled == raw

    @abc.abstractmethod
    def raw_scores(self, conversations: Sequence[Conversation], responses: Sequence[str]) -> torch.Tensor:
        """``(n, k)`` float32 rewards in the scorer's own units; inputs already checked."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Human-readable, e.g. ``flr(helpfulness,creativity)``: what Describe.scorer reports."""

    def rewards(self, conversations: Sequence[Conversation], responses: Sequence[str]) -> Rewards:
        """Raw and common-scale reward vectors for each pair."""
        check_pairs(conversations, responses)
        if not responses:
            empty = torch.zeros(0, len(self.objectives))
            return Rewards(self.objectives, empty, empty)
        raw = self.raw_scores(conversations, responses).float()
        if raw.shape != (len(responses), len(self.objectives)):
            raise RuntimeError(f"{type(self).__name__}.raw_scores returned {tuple(raw.shape)}, "
                               f"expected ({len(responses)}, {len(self.objectives)})")
        scaled = raw if self.calibration is None else self.calibration.apply(raw, self.objectives)
        return Rewards(self.objectives, raw, scaled)

    def score(self, conversations: Sequence[Conversation], responses: Sequence[str]) -> torch.Tensor:
        """``(n, k)`` rewards on the common scale."""
        return self.rewards(conversations, responses).scaled


class CompositeScorer(Scorer):
    """Several scorers over disjoint objective sets, presented as one scorer over ``objectives``."""

    def __init__(self, parts: Sequence[Scorer], objectives: Sequence[str] | None = None):
        parts = list(parts)
        if not parts:
            raise ValueError("CompositeScorer needs at least one part")
        union = [o for p in parts for o in p.objectives]
        dupes = sorted({o for o in union if union.count(o) > 1})
        if dupes:
            raise InvalidInput("scorer", f"objectives {dupes} are scored by more than one part")
        objectives = validate_objectives(objectives if objectives is not None else union, "scorer.objectives")
        if sorted(objectives) != sorted(union):
            raise InvalidInput("scorer", f"parts score {union}, but the composite is asked for {list(objectives)}")
        self.parts = parts
        self.objectives = objectives

    def raw_scores(self, conversations, responses) -> torch.Tensor:
        return self.rewards(conversations, responses).raw

    def rewards(self, conversations: Sequence[Conversation], responses: Sequence[str]) -> Rewards:
        # Each part scales its own columns with its own calibration; the composite only reorders.
        check_pairs(conversations, responses)
        merged = Rewards.concat_objectives([p.rewards(conversations, responses) for p in self.parts])
        return merged.select(self.objectives)

    def describe(self) -> str:
        return "+".join(p.describe() for p in self.parts)
