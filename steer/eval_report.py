"""Steerability evaluation results: what one run measured (``EvalResult``) and how it is reported:
the printed table, steerability.json (with the definition of every statistic), steerability.png
and generations.jsonl. The statistics themselves are computed in steer/eval_stats.py."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from steer.eval_grid import PromptRecord, direction_label
from steer.eval_stats import PLAIN, mean_by_group
from steer.files import atomic_file, atomic_write_text
from steer.objectives import Direction

JSON_NAME, PLOT_NAME, GENERATIONS_NAME = "steerability.json", "steerability.png", "generations.jsonl"
HELDOUT, TRAINING = "heldout", "training"  # judge names; HELDOUT is the headline
POLICY, BASE = "policy", "base"  # system names
TOKEN_OBJECTIVE = "conciseness"  # judged by the held-out judge as minus the token count


@dataclass(frozen=True)
class Sample:
    """One evaluated response."""

    prompt_index: int
    direction_index: int  # index into the run's directions; PLAIN: answered without a direction line
    seed: int
    text: str
    num_tokens: int
    finished: bool  # ended with end-of-turn rather than max_new_tokens
    candidate: int = 0  # rerank: which of its seed's candidates won v . r


@dataclass(frozen=True)
class EvalResult:
    objectives: tuple[str, ...]
    directions: tuple[Direction, ...]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    strategy: str
    judges: dict[str, str]  # name -> description; the first is the headline
    systems: dict  # POLICY, BASE -> eval_stats.SystemResult (one object when there is no adapter)
    samples: dict[str, tuple[Sample, ...]]  # system -> its samples, rows aligned with its scores
    comparison: dict  # eval_stats.compare(policy, base)
    timing: dict[str, float] = field(default_factory=dict)
    categories: tuple[str, ...] = ()  # each prompt's task category ("" where the prompts file names none)

    @property
    def headline(self) -> str:
        return next(iter(self.judges))

    @property
    def policy_is_base(self) -> bool:
        return self.systems[POLICY] is self.systems[BASE]

    def distinct_systems(self) -> list[str]:
        """The systems that were generated separately (base alone without an adapter)."""
        return [BASE] if self.policy_is_base else [POLICY, BASE]

    def spearman_by_category(self) -> dict | None:
        """system -> judge -> objective -> category -> {mean, num_prompts}: the within-prompt
        Spearman averaged over each category's prompts; None when the prompts name no categories."""
        if not any(self.categories):
            return None
        return {name: {judge: {o: mean_by_group(s.per_prompt, self.categories) for o, s in by_objective.items()}
                       for judge, by_objective in system.spearman.items()}
                for name, system in self.systems.items()}


# ---------------------------------------------------------------------------------------- reports

def _num(x: float | None, fmt: str = "+.3f") -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, fmt)


def _pm(mean: float, se: float) -> str:
    return _num(mean, "+.2f") if math.isnan(se) else f"{mean:+.2f}±{se:.2f}"


def _ci(mean: float, ci: Sequence[float]) -> str:
    return f"{_num(mean)} [{_num(ci[0], '+.2f')},{_num(ci[1], '+.2f')}]"


def format_table(result: EvalResult) -> str:
    """Per system: tokens, end-of-turn share, share of loops and headline-judge mean ± se per direction; then every
    judge's within-prompt Spearman [95% CI], the headline effect sizes; then policy versus base."""
    names, head = result.objectives, result.headline
    width = max(16, *(len(d.label) for d in result.systems[BASE].directions)) + 2
    col = max(24, *(len(o) + 2 for o in names))
    lines = []
    for name in result.distinct_systems():
        system = result.systems[name]
        note = " (= policy: no adapter)" if result.policy_is_base else ""
        header = (f"{'direction':<{width}}{'n':>5}{'tokens':>8}{'ended':>7}{'loops':>7}"
                  + "".join(f"{o:>{col}}" for o in names))
        lines += ["", f"{name}{note}; judge {head!r}: {result.judges[head]}", header, "-" * len(header)]
        for d in system.directions:
            cells = "".join(f"{_pm(d.mean[head][o], d.se[head][o]):>{col}}" for o in names)
            lines.append(f"{d.label:<{width}}{d.n:>5}{d.mean_tokens:>8.1f}{d.finished:>7.2f}"
                         f"{_num(d.repeating, '.2f'):>7}{cells}")
        lines.append("-" * len(header))
        for judge in system.spearman:
            cells = "".join(f"{_ci(s.mean, s.ci95):>{col}}" for s in system.spearman[judge].values())
            lines.append(f"{'spearman ' + judge:<{width + 20}}{cells}")
        cells = "".join(f"{_num(e.diff, '+.3g') + ' (d ' + _num(e.cohens_d, '+.2f') + ')':>{col}}"
                        for e in system.effect[head].values())
        lines.append(f"{'w=1 - w=0 (d)':<{width + 20}}{cells}")
    if not result.policy_is_base:
        cells = "".join(f"{_ci(g['mean'], g['ci95']):>{col}}"
                        for g in result.comparison["spearman_gain"][head].values())
        lines += ["", f"{'spearman gain':<{width + 20}}{cells}",
                  f"(policy - base, judge {head!r}, paired over prompts)"]
    by_category = result.spearman_by_category()
    if by_category is not None:
        shown = result.distinct_systems()  # policy first

        def cell(o: str, category: str) -> str:
            means = [_num(by_category[name][head][o][category]["mean"], "+.2f") for name in shown]
            return means[0] + "".join(f" ({m})" for m in means[1:])

        cw = max(12, *(len(c) for c in result.categories)) + 2
        header = f"{'category':<{cw}}{'prompts':>8}" + "".join(f"{o:>{col}}" for o in names)
        lines += ["", f"within-prompt spearman by category, judge {head!r}"
                  + (": policy (base)" if len(shown) > 1 else ""), header, "-" * len(header)]
        for category, count in Counter(result.categories).items():  # first-seen order
            cells = "".join(f"{cell(o, category):>{col}}" for o in names)
            lines.append(f"{category or '(none)':<{cw}}{count:>8}{cells}")
    at1 = result.comparison["at_weight_1"][head]
    if "helpfulness" in at1:
        h = at1["helpfulness"]
        lines.append(f"\nhelpfulness ({head}) at helpfulness=1: policy {_num(h[POLICY])}, base {_num(h[BASE])}; "
                     f"base plain answers {_num(h['base_plain'])} "
                     f"({_num(result.comparison['base_plain_tokens'], '.1f')} tokens)")
    return "\n".join(lines).lstrip("\n")


