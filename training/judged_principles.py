"""Principles files for ``label`` and ``icai``: reading (two formats, errors at file:line) and writing.

**Judged principles** (``steer.judged-principles/v1``; the shipped candidate library
``steer/data/icai_candidates.json`` and the ``principles.json`` that ``icai`` writes)::

    {
      "format": "steer.judged-principles/v1",                     optional
      "description": "...",                                        optional
      "followups": {"positive": ["Thanks, that was {statement}."],  optional: templates for entries
                    "negative": ["That was {opposite}."]},          that give a statement (default:
                                                                    steer.rewards.principle_judge)
      "principles": [
        {"id": "shorter", "text": "Select the shorter, more concise response.",
         "statement": "short and to the point", "opposite": "long-winded and wordy"},
        {"id": "polite", "text": "Select the more polite response.",
         "positive": ["Thanks, that was kind of you."], "negative": ["That was rude."],
         "instructions": ["Be polite."], "counter_instructions": ["Be rude."]},   optional
        ...
      ]
    }

An entry needs ``text`` and either ``statement`` (``opposite`` defaults to ``not <statement>``) or
both ``positive`` and ``negative`` follow-up lists (which are used as given; a ``statement`` beside
them is documentation). The instruction judge's ``instructions`` / ``counter_instructions`` (lists,
together) default to :data:`~steer.rewards.principle_judge.INSTRUCTION_TEMPLATES` filled with the
statement; an entry with neither is judged by follow-ups only (``--judge followup``).
``id`` defaults to ``p<n>`` (its position, from 1). The figures ``icai``
writes (``agreement``, ``coverage``, ``train_agreement``, ``train_coverage``, ``rank``, ``source``)
are accepted and ignored on reading. Any other key is an error naming the file and its line.

**Objective principles** (``steer.principles/v1``, the DPA file of :mod:`steer.principles`): each
objective becomes one principle, judged by FLR's own follow-ups for it
(:data:`steer.rewards.followups.BUILTIN_FOLLOWUPS`: helpfulness, creativity, conciseness) or,
for the instruction judge, by its own positive and negative instructions. An objective without built-in
follow-ups is an error at its line.

Errors are :class:`~steer.errors.InvalidInput` with field ``<file>:<line>`` and a reason that names
the key (``principles[3].txt: unknown key ...``). JSON is parsed with a line-tracking decoder (the
standard library's pure-Python scanner with object and array hooks that record where each one
starts and where its keys are), so a key is located in a file of any layout.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from json.decoder import JSONArray, JSONObject
from json.scanner import py_make_scanner
from pathlib import Path

from steer.errors import InvalidInput
from steer.files import atomic_write_text
from steer.principles import FORMAT as OBJECTIVES_FORMAT
from steer.principles import PACKAGED_PRINCIPLES, parse_principles
from steer.rewards.principle_judge import DEFAULT_TEMPLATES, JudgedPrinciple, check_templates

FORMAT = "steer.judged-principles/v1"
PACKAGED_CANDIDATES = PACKAGED_PRINCIPLES.parent / "icai_candidates.json"
TOP_KEYS = ("format", "description", "followups", "principles")
ENTRY_KEYS = ("id", "text", "statement", "opposite", "positive", "negative", "instructions", "counter_instructions")
RESULT_KEYS = ("agreement", "coverage", "train_agreement", "train_coverage", "rank", "source")  # written by icai
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


# -- JSON with line numbers -------------------------------------------------------------------

class _Lined:
    line: int = 1  # where the object or array opens
    key_lines: dict  # object key -> line of the key


class LinedDict(dict, _Lined):
    pass


class LinedList(list, _Lined):
    pass


def _line_at(s: str, pos: int) -> int:
    return s.count("\n", 0, pos) + 1


def _parse_object(s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None):
    s, start = s_and_end
    pairs, end = JSONObject(s_and_end, strict, scan_once, None, list, memo)
    obj = LinedDict(pairs)
    obj.line, obj.key_lines = _line_at(s, start - 1), {}
    at = start
    for key, _ in pairs:  # each key's quoted text, searched in order (a value never comes before its key)
        found = s.find(json.dumps(key, ensure_ascii=False), at, end)
        if found < 0:
            found = s.find(json.dumps(key), at, end)
        if found >= 0:
            obj.key_lines[key], at = _line_at(s, found), found + 1
        else:
            obj.key_lines[key] = obj.line
    return obj, end


def _parse_array(s_and_end, scan_once):
    s, start = s_and_end
    values, end = JSONArray(s_and_end, scan_once)
    arr = LinedList(values)
    arr.line, arr.key_lines = _line_at(s, start - 1), {}
    return arr, end


def load_json_lines(path: str | Path, field: str = "principles"):
    """The JSON value in ``path``, its objects and arrays carrying ``.line`` (and objects ``.key_lines``).

    Errors: InvalidInput(field, ...) for a missing file; InvalidInput("<file>:<line>", ...) for bad
    UTF-8 or bad JSON."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(field, f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InvalidInput(f"{path}:{line}",
                           f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
    if not text.strip():
        raise InvalidInput(f"{path}:1", "is empty: expected a JSON object")
    decoder = json.JSONDecoder()
    decoder.parse_object, decoder.parse_array = _parse_object, _parse_array
    decoder.scan_once = py_make_scanner(decoder)
    try:
        return decoder.decode(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{path}:{e.lineno}", f"not valid JSON ({e.msg} at column {e.colno})") from None


def _line(obj, key=None) -> int:
    if key is not None and isinstance(obj, _Lined) and key in obj.key_lines:
        return obj.key_lines[key]
    return getattr(obj, "line", 1)


def _line_of_path(data, path: str) -> int:
    """The line of a dotted/indexed key path (``objectives.creativity.negative[2]``), as deep as it resolves."""
    line, node = _line(data), data
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            index = int(part[1:-1])
            if not isinstance(node, list) or index >= len(node):
                break
            node = node[index]
            line = getattr(node, "line", line)
        else:
            if not isinstance(node, dict) or part not in node:
                break
            line, node = _line(node, part), node[part]
    return line


# -- reading ----------------------------------------------------------------------------------

def read_principles_file(path: str | Path, field: str = "principles",
                         display: str | None = None) -> list[JudgedPrinciple]:
    """The principles in a judged-principles or objective-principles file (module docstring), in file order.

    ``display``: how messages and each principle's ``source`` name the file (default: ``path``)."""
    data = load_json_lines(path, field)
    path = Path(display) if display else Path(path)
    if not isinstance(data, dict):
        raise InvalidInput(f"{path}:{_line(data)}",
                           f"must be a JSON object with a 'principles' list, got {type(data).__name__}")
    fmt = data.get("format")
    if fmt == OBJECTIVES_FORMAT or (fmt is None and "objectives" in data and "principles" not in data):
        return _objective_principles(path, data)
    if fmt is not None and fmt != FORMAT:
        raise InvalidInput(f"{path}:{_line(data, 'format')}",
                           f"format: is {fmt!r}; this version reads {FORMAT!r} or {OBJECTIVES_FORMAT!r}")
    return _judged_principles(path, data)


def _judged_principles(path: Path, data: dict) -> list[JudgedPrinciple]:
    def bad(line: int, key: str, reason: str) -> InvalidInput:
        return InvalidInput(f"{path}:{line}", f"{key}: {reason}")

    for key in data:
        if key not in TOP_KEYS:
            raise bad(_line(data, key), key, f"unknown key (allowed: {', '.join(TOP_KEYS)})")
    if "description" in data and not isinstance(data["description"], str):
        raise bad(_line(data, "description"), "description", "must be text")
    templates = DEFAULT_TEMPLATES
    if "followups" in data:
        t = data["followups"]
        if not isinstance(t, dict):
            raise bad(_line(data, "followups"), "followups",
                      'must be an object {"positive": [templates], "negative": [templates]}')
        for key in t:
            if key not in ("positive", "negative"):
                raise bad(_line(t, key), f"followups.{key}", "unknown key (allowed: positive, negative)")
        try:
            check_templates(t)
        except InvalidInput as e:
            raise bad(_line_of_path(data, e.field), e.field, e.reason) from None
        templates = {"positive": tuple(t["positive"]), "negative": tuple(t["negative"])}
    items = data.get("principles")
    if not isinstance(items, list):
        raise bad(_line(data, "principles") if "principles" in data else _line(data), "principles",
                  "is required: a list of {\"text\": ..., \"statement\": ...} entries")
    if not items:
        raise bad(_line(data, "principles"), "principles", "is empty: give at least one principle")
    out: list[JudgedPrinciple] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(items):
        name = f"principles[{i}]"
        if not isinstance(entry, dict):
            raise bad(getattr(entry, "line", _line(items)), name,
                      f"must be an object with text and statement, got {type(entry).__name__}")
        for key in entry:
            if key not in ENTRY_KEYS + RESULT_KEYS:
                raise bad(_line(entry, key), f"{name}.{key}", f"unknown key (allowed: {', '.join(ENTRY_KEYS)}; "
                                                              f"and {', '.join(RESULT_KEYS)}, which icai writes)")

        def text_of(key: str, required: bool) -> str | None:
            value = entry.get(key)
            if value is None and not required and key not in entry:
                return None
            if not isinstance(value, str) or not value.strip():
                where = _line(entry, key) if key in entry else entry.line
                raise bad(where, f"{name}.{key}",
                          "is missing" if key not in entry else f"must be non-empty text, got {value!r}")
            return value.strip()

        text = text_of("text", True)
        pid = text_of("id", False) or f"p{i + 1}"
        if not _ID.match(pid):
            raise bad(_line(entry, "id"), f"{name}.id",
                      f"must be letters, digits, '_' and '-' (starting with a letter or digit), got {pid!r}")
        if pid in seen:
            raise bad(_line(entry, "id") if "id" in entry else entry.line, f"{name}.id",
                      f"{pid!r} is already the id of the principle at line {seen[pid]}")
        seen[pid] = entry.line
        source = f"{path}:{entry.line}"
        has_pos, has_neg = "positive" in entry, "negative" in entry
        if has_pos != has_neg:
            missing = "negative" if has_pos else "positive"
            raise bad(entry.line, f"{name}.{missing}", "is missing: positive and negative follow-ups come together")
        def texts(side: str, what: str) -> tuple[str, ...]:
            value = entry[side]
            if not isinstance(value, list) or not value:
                raise bad(_line(entry, side), f"{name}.{side}", f"must be a non-empty list of {what} texts")
            for k, f in enumerate(value):
                if not isinstance(f, str) or not f.strip() or f != f.strip():
                    raise bad(_line(entry, side), f"{name}.{side}[{k}]",
                              f"must be text without surrounding spaces, got {f!r}")
            return tuple(value)

        if ("instructions" in entry) != ("counter_instructions" in entry):
            missing = "counter_instructions" if "instructions" in entry else "instructions"
            raise bad(entry.line, f"{name}.{missing}", "is missing: instructions and counter_instructions come "
                                                       "together")
        given = {side: texts(side, "instruction") for side in ("instructions", "counter_instructions") if side in entry}
        if has_pos:
            followups = {"positive": texts("positive", "follow-up"), "negative": texts("negative", "follow-up")}
            statement, opposite = text_of("statement", False), text_of("opposite", False)
            if statement is None:  # no statement to write instructions from
                principle = JudgedPrinciple(pid, text, followups["positive"], followups["negative"], None, opposite,
                                            source)
            else:
                principle = dataclasses.replace(JudgedPrinciple.from_statement(pid, text, statement, opposite,
                                                                               templates, source), **followups)
        elif "statement" not in entry:
            raise bad(entry.line, f"{name}.statement", "is missing: give a statement (what a user says when the "
                                                       "principle is met) or positive and negative follow-ups")
        else:
            principle = JudgedPrinciple.from_statement(pid, text, text_of("statement", True),
                                                       text_of("opposite", False), templates, source)
        out.append(dataclasses.replace(principle, **given) if given else principle)
    return out


def _objective_principles(path: Path, data: dict) -> list[JudgedPrinciple]:
    from steer.rewards.followups import BUILTIN_FOLLOWUPS

    try:
        parsed = parse_principles(data, str(path))
    except InvalidInput as e:
        # parse_principles says "<file>: <key path>: <reason>"; point at the key's line as well.
        key = e.reason.removeprefix(f"{path}: ").split(":", 1)[0]
        raise InvalidInput(f"{path}:{_line_of_path(data, key)}", e.reason.removeprefix(f"{path}: ")) from None
    out = []
    objectives = data["objectives"]
    for name in parsed.objectives:
        if name not in BUILTIN_FOLLOWUPS:
            raise InvalidInput(f"{path}:{_line(objectives, name)}",
                               f"objectives.{name}: FLR has no follow-ups to judge this objective by "
                               f"(it has {', '.join(BUILTIN_FOLLOWUPS)}); "
                               f"write a {FORMAT} file with a statement for it")
        sets = BUILTIN_FOLLOWUPS[name]
        out.append(JudgedPrinciple(name, f"Select the response with more {name} (judged by FLR's {name} follow-ups "
                                         f"or by its instructions).",
                                   sets.positive, sets.negative, source=f"{path}:{_line(objectives, name)}",
                                   instructions=parsed.objectives[name]["positive"],
                                   counter_instructions=parsed.objectives[name]["negative"]))
    return out


def read_candidates(paths: Sequence[str | Path], *, library: bool = True) -> list[JudgedPrinciple]:
    """The shipped library (when ``library``) then every file in ``paths``; ids must be unique across them."""
    files = ([PACKAGED_CANDIDATES] if library else []) + [Path(p) for p in paths]
    if not files:
        raise InvalidInput("candidates",
                           "no candidate principles: keep the shipped library (--library) or give --candidates FILE")
    out: list[JudgedPrinciple] = []
    where: dict[str, str] = {}
    for f in files:
        display = "steer/data/" + f.name if f == PACKAGED_CANDIDATES else None  # no install path in outputs
        for p in read_principles_file(f, "candidates", display):
            if p.id in where:
                raise InvalidInput(p.source, f"id {p.id!r} is already used by the candidate at "
                                             f"{where[p.id]}; ids must be unique across candidate files")
            where[p.id] = p.source
            out.append(p)
    return out


# -- writing ----------------------------------------------------------------------------------

def write_principles_file(path: str | Path, entries: Sequence[Mapping], description: str = "") -> Path:
    """A judged-principles file holding ``entries`` (each :meth:`JudgedPrinciple.to_dict` plus figures), in order."""
    path = Path(path)
    doc = {"format": FORMAT}
    if description:
        doc["description"] = description
    doc["principles"] = [dict(e) for e in entries]
    return atomic_write_text(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
