"""steer.train mixture on the tiny model: the principle-guided loop and --data, what each adapter
learns from (an adapter whose weight is 0 in every example gets no update at all), files, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file
from steer.training.metrics import read_metrics
from steer.training.mixture import read_pair_files
from steer.training.mixture_cli import main
from steer.training.settings import MixtureConfig

from steer.conditioning import PREFIX, condition_messages
from steer.errors import InvalidInput
from steer.objectives import Direction

OBJECTIVES = ("helpfulness", "conciseness")
PROMPTS = ["What is the capital of France?", "Explain photosynthesis.", "Give me a tip for sleeping well."]


def _b_norms(mixture_dir):
    return {o: max(float(t.abs().max())
                   for k, t in load_file(str(mixture_dir / o / "adapter_model.safetensors")).items() if "lora_B" in k)
            for o in OBJECTIVES}


def _pairs_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pair(prompt, direction, chosen="Paris.",
          rejected="I am not sure, maybe somewhere in Europe or elsewhere entirely."):
    d = Direction.from_weights(direction, OBJECTIVES)
    return {"prompt": condition_messages([{"role": "user", "content": prompt}], d), "chosen": chosen,
            "rejected": rejected, "direction": direction, "chosen_finished": True, "rejected_finished": True}


def _args(model_dir, out, *extra):
    return ["--model", str(model_dir), "--output", str(out), "--objectives", *OBJECTIVES, "--batch-size", "2",
            "--lr", "5e-2", "--no-progress", "--lora-r", "4", "--lora-alpha", "8", *extra]


def test_data_trains_only_the_adapters_its_directions_weigh(tmp_path, tiny_model_dir):
    data = _pairs_file(tmp_path / "pairs.jsonl", [_pair(PROMPTS[0], {"helpfulness": 1.0, "conciseness": 0.0}),
                                                  _pair(PROMPTS[1], {"helpfulness": 1.0, "conciseness": 0.0})])
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, out, "--data", str(data), "--loss", "sft", "--epochs-per-iteration", "3")) == 0
    norms = _b_norms(out / "mixture")
    assert norms["helpfulness"] > 1e-3 and norms["conciseness"] == 0.0  # weight 0 everywhere: no gradient, no update
    spec = json.loads((out / "mixture" / "mixture.json").read_text())
    assert (spec["objectives"] == list(OBJECTIVES) and spec["r"] == 4
            and spec["base_model_name_or_path"] == str(tiny_model_dir.resolve()))
    steps = [r for r in read_metrics(out) if r["type"] == "step"]
    assert len(steps) == 3 and all(r["loss"] > 0 for r in steps)

    # The trained mix raises the chosen answer's likelihood on the plain prompt (no direction line).
    from transformers import AutoModelForCausalLM

    from steer.mixture import load_mixture, mixing
    from steer.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    load_mixture(model, out / "mixture")
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                     add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + tok("Paris.", add_special_tokens=False)["input_ids"]])

    def logp(weights):
        with torch.no_grad(), mixing(model, weights):
            lp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
        return float(lp[len(p_ids) - 1:].sum())

    assert logp(torch.tensor([[1.0, 0.0]])) > logp(None) + 1.0
    assert logp(torch.tensor([[0.0, 1.0]])) == pytest.approx(logp(None), abs=1e-5)  # the untouched adapter is a no-op


def test_principle_guided_loop_writes_plain_prompts_and_a_mixture(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "loop"
    args = _args(tiny_model_dir, out, "--prompts", str(prompts), "--scorer", "flr:helpfulness+length",
                 "--scorer-calibration", "none", "--prompts-per-iteration", "2", "--guided-samples", "1",
                 "--contrast-samples", "1", "--max-new-tokens", "6", "--min-margin", "0", "--iterations", "1",
                 "--corner-share", "1")
    assert main(args) == 0
    pairs = [json.loads(line) for line in (out / "iterations" / "000" / "pairs.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (out / "iterations" / "000" / "samples.jsonl").read_text().splitlines()]
    assert {s["source"] for s in samples} == {"guided", "contrast"}  # no on-policy samples of a mixture
    assert pairs and all(PREFIX not in m["content"] for p in pairs for m in p["prompt"])  # no direction line
    norms = _b_norms(out / "mixture")
    weighed = {o for p in pairs for o in OBJECTIVES if p["direction"][o] > 0}
    for o in OBJECTIVES:  # exactly the adapters some pair weighed were trained
        assert (norms[o] > 0) == (o in weighed), (o, norms, weighed)


def test_read_pair_files_names_file_line_and_field(tmp_path):
    good = _pair(PROMPTS[0], {"helpfulness": 0.3, "conciseness": 0.7})
    rows = read_pair_files([_pairs_file(tmp_path / "ok.jsonl", [good])], OBJECTIVES)
    assert rows[0]["prompt"] == [{"role": "user", "content": PROMPTS[0]}]  # the dpa line (and default system) removed
    assert rows[0]["direction"] == {"helpfulness": 0.3, "conciseness": 0.7} and rows[0]["where"].endswith("ok.jsonl:1")
    cases = [
        ({k: v for k, v in good.items() if k != "direction"}, "missing 'direction'"),
        ({**good, "direction": {"helpfulness": 1.0}}, "direction must name exactly"),
        ({**good, "direction": {"helpfulness": 0.5, "conciseness": 0.1}}, "must sum to 1"),
        ({**good, "direction": {"helpfulness": 1.5, "conciseness": -0.5}},
         r"direction.helpfulness must be a number in \[0, 1\]"),
        ({**good, "chosen": ""}, "chosen is empty"),
    ]
    for row, message in cases:
        path = _pairs_file(tmp_path / "bad.jsonl", [good, row])
        with pytest.raises(InvalidInput, match=message) as e:
            read_pair_files([path], OBJECTIVES)
        assert e.value.field == "data" and "bad.jsonl:2" in str(e.value)


@pytest.mark.parametrize("change, field", [({"loss": "kto"}, "loss"), ({"full": True}, "full"),
                                           ({"pair_by": "instruction", "samples": 1}, "samples")])
def test_mixture_config_refusals_name_the_field(change, field):
    with pytest.raises(InvalidInput) as e:
        MixtureConfig(output="o", **change)
    assert e.value.field == field


def test_on_policy_samples_of_a_mixture_answer_the_plain_prompt_through_each_rows_mix(tmp_path, tiny_model_dir):
    """--samples with a mixture: each (prompt, direction) is answered by the base plus the adapters weighted
    by that direction, on the prompt without a direction line -- the same text generate_batch gives with
    those mix weights, and not the text of the bare base model (the adapters here are random, so a mix
    changes what is sampled)."""
    from steer.training.distributed import DistContext
    from steer.training.dpa_data import prompt_schedule, sample_pools
    from steer.training.mixture import build_mixture_policy

    from steer.generation import generate_batch
    from steer.sampling import SamplingParams

    config = MixtureConfig(output=str(tmp_path), model=str(tiny_model_dir), objectives=OBJECTIVES, samples=2,
                           guided_samples=0, contrast_samples=0, prompts_per_iteration=3, directions_per_prompt=2,
                           max_new_tokens=6, temperature=1.0, progress=False, lora_r=4, lora_alpha=8)
    policy = build_mixture_policy(config.policy_spec(), OBJECTIVES)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if name.endswith(".lora_B"):
                param.normal_(0.0, 0.5)
    prompts = [({"role": "user", "content": p},) for p in PROMPTS]
    got = sample_pools(config, 0, prompts, policy, DistContext())
    assert [len(c) for c in got.pool] == [2] * 6 and {c.source for p in got.pool for c in p} == {"policy"}
    convs = [prompts[got.slots[s]] for s in got.mine]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=config.top_p)
    seed = config.seed * 7919
    mixed = generate_batch(policy.model, policy.tokenizer, convs, [None] * len(convs), params, num_samples=2,
                           batch_size=config.generation_batch_size, seed=seed,
                           mix_weights=[got.directions[s].weights for s in got.mine])
    assert [[c.text for c in p] for p in got.pool] == [[g.text for g in row] for row in mixed]
    bare = generate_batch(policy.model, policy.tokenizer, convs, [None] * len(convs), params, num_samples=2,
                          batch_size=config.generation_batch_size, seed=seed)
    assert [[g.text for g in row] for row in bare] != [[g.text for g in row] for row in mixed]
    assert sorted(set(got.slots)) == sorted(prompt_schedule(len(prompts), 3, 0, config.seed))


def test_reject_cut_policy_loop_pairs_saved_samples_and_trains(tmp_path, tiny_model_dir):
    """The mixture loop with --samples 1 --pair-by instruction --reject-cut-policy, on pools saved before
    (--resume pairs a samples.jsonl instead of sampling; the tiny model never ends an answer, so the pools
    are written by hand): each cut on-policy sample is rejected against its slot's ended guided answer, a
    slot whose guided answer was cut too gives no such pair, an ended on-policy sample none; every slot keeps
    its RLCD pair, and the mixture trains on all of them."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "loop"
    it = out / "iterations" / "000"
    it.mkdir(parents=True)
    policy_ended, guided_ended = [False, False, False, False, True, True], [True, True, True, False, True, True]
    rows = []
    for slot in range(6):
        direction = {"helpfulness": 1.0, "conciseness": 0.0} if slot % 2 else {"helpfulness": 0.5, "conciseness": 0.5}
        for j, (source, text, ended, instruction) in enumerate([
                ("policy", f"loop {slot} loop {slot} loop", policy_ended[slot], None),
                ("guided", f"answer {slot}.", guided_ended[slot], "Be helpful."),
                ("contrast", f"vague {slot}", True, "Be vague.")]):
            rows.append({"iteration": 0, "slot": slot, "prompt_index": slot % 3, "direction": direction, "sample": j,
                         "source": source, "instruction": instruction, "response": text, "finished": ended,
                         "tokens": 8})
    _pairs_file(it / "samples.jsonl", rows)
    args = _args(tiny_model_dir, out, "--prompts", str(prompts), "--prompts-per-iteration", "3",
                 "--directions-per-prompt", "2", "--samples", "1", "--guided-samples", "1", "--contrast-samples", "1",
                 "--pair-by", "instruction", "--reject-cut-policy", "--iterations", "1", "--resume")
    assert main(args) == 0
    pairs = [json.loads(line) for line in (it / "pairs.jsonl").read_text().splitlines()]
    expected = []
    for slot in range(6):
        expected.append((slot, f"answer {slot}.", f"vague {slot}", "contrast"))
        if slot < 3:  # cut on-policy sample, ended guided answer
            expected.append((slot, f"answer {slot}.", f"loop {slot} loop {slot} loop", "policy"))
    assert [(p["slot"], p["chosen"], p["rejected"], p["rejected_source"]) for p in pairs] == expected
    assert all(PREFIX not in m["content"] for p in pairs for m in p["prompt"])  # plain prompts
    (record,) = [r for r in read_metrics(out) if r["type"] == "iteration"]
    assert (record["pairs"], record["pairs/policy_rejected"], record["policy_cut"],
            record["skipped/policy_no_ended_guided"]) == (9, 3, 4, 1)
    steps = [r for r in read_metrics(out) if r["type"] == "step"]
    assert len(steps) == 5 and all(r["loss"] > 0 for r in steps)  # 9 pairs in batches of 2
    assert max(_b_norms(out / "mixture").values()) > 0
