"""DRY ("Don't Repeat Yourself"): a penalty on the tokens that would extend a repetition.

A small model at a usual temperature falls into loops ("A blank, a blank, a blank, ..."): once a
phrase has repeated, repeating it again is the likeliest continuation, and nothing in temperature
or top-p breaks the cycle. DRY (p-e-w, 2024; the ``dry_*`` options of llama.cpp and
text-generation-webui) looks at the tokens generated so far: if the last ``L`` of them also occur
earlier, followed there by token ``t``, then ``t`` would extend a repetition of length ``L + 1``,
and when ``L >= allowed_length`` its logit drops by ``multiplier * base ** (L - allowed_length)``.
Short repeats (a name, "of the") cost nothing; a loop costs more with every token it repeats.
Unlike a repetition or frequency penalty, words used often but not in a repeating run keep their
probability, and the end-of-turn token is never penalised (it ends the answer, so it is never
among the generated tokens before it).

Sequence breakers (newline, colon, quote, asterisk: llama.cpp's defaults) end a match, so lists
and markdown that repeat their punctuation line after line are not penalised for that. A token is
a breaker when its text contains one of them.

Only the generated tokens are looked at, not the prompt: an answer may quote its prompt. The
penalty is applied to the raw logits, before temperature and top-p (llama.cpp's order), by the
engine (:func:`apply_dry`, from :func:`steer.sampling.sample_tokens`'s caller) and by offline
generation (:class:`DryLogitsProcessor` in transformers' ``generate``), with the same values.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

DEFAULT_SEQUENCE_BREAKERS = ("\n", ":", '"', "*")
# Matches are followed back at most this far: the penalty at this length, 0.8 * 1.75 ** 62 ~ 1e15,
# already rules the token out, and longer searches would only cost time inside a loop.
MAX_MATCH = 64

_breaker_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sequence_breaker_ids(tokenizer, breakers: Sequence[str] = DEFAULT_SEQUENCE_BREAKERS) -> frozenset[int]:
    """Ids of the tokens whose text contains a breaker (cached per tokenizer; decoding the vocabulary
    once takes well under a second for a 49k vocabulary)."""
    key = tuple(breakers)
    per_tokenizer = _breaker_cache.setdefault(tokenizer, {}) if _weakrefable(tokenizer) else {}
    if key not in per_tokenizer:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        per_tokenizer[key] = frozenset(i for i, text in enumerate(texts) if any(b in text for b in key))
    return per_tokenizer[key]


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def has_repeated_run(token_ids: Sequence[int], length: int = 16) -> bool:
    """Whether some run of ``length`` consecutive tokens occurs twice in ``token_ids`` (overlaps
    allowed): the mark of a loop. Ordinary prose almost never repeats 16 tokens word for word; a
    loop repeats its period over and over. (The evaluation reports the share of answers with one.)"""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    seen = set()
    for i in range(len(token_ids) - length + 1):
        run = tuple(token_ids[i:i + length])
        if run in seen:
            return True
        seen.add(run)
    return False


def dry_match_lengths(history: Sequence[int], breakers: frozenset[int] | set[int] = frozenset(),
                      max_match: int = MAX_MATCH) -> dict[int, int]:
    """For every token ``t`` that would extend a repetition of the end of ``history``: the length
    ``L`` of the longest suffix of ``history`` that also ends at an earlier position ``p`` with
    ``history[p + 1] == t`` (``L`` counted without crossing a breaker, at most ``max_match``)."""
    n = len(history)
    if n < 2:
        return {}
    last = history[-1]
    if last in breakers:
        return {}
    out: dict[int, int] = {}
    for p in [i for i, tok in enumerate(history[:-1]) if tok == last]:
        length = 1
        while length < max_match and length <= p:
            a = history[p - length]
            if a != history[n - 1 - length] or a in breakers:
                break
            length += 1
        nxt = history[p + 1]
        if length > out.get(nxt, 0):
            out[nxt] = length
    return out


def dry_penalties(history: Sequence[int], multiplier: float, base: float, allowed_length: int,
                  breakers: frozenset[int] | set[int] = frozenset()) -> dict[int, float]:
    """Token -> amount to subtract from its logit (only tokens with a penalty > 0)."""
    if multiplier <= 0:
        return {}
    return {t: multiplier * base ** (length - allowed_length)
            for t, length in dry_match_lengths(history, breakers).items() if length >= allowed_length}


def apply_dry(logits: torch.Tensor, histories: Sequence[Sequence[int]], params: Sequence,
              breakers: frozenset[int] | set[int]) -> torch.Tensor:
    """``logits`` (rows, vocab) with each row's DRY penalty (``params[i].dry_multiplier`` etc.,
    from ``histories[i]``, the tokens generated so far) subtracted, in float32: in place when
    ``logits`` is float32 (the engine's and transformers' per-step logits are scratch; copying a
    32 x 49k tensor each step would cost more than the penalty), else on a float32 copy. Rows
    without a penalty keep their values; with none at all ``logits`` itself comes back."""
    out = logits
    for i, (history, p) in enumerate(zip(histories, params)):
        pen = dry_penalties(history, p.dry_multiplier, p.dry_base, p.dry_allowed_length, breakers)
        pen = {t: v for t, v in pen.items() if t < logits.shape[-1]}
        if not pen:
            continue
        if out.dtype != torch.float32:
            out = out.float()
        idx = torch.tensor(list(pen), dtype=torch.long, device=out.device)
        out[i, idx] -= torch.tensor(list(pen.values()), dtype=out.dtype, device=out.device)
    return out


class DryLogitsProcessor:
    """DRY inside transformers' ``generate`` (a ``LogitsProcessor``): the generated part of every row
    is ``input_ids[:, prompt_length:]`` (left-padded prompts all end at ``prompt_length``)."""

    def __init__(self, params, prompt_length: int, breakers: frozenset[int] | set[int]):
        self.params, self.prompt_length, self.breakers = params, prompt_length, breakers

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        histories = input_ids[:, self.prompt_length:].tolist()
        out = apply_dry(scores, histories, [self.params] * len(histories), self.breakers)
        return out.to(scores.dtype)
