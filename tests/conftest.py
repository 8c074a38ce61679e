"""Shared fixtures: the default tokenizer, a tiny random Llama that shares it, and a real gRPC
server running that tiny model on an ephemeral port (in a background event loop, so tests can use
plain synchronous stubs exactly like a client would)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

import steer  # noqa: F401  first, before anything imports transformers: see steer/__init__.py

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_CONTEXT = 512


def _build_tiny_model(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, context_length: int = 512,
                     seed: int = 0):
    """A small random Llama sharing ``tokenizer``'s vocabulary: the fast stand-in for the default model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_length,
        tie_word_embeddings=True,
        # HF's default init (0.02) makes a random model repeat one token whatever the prompt, which
        # would make tests about prompts, seeds and stop strings vacuous; 0.3 gives varied text.
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def build_tiny_model():
    """``build_tiny_model(tokenizer, *, hidden_size=64, num_layers=2, context_length=512, seed=0)``."""
    return _build_tiny_model


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny-model ops are too small to gain from intra-op threads, and on a
    busy machine the thread pool's synchronisation costs several times the work (measured: 14 s vs 89 s for
    the same run on 2 loaded cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer (the first run converts the GGUF once into the cache)."""
    from steer.models import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny random Llama (hidden 64, 2 layers, context 512) with the default tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = _build_tiny_model(tokenizer, hidden_size=64, num_layers=2, context_length=TINY_CONTEXT, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from steer.models import load_model

    return load_model(str(tiny_model_dir))


LOOP_TOKENS = " the cat sat on a mat"


@pytest.fixture(scope="session")
def looping_loaded(tiny_loaded):
    """The tiny model with an output layer that can only say the few tokens of LOOP_TOKENS (every other
    row zero, these scaled up): greedy decoding soon repeats itself, as a small model in a loop does."""
    import copy
    import dataclasses

    import torch

    model = copy.deepcopy(tiny_loaded.model)
    keep = tiny_loaded.tokenizer.encode(LOOP_TOKENS, add_special_tokens=False)
    with torch.no_grad():
        head = model.get_output_embeddings()
        weight = torch.zeros_like(head.weight)
        weight[keep] = head.weight[keep] * 5
        head.weight = torch.nn.Parameter(weight)  # its own tensor (the tiny model may tie it to the embeddings)
    return dataclasses.replace(tiny_loaded, model=model)


@pytest.fixture(scope="session")
def random_mixture(tiny_model_dir):
    """``make(out, seed)``: a mixture of three random rank-4 adapters (helpfulness, creativity,
    conciseness) on the tiny model, saved at ``out``; every adapter changes the output."""

    def make(out, seed):
        import torch
        from transformers import AutoModelForCausalLM

        from steer.mixture import MixtureSpec, attach_mixture, mixture_layers, save_mixture

        objectives = ("helpfulness", "creativity", "conciseness")
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        attach_mixture(model, objectives, 4, 8.0)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in mixture_layers(model):
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        return save_mixture(model, out, MixtureSpec(objectives, 4, 8.0, (), "tiny", "random test mixture"))

    return make


class ServerThread:
    """A steer gRPC server on its own event loop thread."""

    def __init__(self, loaded, config, scorer=None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        from steer.server.app import start_server

        self.running = self.call(start_server(loaded, config, scorer=scorer))
        self.target = f"127.0.0.1:{self.running.port}"

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.call(self.running.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def start_tiny_server(tiny_loaded):
    """Factory: start a server (tiny model unless ``loaded`` is given; ``scorer`` overrides the config's)
    with a ServerConfig; stopped at session end."""
    started = []

    def start(config=None, loaded=None, scorer=None):
        from steer.server.app import ServerConfig

        server = ServerThread(loaded or tiny_loaded, config or ServerConfig(port=0), scorer)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def tiny_server(start_tiny_server):
    """A server over the tiny model with default limits but short default generations."""
    from steer.server.app import ServerConfig
    from steer.server.engine import EngineConfig

    from steer.sampling import SamplingParams

    return start_tiny_server(
        ServerConfig(port=0, engine=EngineConfig(max_new_tokens=64),
                     sampling_defaults=SamplingParams(max_new_tokens=16))
    )


@pytest.fixture()
def stub(tiny_server):
    import grpc

    from steer.v1 import steer_pb2_grpc

    with grpc.insecure_channel(tiny_server.target) as channel:
        yield steer_pb2_grpc.SteerStub(channel)


class SlowModel:
    """A model whose every forward takes at least ``delay`` seconds more (makes timing tests deterministic)."""

    def __init__(self, model, delay: float):
        self._model, self._delay = model, delay

    def __call__(self, *args, **kwargs):
        import time

        time.sleep(self._delay)
        return self._model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.fixture(scope="session")
def slow_tiny_loaded(tiny_loaded):
    """Factory: the tiny model with ``delay`` seconds added to every forward."""
    import dataclasses

    return lambda delay: dataclasses.replace(tiny_loaded, model=SlowModel(tiny_loaded.model, delay),
                                             model_id=f"slow-tiny-{delay}")


def _followup_loglik(model, tokenizer, conversation, response, followup) -> float:
    import torch

    messages = list(conversation) + [{"role": "assistant", "content": response}, {"role": "user", "content": followup}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(text[: text.rfind(followup)], add_special_tokens=False)["input_ids"])
    target = tokenizer(followup, add_special_tokens=False)["input_ids"]
    # The whole-text tokenisation splits exactly at the follow-up: the definition FLR relies on.
    assert ids[start: start + len(target)] == target
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (T, V), the model's own LM head
    logp = torch.log_softmax(logits, dim=-1)
    return float(torch.stack([logp[t - 1, ids[t]] for t in range(start, start + len(target))]).mean())


@pytest.fixture(scope="session")
def followup_loglik():
    """``loglik(model, tokenizer, conversation, response, followup)``: the mean log p of the follow-up's
    tokens, computed independently of steer.rewards: the whole rendered dialogue in one forward, full
    logits, plain log_softmax and gather."""
    return _followup_loglik
