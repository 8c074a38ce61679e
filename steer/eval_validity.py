"""Judge validity: can a judge tell answers written *for* an objective from answers written *against* it?

A steerability figure is only as good as its judge. A judge that cannot separate the base model's
answers under "Answer with whimsy and originality ..." from its answers under "Write in a flat,
formal, impersonal style ..." cannot show creativity steering either, whatever the policy does.

This command reads the principle-guided samples of a ``dpa`` or ``mixture`` run
(``iterations/<k>/samples.jsonl``: base-model answers under instructions for and against a
direction, see steer.principles). An answer counts as *positive* for an objective when its
instruction holds one of that objective's positive instructions, *negative* when it holds one of its
negative ones (a mixed direction's instruction can label several objectives). Per judge and
objective it reports the AUC, P(score of a positive answer > score of a negative one), ties counting
half: 0.5 is a judge blind to the objective, 1 one that orders every such pair. The 95% interval
resamples the positive and the negative answers (seeded bootstrap). Every answer is judged on the
user's prompt alone, as ``python -m steer.eval`` judges. Judges: ``heldout`` (the evaluation's
headline judge: held-out FLR follow-ups, minus the token count for conciseness) and ``training``
(``--scorer``, what DPA pairs by).

Examples:
  python -m steer.eval_validity --samples runs/mixture/iterations/000/samples.jsonl \\
      --prompts training/data/prompts.jsonl --output runs/judge-validity.json
  python -m steer.eval_validity --samples s.jsonl --prompts p.jsonl --judges heldout --objectives creativity
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steer.config import option, require_choice, require_int, run_command
from steer.errors import InvalidInput
from steer.eval_report import HELDOUT, TRAINING
from steer.files import atomic_write_text, json_lines
from steer.logs import LEVELS
from steer.models import DEVICES
from steer.objectives import DEFAULT_OBJECTIVES, validate_objectives

PROG = "python -m steer.eval_validity"
JUDGES = (HELDOUT, TRAINING)
LABELLED_SOURCES = ("guided", "contrast")  # steer.training.dpa_data's base-model candidates


@dataclass(frozen=True)
class ValidityConfig:
    """Every field is also a ``python -m steer.eval_validity`` flag (``--field-name``)."""

    samples: str = field(default="", metadata=option("samples.jsonl of a dpa or mixture run (guided and "
                                                     "contrast answers with their instructions)"))
    prompts: str = field(default="", metadata=option("the run's JSONL prompt set (samples name prompts by index)"))
    principles: str | None = field(default=None, metadata=option(
        "the run's principles file", unset="the packaged steer/data/principles.json"))
    objectives: tuple[str, ...] = field(default=DEFAULT_OBJECTIVES, metadata=option(
        "objectives to check", metavar="OBJECTIVE"))
    judges: tuple[str, ...] = field(default=JUDGES, metadata=option("judges to check", metavar="JUDGE"))
    model: str = field(default="default", metadata=option("the judges' model: 'default', a directory or a .gguf"))
    scorer: str = field(default="default", metadata=option("the training judge: a steer.serve --scorer spec"))
    device: str = field(default="auto", metadata=option("where the judge model runs", choices=DEVICES))
    batch_size: int = field(default=16, metadata=option("answers per judge call"))
    bootstrap: int = field(default=1000, metadata=option("bootstrap resamples of the interval"))
    seed: int = field(default=0, metadata=option("seed of the bootstrap"))
    output: str | None = field(default=None, metadata=option("write the result as JSON here", unset="print only"))
    log_level: str = field(default="WARNING", metadata=option("what the command logs to stderr", choices=LEVELS))

    def __post_init__(self):
        for name in ("samples", "prompts"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise InvalidInput(name, "is required: a JSONL file path")
        object.__setattr__(self, "objectives", validate_objectives(self.objectives, "objectives"))
        if not self.judges:
            raise InvalidInput("judges", f"name at least one of {list(JUDGES)}")
        for j in self.judges:
            require_choice("judges", j, JUDGES)
        require_int("batch_size", self.batch_size, 1)
        require_int("bootstrap", self.bootstrap, 1)
        require_choice("log_level", self.log_level, LEVELS)


def label_instruction(instruction: str, principles) -> dict[str, str]:
    """``{objective: "positive" | "negative"}`` for the principle texts ``instruction`` is made of
    (``Principles.instruction`` joins one per chosen objective with a space); ``{}`` when it is not
    made of them."""
    texts = {t: (o, pol) for o, by_pol in principles.objectives.items() for pol, ts in by_pol.items() for t in ts}
    out, rest = {}, instruction
    while rest:
        match = max((t for t in texts if rest.startswith(t)), key=len, default=None)
        if match is None:
            return {}
        o, pol = texts[match]
        out[o] = pol
        rest = rest[len(match):].lstrip()
    return out


def auc(positive, negative) -> float:
    """P(positive > negative) over every pair, ties counting half (the Mann-Whitney U / (n_p n_n))."""
    p, n = np.asarray(positive, dtype=np.float64)[:, None], np.asarray(negative, dtype=np.float64)[None, :]
    return float((p > n).mean() + 0.5 * (p == n).mean())


def auc_interval(positive, negative, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile 95% interval of :func:`auc`, resampling each group with replacement."""
    rng = np.random.default_rng(seed)
    p, n = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    stats = [auc(p[rng.integers(len(p), size=len(p))], n[rng.integers(len(n), size=len(n))]) for _ in range(resamples)]
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def read_labelled_samples(path: str | Path, n_prompts: int, principles) -> list[dict]:
    """The guided and contrast rows of ``path`` with their labels; errors name file:line."""
    out = []
    for lineno, row in json_lines(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise InvalidInput("samples", f"{where}: a row must be a JSON object")
        if row.get("source") not in LABELLED_SOURCES:
            continue  # on-policy samples answer no instruction
        for key, kind in (("prompt_index", int), ("instruction", str), ("response", str), ("tokens", int)):
            if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                raise InvalidInput("samples", f"{where}: {key} must be a {kind.__name__} (a dpa samples.jsonl row)")
        if not 0 <= row["prompt_index"] < n_prompts:
            raise InvalidInput("samples", f"{where}: prompt_index {row['prompt_index']} is outside the "
                                          f"{n_prompts} prompts of --prompts")
        out.append({**row, "labels": label_instruction(row["instruction"], principles)})
    return out


def _build_judge(name: str, config: ValidityConfig, loaded):
    from steer.eval_judges import ScorerJudge, build_heldout_judge
    from steer.rewards.build import build_scorer

    if name == HELDOUT:
        return build_heldout_judge(loaded, config.objectives, batch_size=config.batch_size, progress=True)
    scorer = build_scorer(config.scorer, loaded, config.objectives, calibration="none", field="scorer")
    if scorer is None:
        raise InvalidInput("scorer", "the training judge needs a scorer; drop 'training' from --judges instead")
    return ScorerJudge(scorer, batch_size=config.batch_size, progress=True)


def run_validity(config: ValidityConfig, judges: dict | None = None) -> dict:
    """The AUC table (see the module docstring); ``judges`` (name -> judge) replaces the built ones."""
    from steer.eval_grid import load_prompts
    from steer.principles import load_principles

    if not Path(config.samples).is_file():
        raise InvalidInput("samples", f"{config.samples}: no such file")
    principles = load_principles(config.principles)
    prompts = load_prompts(config.prompts, field="prompts")
    rows = read_labelled_samples(config.samples, len(prompts), principles)
    labelled = [r for r in rows if r["labels"]]
    if not labelled:
        raise InvalidInput("samples", f"{config.samples} holds no guided or contrast answer whose instruction comes "
                                      "from the principles (is --principles the run's file?)")
    if judges is None:
        from steer.models import load_model

        loaded = load_model(config.model, adapter="none", device=config.device)
        judges = {name: _build_judge(name, config, loaded) for name in config.judges}
    conversations = [[{"role": "user", "content": prompts[r["prompt_index"]].prompt}] for r in labelled]
    texts, tokens = [r["response"] for r in labelled], [r["tokens"] for r in labelled]
    result = {"samples": str(config.samples), "answers": len(labelled), "unlabelled": len(rows) - len(labelled),
              "judges": {}}
    for name, judge in judges.items():
        scores = judge.score(conversations, texts, tokens)  # (n, k) in judge.objectives' order
        per_objective = {}
        for o in config.objectives:
            column = scores[:, list(judge.objectives).index(o)]
            pos = [s for s, r in zip(column, labelled) if r["labels"].get(o) == "positive"]
            neg = [s for s, r in zip(column, labelled) if r["labels"].get(o) == "negative"]
            entry = {"n_positive": len(pos), "n_negative": len(neg), "auc": None, "ci95": None}
            if pos and neg:
                entry["auc"] = auc(pos, neg)
                entry["ci95"] = list(auc_interval(pos, neg, config.bootstrap, config.seed))
            per_objective[o] = entry
        result["judges"][name] = {"describe": judge.describe(), "objectives": per_objective}
    if config.output:
        atomic_write_text(config.output, json.dumps(result, indent=1) + "\n")
    return result


def format_validity(result: dict) -> str:
    lines = [f"{result['answers']} labelled answers ({result['unlabelled']} without a known instruction)",
             f"{'judge':<10} {'objective':<13} {'AUC':>5}  95% interval   positive/negative"]
    for name, judge in result["judges"].items():
        for o, e in judge["objectives"].items():
            figure = (f"{e['auc']:5.2f}  [{e['ci95'][0]:.2f}, {e['ci95'][1]:.2f}]" if e["auc"] is not None
                      else "    -  (needs both)  ")
            lines.append(f"{name:<10} {o:<13} {figure}   {e['n_positive']}/{e['n_negative']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def report(config, result):
        print(format_validity(result))
        if config.output:
            print(f"wrote {config.output}")

    return run_command(ValidityConfig, argv, prog=PROG, doc=__doc__, run=run_validity, report=report,
                       description_paragraphs=3)


if __name__ == "__main__":
    sys.exit(main())
