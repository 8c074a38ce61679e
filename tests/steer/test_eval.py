"""Steerability evaluation (steer/eval.py): the whole pipeline with policies whose steerability is known by
construction, then the CLI on the tiny model."""

import json
import math
import re

import numpy as np
import pytest
import torch

from steer import eval_stats as st
from steer.conditioning import PREFIX, parse_direction
from steer.errors import InvalidInput
from steer.eval import EvalConfig, evaluate, generate_samples, load_policy_and_judge, main
from steer.eval_grid import direction_grid
from steer.eval_judges import HeldoutJudge, ScorerJudge
from steer.eval_report import BASE, HELDOUT, POLICY, TRAINING, format_table
from steer.eval_stats import PLAIN
from steer.objectives import DEFAULT_OBJECTIVES
from steer.rewards.heldout_followups import HELDOUT_FOLLOWUPS
from steer.rewards.scorer import Scorer
from steer.sampling import SamplingParams

# ------------------------------------------------- the pipeline with policies of known steerability

PROMPTS = ["Name a fruit.", "Tell me a joke about owls.", "How do I boil an egg?"]
MARKERS = {"helpfulness": "apple", "creativity": "banana", "conciseness": "cherry"}
FILLER = "the"  # one token, like every marker: a response's length is its word count


class FakePolicy:
    """Stands in for a causal LM inside the real generate_batch: it decodes each left-padded prompt,
    reads the direction line the conditioning wrote into it (None for a plain prompt), and answers
    with marker words; ``respond(prompt_index, direction)`` returns (marker counts, filler count)."""

    def __init__(self, tokenizer, respond):
        self.tokenizer = tokenizer
        self.respond = respond
        self.calls = 0

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kwargs):
        self.calls += 1
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = self.tokenizer.decode(ids[mask.bool()])
            direction = parse_direction(text) if PREFIX in text else None
            (index,) = [i for i, p in enumerate(PROMPTS) if p in text]
            counts, filler = self.respond(index, direction)
            words = [m for m, c in zip(MARKERS.values(), counts) for _ in range(c)] + [FILLER] * filler
            rows.append(self.tokenizer(" " + " ".join(words),
                                       add_special_tokens=False)["input_ids"][:max_new_tokens - 1] + [eos_token_id])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])  # (B, T_new)
        return torch.cat([input_ids, new], dim=1)


class MarkerScorer(Scorer):
    """Reward for an objective = how often its marker word appears; remembers what it was shown."""

    def __init__(self, objectives=DEFAULT_OBJECTIVES):
        self.objectives = tuple(objectives)
        self.seen = []

    def raw_scores(self, conversations, responses):
        self.seen += [list(c) for c in conversations]
        return torch.tensor([[float(r.split().count(MARKERS[o])) for o in self.objectives] for r in responses])

    def describe(self):
        return "markers"


def steerable(i, d):
    """Markers follow the weights; length falls as the conciseness weight rises."""
    if d is None:
        return [1, 1, 1], 3
    return [round(6 * w) for w in d.weights], round(6 * (1 - d.weights[2]))


def deaf(i, d):
    """Ignores the direction: the answer depends on the prompt only."""
    return [i + 1, 2 * i, 3 - i], i


def marker_judges():
    held = HeldoutJudge(MarkerScorer(("helpfulness", "creativity")), DEFAULT_OBJECTIVES)
    return {HELDOUT: held, TRAINING: ScorerJudge(MarkerScorer())}


def run_fake(tokenizer, policy_respond, base_respond=None, *, seeds=(0, 1), **kwargs):
    policy = FakePolicy(tokenizer, policy_respond)
    base = policy if base_respond is None else FakePolicy(tokenizer, base_respond)
    judges = marker_judges()
    result = evaluate(policy, base, tokenizer, PROMPTS, direction_grid("default"), SamplingParams(max_new_tokens=32),
                      judges, seeds=seeds, batch_size=4, bootstrap=200, **kwargs)
    return result, judges, policy, base


