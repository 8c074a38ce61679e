"""RLAIF labelling: pairs, margins and skips against hand-computed scores; the principle judge against a
direct log-likelihood computation on the tiny model; principles files in both formats; bad inputs
stop at file:line; the output is what `dpo --data` reads."""

import json

import numpy as np
import pytest
import torch
from steer.training.judge_settings import LabelConfig
from steer.training.judged_principles import read_principles_file
from steer.training.label import label_items, parse_label_row, read_label_items, run_label
from steer.training.label_cli import main
from steer.training.pairs import PairExample, read_examples

from steer.errors import InvalidInput
from steer.rewards.principle_judge import DEFAULT_TEMPLATES, JudgedPrinciple, PrincipleJudge


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SHORT = JudgedPrinciple.from_statement("shorter", "Select the shorter response.", "short and to the point",
                                       "long-winded and wordy")
KIND = JudgedPrinciple("kind", "Select the kinder response.", ("Thank you, that was kind.",),
                       ("That was rude.", "How unkind."), instructions=("Be kind.",),
                       counter_instructions=("Be unkind.",))


# -- the judge on the tiny model, against a direct computation ---------------------------------

def test_principle_judge_equals_direct_flr_computation(tiny_loaded, followup_loglik):
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    responses = ["Paris.", "Paris, which has been the capital for centuries and is home to the Louvre."]
    judge = PrincipleJudge(tiny_loaded.model, tiny_loaded.tokenizer, [SHORT, KIND], batch_size=3, prefix_batch=1,
                           method="followup")
    got = judge.scores([conv, conv], responses)  # (2, 2)
    assert got.shape == (2, 2)
    # the follow-ups the templates made for SHORT
    assert SHORT.positive == ("Thanks, that was short and to the point.",
                              "Great, your answer was short and to the point.")
    assert SHORT.negative == ("That was long-winded and wordy.", "Hmm, your answer was long-winded and wordy.")
    for i, response in enumerate(responses):
        for k, p in enumerate((SHORT, KIND)):
            pos = [followup_loglik(tiny_loaded.model, tiny_loaded.tokenizer, conv, response, f) for f in p.positive]
            neg = [followup_loglik(tiny_loaded.model, tiny_loaded.tokenizer, conv, response, f) for f in p.negative]
            assert got[i, k].item() == pytest.approx(np.mean(pos) - np.mean(neg), abs=2e-4)
    assert got[0].ne(got[1]).all()


def test_default_templates_say_met_and_not_met():
    p = JudgedPrinciple.from_statement("x", "Select the clearer response.", "clear")
    assert p.positive == tuple(t.format(statement="clear", opposite="not clear") for t in DEFAULT_TEMPLATES["positive"])
    assert p.negative == ("That was not clear.", "Hmm, your answer was not clear.")


# -- labelling arithmetic with known scores ----------------------------------------------------

# response text -> (score under principle 1, score under principle 2)
KNOWN = {"a a a": (-3.0, 0.5), "b": (-1.0, 0.2), "c c": (-2.0, 0.6), "x x x x": (-4.0, 1.0), "y": (-1.0, 0.0),
         "same": (-1.0, 0.3), "other text": (-2.0, 0.3)}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q3"}]
ROWS = [
    {"prompt": "Q1", "responses": ["a a a", "b", "c c"]},
    {"prompt": "Q2", "chosen": "x x x x", "rejected": "y"},
    {"prompt": MESSAGES, "responses": [[{"role": "assistant", "content": "same"}], "same", "other text"]},
]


class StubJudge:
    """KNOWN scores: column 0 for 'shorter', column 1 for 'kind', 0 for any other principle."""

    def __init__(self, principles):
        self.principles = tuple(principles)

    def scores(self, conversations, responses):
        column = {"shorter": 0, "kind": 1}
        return torch.tensor([[KNOWN[r][column[p.id]] if p.id in column else 0.0 for p in self.principles]
                             for r in responses], dtype=torch.float64)


def stub(config, principles):
    return StubJudge(principles), "stub"


@pytest.fixture()
def principles_file(tmp_path):
    path = tmp_path / "principles.json"
    path.write_text(json.dumps({"principles": [SHORT.to_dict(), KIND.to_dict(),
                                               {"text": "Unused third.", "statement": "fine"}]}))
    return path


