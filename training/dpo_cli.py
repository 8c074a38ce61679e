"""Preference-optimise a policy on TRL-format pairs: DPO (sigmoid), IPO, hinge, SimPO, ORPO, KTO.

Examples:
  python -m steer.train dpo --data pairs.jsonl --output runs/dpo
  python -m steer.train dpo --data pairs.jsonl --loss simpo --beta 2.0 --gamma 1.0 --output runs/simpo
  python -m steer.train dpo --data kto.jsonl --loss kto --output runs/kto           # prompt/completion/label rows
  python -m steer.train dpo --data pairs.parquet --full --lr 1e-6 --output runs/dpo-full
  python -m steer.train dpo --config dpo.yaml --lora-r 32                           # flags override the YAML
  python -m steer.train dpo --config dpo.yaml --resume                              # continue after a crash
  torchrun --nproc_per_node 2 -m steer.train dpo --data pairs.jsonl --output runs/dpo-ddp

Data rows (JSONL or Parquet; other columns are ignored):
  {"prompt": "Explain DNS", "chosen": "...", "rejected": "..."}
  {"prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
   "chosen": [{"role": "assistant", "content": "..."}], "rejected": [{"role": "assistant", "content": "..."}]}
  {"prompt": "...", "completion": "...", "label": true}                                (KTO)

Output: <output>/adapter (a PEFT adapter: python -m steer.serve --adapter <output>/adapter) or
<output>/model with --full; metrics.jsonl, training_curve.png, config.yaml, checkpoints/.
A YAML config holds the same keys as the flags, with underscores (lora_r: 16).
"""

from __future__ import annotations

import sys

PROG = "python -m steer.train dpo"


def main(argv: list[str] | None = None) -> int:
    from steer.training.config import report_saved, run_command
    from steer.training.settings import DPOConfig

    return run_command(DPOConfig, argv, prog=PROG, doc=__doc__,
                       run="steer.training.dpo:train_dpo", report=report_saved, description_paragraphs=1)


if __name__ == "__main__":
    sys.exit(main())
