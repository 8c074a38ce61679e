"""Steerability evaluation: statistics, direction grids, prompt sets, and the whole pipeline with
policies whose steerability is known by construction."""

import json
import math
import re

import pytest
import torch

from steer.conditioning import parse_direction
from steer.errors import InvalidInput
from steer.eval import (
    EvalConfig,
    default_prompts_path,
    direction_grid,
    direction_label,
    load_policy_and_judge,
    load_prompts,
    main,
    mean_and_se,
    rankdata,
    spearman,
    steerability,
    summarise,
)
from steer.objectives import DEFAULT_OBJECTIVES, Direction
from steer.rewards.scorer import Scorer
from steer.sampling import SamplingParams

# ----------------------------------------------------------------------------------- statistics


def test_rankdata_averages_ties():
    assert rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert rankdata([7, 7, 7]).tolist() == [2.0, 2.0, 2.0]


def test_spearman_matches_hand_computed_values_with_ties():
    # x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4): cov 4.5, var 4.5 and 5 -> 4.5 / sqrt(22.5) = 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    # ties on both sides: ranks (1.5, 1.5, 3.5, 3.5) and (1, 2.5, 2.5, 4): 3 / sqrt(4 * 4.5) = 1 / sqrt(2)
    assert spearman([1, 1, 2, 2], [1, 2, 2, 3]) == pytest.approx(1 / math.sqrt(2), abs=1e-12)


def test_spearman_is_rank_based_and_undefined_for_constants():
    x = [0.1, 0.5, 2.0, 3.0, 7.5]
    assert spearman(x, [math.exp(v) for v in x]) == pytest.approx(1.0)  # monotone, far from linear
    assert spearman(x, [-v ** 3 for v in x]) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, [4.0] * 5))
    with pytest.raises(ValueError, match="equally long"):
        spearman([1, 2], [1, 2, 3])


def test_mean_and_standard_error():
    mean, se = mean_and_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(math.sqrt((5 / 3) / 4))
    assert math.isnan(mean_and_se([3.0])[1])


# ------------------------------------------------------------------------------------ directions


def test_default_grid_is_corners_uniform_and_pairwise_mixes():
    grid = direction_grid("default")
    assert [direction_label(d) for d in grid] == [
        "helpfulness", "creativity", "conciseness", "uniform", "h.50 cr.50", "h.50 co.50", "cr.50 co.50",
    ]
    assert grid[4].as_dict() == {"helpfulness": 0.5, "creativity": 0.5, "conciseness": 0.0}


def test_simplex_and_explicit_grids():
    assert len(direction_grid("simplex:2")) == 6  # C(2 + 2, 2)
    assert len(direction_grid("simplex:4")) == 15
    assert [d.weights for d in direction_grid("simplex:1")] == [d.weights for d in direction_grid("corners")]
    explicit = direction_grid("helpfulness=3,creativity=1; conciseness=2")
    assert [d.as_dict() for d in explicit] == [
        {"helpfulness": 0.75, "creativity": 0.25, "conciseness": 0.0},
        {"helpfulness": 0.0, "creativity": 0.0, "conciseness": 1.0},
    ]


@pytest.mark.parametrize("spec, field, message", [
    ("simplex:0", "grid", "integer N in 1..20"),
    ("simplex:x", "grid", "integer N"),
    ("triangle", "grid", "expected 'default'"),
    ("helpfulness=1;humour=1", "grid[1][humour]", "unknown objective 'humour'"),
    ("helpfulness=lots", "grid[0]", "expected name=weight"),
    ("helpfulness=0,creativity=0", "grid[0]", "at least one weight must be > 0"),
])
def test_bad_grids_name_the_field(spec, field, message):
    with pytest.raises(InvalidInput, match=re.escape(message)) as e:
        direction_grid(spec)
    assert e.value.field == field


# --------------------------------------------------------------------------------------- prompts


def test_shipped_prompt_sets_are_valid_disjoint_and_large_enough():
    train_path, heldout_path = default_prompts_path("train"), default_prompts_path("heldout")
    for path in (train_path, heldout_path):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            row = json.loads(line)
            assert set(row) == {"prompt", "category"}, f"{path}:{lineno}"
            assert row["prompt"].strip() and row["category"].strip(), f"{path}:{lineno}"
    train, heldout = load_prompts(train_path), load_prompts(heldout_path)
    assert len(train) >= 300 and len(heldout) >= 40

    def norm(p):
        return " ".join(p.prompt.casefold().split())

    train_keys, heldout_keys = [norm(p) for p in train], [norm(p) for p in heldout]
    assert len(set(train_keys)) == len(train_keys) and len(set(heldout_keys)) == len(heldout_keys)
    assert not set(train_keys) & set(heldout_keys)
    categories = {p.category for p in train}
    assert len(categories) >= 8
    assert {p.category for p in heldout} <= categories  # held out by prompt, not by task type


