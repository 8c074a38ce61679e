"""The scorer interface, composition, the length signal, spec parsing and calibration files."""

import json
import math

import pytest
import torch

from steer.errors import InvalidInput
from steer.rewards.build import build_scorer
from steer.rewards.calibration import Calibration, find_calibration, read_calibration_file
from steer.rewards.calibration_set import CALIBRATION_PAIRS, CALIBRATION_SET_ID, calibration_conversations
from steer.rewards.followups import BUILTIN_FOLLOWUPS
from steer.rewards.length import LengthScorer
from steer.rewards.scorer import CompositeScorer, Scorer

pytestmark = pytest.mark.usefixtures("one_thread")

CONV = [{"role": "user", "content": "Hi"}]


class Fixed(Scorer):
    """A scorer whose raw reward is a known function of the response: len(response) * factor."""

    def __init__(self, objectives, factor=1.0, calibration=None):
        self.objectives = tuple(objectives)
        self.factor = factor
        self.calibration = calibration

    def raw_scores(self, conversations, responses):
        return torch.tensor([[len(r) * self.factor * (j + 1) for j in range(len(self.objectives))] for r in responses])

    def describe(self):
        return f"fixed({','.join(self.objectives)})"


def test_composite_orders_columns_and_scales_each_part_with_its_own_calibration():
    a = Fixed(["creativity", "helpfulness"],
              calibration=Calibration({"creativity": (1.0, 2.0), "helpfulness": (0.0, 1.0)}))
    b = Fixed(["conciseness"], factor=-1.0)
    c = CompositeScorer([a, b], ["helpfulness", "creativity", "conciseness"])
    r = c.rewards([CONV, CONV], ["abc", "a"])
    assert r.objectives == ("helpfulness", "creativity", "conciseness")
    assert r.raw.tolist() == [[6.0, 3.0, -3.0], [2.0, 1.0, -1.0]]
    assert r.scaled.tolist() == [[6.0, 1.0, -3.0], [2.0, 0.0, -1.0]]
    assert c.score([CONV], ["ab"]).tolist() == [[4.0, 0.5, -2.0]]
    assert c.describe() == "fixed(creativity,helpfulness)+fixed(conciseness)"
    assert r.row(0) == {"helpfulness": 6.0, "creativity": 1.0, "conciseness": -3.0}
    assert r.row(0, scaled=False)["creativity"] == 3.0


def test_composite_refuses_overlaps_and_gaps():
    with pytest.raises(InvalidInput, match=r"scored by more than one part"):
        CompositeScorer([Fixed(["helpfulness"]), Fixed(["helpfulness"])])
    with pytest.raises(InvalidInput, match="asked for"):
        CompositeScorer([Fixed(["helpfulness"])], ["helpfulness", "creativity"])


def test_no_responses_gives_an_empty_matrix():
    r = Fixed(["helpfulness"]).rewards([], [])
    assert r.raw.shape == (0, 1)


def test_length_signal_formula_and_common_scale(tokenizer):
    s = LengthScorer(tokenizer)
    r = s.rewards([CONV] * 3, ["Yes.", "Yes, and here is a much longer answer with many more words in it.", ""])
    n = len(tokenizer("Yes.", add_special_tokens=False)["input_ids"])
    assert r.raw[0, 0].item() == pytest.approx(-math.log1p(n))
    assert r.raw[2, 0].item() == 0.0  # empty: -ln(1 + 0)
    assert r.raw[0, 0] > r.raw[1, 0]  # shorter is more concise
    # Scaled against the built-in calibration set: its own responses average 0 with std 1.
    z = s.score(*calibration_conversations())[:, 0].double()
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(z.std(unbiased=False)) == pytest.approx(1.0, abs=1e-6)
    assert s.describe() == "length(conciseness)"


