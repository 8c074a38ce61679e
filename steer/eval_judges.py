"""Steerability evaluation judges: the held-out judge (raw FLR with follow-up sets training never
saw, and minus the token count for conciseness) and any steer Scorer as the training judge.

A judge has ``objectives``, ``describe()`` and ``score(conversations, texts, num_tokens) -> (n, k)``."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from steer.errors import InvalidInput
from steer.eval_report import HELDOUT, TOKEN_OBJECTIVE, TRAINING


def _score_in_chunks(scorer, conversations, texts, batch_size: int, progress: bool, desc: str):
    """``scorer.rewards`` over every pair, ``batch_size`` pairs per call; returns (raw, scaled) as (n, k)
    float64 arrays."""
    chunks = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=desc, unit="batch")
    raw, scaled = [], []
    for start in chunks:
        rewards = scorer.rewards(conversations[start:start + batch_size], texts[start:start + batch_size])
        raw.append(rewards.raw.double().numpy())
        scaled.append(rewards.scaled.double().numpy())
    k = len(scorer.objectives)
    return (np.concatenate(raw) if raw else np.zeros((0, k))), (np.concatenate(scaled) if scaled else np.zeros((0, k)))


class ScorerJudge:
    """A steer Scorer as a judge: its common-scale rewards. Scores are cached per (conversation,
    response), so under rerank the chosen responses are not scored a second time for the report."""

    def __init__(self, scorer, batch_size: int = 32, progress: bool = False, name: str = TRAINING):
        self.scorer, self.batch_size, self.progress, self.name = scorer, batch_size, progress, name
        self.objectives = tuple(scorer.objectives)
        self._cache: dict[tuple[str, str], tuple[float, ...]] = {}

    def describe(self) -> str:
        return f"{self.scorer.describe()} (common scale)"

    def score(self, conversations, texts, num_tokens=None):
        keys = [(json.dumps(c, sort_keys=True), t) for c, t in zip(conversations, texts)]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if todo:
            _, scaled = _score_in_chunks(
                self.scorer, [json.loads(c) for c, _ in todo], [t for _, t in todo], self.batch_size, self.progress,
                f"judge {self.name}",
            )
            self._cache.update(zip(todo, map(tuple, scaled.tolist())))
        # (n, k)
        return np.array([self._cache[k] for k in keys], dtype=np.float64).reshape(len(keys), len(self.objectives))


class HeldoutJudge:
    """Judges training did not optimise: ``TOKEN_OBJECTIVE`` is minus the response's token count;
    every other objective comes from ``flr`` (an FLRScorer with the held-out follow-up sets and no
    calibration: raw values, since Spearman is rank-based and needs no common scale)."""

    def __init__(self, flr, objectives: Sequence[str], batch_size: int = 32, progress: bool = False,
                 name: str = HELDOUT):
        self.flr, self.batch_size, self.progress, self.name = flr, batch_size, progress, name
        self.objectives = tuple(objectives)
        self._flr_objectives = tuple(o for o in self.objectives if o != TOKEN_OBJECTIVE)
        if self._flr_objectives and (flr is None or not set(self._flr_objectives) <= set(flr.objectives)):
            raise InvalidInput("objectives", f"the held-out judge's FLR scores {list(getattr(flr, 'objectives', []))}, "
                               f"need {list(self._flr_objectives)}")

    def describe(self) -> str:
        parts = [f"{o}: raw FLR, held-out follow-ups" for o in self._flr_objectives]
        if TOKEN_OBJECTIVE in self.objectives:
            parts.append(f"{TOKEN_OBJECTIVE}: -tokens")
        return "; ".join(parts) + (f" [{self.flr.describe()}]" if self._flr_objectives else "")

    def score(self, conversations, texts, num_tokens):
        out = np.empty((len(texts), len(self.objectives)))  # (n, k)
        if self._flr_objectives:
            raw, _ = _score_in_chunks(self.flr, list(conversations), list(texts), self.batch_size, self.progress,
                                      f"judge {self.name}")
            for j, o in enumerate(self.objectives):
                if o != TOKEN_OBJECTIVE:
                    out[:, j] = raw[:, list(self.flr.objectives).index(o)]
        if TOKEN_OBJECTIVE in self.objectives:
            out[:, self.objectives.index(TOKEN_OBJECTIVE)] = -np.asarray(num_tokens, dtype=np.float64)
        return out


def build_heldout_judge(loaded, objectives: Sequence[str], batch_size: int = 32,
                        progress: bool = False) -> HeldoutJudge:
    """The held-out judge on ``loaded`` (the base model): FLR with HELDOUT_FOLLOWUPS, no calibration."""
    from steer.rewards.heldout_followups import HELDOUT_FOLLOWUPS

    flr_objectives = tuple(o for o in objectives if o != TOKEN_OBJECTIVE)
    missing = [o for o in flr_objectives if o not in HELDOUT_FOLLOWUPS]
    if missing:
        raise InvalidInput(
            "objectives", f"no held-out judge for {missing}: add a follow-up set to steer/rewards/heldout_followups.py "
            f"(sets exist for {sorted(HELDOUT_FOLLOWUPS)}; {TOKEN_OBJECTIVE} is judged by token count)",
        )
    flr = None
    if flr_objectives:
        from steer.rewards.flr import FLRConfig, FLRScorer

        config = FLRConfig(objectives=flr_objectives, followups=HELDOUT_FOLLOWUPS, calibration="none")
        flr = FLRScorer(loaded.model, loaded.tokenizer, config, model_id=loaded.model_id,
                        context_length=loaded.context_length)
    return HeldoutJudge(flr, objectives, batch_size=batch_size, progress=progress)
