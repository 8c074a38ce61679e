"""Reward-model training data: per-objective ratings and per-objective preference pairs.

Two row kinds, mixed freely in JSONL (one JSON object per line) or Parquet files:

* ratings (HelpSteer-style) -> regression on each rated objective (masked MSE)::

      {"prompt": "...", "response": "...", "helpfulness": 3, "conciseness": 1.5}
      {"messages": [{"role": "user", "content": "..."}], "response": "...", "creativity": 4}

  An objective that is absent or null is masked out of the loss; a row must rate at least one
  objective. Other columns (``correctness``, ``id``, ...) are ignored.

* preferences -> Bradley-Terry on the named objective's output::

      {"prompt": "...", "chosen": "...", "rejected": "...", "objective": "helpfulness"}

The conversation is ``prompt`` (one user turn) or ``messages`` (ending with a user turn),
validated by :func:`steer.conversation.build_conversation`. Every row is checked with its file
and line (Parquet: row number) before training starts; the first bad row stops the run with
``file:line: field: reason``. Files are read through ``datasets`` from local paths (nothing is
fetched from a hub); JSONL lines are first parsed here so that syntax errors carry line numbers,
and dataset row ``i`` maps back to the ``i``-th non-blank line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from steer.training.pairs import data_file  # one file-type table for all training data

from steer.conversation import build_conversation
from steer.errors import InvalidInput
from steer.files import json_lines  # one JSONL reader for all data files: errors name file:line


@dataclass(frozen=True)
class RatingExample:
    conversation: list[dict[str, str]]
    response: str
    labels: tuple[float | None, ...]  # one per objective, None = not rated (masked)
    where: str  # file:line


@dataclass(frozen=True)
class PreferenceExample:
    conversation: list[dict[str, str]]
    chosen: str
    rejected: str
    objective: int  # index into the objective tuple
    where: str


Example = RatingExample | PreferenceExample


def parse_row(row: Mapping, objectives: Sequence[str], where: str) -> Example:
    """Validate one row; errors are ``InvalidInput(where, "<column>: <reason>")``."""
    def bad(reason: str) -> InvalidInput:
        return InvalidInput(where, reason)

    if not isinstance(row, Mapping):
        raise bad(f"a row must be a JSON object, got {type(row).__name__}")
    prompt = row.get("prompt")
    messages = row.get("messages")
    if prompt is not None and not isinstance(prompt, str):
        raise bad(f"prompt: must be a string, got {type(prompt).__name__}")
    if messages is not None and not isinstance(messages, (list, tuple)):
        raise bad(f"messages: must be a list of {{role, content}} objects, got {type(messages).__name__}")
    try:
        conversation = build_conversation(prompt, messages)
    except InvalidInput as e:
        raise bad(str(e)) from None

    if "chosen" in row or "rejected" in row:
        texts = {}
        for key in ("chosen", "rejected"):
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                raise bad(f"{key}: a preference row needs non-empty chosen and rejected strings, got {value!r}")
            texts[key] = value
        objective = row.get("objective")
        if objective not in objectives:
            raise bad(f"objective: must be one of {', '.join(objectives)}, got {objective!r}")
        if texts["chosen"] == texts["rejected"]:
            raise bad("chosen and rejected are identical: the pair carries no preference")
        return PreferenceExample(conversation, texts["chosen"], texts["rejected"],
                                 list(objectives).index(objective), where)

    response = row.get("response")
    if not isinstance(response, str) or not response.strip():
        raise bad(
            f"response: must be a non-empty string, got {response!r} (a ratings row has response + objective scores; "
            "a preference row has chosen, rejected, objective)"
        )
    labels: list[float | None] = []
    for name in objectives:
        value = row.get(name)
        if value is None:
            labels.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(f"{name}: must be a finite number or null, got {value!r}")
        labels.append(float(value))
    if all(v is None for v in labels):
        raise bad(f"rates none of the objectives ({', '.join(objectives)}); give at least one score")
    return RatingExample(conversation, response, tuple(labels), where)


def read_reward_file(path: str | Path, objectives: Sequence[str]) -> list[Example]:
    """All rows of one JSONL/Parquet file as examples, or ``InvalidInput`` at the first bad row."""
    import datasets

    path, builder = data_file(path)
    if builder == "json":
        lines = []
        for lineno, obj in json_lines(path):
            parse_row(obj, objectives, f"{path}:{lineno}")  # every row checked before datasets sees it
            lines.append(lineno)
        if not lines:
            raise InvalidInput(str(path), "has no rows")
        where = [f"{path}:{n}" for n in lines]
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # pyarrow type conflicts and the like; the file is the best location we have
        raise InvalidInput(str(path), f"datasets could not read it: {type(e).__name__}: {e}") from e
    if builder == "parquet":
        where = [f"{path}:row {i + 1}" for i in range(len(table))]
        if not where:
            raise InvalidInput(str(path), "has no rows")
    if len(table) != len(where):
        raise InvalidInput(str(path), f"datasets read {len(table)} rows but the file has {len(where)} non-blank lines")
    return [parse_row(row, objectives, w) for row, w in zip(table, where)]


def read_reward_files(paths: Sequence[str | Path], objectives: Sequence[str]) -> list[Example]:
    examples: list[Example] = []
    for p in paths:
        examples.extend(read_reward_file(p, objectives))
    return examples
