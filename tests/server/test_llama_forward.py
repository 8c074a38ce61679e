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
    batch that is already decoding; q/k/v and gate/up must have run as fused GEMMs. Returns the shapes
    of the forwards checked."""

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
    assert all(g is not None for pair in engine._lean._fused for g in pair)
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


@pytest.mark.parametrize("linears", ["torch", "prepacked"])
def test_same_logits_as_transformers_for_a_mixed_batch(tiny_model_dir, linears):
    """Prompts of different lengths (one chunked over three forwards), greedy and sampled, joining a
    running batch: every prefill and decode row equals transformers' forward on the same cache, with
    the fused projections of plain torch linears and of prepacked (oneDNN) ones."""
    from steer.models import load_model

    loaded = load_model(str(tiny_model_dir), linears=linears)
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    jobs = [
        ([(5 * j) % 300 + 3 for j in range(70)], greedy, None),  # 70 tokens > the 32-token budget: chunked
        ([1, 2, 3, 4, 5, 6, 7], greedy, None),
        ([9, 8], SamplingParams(max_new_tokens=12, temperature=0.9, seed=1), None),
        ([4, 4, 4, 4], SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.8, seed=2), None),
    ]
    shapes = compare(loaded, jobs, atol=1e-5, max_prefill_tokens=32)
    assert any(width > 1 and rows > 1 for rows, width in shapes)  # a batched prefill
    assert any(width == 1 and rows > 1 for rows, width in shapes)  # a batched decode step
    assert sum(width > 1 for _, width in shapes) >= 3  # the long prompt's chunks (70 tokens, 32 per forward at most)


@pytest.mark.parametrize("linears", ["torch", "prepacked"])
def test_same_logits_as_transformers_with_mixture_rows(tiny_model_dir, random_mixture, tmp_path, linears):
    """MIXTURE rows beside a CONDITIONED row: with plain linears the mixture layers' bases and A stacks
    run as one fused GEMM, over prepacked (oneDNN) bases as a fused packed GEMM beside a fused GEMM of
    the A stacks; both equal transformers'."""
    from steer.models import load_model

    loaded = load_model(str(tiny_model_dir), mixture=str(random_mixture(tmp_path / "mix", seed=5)), linears=linears)
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

    loaded = load_model("default", linears="auto")  # fp32: prepacked, fused
    chat = ChatTokenizer(loaded.tokenizer)
    jobs = [(chat([{"role": "user", "content": text}]), SamplingParams(max_new_tokens=16, temperature=0.0), None)
            for text in ("Explain DNS in two sentences.", "Write a haiku about rain.", "What is 2+2?")]
    compare(loaded, jobs, atol=2e-3)


def prefill_logits(forward: LlamaForward, model, ids: list[int]) -> torch.Tensor:
    """The engine's forward over one whole prompt in a fresh paged cache: the last position's logits (V,)."""
    from steer.server.kv_cache import PagedKVCache

    cache = PagedKVCache.for_model(model.config, 1, torch.float32, 64)
    slot = cache.open()
    cache.reserve(slot, len(ids))
    positions = torch.arange(len(ids))[None, :]  # (1, T)
    cache.prepare([slot], positions, len(ids))
    allowed = (torch.arange(len(ids))[None, :] <= torch.arange(len(ids))[:, None])[None, None]  # (1, 1, T, T)
    with torch.inference_mode():
        return forward(torch.tensor([ids]), positions, allowed, cache)[0]


def test_fused_projections_share_the_weights_and_follow_a_replaced_one(tiny_model_dir):
    """q/k/v and gate/up become views of one buffer (no copy; the model's values unchanged); a weight whose
    storage is replaced afterwards is noticed and its group rebuilt, so the forward never runs stale weights."""
    from steer.models import load_model

    model = load_model(str(tiny_model_dir)).model
    ids = [5, 9, 2, 7, 7, 1]
    with torch.inference_mode():
        reference = model(torch.tensor([ids])).logits[0, -1]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    forward = LlamaForward(model)
    qkv, gate_up = forward._fused[0]
    attn = model.model.layers[0].self_attn
    assert qkv.modules == [attn.q_proj, attn.k_proj, attn.v_proj]
    assert attn.k_proj.weight.untyped_storage().data_ptr() == qkv.buffer.untyped_storage().data_ptr()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    torch.testing.assert_close(prefill_logits(forward, model, ids), reference, atol=1e-5, rtol=0)

    with torch.no_grad():
        attn.k_proj.weight.data = attn.k_proj.weight.detach().clone() * 1.5  # replaced, not written in place
    assert not qkv.current()
    with torch.inference_mode():
        changed = model(torch.tensor([ids])).logits[0, -1]
    assert not torch.allclose(changed, reference, atol=1e-4)
    torch.testing.assert_close(prefill_logits(forward, model, ids), changed, atol=1e-5, rtol=0)
    assert forward._fused[0][0] is not qkv and forward._fused[0][0].current()


def test_projections_of_different_dtypes_or_kinds_are_not_fused():
    """One buffer holds one dtype: layers whose weights differ (or that are not plain linears) stay
    module by module, and their weights are left as they were."""
    from steer.server.llama_forward import FusedProjections

    a, b = torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(8, 6, bias=False, dtype=torch.bfloat16)
    before = b.weight.data_ptr()
    assert FusedProjections.build([a, b]) is None and b.weight.data_ptr() == before
    assert FusedProjections.build([a, torch.nn.Linear(8, 4, bias=True)]) is None  # a bias: not plain
    fused = FusedProjections.build([a, torch.nn.Linear(8, 6, bias=False)])
    assert fused is not None and fused.outs == [4, 6]
    x = torch.randn(2, 3, 8)
    ya, yb = fused(x, None)
    torch.testing.assert_close(ya, x @ a.weight.t())
    assert yb.shape == (2, 3, 6)
