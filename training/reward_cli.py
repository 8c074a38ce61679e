"""Train a multi-objective reward model (k-output head on a base LM, + LoRA).

Examples:
  python -m steer.train reward --data ratings.jsonl --output runs/rm
  python -m steer.train reward --data ratings.jsonl prefs.jsonl --eval-data heldout.jsonl --output runs/rm
  python -m steer.train reward --config rm.yaml --steps 500          # flags override the YAML
  python -m steer.train reward --data ratings.parquet --lora-r 0 --output runs/rm-head-only
  python -m steer.train reward --data ratings.jsonl --output runs/rm --resume   # continue from checkpoints/

Data rows (JSONL or Parquet; see steer.training.reward_data):
  {"prompt": "...", "response": "...", "helpfulness": 3, "conciseness": 1}       ratings (missing = masked)
  {"prompt": "...", "chosen": "...", "rejected": "...", "objective": "creativity"} preference pair

The output directory serves as a scorer: python -m steer.serve --scorer runs/rm
It also holds config.yaml, metrics.jsonl, training_curve.png and checkpoints/ (step-* directories).
A YAML config holds the same keys as the flags, with underscores (lora_r: 16).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields

from steer.errors import InvalidInput
from steer.objectives import DEFAULT_OBJECTIVES, validate_objectives

PROG = "python -m steer.train reward"


@dataclass(frozen=True)
class RewardTrainConfig:
    """Every field is also a ``python -m steer.train reward`` flag (``--field-name``)."""

    data: tuple[str, ...] = field(default=(), metadata={"help": "training files (JSONL or Parquet); "
                                                                "ratings and/or preference rows"})
    output: str = field(default="", metadata={"help": "directory to write the reward model (and checkpoints/) into"})
    eval_data: tuple[str, ...] = field(default=(), metadata={"help": "held-out files; without them "
                                                                     "eval_fraction of data is held out"})
    eval_fraction: float = field(default=0.1,
                                 metadata={"help": "share of rows held out for eval when no eval_data is given"})
    model: str = field(default="default",
                       metadata={"help": "base causal LM: 'default', a model directory or a .gguf file"})
    objectives: tuple[str, ...] = field(default=DEFAULT_OBJECTIVES, metadata={"help": "head outputs, in order"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank; 0 freezes the backbone and trains the head only"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    lora_target: str = field(default="all-linear", metadata={"help": "modules to adapt: 'all-linear' or "
                                                                     "comma-separated names (q_proj,v_proj)"})
    max_length: int = field(default=512,
                            metadata={"help": "tokens read per example (longer conversations lose their start)"})
    batch_size: int = field(default=8,
                            metadata={"help": "examples per step (a preference pair counts once, runs two sequences)"})
    steps: int = field(default=300, metadata={"help": "optimiser steps"})
    lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate (constant after warmup)"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    bt_weight: float = field(default=1.0, metadata={"help": "weight of the Bradley-Terry term against the MSE term"})
    eval_every: int = field(default=100, metadata={"help": "steps between evals (0: only at the end)"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints (0: none)"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest <output>/checkpoints/step-*"})
    seed: int = field(default=0, metadata={"help": "data order, eval split, initialisation and dropout"})
    dtype: str = field(default="float32", metadata={"help": "backbone dtype", "choices": ("float32", "bfloat16")})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar"})
    log_level: str = field(default="INFO", metadata={"help": "what the command logs to stderr",
                                                             "choices": ("DEBUG", "INFO", "WARNING", "ERROR")})

    def __post_init__(self):
        for name in ("data", "eval_data", "objectives"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not self.data:
            raise InvalidInput("data", "give at least one training file (--data ratings.jsonl)")
        if not self.output:
            raise InvalidInput("output", "give the directory to write the reward model to (--output runs/rm)")
        validate_objectives(self.objectives)
        checks = {
            "eval_fraction": 0.0 <= self.eval_fraction < 1.0,
            "lora_r": isinstance(self.lora_r, int) and self.lora_r >= 0,
            "lora_alpha": self.lora_alpha > 0,
            "lora_dropout": 0.0 <= self.lora_dropout < 1.0,
            "max_length": isinstance(self.max_length, int) and self.max_length >= 8,
            "batch_size": isinstance(self.batch_size, int) and self.batch_size >= 1,
            "steps": isinstance(self.steps, int) and self.steps >= 1,
            "lr": math.isfinite(self.lr) and self.lr > 0,
            "warmup_steps": isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            "weight_decay": self.weight_decay >= 0,
            "bt_weight": self.bt_weight >= 0,
            "eval_every": isinstance(self.eval_every, int) and self.eval_every >= 0,
            "checkpoint_every": isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0,
            "dtype": self.dtype in ("float32", "bfloat16"),
        }
        for name, ok in checks.items():
            if not ok:
                raise InvalidInput(name, f"invalid value {getattr(self, name)!r} ({_FIELD_HELP[name]})")

    # Fields that must match between a checkpoint and the run resuming it.
    RESUME_KEYS = ("model", "objectives", "lora_r", "lora_alpha", "lora_target", "max_length")


_FIELD_HELP = {f.name: f.metadata.get("help", "") for f in fields(RewardTrainConfig)}


def build_parser():
    from steer.training.config import build_parser as dataclass_parser

    return dataclass_parser(RewardTrainConfig, prog=PROG, description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1])


def config_from_args(argv: list[str]) -> RewardTrainConfig:
    """Dataclass defaults < ``--config`` YAML < flags given (``steer.training.config``); InvalidInput names
    the field."""
    from steer.training.config import merge_config

    return merge_config(RewardTrainConfig, argv, prog=PROG, description=__doc__.split("\n\n")[0],
                        epilog=__doc__.split("\n\n", 1)[1])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        return 0
    from steer.training.reward_model import train_reward_model

    from steer.logs import configure_logging

    try:
        config = config_from_args(argv)
        configure_logging(config.log_level)
        metrics = train_reward_model(config)
    except (InvalidInput, FileNotFoundError, ValueError) as e:
        print(f"steer.train reward: error: {e}", file=sys.stderr)
        return 2
    print(f"reward model written to {config.output}")
    for name, m in metrics.items():
        print(f"  {name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