def test_load_prompts_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Say hi."}\n\n{"prompt": ""}\n')
    with pytest.raises(InvalidInput, match=re.escape(f"{path}:3: 'prompt' must be a non-empty string")) as e:
        load_prompts(path)
    assert e.value.field == "prompts"
    path.write_text('{"prompt": "Say hi."}\nnot json\n')
    with pytest.raises(InvalidInput, match=re.escape(f"{path}:2: not valid JSON")):
        load_prompts(path)
    with pytest.raises(InvalidInput, match="prompts: cannot read"):
        load_prompts(tmp_path / "missing.jsonl")
    path.write_text('{"prompt": "Say hi.", "category": "greeting"}\n')
    assert [(p.prompt, p.category) for p in load_prompts(path)] == [("Say hi.", "greeting")]


# ------------------------------------------------- the pipeline with policies of known steerability

PROMPTS = ["Name a fruit.", "Tell me a joke about owls.", "How do I boil an egg?"]
MARKERS = {"helpfulness": "apple", "creativity": "banana", "conciseness": "cherry"}


class FakePolicy:
    """Stands in for a causal LM inside the real generate_batch: it decodes each left-padded prompt,
    reads the direction line the conditioning wrote into it, and answers with marker words whose
    counts ``respond(prompt_index, direction)`` chooses."""

    def __init__(self, tokenizer, respond):
        self.tokenizer = tokenizer
        self.respond = respond

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = self.tokenizer.decode(ids[mask.bool()])
            direction = parse_direction(text)
            (index,) = [i for i, p in enumerate(PROMPTS) if p in text]
            counts = self.respond(index, direction)
            words = " ".join(MARKERS[o] for o, c in zip(direction.objectives, counts) for _ in range(c))
            rows.append(self.tokenizer(" " + words, add_special_tokens=False)["input_ids"][:max_new_tokens - 1] + [eos_token_id])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])  # (B, T_new)
        return torch.cat([input_ids, new], dim=1)


class MarkerScorer(Scorer):
    """Reward for an objective = how often its marker word appears; remembers what it was shown."""

    objectives = DEFAULT_OBJECTIVES

    def __init__(self):
        self.seen = []

    def raw_scores(self, conversations, responses):
        self.seen += [list(c) for c in conversations]
        return torch.tensor([[float(r.split().count(MARKERS[o])) for o in self.objectives] for r in responses])

    def describe(self):
        return "markers"


def run_fake(tokenizer, respond, grid="default", num_samples=1):
    scorer = MarkerScorer()
    result = steerability(
        FakePolicy(tokenizer, respond), tokenizer, scorer, PROMPTS, direction_grid(grid), SamplingParams(max_new_tokens=32),
        num_samples=num_samples, batch_size=4, score_batch_size=5,
    )
    return result, scorer


def test_a_perfectly_steerable_policy_scores_plus_one(tokenizer):
    result, scorer = run_fake(tokenizer, lambda i, d: [round(6 * w) for w in d.weights], num_samples=2)
    assert result.spearman == pytest.approx({o: 1.0 for o in DEFAULT_OBJECTIVES}, abs=1e-12)
    assert len(result.records) == len(PROMPTS) * 7 * 2
    for s in result.summaries:  # every generation under a direction realises exactly round(6 w)
        assert s.n == len(PROMPTS) * 2
        assert s.mean == pytest.approx({o: round(6 * w) for o, w in s.direction.as_dict().items()})
        assert all(se == 0 for se in s.se.values())
        # Responses written for v beat the average response by v's own measure; every response
        # here carries 6 markers in all, so by the uniform direction's measure all tie.
        if direction_label(s.direction) == "uniform":
            assert s.vr_gain == pytest.approx(0.0, abs=1e-12)
        else:
            assert s.vr_gain > 0
    # the judge sees the user's request only: no system prompt, no direction line
    assert len(scorer.seen) == len(result.records)
    assert all(c == [{"role": "user", "content": PROMPTS[r.prompt_index]}] for c, r in zip(scorer.seen, result.records))


def test_a_contrary_policy_scores_minus_one(tokenizer):
    result, _ = run_fake(tokenizer, lambda i, d: [round(6 * (1 - w)) for w in d.weights])
    assert result.spearman == pytest.approx({o: -1.0 for o in DEFAULT_OBJECTIVES}, abs=1e-12)
    assert all(s.vr_gain < 0 for s in result.summaries if direction_label(s.direction) != "uniform")


def test_a_policy_that_ignores_the_direction_scores_zero(tokenizer):
    # Output depends on the prompt only; with every prompt asked under every direction the rank
    # covariance factorises into (prompt term) x (direction term summing to zero): exactly 0.
    result, _ = run_fake(tokenizer, lambda i, d: [i + 1, 2 * i, 3 - i], grid="simplex:3")
    assert result.spearman == pytest.approx({o: 0.0 for o in DEFAULT_OBJECTIVES}, abs=1e-12)
    assert all(s.vr_gain == pytest.approx(0.0, abs=1e-12) for s in result.summaries)
    assert result.mean_spearman == pytest.approx(0.0, abs=1e-12)


