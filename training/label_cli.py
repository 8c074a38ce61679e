"""RLAIF: label pairs of responses by how much better each satisfies a set of principles, judged by the model.

The judge (--judge) is the model: by default a response scores how much more likely the model makes
it under the principle's instructions ("Answer in one short sentence.") than under its
counter-instructions ("Answer in detail, ..."); with --judge followup, the log-likelihood of a user
follow-up saying the principle was met ("Thanks, that was short and to the point.") minus one
saying it was not (FLR). A pair's margin is the mean over principles of the score difference.

Examples:
  python -m steer.train label --data prompts_with_responses.jsonl --principles runs/icai/principles.json\
 --output runs/labels
  python -m steer.train label --data runs/icai/heldout.jsonl --principles runs/icai/principles.json --top 1\
 --output runs/icai-labels
  python -m steer.train label --data runs/icai/heldout.jsonl --principles runs/icai/principles.json --ids shorter\
 --output runs/icai-shorter
  python -m steer.train label --data pairs.jsonl --principles steer/data/principles.json --min-margin 0.05\
 --output runs/rlaif
  python -m steer.train dpo --data runs/labels/pairs.jsonl --output runs/dpo-rlaif          # train on the labels

Input rows (JSONL or Parquet; other columns are ignored):
  {"prompt": "Explain DNS", "responses": ["...", "...", "..."]}      every pair of the responses is labelled
  {"prompt": [{"role": "user", "content": "..."}], "responses": [[{"role": "assistant", "content": "..."}], ...]}
  {"prompt": "...", "chosen": "...", "rejected": "..."}                TRL pair: its order is ignored, then compared

Principles (--principles): icai's principles.json or any steer.judged-principles/v1 file (entries with
text and a statement, or positive and negative follow-ups, and optional instructions /
counter_instructions; see steer.training.judged_principles), or a steer.principles/v1 file (each
objective judged by its instructions, or by FLR's follow-ups for it). --top N keeps the first N,
--ids ID... the ones named (an unknown id is an error naming the file and its ids).

Output: <output>/pairs.jsonl (TRL rows with margin, per-principle scores, source row and, for input
pairs, agrees_with_input), summary.json (counts, skipped pairs by reason, share of input labels
reproduced), config.yaml. A bad row stops with file:line: column: reason.
"""

from __future__ import annotations

import sys

PROG = "python -m steer.train label"


def main(argv: list[str] | None = None) -> int:
    from steer.training.config import run_command
    from steer.training.judge_settings import LabelConfig

    return run_command(LabelConfig, argv, prog=PROG, doc=__doc__, run="steer.training.label:run_label", report=_report)


def _report(config, summary: dict) -> None:
    skipped = summary["skipped"]
    print(f"labelled {summary['written']} of {summary['pairs']} pairs from {summary['rows']} rows "
          f"(skipped: {skipped['margin']} below --min-margin, {skipped['equal']} equal texts) "
          f"-> {config.output}/pairs.jsonl")
    if summary["input_pairs"]:
        print(f"reproduced {summary['reproduced']} of {summary['input_pairs']} input labels "
              f"({summary['reproduced_share']:.3f})")


if __name__ == "__main__":
    sys.exit(main())
