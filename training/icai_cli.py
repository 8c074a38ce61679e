"""Inverse Constitutional AI: find the principles that explain a set of preference pairs.

Each candidate principle (the shipped library steer/data/icai_candidates.json, plus --candidates
files) judges every pair through the model (--judge instruction, the default: how much more likely
the model makes a response under the principle's instructions than under its counter-instructions;
--judge followup: FLR, the log-likelihood of a follow-up saying the principle was met minus one
saying it was not); its agreement is the share of pairs whose label it reproduces (a tie counts as
disagreement). Ranked on the train split, reported on the held-out one;
of two principles that judge alike on >= --redundancy of the pairs only the better is kept.

Examples:
  python -m steer.train icai --data training/data/icai_example.jsonl --output runs/icai      # the worked example
  python -m steer.train icai --data pairs.jsonl --candidates my_candidates.json --output runs/icai
  python -m steer.train icai --data pairs.jsonl --candidates mine.json --no-library --heldout-fraction 0.3 --seed 1\
 --output runs/icai
  python -m steer.train label --data runs/icai/heldout.jsonl --principles runs/icai/principles.json --top 1\
 --output runs/icai-labels

Data rows: TRL pairs {"prompt": text or messages, "chosen": ..., "rejected": ...} (JSONL or Parquet).
Candidate files: steer.judged-principles/v1 ({"principles": [{"id", "text", "statement", "opposite",
"instructions", "counter_instructions"}]}, or positive/negative follow-ups instead of a statement) or
steer.principles/v1. Concrete instructions ("Answer in one short sentence.") judge far better than
the "Make your answer {statement}." the statement alone gives.

Output: <output>/principles.json (kept principles, best first, with agreement, coverage,
train_agreement, train_coverage: what `label --principles` reads), report.json (every candidate,
its status: kept, redundant (with which) or weak), report.png, train.jsonl and heldout.jsonl (the
split), scores.jsonl (each principle's score of both responses of every pair), config.yaml.
"""

from __future__ import annotations

import sys

PROG = "python -m steer.train icai"


def main(argv: list[str] | None = None) -> int:
    from steer.training.config import run_command
    from steer.training.judge_settings import ICAIConfig

    return run_command(ICAIConfig, argv, prog=PROG, doc=__doc__, run="steer.training.icai:run_icai", report=_report)


def _report(config, report: dict) -> None:
    print(f"{report['pairs']} pairs ({report['train_pairs']} train, {report['heldout_pairs']} held out); "
          f"{report['kept']} of {len(report['candidates'])} candidates kept -> {config.output}/principles.json")
    print(f"{'status':<10} {'held-out agr':>12} {'coverage':>9} {'train agr':>10}  principle")
    for row in report["candidates"]:
        print(f"{row['status']:<10} {row['agreement']:>12.3f} {row['coverage']:>9.3f} {row['train_agreement']:>10.3f}  "
              f"{row['id']}: {row['text']}" + (f" (~ {row['redundant_with']})" if row["status"] == "redundant" else ""))


if __name__ == "__main__":
    sys.exit(main())
