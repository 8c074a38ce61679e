"""Mixture adapters: a row of direction v in a mixed batch equals the model with the adapters merged
with weights v (computed by hand from the saved files); a corner equals PEFT loading that one
adapter; rows do not affect each other; files round-trip and bad files are named."""

import json

import pytest
import torch
from safetensors.torch import load_file

from steer.errors import InvalidInput
from steer.mixture import (
    MixtureSpec,
    attach_mixture,
    load_mixture,
    mixing,
    mixture_layers,
    read_mixture_spec,
    save_mixture,
)

OBJECTIVES = ("helpfulness", "creativity", "conciseness")
RANK, ALPHA = 4, 8.0


def _fresh(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def mixture_dir(tiny_model_dir, tmp_path_factory):
    """Three random adapters (B non-zero, so each one changes the output), saved as a mixture."""
    model = _fresh(tiny_model_dir)
    attach_mixture(model, OBJECTIVES, RANK, ALPHA, "all-linear")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in mixture_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    out = tmp_path_factory.mktemp("mix") / "mixture"
    spec = MixtureSpec(OBJECTIVES, RANK, ALPHA,
                       ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), "tiny")
    return save_mixture(model, out, spec)


def _merged(tiny_model_dir, mixture_dir, v):
    """The base model with W += (alpha/r) * sum_i v_i B_i A_i, from the adapter files."""
    model = _fresh(tiny_model_dir)
    files = [load_file(str(mixture_dir / o / "adapter_model.safetensors")) for o in OBJECTIVES]
    modules = dict(model.named_modules())
    for key in files[0]:
        if not key.endswith("lora_A.weight"):
            continue
        name = key[len("base_model.model."):-len(".lora_A.weight")]
        delta = sum(w * (f[key.replace("lora_A", "lora_B")] @ f[key]) for w, f in zip(v, files))
        with torch.no_grad():
            modules[name].weight += (ALPHA / RANK) * delta
    return model


def _ids(tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_rows_of_a_mixed_batch_equal_merged_models(tiny_model_dir, mixture_dir, tokenizer):
    model = _fresh(tiny_model_dir)
    spec, state = load_mixture(model, mixture_dir)
    assert spec.objectives == OBJECTIVES and state.names == OBJECTIVES
    directions = [(1.0, 0.0, 0.0), (0.2, 0.5, 0.3), (0.0, 0.0, 1.0)]
    texts = ["Explain DNS in one line.", "Write a haiku", "What is 2+2?"]
    ids = [tokenizer(t, return_tensors="pt")["input_ids"] for t in texts]
    width = max(i.shape[1] for i in ids)
    batch = torch.stack([torch.nn.functional.pad(i[0], (0, width - i.shape[1]), value=0) for i in ids])  # right padding
    with torch.no_grad(), mixing(model, torch.tensor(directions)):
        mixed = model(batch).logits  # (3, T, V)
    for row, (v, single) in enumerate(zip(directions, ids)):
        with torch.no_grad():
            expected = _merged(tiny_model_dir, mixture_dir, v)(single).logits[0]
        n = single.shape[1]
        torch.testing.assert_close(mixed[row, :n], expected, atol=1e-4, rtol=0)


def test_corner_equals_that_adapter_loaded_by_peft(tiny_model_dir, mixture_dir, tokenizer):
    from peft import PeftModel

    ids, _ = _ids(tokenizer, ["Tell me about the moon."])
    model = _fresh(tiny_model_dir)
    load_mixture(model, mixture_dir)
    peft_model = PeftModel.from_pretrained(_fresh(tiny_model_dir), str(mixture_dir / "creativity")).eval()
    with torch.no_grad(), mixing(model, torch.tensor([[0.0, 1.0, 0.0]])):
        ours = model(ids).logits
    with torch.no_grad():
        theirs = peft_model(ids).logits
        base = _fresh(tiny_model_dir)(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (theirs - base).abs().max() > 1e-2  # the adapter does change the output
    with torch.no_grad(), mixing(model, None):  # adapters off: the base model
        torch.testing.assert_close(model(ids).logits, base, atol=1e-5, rtol=0)


def test_rows_do_not_affect_each_other(tiny_model_dir, mixture_dir, tokenizer):
    model = _fresh(tiny_model_dir)
    load_mixture(model, mixture_dir)
    ids = tokenizer(["Same prompt here"] * 2, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with mixing(model, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])):
            a = model(ids).logits
        with mixing(model, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])):
            b = model(ids).logits
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    assert (a[1] - b[1]).abs().max() > 1e-2


