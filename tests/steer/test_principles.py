"""Principles files: the shipped one, every bad case naming file and key/line, and selection."""

import json

import numpy as np
import pytest

from steer.errors import InvalidInput
from steer.objectives import Direction
from steer.principles import MIN_PER_POLARITY, PACKAGED_PRINCIPLES, instructed_messages, load_principles

OBJ = ("helpfulness", "creativity", "conciseness")


def test_shipped_file_covers_every_default_objective():
    p = load_principles()
    assert p.source == str(PACKAGED_PRINCIPLES)
    p.covers(OBJ)
    for o in OBJ:
        for polarity in ("positive", "negative"):
            assert len(p.objectives[o][polarity]) >= 6


def _valid():
    return {"selection": {"max_objectives": 2, "min_weight": 0.3},
            "objectives": {o: {"positive": [f"{o} do {i}." for i in range(6)],
                               "negative": [f"{o} avoid {i}." for i in range(6)]} for o in OBJ}}


def _write(tmp_path, data, name="p.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=1))
    return path


def _mutate(fn):
    d = _valid()
    fn(d)
    return d


@pytest.mark.parametrize("data, key", [
    (_mutate(lambda d: d["objectives"]["creativity"]["negative"].pop()), "objectives.creativity.negative"),
    (_mutate(lambda d: d["objectives"]["helpfulness"]["positive"].__setitem__(2, "")),
     "objectives.helpfulness.positive[2]"),
    (_mutate(lambda d: d["objectives"]["helpfulness"]["positive"].__setitem__(3, " padded")),
     "objectives.helpfulness.positive[3]"),
    (_mutate(lambda d: d["objectives"]["conciseness"]["positive"].__setitem__(1, "conciseness do 0.")),
     "objectives.conciseness.positive[1]"),
    (_mutate(lambda d: d["objectives"]["conciseness"].pop("negative")), "objectives.conciseness.negative"),
    (_mutate(lambda d: d["objectives"]["conciseness"].__setitem__("neutral", [])), "objectives.conciseness.neutral"),
    (_mutate(lambda d: d["objectives"].__setitem__("creativity", ["a"])), "objectives.creativity"),
    (_mutate(lambda d: d["selection"].__setitem__("max_objectives", 0)), "selection.max_objectives"),
    (_mutate(lambda d: d["selection"].__setitem__("min_weight", 1.5)), "selection.min_weight"),
    (_mutate(lambda d: d["selection"].__setitem__("top", 1)), "selection.top"),
    (_mutate(lambda d: d.__setitem__("objective", {})), "objective"),
    (_mutate(lambda d: d.pop("objectives")), "objectives"),
    (_mutate(lambda d: d.__setitem__("format", "other/v9")), "format"),
    ([1, 2], "<top level>"),
])
def test_bad_file_names_file_and_key(tmp_path, data, key):
    path = _write(tmp_path, data)
    with pytest.raises(InvalidInput) as e:
        load_principles(path)
    assert e.value.field == "principles"
    assert f"{path}: {key}:" in str(e.value)


def test_json_syntax_error_names_the_line(tmp_path):
    text = json.dumps(_valid(), indent=1).replace('"positive"', '"positive" :: ', 1)
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "::" in s)
    path = _write(tmp_path, text)
    with pytest.raises(InvalidInput, match=rf"{path}:{line}:\d+: invalid JSON"):
        load_principles(path)


def test_missing_file_and_missing_objective(tmp_path):
    with pytest.raises(InvalidInput, match="nope.json: no such file"):
        load_principles(tmp_path / "nope.json")
    d = _valid()
    del d["objectives"]["creativity"]
    p = load_principles(_write(tmp_path, d))
    with pytest.raises(InvalidInput, match=r"no instructions for objectives \['creativity'\]"):
        p.covers(OBJ)


def test_selection_for_corners_and_mixes(tmp_path):
    p = load_principles(_write(tmp_path, _valid()))
    rng = np.random.default_rng(0)
    corner = Direction.corner("conciseness", OBJ)
    assert p.chosen_objectives(corner) == ["conciseness"]
    assert p.instruction(corner, "positive", rng).startswith("conciseness do ")
    assert p.instruction(corner, "negative", rng).startswith("conciseness avoid ")
    # Heaviest first; a second objective joins at >= min_weight (0.3), at most max_objectives (2).
    mix = Direction.from_weights({"helpfulness": 0.3, "creativity": 0.5, "conciseness": 0.2}, OBJ)
    assert p.chosen_objectives(mix) == ["creativity", "helpfulness"]
    text = p.instruction(mix, "positive", rng)
    assert text.startswith("creativity do ") and " helpfulness do " in text
    assert (p.chosen_objectives(Direction.from_weights({"helpfulness": 0.75, "creativity": 0.25}, OBJ))
            == ["helpfulness"])
    assert p.chosen_objectives(Direction.uniform(OBJ)) == ["helpfulness", "creativity"]  # ties in objective order
    # Seeded: the same stream gives the same instructions.
    a = [p.instruction(mix, "negative", np.random.default_rng(5)) for _ in range(2)]
    assert a[0] == a[1]
    with pytest.raises(ValueError, match="polarity"):
        p.instruction(mix, "neutral", rng)
    assert MIN_PER_POLARITY == 6


def test_instructed_messages_appends_to_the_system_prompt():
    conv = [{"role": "user", "content": "Hi"}]
    out = instructed_messages(conv, "Be brief.")
    assert out[0] == {"role": "system", "content": "You are a helpful AI assistant.\n\nBe brief."} and out[1] == conv[0]
    own = instructed_messages([{"role": "system", "content": "You are a pirate. "}, *conv], "Be brief.")
    assert own[0]["content"] == "You are a pirate.\n\nBe brief." and len(own) == 2
    assert conv == [{"role": "user", "content": "Hi"}]  # not modified in place
