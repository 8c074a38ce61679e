"""Context distillation (``dpa --loss distill``): the loss against a hand-computed KL, the rows a
pool gives, the encoding, and a whole run on the tiny model."""

import json
import math

import numpy as np
import pytest
import torch
from steer.training.distill import (
    DistillExample,
    distill_loss,
    distill_rows,
    encode_distill,
    examples_from_rows,
    targets,
)
from steer.training.dpa_cli import main
from steer.training.metrics import read_metrics
from steer.training.settings import DPAConfig, DPOConfig, MixtureConfig

from steer.conditioning import parse_direction
from steer.errors import InvalidInput
from steer.objectives import Direction

OBJECTIVES = ("helpfulness", "creativity", "conciseness")


def test_distill_loss_is_the_token_mean_forward_kl_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    s_logits = torch.randn(5, 7, generator=g, requires_grad=True)
    t_logits = torch.randn(5, 7, generator=g)
    loss, metrics = distill_loss(torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1))
    # By hand: KL(p || q) = sum_v p_v log(p_v / q_v) per row, averaged over rows.
    p, q = t_logits.softmax(-1).tolist(), s_logits.detach().softmax(-1).tolist()
    by_hand = sum(sum(pv * math.log(pv / qv) for pv, qv in zip(pr, qr)) for pr, qr in zip(p, q)) / 5
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    assert metrics["kl"] == pytest.approx(by_hand, rel=1e-5)
    loss.backward()
    # d KL / d student logits = (softmax(student) - p_teacher) / N
    torch.testing.assert_close(s_logits.grad, (s_logits.detach().softmax(-1) - t_logits.softmax(-1)) / 5)
    zero, m = distill_loss(torch.log_softmax(t_logits, -1), torch.log_softmax(t_logits, -1))
    assert zero.item() == pytest.approx(0.0, abs=1e-6) and m["top1_agreement"] == 1.0
    with pytest.raises(ValueError, match="differ"):
        distill_loss(torch.zeros(2, 3), torch.zeros(3, 3))


def test_targets_are_the_own_direction_then_every_other_corner():
    mix = Direction.from_weights({"helpfulness": 0.5, "creativity": 0.5}, OBJECTIVES)
    assert targets(mix, corners=False) == [(mix, False)]
    got = targets(mix, corners=True)
    assert got[0] == (mix, False) and [e.as_dict() for e, r in got[1:]] == [
        {"helpfulness": 1.0, "creativity": 0.0, "conciseness": 0.0},
        {"helpfulness": 0.0, "creativity": 1.0, "conciseness": 0.0},
        {"helpfulness": 0.0, "creativity": 0.0, "conciseness": 1.0}]
    corner = Direction.corner("conciseness", OBJECTIVES)
    assert [e.as_dict()["conciseness"] for e, _ in targets(corner, corners=True)] == [1.0, 0.0, 0.0]


def test_rows_pair_the_direction_line_with_the_instruction_for_the_same_direction(tmp_path):
    from steer.principles import load_principles

    principles = load_principles()
    config = DPAConfig(output=str(tmp_path), loss="distill", corner_pairs=True, guided_samples=1, contrast_samples=1,
                       samples=0)
    prompts = [({"role": "user", "content": "Name a fruit."},)]
    pools = [{"slot": 0, "prompt_index": 0, "weights": [0.0, 0.0, 1.0],
              "cands": [("A pear.", True, 3, "guided", "Answer in one short sentence."),
                        ("", False, 0, "contrast", "x"),
                        ("Apples are ...", False, 9, "contrast", "Give a long answer.")]}]
    rows, samples, stats = distill_rows(config, 0, prompts, pools, principles)
    assert len(samples) == 3 and stats["samples"] == 3
    assert len(rows) == 2 * 3 and stats["rows"] == 6 and stats["rows/relabeled"] == 4  # the empty response gives none
    for r in rows:
        e = Direction.from_weights(r["direction"], OBJECTIVES)
        assert parse_direction(r["prompt"][0]["content"], OBJECTIVES) == e  # the student reads the line of e
        assert r["teacher_prompt"][0]["content"].endswith(r["instruction"])  # the teacher reads an instruction for e
        assert "=" not in r["teacher_prompt"][0]["content"]  # ... and no direction line
        objective = OBJECTIVES[int(np.argmax(e.weights))]
        assert r["instruction"] in principles.objectives[objective]["positive"]
        assert r["prompt"][-1] == r["teacher_prompt"][-1] == {"role": "user", "content": "Name a fruit."}
    assert [r["relabeled"] for r in rows] == [False, True, True] * 2
    assert rows == distill_rows(config, 0, prompts, pools, principles)[0]  # seeded: the same rows again
    assert examples_from_rows(rows)[0].completion == "A pear."
    with pytest.raises(InvalidInput, match="iteration 0 slot 0 sample 0: teacher_prompt"):
        examples_from_rows([{k: v for k, v in rows[0].items() if k != "teacher_prompt"}])


