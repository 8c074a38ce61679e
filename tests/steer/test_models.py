import json

import pytest
import torch

from steer.errors import InvalidInput
from steer.models import cache_root, load_model, resolve_model_dir


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


@pytest.mark.parametrize("spec, reason", [("/no/such/model", "not found"),
                                          ("relative/nowhere", "nothing is downloaded")])
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


def test_adapter_is_loaded_and_merged(tiny_model_dir, tokenizer, tmp_path, build_tiny_model):
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


# -- adapters: 'none', 'default' (shipped as package data), a directory -------------------------

def save_tiny_adapter(build_tiny_model, tokenizer, path, base_model_name_or_path=None):
    """A LoRA adapter (non-zero B, so it changes the output) on the tiny model, saved in bf16 like
    the shipped one; returns the PEFT model (fp32) that produced it."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build_tiny_model(tokenizer, seed=0),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    for p in lora:
        p.data = p.data.to(torch.bfloat16)
    peft_model.save_pretrained(path)
    for p in lora:
        p.data = p.data.to(torch.float32)  # exactly the saved values; the base stays fp32
    if base_model_name_or_path is not None:
        config = json.loads((path / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_model_name_or_path
        (path / "adapter_config.json").write_text(json.dumps(config))
    return peft_model


@pytest.fixture()
def shipped(monkeypatch, tmp_path, tokenizer, tiny_model_dir, build_tiny_model):
    """A fixture adapter in place of the package's ``steer/adapters/default``, and the tiny model
    in place of the default model (the shipped adapter only fits the default model)."""
    import steer.adapters
    import steer.models
    from steer.models import DEFAULT_MODEL_NAME

    peft_model = save_tiny_adapter(build_tiny_model, tokenizer, tmp_path / "adapters" / "default",
                                   base_model_name_or_path=DEFAULT_MODEL_NAME)
    monkeypatch.setattr(steer.adapters, "SHIPPED_ROOT", tmp_path / "adapters")
    real = steer.models.resolve_model_dir
    monkeypatch.setattr(steer.models, "resolve_model_dir",
                        lambda spec, field="model": real(str(tiny_model_dir) if spec == "default" else spec, field))
    return peft_model


def test_none_is_the_bare_model(tiny_model_dir):
    from steer.models import resolve_adapter

    assert resolve_adapter(None) is None and resolve_adapter("none") is None
    assert load_model(str(tiny_model_dir), adapter="none").adapter is None


def test_unset_adapter_is_the_shipped_one_for_the_default_model_only(caplog):
    from steer.models import default_adapter_for

    assert default_adapter_for("default") == "default"
    with caplog.at_level("INFO", logger="steer.models"):
        assert default_adapter_for("./my-model") == "none"
    assert "./my-model is not the default model: serving it without an adapter" in caplog.text


def test_explicit_default_adapter_with_another_model_is_refused(tiny_model_dir):
    with pytest.raises(InvalidInput) as e:
        load_model(str(tiny_model_dir), adapter="default")
    assert e.value.field == "adapter"
    assert ("--adapter default" in e.value.reason and f"--model {tiny_model_dir}" in e.value.reason
            and "--adapter none" in e.value.reason)


def test_missing_shipped_adapter_fails_naming_the_path(monkeypatch, tmp_path):
    import steer.adapters

    monkeypatch.setattr(steer.adapters, "SHIPPED_ROOT", tmp_path / "adapters")
    with pytest.raises(FileNotFoundError) as e:
        load_model("default", adapter="default")  # fails before any model is loaded
    assert str(tmp_path / "adapters" / "default") in str(e.value)
    assert "adapter_config.json" in str(e.value) and "--adapter none" in str(e.value)


def test_shipped_adapter_is_loaded_and_merged_without_its_base_on_disk(shipped):
    # adapter_config.json names the base by hub id, which is not a path here and is never downloaded.
    loaded = load_model("default", adapter="default")
    assert loaded.adapter.startswith("default (") and "LORA r4 for SmolLM2-135M-Instruct" in loaded.adapter
    assert loaded.base_spec == "default"
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        expected = shipped(input_ids=ids).logits
        got = loaded.model(input_ids=ids).logits
        bare = load_model("default", adapter="none").model(input_ids=ids).logits
    assert not hasattr(loaded.model, "peft_config")  # merged: a plain transformers model
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # the bf16 adapter, up-cast to fp32 on load
    assert not torch.allclose(got, bare, atol=1e-3)


def test_shipped_adapter_description_comes_from_its_metadata(shipped):
    import steer.adapters

    meta = {"description": "DPA LoRA r4 for the tiny test model"}
    (steer.adapters.SHIPPED_ROOT / "default" / "metadata.json").write_text(json.dumps(meta))
    path = steer.adapters.SHIPPED_ROOT / "default"
    assert load_model("default", adapter="default").adapter == f"default ({path}: DPA LoRA r4 for the tiny test model)"


def test_shipped_adapter_must_name_its_base_by_id(shipped, tmp_path):
    import steer.adapters

    config_file = steer.adapters.SHIPPED_ROOT / "default" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "cache" / "SmolLM2")
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapter_config.json: base_model_name_or_path is .*SmolLM2', "
                                         r"expected the model id 'HuggingFaceTB/SmolLM2-135M-Instruct'"):
        load_model("default", adapter="default")


def test_adapter_that_does_not_fit_the_model_is_refused(tiny_model_dir, tokenizer, tmp_path, build_tiny_model):
    from peft import LoraConfig, get_peft_model

    wider = get_peft_model(build_tiny_model(tokenizer, hidden_size=32, seed=0),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    wider.save_pretrained(tmp_path / "adapter")
    with pytest.raises(InvalidInput, match=r"adapter: .* does not fit this model"):
        load_model(str(tiny_model_dir), adapter=str(tmp_path / "adapter"))


@pytest.mark.slow
def test_shipped_adapter_present():
    """The real package data: present, naming its base by id, and loading onto the default model."""
    from steer.adapters import display_path, read_adapter_config, shipped_adapter_path
    from steer.models import DEFAULT_MODEL_NAME

    path = shipped_adapter_path()
    assert display_path(path) == "steer/adapters/default"
    assert read_adapter_config(path)["base_model_name_or_path"] == DEFAULT_MODEL_NAME
    loaded = load_model("default", adapter="default", merge_adapter=False)
    assert loaded.adapter.startswith("default (steer/adapters/default: ")
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        adapted = loaded.model(input_ids=ids).logits
        with loaded.model.disable_adapter():
            bare = loaded.model(input_ids=ids).logits
    assert torch.isfinite(adapted).all()
    assert not torch.allclose(adapted, bare, atol=1e-4)  # a trained adapter, not an identity


def _fake_hub_cache(root, repo_id, model_dir):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    import shutil

    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_hub_id_is_read_from_the_local_cache_only(tiny_model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _fake_hub_cache(tmp_path / "hub", "acme/tiny-llama", tiny_model_dir)
    assert resolve_model_dir("acme/tiny-llama").resolve() == snapshot.resolve()
    loaded = load_model("acme/tiny-llama")
    assert loaded.model_id == "acme/tiny-llama" and loaded.model.config.hidden_size == 64
    with pytest.raises(InvalidInput) as e:  # not cached: a clear error, no download attempt
        resolve_model_dir("acme/not-cached")
    assert e.value.field == "model" and "not in the local Hugging Face cache" in e.value.reason
    assert "huggingface-cli download acme/not-cached" in e.value.reason


def test_default_models_hub_id_means_the_default_model(tokenizer):
    from steer.training.policy import base_model_name

    from steer.models import DEFAULT_MODEL_NAME, default_adapter_for

    assert resolve_model_dir(DEFAULT_MODEL_NAME) == resolve_model_dir("default")
    assert default_adapter_for(DEFAULT_MODEL_NAME) == "default"
    # What a trained adapter names as its base: the id for the default model and for a Hub id.
    assert base_model_name(DEFAULT_MODEL_NAME, resolve_model_dir("default")) == DEFAULT_MODEL_NAME
    assert base_model_name("acme/tiny-llama", tokenizer.name_or_path) == "acme/tiny-llama"


def test_pad_token_id_is_one_rule_pad_then_eos_then_config():
    from types import SimpleNamespace as NS

    from steer.models import pad_token_id

    assert pad_token_id(NS(pad_token_id=5, eos_token_id=2)) == 5
    assert pad_token_id(NS(pad_token_id=None, eos_token_id=2)) == 2
    # a bare model: its config; HF configs may hold a list of end-of-sequence ids
    assert pad_token_id(None, NS(pad_token_id=None, eos_token_id=[7, 8])) == 7
    assert pad_token_id(NS(pad_token_id=None, eos_token_id=None), NS(pad_token_id=3, eos_token_id=1)) == 3
    with pytest.raises(ValueError, match="neither pad_token_id nor eos_token_id"):
        pad_token_id(NS(pad_token_id=None, eos_token_id=None), NS(pad_token_id=None, eos_token_id=[]))


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_is_bfloat16_only_where_the_device_multiplies_it_natively(monkeypatch, tiny_model_dir,
                                                                             native, expected):
    import steer.models
    from steer.models import resolve_dtype

    monkeypatch.setattr(steer.models, "bf16_native", lambda device: native)
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    for given in ("float32", "bfloat16", "float16"):  # an explicit dtype is kept wherever it runs
        assert resolve_dtype(given, torch.device("cpu")) == given
    loaded = load_model(str(tiny_model_dir), dtype="auto")
    assert loaded.model.dtype == getattr(torch, expected)


def test_bf16_native_reads_the_cpu_from_onednn(monkeypatch):
    from steer.models import bf16_native

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert bf16_native(torch.device("cpu")) is True
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    assert bf16_native(torch.device("cpu")) is False


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "float64", ""])
def test_unknown_dtype_is_refused_naming_the_field(tiny_model_dir, dtype):
    with pytest.raises(InvalidInput, match=r"dtype.*auto or one of float32, bfloat16, float16"):
        load_model(str(tiny_model_dir), dtype=dtype)
