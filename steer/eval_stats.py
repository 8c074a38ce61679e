"""Statistics of the steerability evaluation (:mod:`steer.eval`), kept free of models and I/O.

Every statistic here is computed from three aligned arrays over the generations of one system:
``groups[g]`` (the prompt generation ``g`` answers), ``weights[g, j]`` (the weight its request gave
objective ``j``) and ``scores[g, i]`` (the score a judge gave its response on objective ``i``).

* **Within-prompt Spearman.** For each prompt, Spearman's rho between the requested weight and the
  realised score over that prompt's generations (directions x seeds), then the mean over prompts.
  Computing it within a prompt removes the prompt's own effect (some questions get long answers
  whatever the weights), which pooled correlation mixes in as noise. A prompt whose realised
  score never moves (every response scored the same) counts as 0: the weight did not move it. A
  prompt whose requested weight never moves is undefined (NaN) and left out of the mean.
* **Bootstrap interval.** Percentile bootstrap over prompts: resample the prompts with
  replacement, recompute the statistic, take the 2.5th and 97.5th percentiles. The resample
  indices come from one seeded generator and are shared by every statistic, objective and system
  of a run, so differences between systems are paired.
* **Effect size.** Mean realised score at weight 1 minus at weight 0 (pooled over prompts), with
  Cohen's d = difference / pooled standard deviation (sample variances, n - 1).
* **Side-effect matrix.** ``M[i, j]`` = within-prompt Spearman of the realised score on objective
  ``i`` against the requested weight on objective ``j``; the diagonal is the headline. On the
  simplex the weights are negatively related (more of one leaves less for the others), so a
  perfectly steerable policy has negative off-diagonal entries; a side effect shows as an entry
  that differs from what the weights alone imply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WEIGHT_TOLERANCE = 1e-9  # weights are normalised floats: "weight 1" is within this of 1.0


# --------------------------------------------------------------------------------- correlation

def rankdata(values: Sequence[float]) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the average of the ranks they span."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"rankdata expects a 1-d sequence, got shape {a.shape}")
    if np.isnan(a).any():
        raise ValueError("rankdata: values contain NaN")
    order = np.argsort(a, kind="mergesort")
    ordered = a[order]
    new_run = np.r_[True, ordered[1:] != ordered[:-1]]  # a run of ties starts where the value changes
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], len(a)]
    run_rank = (starts + 1 + ends) / 2.0  # mean of the 1-based positions start+1 .. end
    ranks = np.empty(len(a))
    ranks[order] = run_rank[np.cumsum(new_run) - 1]
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant (the correlation is undefined)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson needs two 1-d sequences of equal length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denom == 0.0:
        return float("nan")
    return max(-1.0, min(1.0, float(dx @ dy) / denom))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation with ties averaged (scipy.stats.spearmanr's default); NaN if undefined."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equally long sequences, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return float("nan")
    return pearson(rankdata(x), rankdata(y))


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)); the error is NaN below two values."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, float("nan")
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def per_prompt_spearman(groups: Sequence[int], x: Sequence[float], y: Sequence[float], num_groups: int) -> np.ndarray:
    """``(num_groups,)``: Spearman of ``x`` and ``y`` over each group's members.

    NaN where ``x`` is constant within the group (or it has < 2 members): nothing to correlate
    with. 0 where only ``y`` is constant: the score did not move with the weight.
    """
    groups = np.asarray(groups)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if not groups.shape == x.shape == y.shape:
        raise ValueError(f"per_prompt_spearman: groups {groups.shape}, x {x.shape} and y {y.shape} differ")
    out = np.full(num_groups, np.nan)
    for p in range(num_groups):
        members = groups == p
        xs, ys = x[members], y[members]
        if len(xs) < 2 or np.all(xs == xs[0]):
            continue
        out[p] = 0.0 if np.all(ys == ys[0]) else spearman(xs, ys)
    return out


def nanmean(values: np.ndarray, axis=None):
    """Mean of the defined (non-NaN) values; NaN where none is defined (without numpy's warning)."""
    values = np.asarray(values, dtype=np.float64)
    defined = ~np.isnan(values)
    count = defined.sum(axis=axis)
    total = np.where(defined, values, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def mean_by_group(per_prompt: Sequence[float], labels: Sequence[str]) -> dict[str, dict]:
    """Per label (e.g. a prompt's task category), the mean of its prompts' defined values (NaN where
    none is) and how many prompts defined one, labels in first-seen order: where steering comes from."""
    values = np.asarray(per_prompt, dtype=np.float64)
    if values.shape != (len(labels),):
        raise ValueError(f"mean_by_group: {values.shape[0] if values.ndim else 0} values for {len(labels)} labels")
    out = {}
    for label in dict.fromkeys(labels):
        members = values[[i for i, x in enumerate(labels) if x == label]]
        out[label] = {"mean": float(nanmean(members)), "num_prompts": int((~np.isnan(members)).sum())}
    return out


# ----------------------------------------------------------------------------------- bootstrap

def bootstrap_indices(num_groups: int, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, num_groups)`` prompt indices drawn with replacement from a seeded generator."""
    if num_groups < 1 or resamples < 1:
        raise ValueError(f"bootstrap needs >= 1 group and >= 1 resample, got {num_groups} and {resamples}")
    return np.random.default_rng(seed).integers(0, num_groups, size=(resamples, num_groups))


def bootstrap_ci(per_group: Sequence[float], indices: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of ``per_group`` over resamples ``indices`` (B, P).

    NaN entries (undefined groups) are left out of each resample's mean; a resample with no
    defined group is left out of the interval. NaN, NaN when nothing is defined.
    """
    values = np.asarray(per_group, dtype=np.float64)
    means = nanmean(values[indices], axis=1)  # (B,)
    means = means[~np.isnan(means)]
    if means.size == 0:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class WithinPromptSpearman:
    mean: float  # mean over prompts of the per-prompt rho (undefined prompts left out)
    ci95: tuple[float, float]  # percentile bootstrap over prompts
    per_prompt: tuple[float, ...]  # rho per prompt (NaN: undefined)
    num_defined: int  # prompts with a defined rho
    num_flat: int  # prompts whose realised score never moved (rho counted as 0)

    def to_json(self) -> dict:
        return {
            "mean": self.mean, "ci95": list(self.ci95), "num_prompts": self.num_defined,
            "num_flat_prompts": self.num_flat, "per_prompt": list(self.per_prompt),
        }


def within_prompt_spearman(groups, x, y, indices: np.ndarray, level: float = 0.95) -> WithinPromptSpearman:
    """Per-prompt Spearman of (x, y), its mean over prompts, and a bootstrap interval (``indices``: (B, P))."""
    groups, y = np.asarray(groups), np.asarray(y, dtype=np.float64)
    per = per_prompt_spearman(groups, x, y, indices.shape[1])
    flat = sum(1 for p in range(len(per)) if not np.isnan(per[p]) and np.all(y[groups == p] == y[groups == p][0]))
    return WithinPromptSpearman(
        mean=float(nanmean(per)), ci95=bootstrap_ci(per, indices, level), per_prompt=tuple(float(v) for v in per),
        num_defined=int((~np.isnan(per)).sum()), num_flat=flat,
    )


# --------------------------------------------------------------------------------- effect size

@dataclass(frozen=True)
class Effect:
    n_w1: int  # generations whose request gave the objective weight 1
    n_w0: int  # ... weight 0
    mean_w1: float
    mean_w0: float
    diff: float  # mean_w1 - mean_w0
    diff_ci95: tuple[float, float]  # percentile bootstrap over prompts
    sd_w1: float  # sample standard deviations (n - 1)
    sd_w0: float
    pooled_sd: float  # sqrt(((n1 - 1) sd1^2 + (n0 - 1) sd0^2) / (n1 + n0 - 2))
    cohens_d: float  # diff / pooled_sd

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _sd(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if values.size > 1 else float("nan")


def effect_size(groups, weight, score, indices: np.ndarray, level: float = 0.95) -> Effect:
    """Realised ``score`` at requested ``weight`` 1 versus 0, pooled over prompts (see module docstring)."""
    groups = np.asarray(groups)
    weight, score = np.asarray(weight, dtype=np.float64), np.asarray(score, dtype=np.float64)
    high, low = np.abs(weight - 1.0) <= WEIGHT_TOLERANCE, np.abs(weight) <= WEIGHT_TOLERANCE
    s1, s0 = score[high], score[low]
    m1 = float(s1.mean()) if s1.size else float("nan")
    m0 = float(s0.mean()) if s0.size else float("nan")
    sd1, sd0 = _sd(s1), _sd(s0)
    dof = s1.size + s0.size - 2
    pooled = (math.sqrt(((s1.size - 1) * sd1 ** 2 + (s0.size - 1) * sd0 ** 2) / dof)
              if s1.size > 1 and s0.size > 1 else float("nan"))
    d = (m1 - m0) / pooled if pooled > 0 else float("nan")
    # Bootstrap of the difference: per-prompt sums and counts, so a resample is two weighted means.
    P = indices.shape[1]
    sum1, n1 = np.bincount(groups[high], s1, P), np.bincount(groups[high], minlength=P)
    sum0, n0 = np.bincount(groups[low], s0, P), np.bincount(groups[low], minlength=P)
    with np.errstate(invalid="ignore", divide="ignore"):
        diffs = sum1[indices].sum(1) / n1[indices].sum(1) - sum0[indices].sum(1) / n0[indices].sum(1)  # (B,)
    diffs = diffs[np.isfinite(diffs)]
    tail = 100.0 * (1.0 - level) / 2.0
    ci = (tuple(float(v) for v in np.percentile(diffs, [tail, 100.0 - tail])) if diffs.size
          else (float("nan"), float("nan")))
    return Effect(
        n_w1=int(s1.size), n_w0=int(s0.size), mean_w1=m1, mean_w0=m0, diff=m1 - m0, diff_ci95=ci,
        sd_w1=sd1, sd_w0=sd0, pooled_sd=pooled, cohens_d=d,
    )


def side_effect_matrix(groups, weights, scores) -> np.ndarray:
    """``(k, k)``: ``M[i, j]`` = within-prompt mean Spearman of ``scores[:, i]`` against ``weights[:, j]``."""
    weights, scores = np.asarray(weights, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if weights.ndim != 2 or weights.shape != scores.shape:
        raise ValueError(f"side_effect_matrix needs (n, k) weights and scores, got {weights.shape} and {scores.shape}")
    groups = np.asarray(groups)
    P = int(groups.max()) + 1 if groups.size else 0
    k = weights.shape[1]
    out = np.full((k, k), np.nan)
    for i in range(k):
        for j in range(k):
            out[i, j] = nanmean(per_prompt_spearman(groups, weights[:, j], scores[:, i], P))
    return out


# ----------------------------------------------------------------------- one system, every judge

PLAIN = -1  # direction index of a plain answer (asked without a direction line): in no statistic of weights


@dataclass(frozen=True)
class DirectionSummary:
    label: str
    weights: dict[str, float] | None  # None: plain answers
    n: int
    mean_tokens: float
    finished: float  # share that ended with end-of-turn
    mean: dict[str, dict[str, float]]  # judge -> objective -> mean realised score
    se: dict[str, dict[str, float]]  # judge -> objective -> standard error of that mean
    repeating: float = float("nan")  # share holding a repeated run of tokens (a loop); nan: not measured

    def to_json(self) -> dict:
        return {"label": self.label, "weights": self.weights, "n": self.n, "mean_tokens": self.mean_tokens,
                "finished_fraction": self.finished, "repeating_fraction": self.repeating, "mean": self.mean,
                "se": self.se}


@dataclass(frozen=True)
class SystemResult:
    """Everything measured for one system (policy or base), per judge."""

    objectives: tuple[str, ...]
    scores: dict[str, np.ndarray]  # judge -> (n, k) realised scores, one row per generation
    spearman: dict[str, dict[str, WithinPromptSpearman]]  # judge -> objective -> ...
    effect: dict[str, dict[str, Effect]]  # judge -> objective -> ...
    side_effects: dict[str, np.ndarray]  # judge -> (k, k): rows realised objective, columns requested weight
    directions: tuple[DirectionSummary, ...]  # grid order, then "plain" when there are plain answers
    timing: dict[str, float]

    def mean_spearman(self, judge: str) -> float:
        return float(nanmean([s.mean for s in self.spearman[judge].values()]))

    def plain(self) -> DirectionSummary | None:
        return next((d for d in self.directions if d.weights is None), None)

    def to_json(self) -> dict:
        judges, k = list(self.spearman), list(self.objectives)
        return {
            "num_generations": sum(d.n for d in self.directions),
            "mean_spearman": {j: self.mean_spearman(j) for j in judges},
            "spearman": {j: {o: s.to_json() for o, s in self.spearman[j].items()} for j in judges},
            "effect": {j: {o: e.to_json() for o, e in self.effect[j].items()} for j in judges},
            "at_weight_1": {j: {o: e.mean_w1 for o, e in self.effect[j].items()} for j in judges},
            "side_effects": {j: {"rows_realised": k, "columns_requested": k, "matrix": self.side_effects[j].tolist()}
                             for j in judges},
            "directions": [d.to_json() for d in self.directions],
            "plain": self.plain().to_json() if self.plain() else None,
            "timing": self.timing,
        }


def analyse(
    objectives: Sequence[str],
    direction_weights: Sequence[Sequence[float]],
    direction_labels: Sequence[str],
    prompt_index: Sequence[int],
    direction_index: Sequence[int],
    num_tokens: Sequence[int],
    finished: Sequence[bool],
    scores: dict[str, np.ndarray],
    indices: np.ndarray,
    timing: dict | None = None,
    repeating: Sequence[bool] | None = None,
) -> SystemResult:
    """Every statistic of one system. Generation ``g`` answers prompt ``prompt_index[g]`` under
    direction ``direction_index[g]`` (a row of ``direction_weights``, or PLAIN); ``scores[judge][g]``
    is its realised score vector; ``repeating[g]`` whether it loops (steer.dry.has_repeated_run).
    ``indices`` (B, P) are the run's shared bootstrap resamples."""
    objectives = tuple(objectives)
    table = np.asarray(direction_weights, dtype=np.float64).reshape(-1, len(objectives))  # (D, k)
    di = np.asarray(direction_index)
    directed = di != PLAIN
    groups = np.asarray(prompt_index)[directed]
    weights = table[di[directed]]  # (n_directed, k)
    spearman, effect, side = {}, {}, {}
    for judge, matrix in scores.items():
        realised = np.asarray(matrix, dtype=np.float64)[directed]  # (n_directed, k)
        spearman[judge] = {o: within_prompt_spearman(groups, weights[:, j], realised[:, j], indices)
                           for j, o in enumerate(objectives)}
        effect[judge] = {o: effect_size(groups, weights[:, j], realised[:, j], indices)
                         for j, o in enumerate(objectives)}
        side[judge] = side_effect_matrix(groups, weights, realised)
    summaries = []
    for d in [*range(len(table)), PLAIN]:
        members = np.flatnonzero(di == d)
        if d == PLAIN and members.size == 0:
            continue
        stats = {j: {o: mean_and_se(np.asarray(m, dtype=np.float64)[members, c].tolist())
                     for c, o in enumerate(objectives)}
                 for j, m in scores.items()}
        summaries.append(DirectionSummary(
            label="plain" if d == PLAIN else direction_labels[d],
            weights=None if d == PLAIN else dict(zip(objectives, table[d].tolist())), n=int(members.size),
            mean_tokens=mean_and_se([float(num_tokens[g]) for g in members])[0],
            finished=mean_and_se([float(finished[g]) for g in members])[0],
            mean={j: {o: v[0] for o, v in s.items()} for j, s in stats.items()},
            se={j: {o: v[1] for o, v in s.items()} for j, s in stats.items()},
            repeating=(float("nan") if repeating is None
                       else mean_and_se([float(repeating[g]) for g in members])[0]),
        ))
    return SystemResult(objectives, dict(scores), spearman, effect, side, tuple(summaries), dict(timing or {}))


def compare(policy: SystemResult, base: SystemResult, objectives: Sequence[str], indices: np.ndarray) -> dict:
    """Policy minus base, per judge and objective: within-prompt Spearman (paired: per-prompt
    differences, bootstrapped over the same resamples) and the mean realised score at weight 1,
    next to the base model's plain answers (the bar a requested direction should clear)."""
    plain = base.plain()
    out: dict = {"spearman_gain": {}, "at_weight_1": {},
                 "base_plain_tokens": plain.mean_tokens if plain else float("nan")}
    for judge in policy.spearman:
        out["spearman_gain"][judge], out["at_weight_1"][judge] = {}, {}
        for o in objectives:
            gain = (np.asarray(policy.spearman[judge][o].per_prompt)
                    - np.asarray(base.spearman[judge][o].per_prompt))  # (P,)
            out["spearman_gain"][judge][o] = {"mean": float(nanmean(gain)), "ci95": list(bootstrap_ci(gain, indices))}
            out["at_weight_1"][judge][o] = {
                "policy": policy.effect[judge][o].mean_w1, "base": base.effect[judge][o].mean_w1,
                "base_plain": plain.mean[judge][o] if plain else float("nan"),
            }
    return out