def test_label_pairs_margins_and_skips_by_hand(tmp_path, principles_file):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "out"
    config = LabelConfig(output=str(out), data=(str(data),), principles=str(principles_file), top=2, min_margin=0.4)
    summary = run_label(config, make_judge=stub)
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    # Q1: (a,b) d = mean(-2, 0.3) = -0.85 -> b; (a,c) mean(-1, -0.1) = -0.55 -> c;
    #     (b,c) mean(1, -0.4) = 0.3 < 0.4: skipped
    # Q2: (x,y) mean(-3, 1) = -1.0 -> y, against the input's order
    # Q3: (same, same) equal: skipped; (same, other) twice: mean(1, 0) = 0.5 -> same
    got = [(r["prompt"] if isinstance(r["prompt"], str) else "Q3", r["chosen"], r["rejected"], round(r["margin"], 6))
           for r in rows]
    msg = [{"role": "assistant", "content": "same"}]
    other = [{"role": "assistant", "content": "other text"}]
    assert got == [("Q1", "b", "a a a", 0.85), ("Q1", "c c", "a a a", 0.55), ("Q2", "y", "x x x x", 1.0),
                   ("Q3", msg, other, 0.5), ("Q3", msg, other, 0.5)]
    assert rows[3]["prompt"] == MESSAGES  # a conversational prompt is written back as given
    assert rows[0]["principle_scores"] == [{"id": "shorter", "chosen": -1.0, "rejected": -3.0},
                                           {"id": "kind", "chosen": 0.2, "rejected": 0.5}]
    assert rows[2]["agrees_with_input"] is False and "agrees_with_input" not in rows[0]
    assert rows[0]["source"] == f"{data}:1" and rows[3]["source"] == f"{data}:3"
    assert summary["pairs"] == 7 and summary["written"] == 5 and summary["skipped"] == {"margin": 1, "equal": 1}
    assert summary["input_pairs"] == 1 and summary["reproduced"] == 0 and summary["reproduced_share"] == 0.0
    assert [p["id"] for p in summary["principles"]] == ["shorter", "kind"]  # --top 2
    # what `dpo --data` reads
    examples = read_examples([out / "pairs.jsonl"])
    assert len(examples) == 5 and all(isinstance(e, PairExample) for e in examples)
    assert examples[0].chosen == "b" and examples[3].prompt[0]["content"] == "Be brief."


def test_ids_choose_principles_and_an_unknown_id_names_the_file(tmp_path, principles_file, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    config = LabelConfig(output=str(tmp_path / "kind"), data=(str(data),), principles=str(principles_file),
                         ids=("kind",))
    summary = run_label(config, make_judge=stub)
    rows = [json.loads(line) for line in (tmp_path / "kind" / "pairs.jsonl").read_text().splitlines()]
    # kind only: Q1 (a,b) 0.5-0.2 -> a; (a,c) 0.5-0.6 -> c; (b,c) 0.2-0.6 -> c; Q2 1.0-0.0 -> x, as the input says;
    # Q3 (same, other) 0.3-0.3 = 0: skipped twice; (same, same) equal
    assert [(r["chosen"], r["rejected"], round(r["margin"], 6)) for r in rows] == [
        ("a a a", "b", 0.3), ("c c", "a a a", 0.1), ("c c", "b", 0.4), ("x x x x", "y", 1.0)]
    assert summary["skipped"] == {"margin": 2, "equal": 1} and summary["reproduced_share"] == 1.0
    assert [p["id"] for p in summary["principles"]] == ["kind"]
    bad = LabelConfig(output=str(tmp_path / "bad"), data=(str(data),), principles=str(principles_file),
                      ids=("kind", "nope"))
    with pytest.raises(InvalidInput) as e:
        run_label(bad, make_judge=stub)
    assert (e.value.field == str(principles_file)
            and "ids: no principle 'nope' in this file; its ids are shorter, kind, p3" in e.value.reason)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--principles", str(principles_file), "--output", str(tmp_path / "x"),
              "--ids", "kind", "--top", "1"])
    assert "give --top or --ids, not both" in capsys.readouterr().err


