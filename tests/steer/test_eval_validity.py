"""Judge validity: instruction labels, the AUC by hand, and the command on the tiny model."""

import json

import numpy as np
import pytest

from steer.errors import InvalidInput
from steer.eval_validity import ValidityConfig, auc, auc_interval, label_instruction, main, run_validity
from steer.principles import load_principles, parse_principles

PRINCIPLES_DATA = {"format": "steer.principles/v1", "objectives": {
    o: {"positive": [f"Be {o} {i}." for i in range(6)], "negative": [f"Avoid {o} {i}." for i in range(6)]}
    for o in ("helpfulness", "creativity", "conciseness")}}
PRINCIPLES = parse_principles(PRINCIPLES_DATA)


def test_labels_come_from_the_principle_texts_an_instruction_joins():
    assert label_instruction("Be creativity 2.", PRINCIPLES) == {"creativity": "positive"}
    assert label_instruction("Be creativity 2. Avoid conciseness 5.", PRINCIPLES) == {
        "creativity": "positive", "conciseness": "negative"}
    assert label_instruction("Be creativity 2. And something else.", PRINCIPLES) == {}
    assert label_instruction("Something else.", PRINCIPLES) == {}
    # The packaged file: each instruction labels its own objective.
    shipped = load_principles()
    for o, by_polarity in shipped.objectives.items():
        for polarity, texts in by_polarity.items():
            assert all(label_instruction(t, shipped) == {o: polarity} for t in texts)


def test_auc_by_hand():
    # positive (3, 1) vs negative (2, 1): pairs 3>2, 3>1, 1<2, 1=1 -> (1 + 1 + 0 + 0.5) / 4
    assert auc([3, 1], [2, 1]) == pytest.approx(0.625)
    assert auc([5, 6], [1, 2]) == 1.0 and auc([1], [1]) == 0.5
    lo, hi = auc_interval([3, 1, 4, 1, 5], [2, 7, 1, 8], resamples=200, seed=0)
    assert 0.0 <= lo <= auc([3, 1, 4, 1, 5], [2, 7, 1, 8]) <= hi <= 1.0


class RankJudge:
    """Scores each answer by a number written in it; conciseness by minus its tokens."""

    objectives = ("helpfulness", "creativity", "conciseness")

    def describe(self):
        return "hand judge"

    def score(self, conversations, texts, num_tokens):
        assert all(c[-1]["role"] == "user" and c[-1]["content"].startswith("Prompt") for c in conversations)
        values = [float(t.split()[-1]) for t in texts]
        return np.array([[v, -v, -n] for v, n in zip(values, num_tokens)])


def write_run(tmp_path, rows):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Prompt {i}"}) + "\n" for i in range(3)))
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    principles = tmp_path / "principles.json"
    principles.write_text(json.dumps(PRINCIPLES_DATA))
    return samples, prompts, principles


def row(source, instruction, value, tokens, prompt_index=0):
    return {"source": source, "instruction": instruction, "response": f"answer {value}", "tokens": tokens,
            "prompt_index": prompt_index, "finished": True}


def test_validity_table_by_hand(tmp_path):
    rows = [row("guided", "Be helpfulness 0.", 3, 10), row("contrast", "Avoid helpfulness 1.", 1, 30, 1),
            row("guided", "Be helpfulness 2. Be conciseness 0.", 1, 5, 2),
            row("contrast", "Avoid helpfulness 3. Avoid conciseness 4.", 2, 40),
            row("policy", None, 9, 1), row("guided", "Answer like a pirate.", 7, 7)]
    samples, prompts, principles = write_run(tmp_path, rows)
    config = ValidityConfig(samples=str(samples), prompts=str(prompts), principles=str(principles),
                            output=str(tmp_path / "v.json"), bootstrap=50)
    result = run_validity(config, judges={"hand": RankJudge()})
    assert result["answers"] == 4 and result["unlabelled"] == 1  # the policy row is not read at all
    table = result["judges"]["hand"]["objectives"]
    assert table["helpfulness"]["auc"] == pytest.approx(0.625)  # (3, 1) vs (1, 2) as in test_auc_by_hand
    assert (table["helpfulness"]["n_positive"], table["helpfulness"]["n_negative"]) == (2, 2)
    assert table["conciseness"]["auc"] == 1.0  # 5 tokens vs 40
    assert table["creativity"] == {"n_positive": 0, "n_negative": 0, "auc": None, "ci95": None}
    assert json.loads((tmp_path / "v.json").read_text()) == result


@pytest.mark.parametrize("bad, words", [
    ({"source": "guided", "instruction": "Be helpfulness 0.", "response": "x", "tokens": "3", "prompt_index": 0},
     "samples.jsonl:1: tokens must be a int"),
    ({"source": "contrast", "instruction": "Be helpfulness 0.", "response": "x", "tokens": 3, "prompt_index": 7},
     "samples.jsonl:1: prompt_index 7 is outside the 3 prompts"),
])
def test_bad_sample_rows_name_file_and_line(tmp_path, bad, words):
    samples, prompts, principles = write_run(tmp_path, [bad])
    config = ValidityConfig(samples=str(samples), prompts=str(prompts), principles=str(principles))
    with pytest.raises(InvalidInput) as e:
        run_validity(config, judges={"hand": RankJudge()})
    assert e.value.field == "samples" and words in str(e.value)


def test_command_on_the_tiny_model(tmp_path, tiny_model_dir, capsys):
    rows = [row("guided", "Be conciseness 0.", 1, 4), row("contrast", "Avoid conciseness 0.", 2, 9),
            row("guided", "Be creativity 1.", 3, 6, 1), row("contrast", "Avoid creativity 2.", 4, 8, 2)]
    samples, prompts, principles = write_run(tmp_path, rows)
    out = tmp_path / "v.json"
    argv = ["--samples", str(samples), "--prompts", str(prompts), "--principles", str(principles), "--model",
            str(tiny_model_dir), "--bootstrap", "20", "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["judges"]) == {"heldout", "training"}
    assert result["judges"]["heldout"]["objectives"]["conciseness"]["auc"] == 1.0  # 4 tokens vs 9
    for judge in result["judges"].values():
        assert 0.0 <= judge["objectives"]["creativity"]["auc"] <= 1.0
    assert "heldout    creativity" in capsys.readouterr().out
    assert main(["--samples", str(tmp_path / "none.jsonl"), "--prompts", str(prompts)]) == 2
    assert "samples: " in capsys.readouterr().err
