"""Serving with a steering adapter: what `--adapter` resolves to, what Describe reports, and that
rewards are judged with the base weights, not the adapted ones (tiny model, fixture adapters)."""

import json

import grpc
import pytest
import torch

from steer.v1 import steer_pb2 as pb
from steer.v1 import steer_pb2_grpc

CONVERSATION = [{"role": "user", "content": "What is the capital of France?"}]
RESPONSES = ["Paris is the capital of France.", "I like trains and the colour blue, and also soup."]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tokenizer, build_tiny_model):
    """A LoRA on the tiny model with non-zero B (it changes the output), naming its base by hub id."""
    from peft import LoraConfig, get_peft_model

    from steer.models import DEFAULT_MODEL_NAME

    path = tmp_path_factory.mktemp("adapters") / "default"
    get_peft_model(build_tiny_model(tokenizer, seed=0),
                   LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = DEFAULT_MODEL_NAME
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "metadata.json").write_text(json.dumps({"description": "DPA LoRA r4 for the tiny test model"}))
    return path


@pytest.fixture()
def shipped(monkeypatch, adapter_dir, tiny_model_dir):
    """The fixture adapter in place of the package's steer/adapters/default, and the tiny model in
    place of the default model (the shipped adapter only fits the default model)."""
    import steer.adapters
    import steer.models

    monkeypatch.setattr(steer.adapters, "SHIPPED_ROOT", adapter_dir.parent)
    real = steer.models.resolve_model_dir
    monkeypatch.setattr(steer.models, "resolve_model_dir",
                        lambda spec, field="model": real(str(tiny_model_dir) if spec == "default" else spec, field))
    return adapter_dir


@pytest.fixture(scope="module")
def adapted(tiny_model_dir, adapter_dir):
    from steer.models import load_model

    return load_model(str(tiny_model_dir), adapter=str(adapter_dir))


def describe(server) -> pb.DescribeResponse:
    with grpc.insecure_channel(server.target) as channel:
        return steer_pb2_grpc.SteerStub(channel).Describe(pb.DescribeRequest(), timeout=10)


# -- python -m steer.serve: how --adapter is resolved ---------------------------------------------

@pytest.fixture()
def serve_main(monkeypatch):
    """``steer.serve.main`` with the server replaced by a recorder of the model it was given."""
    import steer.server.app

    from steer.serve import main

    served = []

    async def record(loaded, config):
        served.append(loaded)

    monkeypatch.setattr(steer.server.app, "serve", record)

    def run(*argv):
        served.clear()
        code = main(list(argv))
        return code, (served[0] if served else None)

    return run


def test_serve_default_model_loads_the_shipped_adapter_unless_none(serve_main, shipped):
    code, loaded = serve_main()  # as `make serve` runs it (--model default)
    assert code == 0
    assert loaded.adapter == f"default ({shipped}: DPA LoRA r4 for the tiny test model)"
    code, loaded = serve_main("--adapter", "none")
    assert code == 0 and loaded.adapter is None


def test_serve_other_model_without_adapter_flag_is_bare_and_says_so(serve_main, shipped, tiny_model_dir, caplog):
    with caplog.at_level("INFO", logger="steer.models"):
        code, loaded = serve_main("--model", str(tiny_model_dir))
    assert code == 0 and loaded.adapter is None
    assert f"--model {tiny_model_dir} is not the default model: serving it without an adapter" in caplog.text


def test_serve_explicit_default_adapter_with_other_model_is_an_error(serve_main, shipped, tiny_model_dir, capsys):
    code, loaded = serve_main("--model", str(tiny_model_dir), "--adapter", "default")
    assert code == 2 and loaded is None
    err = capsys.readouterr().err
    assert "steer.serve: error: adapter: --adapter default is the adapter shipped for the default model" in err
    assert "--adapter none" in err


def test_serve_missing_shipped_adapter_is_an_error_naming_the_path(serve_main, monkeypatch, tmp_path, capsys):
    import steer.adapters

    monkeypatch.setattr(steer.adapters, "SHIPPED_ROOT", tmp_path / "adapters")
    code, loaded = serve_main()
    assert code == 2 and loaded is None  # not the bare model in its place
    assert f"{tmp_path / 'adapters' / 'default'} has no adapter_config.json" in capsys.readouterr().err


def test_serve_adapter_directory(serve_main, tiny_model_dir, adapter_dir):
    code, loaded = serve_main("--model", str(tiny_model_dir), "--adapter", str(adapter_dir))
    assert code == 0 and loaded.adapter == str(adapter_dir)


# -- Describe.adapter ------------------------------------------------------------------------------

def test_describe_reports_no_adapter_as_empty(start_tiny_server, tiny_model_dir):
    from steer.server.app import ServerConfig

    from steer.models import load_model

    server = start_tiny_server(ServerConfig(port=0), loaded=load_model(str(tiny_model_dir), adapter="none"))
    assert describe(server).adapter == ""


def test_describe_names_the_adapter(start_tiny_server, adapted, adapter_dir):
    from steer.server.app import ServerConfig

    d = describe(start_tiny_server(ServerConfig(port=0), loaded=adapted))
    assert d.adapter == str(adapter_dir)