def test_instruction_judge_needs_instructions_and_says_so_before_loading(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    path = tmp_path / "followups-only.json"
    path.write_text(json.dumps({"principles": [SHORT.to_dict(),
                                               {"id": "kind", "text": "K", "positive": ["P"], "negative": ["N"]}]},
                               indent=1))

    def never(config, principles):
        raise AssertionError("the judge model must not be loaded for a config that cannot run")

    with pytest.raises(InvalidInput) as e:
        run_label(LabelConfig(output=str(tmp_path / "out"), data=(str(data),), principles=str(path)), make_judge=never)
    assert "kind (" + str(path) + ":" in e.value.reason and "--judge followup" in e.value.reason
    assert not (tmp_path / "out").exists()
    summary = run_label(LabelConfig(output=str(tmp_path / "fu"), data=(str(data),), principles=str(path),
                                    judge="followup"), make_judge=stub)
    assert summary["judge"] == "followup"


def test_zero_margin_is_skipped_and_input_order_is_compared():
    item = parse_label_row({"prompt": "Q", "chosen": "long answer here", "rejected": "short"}, "f.jsonl:4")
    assert item.responses == ("long answer here", "short") and item.given == (0, 1)
    tie = np.array([[0.2, -0.1], [0.1, 0.0]])  # differences 0.1 and -0.1: mean 0
    rows, counts = label_items([item], [tie], ["p", "q"], 0.0)
    assert rows == [] and counts["skipped"]["margin"] == 1 and counts["reproduced"] == 0
    agree = np.array([[0.3, 0.1], [0.1, 0.0]])  # mean difference 0.15: the input's chosen wins
    rows, counts = label_items([item], [agree], ["p", "q"], 0.0)
    assert (rows[0]["margin"] == pytest.approx(0.15) and rows[0]["agrees_with_input"] is True
            and counts["reproduced_share"] == 1.0)


# -- principles files ----------------------------------------------------------------------------

def test_reads_both_principles_formats(tmp_path):
    from steer.principles import PACKAGED_PRINCIPLES, load_principles
    from steer.rewards.followups import BUILTIN_FOLLOWUPS

    objective = read_principles_file(PACKAGED_PRINCIPLES)
    assert [p.id for p in objective] == ["helpfulness", "creativity", "conciseness"]
    assert objective[2].positive == BUILTIN_FOLLOWUPS["conciseness"].positive
    assert objective[2].negative == BUILTIN_FOLLOWUPS["conciseness"].negative
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"followups": {"positive": ["Yes, {statement}!"], "negative": ["No, {opposite}."]},
                                "principles": [{"text": "T1", "statement": "s1"},
                                               {"id": "two", "text": "T2", "statement": "s2", "opposite": "o2"},
                                               {"text": "T3", "positive": ["P"], "negative": ["N"],
                                                "agreement": 0.9}]}))
    got = read_principles_file(path)
    assert [(p.id, p.positive, p.negative) for p in got] == [
        ("p1", ("Yes, s1!",), ("No, not s1.",)), ("two", ("Yes, s2!",), ("No, o2.",)), ("p3", ("P",), ("N",))]
    # the instruction judge's texts: from the statement, given whole, or none (follow-ups only)
    assert [(p.instructions, p.counter_instructions) for p in got] == [
        (("Make your answer s1.",), ("Make your answer not s1.",)),
        (("Make your answer s2.",), ("Make your answer o2.",)), ((), ())]
    path.write_text(json.dumps({"principles": [
        {"text": "T", "statement": "s", "instructions": ["Do s.", "Really do s."], "counter_instructions": ["Not s."]},
        {"text": "U", "positive": ["P"], "negative": ["N"], "statement": "u"}]}))
    given, from_statement = read_principles_file(path)
    assert (given.instructions, given.counter_instructions) == (("Do s.", "Really do s."), ("Not s.",))
    assert from_statement.positive == ("P",) and from_statement.instructions == ("Make your answer u.",)
    assert objective[2].instructions == load_principles().objectives["conciseness"]["positive"]
    assert objective[2].counter_instructions == load_principles().objectives["conciseness"]["negative"]


@pytest.mark.parametrize("text, line, message", [
    ('{\n "principles": [\n  {"text": "A", "statement": "a"},\n  {"text": "B", "statement": "b",\n'
     '   "wieght": 2}\n ]\n}', 5, "principles[1].wieght: unknown key"),
    ('{\n "principles": [\n  {"statement": "a"}\n ]\n}', 3, "principles[0].text: is missing"),
    ('{\n "principles": [\n  {"text": "A", "positive": ["p"]}\n ]\n}', 3, "principles[0].negative: is missing"),
    ('{\n "principles": [\n  {"text": "A", "statement": "a"},\n  {"id": "p1", "text": "B", "statement": "b"}\n ]\n}', 4,
     "principles[1].id: 'p1' is already the id of the principle at line 3"),
    ('{\n "followups": {"positive": ["Yes {sentence}"], "negative": ["No"]},\n'
     ' "principles": [{"text": "A", "statement": "a"}]\n}', 2, "followups.positive[0]: uses {sentence}"),
    ('{\n "principle": []\n}', 2, "principle: unknown key"),
    ('{\n "principles": [\n  {"text": "A", "statement": "a"}\n  {"text": "B"}\n ]\n}', 4, "not valid JSON"),
    ('{"format": "steer.principles/v1",\n "objectives": {\n  "helpfulness": {"positive": [], "negative": []}\n }\n}', 3,
     "objectives.helpfulness.positive: has 0 instructions"),
    ('{"format": "steer.principles/v2",\n "principles": []}', 1, "format: is 'steer.principles/v2'"),
    ('', 1, "is empty"),
    ('{\n "principles": [\n  {"text": "A", "statement": "a",\n   "instructions": ["Do a."]}\n ]\n}', 3,
     "principles[0].counter_instructions: is missing: instructions and counter_instructions come together"),
    ('{\n "principles": [\n  {"text": "A", "statement": "a",\n   "instructions": "Do a.",\n'
     '   "counter_instructions": ["No."]}\n ]\n}', 4,
     "principles[0].instructions: must be a non-empty list of instruction texts"),
])
def test_bad_principles_files_name_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InvalidInput) as e:
        read_principles_file(path)
    assert e.value.field == f"{path}:{line}" and message in e.value.reason


