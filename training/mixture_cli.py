"""Mixture adapters: one LoRA adapter per objective, trained jointly over sampled directions.

Every iteration draws prompts and directions v (corners and Dirichlet mixes), samples the base
model under plain-language instructions for and against v (the principle-guided pool of dpa),
scores every candidate with the reward vector r, pairs the best and worst by v . r, and trains
the model whose update for that example is sum_i v_i * delta_W_i on the plain prompt (no
direction line). With --samples N the pool also holds the current mix's own answers for v (on the
plain prompt); --pair-by instruction --reject-cut-policy rejects those that did not end against an
ended guided answer. Or, with --data, trains on the pairs.jsonl files of an earlier dpa run.

Examples:
  python -m steer.train mixture --output runs/mixture                        # packaged prompts and principles
  python -m steer.train mixture --config training/recipes/default-mixture.yaml --output runs/default-mixture
  python -m steer.train mixture --data runs/dpa/iterations/000/pairs.jsonl --loss sft --output runs/mix-sft
  python -m steer.train mixture --corner-pairs --loss orpo --iterations 2 --output runs/mixture
  python -m steer.train mixture --config mixture.yaml --resume
  python -m steer.train mixture --config training/recipes/default-mixture.yaml --iterations 2 --samples 1 \
      --reject-cut-policy --output runs/mixture-own-loops   # 2nd iteration: the mix's cut answers rejected

Output: <output>/mixture (mixture.json and one PEFT adapter per objective; serve it with
python -m steer.serve --mixture <output>/mixture), metrics.jsonl, training_curve.png, config.yaml,
checkpoints/, and per iteration iterations/<k>/samples.jsonl and pairs.jsonl.
"""

from __future__ import annotations

import sys

PROG = "python -m steer.train mixture"


def main(argv: list[str] | None = None) -> int:
    from steer.training.config import report_saved, run_command
    from steer.training.settings import MixtureConfig

    return run_command(MixtureConfig, argv, prog=PROG, doc=__doc__,
                       run="steer.training.dpa:run_dpa", report=report_saved)


if __name__ == "__main__":
    sys.exit(main())
