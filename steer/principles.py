"""Principles: plain-language instructions per objective, and how a direction picks them.

The base model ignores the numeric direction line but follows plain instructions ("Answer in one
short sentence." halves the length). Principle-guided exploration (RLCD, Yang et al. 2023,
arXiv 2307.12950; context distillation, Askell et al. 2021) uses that: for a direction ``v`` it
samples the base model under instructions chosen *for* ``v`` and *against* ``v``, so the
candidate pool that ``v . r`` chooses from really differs in the objectives ``v`` weighs. The
training prompt then carries only the direction line, so the policy learns to do from the line
what the instructions made the base model do.

The file (JSON; the shipped one is ``steer/data/principles.json``)::

    {
      "format": "steer.principles/v1",
      "selection": {"max_objectives": 2, "min_weight": 0.3},
      "objectives": {
        "helpfulness": {"positive": ["...", ...], "negative": ["...", ...]},
        ...
      }
    }

Each objective has at least :data:`MIN_PER_POLARITY` positive and negative instructions (one
sentence or two, imperative, no surrounding spaces, no duplicates).

**Selection for a direction** (:meth:`Principles.instruction`): the objectives of ``v`` sorted by
weight (ties in the objective order), keeping the heaviest always and any other whose weight is at
least ``min_weight``, at most ``max_objectives`` of them. *For* ``v`` takes one random positive
instruction of each kept objective; *against* ``v`` one random negative instruction of each. The
instructions are joined with a space, heaviest objective first. So ``conciseness=1`` gives e.g.
"Answer in one short sentence." for and "Give a long, detailed answer of several paragraphs."
against; ``helpfulness=0.5, creativity=0.5`` combines one instruction of each.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steer.errors import InvalidInput
from steer.objectives import Direction

FORMAT = "steer.principles/v1"
MIN_PER_POLARITY = 6
POLARITIES = ("positive", "negative")
PACKAGED_PRINCIPLES = Path(__file__).parent / "data" / "principles.json"
_TOP_KEYS = {"format", "description", "selection", "objectives"}
_SELECTION_KEYS = {"max_objectives", "min_weight"}


@dataclass(frozen=True)
class Selection:
    max_objectives: int = 2  # instructions combine at most this many objectives
    min_weight: float = 0.3  # an objective other than the heaviest joins when its weight is at least this


@dataclass(frozen=True)
class Principles:
    objectives: Mapping[str, Mapping[str, tuple[str, ...]]]  # objective -> {"positive": (...), "negative": (...)}
    selection: Selection = Selection()
    source: str = "<memory>"

    def covers(self, objectives: Sequence[str], field: str = "principles") -> None:
        """Refuse a principles set that lacks an objective the run trains."""
        missing = [o for o in objectives if o not in self.objectives]
        if missing:
            raise InvalidInput(field, f"{self.source} has no instructions for objectives {missing} "
                                      f"(it has {sorted(self.objectives)})")

    def chosen_objectives(self, direction: Direction) -> list[str]:
        """The objectives whose instructions serve ``direction`` (see the module docstring)."""
        order = sorted(range(len(direction.objectives)), key=lambda i: (-direction.weights[i], i))
        kept = [direction.objectives[order[0]]]
        for i in order[1:]:
            if len(kept) >= self.selection.max_objectives:
                break
            if direction.weights[i] > 0 and direction.weights[i] >= self.selection.min_weight:
                kept.append(direction.objectives[i])
        return kept

    def instruction(self, direction: Direction, polarity: str, rng: np.random.Generator) -> str:
        """One instruction text *for* (``positive``) or *against* (``negative``) ``direction``."""
        if polarity not in POLARITIES:
            raise ValueError(f"polarity must be one of {POLARITIES}, got {polarity!r}")
        self.covers(direction.objectives)
        parts = []
        for o in self.chosen_objectives(direction):
            options = self.objectives[o][polarity]
            parts.append(options[int(rng.integers(len(options)))])
        return " ".join(parts)


def load_principles(path: str | Path | None = None) -> Principles:
    """Read and validate a principles file (``None``: the shipped one). Errors name the file and the
    key (``objectives.creativity.negative[2]``) or, for a JSON syntax error, the line."""
    path = PACKAGED_PRINCIPLES if path is None else Path(path)
    where = str(path)
    if not path.is_file():
        raise InvalidInput("principles", f"{where}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InvalidInput("principles", f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InvalidInput("principles", f"{where}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    return parse_principles(data, where)


def parse_principles(data, where: str = "<memory>") -> Principles:
    def bad(key: str, reason: str):
        return InvalidInput("principles", f"{where}: {key}: {reason}")

    if not isinstance(data, dict):
        raise bad("<top level>", f"must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise bad(unknown[0], f"unknown key (allowed: {', '.join(sorted(_TOP_KEYS))})")
    if data.get("format", FORMAT) != FORMAT:
        raise bad("format", f"is {data['format']!r}; this version reads {FORMAT!r}")

    sel = data.get("selection", {})
    if not isinstance(sel, dict):
        raise bad("selection", "must be an object {\"max_objectives\": int, \"min_weight\": float}")
    unknown = sorted(set(sel) - _SELECTION_KEYS)
    if unknown:
        raise bad(f"selection.{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(_SELECTION_KEYS))})")
    max_obj = sel.get("max_objectives", Selection.max_objectives)
    if isinstance(max_obj, bool) or not isinstance(max_obj, int) or max_obj < 1:
        raise bad("selection.max_objectives", f"must be an integer >= 1, got {max_obj!r}")
    min_w = sel.get("min_weight", Selection.min_weight)
    if isinstance(min_w, bool) or not isinstance(min_w, (int, float)) or not 0 <= min_w <= 1:
        raise bad("selection.min_weight", f"must be a number in [0, 1], got {min_w!r}")

    objs = data.get("objectives")
    if not isinstance(objs, dict) or not objs:
        raise bad("objectives", "is required: an object {objective: {\"positive\": [...], \"negative\": [...]}}")
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for name, entry in objs.items():
        key = f"objectives.{name}"
        if not isinstance(entry, dict):
            raise bad(key, "must be an object with 'positive' and 'negative' lists")
        extra = sorted(set(entry) - set(POLARITIES))
        if extra:
            raise bad(f"{key}.{extra[0]}", "unknown key (allowed: positive, negative)")
        out[name] = {}
        for polarity in POLARITIES:
            items = entry.get(polarity)
            if not isinstance(items, list):
                raise bad(f"{key}.{polarity}", f"is required: a list of at least {MIN_PER_POLARITY} instructions")
            if len(items) < MIN_PER_POLARITY:
                raise bad(f"{key}.{polarity}", f"has {len(items)} instructions; at least {MIN_PER_POLARITY} are needed")
            seen: set[str] = set()
            for i, text in enumerate(items):
                if not isinstance(text, str) or not text.strip():
                    raise bad(f"{key}.{polarity}[{i}]", f"must be non-empty text, got {text!r}")
                if text != text.strip():
                    raise bad(f"{key}.{polarity}[{i}]", "has leading or trailing spaces")
                if text in seen:
                    raise bad(f"{key}.{polarity}[{i}]", f"repeats {text!r}")
                seen.add(text)
            out[name][polarity] = tuple(items)
    return Principles(objectives=out, selection=Selection(int(max_obj), float(min_w)), source=where)


def instructed_messages(messages: Sequence[Mapping[str, str]], instruction: str,
                        default_system: str | None = None) -> list[dict[str, str]]:
    """A copy of ``messages`` whose system message ends with ``instruction`` (after a blank line);
    a conversation without one gets the default system prompt plus the instruction."""
    from steer.conditioning import DEFAULT_SYSTEM

    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = f"{messages[0]['content'].rstrip()}\n\n{instruction}"
    else:
        messages.insert(0, {"role": "system", "content": f"{default_system or DEFAULT_SYSTEM}\n\n{instruction}"})
    return messages