def test_objective_without_flr_followups_is_refused_at_its_line(tmp_path):
    from steer.principles import PACKAGED_PRINCIPLES

    data = json.loads(PACKAGED_PRINCIPLES.read_text())
    data["objectives"]["politeness"] = data["objectives"]["helpfulness"]
    path = tmp_path / "objectives.json"
    path.write_text(json.dumps(data, indent=2))
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if '"politeness"' in t)
    with pytest.raises(InvalidInput) as e:
        read_principles_file(path)
    assert e.value.field == f"{path}:{line}" and "objectives.politeness: FLR has no follow-ups" in e.value.reason


# -- bad data ---------------------------------------------------------------------------------

@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q"}, "responses: is missing"),
    ({"responses": ["a", "b"]}, "prompt: is missing"),
    ({"prompt": "Q", "responses": ["a"]}, "responses: has 1 response(s)"),
    ({"prompt": "Q", "responses": "a, b"}, "responses: must be a list"),
    ({"prompt": "Q", "responses": ["a", " "]}, "responses[1]: is empty"),
    ({"prompt": "Q", "responses": ["a", "b"], "chosen": "a"}, "responses: the row also has chosen/rejected"),
    ({"prompt": "Q", "completion": "a", "label": True}, "completion: an unpaired (KTO) row"),
    ({"prompt": "Q", "chosen": "a"}, "rejected: is missing"),
    ({"chosen": "a", "rejected": "b"}, "prompt: is missing"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [ROWS[0], row])
    with pytest.raises(InvalidInput) as e:
        read_label_items([str(path)])
    assert e.value.field == f"{path}:2" and message in e.value.reason


def test_cli_bad_inputs_exit_2_with_file_and_line(tmp_path, capsys, tiny_model_dir, principles_file):
    out = tmp_path / "out"
    common = ["--model", str(tiny_model_dir), "--output", str(out), "--no-progress"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["--data", str(empty), "--principles", str(principles_file), *common]) == 2
    assert f"{empty}: has no rows" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "rows.jsonl", [ROWS[0], {"prompt": "Q"}])
    assert main(["--data", str(data), "--principles", str(principles_file), *common]) == 2
    assert f"{data}:2: responses: is missing" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", ROWS[:1])
    bad = tmp_path / "bad.json"
    bad.write_text('{"principles": [\n  {"text": "A", "stat": "a"}]}')
    assert main(["--data", str(good), "--principles", str(bad), *common]) == 2
    assert f"{bad}:2: principles[0].stat: unknown key" in capsys.readouterr().err
    assert main(["--data", str(good), "--principles", str(tmp_path / "none.json"), *common]) == 2
    assert "none.json: no such file" in capsys.readouterr().err
    assert not out.exists()


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "Examples:" in text
    assert ("python -m steer.train label --data runs/icai/heldout.jsonl --principles runs/icai/principles.json --top 1"
            in text)
    assert "--min-margin" in text and "--top" in text


@pytest.mark.parametrize("judge", ["instruction", "followup"])
def test_label_cli_on_the_tiny_model(tmp_path, capsys, tiny_model_dir, principles_file, judge):
    """The real judge end to end: each written margin is the mean of its principle score differences,
    chosen is the side that mean favours, and the file trains with dpo's reader."""
    data = write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": "Name a fruit.", "responses": ["Apple.", "A banana, which is yellow and sweet.", "Pear"]},
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hello there, how are you doing today?"}])
    out = tmp_path / "out"
    assert main(["--data", str(data), "--principles", str(principles_file), "--model", str(tiny_model_dir),
                 "--output", str(out), "--no-progress", "--judge", judge]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["pairs"] == 4 and summary["written"] + summary["skipped"]["margin"] == 4
            and summary["input_pairs"] == 1)
    assert f"labelled {summary['written']} of 4 pairs" in printed
    assert len(summary["principles"]) == 3  # --top 0: every principle in the file
    assert summary["judge"] == judge
    for r in rows:
        diffs = [s["chosen"] - s["rejected"] for s in r["principle_scores"]]
        assert r["margin"] == pytest.approx(np.mean(diffs), rel=1e-5) and r["margin"] > 0
    assert len(read_examples([out / "pairs.jsonl"])) == len(rows)
