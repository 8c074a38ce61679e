"""The judge behind ``label`` and ``icai``: the model loaded once, principles judged by instructions or FLR.

:func:`load_judge` loads the judge model (``--model``, on ``--device``) and wraps it in a
:class:`~steer.rewards.principle_judge.PrincipleJudge`; :func:`score_responses` scores each distinct
(conversation, response) once, however many pairs it appears in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np

from steer.rewards.principle_judge import JudgedPrinciple, PrincipleJudge

log = logging.getLogger(__name__)

Conversation = Sequence[Mapping[str, str]]


def judge_device(name: str) -> str:
    import torch

    from steer.errors import InvalidInput

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device", "cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    return name


def load_judge(config, principles: Sequence[JudgedPrinciple]) -> tuple[PrincipleJudge, str]:
    """``(judge, model id)`` for a :class:`~steer.training.judge_settings.JudgeConfig`."""
    from steer.models import load_model

    device = judge_device(config.device)
    started = time.monotonic()
    loaded = load_model(config.model, dtype=config.dtype)
    loaded.model.to(device)
    log.info("judge model %s on %s (%.1fs)", loaded.model_id, device, time.monotonic() - started)
    judge = PrincipleJudge(loaded.model, loaded.tokenizer, principles, batch_size=config.batch_size,
                           prefix_batch=config.prefix_batch, progress=config.progress,
                           context_length=loaded.context_length, method=config.judge)
    return judge, loaded.model_id


def _key(conversation: Conversation, response: str) -> tuple:
    return tuple((m["role"], m["content"]) for m in conversation), response


def score_responses(judge: PrincipleJudge, conversations: Sequence[Conversation],
                    responses: Sequence[str]) -> np.ndarray:
    """``(n, P)`` float64 scores, row i for ``(conversations[i], responses[i])``; duplicates are scored once."""
    index: dict[tuple, int] = {}
    rows = []
    for conv, response in zip(conversations, responses):
        k = _key(conv, response)
        if k not in index:
            index[k] = len(index)
            rows.append((conv, response))
    log.info("judging %d distinct responses (%d asked) by %d principles", len(rows), len(responses),
             len(judge.principles))
    started = time.monotonic()
    unique = judge.scores([list(c) for c, _ in rows], [r for _, r in rows]).double().numpy()  # (u, P)
    log.info("judged in %.1fs", time.monotonic() - started)
    return unique[[index[_key(c, r)] for c, r in zip(conversations, responses)]]  # (n, P)
