"""STRATEGY_MIXTURE over gRPC on the tiny model: answers equal the hand-merged model for the
request's weights, CONDITIONED shares the batch through the same stack, rows do not disturb each
other, and a server without a mixture says how to get one."""

import asyncio

import grpc
import pytest
import torch
from safetensors.torch import load_file

from steer.errors import InvalidInput
from steer.v1 import steer_pb2 as pb
from steer.v1 import steer_pb2_grpc

OBJECTIVES = ("helpfulness", "creativity", "conciseness")
PROMPT = [{"role": "user", "content": "Name a fruit."}]
NEW = 6


@pytest.fixture(scope="module")
def dirs(random_mixture, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture-serving")
    mixture = random_mixture(root / "mix", seed=1)
    other = random_mixture(root / "other", seed=2)
    return mixture, other / "helpfulness"  # a PEFT adapter to serve as the CONDITIONED one


@pytest.fixture(scope="module")
def server(dirs, tiny_model_dir, start_tiny_server):
    from steer.server.app import ServerConfig
    from steer.server.engine import EngineConfig

    from steer.models import load_model

    mixture, conditioned = dirs
    # prepacked: what `python -m steer.serve` loads on the CPU (the unpacked path: tests/steer/test_linears.py)
    loaded = load_model(str(tiny_model_dir), adapter=str(conditioned), mixture=str(mixture), linears="prepacked")
    return start_tiny_server(ServerConfig(port=0, engine=EngineConfig(max_new_tokens=64)), loaded=loaded)


def _merged(tiny_model_dir, adapters):
    """The base model with W += (alpha/r) * w * B A for every (adapter dir, w), from the files."""
    import json

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    modules = dict(model.named_modules())
    for path, w in adapters:
        if not w:
            continue
        cfg = json.loads((path / "adapter_config.json").read_text())
        tensors = load_file(str(path / "adapter_model.safetensors"))
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                name = key[len("base_model.model."):-len(".lora_A.weight")]
                with torch.no_grad():
                    modules[name].weight += w * cfg["lora_alpha"] / cfg["r"] * (
                        tensors[key.replace("lora_A", "lora_B")] @ a)
    return model


def _greedy(model, tokenizer, messages):
    from steer.generation import generate_batch
    from steer.sampling import SamplingParams

    (g,), = generate_batch(model, tokenizer, [messages], [None], SamplingParams(max_new_tokens=NEW, temperature=0.0))
    return g.text


def _request(weights, strategy=pb.STRATEGY_MIXTURE):
    return pb.GenerateRequest(messages=[pb.Message(**m) for m in PROMPT], weights=weights, strategy=strategy,
                              sampling=pb.SamplingParams(max_new_tokens=NEW, temperature=0.0))


def test_describe_offers_mixture_and_names_the_adapters(server, dirs):
    with grpc.insecure_channel(server.target) as channel:
        info = steer_pb2_grpc.SteerStub(channel).Describe(pb.DescribeRequest(), timeout=30)
    assert pb.STRATEGY_MIXTURE in info.strategies and pb.STRATEGY_CONDITIONED in info.strategies
    assert (str(dirs[0]) in info.adapter and str(dirs[1]) in info.adapter
            and "helpfulness, creativity, conciseness" in info.adapter)


@pytest.mark.parametrize("weights", [{"creativity": 1.0}, {"helpfulness": 0.5, "conciseness": 0.5},
                                     {"helpfulness": 0.2, "creativity": 0.3, "conciseness": 0.5}])
def test_mixture_answer_equals_the_hand_merged_model(server, dirs, tiny_model_dir, tokenizer, weights):
    mixture, _ = dirs
    with grpc.insecure_channel(server.target) as channel:
        reply = steer_pb2_grpc.SteerStub(channel).Generate(_request(weights), timeout=60)
    total = sum(weights.values())
    merged = _merged(tiny_model_dir, [(mixture / o, weights.get(o, 0.0) / total) for o in OBJECTIVES])
    assert reply.text == _greedy(merged, tokenizer, PROMPT)  # the plain prompt: no direction line


def test_conditioned_rows_use_the_unmerged_adapter(server, dirs, tiny_model_dir, tokenizer):
    from steer.conditioning import condition_messages
    from steer.objectives import Direction

    weights = {"helpfulness": 0.7, "creativity": 0.3}
    with grpc.insecure_channel(server.target) as channel:
        reply = steer_pb2_grpc.SteerStub(channel).Generate(_request(weights, pb.STRATEGY_CONDITIONED), timeout=60)
    expected = _greedy(_merged(tiny_model_dir, [(dirs[1], 1.0)]), tokenizer,
                       condition_messages(PROMPT, Direction.from_weights(weights)))
    assert reply.text == expected


def test_rows_of_one_batch_do_not_disturb_each_other(server):
    requests = [_request({"helpfulness": 1.0}), _request({"conciseness": 1.0}),
                _request({"creativity": 0.6, "conciseness": 0.4}),
                _request({"helpfulness": 1.0}, pb.STRATEGY_CONDITIONED)]

    async def together():
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = steer_pb2_grpc.SteerStub(channel)
            return await asyncio.gather(*(stub.Generate(r, timeout=60) for r in requests))

    with grpc.insecure_channel(server.target) as channel:
        stub = steer_pb2_grpc.SteerStub(channel)
        alone = [stub.Generate(r, timeout=60).text for r in requests]
    assert [r.text for r in asyncio.run(together())] == alone
    assert len(set(alone)) > 1  # different mixes answer differently, so the comparison means something


def test_server_without_a_mixture_says_how_to_load_one(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(_request({"helpfulness": 1.0}), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "--mixture DIR" in e.value.details() and "steer.train mixture" in e.value.details()


def test_bad_mixture_values_are_named(tiny_model_dir, tmp_path):
    from steer.models import load_model

    with pytest.raises(InvalidInput) as e:
        load_model(str(tiny_model_dir), mixture=str(tmp_path))
    assert e.value.field == "mixture" and "mixture.json" in e.value.reason
    with pytest.raises(InvalidInput) as e:
        load_model(str(tiny_model_dir), mixture="default")  # the shipped mixture fits the default model only
    assert e.value.field == "mixture"
