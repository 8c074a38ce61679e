"""Steerability evaluation: does what the policy writes move the way the requested direction says?

For every direction of a grid and every held-out prompt, sample responses from the
direction-conditioned policy, score them with a reward scorer on the *base* model (so the judge
does not change with the policy), and report per direction the realised mean reward per objective
and ``v . r``, and per objective the Spearman correlation between the weight a request gave that
objective and the score its response got. A policy that ignores the direction line scores ~0; a
perfectly steerable one +1. Writes steerability.json, steerability.png (reward frontier per pair
of objectives + Spearman bars) and generations.jsonl into --output.

Examples:
  python -m steer.eval                                          # base default model, held-out prompts
  python -m steer.eval --limit 16 --num-samples 1 --max-new-tokens 48 --output runs/eval-base
  python -m steer.eval --adapter runs/dpa/adapter --output runs/eval-dpa   # judged by the base model
  python -m steer.eval --grid simplex:4 --num-samples 2          # every point of the simplex at step 1/4
  python -m steer.eval --grid "helpfulness=0.8,creativity=0.2;conciseness=1"
  python -m steer.eval --scorer runs/rm --prompts my_prompts.jsonl

Prompts are JSONL rows {"prompt": "...", "category": "..."}; the default is the held-out split
shipped in steer.training (training/data/prompts_heldout.jsonl).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path

from steer.errors import InvalidInput
from steer.objectives import DEFAULT_OBJECTIVES, Direction, validate_objectives

DEFAULT_GRID = "default"
JSON_NAME, PLOT_NAME, GENERATIONS_NAME = "steerability.json", "steerability.png", "generations.jsonl"
MAX_SIMPLEX_STEPS = 20  # simplex:N has C(N+k-1, k-1) points: 231 directions at N=20, k=3


# ------------------------------------------------------------------------------------------ stats

def rankdata(values: Sequence[float]):
    """1-based ranks of ``values``; tied values share the average of the ranks they span."""
    import numpy as np

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
    import numpy as np

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


# ------------------------------------------------------------------------------------- directions

def direction_grid(spec: str, objectives: Sequence[str] = DEFAULT_OBJECTIVES, field: str = "grid") -> list[Direction]:
    """The directions a spec names, without duplicates, in a stable order.

    * ``default``: every corner, the uniform mix, and every pairwise 50/50 mix
    * ``corners``: every corner
    * ``simplex:N``: every point whose weights are multiples of 1/N
    * ``name=w,name=w;name=w;...``: explicit directions (normalised like request weights)
    """
    objectives = validate_objectives(objectives)
    spec = (spec or "").strip()
    if spec in ("default", "corners"):
        out = [Direction.corner(o, objectives) for o in objectives]
        if spec == "default":
            out.append(Direction.uniform(objectives))
            out += [Direction.from_weights({a: 1.0, b: 1.0}, objectives) for a, b in combinations(objectives, 2)]
    elif spec.startswith("simplex:"):
        steps = spec.partition(":")[2]
        if not steps.isdigit() or not 1 <= int(steps) <= MAX_SIMPLEX_STEPS:
            raise InvalidInput(field, f"simplex:N needs an integer N in 1..{MAX_SIMPLEX_STEPS}, got {spec!r}")
        out = [Direction.from_weights(dict(zip(objectives, c)), objectives) for c in _compositions(int(steps), len(objectives))]
    elif "=" in spec:
        out = []
        for i, part in enumerate(p for p in spec.split(";") if p.strip()):
            weights = {}
            for item in part.split(","):
                name, eq, value = item.strip().partition("=")
                try:
                    weights[name.strip()] = float(value)
                except ValueError:
                    raise InvalidInput(f"{field}[{i}]", f"expected name=weight, got {item.strip()!r}") from None
                if not eq:
                    raise InvalidInput(f"{field}[{i}]", f"expected name=weight, got {item.strip()!r}")
            out.append(Direction.from_weights(weights, objectives, field=f"{field}[{i}]"))
    else:
        raise InvalidInput(field, f"expected 'default', 'corners', 'simplex:N' or 'name=w,...;name=w,...', got {spec!r}")
    unique: dict[tuple[float, ...], Direction] = {}
    for d in out:
        unique.setdefault(tuple(round(w, 9) for w in d.weights), d)
    return list(unique.values())


def _compositions(total: int, parts: int):
    """Every tuple of ``parts`` non-negative integers summing to ``total``, lexicographically descending."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total, -1, -1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def direction_label(direction: Direction) -> str:
    """Short plot/table label: the objective's name for a corner, ``uniform``, else ``h.50 cr.50``."""
    nonzero = [(o, w) for o, w in zip(direction.objectives, direction.weights) if w > 0]
    if len(nonzero) == 1:
        return nonzero[0][0]
    if len(nonzero) == len(direction.objectives) and max(direction.weights) - min(direction.weights) < 1e-9:
        return "uniform"
    short = _short_names(direction.objectives)
    return " ".join(f"{short[o]}{w:.2f}".replace("0.", ".", 1) for o, w in nonzero)


