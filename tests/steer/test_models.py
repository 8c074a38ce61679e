import json

import pytest
import torch

from steer.errors import InvalidInput
from steer.models import build_tiny_model, cache_root, load_model, resolve_model_dir


def test_default_model_is_converted_into_a_standard_directory(tokenizer):
    path = resolve_model_dir("default")  # converted by the `tokenizer` fixture already
    assert path.is_relative_to(cache_root())
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["vocab_size"] == len(tokenizer) == 49152
    assert (path / "model.safetensors").is_file()


def test_cache_moves_with_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("STEER_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"


@pytest.mark.parametrize("spec, reason", [("/no/such/model", "not found"), ("relative/nowhere", "nothing is downloaded")])
def test_missing_model_is_a_clear_error(spec, reason):
    with pytest.raises(InvalidInput) as e:
        resolve_model_dir(spec)
    assert e.value.field == "model" and reason in e.value.reason


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(InvalidInput, match="no config.json"):
        resolve_model_dir(str(tmp_path))


def test_tiny_model_loads_from_directory(tiny_loaded, tokenizer):
    assert tiny_loaded.context_length == 512
    assert tiny_loaded.model.config.hidden_size == 64
    assert tiny_loaded.eos_token_ids == {tokenizer.eos_token_id}


def test_adapter_is_loaded_and_merged(tiny_model_dir, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model(tokenizer, seed=0)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    merged = load_model(str(tiny_model_dir), adapter=str(tmp_path / "adapter"))
    unmerged = load_model(str(tiny_model_dir), adapter=str(tmp_path / "adapter"), merge_adapter=False)
    with torch.no_grad():
        torch.testing.assert_close(merged.model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(unmerged.model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        base_only = load_model(str(tiny_model_dir)).model(input_ids=ids).logits
    assert not torch.allclose(base_only, expected, atol=1e-3)  # the adapter really changes the output


def test_bad_adapter_path(tiny_model_dir, tmp_path):
    with pytest.raises(InvalidInput, match="adapter: .* not a PEFT adapter"):
        load_model(str(tiny_model_dir), adapter=str(tmp_path))
