"""RLAIF: label pairs of responses by how much better each satisfies a set of principles, judged by the model.

The judge is FLR with principle follow-ups: a response scores the log-likelihood of a user
follow-up saying the principle was met ("Thanks, that was short and to the point.") minus one
saying it was not; a pair's margin is the mean over principles of the score difference.

Examples:
  python -m steer.train label --data prompts_with_responses.jsonl --principles runs/icai/principles.json --output runs/labels
  python -m steer.train label --data runs/icai/heldout.jsonl --principles runs/icai/principles.json --top 1 --output runs/icai-labels
  python -m steer.train label --data runs/icai/heldout.jsonl --principles runs/icai/principles.json --ids shorter --output runs/icai-shorter
  python -m steer.train label --data pairs.jsonl --principles steer/data/principles.json --min-margin 0.05 --output runs/rlaif
  python -m steer.train dpo --data runs/labels/pairs.jsonl --output runs/dpo-rlaif          # train on the labels

Input rows (JSONL or Parquet; other columns are ignored):
  {"prompt": "Explain DNS", "responses": ["...", "...", "..."]}      every pair of the responses is labelled
  {"prompt": [{"role": "user", "content": "..."}], "responses": [[{"role": "assistant", "content": "..."}], ...]}
  {"prompt": "...", "chosen": "...", "rejected": "..."}                TRL pair: its order is ignored, then compared

Principles (--principles): icai's principles.json or any steer.judged-principles/v1 file (entries with
text and a statement, or positive and negative follow-ups; see steer.training.judged_principles), or a
steer.principles/v1 file (each objective judged by FLR's follow-ups for it). --top N keeps the first N,
--ids ID... the ones named (an unknown id is an error naming the file and its ids).

Output: <output>/pairs.jsonl (TRL rows with margin, per-principle scores, source row and, for input
pairs, agrees_with_input), summary.json (counts, skipped pairs by reason, share of input labels
reproduced), config.yaml. A bad row stops with file:line: column: reason.
"""

from __future__ import annotations

import sys

PROG = "python -m steer.train label"


def main(argv: list[str] | None = None) -> int:
    from steer.errors import InvalidInput
    from steer.training.config import parse_config
    from steer.training.judge_settings import LabelConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    parts = __doc__.split("\n\n")
    config = parse_config(LabelConfig, argv, prog=PROG, description="\n\n".join(parts[:2]), epilog="\n\n".join(parts[2:]))
    from steer.logs import configure_logging
    from steer.training.label import run_label

    configure_logging(config.log_level)
    try:
        summary = run_label(config)
    except InvalidInput as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    skipped = summary["skipped"]
    print(f"labelled {summary['written']} of {summary['pairs']} pairs from {summary['rows']} rows "
          f"(skipped: {skipped['margin']} below --min-margin, {skipped['equal']} equal texts) -> {config.output}/pairs.jsonl")
    if summary["input_pairs"]:
        print(f"reproduced {summary['reproduced']} of {summary['input_pairs']} input labels ({summary['reproduced_share']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