def test_each_adapter_is_a_standard_peft_adapter(mixture_dir):
    spec = read_mixture_spec(mixture_dir)
    assert spec.rank == RANK and spec.alpha == ALPHA and spec.base_model == "tiny"
    for o in OBJECTIVES:
        config = json.loads((mixture_dir / o / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == RANK and config["lora_alpha"] == ALPHA
        assert config["base_model_name_or_path"] == "tiny"


def test_bad_mixture_directories_are_named(tmp_path, mixture_dir):
    import shutil

    with pytest.raises(InvalidInput, match="has no mixture.json"):
        read_mixture_spec(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(mixture_dir, bad)
    (bad / "mixture.json").write_text('{"format": "steer.mixture/v1",\n "objectives": [}')
    with pytest.raises(InvalidInput, match=r"mixture.json:2:\d+: not valid JSON"):
        read_mixture_spec(bad)
    data = json.loads((mixture_dir / "mixture.json").read_text())
    (bad / "mixture.json").write_text(json.dumps({**data, "r": "four"}))
    with pytest.raises(InvalidInput, match="r is missing or not a int"):
        read_mixture_spec(bad)
    (bad / "mixture.json").write_text(json.dumps(data))
    (bad / "creativity" / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidInput, match="objective 'creativity' is missing"):
        read_mixture_spec(bad)


def test_mixing_checks_the_number_of_adapters(tiny_model_dir, mixture_dir):
    model = _fresh(tiny_model_dir)
    load_mixture(model, mixture_dir)
    with pytest.raises(ValueError, match="3 adapters"):
        with mixing(model, torch.ones(1, 2)):
            pass


def test_mixed_forward_and_backward_under_bf16_autocast(tiny_model_dir, mixture_dir, tokenizer):
    """Training's bf16 autocast (precision auto on a CPU/GPU with native bf16) hands the layers bf16
    activations while the trained adapters stay fp32: the mixed forward runs, its rounding error against
    the fp32 mixed forward is no larger than that of the merged model (same function) under the same
    autocast, and every adapter layer gets a gradient."""
    model = _fresh(tiny_model_dir)
    load_mixture(model, mixture_dir)
    v = [0.7, 0.3, 0.0]
    merged = _merged(tiny_model_dir, mixture_dir, v)
    ids = tokenizer(["A prompt of a few words", "And a second one"], return_tensors="pt", padding=True)["input_ids"]
    rows = torch.tensor([v, v])

    def logits(net, bf16, weights=None):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), mixing(model, weights):
            return net(ids).logits.float()

    with torch.no_grad():
        exact = logits(merged, False)
        torch.testing.assert_close(logits(model, False, rows), exact, atol=1e-4, rtol=0)  # same function in fp32
        merged_error = (logits(merged, True) - exact).abs().mean()
        mixed_error = (logits(model, True, rows) - exact).abs().mean()
    assert 0 < mixed_error <= 1.25 * merged_error, (float(mixed_error), float(merged_error))
    for p in model.parameters():
        p.requires_grad_(False)
    layers = [layer for _, layer in mixture_layers(model)]
    for layer in layers:
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    logits(model, True, torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])).logsumexp(-1).sum().backward()
    assert layers[0].lora_A.dtype == torch.float32
    for layer in layers:
        assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