def test_build_scorer_specs(tiny_loaded, tmp_path, monkeypatch):
    import steer.rewards.flr as flr

    monkeypatch.setenv("STEER_CACHE", str(tmp_path))  # the tiny model's FLR calibration is cached here
    conversations, responses = calibration_conversations()
    # faster, same code
    monkeypatch.setattr(flr, "calibration_conversations", lambda: (conversations[:6], responses[:6]))
    assert build_scorer("none", tiny_loaded) is None
    default = build_scorer("default", tiny_loaded)
    assert default.describe() == "flr(helpfulness,creativity)+length(conciseness)"
    assert default.objectives == ("helpfulness", "creativity", "conciseness")
    assert default.calibration is None and all(p.calibration is not None for p in default.parts)
    explicit = build_scorer("length:conciseness+flr", tiny_loaded)
    assert explicit.describe() == "length(conciseness)+flr(helpfulness,creativity)"
    assert explicit.objectives == ("helpfulness", "creativity", "conciseness")
    r1 = default.rewards([CONV], ["Hello there."])
    r2 = explicit.rewards([CONV], ["Hello there."])
    torch.testing.assert_close(r1.scaled, r2.scaled)
    with pytest.raises(InvalidInput, match=r"scorer: part 1 'magic'"):
        build_scorer("magic", tiny_loaded)
    with pytest.raises(InvalidInput, match=r"scorer: .* scores \['helpfulness'\], but the server's objectives are"):
        build_scorer("flr:helpfulness", tiny_loaded)
    with pytest.raises(InvalidInput, match=r"rm:/nonexistent is not a reward model directory"):
        build_scorer("rm:/nonexistent", tiny_loaded)


def test_calibration_file_round_trip_and_keyed_lookup(tmp_path):
    cal = Calibration.fit(["helpfulness", "creativity"], torch.tensor([[1.0, 5.0], [3.0, 5.0]]), "test")
    assert cal.stats == {"helpfulness": (2.0, 1.0), "creativity": (5.0, 1.0)}  # a constant column gets std 1
    path = cal.save(tmp_path / "c.json", {"helpfulness": "k1", "creativity": "k2"}, scorer="flr")
    back, keys = read_calibration_file(path)
    assert back.stats == cal.stats and keys == {"helpfulness": "k1", "creativity": "k2"}
    found = find_calibration({"helpfulness": "k1", "creativity": "other"}, [tmp_path])
    assert found.stats == {"helpfulness": (2.0, 1.0)}
    assert find_calibration({"helpfulness": "nope"}, [tmp_path]) is None
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a readable calibration JSON"):
        read_calibration_file(tmp_path / "bad.json")


def test_shipped_default_calibration_is_current():
    """The shipped statistics were computed with today's calibration set and follow-ups (the model
    fingerprint part of the key is checked by the slow test). Regenerate with
    `python -m steer.rewards.calibrate` when this fails."""
    from steer.rewards.calibrate import SHIPPED
    from steer.rewards.flr import FLR_VERSION, followups_digest

    doc = json.loads(SHIPPED.read_text())
    assert doc["calibration_set"] == CALIBRATION_SET_ID
    assert doc["flr_version"] == FLR_VERSION
    assert doc["n"] == len(CALIBRATION_PAIRS)
    for name, sets in BUILTIN_FOLLOWUPS.items():
        assert doc["followups"][name] == followups_digest(sets), f"{name} follow-ups changed since calibration"
        assert doc["objectives"][name]["std"] > 0 and "key" in doc["objectives"][name]


def test_builtin_followups_and_calibration_set_sizes():
    for name, sets in BUILTIN_FOLLOWUPS.items():
        assert len(set(sets.positive)) >= 8 and len(set(sets.negative)) >= 8, name
        assert not set(sets.positive) & set(sets.negative)
    prompts = {p for p, _ in CALIBRATION_PAIRS}
    assert len(prompts) * 3 == len(CALIBRATION_PAIRS)  # direct / long or imaginative / poor per prompt