def _short_names(objectives: Sequence[str]) -> dict[str, str]:
    """The shortest prefix that tells each objective from the others (helpfulness -> h, creativity -> cr)."""
    out = {}
    for o in objectives:
        n = 1
        while n < len(o) and any(p != o and p.startswith(o[:n]) for p in objectives):
            n += 1
        out[o] = o[:n]
    return out


# ---------------------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    category: str = ""


def default_prompts_path(split: str = "heldout") -> Path:
    """The prompt set shipped in ``steer.training`` (``train`` or ``heldout``).

    Located through the import system without importing ``steer.training`` (the core never does),
    so it works for the editable checkout and for an installed wheel alike.
    """
    import importlib.util

    names = {"train": "prompts.jsonl", "heldout": "prompts_heldout.jsonl"}
    if split not in names:
        raise InvalidInput("split", f"expected one of {sorted(names)}, got {split!r}")
    spec = importlib.util.find_spec("steer.training")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("steer.training is not installed: pass --prompts explicitly")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / names[split]


def load_prompts(path: str | Path, field: str = "prompts") -> list[PromptRecord]:
    """Read a JSONL prompt set; errors name ``file:line``. Blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InvalidInput(field, f"cannot read {path}: {e.strerror or e}") from None
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInput(field, f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InvalidInput(field, f"{where}: expected an object {{\"prompt\": ..., \"category\": ...}}")
        prompt, category = row.get("prompt"), row.get("category", "")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInput(field, f"{where}: 'prompt' must be a non-empty string")
        if not isinstance(category, str):
            raise InvalidInput(field, f"{where}: 'category' must be a string")
        out.append(PromptRecord(prompt, category))
    if not out:
        raise InvalidInput(field, f"{path} holds no prompts")
    return out


# ------------------------------------------------------------------------------------ computation

@dataclass(frozen=True)
class DirectionSummary:
    direction: Direction
    n: int  # generations under this direction
    mean: dict[str, float]  # objective -> mean scaled (common-scale) reward
    se: dict[str, float]  # objective -> standard error of that mean
    mean_raw: dict[str, float]  # objective -> mean reward in the scorer's own units
    vr_mean: float  # mean of v . r (scaled r) over this direction's generations
    vr_se: float
    # mean v.r of this direction's generations minus mean v.r (same v) over every generation of the
    # evaluation: > 0 when responses written for v are better *by v's own measure* than the average.
    vr_gain: float
    mean_tokens: float
    finished: float  # share of generations that ended with end-of-turn rather than max_new_tokens

    def to_json(self) -> dict:
        return {
            "label": direction_label(self.direction), "weights": self.direction.as_dict(), "n": self.n,
            "mean": self.mean, "se": self.se, "mean_raw": self.mean_raw, "vr_mean": self.vr_mean, "vr_se": self.vr_se,
            "vr_gain": self.vr_gain, "mean_tokens": self.mean_tokens, "finished_fraction": self.finished,
        }


@dataclass(frozen=True)
class GenerationRecord:
    prompt_index: int
    direction_index: int
    sample: int
    text: str
    num_tokens: int
    finished: bool
    scaled: tuple[float, ...]  # in objectives order
    raw: tuple[float, ...]


@dataclass(frozen=True)
class SteerabilityResult:
    objectives: tuple[str, ...]
    directions: tuple[Direction, ...]
    summaries: tuple[DirectionSummary, ...]
    spearman: dict[str, float]  # objective -> rank correlation of requested weight and realised scaled reward
    records: tuple[GenerationRecord, ...]
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def mean_spearman(self) -> float:
        values = [v for v in self.spearman.values() if not math.isnan(v)]
        return math.fsum(values) / len(values) if values else float("nan")


def summarise(
    objectives: Sequence[str],
    directions: Sequence[Direction],
    direction_index: Sequence[int],
    scaled: Sequence[Sequence[float]],
    raw: Sequence[Sequence[float]] | None = None,
    num_tokens: Sequence[int] | None = None,
    finished: Sequence[bool] | None = None,
) -> tuple[list[DirectionSummary], dict[str, float]]:
    """Per-direction means and per-objective Spearman from per-generation rewards.

    ``direction_index[g]`` is the direction generation ``g`` was asked for; ``scaled[g]`` its
    common-scale reward vector in ``objectives`` order. Spearman pools every generation: x is the
    weight the request gave the objective, y the score its response got.
    """
    objectives = tuple(objectives)
    n, k = len(direction_index), len(objectives)
    raw = scaled if raw is None else raw
    num_tokens = [0] * n if num_tokens is None else num_tokens
    finished = [False] * n if finished is None else finished
    if not (len(scaled) == len(raw) == len(num_tokens) == len(finished) == n):
        raise ValueError("summarise: per-generation sequences differ in length")
    for d in directions:
        if d.objectives != objectives:
            raise InvalidInput("directions", f"direction over {list(d.objectives)} but the scorer scores {list(objectives)}")
    vr = [[d.dot(scaled[g]) for g in range(n)] for d in directions]  # vr[d][g] = v_d . r_g
    summaries = []
    for di, d in enumerate(directions):
        members = [g for g in range(n) if direction_index[g] == di]
        stats = {o: mean_and_se([scaled[g][j] for g in members]) for j, o in enumerate(objectives)}
        vr_mean, vr_se = mean_and_se([vr[di][g] for g in members])
        summaries.append(DirectionSummary(
            direction=d, n=len(members),
            mean={o: s[0] for o, s in stats.items()}, se={o: s[1] for o, s in stats.items()},
            mean_raw={o: mean_and_se([raw[g][j] for g in members])[0] for j, o in enumerate(objectives)},
            vr_mean=vr_mean, vr_se=vr_se, vr_gain=vr_mean - mean_and_se(vr[di])[0],
            mean_tokens=mean_and_se([num_tokens[g] for g in members])[0],
            finished=mean_and_se([float(finished[g]) for g in members])[0],
        ))
    rho = {
        o: spearman([directions[direction_index[g]].weights[j] for g in range(n)], [scaled[g][j] for g in range(n)])
        for j, o in enumerate(objectives)
    }
    return summaries, rho


def steerability(
    model,
    tokenizer,
    scorer,
    prompts: Sequence[str | Sequence[dict[str, str]]],
    directions: Sequence[Direction],
    params,
    *,
    num_samples: int = 1,
    batch_size: int = 16,
    score_batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> SteerabilityResult:
    """Generate for every (prompt, direction), score, and summarise.

    ``prompts`` are user messages or whole conversations (ending with the user's turn).
    ``scorer`` sees the plain conversation, never the direction line: it judges the answer to the
    user's request, not compliance with the system prompt. ``params`` is a SamplingParams.
    """
    import torch

    from steer.generation import generate_batch

    if not prompts:
        raise InvalidInput("prompts", "at least one prompt is required")
    if not directions:
        raise InvalidInput("directions", "at least one direction is required")
    objectives = tuple(scorer.objectives)
    for d in directions:
        if d.objectives != objectives:
            raise InvalidInput("directions", f"direction over {list(d.objectives)} but the scorer scores {list(objectives)}")
    conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else [dict(m) for m in p] for p in prompts]
    # Prompt-major order: rows of a batch share a prompt (same length), so left padding stays small.
    jobs = [(p, d) for p in range(len(conversations)) for d in range(len(directions))]
    started = time.monotonic()
    generated = generate_batch(
        model, tokenizer, [conversations[p] for p, _ in jobs], [directions[d] for _, d in jobs], params,
        num_samples=num_samples, batch_size=batch_size, seed=seed, progress=progress,
    )
    generate_s = time.monotonic() - started

    flat = [(p, d, s, gen) for (p, d), samples in zip(jobs, generated) for s, gen in enumerate(samples)]
    started = time.monotonic()
    raw_parts, scaled_parts = [], []
    chunks = range(0, len(flat), score_batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="score", unit="batch")
    for start in chunks:
        chunk = flat[start:start + score_batch_size]
        rewards = scorer.rewards([conversations[p] for p, _, _, _ in chunk], [g.text for *_, g in chunk])
        raw_parts.append(rewards.raw)
        scaled_parts.append(rewards.scaled)
    score_s = time.monotonic() - started
    raw = torch.cat(raw_parts).double().tolist()  # (n, k)
    scaled = torch.cat(scaled_parts).double().tolist()  # (n, k)

    records = tuple(
        GenerationRecord(p, d, s, g.text, len(g.token_ids), g.finished, tuple(scaled[i]), tuple(raw[i]))
        for i, (p, d, s, g) in enumerate(flat)
    )
    summaries, rho = summarise(
        objectives, directions, [r.direction_index for r in records], scaled, raw,
        [r.num_tokens for r in records], [r.finished for r in records],
    )
    tokens = sum(r.num_tokens for r in records)
    timing = {
        "generate_s": generate_s, "score_s": score_s, "generated_tokens": tokens,
        "generate_tokens_per_s": tokens / generate_s if generate_s > 0 else float("nan"),
    }
    return SteerabilityResult(objectives, tuple(directions), tuple(summaries), rho, records, timing)


# ---------------------------------------------------------------------------------------- reports

def format_table(result: SteerabilityResult) -> str:
    """A plain-text table: per direction mean ± se per objective and v.r; then the Spearman row."""
    names = result.objectives
    width = max(12, *(len(direction_label(d)) for d in result.directions)) + 2
    col = max(14, *(len(o) + 2 for o in names))
    head = f"{'direction':<{width}}{'n':>5}  " + "".join(f"{o:>{col}}" for o in names) + f"{'v.r':>{col}}{'v.r gain':>10}"
    lines = [head, "-" * len(head)]
    for s in result.summaries:
        cells = "".join(f"{_pm(s.mean[o], s.se[o]):>{col}}" for o in names)
        lines.append(f"{direction_label(s.direction):<{width}}{s.n:>5}  {cells}{_pm(s.vr_mean, s.vr_se):>{col}}{s.vr_gain:>+10.3f}")
    lines.append("-" * len(head))
    rho = "".join(f"{_num(result.spearman[o]):>{col}}" for o in names)
    lines.append(f"{'spearman(w, r)':<{width}}{'':>5}  {rho}{'mean ' + _num(result.mean_spearman):>{col}}")
    return "\n".join(lines)


def _num(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.3f}"


def _pm(mean: float, se: float) -> str:
    return _num(mean) if math.isnan(se) else f"{mean:+.2f}±{se:.2f}"


def _finite(obj):
    """JSON has no NaN: undefined statistics (a constant column, a single sample) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def result_to_json(result: SteerabilityResult, **extra) -> dict:
    return _finite({
        **extra,
        "objectives": list(result.objectives),
        "num_directions": len(result.directions),
        "num_generations": len(result.records),
        "spearman": result.spearman,
        "mean_spearman": result.mean_spearman,
        "directions": [s.to_json() for s in result.summaries],
        "timing": result.timing,
    })


def plot_steerability(result: SteerabilityResult, path: str | Path, title: str = "") -> Path:
    """One panel per pair of objectives (mean realised scaled reward per direction, ±1 se,
    labelled), and a bar chart of per-objective Spearman."""
    import matplotlib
    from matplotlib.figure import Figure  # object API: no pyplot state or GUI backend; saves with Agg

    pairs = list(combinations(range(len(result.objectives)), 2))
    panels = len(pairs) + 1
    fig = Figure(figsize=(4.6 * panels, 4.4), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    cmap = matplotlib.colormaps["viridis"]
    for ax, (a, b) in zip(axes, pairs):
        oa, ob = result.objectives[a], result.objectives[b]
        for i, s in enumerate(result.summaries):
            # Colour by how much of the direction goes to the x objective versus the y one.
            wa, wb = s.direction.weights[a], s.direction.weights[b]
            colour = cmap(wa / (wa + wb)) if wa + wb > 0 else "grey"
            xerr = None if math.isnan(s.se[oa]) else s.se[oa]
            yerr = None if math.isnan(s.se[ob]) else s.se[ob]
            ax.errorbar(s.mean[oa], s.mean[ob], xerr=xerr, yerr=yerr, fmt="o", color=colour, ecolor="lightgrey", capsize=2)
            ax.annotate(direction_label(s.direction), (s.mean[oa], s.mean[ob]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(f"{oa} (scaled)")
        ax.set_ylabel(f"{ob} (scaled)")
        ax.set_title(f"{oa} vs {ob}  (colour: weight share on {oa})", fontsize=9)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    values = [result.spearman[o] for o in result.objectives]
    shown = [0.0 if math.isnan(v) else v for v in values]
    bars = ax.bar(range(len(values)), shown, color=["tab:green" if v > 0 else "tab:red" for v in shown])
    for bar, v in zip(bars, values):
        ax.annotate(_num(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom" if bar.get_height() >= 0 else "top", fontsize=8)
    ax.set_xticks(range(len(values)), list(result.objectives), rotation=15)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_title("Spearman(requested weight, realised score)", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def write_report(result: SteerabilityResult, out_dir: str | Path, prompts: Sequence[PromptRecord] | None = None, **extra) -> dict[str, Path]:
    """steerability.json, steerability.png and generations.jsonl under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME, "plot": out / PLOT_NAME, "generations": out / GENERATIONS_NAME}
    doc = result_to_json(result, **extra, files={k: p.name for k, p in paths.items()})
    paths["json"].write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    with paths["generations"].open("w") as f:
        for r in result.records:
            row = {
                "prompt_index": r.prompt_index,
                "prompt": prompts[r.prompt_index].prompt if prompts else None,
                "category": prompts[r.prompt_index].category if prompts else None,
                "direction": result.directions[r.direction_index].as_dict(), "sample": r.sample, "text": r.text,
                "num_tokens": r.num_tokens, "finished": r.finished,
                "scaled": dict(zip(result.objectives, r.scaled)), "raw": dict(zip(result.objectives, r.raw)),
            }
            f.write(json.dumps(_finite(row), ensure_ascii=False, allow_nan=False) + "\n")
    plot_steerability(result, paths["plot"], title=str(extra.get("title", "")))
    return paths


# ------------------------------------------------------------------------------------ entry point

@dataclass(frozen=True)
class EvalConfig:
    """Every field is also a ``python -m steer.eval`` flag (``--field-name``)."""

    model: str = "default"  # policy: 'default', a model directory or a .gguf file
    adapter: str | None = None  # PEFT adapter on the policy; the scorer still runs on the base model
    scorer: str = "default"  # steer.rewards.build_scorer spec ('default', 'flr', a reward model dir, parts joined by '+')
    scorer_model: str | None = None  # run FLR on this model instead of the base policy model
    prompts: str | None = None  # JSONL prompt set; None: the shipped held-out split
    limit: int | None = None  # first N prompts only
    grid: str = DEFAULT_GRID  # 'default', 'corners', 'simplex:N' or explicit 'name=w,...;...'
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
    num_samples: int = 1  # responses per (prompt, direction)
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    seed: int = 0
    batch_size: int = 16  # generation rows per forward
    score_batch_size: int = 32  # (conversation, response) pairs per scorer call
    output: str = "runs/eval"

    def __post_init__(self):
        for name in ("model", "scorer", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise InvalidInput(name, "must be a non-empty string")
        for name in ("adapter", "scorer_model", "prompts"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidInput(name, "must be a non-empty string when given")
        for name, low in (("num_samples", 1), ("max_new_tokens", 1), ("batch_size", 1), ("score_batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidInput(name, f"must be an integer >= {low}, got {value!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise InvalidInput("limit", f"must be an integer >= 1 (or unset for every prompt), got {self.limit!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidInput("temperature", f"must be finite and >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InvalidInput("top_p", f"must be in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "objectives", validate_objectives(self.objectives))
        direction_grid(self.grid, self.objectives)  # raises InvalidInput("grid", ...) on a bad spec

    def sampling(self):
        from steer.sampling import SamplingParams

        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=float(self.temperature), top_p=float(self.top_p))


def load_policy_and_judge(model: str, adapter: str | None = None):
    """(policy, judge) LoadedModels: the policy carries the adapter; the judge is the base model,
    so rewards are measured by the same yardstick before and after training. Without an adapter
    they are one object."""
    from steer.models import load_model

    policy = load_model(model, adapter=adapter)
    judge = load_model(model) if adapter is not None else policy
    return policy, judge


def run_eval(config: EvalConfig, progress: bool = True) -> tuple[SteerabilityResult, dict[str, Path]]:
    """Load, generate, score, write the report; returns the result and the written paths."""
    from steer.rewards.build import build_scorer

    total_start = time.monotonic()
    prompts_path = Path(config.prompts) if config.prompts else default_prompts_path("heldout")
    prompts = load_prompts(prompts_path)[: config.limit]
    started = time.monotonic()
    policy, judge = load_policy_and_judge(config.model, config.adapter)
    scorer = build_scorer(config.scorer, judge, config.objectives, scorer_model=config.scorer_model)
    if scorer is None:
        raise InvalidInput("scorer", "an evaluation needs a scorer ('none' scores nothing)")
    load_s = time.monotonic() - started
    directions = direction_grid(config.grid, scorer.objectives)
    result = steerability(
        policy.model, policy.tokenizer, scorer, [p.prompt for p in prompts], directions, config.sampling(),
        num_samples=config.num_samples, batch_size=config.batch_size, score_batch_size=config.score_batch_size,
        seed=config.seed, progress=progress,
    )
    result.timing.update(load_s=load_s, total_s=time.monotonic() - total_start)
    title = f"{policy.model_id}" + (f" + {config.adapter}" if config.adapter else "") + f" | scorer {scorer.describe()}"
    paths = write_report(
        result, config.output, prompts,
        config={**asdict(config), "objectives": list(config.objectives)}, prompts_file=str(prompts_path),
        num_prompts=len(prompts), model_id=policy.model_id, adapter=config.adapter, scorer=scorer.describe(), title=title,
    )
    return result, paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m steer.eval", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = EvalConfig()
    p.add_argument("--model", default=d.model, help="policy: 'default' (embedded SmolLM2-135M-Instruct), a model directory or a .gguf file")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory for the policy (the scorer keeps the base model)")
    p.add_argument("--scorer", default=d.scorer, help="reward scorer spec: 'default' (FLR + length), 'flr', a reward model directory, or parts joined by '+'")
    p.add_argument("--scorer-model", default=None, help="run FLR on this model instead of the base policy model")
    p.add_argument("--prompts", default=None, help="JSONL prompt set (default: the shipped held-out split)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N prompts only")
    p.add_argument("--grid", default=d.grid, help="directions: 'default' (corners, uniform, pairwise 50/50), 'corners', 'simplex:N', or explicit 'helpfulness=1,creativity=1;conciseness=1'")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="responses per (prompt, direction)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="generation rows per forward")
    p.add_argument("--score-batch-size", type=int, default=d.score_batch_size, help="pairs per scorer call")
    p.add_argument("--output", default=d.output, help="directory for steerability.json/.png and generations.jsonl")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = EvalConfig(
            model=args.model, adapter=args.adapter, scorer=args.scorer, scorer_model=args.scorer_model,
            prompts=args.prompts, limit=args.limit, grid=args.grid, num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
            batch_size=args.batch_size, score_batch_size=args.score_batch_size, output=args.output,
        )
        result, paths = run_eval(config, progress=not args.no_progress)
    except (InvalidInput, FileNotFoundError) as e:
        print(f"steer.eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    t = result.timing
    print(f"\n{len(result.records)} generations in {t['generate_s']:.0f}s ({t['generate_tokens_per_s']:.0f} tok/s), "
          f"scored in {t['score_s']:.0f}s; total {t['total_s']:.0f}s")
    print(f"wrote {paths['json']}, {paths['plot']}, {paths['generations']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
