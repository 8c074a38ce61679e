"""Steerability evaluation inputs: the direction grid (``--grid``) and the prompt sets (``--prompts``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from steer.errors import InvalidInput
from steer.files import LineError, json_lines
from steer.objectives import DEFAULT_OBJECTIVES, Direction, validate_objectives

DEFAULT_GRID = "default"
MAX_SIMPLEX_STEPS = 20  # simplex:N has C(N+k-1, k-1) points: 231 directions at N=20, k=3


# ------------------------------------------------------------------------------------- directions

def direction_grid(spec: str, objectives: Sequence[str] = DEFAULT_OBJECTIVES, field: str = "grid") -> list[Direction]:
    """The directions a spec names, without duplicates, in a stable order.

    * ``default``: every corner, the uniform mix, and every pairwise 50/50 mix
    * ``corners``: every corner
    * ``simplex:N``: every point whose weights are multiples of 1/N
    * ``name=w,name=w;name=w;...``: explicit directions (normalised like request weights)
    """
    objectives = validate_objectives(objectives)
    spec = (spec or "").strip()
    if spec in ("default", "corners"):
        out = [Direction.corner(o, objectives) for o in objectives]
        if spec == "default":
            out.append(Direction.uniform(objectives))
            out += [Direction.from_weights({a: 1.0, b: 1.0}, objectives) for a, b in combinations(objectives, 2)]
    elif spec.startswith("simplex:"):
        steps = spec.partition(":")[2]
        if not steps.isdigit() or not 1 <= int(steps) <= MAX_SIMPLEX_STEPS:
            raise InvalidInput(field, f"simplex:N needs an integer N in 1..{MAX_SIMPLEX_STEPS}, got {spec!r}")
        out = [Direction.from_weights(dict(zip(objectives, c)), objectives)
               for c in _compositions(int(steps), len(objectives))]
    elif "=" in spec:
        out = []
        for i, part in enumerate(p for p in spec.split(";") if p.strip()):
            weights = {}
            for item in part.split(","):
                name, eq, value = item.strip().partition("=")
                try:
                    weights[name.strip()] = float(value)
                except ValueError:
                    raise InvalidInput(f"{field}[{i}]", f"expected name=weight, got {item.strip()!r}") from None
                if not eq:
                    raise InvalidInput(f"{field}[{i}]", f"expected name=weight, got {item.strip()!r}")
            out.append(Direction.from_weights(weights, objectives, field=f"{field}[{i}]"))
    else:
        raise InvalidInput(field,
                           f"expected 'default', 'corners', 'simplex:N' or 'name=w,...;name=w,...', got {spec!r}")
    unique: dict[tuple[float, ...], Direction] = {}
    for d in out:
        unique.setdefault(tuple(round(w, 9) for w in d.weights), d)
    return list(unique.values())


def _compositions(total: int, parts: int):
    """Every tuple of ``parts`` non-negative integers summing to ``total``, lexicographically descending."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total, -1, -1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def direction_label(direction: Direction) -> str:
    """Short plot/table label: the objective's name for a corner, ``uniform``, else ``h.50 cr.50``."""
    nonzero = [(o, w) for o, w in zip(direction.objectives, direction.weights) if w > 0]
    if len(nonzero) == 1:
        return nonzero[0][0]
    if len(nonzero) == len(direction.objectives) and max(direction.weights) - min(direction.weights) < 1e-9:
        return "uniform"
    short = _short_names(direction.objectives)
    return " ".join(f"{short[o]}{w:.2f}".replace("0.", ".", 1) for o, w in nonzero)


def _short_names(objectives: Sequence[str]) -> dict[str, str]:
    """The shortest prefix that tells each objective from the others (helpfulness -> h, creativity -> cr)."""
    out = {}
    for o in objectives:
        n = 1
        while n < len(o) and any(p != o and p.startswith(o[:n]) for p in objectives):
            n += 1
        out[o] = o[:n]
    return out


# ---------------------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    category: str = ""


def default_prompts_path(split: str = "heldout") -> Path:
    """The prompt set shipped in ``steer.training`` (``train`` or ``heldout``).

    Located through the import system without importing ``steer.training`` (the core never does),
    so it works for the editable checkout and for an installed wheel alike.
    """
    import importlib.util

    names = {"train": "prompts.jsonl", "heldout": "prompts_heldout.jsonl"}
    if split not in names:
        raise InvalidInput("split", f"expected one of {sorted(names)}, got {split!r}")
    spec = importlib.util.find_spec("steer.training")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("steer.training is not installed: pass --prompts explicitly")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / names[split]


def load_prompts(path: str | Path, field: str = "prompts") -> list[PromptRecord]:
    """Read a JSONL prompt set; errors name ``file:line``. Blank lines are skipped."""
    path = Path(path)
    out = []
    try:
        for lineno, row in json_lines(path):
            where = f"{path}:{lineno}"
            if not isinstance(row, dict):
                raise InvalidInput(field, f"{where}: expected an object {{\"prompt\": ..., \"category\": ...}}")
            prompt, category = row.get("prompt"), row.get("category", "")
            if not isinstance(prompt, str) or not prompt.strip():
                raise InvalidInput(field, f"{where}: 'prompt' must be a non-empty string")
            if not isinstance(category, str):
                raise InvalidInput(field, f"{where}: 'category' must be a string")
            out.append(PromptRecord(prompt, category))
    except LineError as e:  # keeps this command's wording: "<field>: <file>:<line>: not valid JSON (<why>)"
        reason = f"not valid JSON ({e.cause.msg})" if isinstance(e.cause, json.JSONDecodeError) else e.reason
        raise InvalidInput(field, f"{e.field}: {reason}") from None
    except OSError as e:
        raise InvalidInput(field, f"cannot read {path}: {e.strerror or e}") from None
    if not out:
        raise InvalidInput(field, f"{path} holds no prompts")
    return out
