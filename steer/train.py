"""Offline training: reward models and direction-conditioned policies.

Commands:
  reward   train a multi-objective reward model (k-output head on a base LM, + LoRA)
  dpo      preference-optimise a policy on pairs (sigmoid | ipo | hinge | simpo | orpo | kto)
  dpa      Directional Preference Alignment: sample directions and responses, score, pair, train
  mixture  one LoRA adapter per objective, trained jointly over sampled directions (STRATEGY_MIXTURE)
  export   an adapter for shipping: bf16 weights, base named by model id, metadata.json
  label    RLAIF: label pairs of responses by principles, judged by the model (FLR follow-ups)
  icai     Inverse Constitutional AI: rank candidate principles by how well they explain preference pairs

Examples:
  python -m steer.train reward --data ratings.jsonl --output runs/rm
  python -m steer.train dpo --data pairs.jsonl --loss sigmoid --output runs/dpo
  python -m steer.train dpa --scorer flr --iterations 2 --output runs/dpa
  python -m steer.train dpa --help
  python -m steer.train mixture --data runs/dpa/iterations/000/pairs.jsonl --loss sft --output runs/mix
  python -m steer.train export --adapter runs/dpa/adapter --output dist/dpa-adapter
  python -m steer.train icai --data training/data/icai_example.jsonl --output runs/icai
  python -m steer.train label --data runs/icai/heldout.jsonl --principles runs/icai/principles.json \\
      --top 1 --output runs/labels

Each command also reads --config file.yaml (flags override it). Under
`torchrun --nproc_per_node N` the same commands train with DDP. Idle OpenMP threads sleep instead
of spinning (OMP_WAIT_POLICY=PASSIVE unless set), so a busy machine does not slow a run down 3x.
"""

from __future__ import annotations

import importlib
import sys

# command -> module (under steer.training) whose main(argv) runs it; imported only when chosen so
# `--help` stays instant.
COMMANDS = {
    "reward": ("steer.training.reward_cli", "train a multi-objective reward model"),
    "dpo": ("steer.training.dpo_cli", "preference-optimise a policy on pairs"),
    "dpa": ("steer.training.dpa_cli", "Directional Preference Alignment loop"),
    "mixture": ("steer.training.mixture_cli", "per-objective adapters mixed per request"),
    "export": ("steer.training.export_cli", "export an adapter for shipping (bf16, base named by id, metadata)"),
    "label": ("steer.training.label_cli", "RLAIF: label pairs by principles judged by the model"),
    "icai": ("steer.training.icai_cli", "Inverse Constitutional AI: principles from preference pairs"),
}


def main(argv: list[str] | None = None) -> int:
    from steer.threads import passive_openmp_waits

    passive_openmp_waits()  # before any command imports torch
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m steer.train {" + ",".join(COMMANDS) + "} [options]\n")
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"steer.train: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
