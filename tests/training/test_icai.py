"""ICAI: judgements, agreement, coverage and redundancy against hand-computed values; the command on a
stubbed judge (known scores) and on the tiny model; bad inputs stop at file:line; the shipped example."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from steer.training.icai import (
    KEPT,
    REDUNDANT,
    WEAK,
    agreement,
    coverage,
    judgement_overlap,
    judgements,
    rank_principles,
    run_icai,
    split_pairs,
)
from steer.training.icai_cli import main
from steer.training.judge_settings import ICAIConfig
from steer.training.judged_principles import PACKAGED_CANDIDATES, read_candidates, read_principles_file

from steer.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "training" / "data" / "icai_example.jsonl"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- the arithmetic, by hand ------------------------------------------------------------------

# 5 pairs x 3 principles of score differences (chosen - rejected); eps = 1e-3.
DIFFS = np.array([
    [0.5, 0.4, -0.2],
    [0.3, 0.0005, 0.1],  # 0.0005 is within eps: a tie
    [-0.1, -0.3, 0.2],
    [0.2, 0.1, 0.0],
    [0.0, 0.6, -0.4],
])


def test_judgements_agreement_and_coverage_match_hand_computation():
    j = judgements(DIFFS, 1e-3)
    assert j.tolist() == [[1, 1, -1], [1, 0, 1], [-1, -1, 1], [1, 1, 0], [0, 1, -1]]
    # agreement: +1 judgements / 5 (ties disagree); coverage: non-ties / 5
    assert agreement(j).tolist() == pytest.approx([3 / 5, 3 / 5, 2 / 5])
    assert coverage(j).tolist() == pytest.approx([4 / 5, 4 / 5, 4 / 5])
    # overlap: columns 0/1 equal on pairs 0, 2, 3; 0/2 on pair 1 only; 1/2 nowhere
    np.testing.assert_allclose(judgement_overlap(j), [[1, 0.6, 0.2], [0.6, 1, 0.0], [0.2, 0.0, 1]])
    # a larger epsilon turns the 0.1 and 0.2 differences into ties
    assert coverage(judgements(DIFFS, 0.25)).tolist() == pytest.approx([2 / 5, 3 / 5, 1 / 5])


def constructed_judgements() -> np.ndarray:
    """10 pairs: A agrees on 9; B is A with pair 8 tied (overlap 0.9); C is A's opposite; D agrees on
    pairs 0-5 and opposes 6-9; F agrees on 0-5 and ties 6-9 (same agreement as D, less coverage)."""
    A = [1] * 9 + [-1]
    B = [1] * 8 + [0, -1]
    C = [-a for a in A]
    D = [1] * 6 + [-1] * 4
    F = [1] * 6 + [0] * 4
    return np.array([A, B, C, D, F]).T  # (10, 5)


def test_redundant_principles_are_pruned_keeping_the_better_one():
    ranked = rank_principles(constructed_judgements(), redundancy=0.9, min_agreement=0.5)
    # A 0.9 > B 0.8 > D 0.6 = F 0.6 (D covers more) > C 0.1
    assert [r.index for r in ranked] == [0, 1, 3, 4, 2]
    status = {r.index: r for r in ranked}
    assert status[0].status == KEPT
    assert status[1].status == REDUNDANT and status[1].redundant_with == 0 and status[1].overlap == pytest.approx(0.9)
    assert status[3].status == KEPT  # overlap with A: pairs 0-5 and 9 = 0.7
    assert status[4].status == KEPT  # overlap with A 0.6, with D 0.6
    assert status[2].status == WEAK  # the opposite of the best: never redundant, just below min_agreement
    # at a stricter threshold B (overlap 0.9 with A) is no longer redundant
    assert {r.index: r.status
            for r in rank_principles(constructed_judgements(), redundancy=0.95, min_agreement=0.5)}[1] == KEPT
    # with min_agreement 0 the opposite is kept: it never judges like A (overlap 0)
    assert {r.index: r.status
            for r in rank_principles(constructed_judgements(), redundancy=0.9, min_agreement=0.0)}[2] == KEPT


def test_split_is_seeded_disjoint_and_complete():
    train, held = split_pairs(11, 0.5, seed=3)
    assert len(held) == 6 and len(train) == 5  # round(5.5) = 6
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(11))
    again = split_pairs(11, 0.5, seed=3)
    assert train.tolist() == again[0].tolist() and held.tolist() == again[1].tolist()
    assert held.tolist() != split_pairs(11, 0.5, seed=4)[1].tolist()
    assert [len(x) for x in split_pairs(3, 0.01, 0)] == [2, 1]  # at least one pair held out
    with pytest.raises(InvalidInput, match="at least 2"):
        split_pairs(1, 0.5, 0)


# -- the command with a stubbed judge ---------------------------------------------------------

class StubJudge:
    """Scores from a function of (principle id, response): known values, no model."""

    def __init__(self, principles, score):
        self.principles = tuple(principles)
        self.score = score

    def scores(self, conversations, responses):
        return torch.tensor([[self.score(p.id, r) for p in self.principles] for r in responses], dtype=torch.float64)


def noise(text: str) -> float:
    return float(sum(map(ord, text)) % 7)


def stub_score(pid: str, response: str) -> float:
    words = len(response.split())
    return {"shorter": -words, "fewer_words": -len(response) / 5.0, "longer": words, "noise": noise(response)}[pid]


PAIRS = [{"prompt": f"Question {i}?", "chosen": "Yes" + "!" * (i % 3),
          "rejected": "Yes, and " + "more words " * (i % 4 + 1) + f"{i}."} for i in range(12)]
CANDIDATES = {
    "principles": [
        {"id": "noise", "text": "Select the response whose characters sum high.", "statement": "noisy"},
        {"id": "longer", "text": "Select the longer response.", "statement": "detailed", "opposite": "too short"},
        {"id": "fewer_words", "text": "Select the response with fewer characters.", "statement": "compact"},
        {"id": "shorter", "text": "Select the shorter response.", "statement": "short", "opposite": "long"},
    ]
}


@pytest.fixture()
def stub_run(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cands = tmp_path / "cands.json"
    cands.write_text(json.dumps(CANDIDATES, indent=1))
    out = tmp_path / "out"
    config = ICAIConfig(output=str(out), data=(str(data),), candidates=(str(cands),), library=False,
                        heldout_fraction=0.5, seed=0)
    report = run_icai(config, make_judge=lambda cfg, principles: (StubJudge(principles, stub_score), "stub"))
    return report, out, config


def test_icai_ranks_the_rule_first_and_writes_what_label_reads(stub_run):
    report, out, config = stub_run
    rows = {r["id"]: r for r in report["candidates"]}
    # Every chosen answer has fewer words and characters: the length principles agree on every pair.
    assert (rows["shorter"]["agreement"] == 1.0 and rows["shorter"]["train_agreement"] == 1.0
            and rows["shorter"]["coverage"] == 1.0)
    assert rows["longer"]["agreement"] == 0.0 and rows["longer"]["status"] == WEAK
    # 'fewer_words' judges every pair as 'shorter' does (overlap 1.0) and ties it on agreement and coverage;
    # the file order breaks the tie, so the later one is the redundant one.
    assert rows["fewer_words"]["status"] == KEPT and rows["shorter"]["status"] == REDUNDANT
    assert rows["shorter"]["redundant_with"] == "fewer_words" and rows["shorter"]["overlap"] == 1.0
    # noise: recomputed here from the split files the command wrote
    held = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(held) == 6 and len(train) == 6
    assert sorted(r["prompt"] for r in held + train) == sorted(r["prompt"] for r in PAIRS)
    wins = [noise(r["chosen"]) - noise(r["rejected"]) > 1e-3 for r in held]
    nonzero = [abs(noise(r["chosen"]) - noise(r["rejected"])) > 1e-3 for r in held]
    assert (rows["noise"]["agreement"] == pytest.approx(sum(wins) / 6)
            and rows["noise"]["coverage"] == pytest.approx(sum(nonzero) / 6))
    # principles.json: kept principles only, best first, readable by label with the same follow-ups
    written = json.loads((out / "principles.json").read_text())
    kept = [r["id"] for r in report["candidates"] if r["status"] == KEPT]
    assert [p["id"] for p in written["principles"]] == kept and kept[0] == "fewer_words"
    assert [p["rank"] for p in written["principles"]] == list(range(1, len(kept) + 1))
    assert written["principles"][0]["agreement"] == 1.0 and written["principles"][0]["train_agreement"] == 1.0
    again = read_principles_file(out / "principles.json")
    original = {p.id: p for p in read_candidates([config.candidates[0]], library=False)}
    assert [(p.id, p.positive, p.negative) for p in again] == [
        (k, original[k].positive, original[k].negative) for k in kept]
    assert original["shorter"].negative == ("That was long.", "Hmm, your answer was long.")
    assert (out / "report.png").stat().st_size > 1000 and (out / "config.yaml").is_file()
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 12 and scores[0]["chosen"]["shorter"] == -1.0


def test_rank_by_heldout_and_min_agreement(tmp_path, stub_run):
    _, out, config = stub_run
    import dataclasses

    strict = dataclasses.replace(config, output=str(tmp_path / "strict"), min_agreement=1.0, redundancy=1.0,
                                 rank_by="heldout")
    report = run_icai(strict, make_judge=lambda cfg, principles: (StubJudge(principles, stub_score), "stub"))
    status = {r["id"]: r["status"] for r in report["candidates"]}
    assert status["fewer_words"] == KEPT and status["shorter"] == REDUNDANT  # overlap 1.0 >= 1.0
    assert status["longer"] == WEAK and report["rank_by"] == "heldout"


# -- bad inputs -------------------------------------------------------------------------------

def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr()


def test_bad_data_stops_at_file_and_line(tmp_path, capsys, tiny_model_dir):
    out = str(tmp_path / "out")
    common = ["--model", str(tiny_model_dir), "--output", out, "--no-progress"]
    missing = write_jsonl(tmp_path / "missing.jsonl", [PAIRS[0], {"prompt": "Q", "chosen": "A"}])
    code, cap = run_cli(["--data", str(missing), *common], capsys)
    assert code == 2 and f"{missing}:2: rejected: is missing" in cap.err
    kto = write_jsonl(tmp_path / "kto.jsonl", [PAIRS[0], PAIRS[1], {"prompt": "Q", "completion": "A", "label": True}])
    code, cap = run_cli(["--data", str(kto), *common], capsys)
    assert code == 2 and f"{kto}:3" in cap.err and "unpaired" in cap.err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, cap = run_cli(["--data", str(empty), *common], capsys)
    assert code == 2 and f"{empty}: has no rows" in cap.err
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(PAIRS[0]) + "\n{\"prompt\": \n")
    code, cap = run_cli(["--data", str(broken), *common], capsys)
    assert code == 2 and f"{broken}:2: not valid JSON" in cap.err
    assert not Path(out).exists()  # nothing is created for a refused run


def test_bad_candidates_stop_at_file_and_line(tmp_path, capsys, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:4])
    common = ["--data", str(data), "--model", str(tiny_model_dir), "--output", str(tmp_path / "out"), "--no-progress"]
    cands = tmp_path / "c.json"
    cands.write_text('{\n  "principles": [\n    {"text": "Select the shorter.", "statement": "short"},\n'
                     '    {"text": "Select the kinder.",\n     "statment": "kind"}\n  ]\n}\n')
    code, cap = run_cli([*common, "--candidates", str(cands)], capsys)
    assert code == 2 and f"{cands}:5: principles[1].statment: unknown key" in cap.err
    # the library already has an id 'shorter'
    cands.write_text('{"principles": [\n {"id": "shorter", "text": "Mine.", "statement": "short"}]}\n')
    code, cap = run_cli([*common, "--candidates", str(cands)], capsys)
    assert code == 2 and (
        f"{cands}:2: id 'shorter' is already used by the candidate at steer/data/icai_candidates.json:" in cap.err)
    cands.write_text('{"principles": []}')
    code, cap = run_cli([*common, "--candidates", str(cands)], capsys)
    assert code == 2 and f"{cands}:1: principles: is empty" in cap.err
    with pytest.raises(SystemExit) as e:
        main([*common, "--no-library"])
    assert e.value.code == 2 and "--no-library needs --candidates" in capsys.readouterr().err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    assert ("Examples:" in text
            and "python -m steer.train icai --data training/data/icai_example.jsonl --output runs/icai" in text)
    assert "--redundancy" in text and "--heldout-fraction" in text and "--rank-by {train,heldout}" in text


@pytest.mark.parametrize("command", ["icai", "label"])
def test_help_is_fast(command):
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "steer.train", command, "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Examples:" in out.stdout and f"python -m steer.train {command} --data" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "steer.training.judge_settings" in imported and "torch" not in imported and "numpy" not in imported


def test_yaml_config_and_flags(tmp_path):
    from steer.training.config import merge_config

    cfg = tmp_path / "icai.yaml"
    cfg.write_text("output_dir: runs/x\ndata: [a.jsonl]\nheldout-fraction: 0.25\ncandidates: mine.json\n"
                   "library: false\n")
    config = merge_config(ICAIConfig, ["--config", str(cfg), "--seed", "3"], prog="icai")
    assert (config.output, config.data, config.heldout_fraction, config.candidates, config.library, config.seed) == (
        "runs/x", ("a.jsonl",), 0.25, ("mine.json",), False, 3)
    cfg.write_text("data: [a.jsonl]\noutput: x\nheldout_frac: 0.3\n")
    with pytest.raises(InvalidInput, match="heldout_frac: unknown key"):
        merge_config(ICAIConfig, ["--config", str(cfg)], prog="icai")
    with pytest.raises(InvalidInput, match="heldout_fraction: must be < 1"):
        merge_config(ICAIConfig, ["--data", "a.jsonl", "--output", "x", "--heldout-fraction", "1"], prog="icai")


def test_steer_train_lists_icai_and_label(capsys):
    from steer.train import COMMANDS
    from steer.train import main as train_main

    assert COMMANDS["icai"][0] == "steer.training.icai_cli" and COMMANDS["label"][0] == "steer.training.label_cli"
    assert train_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "  icai " in out and "  label " in out and "python -m steer.train icai --data" in out


# -- the tiny model through the whole command -------------------------------------------------

def test_icai_on_the_tiny_model_with_the_shipped_library(tmp_path, capsys, tiny_model_dir):
    """The real judge path (model load, FLR through every candidate) on 4 pairs: the figures in the
    outputs are consistent with scores.jsonl, which holds each principle's raw scores."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:4])
    out = tmp_path / "out"
    code, cap = run_cli(["--data", str(data), "--model", str(tiny_model_dir), "--output", str(out), "--no-progress",
                         "--min-agreement", "0"], capsys)
    assert code == 0, cap.err
    report = json.loads((out / "report.json").read_text())
    library = read_candidates([], library=True)
    assert len(report["candidates"]) == len(library) and report["model"] == str(tiny_model_dir)
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    held = [s for s in scores if s["split"] == "heldout"]
    assert len(held) == 2
    for row in report["candidates"]:
        d = [s["chosen"][row["id"]] - s["rejected"][row["id"]] for s in held]
        assert row["agreement"] == pytest.approx(np.mean([x > 1e-3 for x in d]))
    assert "kept" in cap.out