def test_a_steerable_policy_against_a_deaf_base(tokenizer):
    result, judges, _, _ = run_fake(tokenizer, steerable, deaf)
    policy, base = result.systems[POLICY], result.systems[BASE]
    assert not result.policy_is_base and result.headline == HELDOUT
    for judge in (HELDOUT, TRAINING):
        for o in DEFAULT_OBJECTIVES:
            assert policy.spearman[judge][o].mean == pytest.approx(1.0)
            assert policy.spearman[judge][o].ci95 == (pytest.approx(1.0), pytest.approx(1.0))
            # the base's answers never move within a prompt: every prompt counts 0
            assert base.spearman[judge][o].mean == 0.0 and base.spearman[judge][o].num_flat == len(PROMPTS)
            assert result.comparison["spearman_gain"][judge][o]["mean"] == pytest.approx(1.0)
        assert np.diag(policy.side_effects[judge]) == pytest.approx([1.0, 1.0, 1.0])
    # held-out conciseness is minus the token count: 6 markers + round(6 (1 - w)) fillers
    e = policy.effect[HELDOUT]["conciseness"]
    assert (e.mean_w1, e.mean_w0, e.diff) == (-6.0, -12.0, 6.0)
    assert policy.effect[HELDOUT]["helpfulness"].diff == 6.0  # six apples at weight 1, none at weight 0
    # 3 prompts x 7 directions x 2 seeds per system; the base also answers each prompt plainly per seed
    assert len(result.samples[POLICY]) == 42 and len(result.samples[BASE]) == 42 + 6
    assert [d.label for d in base.directions][-1] == "plain" and base.plain().n == 6 and policy.plain() is None
    assert base.plain().mean_tokens == pytest.approx((4 + 7 + 10) / 3)  # deaf: 3i + 4 words for prompt i
    assert result.comparison["at_weight_1"][HELDOUT]["helpfulness"] == {
        POLICY: 6.0, BASE: pytest.approx((1 + 2 + 3) / 3), "base_plain": pytest.approx((1 + 2 + 3) / 3),
    }
    # the judges see the user's request only: no system prompt, no direction line
    for judge in judges.values():
        scorer = judge.flr if isinstance(judge, HeldoutJudge) else judge.scorer
        assert scorer.seen and all(c == [{"role": "user", "content": c[0]["content"]}] and c[0]["content"] in PROMPTS
                                   for c in scorer.seen)


def test_loops_are_counted_per_direction(tokenizer):
    """An answer holding a run of 16 tokens twice counts as a loop (steer.dry.has_repeated_run):
    here the creativity corner's answers ("the" x 40) and nothing else."""
    def loops_when_creative(i, d):
        if d is not None and d.weights[1] == 1.0:
            return [0, 0, 0], 40
        return steerable(i, d)

    result, _, _, _ = run_fake(tokenizer, loops_when_creative, deaf)
    share = {d.label: d.repeating for d in result.systems[POLICY].directions}
    assert share.pop("creativity") == 1.0
    assert set(share.values()) == {0.0}
    assert all(d.repeating == 0.0 for d in result.systems[BASE].directions)
    assert result.systems[POLICY].directions[1].to_json()["repeating_fraction"] == 1.0
    assert "loops" in format_table(result)


def test_without_an_adapter_policy_and_base_are_one_run(tokenizer):
    result, _, policy, _ = run_fake(tokenizer, steerable, seeds=(5,))
    assert result.policy_is_base and result.systems[POLICY] is result.systems[BASE]
    assert policy.calls == 6 + 1  # 21 conditioned rows in batches of 4, then 3 plain prompts: generated once
    assert result.comparison["spearman_gain"][HELDOUT]["helpfulness"]["mean"] == 0.0
    assert {s.seed for s in result.samples[BASE]} == {5}


def test_a_contrary_policy_scores_minus_one(tokenizer):
    result, _, _, _ = run_fake(tokenizer, lambda i, d: ([round(6 * (1 - w)) for w in d.weights],
                                                        round(6 * d.weights[2])) if d else ([0] * 3, 0), plain=False)
    for o in DEFAULT_OBJECTIVES:
        assert result.systems[POLICY].spearman[HELDOUT][o].mean == pytest.approx(-1.0)


