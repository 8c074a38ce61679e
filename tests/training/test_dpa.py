"""DPA: the direction distribution, the prompt schedule, and whole iterations on the tiny model."""

import json
import math

import numpy as np
import pytest
import torch
from steer.training.dpa import prompt_schedule, sample_directions
from steer.training.dpa_cli import main
from steer.training.metrics import read_metrics

from steer.conditioning import direction_line, parse_direction
from steer.objectives import Direction

OBJECTIVES = ("helpfulness", "creativity", "conciseness")


def test_directions_mix_corners_and_dirichlet_at_two_decimals():
    dirs = sample_directions(40, OBJECTIVES, np.random.default_rng(0), corner_share=0.25, alpha=1.0)
    corners = [d for d in dirs if max(d.weights) == 1.0]
    assert len(dirs) == 40 and len(corners) == 10
    # Corners take the objectives in turn, so each appears 3 or 4 times out of 10.
    counts = {o: sum(d[o] == 1.0 for d in corners) for o in OBJECTIVES}
    assert sorted(counts.values()) == [3, 3, 4]
    for d in dirs:
        assert math.isclose(sum(d.weights), 1.0, abs_tol=1e-9)
        assert parse_direction(direction_line(d), OBJECTIVES) == d  # exactly what the policy reads
    mixes = np.array([d.weights for d in dirs if max(d.weights) < 1.0])
    assert (mixes > 0).mean() > 0.9 and np.abs(mixes.mean(0) - 1 / 3).max() < 0.12  # Dirichlet(1): spread, centred
    assert sample_directions(40, OBJECTIVES, np.random.default_rng(0), 0.25, 1.0) == dirs  # seeded
    assert all(max(d.weights) == 1.0 for d in sample_directions(5, OBJECTIVES, np.random.default_rng(1), 1.0, 1.0))


