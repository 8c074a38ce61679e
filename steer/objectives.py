"""Objectives and directions: the one place that turns user weights into a :class:`Direction`.

A direction is a point on the probability simplex over a named objective set. Every other part of
steer takes a ``Direction``, never a raw dict, so validation and normalisation live here only.

>>> d = Direction.from_weights({"helpfulness": 0.7, "creativity": 0.3})
>>> d.as_dict()
{'helpfulness': 0.7, 'creativity': 0.3, 'conciseness': 0.0}
>>> round(d.dot([1.0, 2.0, 3.0]), 6)
1.3
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from steer.errors import InvalidInput

DEFAULT_OBJECTIVES: tuple[str, ...] = ("helpfulness", "creativity", "conciseness")


def validate_objectives(names: Iterable[str], field: str = "objectives") -> tuple[str, ...]:
    """Check an objective set (non-empty, unique, identifier-like names) and return it as a tuple."""
    names = tuple(names)
    if not names:
        raise InvalidInput(field, "at least one objective is required")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name or not name.replace("_", "").isalnum():
            raise InvalidInput(f"{field}[{i}]", f"objective names are letters, digits and '_', got {name!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidInput(field, f"duplicate objective names {dupes}")
    return names


@dataclass(frozen=True)
class Direction:
    """Normalised objective weights: ``weights[i] >= 0`` and ``sum(weights) == 1``."""

    objectives: tuple[str, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        validate_objectives(self.objectives)
        if len(self.weights) != len(self.objectives):
            raise InvalidInput("weights", f"{len(self.weights)} weights for {len(self.objectives)} objectives")
        for name, w in zip(self.objectives, self.weights):
            if not math.isfinite(w) or w < 0:
                raise InvalidInput(f"weights[{name}]", f"must be finite and >= 0, got {w!r}")
        if abs(sum(self.weights) - 1.0) > 1e-6:
            raise InvalidInput("weights",
                               f"a Direction sums to 1, got {sum(self.weights)!r}; use Direction.from_weights")

    @classmethod
    def from_weights(
        cls,
        weights: Mapping[str, float],
        objectives: Sequence[str] = DEFAULT_OBJECTIVES,
        field: str = "weights",
    ) -> Direction:
        """Validate raw weights and normalise them onto the simplex.

        Rules: every key is a known objective; every value is a finite number >= 0; a missing
        objective weighs 0; not all weights are zero. ``field`` prefixes error messages
        (e.g. ``weights[creativity]: must be finite and >= 0, got nan``).
        """
        objectives = validate_objectives(objectives)
        if not isinstance(weights, Mapping):
            raise InvalidInput(field, f"expected a mapping of objective -> weight, got {type(weights).__name__}")
        unknown = sorted(str(k) for k in weights if k not in objectives)
        if unknown:
            raise InvalidInput(
                f"{field}[{unknown[0]}]",
                f"unknown objective {unknown[0]!r}; known objectives are {', '.join(objectives)}",
            )
        raw = []
        for name in objectives:
            value = weights.get(name, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidInput(f"{field}[{name}]", f"must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value) or value < 0:
                raise InvalidInput(f"{field}[{name}]", f"must be finite and >= 0, got {value!r}")
            raw.append(value)
        largest = max(raw)
        if largest <= 0:
            raise InvalidInput(field, f"at least one weight must be > 0 (objectives: {', '.join(objectives)})")
        # Scale by the largest weight first so huge (finite) weights cannot overflow the sum.
        scaled = [w / largest for w in raw]
        total = math.fsum(scaled)
        return cls(objectives, tuple(w / total for w in scaled))

    @classmethod
    def uniform(cls, objectives: Sequence[str] = DEFAULT_OBJECTIVES) -> Direction:
        objectives = validate_objectives(objectives)
        return cls(objectives, tuple(1.0 / len(objectives) for _ in objectives))

    @classmethod
    def corner(cls, objective: str, objectives: Sequence[str] = DEFAULT_OBJECTIVES) -> Direction:
        """All weight on one objective."""
        return cls.from_weights({objective: 1.0}, objectives)

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.objectives, self.weights))

    def __getitem__(self, name: str) -> float:
        try:
            return self.weights[self.objectives.index(name)]
        except ValueError:
            raise KeyError(name) from None

    def dot(self, rewards: Sequence[float] | Mapping[str, float]) -> float:
        """The user's scalar ``v . r`` for one reward vector (a sequence in objective order, or a mapping)."""
        if isinstance(rewards, Mapping):
            missing = [n for n in self.objectives if n not in rewards]
            if missing:
                raise InvalidInput("rewards", f"missing objectives {missing}")
            values = [float(rewards[n]) for n in self.objectives]
        else:
            values = [float(r) for r in rewards]
            if len(values) != len(self.objectives):
                raise InvalidInput("rewards", f"{len(values)} values for {len(self.objectives)} objectives")
        return math.fsum(w * r for w, r in zip(self.weights, values))