def _finite(obj):
    """JSON has no NaN: undefined statistics (a constant column, a single sample) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


DEFINITIONS = {  # written into steerability.json so the numbers explain themselves
    "spearman": "per prompt: Spearman rho between the weight each request gave the objective and the realised "
                "score, over that prompt's directions x seeds (plain answers excluded); a prompt whose score never "
                "moved counts as 0; 'mean' averages over prompts; 'ci95' is a percentile bootstrap over prompts",
    "effect": "mean realised score of generations whose request gave the objective weight 1 minus weight 0, "
              "pooled over prompts; cohens_d = diff / pooled sample SD; diff_ci95 bootstraps prompts",
    "side_effects": "matrix[i][j] = within-prompt mean Spearman of realised score i against requested weight j; "
                    "the diagonal is 'spearman'; on the simplex the weights are negatively related, so a perfectly "
                    "steerable policy has negative off-diagonal entries",
    HELDOUT: "helpfulness, creativity: raw FLR (mean log-likelihood of held-out positive minus negative follow-ups, "
             "nats) on the base model; conciseness: minus the response's token count (higher = shorter)",
    TRAINING: "the training scorer (--scorer) on the base model, on its common scale ((raw - mean) / std); under "
              "--strategy rerank it also chose among the candidates, so only the held-out judge is independent "
              "of the choice",
    "spearman_gain": "per prompt, policy rho minus base rho, averaged; bootstrapped over the same prompt resamples",
    "spearman_by_category": "system -> judge -> objective -> the prompts' task category: 'spearman' per prompt "
                            "averaged over the category's prompts (num_prompts: those with a defined rho)",
    "at_weight_1": "mean realised score where the request gave that objective weight 1; base_plain: the base "
                   "model's answers without a direction line",
}


def result_to_json(result: EvalResult, **extra) -> dict:
    return _finite({
        **extra,
        "strategy": result.strategy,
        "seeds": list(result.seeds),
        "objectives": list(result.objectives),
        "num_prompts": len(result.prompts),
        "directions": [{"label": direction_label(d), "weights": d.as_dict()} for d in result.directions],
        "judges": result.judges,
        "headline_judge": result.headline,
        "policy_is_base": result.policy_is_base,
        "systems": {name: s.to_json() for name, s in result.systems.items()},
        "comparison": result.comparison,
        "spearman_by_category": result.spearman_by_category(),
        "definitions": DEFINITIONS,
        "timing": result.timing,
    })


def plot_steerability(result: EvalResult, path: str | Path, title: str = "") -> Path:
    """Top row: one frontier panel per pair of objectives (headline judge, mean ± se per direction;
    policy filled circles, base hollow squares, base plain answers a red star). Bottom row:
    within-prompt Spearman with 95% intervals per system, mean tokens per direction per system,
    and the policy's side-effect matrix."""
    import matplotlib
    from matplotlib.figure import Figure  # object API: no pyplot state or GUI backend; saves with Agg

    head, objectives = result.headline, result.objectives
    shown = result.distinct_systems()
    pairs = list(combinations(range(len(objectives)), 2))
    cols = max(3, len(pairs))
    fig = Figure(figsize=(4.8 * cols, 9.0), layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False)
    for ax in [*axes[0][len(pairs):], *axes[1][3:]]:
        ax.axis("off")
    cmap = matplotlib.colormaps["viridis"]
    colour_of = {POLICY: "tab:blue", BASE: "tab:grey"}
    unit = {"helpfulness": "helpfulness (raw FLR, nats)", "creativity": "creativity (raw FLR, nats)",
            TOKEN_OBJECTIVE: f"{TOKEN_OBJECTIVE} (-tokens)"} if head == HELDOUT else {}

    def err(se: float):
        return None if math.isnan(se) else se

    for ax, (a, b) in zip(axes[0], pairs):
        oa, ob = objectives[a], objectives[b]
        for name in shown:
            for d in result.systems[name].directions:
                x, y, xe, ye = d.mean[head][oa], d.mean[head][ob], err(d.se[head][oa]), err(d.se[head][ob])
                if d.weights is None:
                    ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="*", color="red", markersize=11, ecolor="lightgrey")
                    ax.annotate("base plain", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                                color="red")
                    continue
                wa, wb = d.weights[oa], d.weights[ob]
                colour = cmap(wa / (wa + wb)) if wa + wb > 0 else "grey"  # share of the pair's weight on x
                ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o" if name == POLICY else "s", color=colour,
                            mfc=colour if name == POLICY else "none", ecolor="lightgrey", capsize=2)
                ax.annotate(d.label if name == POLICY else f"{d.label} (base)", (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=6)
        ax.set(xlabel=unit.get(oa, oa), ylabel=unit.get(ob, ob))
        ax.set_title(f"{oa} vs {ob} ({head} judge)", fontsize=9)
        ax.grid(alpha=0.3)
    width = 0.8 / len(shown)
    ax = axes[1][0]
    for s_i, name in enumerate(shown):
        stats = [result.systems[name].spearman[head][o] for o in objectives]
        xs = np.arange(len(objectives)) + (s_i - (len(shown) - 1) / 2) * width
        means = np.nan_to_num([s.mean for s in stats])
        lo = np.nan_to_num([m - s.ci95[0] for s, m in zip(stats, means)]).clip(0)
        hi = np.nan_to_num([s.ci95[1] - m for s, m in zip(stats, means)]).clip(0)
        ax.bar(xs, means, width, yerr=[lo, hi], capsize=3, label=name, color=colour_of[name])
        for x, s in zip(xs, stats):
            ax.annotate(_num(s.mean, "+.2f"), (x, 1.0), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(objectives)), list(objectives), rotation=15)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylim(-1.05, 1.15)
    ax.legend(fontsize=8)
    ax.set_title(f"within-prompt Spearman(weight, {head} score), 95% CI", fontsize=9)
    ax = axes[1][1]
    labels = [d.label for d in result.systems[BASE].directions]
    for s_i, name in enumerate(shown):
        tokens = {d.label: d.mean_tokens for d in result.systems[name].directions}
        xs = np.arange(len(labels)) + (s_i - (len(shown) - 1) / 2) * width
        ax.bar(xs, [tokens.get(label, 0.0) for label in labels], width, label=name, color=colour_of[name])
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("mean tokens")
    ax.legend(fontsize=8)
    ax.set_title("response length per direction", fontsize=9)
    ax = axes[1][2]
    matrix = result.systems[POLICY].side_effects[head]
    image = ax.imshow(np.nan_to_num(matrix), vmin=-1, vmax=1, cmap="RdBu")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, _num(float(v), "+.2f"), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(objectives)), [f"weight {o}" for o in objectives], rotation=15, fontsize=7)
    ax.set_yticks(range(len(objectives)), list(objectives), fontsize=7)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(f"{shown[0]} side effects: Spearman(realised row, requested column)", fontsize=9)
    fig.suptitle(f"{title}\n" * bool(title) + "● policy   □ base   ★ base model's plain answers   (mean ± se over "
                 "prompts x seeds; colour: share of the pair's weight on the x objective)", fontsize=10)
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100)
    return path


