"""Inverse Constitutional AI: which principles explain a set of preferences?

ICAI (Findeis et al., 2024, "Inverse Constitutional AI: Compressing Preferences into Principles",
arXiv 2406.06560) turns pairwise preference data into a short list of plain-language principles
that an AI judge, following them, would reproduce the data with. The paper proposes candidates
with an LLM from the training pairs, deduplicates them, tests each one by how often the judge
following it agrees with the human label, filters, and reports agreement on held-out pairs.
Here the candidates come from a library (``steer/data/icai_candidates.json`` plus
``--candidates`` files), and the judge is the model itself (:mod:`steer.rewards.principle_judge`,
``--judge``): a principle's score of a response is, by default, how much more likely the model
makes the response (end of turn included) under the principle as an instruction than under its
opposite; with ``--judge followup``, the log-likelihood of a follow-up saying the principle was
met minus one saying it was not (FLR).

**Judgement and agreement.** For pair ``i`` (``chosen`` preferred to ``rejected``) and principle
``p``, ``d_ip = score_p(chosen) - score_p(rejected)``; the principle's judgement is ``+1`` when
``d_ip > eps`` (it prefers the chosen response), ``-1`` when ``d_ip < -eps``, ``0`` (a tie)
otherwise (``eps = --tie-epsilon``). Over a set of pairs:

* ``agreement`` = share of pairs judged ``+1`` (ties count as disagreement),
* ``coverage`` = share judged ``!= 0`` (the principle had an opinion).

**Split.** The pairs are split once, seeded (``--seed``), into a held-out share
(``--heldout-fraction``) and the train split. ``agreement`` / ``coverage`` in the outputs are on the
held-out split, ``train_agreement`` / ``train_coverage`` on the train split.

**Ranking.** Principles are ranked by agreement on the ``--rank-by`` split (default ``train``),
then by coverage there, then by their order in the candidate files. Ranking on the train split
keeps the held-out figure of the chosen principles an honest estimate: choosing the best of many
candidates *by* their held-out agreement would report the luckiest of them.

**Redundancy.** Two principles are redundant when their judgements (+1 / -1 / 0) are equal on at
least ``--redundancy`` (default 0.9) of the ranking split's pairs. Going down the ranking, a
principle is kept unless it is redundant with one already kept (then it is dropped and
``redundant_with`` names that better one), or its agreement is below ``--min-agreement``
(``weak``). So of two near-synonyms the better-ranked survives; a principle and its opposite are
never redundant (their judgements differ wherever either has an opinion).

Outputs (``--output DIR``): ``principles.json`` (the kept principles, best first, in the format
``label --principles`` reads, follow-ups written out), ``report.json`` (every candidate with its
figures, status and the settings), ``report.png``, ``train.jsonl`` / ``heldout.jsonl`` (the split,
rows as read), ``scores.jsonl`` (per pair, each principle's score of both responses),
``config.yaml``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steer.errors import InvalidInput
from steer.files import atomic_file, atomic_write_text
from steer.rewards.principle_judge import JudgedPrinciple, check_judgeable

from .pairs import PairExample, parse_row, read_rows

log = logging.getLogger(__name__)

KEPT, REDUNDANT, WEAK = "kept", "redundant", "weak"


# -- the arithmetic ---------------------------------------------------------------------------

def judgements(differences: np.ndarray, eps: float) -> np.ndarray:
    """``(n, P)`` score differences (chosen - rejected) -> ``(n, P)`` int8 judgements in {+1, -1, 0}."""
    d = np.asarray(differences, dtype=np.float64)
    return np.where(d > eps, 1, np.where(d < -eps, -1, 0)).astype(np.int8)


def agreement(j: np.ndarray) -> np.ndarray:
    """``(P,)``: share of pairs each principle judges as the data does (+1); ties disagree."""
    return (j == 1).mean(axis=0) if len(j) else np.full(j.shape[1], np.nan)


def coverage(j: np.ndarray) -> np.ndarray:
    """``(P,)``: share of pairs on which each principle is not tied."""
    return (j != 0).mean(axis=0) if len(j) else np.full(j.shape[1], np.nan)


def judgement_overlap(j: np.ndarray) -> np.ndarray:
    """``(P, P)``: share of pairs on which two principles' judgements are equal (a tie equals a tie)."""
    return (j[:, :, None] == j[:, None, :]).mean(axis=0)  # (n, P, P) -> (P, P)


