"""Reward model training on synthetic data whose labels are known functions of the text."""

import json
import random

import pytest
import torch
from steer.training.checkpoint import latest_checkpoint
from steer.training.metrics import read_metrics
from steer.training.reward_cli import RewardTrainConfig, config_from_args, main
from steer.training.reward_model import train_reward_model

from steer.errors import InvalidInput
from steer.rewards.reward_model import RewardModelScorer, read_reward_model_spec

WORDS = "the cat sat on a mat and then we went home to eat some bread with tea in the garden".split()
PROMPTS = ["Tell me something.", "Say a few words.", "Write a line."]


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """helpfulness = how often 'please' appears; conciseness = -(words / 5)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(0, 4)
        body = [rng.choice(WORDS) for _ in range(rng.randint(3, 24))]
        for _ in range(k):
            body.insert(rng.randint(0, len(body)), "please")
        rows.append({"prompt": rng.choice(PROMPTS), "response": " ".join(body), "helpfulness": k,
                     "conciseness": -len(body) / 5})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path, tiny_model_dir, **overrides) -> RewardTrainConfig:
    values = dict(
        output=str(tmp_path / "rm"), model=str(tiny_model_dir), objectives=("helpfulness", "conciseness"),
        batch_size=16, lr=3e-3, max_length=64, eval_every=0, checkpoint_every=0, progress=False,
    )
    values.update(overrides)
    return RewardTrainConfig(**values)


def test_ratings_regression_learns_both_objectives(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_rows(320, seed=0))
    held = write_jsonl(tmp_path / "held.jsonl", synthetic_rows(48, seed=1))
    metrics = train_reward_model(config(tmp_path, tiny_model_dir, data=(str(train),), eval_data=(str(held),),
                                        steps=150))
    assert metrics["conciseness"]["correlation"] > 0.8, metrics
    assert metrics["helpfulness"]["correlation"] > 0.5, metrics
    assert metrics["helpfulness"]["n_rated"] == 48
    # The directory is a scorer; its raw rewards are on the label scale and track the labels.
    scorer = RewardModelScorer(tmp_path / "rm")
    rows = synthetic_rows(48, seed=1)
    r = scorer.rewards([[{"role": "user", "content": row["prompt"]}] for row in rows],
                       [row["response"] for row in rows])
    labels = torch.tensor([[row["helpfulness"], row["conciseness"]] for row in rows])
    corr = torch.corrcoef(torch.stack([r.raw[:, 1], labels[:, 1]]))[0, 1]
    assert corr == pytest.approx(metrics["conciseness"]["correlation"], abs=1e-3)
    spec = read_reward_model_spec(tmp_path / "rm")
    assert spec.objectives == ("helpfulness", "conciseness") and spec.adapter == "adapter"
    assert set(spec.calibration) == {"helpfulness", "conciseness"}
    # Scaled rewards of the eval responses (the calibration set) are standardised.
    assert float(r.scaled[:, 1].mean()) == pytest.approx(0.0, abs=1e-3)


def preference_pairs(n: int, seed: int) -> list[dict]:
    """Conciseness pairs: the response with fewer words is chosen."""
    rows = synthetic_rows(2 * n, seed)
    out = []
    for a, b in zip(rows[::2], rows[1::2]):
        if a["conciseness"] != b["conciseness"]:
            chosen, rejected = sorted([a, b], key=lambda r: -r["conciseness"])
            out.append({"prompt": a["prompt"], "chosen": chosen["response"], "rejected": rejected["response"],
                        "objective": "conciseness"})
    return out


def test_preference_pairs_train_bradley_terry(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(160, seed=2))
    held = write_jsonl(tmp_path / "held.jsonl", preference_pairs(40, seed=3))
    metrics = train_reward_model(config(tmp_path, tiny_model_dir, data=(str(train),), eval_data=(str(held),), steps=60))
    assert metrics["conciseness"]["pairwise_accuracy"] >= 0.85, metrics
    assert metrics["conciseness"]["n_pairs"] >= 30
    assert "mse" not in metrics["conciseness"] and "helpfulness" not in metrics  # no ratings, no helpfulness pairs


def test_bradley_terry_trains_only_the_pairs_objective_and_mse_masks_unrated(tiny_model_dir, tokenizer):
    from steer.training.reward_data import PreferenceExample, RatingExample
    from steer.training.reward_model import batch_loss, build_model, collate

    model, tok, _ = build_model(RewardTrainConfig(data=("x",), output="x", model=str(tiny_model_dir),
                                                  objectives=("helpfulness", "conciseness"), lora_r=0))
    conv = [{"role": "user", "content": "hi"}]
    pair = PreferenceExample(conv, "short", "a much longer answer", objective=1, where="f:1")
    rated = RatingExample(conv, "an answer", (None, 2.0), where="f:2")  # helpfulness unrated
    for examples in ([pair], [rated]):
        model.zero_grad()
        loss, _ = batch_loss(model, collate(examples, tok, 64, [0.0, 0.0], [1.0, 1.0]), bt_weight=1.0)
        loss.backward()
        grad = model.head.weight.grad  # (2, H)
        assert grad[0].abs().sum() == 0, "helpfulness row got a gradient"
        assert grad[1].abs().sum() > 0
    # The BT term is -log sigmoid(h(chosen) - h(rejected)) on the pair's objective.
    batch = collate([pair], tok, 64, [0.0, 0.0], [1.0, 1.0])
    with torch.no_grad():
        out = model(batch.ids, batch.mask)
        loss, parts = batch_loss(model, batch, bt_weight=1.0)
    expected = -torch.nn.functional.logsigmoid(out[0, 1] - out[1, 1])
    assert parts["bt"] == pytest.approx(float(expected), abs=1e-6)


BAD_ROWS = [
    ("{not json", "not valid JSON"),
    ('{"prompt": "hi", "helpfulness": 3}', "response: must be a non-empty string"),
    ('{"prompt": "hi", "response": "ok", "helpfulness": "high"}',
     "helpfulness: must be a finite number or null, got 'high'"),
    ('{"prompt": "hi", "response": "ok", "helpfulness": true}', "helpfulness: must be a finite number or null"),
    ('{"prompt": "hi", "response": "ok", "correctness": 3}', "rates none of the objectives"),
    ('{"prompt": "hi", "chosen": "a", "rejected": "b", "objective": "humour"}',
     "objective: must be one of helpfulness, conciseness, got 'humour'"),
    ('{"prompt": "hi", "chosen": "a", "rejected": "a", "objective": "helpfulness"}',
     "chosen and rejected are identical"),
    ('{"response": "ok", "helpfulness": 1}', "prompt: is empty"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "response": "ok", '
     '"helpfulness": 1}', "messages[1].role"),
    ("[1, 2]", "a row must be a JSON object"),
    ('{"prompt": "hi", "chosen": "", "rejected": "b", "objective": "helpfulness"}',
     "chosen: a preference row needs non-empty"),
]


@pytest.mark.parametrize("line, message", BAD_ROWS, ids=[m.split(":")[0][:30] for _, m in BAD_ROWS])
def test_a_bad_row_stops_with_file_and_line(tmp_path, tiny_model_dir, capsys, line, message):
    good = json.dumps(synthetic_rows(1, seed=0)[0])
    data = tmp_path / "data.jsonl"
    data.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")  # the bad row is on line 4 (line 2 is blank)
    code = main(["--data", str(data), "--output", str(tmp_path / "rm"), "--model", str(tiny_model_dir),
                 "--objectives", "helpfulness", "conciseness", "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data}:4: " in err and message in err, err
    assert not (tmp_path / "rm").exists()  # a refused run creates nothing


def test_resume_continues_the_same_run(tmp_path, tiny_model_dir):
    """Interrupted at step 4 and resumed to 8 = 8 steps straight: same weights (LoRA dropout on, so the
    restored RNG matters), same per-step losses in metrics.jsonl, each step recorded once."""
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_rows(64, seed=4))

    def run(output, **overrides):
        return train_reward_model(config(tmp_path, tiny_model_dir, data=(str(data),), output=str(tmp_path / output),
                                         eval_fraction=0.0, batch_size=8, lora_dropout=0.1, **overrides))

    run("a", steps=8)
    run("b", steps=4, checkpoint_every=2)
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.step == 4 and ckpt.path.name == "step-00000004" and (ckpt.path / "rng-rank0.pt").is_file()
    assert sorted(p.name for p in ckpt.path.parent.iterdir()) == ["step-00000002", "step-00000004"]
    assert (tmp_path / "b" / "config.yaml").is_file()
    # A fresh run into it is refused (it would mix two runs' checkpoints); --resume into nothing too.
    with pytest.raises(InvalidInput, match="already holds checkpoints .*pass --resume"):
        run("b", steps=8)
    with pytest.raises(InvalidInput, match="resume: no checkpoint in"):
        run("empty", steps=8, resume=True)
    assert not (tmp_path / "empty").exists()
    run("b", steps=8, resume=True)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "a" / "head.safetensors")), load_file(str(tmp_path / "b" / "head.safetensors"))
    torch.testing.assert_close(a["weight"], b["weight"], atol=1e-5, rtol=1e-4)
    a_lora = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b_lora = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    for name in a_lora:
        torch.testing.assert_close(a_lora[name], b_lora[name], atol=1e-5, rtol=1e-4)
    steps = {out: [r for r in read_metrics(tmp_path / out) if r["type"] == "step"] for out in ("a", "b")}
    assert [r["step"] for r in steps["b"]] == list(range(1, 9))
    assert [r["loss"] for r in steps["b"]] == pytest.approx([r["loss"] for r in steps["a"]], rel=1e-4)
    # A resume with a different architecture setting is refused, naming it.
    with pytest.raises(InvalidInput, match="lora_r: is 4 but .* was trained with 8"):
        run("b", steps=10, lora_r=4, resume=True)


def test_cli_yaml_config_with_flag_overrides(tmp_path):
    cfg = tmp_path / "rm.yaml"
    cfg.write_text("data: [a.jsonl, b.jsonl]\noutput: runs/rm\nlora_r: 16\nsteps: 50\n")
    config = config_from_args(["--config", str(cfg), "--steps", "70", "--objectives", "helpfulness"])
    assert config.data == ("a.jsonl", "b.jsonl") and config.lora_r == 16 and config.steps == 70
    assert config.objectives == ("helpfulness",) and config.lr == RewardTrainConfig.lr  # untouched default
    cfg.write_text("data: a.jsonl\noutput: x\nlearning_rate: 0.1\n")  # TRL's name for lr
    assert config_from_args(["--config", str(cfg)]).lr == 0.1
    cfg.write_text("data: a.jsonl\noutput: x\nlearning_rat: 0.1\n")
    with pytest.raises(InvalidInput, match="learning_rat: unknown key"):
        config_from_args(["--config", str(cfg)])
    with pytest.raises(InvalidInput, match="lora_r: invalid value -1"):
        config_from_args(["--data", "a.jsonl", "--output", "x", "--lora-r", "-1"])
    with pytest.raises(InvalidInput, match="data: give at least one training file"):
        config_from_args(["--output", "x"])


def test_help_lists_every_field_and_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--data", "--eval-data", "--lora-r", "--resume", "--config", "--bt-weight"):
        assert flag in out
    assert "python -m steer.train reward --data ratings.jsonl --output runs/rm" in out
