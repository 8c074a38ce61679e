"""The engine's own Llama forward against transformers' forward (the reference): the same logits at
every prefill chunk and decode step, for mixed batches, chunked prompts, mixture rows, and on the
default model (slow)."""

import asyncio

import pytest
import torch
from steer.server.engine import Engine, EngineConfig, Finished
from steer.server.llama_forward import LlamaForward, supports

from steer.sampling import SamplingParams


class Both(Engine):
    """Runs every forward twice on the same inputs and cache: the engine's own forward, then
    transformers' (whose logits, and cache writes, the run goes on with). Each pair is one check,
    whatever the batch looked like."""

    def __init__(self, *args, **kwargs):
        self.pairs = []
        super().__init__(*args, **kwargs)

    def _forward(self, input_ids, position_ids, mask, seqs):
        ours = super()._forward(input_ids, position_ids, mask, seqs)
        lean, self._lean = self._lean, None
        try:
            ref = super()._forward(input_ids, position_ids, mask, seqs)
        finally:
            self._lean = lean
        self.pairs.append((input_ids.shape, ours, ref))
        return ref


def compare(loaded, jobs, atol, **config):
    """``jobs``: (prompt ids, SamplingParams, mix row or None), started together, later ones joining a
    batch that is already decoding. Returns the shapes of the forwards checked."""

    async def main():
        engine = Both(loaded, EngineConfig(**config))
        try:
            async def one(ids, params, mix, delay):
                await asyncio.sleep(delay)
                events = [e async for e in engine.generate(ids, params, mix=mix)]
                assert isinstance(events[-1], Finished)

            await asyncio.gather(*(one(ids, p, mix, 0.003 * i) for i, (ids, p, mix) in enumerate(jobs)))
        finally:
            engine.close()
        return engine

    engine = asyncio.run(main())
    assert engine._lean is not None
    for _, ours, ref in engine.pairs:
        torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
    return [shape for shape, _, _ in engine.pairs]


def test_supports_plain_llama_only(tiny_loaded):
    assert supports(tiny_loaded.model)

    class Wrapped:  # e.g. a test double or a PeftModel around the model
        def __init__(self, model):
            self.model, self.config = model, model.config

    assert not supports(Wrapped(tiny_loaded.model))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LlamaForward(Wrapped(tiny_loaded.model))


def test_same_logits_as_transformers_for_a_mixed_batch(tiny_loaded):
    """Prompts of different lengths (one chunked over three forwards), greedy and sampled, joining a
    running batch: every prefill and decode row equals transformers' forward on the same cache."""
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    jobs = [
        ([(5 * j) % 300 + 3 for j in range(70)], greedy, None),  # 70 tokens > the 32-token budget: chunked
        ([1, 2, 3, 4, 5, 6, 7], greedy, None),
        ([9, 8], SamplingParams(max_new_tokens=12, temperature=0.9, seed=1), None),
        ([4, 4, 4, 4], SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.8, seed=2), None),
    ]
    shapes = compare(tiny_loaded, jobs, atol=1e-5, max_prefill_tokens=32)
    assert any(width > 1 and rows > 1 for rows, width in shapes)  # a batched prefill
    assert any(width == 1 and rows > 1 for rows, width in shapes)  # a batched decode step
    assert sum(width > 1 for _, width in shapes) >= 3  # the long prompt's chunks (70 tokens, 32 per forward at most)


def test_same_logits_as_transformers_with_mixture_rows(tiny_model_dir, random_mixture, tmp_path):
    from steer.models import load_model

    loaded = load_model(str(tiny_model_dir), mixture=str(random_mixture(tmp_path / "mix", seed=5)), linears="prepacked")
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    jobs = [
        ([1, 2, 3, 4, 5, 6, 7], greedy, [1.0, 0.0, 0.0]),
        ([9, 8, 7], greedy, None),  # a CONDITIONED row in the same batch
        ([4, 4, 4, 4], greedy, [0.2, 0.5, 0.3]),
    ]
    compare(loaded, jobs, atol=1e-4)


@pytest.mark.slow
def test_same_logits_as_transformers_on_the_default_model():
    from steer.chat_tokens import ChatTokenizer
    from steer.models import load_model

    loaded = load_model("default", linears="auto")
    chat = ChatTokenizer(loaded.tokenizer)
    jobs = [(chat([{"role": "user", "content": text}]), SamplingParams(max_new_tokens=16, temperature=0.0), None)
            for text in ("Explain DNS in two sentences.", "Write a haiku about rain.", "What is 2+2?")]
    compare(loaded, jobs, atol=2e-3)