def test_encoding_gives_both_sequences_the_same_completion_tokens(tokenizer):
    from steer.training.pairs import Encoder

    student = ({"role": "system", "content": "S"}, {"role": "user", "content": "Q?"})
    teacher = ({"role": "system", "content": "S\n\nAnswer in one short sentence, please, and keep it plain."},
               {"role": "user", "content": "Q?"})
    enc = Encoder(tokenizer, max_length=48, max_prompt_length=40)
    text = " ".join(["word"] * 60)
    (ex,) = encode_distill([DistillExample(student, teacher, text, True)], enc)
    s, t = ex.sequences
    assert t.prompt_len > s.prompt_len
    assert s.completion_len == t.completion_len == 48 - t.prompt_len  # cut to what fits after the longer prompt
    assert s.input_ids[s.prompt_len:] == t.input_ids[t.prompt_len:]
    (short,) = encode_distill([DistillExample(student, teacher, "Yes.", True)], Encoder(tokenizer, 512, 128))
    assert short.sequences[0].input_ids[-1] == short.sequences[1].input_ids[-1] == tokenizer.eos_token_id


def test_configs_refuse_distill_where_it_has_no_teacher(tmp_path):
    with pytest.raises(InvalidInput, match="loss"):
        DPOConfig(output=str(tmp_path), data=("x.jsonl",), loss="distill")
    with pytest.raises(InvalidInput, match="data"):
        MixtureConfig(output=str(tmp_path), loss="distill", data=("x.jsonl",))
    assert MixtureConfig(output=str(tmp_path), loss="distill").uses_principles
    with pytest.raises(InvalidInput, match="full"):
        DPAConfig(output=str(tmp_path), loss="distill", full=True)
    ok = DPAConfig(output=str(tmp_path), loss="distill", samples=0, guided_samples=1, contrast_samples=0)
    assert ok.uses_principles and ok.pool_size == 1
    assert DPAConfig(output=str(tmp_path), loss="distill", samples=1, guided_samples=0,
                     contrast_samples=0).uses_principles


def test_distill_run_end_to_end_moves_the_student_toward_the_teacher(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Name a fruit.", "What is two plus two?"]))
    out = tmp_path / "run"
    args = ["--prompts", str(prompts), "--model", str(tiny_model_dir), "--output", str(out), "--loss", "distill",
            "--objectives", "helpfulness", "conciseness", "--prompts-per-iteration", "2", "--samples", "0",
            "--guided-samples", "1", "--contrast-samples", "1", "--corner-pairs", "--max-new-tokens", "8",
            "--batch-size", "4", "--lr", "3e-2", "--temperature", "1.0", "--epochs-per-iteration", "4", "--no-progress",
            "--iterations", "1"]
    assert main(args) == 0
    it = out / "iterations" / "000"
    rows = [json.loads(line) for line in (it / "distill.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (it / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and not (it / "pairs.jsonl").exists()
    # Each response: its own direction, plus each corner it is not (a corner has 1 other, a mix 2).
    expected = sum((2 if max(s["direction"].values()) == 1.0 else 3) for s in samples if s["response"].strip())
    assert len(rows) == expected
    records = read_metrics(out)
    assert [r for r in records if r["type"] == "start"][0]["scorer"] is None  # distillation scores nothing
    steps = [r for r in records if r["type"] == "step"]
    assert len(steps) == 4 * math.ceil(len(rows) / 4)
    assert all(math.isfinite(r["kl"]) and r["kl"] >= 0 for r in steps)
    per_epoch = len(steps) // 4
    first, last = (float(np.mean([r["kl"] for r in steps[i * per_epoch:(i + 1) * per_epoch]])) for i in (0, 3))
    assert last < 0.75 * first  # the student learned the teacher's distributions on these rows
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # Resuming a finished run does nothing again.
    before = (it / "distill.jsonl").read_text()
    assert main(args + ["--resume"]) == 0
    assert (it / "distill.jsonl").read_text() == before
    # A new run given the saved samples (--resume, no checkpoint yet) distills on them instead of sampling.
    again = tmp_path / "again"
    (again / "iterations" / "000").mkdir(parents=True)
    (again / "iterations" / "000" / "samples.jsonl").write_text((it / "samples.jsonl").read_text())
    assert main([a if a != str(out) else str(again) for a in args] + ["--resume", "--epochs-per-iteration", "1"]) == 0
    assert (again / "iterations" / "000" / "distill.jsonl").read_text() == before
    record = [r for r in read_metrics(again) if r["type"] == "iteration"][0]
    assert record["seconds/sample"] == 0.0 and record["resampled"] is False


def test_mixture_distill_trains_each_row_through_its_directions_mix(tmp_path, tiny_model_dir):
    from steer.training.mixture_cli import main as mixture_main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Name a fruit.", "What is two plus two?"]))
    out = tmp_path / "mix"
    assert mixture_main(["--prompts", str(prompts), "--model", str(tiny_model_dir), "--output", str(out),
                         "--loss", "distill", "--objectives", "helpfulness", "conciseness",
                         "--prompts-per-iteration", "2", "--guided-samples", "1", "--contrast-samples", "0",
                         "--max-new-tokens", "6", "--batch-size", "2", "--lr", "3e-2", "--temperature", "1.0",
                         "--epochs-per-iteration", "3", "--no-progress", "--iterations", "1"]) == 0
    rows = [json.loads(line) for line in (out / "iterations" / "000" / "distill.jsonl").read_text().splitlines()]
    # no line
    assert rows and all(r["prompt"] == [{"role": "user", "content": r["teacher_prompt"][-1]["content"]}] for r in rows)
    assert all(set(r["direction"]) == {"helpfulness", "conciseness"} for r in rows)
    steps = [r for r in read_metrics(out) if r["type"] == "step"]
    assert steps and all(math.isfinite(r["kl"]) for r in steps)
    assert (out / "mixture" / "mixture.json").is_file()
