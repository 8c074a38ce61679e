"""python -m steer.train export: bf16 weights, base named by id, metadata, atomic, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from steer.training.export_cli import export_adapter, main

from steer.errors import InvalidInput


@pytest.fixture()
def adapter(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    peft_model = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)  # a path, as a local run writes
    out = tmp_path / "run" / "adapter"
    peft_model.save_pretrained(str(out))
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"type": "summary", "step": 3}))
    return out


def test_export_casts_names_the_base_and_describes(adapter, tmp_path, tiny_model_dir):
    out = export_adapter(adapter, tmp_path / "shipped", base_name="org/tiny-model", description="a tiny adapter")
    original = load_file(str(adapter / "adapter_model.safetensors"))
    exported = load_file(str(out / "adapter_model.safetensors"))
    assert set(exported) == set(original)
    for k, v in exported.items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(v, original[k].to(torch.bfloat16))  # a cast, nothing else
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-model" and config["r"] == 4
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["description"] == "a tiny adapter" and meta["dtype"] == "bfloat16" and meta["training"]["step"] == 3
    assert meta["parameters"] == sum(v.numel() for v in original.values())

    from steer.adapters import describe_adapter
    from steer.models import load_model

    assert describe_adapter(out) == "a tiny adapter"
    loaded = load_model(str(tiny_model_dir), adapter=str(out))  # the exported adapter loads and runs
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.isfinite(loaded.model(input_ids=ids).logits).all()


def test_export_refuses_a_path_as_base_and_bad_input(adapter, tmp_path):
    with pytest.raises(InvalidInput, match="^base_name: .*local path"):
        export_adapter(adapter, tmp_path / "o1")  # the adapter names its base by an absolute path
    with pytest.raises(InvalidInput, match="^adapter: .*has no adapter_config.json"):
        export_adapter(tmp_path, tmp_path / "o2", base_name="org/m")
    with pytest.raises(InvalidInput, match="^dtype:"):
        export_adapter(adapter, tmp_path / "o3", base_name="org/m", dtype="int8")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="^output: .*not empty"):
        export_adapter(adapter, busy, base_name="org/m")
    assert (busy / "keep.txt").read_text() == "mine" and not (tmp_path / "o1").exists()  # nothing written


def test_cli_reports_errors_and_writes(adapter, tmp_path, capsys):
    assert main(["--adapter", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "error: adapter:" in capsys.readouterr().err
    assert main(["--adapter", str(adapter), "--output", str(tmp_path / "o"), "--base-name", "org/m"]) == 0
    assert "bfloat16" in capsys.readouterr().out
    assert main(["--adapter", str(adapter), "--output", str(tmp_path / "o"), "--base-name", "org/m", "--force"]) == 0


def test_saved_configs_name_the_default_base_by_id(tmp_path):
    from steer.training.policy import base_model_name

    from steer.models import DEFAULT_MODEL_NAME

    assert base_model_name("default", tmp_path / "cache" / "smollm2") == DEFAULT_MODEL_NAME
    assert base_model_name(str(tmp_path / "mine"), tmp_path / "mine") == str(tmp_path / "mine")


def test_export_of_a_mixture_casts_every_adapter_and_still_loads(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file
    from steer.training.export_cli import export_adapter
    from transformers import AutoModelForCausalLM

    from steer.mixture import MixtureSpec, attach_mixture, load_mixture, mixing, mixture_layers, save_mixture

    objectives = ("helpfulness", "conciseness")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    attach_mixture(model, objectives, 4, 8.0)
    with torch.no_grad():
        for _, layer in mixture_layers(model):
            layer.lora_B.normal_()
    src = save_mixture(model, tmp_path / "run" / "mixture", MixtureSpec(objectives, 4, 8.0, (), str(tiny_model_dir)))
    out = export_adapter(src, tmp_path / "shipped", base_name="acme/tiny", description="test mixture")
    spec = json.loads((out / "mixture.json").read_text())
    assert spec["base_model_name_or_path"] == "acme/tiny" and spec["description"] == "test mixture"
    for o in objectives:
        assert json.loads((out / o / "adapter_config.json").read_text())["base_model_name_or_path"] == "acme/tiny"
        assert {t.dtype for t in load_file(str(out / o / "adapter_model.safetensors")).values()} == {torch.bfloat16}
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    load_mixture(fresh, out)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad(), mixing(fresh, torch.tensor([[0.5, 0.5]])):
        exported = fresh(ids).logits
    with torch.no_grad(), mixing(model.eval(), torch.tensor([[0.5, 0.5]])):
        original = model(ids).logits
    torch.testing.assert_close(exported, original, atol=5e-2, rtol=0)  # bf16 rounding of the adapters only
