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
from steer.models import pad_token_id
from steer.objectives import Direction
from steer.sampling import SamplingParams


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]
    finished: bool  # ended with the end-of-turn token (else ran out of max_new_tokens)


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
) -> list[list[Generation]]:
    """``num_samples`` responses for each (conversation, direction); result[i][j] is sample j of prompt i.

    Deterministic for a given ``seed`` (and batch size) on CPU. ``directions[i] is None`` renders
    the conversation without a direction line. Stop strings in ``params.stop`` cut the text.
    ``mix_weights[i]``: the weights of conversation i's rows for a model carrying mixture adapters
    (:mod:`steer.mixture`), each row of a batch mixed by its own.
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
            if breakers is not None:
                from transformers import LogitsProcessorList

                from steer.dry import DryLogitsProcessor

                dry = DryLogitsProcessor(params, prompt_length=enc["input_ids"].shape[1], breakers=breakers)
                kwargs.update(logits_processor=LogitsProcessorList([dry]))
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