def test_summarise_rejects_directions_over_other_objectives():
    other = Direction.from_weights({"a": 1.0}, ("a", "b"))
    with pytest.raises(InvalidInput, match="directions: direction over"):
        summarise(DEFAULT_OBJECTIVES, [other], [0], [[0.0, 0.0, 0.0]])


# --------------------------------------------------------------------- the real tiny model + CLI


def _tiny_adapter(tiny_model_dir, path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    # init_lora_weights=False: B is random too, so the adapter really changes the model.
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(path)
    return path


def test_the_judge_is_the_base_model_when_an_adapter_is_given(tiny_model_dir, tiny_loaded, tmp_path):
    adapter = _tiny_adapter(tiny_model_dir, tmp_path / "adapter")
    policy, judge = load_policy_and_judge(str(tiny_model_dir), str(adapter))
    ids = tiny_loaded.tokenizer("Tell me about owls.", return_tensors="pt").input_ids
    with torch.inference_mode():
        base, p, j = (m(ids).logits for m in (tiny_loaded.model, policy.model, judge.model))
    assert not torch.allclose(p, base, atol=1e-3)
    assert torch.equal(j, base)
    alone, same = load_policy_and_judge(str(tiny_model_dir))
    assert alone is same


def test_cli_end_to_end_on_the_tiny_model(tiny_model_dir, tiny_loaded, tmp_path, monkeypatch, capsys):
    from steer.rewards.build import build_scorer

    monkeypatch.setenv("STEER_CACHE", str(tmp_path / "cache"))  # the tiny model's FLR calibration lands here
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "category": "test"}) + "\n" for p in PROMPTS))
    adapter = _tiny_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "eval"
    rc = main([
        "--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompts", str(prompts), "--limit", "2",
        "--grid", "corners", "--num-samples", "2", "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "3",
        "--output", str(out), "--no-progress",
    ])
    stdout = capsys.readouterr().out
    assert rc == 0
    doc = json.loads((out / "steerability.json").read_text())
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert (out / "steerability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert doc["num_prompts"] == 2 and doc["num_generations"] == len(rows) == 2 * 3 * 2
    assert doc["config"]["adapter"] == str(adapter) and doc["config"]["grid"] == "corners"
    assert [d["label"] for d in doc["directions"]] == list(DEFAULT_OBJECTIVES)
    assert {r["prompt"] for r in rows} == set(PROMPTS[:2])
    assert set(doc["timing"]) >= {"load_s", "generate_s", "score_s", "total_s", "generated_tokens"}

    # The report's numbers are the statistics of the generations it wrote.
    for d in doc["directions"]:
        mine = [r for r in rows if r["direction"] == d["weights"]]
        assert len(mine) == d["n"] == 4
        for o in DEFAULT_OBJECTIVES:
            assert d["mean"][o] == pytest.approx(sum(r["scaled"][o] for r in mine) / 4)
            assert d["se"][o] == pytest.approx(mean_and_se([r["scaled"][o] for r in mine])[1])
    for o in DEFAULT_OBJECTIVES:
        expected = spearman([r["direction"][o] for r in rows], [r["scaled"][o] for r in rows])
        assert doc["spearman"][o] == (None if math.isnan(expected) else pytest.approx(expected))
    assert "spearman(w, r)" in stdout and str(out / "steerability.json") in stdout

    # Judged by the base model, not the adapted policy: rescoring the texts with a base-model
    # scorer reproduces the stored rewards, and a policy-model scorer would not.
    conversations = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    texts = [r["text"] for r in rows]
    stored = torch.tensor([[r["raw"][o] for o in DEFAULT_OBJECTIVES] for r in rows])
    # raw rewards do not depend on calibration; skipping it keeps the test fast
    base_raw = build_scorer("default", tiny_loaded, DEFAULT_OBJECTIVES, calibration="none").rewards(conversations, texts).raw
    assert torch.allclose(stored, base_raw, atol=1e-4)
    policy, _ = load_policy_and_judge(str(tiny_model_dir), str(adapter))
    policy_raw = build_scorer("default", policy, DEFAULT_OBJECTIVES, calibration="none").rewards(conversations, texts).raw
    assert not torch.allclose(stored[:, :2], policy_raw[:, :2], atol=1e-4)  # FLR columns move with the model


@pytest.mark.parametrize("overrides, field", [
    (dict(num_samples=0), "num_samples"),
    (dict(limit=0), "limit"),
    (dict(batch_size=True), "batch_size"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(grid="simplex:99"), "grid"),
    (dict(model=""), "model"),
    (dict(objectives=("helpfulness", "helpfulness")), "objectives"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(InvalidInput) as e:
        EvalConfig(**overrides)
    assert e.value.field == field


def test_cli_reports_bad_arguments(capsys, tmp_path):
    assert main(["--num-samples", "0"]) == 2
    assert "steer.eval: error: num_samples: must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["--prompts", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "out")]) == 2
    assert "prompts: cannot read" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_is_instant_and_shows_examples():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "steer.eval", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Examples:" in out.stdout and "--grid" in out.stdout
    # heavy libraries load inside main, so --help never pays for torch
    probe = "import sys, steer.eval; print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout.strip() == "[]"
