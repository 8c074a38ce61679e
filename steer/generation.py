"""Offline batched generation for conditioned prompts (DPA sampling, evaluation).

The server has its own continuous-batching engine; offline jobs have all their prompts up front,
so plain left-padded batches through transformers' ``generate`` are the simple, fast choice.
Prompts are conditioned with the same :func:`steer.conditioning.render_prompt` the server uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steer.conditioning import render_prompt
from steer.config import require_float, require_int
from steer.models import pad_token_id
from steer.objectives import Direction
from steer.sampling import SamplingParams


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]
    finished: bool  # ended with the end-of-turn token (else ran out of max_new_tokens)


@dataclass(frozen=True)
class EndRamp:
    """A rising bonus on the end-of-turn logit, so that sampled answers end instead of running into the cap.

    After ``start`` generated tokens the end-of-turn token's logit (before temperature) gains
    ``slope`` per further token: ``slope * (t - start)`` at generated position ``t`` (0-based count
    of tokens already generated). A rambling or looping answer then ends at the next point where
    ending was already plausible (a sentence end, as a rule), not mid-word; answers that end on their
    own before ``start`` are untouched. Offline sampling only (training data), never the server.
    """

    start: int
    slope: float

    def __post_init__(self):
        require_int("end_ramp.start", self.start, 0)
        require_float("end_ramp.slope", self.slope, minimum=0, exclusive_min=True)

    @classmethod
    def over_cap(cls, max_new_tokens: int, start_share: float, bias_at_cap: float) -> EndRamp | None:
        """The ramp that starts at ``start_share`` of ``max_new_tokens`` and reaches ``bias_at_cap`` at the
        cap; None (no ramp) when ``bias_at_cap`` is 0 or the ramp would start at the cap."""
        start = int(start_share * max_new_tokens)
        if bias_at_cap <= 0 or start >= max_new_tokens:
            return None
        return cls(start=start, slope=bias_at_cap / (max_new_tokens - start))

    def bias(self, generated: int) -> float:
        """What the end-of-turn logit gains when ``generated`` tokens have been generated."""
        return self.slope * max(0, generated - self.start)


class _EndRampProcessor:
    """:class:`EndRamp` as a transformers logits processor (rows of a left-padded batch share the count)."""

    def __init__(self, ramp: EndRamp, prompt_length: int, eos: int):
        self.ramp, self.prompt_length, self.eos = ramp, prompt_length, eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bonus = self.ramp.bias(input_ids.shape[1] - self.prompt_length)
        if bonus:
            scores = scores.clone()
            scores[:, self.eos] += bonus
        return scores


def generate_batch(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict[str, str]]],
    directions: Sequence[Direction | None],
    params: SamplingParams,
    *,
    num_samples: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
    mix_weights: Sequence[Sequence[float]] | None = None,
    end_ramp: EndRamp | None = None,
) -> list[list[Generation]]:
    """``num_samples`` responses for each (conversation, direction); result[i][j] is sample j of prompt i.

    Deterministic for a given ``seed`` (and batch size) on CPU. ``directions[i] is None`` renders
    the conversation without a direction line. Stop strings in ``params.stop`` cut the text.
    ``mix_weights[i]``: the weights of conversation i's rows for a model carrying mixture adapters
    (:mod:`steer.mixture`), each row of a batch mixed by its own. ``end_ramp``: raise the end-of-turn
    logit as answers grow (:class:`EndRamp`).
    """
    if len(conversations) != len(directions):
        raise ValueError(f"{len(conversations)} conversations but {len(directions)} directions")
    if mix_weights is not None and len(mix_weights) != len(conversations):
        raise ValueError(f"{len(conversations)} conversations but {len(mix_weights)} mix_weights")
    if num_samples < 1 or batch_size < 1:
        raise ValueError("num_samples and batch_size must be >= 1")
    prompts = [render_prompt(tokenizer, list(c), d) for c, d in zip(conversations, directions)]
    jobs = [(i, j) for i in range(len(prompts)) for j in range(num_samples)]
    results: list[list[Generation | None]] = [[None] * num_samples for _ in prompts]
    eos = tokenizer.eos_token_id
    pad = pad_token_id(tokenizer)
    batches = range(0, len(jobs), batch_size)
    breakers = None
    if params.dry_multiplier > 0:
        from steer.dry import sequence_breaker_ids

        breakers = sequence_breaker_ids(tokenizer)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", unit="batch")
    was_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    try:
        for b, start in enumerate(batches):
            chunk = jobs[start:start + batch_size]
            enc = tokenizer([prompts[i] for i, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            device = getattr(model, "device", None)  # transformers models say where they live (maybe a GPU)
            if device is not None:
                enc = {k: v.to(device) for k, v in enc.items()}
            torch.manual_seed(seed * 1_000_003 + b)
            kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=pad, eos_token_id=eos)
            if params.greedy:
                kwargs.update(do_sample=False)
            else:
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                              top_k=params.top_k or None)
            processors = []
            prompt_length = enc["input_ids"].shape[1]
            if breakers is not None:
                from steer.dry import DryLogitsProcessor

                processors.append(DryLogitsProcessor(params, prompt_length=prompt_length, breakers=breakers))
            if end_ramp is not None:
                processors.append(_EndRampProcessor(end_ramp, prompt_length, eos))
            if processors:
                from transformers import LogitsProcessorList

                kwargs.update(logits_processor=LogitsProcessorList(processors))
            mix = contextlib.nullcontext()
            if mix_weights is not None:
                from steer.mixture import mixing

                rows = torch.tensor([list(mix_weights[i]) for i, _ in chunk], dtype=torch.float32)  # (B, k)
                mix = mixing(model, rows.to(device) if device is not None else rows)
            with torch.inference_mode(), mix:
                out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1]:]  # (B, T_new)
            for (i, j), row in zip(chunk, new.tolist()):
                finished = eos in row
                ids = row[: row.index(eos)] if finished else row
                text = tokenizer.decode(ids, skip_special_tokens=True)
                for s in params.stop:
                    if s in text:
                        text, finished = text[: text.index(s)], True
                results[i][j] = Generation(text=text, token_ids=tuple(ids), finished=finished)
    finally:
        tokenizer.padding_side = was_side
    return results  # type: ignore[return-value]
