"""Reward vectors: pluggable, composable scorers that map (conversation, response) to one reward per objective.

* :class:`Scorer` — ``rewards(conversations, responses) -> Rewards(raw (n, k), scaled (n, k))``;
  ``score(...)`` is the ``(n, k)`` common-scale tensor. ``describe()`` names it.
* :class:`FLRScorer` (Follow-up Likelihood as Reward), :class:`LengthScorer` (conciseness from
  length), :class:`RewardModelScorer` (a trained multi-objective reward model directory),
  :class:`CompositeScorer` (several over disjoint objectives).
* :func:`build_scorer` — from a spec string (``default``, ``flr``, ``none``, a directory, ...).
* :class:`ScoringService` — async, serialised access for the server.

The common scale and its calibration are described in :mod:`steer.rewards.calibration`.
Heavy modules load on first attribute access, so ``import steer.rewards`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Scorer": "steer.rewards.scorer",
    "Rewards": "steer.rewards.scorer",
    "CompositeScorer": "steer.rewards.scorer",
    "Calibration": "steer.rewards.calibration",
    "FLRConfig": "steer.rewards.flr",
    "FLRScorer": "steer.rewards.flr",
    "FollowUps": "steer.rewards.followups",
    "LengthScorer": "steer.rewards.length",
    "RewardModelScorer": "steer.rewards.reward_model",
    "build_scorer": "steer.rewards.build",
    "ScoringService": "steer.rewards.service",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'steer.rewards' has no attribute {name!r}")
