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


@pytest.mark.parametrize("change, field", [({"samples": 2}, "samples"), ({"loss": "kto"}, "loss"),
                                           ({"full": True}, "full")])
def test_mixture_config_refusals_name_the_field(change, field):
    with pytest.raises(InvalidInput) as e:
        MixtureConfig(output="o", **change)
    assert e.value.field == field