def split_pairs(n: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, heldout)`` sorted index arrays: a seeded permutation, ``round(n * fraction)`` held out
    (at least one pair in each split)."""
    if n < 2:
        raise InvalidInput("data", f"has {n} pair(s); icai needs at least 2 (one for each split)")
    held = min(max(int(round(n * heldout_fraction)), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


@dataclass(frozen=True)
class Ranked:
    """One candidate after ranking: its index in the candidate list, status and position."""

    index: int
    status: str  # kept | redundant | weak
    redundant_with: int | None = None  # index of the kept principle it duplicates
    overlap: float | None = None  # their judgement overlap


def rank_principles(rank_j: np.ndarray, *, redundancy: float, min_agreement: float) -> list[Ranked]:
    """Every candidate, best first by (agreement, coverage) on ``rank_j``'s pairs, with its status
    (module docstring)."""
    a, c = agreement(rank_j), coverage(rank_j)
    overlap = judgement_overlap(rank_j)
    order = sorted(range(rank_j.shape[1]), key=lambda p: (-a[p], -c[p], p))
    kept: list[int] = []
    out = []
    for p in order:
        if a[p] < min_agreement:
            out.append(Ranked(p, WEAK))
            continue
        twin = next((q for q in kept if overlap[p, q] >= redundancy), None)
        if twin is not None:
            out.append(Ranked(p, REDUNDANT, twin, float(overlap[p, twin])))
            continue
        kept.append(p)
        out.append(Ranked(p, KEPT))
    return out


# -- data -------------------------------------------------------------------------------------

def read_pairs(paths: Sequence[str]) -> list[tuple[PairExample, dict]]:
    """Every row of every file as ``(pair, row as read)``; a row that is not a preference pair stops at
    its file:line."""
    out = []
    for path in paths:
        for where, row in read_rows(path):
            example = parse_row(row, where)
            if not isinstance(example, PairExample):
                raise InvalidInput(where, "is an unpaired (KTO) row; icai needs preference pairs "
                                          "{prompt, chosen, rejected}")
            out.append((example, {k: v for k, v in dict(row).items() if v is not None}))
    return out


def pair_differences(judge, pairs: Sequence[PairExample]) -> tuple[np.ndarray, np.ndarray]:
    """``(chosen scores, rejected scores)``, each ``(n, P)``, from the judge."""
    from .judging import score_responses

    conversations = [p.prompt for p in pairs for _ in range(2)]
    responses = [r for p in pairs for r in (p.chosen, p.rejected)]
    scores = score_responses(judge, conversations, responses)  # (2n, P)
    return scores[0::2], scores[1::2]


# -- the command ------------------------------------------------------------------------------

def _figures(j: np.ndarray) -> tuple[list[float], list[float]]:
    return agreement(j).tolist(), coverage(j).tolist()


def run_icai(config, make_judge=None) -> dict:
    """The ``icai`` command on an :class:`~steer.training.judge_settings.ICAIConfig`; returns report.json's content.

    ``make_judge(config, principles) -> (judge, model id)`` builds the judge once every input has
    been read (default :func:`steer.training.judging.load_judge`; tests pass a stub with ``principles``
    and ``scores(conversations, responses)``)."""
    from .config import write_config
    from .judged_principles import read_candidates, write_principles_file
    from .output_dir import check_output_dir

    started = time.monotonic()
    output = check_output_dir(config.output)
    rows = read_pairs(config.data)
    pairs = [p for p, _ in rows]
    candidates: list[JudgedPrinciple] = read_candidates(config.candidates, library=config.library)
    train_idx, held_idx = split_pairs(len(pairs), config.heldout_fraction, config.seed)
    log.info("%d pairs (%d train, %d held out), %d candidate principles", len(pairs), len(train_idx), len(held_idx),
             len(candidates))
    check_judgeable(candidates, config.judge)
    if make_judge is None:
        from .judging import load_judge as make_judge
    judge, model_id = make_judge(config, candidates)
    chosen, rejected = pair_differences(judge, pairs)
    j = judgements(chosen - rejected, config.tie_epsilon)  # (n, P)
    train_j, held_j = j[train_idx], j[held_idx]
    ranked = rank_principles(train_j if config.rank_by == "train" else held_j, redundancy=config.redundancy,
                             min_agreement=config.min_agreement)
    held_a, held_c = _figures(held_j)
    train_a, train_c = _figures(train_j)

    def figures(p: int) -> dict:
        return {"agreement": held_a[p], "coverage": held_c[p], "train_agreement": train_a[p],
                "train_coverage": train_c[p]}

    entries, report_rows = [], []
    for r in ranked:
        cand = candidates[r.index]
        row = {"id": cand.id, "text": cand.text, "status": r.status, **figures(r.index), "source": cand.source}
        if r.status == KEPT:
            row["rank"] = len(entries) + 1
            entries.append({**cand.to_dict(), **figures(r.index), "rank": row["rank"], "source": cand.source})
        if r.status == REDUNDANT:
            row["redundant_with"], row["overlap"] = candidates[r.redundant_with].id, r.overlap
        report_rows.append(row)
    overlap = judgement_overlap(train_j if config.rank_by == "train" else held_j)
    report = {
        "model": model_id, "judge": config.judge, "data": list(config.data), "pairs": len(pairs),
        "train_pairs": len(train_idx),
        "heldout_pairs": len(held_idx), "seed": config.seed, "heldout_fraction": config.heldout_fraction,
        "rank_by": config.rank_by, "tie_epsilon": config.tie_epsilon, "redundancy": config.redundancy,
        "min_agreement": config.min_agreement, "kept": len(entries),
        "candidates": report_rows,
        "judgement_overlap": {"split": config.rank_by, "ids": [c.id for c in candidates],
                              "matrix": np.round(overlap, 4).tolist()},
        "seconds": round(time.monotonic() - started, 1),
    }
    output.mkdir(parents=True, exist_ok=True)
    if not entries:
        log.warning("no principle reached --min-agreement %.2f on the %s split: principles.json is empty",
                    config.min_agreement, config.rank_by)
    write_principles_file(output / "principles.json", entries, description=(
        f"Principles found by python -m steer.train icai on {', '.join(config.data)}: "
        f"best first by {config.rank_by} agreement; agreement and coverage are on the held-out split."))
    atomic_write_text(output / "report.json", json.dumps(report, indent=2) + "\n")
    for name, idx in (("train", train_idx), ("heldout", held_idx)):
        atomic_write_text(output / f"{name}.jsonl", "".join(json.dumps(rows[i][1], ensure_ascii=False) + "\n"
                                                             for i in idx))
    split_of = np.empty(len(pairs), dtype=object)
    split_of[train_idx], split_of[held_idx] = "train", "heldout"
    with atomic_file(output / "scores.jsonl") as tmp, tmp.open("w", encoding="utf-8") as f:
        for i, p in enumerate(pairs):
            f.write(json.dumps({"where": p.where, "split": split_of[i],
                                "chosen": {c.id: round(float(chosen[i, k]), 6) for k, c in enumerate(candidates)},
                                "rejected": {c.id: round(float(rejected[i, k]), 6)
                                             for k, c in enumerate(candidates)}}) + "\n")
    plot_report(report, output / "report.png")
    write_config(config, output / "config.yaml")
    return report


def plot_report(report: dict, path: str | Path) -> Path:
    """Held-out and train agreement and held-out coverage of every candidate, in ranked order."""
    from matplotlib.figure import Figure  # object API, no GUI backend: saves with Agg

    rows = report["candidates"]
    colour = {KEPT: "tab:green", REDUNDANT: "tab:grey", WEAK: "tab:red"}
    fig = Figure(figsize=(8, 1.3 + 0.32 * len(rows)), layout="constrained")
    ax = fig.subplots()
    ys = np.arange(len(rows))[::-1]  # best at the top
    ax.barh(ys, [r["agreement"] for r in rows], color=[colour[r["status"]] for r in rows], alpha=0.8,
            label="held-out agreement")
    ax.scatter([r["train_agreement"] for r in rows], ys, marker="|", s=200, color="black", label="train agreement",
               zorder=3)
    ax.scatter([r["coverage"] for r in rows], ys, marker="o", s=14, facecolors="none", edgecolors="tab:blue",
               label="held-out coverage", zorder=3)
    ax.axvline(0.5, color="black", linewidth=0.8, linestyle="--")
    ax.set_yticks(ys, [f"{r['id']} ({r['status']})" for r in rows], fontsize=8)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel(f"share of pairs ({report['heldout_pairs']} held out, {report['train_pairs']} train)")
    ax.set_title(f"ICAI: candidate principles ranked by {report['rank_by']} agreement", fontsize=10)
    fig.legend(fontsize=7, loc="outside lower center", ncols=3)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return Path(path)