class RandomPolicy(FakePolicy):
    """Random marker counts per row, drawn from torch's generator (which generate_batch seeds)."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, lambda i, d: ([int(v) for v in torch.randint(0, 6, (3,))], 0))


class RecordingJudge(ScorerJudge):
    def __init__(self, scorer):
        super().__init__(scorer)
        self.returned = []

    def score(self, conversations, texts, num_tokens=None):
        out = super().score(conversations, texts, num_tokens)
        self.returned.append(out)
        return out


def test_rerank_keeps_the_candidate_with_the_best_weighted_reward(tokenizer):
    judge = RecordingJudge(MarkerScorer())
    grid = direction_grid("default")
    samples = generate_samples(RandomPolicy(tokenizer), tokenizer, PROMPTS, grid, SamplingParams(max_new_tokens=16),
                               seeds=(0,), strategy="rerank", rerank_judge=judge, candidates=4, batch_size=8)
    (scores,) = judge.returned  # (3 prompts x 7 directions x 4 candidates, k), prompt-major
    scores = scores.reshape(len(PROMPTS) * len(grid), 4, 3)
    assert len(samples) == len(PROMPTS) * len(grid)
    assert len({s.candidate for s in samples}) > 1  # the winner is not always the first sample
    for job, s in enumerate(samples):
        vr = scores[job] @ np.array(grid[s.direction_index].weights)  # (4,)
        assert vr[s.candidate] == vr.max()
        assert (judge.score([[{"role": "user", "content": PROMPTS[s.prompt_index]}]], [s.text])[0]
                == pytest.approx(scores[job, s.candidate]))


def test_rerank_steers_a_random_policy_that_conditioned_sampling_cannot(tokenizer):
    def helpfulness(strategy):
        policy = RandomPolicy(tokenizer)
        result = evaluate(policy, policy, tokenizer, PROMPTS, direction_grid("default"),
                          SamplingParams(max_new_tokens=16), marker_judges(), seeds=(0, 1, 2, 3), strategy=strategy,
                          rerank_judge=ScorerJudge(MarkerScorer()), candidates=8, plain=False, batch_size=8,
                          bootstrap=100)
        system = result.systems[POLICY]
        return system.spearman[HELDOUT]["helpfulness"].mean, system.effect[HELDOUT]["helpfulness"].mean_w1

    (rho_conditioned, at1_conditioned), (rho_rerank, at1_rerank) = helpfulness("conditioned"), helpfulness("rerank")
    assert rho_rerank > rho_conditioned + 0.3
    assert at1_rerank > at1_conditioned + 1.5  # best of 8 draws of 0..5 apples versus one draw (mean 2.5)
    assert helpfulness("rerank") == (rho_rerank, at1_rerank)  # deterministic given the seeds


# --------------------------------------------------------------------- the real tiny model + CLI


def _tiny_adapter(tiny_model_dir, path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    # init_lora_weights=False: B is random too, so the adapter really changes the model.
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                    init_lora_weights=False)).save_pretrained(path)
    return path


def test_the_base_is_the_model_without_the_adapter(tiny_model_dir, tiny_loaded, tmp_path):
    adapter = _tiny_adapter(tiny_model_dir, tmp_path / "adapter")
    policy, base = load_policy_and_judge(str(tiny_model_dir), str(adapter))
    ids = tiny_loaded.tokenizer("Tell me about owls.", return_tensors="pt").input_ids
    with torch.inference_mode():
        reference, p, b = (m(ids).logits for m in (tiny_loaded.model, policy.model, base.model))
    assert not torch.allclose(p, reference, atol=1e-3)
    assert torch.equal(b, reference)
    for bare in (None, "none"):  # no adapter: one model, one system
        alone, same = load_policy_and_judge(str(tiny_model_dir), bare)
        assert alone is same


def test_samples_are_deterministic_per_seed_and_differ_between_seeds(tiny_loaded):
    params = SamplingParams(max_new_tokens=5, temperature=1.0)
    grid = direction_grid("corners")

    def texts(seeds):
        samples = generate_samples(tiny_loaded.model, tiny_loaded.tokenizer, PROMPTS[:2], grid, params, seeds=seeds,
                                   plain=True, batch_size=4)
        return {(s.prompt_index, s.direction_index, s.seed): s.text for s in samples}

    first = texts((0, 1))
    assert len(first) == 2 * (3 + 1) * 2 and {k[1] for k in first} == {0, 1, 2, PLAIN}
    assert texts((0, 1)) == first
    pairs = [(first[(p, d, 0)], first[(p, d, 1)]) for p in range(2) for d in (0, 1, 2, PLAIN)]
    assert all(a != b for a, b in pairs)


def test_cli_end_to_end_on_the_tiny_model(tiny_model_dir, tiny_loaded, tmp_path, monkeypatch, capsys):
    from steer.rewards.build import build_scorer
    from steer.rewards.flr import FLRConfig, FLRScorer

    monkeypatch.setenv("STEER_CACHE", str(tmp_path / "cache"))  # the tiny model's FLR calibration lands here
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "category": f"task-{i % 2}"}) + "\n"
                               for i, p in enumerate(PROMPTS)))
    adapter = _tiny_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "eval"
    args = ["--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompts", str(prompts), "--limit", "2",
            "--seeds", "2", "--seed", "3", "--max-new-tokens", "6", "--temperature", "1.0", "--bootstrap", "200",
            "--output", str(out), "--no-progress"]
    rc = main(args)
    stdout = capsys.readouterr().out
    assert rc == 0
    doc = json.loads((out / "steerability.json").read_text())
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert (out / "steerability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert doc["command"].startswith("python -m steer.eval --model") and "--seeds 2" in doc["command"]
    assert doc["config"]["adapter"] == doc["adapter"] == str(adapter) and doc["config"]["strategy"] == "conditioned"
    assert doc["num_prompts"] == 2 and doc["seeds"] == [3, 4] and len(doc["directions"]) == 7
    assert set(doc["systems"]) == {POLICY, BASE} and doc["policy_is_base"] is False
    assert doc["headline_judge"] == HELDOUT and set(doc["judges"]) == {HELDOUT, TRAINING}
    assert "held-out follow-ups" in doc["judges"][HELDOUT] and "conciseness: -tokens" in doc["judges"][HELDOUT]
    assert set(doc["definitions"]) >= {"spearman", "effect", "side_effects", HELDOUT, TRAINING}
    # 2 prompts x 7 directions x 2 seeds per system, plus the base's plain answers per prompt and seed
    assert len(rows) == 2 * 7 * 2 * 2 + 2 * 2
    assert (sum(r["direction"] == "plain" for r in rows) == 4
            and all(r["system"] == BASE for r in rows if r["weights"] is None))
    assert doc["systems"][BASE]["plain"]["n"] == 4 and doc["systems"][POLICY]["plain"] is None
    assert {r["prompt"] for r in rows} == set(PROMPTS[:2])
    assert all(r["scores"][HELDOUT]["conciseness"] == -r["num_tokens"] for r in rows)

    for system in (POLICY, BASE):
        mine = [r for r in rows if r["system"] == system and r["weights"] is not None]
        report = doc["systems"][system]
        assert report["num_generations"] == len(mine) + (4 if system == BASE else 0)
        for judge in (HELDOUT, TRAINING):
            assert np.array(report["side_effects"][judge]["matrix"]).shape == (3, 3)
            for o in DEFAULT_OBJECTIVES:
                # the report's numbers are the statistics of the generations it wrote
                per = st.per_prompt_spearman([r["prompt_index"] for r in mine], [r["weights"][o] for r in mine],
                                             [r["scores"][judge][o] for r in mine], 2)
                stat = report["spearman"][judge][o]
                expected = float(st.nanmean(per))
                assert stat["mean"] == (None if math.isnan(expected) else pytest.approx(expected))
                assert stat["per_prompt"] == [None if math.isnan(v) else pytest.approx(v) for v in per]
                # one prompt per category here: each category's mean is its prompt's rho
                assert doc["spearman_by_category"][system][judge][o] == {
                    f"task-{p}": {"mean": None if math.isnan(per[p]) else pytest.approx(per[p]),
                                  "num_prompts": int(not math.isnan(per[p]))} for p in range(2)}
                at1 = [r["scores"][judge][o] for r in mine if r["weights"][o] == 1.0]
                assert report["effect"][judge][o]["mean_w1"] == pytest.approx(sum(at1) / len(at1))
        tokens = {d["label"]: d["mean_tokens"] for d in report["directions"]}
        assert tokens["helpfulness"] == pytest.approx(
            np.mean([r["num_tokens"] for r in mine if r["direction"] == "helpfulness"]))
    h = doc["comparison"]["at_weight_1"][HELDOUT]["helpfulness"]
    assert h["base_plain"] == pytest.approx(
        np.mean([r["scores"][HELDOUT]["helpfulness"] for r in rows if r["weights"] is None]))
    assert "spearman heldout" in stdout and "helpfulness (heldout) at helpfulness=1" in stdout
    assert "spearman gain" in stdout and str(out / "steerability.json") in stdout
    assert "spearman by category, judge 'heldout': policy (base)" in stdout and "task-1" in stdout
    assert not (out / "eval-progress.jsonl").exists()  # removed once the report is written

    # Judged by the base model, not the adapted policy: a base-model FLR with the held-out sets
    # reproduces the stored held-out scores; the policy model would not.
    policy_rows = [r for r in rows if r["system"] == POLICY]
    conversations = [[{"role": "user", "content": r["prompt"]}] for r in policy_rows]
    texts = [r["text"] for r in policy_rows]
    stored = torch.tensor([[r["scores"][HELDOUT][o] for o in ("helpfulness", "creativity")] for r in policy_rows])
    config = FLRConfig(followups=HELDOUT_FOLLOWUPS, calibration="none")
    base_raw = FLRScorer(tiny_loaded.model, tiny_loaded.tokenizer, config).rewards(conversations, texts).raw
    assert torch.allclose(stored, base_raw, atol=1e-4)
    policy, _ = load_policy_and_judge(str(tiny_model_dir), str(adapter))
    assert not torch.allclose(
        stored, FLRScorer(policy.model, policy.tokenizer, config).rewards(conversations, texts).raw, atol=1e-4)
    # the held-out judge is not the training judge: other follow-ups, other values
    training_raw = build_scorer("flr", tiny_loaded, ("helpfulness", "creativity"),
                                calibration="none").rewards(conversations, texts).raw
    assert not torch.allclose(stored, training_raw, atol=1e-3)


def test_cli_rerank_on_the_tiny_model_without_an_adapter(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STEER_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n")
    out = tmp_path / "eval"
    assert main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--grid", "corners", "--seeds", "1",
                 "--strategy", "rerank", "--candidates", "3", "--max-new-tokens", "4", "--temperature", "1.0",
                 "--output", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "steerability.json").read_text())
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert doc["strategy"] == "rerank" and doc["policy_is_base"] is True and doc["adapter"] is None
    assert doc["systems"][POLICY] == doc["systems"][BASE]  # one run, reported for both
    assert len(rows) == 3 + 1 and all(r["system"] == BASE for r in rows)  # 3 corners + 1 plain answer
    assert all(0 <= r["candidate"] < 3 for r in rows) and [r["candidate"] for r in rows if r["weights"] is None] == [0]
    assert "(= policy: no adapter)" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, field, message", [
    (dict(seeds=0), "seeds", "must be an integer >= 1"),
    (dict(limit=0), "limit", "must be an integer >= 1"),
    (dict(batch_size=True), "batch_size", "must be an integer"),
    (dict(bootstrap=0), "bootstrap", "must be an integer >= 1"),
    (dict(candidates=0), "candidates", "must be an integer >= 1"),
    (dict(temperature=-1.0), "temperature", "finite and >= 0"),
    (dict(temperature=0.0), "temperature", "use --seeds 1"),  # greedy: both seeds would give one answer
    (dict(top_p=0.0), "top_p", "(0, 1]"),
    (dict(grid="simplex:99"), "grid", "integer N"),
    (dict(model=""), "model", "non-empty"),
    (dict(objectives=("helpfulness", "helpfulness")), "objectives", "duplicate"),
    (dict(strategy="mixture"), "mixture", "needs --mixture DIR"),
    (dict(mixture="runs/mix"), "mixture", "applies to --strategy mixture"),
    (dict(strategy="mixture", mixture="runs/mix", adapter="runs/a"), "adapter", "applied to the bare model"),
    (dict(strategy="beam"), "strategy", "expected one of conditioned, rerank"),
    (dict(strategy="rerank", scorer="none"), "scorer", "needs a scorer"),
    (dict(dtype="fp16"), "dtype", "auto"),
    (dict(base_cache=" "), "base_cache", "non-empty"),
])
def test_bad_config_names_the_field(overrides, field, message):
    with pytest.raises(InvalidInput, match=re.escape(message)) as e:
        EvalConfig(**overrides)
    assert e.value.field == field


def test_greedy_with_one_seed_is_allowed():
    assert EvalConfig(temperature=0.0, seeds=1).seed_list == (0,)
    assert EvalConfig(seed=7, seeds=3).seed_list == (7, 8, 9)


def test_cli_reports_bad_arguments(capsys, tmp_path):
    assert main(["--seeds", "0"]) == 2
    assert "steer.eval: error: seeds: must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["--strategy", "mixture", "--output", str(tmp_path / "out")]) == 2
    assert "mixture: strategy 'mixture' needs --mixture DIR" in capsys.readouterr().err
    assert main(["--prompts", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "out")]) == 2
    assert "prompts: cannot read" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_is_instant_and_shows_examples():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "steer.eval", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Examples:" in out.stdout and all(
        flag in out.stdout for flag in ("--grid", "--seeds", "--strategy", "--bootstrap"))
    # heavy libraries load inside main, so --help never pays for torch
    probe = ("import sys, steer.eval; "
             "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60).stdout.strip() == "[]"


def test_mixture_strategy_generates_from_the_mixed_adapters(tiny_model_dir, tmp_path, monkeypatch):
    """Greedy MIXTURE at a corner answers what that one adapter, loaded by PEFT, answers to the plain prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from steer.generation import generate_batch
    from steer.mixture import MixtureSpec, attach_mixture, mixture_layers, save_mixture
    from steer.models import load_tokenizer
    from steer.sampling import SamplingParams

    monkeypatch.setenv("STEER_CACHE", str(tmp_path / "cache"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    attach_mixture(model, DEFAULT_OBJECTIVES, 4, 8.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in mixture_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    mix = save_mixture(model, tmp_path / "mix", MixtureSpec(DEFAULT_OBJECTIVES, 4, 8.0, ("q_proj",), "tiny"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n")
    out = tmp_path / "eval"
    assert main(["--model", str(tiny_model_dir), "--strategy", "mixture", "--mixture", str(mix),
                 "--prompts", str(prompts), "--grid", "corners", "--seeds", "1", "--temperature", "0",
                 "--max-new-tokens", "8", "--scorer", "none", "--no-plain", "--output", str(out), "--no-progress",
                 "--dtype", "float32"]) == 0  # the fp32 reference below, on every machine
    doc = json.loads((out / "steerability.json").read_text())
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert doc["strategy"] == "mixture" and doc["policy_is_base"] is False and "mixture" in doc["adapter"]
    tok = load_tokenizer(str(tiny_model_dir))
    texts = {}
    for objective in DEFAULT_OBJECTIVES:
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), str(mix / objective)).eval()
        (gen,), = generate_batch(peft_model, tok, [[{"role": "user", "content": PROMPTS[0]}]], [None],
                                 SamplingParams(max_new_tokens=8, temperature=0.0))
        policy = [r for r in rows if r["system"] == POLICY and r["direction"] == objective]
        assert len(policy) == 1 and policy[0]["text"] == gen.text
        texts[objective] = gen.text
    assert len(set(texts.values())) > 1  # the adapters answer differently, so the check above could fail


def test_device_is_checked_and_cuda_without_a_gpu_is_named(tiny_model_dir):
    from steer.models import load_model, resolve_device

    with pytest.raises(InvalidInput) as e:
        EvalConfig(device="tpu")
    assert e.value.field == "device"
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"  # auto falls back to the CPU
        with pytest.raises(InvalidInput, match="no CUDA device") as e:
            load_model(str(tiny_model_dir), device="cuda")
        assert e.value.field == "device"
    assert load_model(str(tiny_model_dir), device="auto").model.device.type == (
        "cuda" if torch.cuda.is_available() else "cpu")


def test_mixture_default_is_the_shipped_one_and_fits_the_default_model_only(tiny_model_dir):
    from steer.mixture import shipped_mixture_path
    from steer.models import resolve_mixture

    assert resolve_mixture("default") == shipped_mixture_path()  # what --mixture default evaluates
    with pytest.raises(InvalidInput) as e:
        load_policy_and_judge(str(tiny_model_dir), mixture="default")
    assert e.value.field == "mixture" and "shipped" in e.value.reason


# ---------------------------------------------------------- resuming an interrupted evaluation (--resume)

class StopsAt:
    """Wraps a judge and raises on its ``n``-th call: the evaluation stops mid-way, as a killed run would."""

    def __init__(self, judge, n):
        self.judge, self.n, self.calls = judge, n, 0
        self.objectives = judge.objectives

    def score(self, *args):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("stopped")
        return self.judge.score(*args)

    def describe(self):
        return self.judge.describe()


def test_an_interrupted_evaluation_resumes_where_it_stopped(tokenizer, tmp_path):
    from steer.eval_progress import EvalProgress, fingerprint

    whole, _, _, _ = run_fake(tokenizer, steerable, deaf)  # seeds 0 and 1, never interrupted
    fp = fingerprint({"model": "fake"}, PROMPTS)

    def run(store, judges):
        policy, base = FakePolicy(tokenizer, steerable), FakePolicy(tokenizer, deaf)
        result = evaluate(policy, base, tokenizer, PROMPTS, direction_grid("default"),
                          SamplingParams(max_new_tokens=32), judges, seeds=(0, 1), batch_size=4, bootstrap=200,
                          store=store)
        return result, policy, base

    judges = marker_judges()
    judges[HELDOUT] = StopsAt(judges[HELDOUT], 3)  # units: policy seed 0, policy seed 1, then base seed 0 fails
    with pytest.raises(RuntimeError, match="stopped"):
        run(EvalProgress.open(tmp_path, fp, resume=False), judges)
    with pytest.raises(InvalidInput, match="--resume") as e:
        EvalProgress.open(tmp_path, fp, resume=False)  # an unfinished evaluation is never overwritten
    assert e.value.field == "output"
    store = EvalProgress.open(tmp_path, fp, resume=True)
    assert sorted(store.units) == [(POLICY, 0), (POLICY, 1)]

    result, policy, base = run(store, marker_judges())
    assert policy.calls == 0 and base.calls > 0  # the policy's finished units are not generated again
    for name in (POLICY, BASE):
        assert result.samples[name] == whole.samples[name]
        for judge in (HELDOUT, TRAINING):
            np.testing.assert_array_equal(result.systems[name].scores[judge], whole.systems[name].scores[judge])
            assert result.systems[name].spearman[judge]["creativity"].mean == pytest.approx(
                whole.systems[name].spearman[judge]["creativity"].mean)
    store.finish()
    assert list(tmp_path.iterdir()) == []


def test_a_base_cache_serves_the_base_system_to_the_next_evaluation(tokenizer, tmp_path):
    """--base-cache: a second evaluation with another policy but the same base settings generates the
    policy only, and its base figures equal the first run's; the evaluation's own store gets the
    policy's units, the cache the base's."""
    from steer.eval_progress import EvalProgress, fingerprint, open_base_cache

    fp = fingerprint({"model": "fake", "adapter": "a", "strategy": "conditioned"}, PROMPTS)
    cache = open_base_cache(tmp_path / "cache", fp)
    first, _, _, base = run_fake(tokenizer, steerable, deaf, store=EvalProgress.open(tmp_path / "a", fp, False),
                                 base_store=cache)
    assert base.calls > 0 and sorted(cache.units) == [(BASE, 0), (BASE, 1)]
    cache.lock.close()  # the first evaluation has ended
    fp_b = fingerprint({"model": "fake", "adapter": "b", "strategy": "conditioned"}, PROMPTS)
    store_b = EvalProgress.open(tmp_path / "b", fp_b, False)
    second, _, policy, base = run_fake(tokenizer, lambda i, d: deaf(2 - i, d), deaf, store=store_b,
                                       base_store=open_base_cache(tmp_path / "cache", fp_b))
    assert base.calls == 0 and policy.calls > 0
    assert second.samples[BASE] == first.samples[BASE] and second.samples[POLICY] != first.samples[POLICY]
    np.testing.assert_array_equal(second.systems[BASE].scores[HELDOUT], first.systems[BASE].scores[HELDOUT])
    assert sorted(store_b.units) == [(POLICY, 0), (POLICY, 1)]


def test_base_settings_leave_out_what_only_the_policy_uses(tmp_path):
    from steer.eval_progress import base_fingerprint, fingerprint, open_base_cache

    def fp(**kw):
        return base_fingerprint(fingerprint({"model": "m", "dtype": "float32", "candidates": 4, **kw}, PROMPTS))

    assert fp(adapter="a", strategy="conditioned") == fp(adapter="b", strategy="conditioned")
    assert fp(mixture="x", strategy="mixture", candidates=8) == fp(adapter=None, strategy="conditioned")
    assert fp(strategy="rerank", candidates=4) != fp(strategy="rerank", candidates=8)  # rerank's base reranks
    assert fp(strategy="conditioned", dtype="bfloat16") != fp(strategy="conditioned")
    full = fingerprint({"model": "m", "strategy": "conditioned"}, PROMPTS)
    held = open_base_cache(tmp_path, full)
    with pytest.raises(InvalidInput, match="in use by another evaluation") as e:
        open_base_cache(tmp_path, full)  # one evaluation at a time appends to an entry
    assert e.value.field == "base_cache"
    held.lock.close()
    open_base_cache(tmp_path, full).lock.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInput, match="not a directory") as e:
        open_base_cache(tmp_path / "file", full)
    assert e.value.field == "base_cache"


def test_the_progress_file_refuses_another_evaluation_and_drops_a_cut_off_line(tmp_path):
    from steer.eval_progress import PROGRESS_NAME, EvalProgress, Unit, fingerprint
    from steer.eval_report import Sample

    fp = fingerprint({"model": "m", "grid": "default", "seeds": 1}, PROMPTS)
    assert fp == fingerprint({"model": "m", "grid": "default", "seeds": 2, "output": "elsewhere"}, PROMPTS)
    store = EvalProgress.open(tmp_path, fp, resume=False)
    assert list(tmp_path.iterdir()) == []  # nothing is written before a unit finishes
    unit = Unit((Sample(0, 0, 0, "an answer", 2, True), Sample(1, PLAIN, 0, "plain", 1, False)),
                {HELDOUT: np.array([[0.5, -1.0, -2.0], [0.25, 0.0, -1.0]])}, {"generate_s": 1.0, "judge_s": 2.0})
    store.put(POLICY, 0, unit)
    store.put(POLICY, 1, unit)
    path = tmp_path / PROGRESS_NAME

    with pytest.raises(InvalidInput, match="grid was 'default', now 'corners'") as e:
        EvalProgress.open(tmp_path, fingerprint({"model": "m", "grid": "corners"}, PROMPTS), resume=True)
    assert e.value.field == "resume"
    with pytest.raises(InvalidInput, match="prompts_sha256"):
        EvalProgress.open(tmp_path, fingerprint({"model": "m", "grid": "default"}, PROMPTS[:2]), resume=True)

    text = path.read_text()
    path.write_text(text[:-20])  # the last unit was cut off mid-write: it runs again
    store = EvalProgress.open(tmp_path, fp, resume=True)
    assert sorted(store.units) == [(POLICY, 0)]
    got = store.get(POLICY, 0)
    assert got.samples == unit.samples and got.timing == unit.timing
    np.testing.assert_array_equal(got.scores[HELDOUT], unit.scores[HELDOUT])
    store.put(POLICY, 1, unit)  # rewrites the file whole, without the cut-off line, then appends
    assert sorted(EvalProgress.open(tmp_path, fp, resume=True).units) == [(POLICY, 0), (POLICY, 1)]

    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1][:30], lines[2]]) + "\n")
    with pytest.raises(InvalidInput, match=f"{PROGRESS_NAME}:2"):
        EvalProgress.open(tmp_path, fp, resume=True)
    path.write_text(json.dumps({"type": "header"}) + "\n")
    with pytest.raises(InvalidInput, match=f"{PROGRESS_NAME}:1"):
        EvalProgress.open(tmp_path, fp, resume=True)