def test_describe_names_the_shipped_adapter(start_tiny_server, shipped):
    from steer.server.app import ServerConfig

    from steer.models import load_model

    d = describe(start_tiny_server(ServerConfig(port=0), loaded=load_model("default", adapter="default")))
    assert d.adapter == f"default ({shipped}: DPA LoRA r4 for the tiny test model)"


# -- the scorer judges with the base weights -------------------------------------------------------

@pytest.fixture(scope="module")
def small_calibration(tmp_path_factory):
    """FLR calibrates itself on first use of a model: on six pairs, into a test cache, to stay fast."""
    import steer.rewards.flr as flr
    from steer.rewards.calibration_set import calibration_conversations

    conversations, responses = calibration_conversations()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEER_CACHE", str(tmp_path_factory.mktemp("steer-cache")))
        mp.setattr(flr, "calibration_conversations", lambda: (conversations[:6], responses[:6]))
        yield


def flr_part(scorer):
    from steer.rewards.flr import FLRScorer

    parts = [p for p in getattr(scorer, "parts", [scorer]) if isinstance(p, FLRScorer)]
    assert len(parts) == 1
    return parts[0]


def test_scorer_of_an_adapted_server_uses_the_base_weights(adapted, tiny_loaded, small_calibration):
    from steer.server.app import ServerConfig, build_server_scorer

    judge = flr_part(build_server_scorer(adapted, ServerConfig(scorer="default"))).model
    assert judge is not adapted.model
    base, merged = tiny_loaded.model.state_dict(), adapted.model.state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[q], merged[q])  # the adapter really moved the served weights
    judged = judge.state_dict()
    assert judged.keys() == base.keys()
    for name, value in base.items():
        assert torch.equal(judged[name], value), name


def test_scorer_model_still_overrides_the_base(adapted, tiny_model_dir, small_calibration):
    from steer.server.app import ServerConfig, build_server_scorer

    other = str(tiny_model_dir)
    scorer = build_server_scorer(adapted, ServerConfig(scorer="flr", scorer_model=other))
    assert f"model={other}" in scorer.describe()


def test_score_on_an_adapted_server_equals_the_base_models_score(start_tiny_server, adapted, tiny_loaded,
                                                                 small_calibration):
    from steer.server.app import ServerConfig

    from steer.rewards.build import build_scorer

    server = start_tiny_server(ServerConfig(port=0, scorer="default"), loaded=adapted)
    with grpc.insecure_channel(server.target) as channel:
        reply = steer_pb2_grpc.SteerStub(channel).Score(
            pb.ScoreRequest(prompt=CONVERSATION[0]["content"], responses=RESPONSES), timeout=60)
    raw = [dict(v.raw_rewards) for v in reply.scores]
    on_base = build_scorer("default", tiny_loaded, calibration="none").rewards([CONVERSATION] * 2, RESPONSES)
    on_adapted = build_scorer("default", adapted, calibration="none").rewards([CONVERSATION] * 2, RESPONSES)
    for i in range(2):
        assert raw[i] == pytest.approx(on_base.row(i, scaled=False), abs=1e-4)
    assert any(raw[i]["helpfulness"] != pytest.approx(on_adapted.row(i, scaled=False)["helpfulness"], abs=1e-3)
               for i in range(2))


def test_scorer_of_a_bf16_server_judges_with_float32_weights(tiny_model_dir, tiny_loaded, small_calibration):
    """Rewards do not depend on the serving precision: a bfloat16 model without an adapter is still judged
    by a float32 copy of its base, equal to the float32 model's weights."""
    from steer.server.app import ServerConfig, build_server_scorer

    from steer.models import load_model

    served = load_model(str(tiny_model_dir), dtype="bfloat16")
    judge = flr_part(build_server_scorer(served, ServerConfig(scorer="default"))).model
    assert judge is not served.model and judge.dtype == torch.float32
    judged = judge.state_dict()
    for name, value in tiny_loaded.model.state_dict().items():
        assert torch.equal(judged[name], value), name
    fp32 = flr_part(build_server_scorer(tiny_loaded, ServerConfig(scorer="default"))).model
    assert fp32 is tiny_loaded.model  # float32 and no adapter: the served model judges itself


def test_scorer_dtype_sets_the_judges_precision(tiny_model_dir, tiny_loaded, small_calibration):
    """scorer_dtype bfloat16: a float32 server is judged by a bfloat16 copy of its base (the same weights,
    rounded); a bfloat16 server without an adapter judges itself; anything else names the field."""
    from steer.server.app import ServerConfig, build_server_scorer

    from steer.errors import InvalidInput
    from steer.models import load_model

    judge = flr_part(build_server_scorer(tiny_loaded, ServerConfig(scorer="default", scorer_dtype="bfloat16"))).model
    assert judge is not tiny_loaded.model and judge.dtype == torch.bfloat16
    judged = judge.state_dict()
    for name, value in tiny_loaded.model.state_dict().items():
        assert torch.equal(judged[name], value.to(torch.bfloat16)), name
    served = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert flr_part(build_server_scorer(served, ServerConfig(scorer="default", scorer_dtype="bfloat16"))).model \
        is served.model
    with pytest.raises(InvalidInput, match="scorer_dtype"):
        build_server_scorer(tiny_loaded, ServerConfig(scorer="default", scorer_dtype="int4"))