def write_report(result: EvalResult, out_dir: str | Path, prompts: Sequence[PromptRecord] | None = None,
                 **extra) -> dict[str, Path]:
    """steerability.json, steerability.png and generations.jsonl under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME, "plot": out / PLOT_NAME, "generations": out / GENERATIONS_NAME}
    doc = result_to_json(result, **extra, files={k: p.name for k, p in paths.items()})
    atomic_write_text(paths["json"], json.dumps(doc, indent=2, allow_nan=False) + "\n")
    with atomic_file(paths["generations"]) as tmp, tmp.open("w", encoding="utf-8") as f:
        for name in result.distinct_systems():
            scores = result.systems[name].scores
            for i, s in enumerate(result.samples[name]):
                plain = s.direction_index == PLAIN
                row = {
                    "system": name, "prompt_index": s.prompt_index, "prompt": result.prompts[s.prompt_index],
                    "category": prompts[s.prompt_index].category if prompts else None,
                    "direction": "plain" if plain else direction_label(result.directions[s.direction_index]),
                    "weights": None if plain else result.directions[s.direction_index].as_dict(),
                    "seed": s.seed, "candidate": s.candidate, "text": s.text, "num_tokens": s.num_tokens,
                    "finished": s.finished,
                    "scores": {j: dict(zip(result.objectives, m[i].tolist())) for j, m in scores.items()},
                }
                f.write(json.dumps(_finite(row), ensure_ascii=False, allow_nan=False) + "\n")
    plot_steerability(result, paths["plot"], title=str(extra.get("title", "")))
    return paths