def test_cli_refuses_an_unfinished_evaluation_without_resume(tmp_path, capsys):
    from steer.eval_progress import PROGRESS_NAME

    (tmp_path / PROGRESS_NAME).write_text("{}\n")
    assert main(["--output", str(tmp_path), "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "output:" in err and PROGRESS_NAME in err and "--resume" in err


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_dtype_auto_is_resolved_for_the_systems_and_the_judges_stay_float32(
        native, expected, tiny_model_dir, tiny_loaded, tmp_path, monkeypatch):
    """--dtype auto means what python -m steer.serve serves on this machine (monkeypatched here, so both
    cases run anywhere); the report records the resolved dtype, and the held-out judge scores with the
    float32 base model either way."""
    import steer.models
    from steer.rewards.flr import FLRConfig, FLRScorer

    monkeypatch.setattr(steer.models, "bf16_native", lambda device: native)
    monkeypatch.setenv("STEER_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n")
    adapter = _tiny_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "eval"
    assert main(["--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompts", str(prompts), "--grid",
                 "corners", "--seeds", "1", "--max-new-tokens", "5", "--temperature", "1.0", "--scorer", "none",
                 "--no-plain", "--output", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "steerability.json").read_text())
    assert doc["config"]["dtype"] == expected
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    conversations = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    stored = torch.tensor([[r["scores"][HELDOUT][o] for o in ("helpfulness", "creativity")] for r in rows])
    config = FLRConfig(followups=HELDOUT_FOLLOWUPS, calibration="none")
    fp32 = FLRScorer(tiny_loaded.model, tiny_loaded.tokenizer, config).rewards(conversations, [r["text"] for r in rows])
    assert torch.allclose(stored, fp32.raw, atol=1e-4)