# -- the shipped example and library -----------------------------------------------------------

def test_shipped_example_is_the_generator_output_and_follows_its_rule():
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import make_icai_example
    finally:
        sys.path.pop(0)
    rows = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    assert rows == make_icai_example.rows()
    assert 60 <= len(rows) <= 120 and len({r["prompt"] for r in rows}) == len(rows)
    for r in rows:  # the known rule: the shorter answer wins, by a wide margin
        assert len(r["chosen"].split()) * 2 <= len(r["rejected"].split()), r
    assert PACKAGED_CANDIDATES.is_file()
    ids = [p.id for p in read_candidates([], library=True)]
    assert "shorter" in ids and "longer" in ids and len(ids) == len(set(ids))


@pytest.fixture(scope="module")
def worked_example(tmp_path_factory):
    """README's worked example on the default model: icai on the shipped pairs (about 14 minutes on 2 CPU cores)."""
    out = tmp_path_factory.mktemp("worked") / "icai"
    assert main(["--data", str(EXAMPLE), "--output", str(out), "--no-progress"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the fixture runs icai: about 14 minutes on 2 cores
def test_worked_example_icai_ranks_the_rule_first(worked_example):
    """Done-when of the issue: a principle stating the rule (the shorter answer wins) ranks first with
    held-out agreement >= 0.8. Measured with SmolLM2-135M and the instruction judge (the default):
    'shorter' ranks first (held-out 0.95, train 0.95), 'brief' second (0.875). With --judge followup
    'formal' ranked first (0.95) and 'shorter' third (0.725)."""
    report = json.loads((worked_example / "report.json").read_text())
    top = json.loads((worked_example / "principles.json").read_text())["principles"][0]
    assert top["id"] in ("shorter", "brief") and top["agreement"] >= 0.8, report["candidates"]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the fixture runs icai: about 14 minutes on 2 cores
def test_worked_example_label_with_the_rule_reproduces_heldout_labels(worked_example, tmp_path):
    """label judging by the rule's principle reproduces >= 80% of the held-out labels (measured with
    SmolLM2-135M and the instruction judge: 38 of 40, 0.95; the follow-up judge gave 29 of 40)."""
    from steer.training.label_cli import main as label_main

    labels = tmp_path / "labels"
    assert label_main(["--data", str(worked_example / "heldout.jsonl"), "--principles", str(PACKAGED_CANDIDATES),
                       "--ids", "shorter", "--output", str(labels), "--no-progress"]) == 0
    summary = json.loads((labels / "summary.json").read_text())
    assert summary["input_pairs"] == 40 and summary["reproduced_share"] >= 0.8, summary


def test_every_shipped_candidate_carries_written_instructions():
    """The default judge reads instructions; the library writes concrete ones for every principle
    rather than relying on the statement template (README: 0.95 vs about 0.6 for 'shorter')."""
    from steer.training.judged_principles import read_candidates

    from steer.rewards.principle_judge import INSTRUCTION_TEMPLATES

    for p in read_candidates([]):
        templated = INSTRUCTION_TEMPLATES["positive"][0].format(statement=p.statement)
        assert p.instructions and p.counter_instructions and p.instructions[0] != templated, p.id
        assert not set(p.instructions) & set(p.counter_instructions), p.id
