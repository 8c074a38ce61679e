"""Directional Preference Alignment: sample directions and responses, score them, pair, train; repeat.

Each iteration draws prompts and directions (a share of corners, the rest Dirichlet mixes),
builds a candidate pool per (prompt, direction): samples of the current policy under the direction
line, and (principle-guided) samples of the base model under plain-language instructions for and
against the direction; scores every candidate with the reward vector r, pairs the best and worst
by v . r, and trains on the prompt that carries the direction line only.

Examples:
  python -m steer.train dpa --output runs/dpa                                   \
# packaged prompts and principles, FLR + length
  python -m steer.train dpa --config training/recipes/default-adapter.yaml --output runs/default-adapter   \
# the shipped adapter, stage 1
  python -m steer.train dpa --config training/recipes/default-adapter-rlcd.yaml --output runs/default-adapter-rlcd   \
# stage 2
  python -m steer.train dpa --guided-samples 0 --contrast-samples 0 --samples 4 --output runs/plain   \
# plain on-policy DPA
  python -m steer.train dpa --principles my_principles.json --guided-samples 3 --output runs/dpa   # your own principles
  python -m steer.train dpa --end-ramp-bias 0 --max-new-tokens 512 --output runs/dpa-long   # no end-of-turn ramp
  python -m steer.train dpa --scorer flr --iterations 4 --samples 4 --output runs/dpa-flr
  python -m steer.train dpa --scorer runs/rm --loss ipo --output runs/dpa-rm    # a trained reward model
  python -m steer.train dpa --loss sft --samples 8 --output runs/rft            # rejection-sampling fine-tuning
  python -m steer.train dpa --loss distill --samples 0 --guided-samples 1 --contrast-samples 1 --corner-pairs \
--output runs/distill
                                                                                # context distillation of the \
principles into the line
  python -m steer.train dpa --prompts my_prompts.jsonl --prompts-per-iteration 64 --max-new-tokens 96 --output runs/dpa
  python -m steer.train dpa --config dpa.yaml --resume
  python -m steer.train dpa --init-adapter default --pair-by instruction --samples 0 --output runs/more \
# continue from the shipped adapter
  torchrun --nproc_per_node 2 -m steer.train dpa --output runs/dpa-ddp

Prompt rows (JSONL or Parquet): {"prompt": "Explain DNS"} or {"prompt": [{"role": "user", "content": "..."}]}.

Output: <output>/adapter (serve it: python -m steer.serve --adapter <output>/adapter), metrics.jsonl,
training_curve.png, config.yaml, checkpoints/, and per iteration iterations/<k>/samples.jsonl and
pairs.jsonl (directions, responses, reward vectors and v . r: the run can be audited, and the pairs
re-used with `python -m steer.train dpo --data .../pairs.jsonl`).
"""

from __future__ import annotations

import sys

PROG = "python -m steer.train dpa"


def main(argv: list[str] | None = None) -> int:
    from steer.training.config import report_saved, run_command
    from steer.training.settings import DPAConfig

    return run_command(DPAConfig, argv, prog=PROG, doc=__doc__, run="steer.training.dpa:run_dpa", report=report_saved)


if __name__ == "__main__":
    sys.exit(main())