def test_prompt_schedule_uses_every_prompt_before_repeating():
    seen = [i for k in range(5) for i in prompt_schedule(10, 4, k, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert prompt_schedule(10, 4, 1, seed=3) == seen[4:8] and prompt_schedule(10, 4, 1, seed=4) != seen[4:8]


PROMPTS = ["Name a fruit.", "Describe the sea in a few words.", "What is two plus two?"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": PROMPTS[0], "category": "x"}, {"prompt": [{"role": "user", "content": PROMPTS[1]}]},
            {"prompt": PROMPTS[2]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpa_args(prompts_file, model_dir, output, *extra):
    return ["--prompts", str(prompts_file), "--model", str(model_dir), "--output", str(output),
            "--scorer", "flr:helpfulness+length", "--objectives", "helpfulness", "conciseness",
            "--scorer-calibration", "none", "--prompts-per-iteration", "2", "--samples", "3", "--max-new-tokens", "6",
            "--batch-size", "1", "--lr", "5e-2", "--min-margin", "0", "--temperature", "1.0", "--no-progress",
            "--guided-samples", "0", "--contrast-samples", "0", *extra]  # the plain on-policy loop


def test_dpa_iterations_end_to_end(tmp_path, prompts_file, tiny_model_dir):
    from steer.training.pairs import read_examples

    from steer.models import load_model
    from steer.rewards.build import build_scorer

    out = tmp_path / "dpa"
    assert main(dpa_args(prompts_file, tiny_model_dir, out, "--iterations", "1")) == 0
    first_samples = (out / "iterations" / "000" / "samples.jsonl").read_text()
    # Extending the finished run by one iteration resumes after iteration 0 instead of redoing it.
    assert main(dpa_args(prompts_file, tiny_model_dir, out, "--iterations", "2", "--resume")) == 0
    assert (out / "iterations" / "000" / "samples.jsonl").read_text() == first_samples

    records = read_metrics(out)
    iterations = [r for r in records if r["type"] == "iteration"]
    steps = [r for r in records if r["type"] == "step"]
    assert [r["iteration"] for r in iterations] == [0, 1]
    assert all(r["samples"] == 6 and r["pairs"] + r["skipped/margin"] + r["skipped/equal"] == 2 for r in iterations)
    assert len(steps) == sum(r["pairs"] for r in iterations) >= 2  # batch 1: one step per pair
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and {r["iteration"] for r in steps} <= {0, 1}
    assert all(math.isfinite(r["loss"]) for r in steps)

    for k in (0, 1):
        samples = [json.loads(line)
                   for line in (out / "iterations" / f"{k:03d}" / "samples.jsonl").read_text().splitlines()]
        pairs = [json.loads(line)
                 for line in (out / "iterations" / f"{k:03d}" / "pairs.jsonl").read_text().splitlines()]
        assert len(samples) == 6
        for s in samples:
            d = Direction.from_weights(s["direction"], ("helpfulness", "conciseness"))
            assert s["score"] == pytest.approx(d.dot(s["rewards"]), abs=1e-5)
            # missing_eos_penalty 1
            assert s["pair_score"] == pytest.approx(s["score"] - (0.0 if s["finished"] else 1.0), abs=1e-6)
        for p in pairs:
            d = parse_direction(p["prompt"][0]["content"], ("helpfulness", "conciseness"))  # the conditioning line
            assert d.as_dict() == pytest.approx(p["direction"])
            assert p["prompt"][-1]["role"] == "user" and p["prompt"][-1]["content"] in PROMPTS
            assert p["chosen_score"] == pytest.approx(d.dot(p["chosen_rewards"]), abs=1e-5)
            slot = [s for s in samples if s["slot"] == p["slot"]]
            ranked = [s["pair_score"] for s in slot]
            hi, lo = slot[int(np.argmax(ranked))], slot[int(np.argmin(ranked))]
            assert (p["chosen"], p["rejected"]) == (hi["response"], lo["response"])
            assert (p["chosen_score"], p["rejected_score"]) == pytest.approx((hi["score"], lo["score"]))
            assert p["chosen"] != p["rejected"]
        if pairs:  # TRL format: the dpo command reads the pairs back
            assert len(read_examples([out / "iterations" / f"{k:03d}" / "pairs.jsonl"])) == len(pairs)

    # Rewards were measured on the base model (adapter off): a fresh base model gives the same
    # raw FLR rewards for iteration 1's samples, which were scored after iteration 0 trained the adapter.
    samples = [json.loads(line) for line in (out / "iterations" / "001" / "samples.jsonl").read_text().splitlines()]
    convs = [[{"role": "user", "content": PROMPTS[s["prompt_index"]]}] for s in samples]
    texts = [s["response"] for s in samples]
    recorded = torch.tensor([s["rewards_raw"]["helpfulness"] for s in samples])
    base = load_model(str(tiny_model_dir))
    flr = build_scorer("flr:helpfulness", base, ("helpfulness",), calibration="none")
    torch.testing.assert_close(flr.rewards(convs, texts).raw[:, 0], recorded, rtol=1e-4, atol=1e-4)
    trained = load_model(str(tiny_model_dir), adapter=str(out / "adapter"))  # what `steer.serve --adapter` loads
    with_adapter = build_scorer("flr:helpfulness", trained, ("helpfulness",),
                                calibration="none").rewards(convs, texts).raw[:, 0]
    assert (with_adapter - recorded).abs().max() > 1e-3  # so the check above could tell the two apart

    latest = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert json.loads((latest / "state.json").read_text())["extra"]["iteration"] == 1
    assert (out / "training_curve.png").stat().st_size > 0


def test_dpa_sft_trains_on_the_best_sample(tmp_path, prompts_file, tiny_model_dir):
    out = tmp_path / "rft"
    assert main(dpa_args(prompts_file, tiny_model_dir, out, "--loss", "sft", "--min-margin", "100",
                         "--iterations", "1")) == 0
    records = read_metrics(out)
    it = [r for r in records if r["type"] == "iteration"][0]
    assert it["pairs"] == 2 and it["skipped/margin"] == 0  # rejection sampling keeps every best-of-n
    steps = [r for r in records if r["type"] == "step"]
    assert len(steps) == 2 and all(r["nll"] > 0 and r["loss"] == r["nll"] for r in steps)
    from safetensors.torch import load_file

    b = [v for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert max(float(t.abs().max()) for t in b) > 1e-3  # the adapter (B starts at zero) was trained


def test_dpa_bad_prompt_row_and_bad_scorer_name_the_location(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt column"}\n')
    assert main(dpa_args(bad, tiny_model_dir, tmp_path / "a")) == 2
    assert f"{bad}:2: prompt: is missing" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "fine"}\n')
    assert main(dpa_args(good, tiny_model_dir, tmp_path / "b") + ["--scorer", "flr:helpfulness"]) == 2
    assert "scorer:" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused runs create nothing


# -- principle-guided pool ------------------------------------------------------------------------

class LengthStub:
    """A scorer whose reward vector is computed from the text alone, so the test can redo v . r by hand:
    helpfulness = number of characters / 10, conciseness = -number of words."""

    objectives = ("helpfulness", "conciseness")

    def rewards(self, conversations, responses):
        from steer.rewards.scorer import Rewards

        assert all(c[0]["role"] == "user" for c in conversations)  # scored on the unconditioned conversation
        raw = torch.tensor([[len(t) / 10, -float(len(t.split()))] for t in responses])
        return Rewards(self.objectives, raw, raw)

    def describe(self):
        return "length-stub"


def test_choose_pair_by_hand():
    from steer.training.dpa import choose_pair

    assert choose_pair([0.1, 0.5, 0.45], ["a", "b", "c"], 0.3, sft=False) == (1, 0, None)
    assert choose_pair([0.1, 0.5, 0.45], ["a", "b", "c"], 0.41, sft=False) == (1, 0, "margin")  # 0.4 < 0.41: a near-tie
    assert choose_pair([0.1, 0.5], ["same", "same"], 0.0, sft=False) == (1, 0, "equal")
    assert choose_pair([0.1, 0.5, 0.45], ["a", "b", "c"], 9.0, sft=True) == (1, 0, None)  # sft keeps the best


@pytest.mark.parametrize("min_margin", [0.0, 3.0])
def test_principle_pool_and_pair_choice(tmp_path, prompts_file, tiny_model_dir, min_margin):
    from steer.training.distributed import DistContext
    from steer.training.dpa import collect, read_prompts
    from steer.training.policy import build_policy
    from steer.training.settings import DPAConfig

    from steer.principles import load_principles

    objectives = ("helpfulness", "conciseness")
    config = DPAConfig(output=str(tmp_path), model=str(tiny_model_dir), objectives=objectives,
                       prompts=str(prompts_file), prompts_per_iteration=3, directions_per_prompt=2, samples=1,
                       guided_samples=2, contrast_samples=1, max_new_tokens=8, temperature=1.0, min_margin=min_margin,
                       progress=False, corner_share=0.5)
    policy = build_policy(config.policy_spec())
    principles = load_principles()
    got = collect(config, 0, read_prompts(prompts_file), policy, LengthStub(), True, DistContext(),
                  principles=principles)

    assert got.stats["samples"] == 6 * 4 and len(got.samples) == 24
    by_slot = {}
    for row in got.samples:
        by_slot.setdefault(row["slot"], []).append(row)
    assert sorted(by_slot) == list(range(6))
    n_pairs = 0
    for slot, rows in by_slot.items():
        assert [r["source"] for r in rows] == ["policy", "guided", "guided", "contrast"]
        d = Direction.from_weights(rows[0]["direction"], objectives)
        chosen = principles.chosen_objectives(d)
        for r in rows:
            if r["source"] == "policy":
                assert r["instruction"] is None
                continue
            polarity = "positive" if r["source"] == "guided" else "negative"
            # Each chosen objective contributes one of its instructions of that polarity, heaviest first.
            text = r["instruction"]
            for o in chosen:
                match = [i for i in principles.objectives[o][polarity] if text.startswith(i)]
                assert match, (o, polarity, text)
                text = text[len(match[0]):].lstrip()
            assert text == ""
        # v . r by hand from the text alone.
        vr = [d["helpfulness"] * len(r["response"]) / 10 - d["conciseness"] * len(r["response"].split()) for r in rows]
        assert [r["score"] for r in rows] == pytest.approx(vr, abs=1e-5)
        # cut answers lose
        scores = [x - (0.0 if r["finished"] else config.missing_eos_penalty) for x, r in zip(vr, rows)]
        hi, lo = int(np.argmax(scores)), int(np.argmin(scores))
        pair = [p for p in got.pairs if p["slot"] == slot]
        if rows[hi]["response"] == rows[lo]["response"] or scores[hi] - scores[lo] < min_margin:
            assert pair == []  # near-ties (and identical texts) are skipped
            continue
        n_pairs += 1
        (p,) = pair
        assert (p["chosen"], p["rejected"]) == (rows[hi]["response"], rows[lo]["response"])
        assert (p["chosen_source"], p["rejected_source"]) == (rows[hi]["source"], rows[lo]["source"])
        # The training prompt carries the direction line and no instruction.
        system = p["prompt"][0]["content"]
        assert parse_direction(system, objectives) == d
        assert not any(i in system for o in objectives for pol in ("positive", "negative")
                       for i in principles.objectives[o][pol])
    assert got.stats["pairs"] == n_pairs == len(got.pairs)
    assert got.stats["skipped/margin"] + got.stats["skipped/equal"] + n_pairs == 6
    if min_margin == 0.0:
        assert n_pairs >= 4
    else:
        assert got.stats["skipped/margin"] >= 1


HAND_OBJECTIVES = ("helpfulness", "conciseness")


def hand_pool():
    """Two prompts and the merged pool of two slots of three candidates, scored by hand:
    slot 0 asks v = (1, 0), slot 1 v = (0.25, 0.75)."""
    prompts = [({"role": "user", "content": "q0"},), ({"role": "user", "content": "q1"},)]
    merged = [
        {"slot": 0, "prompt_index": 1, "weights": [1.0, 0.0],
         "cands": [("long cut", False, 64, "policy", None), ("ended", True, 20, "guided", "Be helpful."),
                   ("bad", True, 5, "contrast", "Be vague.")],
         "scaled": [[0.9, -2.0], [0.5, -1.0], [-1.0, 0.5]], "raw": [[0.0, 0.0]] * 3},
        {"slot": 1, "prompt_index": 0, "weights": [0.25, 0.75],
         "cands": [("a", True, 9, "policy", None), ("b", False, 64, "guided", "Short."),
                   ("c", True, 30, "contrast", "Long.")],
         "scaled": [[0.0, 0.0], [2.0, 2.0], [0.4, -1.2]], "raw": [[0.0, 0.0]] * 3},
    ]
    return prompts, merged


def hand_config(tmp_path, **overrides):
    """The DPAConfig that pairs ``hand_pool()``: one candidate of each kind, min_margin 0.1."""
    from steer.training.settings import DPAConfig

    fields = dict(samples=1, guided_samples=1, contrast_samples=1, min_margin=0.1) | overrides
    return DPAConfig(output=str(tmp_path), objectives=HAND_OBJECTIVES, prompts_per_iteration=2, progress=False,
                     **fields)


def test_missing_eos_penalty_and_repairing_saved_samples(tmp_path):
    """Pairing by hand: a cut answer loses to an ended one unless its v . r leads by more than the
    penalty; the pools rebuilt from samples.jsonl pair exactly like the originals (--resume)."""
    from steer.training.dpa import pair_pool, pool_from_samples

    objectives = HAND_OBJECTIVES
    prompts, merged = hand_pool()

    def run(penalty):
        return pair_pool(hand_config(tmp_path, missing_eos_penalty=penalty), 0, prompts, merged, {})

    # v . r: slot 0 = (0.9, 0.5, -1.0); slot 1 = (0, 2.0, -0.8).
    # Penalty 1 on the cut ones: (-0.1, 0.5, -1.0), (0, 1.0, -0.8).
    got = run(1.0)
    assert [(p["chosen"], p["rejected"]) for p in got.pairs] == [("ended", "bad"), ("b", "c")]
    assert [p["margin"] for p in got.pairs] == pytest.approx([1.5, 1.8])
    assert got.stats["chosen_finished"] == 0.5 and got.stats["finished"] == pytest.approx(4 / 6)
    got = run(3.0)  # now the cut answer of slot 1 is the worst: -1.0 against 0 and -0.8
    assert [(p["chosen"], p["rejected"]) for p in got.pairs] == [("ended", "long cut"), ("a", "b")]
    got = run(0.0)
    assert [(p["chosen"], p["rejected"]) for p in got.pairs] == [("long cut", "bad"), ("b", "c")]
    assert (got.pairs[0]["prompt"][-1]["content"] == "q1"
            and parse_direction(got.pairs[1]["prompt"][0]["content"], objectives).weights == (0.25, 0.75))

    again = pair_pool(hand_config(tmp_path), 0, prompts, pool_from_samples(run(1.0).samples, objectives), {})
    assert again.pairs == run(1.0).pairs and again.samples == run(1.0).samples


def test_corner_pairs_relabel_each_pool_for_every_other_corner(tmp_path):
    from steer.training.dpa import pair_pool

    objectives = HAND_OBJECTIVES
    prompts, merged = hand_pool()
    got = pair_pool(hand_config(tmp_path, corner_pairs=True), 0, prompts, merged, {})
    # By hand, penalty 1 on the cut answers. Slot 0 as conciseness=1: (-3.0, -1.0, 0.5) -> bad over long cut.
    # Slot 1 as helpfulness=1: (0, 1.0, 0.4) -> b over a; as conciseness=1: (0, 1.0, -1.2) -> b over c.
    got_pairs = [(p["slot"], p["direction"], p["chosen"], p["rejected"], p["relabeled"]) for p in got.pairs]
    assert got_pairs == [
        (0, {"helpfulness": 1.0, "conciseness": 0.0}, "ended", "bad", False),
        (0, {"helpfulness": 0.0, "conciseness": 1.0}, "bad", "long cut", True),
        (1, {"helpfulness": 0.25, "conciseness": 0.75}, "b", "c", False),
        (1, {"helpfulness": 1.0, "conciseness": 0.0}, "b", "a", True),
        (1, {"helpfulness": 0.0, "conciseness": 1.0}, "b", "c", True),
    ]
    for p in got.pairs:  # each prompt states the direction it was paired for
        assert parse_direction(p["prompt"][0]["content"], objectives).as_dict() == pytest.approx(p["direction"])
    assert got.stats["pairs/relabeled"] == 3 and len(got.samples) == 6  # samples are not duplicated


def instruction_pool():
    """``hand_pool()`` without scores and with a second guided/contrast pair in slot 1, whose two
    texts are equal: nothing to learn from it."""
    prompts, merged = hand_pool()
    merged = [{k: v for k, v in item.items() if k not in ("scaled", "raw")} for item in merged]
    merged[0]["cands"] = merged[0]["cands"][1:]  # no on-policy samples under --pair-by instruction
    merged[1]["cands"] = [("b", False, 64, "guided", "Short."), ("same", True, 4, "guided", "Terse."),
                          ("c", True, 30, "contrast", "Long."), ("same", True, 4, "contrast", "Verbose.")]
    return prompts, merged


def test_pair_by_instruction_chooses_guided_over_contrast_unscored(tmp_path):
    """RLCD's labels: in each pool guided sample i beats contrast sample i whatever a scorer would say
    (slot 0's contrast sample is the shortest, so a conciseness reward would have flipped nothing here,
    but slot 1's guided "b" was cut at the token limit and still wins); equal texts are skipped; the
    rows rebuilt from samples.jsonl pair the same (--resume)."""
    from steer.training.dpa import pair_pool, pool_from_samples

    prompts, merged = instruction_pool()
    config = hand_config(tmp_path, samples=0, guided_samples=2, contrast_samples=2, pair_by="instruction")
    got = pair_pool(config, 0, prompts, merged, {"seconds/sample": 1.0})
    assert [(p["slot"], p["chosen"], p["rejected"]) for p in got.pairs] == [(0, "ended", "bad"), (1, "b", "c")]
    assert [(p["chosen_instruction"], p["rejected_instruction"]) for p in got.pairs] == [
        ("Be helpful.", "Be vague."), ("Short.", "Long.")]
    assert [(p["chosen_finished"], p["rejected_finished"]) for p in got.pairs] == [(True, True), (False, True)]
    assert [p["direction"] for p in got.pairs] == [{"helpfulness": 1.0, "conciseness": 0.0},
                                                  {"helpfulness": 0.25, "conciseness": 0.75}]
    for p, q in zip(got.pairs, ("q1", "q0")):  # dpa: the direction line, and no instruction
        assert p["prompt"][-1]["content"] == q
        assert parse_direction(p["prompt"][0]["content"], HAND_OBJECTIVES).as_dict() == pytest.approx(p["direction"])
    assert got.stats["pairs"] == 2 and got.stats["skipped/equal"] == 1 and got.stats["samples"] == 6
    assert got.stats["tokens/guided"] == pytest.approx((20 + 64 + 4) / 3) and got.stats["seconds/sample"] == 1.0
    assert all("rewards" not in s and "score" not in s for s in got.samples)
    again = pair_pool(config, 0, prompts, pool_from_samples(got.samples, HAND_OBJECTIVES, scored=False), {})
    assert again.pairs == got.pairs and again.samples == got.samples


def test_chosen_must_end_pairs_only_ended_guided_samples(tmp_path):
    """--chosen-must-end: slot 1's first guided sample "b" was cut at the token limit, so its one ended
    guided sample ("same") pairs with contrast sample 0 ("c"), and contrast sample 1 is left without a
    chosen answer (counted, not paired); slot 0's guided sample ended and pairs as before."""
    from steer.training.dpa import pair_pool

    prompts, merged = instruction_pool()
    config = hand_config(tmp_path, samples=0, guided_samples=2, contrast_samples=2, pair_by="instruction",
                         chosen_must_end=True)
    got = pair_pool(config, 0, prompts, merged, {})
    assert [(p["slot"], p["chosen"], p["rejected"]) for p in got.pairs] == [(0, "ended", "bad"), (1, "same", "c")]
    assert all(p["chosen_finished"] for p in got.pairs)
    assert got.stats["skipped/chosen_cut"] == 1 and got.stats["skipped/equal"] == 0 and got.stats["samples"] == 6
    unfiltered = pair_pool(hand_config(tmp_path, samples=0, guided_samples=2, contrast_samples=2,
                                       pair_by="instruction"), 0, prompts, merged, {})
    assert unfiltered.stats["skipped/chosen_cut"] == 0


def test_reject_cut_policy_pairs_the_policys_cut_samples_against_ended_guided_ones(tmp_path):
    """--reject-cut-policy, by hand: slot 0's on-policy sample was cut at the token limit, so besides
    the RLCD pair it is rejected against the slot's ended guided sample; slot 1's on-policy sample is
    cut too but its only guided sample was cut, so nothing may be chosen over it (counted, not
    paired); an on-policy sample that ended is not paired. Saved samples re-pair the same (--resume)."""
    from steer.training.dpa import pair_pool, pool_from_samples

    prompts, merged = hand_pool()
    merged = [{k: v for k, v in item.items() if k not in ("scaled", "raw")} for item in merged]
    config = hand_config(tmp_path, pair_by="instruction", reject_cut_policy=True)
    got = pair_pool(config, 0, prompts, merged, {})
    assert [(p["slot"], p["chosen"], p["rejected"], p["rejected_source"]) for p in got.pairs] == [
        (0, "ended", "bad", "contrast"), (0, "ended", "long cut", "policy"), (1, "b", "c", "contrast")]
    assert got.pairs[1]["rejected_instruction"] is None and not got.pairs[1]["rejected_finished"]
    assert got.stats["pairs/policy_rejected"] == 1 and got.stats["policy_cut"] == 1
    assert got.stats["skipped/policy_no_ended_guided"] == 0

    merged[1]["cands"][0] = ("a cut", False, 64, "policy", None)
    got = pair_pool(config, 0, prompts, merged, {})
    assert [(p["slot"], p["rejected"]) for p in got.pairs] == [(0, "bad"), (0, "long cut"), (1, "c")]
    assert got.stats["policy_cut"] == 2 and got.stats["skipped/policy_no_ended_guided"] == 1
    again = pair_pool(config, 0, prompts, pool_from_samples(got.samples, HAND_OBJECTIVES, scored=False), {})
    assert again.pairs == got.pairs

    plain = pair_pool(hand_config(tmp_path, samples=0, pair_by="instruction"), 0, prompts,
                      [{**m, "cands": m["cands"][1:]} for m in merged], {})
    assert "pairs/policy_rejected" not in plain.stats and len(plain.pairs) == 2


@pytest.mark.parametrize("overrides, field, words", [
    (dict(pair_by="judge"), "pair_by", "reward, instruction"),
    (dict(chosen_must_end=True), "chosen_must_end", "--pair-by instruction"),
    (dict(pair_by="instruction", samples=0, chosen_must_end="yes"), "chosen_must_end", "true or false"),
    (dict(pair_by="instruction", contrast_samples=0), "pair_by", "contrast_samples >= 1"),
    (dict(pair_by="instruction", guided_samples=0), "pair_by", "guided_samples >= 1"),
    (dict(pair_by="instruction", samples=2), "samples", "nothing labels them"),
    (dict(reject_cut_policy=True), "reject_cut_policy", "--pair-by instruction"),
    (dict(pair_by="instruction", samples=0, reject_cut_policy=True), "reject_cut_policy", "--samples >= 1"),
    (dict(pair_by="instruction", reject_cut_policy="yes"), "reject_cut_policy", "true or false"),
    (dict(pair_by="instruction", samples=0, corner_pairs=True), "corner_pairs", "another corner"),
    (dict(pair_by="instruction", samples=0, loss="distill"), "pair_by", "distill"),
    (dict(dry_multiplier=-0.5), "dry_multiplier", ">= 0"),
    (dict(end_ramp_bias=-1.0), "end_ramp_bias", ">= 0"),
    (dict(end_ramp_start=1.5), "end_ramp_start", "<= 1"),
    (dict(end_ramp_start="half"), "end_ramp_start", "finite number"),
])
def test_pair_by_instruction_refuses_what_it_cannot_label(tmp_path, overrides, field, words):
    from steer.errors import InvalidInput

    with pytest.raises(InvalidInput) as e:
        hand_config(tmp_path, **overrides)
    assert e.value.field == field and words in str(e.value)


def test_dpa_pair_by_instruction_end_to_end_builds_no_scorer(tmp_path, prompts_file, tiny_model_dir):
    """A whole iteration with instruction labels: the scorer is never built (this one names a
    directory that does not exist, which building would refuse), and every pair is a guided sample
    over a contrast sample of its slot."""
    out = tmp_path / "dpa"
    args = dpa_args(prompts_file, tiny_model_dir, out, "--iterations", "1", "--samples", "0", "--guided-samples",
                    "1", "--contrast-samples", "1", "--pair-by", "instruction", "--scorer", str(tmp_path / "no-rm"))
    assert main(args) == 0
    it = out / "iterations" / "000"
    samples = [json.loads(line) for line in (it / "samples.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (it / "pairs.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all("rewards" not in s for s in samples)
    assert 1 <= len(pairs) <= 2
    for p in pairs:
        slot = {s["source"]: s for s in samples if s["slot"] == p["slot"]}
        assert (p["chosen"], p["rejected"]) == (slot["guided"]["response"], slot["contrast"]["response"])
    (record,) = [r for r in read_metrics(out) if r["type"] == "iteration"]
    assert record["pairs"] == len(pairs) and "score/mean" not in record
    assert (out / "adapter").is_dir()
