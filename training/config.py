"""Training command configs: :mod:`steer.config` with TRL's names for the same options.

The mechanism (dataclass fields -> flags, ``--config`` YAML, validation helpers, :func:`write_config`)
lives in :mod:`steer.config` and is re-exported here. What is the training commands' own:
TRL's names for their options (:data:`TRL_NAMES`: ``learning_rate``, ``per_device_train_batch_size``,
``output_dir``, ...) are accepted in YAML and as flags, so a TRL ``DPOConfig`` YAML file runs as it is;
:func:`build_parser`, :func:`read_config_file`, :func:`merge_config`, :func:`parse_config` and
:func:`run_command` here pass them (:data:`TRL`) to :mod:`steer.config`'s. And :func:`report_saved`,
the last line of a training command.
"""

from __future__ import annotations

from pathlib import Path

from steer import config as _config
from steer.config import (
    CONFIG_FLAG,
    Aliases,
    config_to_dict,
    option,
    require_choice,
    require_float,
    require_int,
    split_doc,
    write_config,
)

__all__ = [  # steer.config's mechanism, re-exported (the training commands import it from here), + TRL's names
    "CONFIG_FLAG", "TRL", "TRL_NAMES", "Aliases", "build_parser", "config_to_dict", "merge_config", "option",
    "parse_config", "read_config_file", "report_saved", "require_choice", "require_float", "require_int",
    "run_command", "split_doc", "trl_names", "write_config",
]

# TRL's names (DPOConfig / transformers.TrainingArguments) for options these commands call otherwise.
# TRL names that are already ours (beta, max_length, max_prompt_length, max_steps, warmup_steps,
# weight_decay, max_grad_norm, seed, gradient_checkpointing, label_smoothing) need no entry.
TRL_NAMES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "output_dir": "output",
    "loss_type": "loss",
    "save_steps": "save_every",
    "save_total_limit": "keep_checkpoints",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "lr_schedule",
    "adam_epsilon": "adam_eps",
}
# TRL values that mean one of ours: our 'constant' schedule already warms up for warmup_steps.
_TRL_VALUES = {("lr_schedule", "constant_with_warmup"): "constant"}


def _from_trl(name: str, value):
    """A TRL-style value for our field ``name``: integral floats (``num_train_epochs: 3.0``) become ints,
    a one-element ``loss_type`` list its element, TRL-only spellings of a value ours."""
    if isinstance(value, list) and name == "loss" and len(value) == 1:
        value = value[0]
    if isinstance(value, float) and value.is_integer() and name in ("epochs", "save_every", "keep_checkpoints",
                                                                   "batch_size", "grad_accum"):
        value = int(value)
    if isinstance(value, str) and (name, value) in _TRL_VALUES:
        value = _TRL_VALUES[(name, value)]
    return value


# TRL's schedule name as a flag value (--lr-schedule constant_with_warmup) means ours.
TRL = Aliases("TRL", TRL_NAMES, _from_trl,
              {"lr_schedule": lambda v: _TRL_VALUES.get(("lr_schedule", v), v)})


def trl_names(cls) -> dict[str, str]:
    """The TRL names that ``cls`` accepts: ``{trl_name: field}`` for the fields it has."""
    return TRL.for_class(cls)


def build_parser(cls, *, prog: str, description: str = "", epilog: str = ""):
    """:func:`steer.config.build_parser` with TRL's names as flags too."""
    return _config.build_parser(cls, prog=prog, description=description, epilog=epilog, aliases=TRL)


def read_config_file(cls, path: str | Path) -> dict:
    """:func:`steer.config.read_config_file` with TRL's names as keys too."""
    return _config.read_config_file(cls, path, aliases=TRL)


def merge_config(cls, argv: list[str], *, prog: str, description: str = "", epilog: str = ""):
    """:func:`steer.config.merge_config` with TRL's names too."""
    return _config.merge_config(cls, argv, prog=prog, description=description, epilog=epilog, aliases=TRL)


def parse_config(cls, argv: list[str], *, prog: str, description: str = "", epilog: str = ""):
    """:func:`steer.config.parse_config` with TRL's names too."""
    return _config.parse_config(cls, argv, prog=prog, description=description, epilog=epilog, aliases=TRL)


def run_command(cls, argv: list[str] | None, *, prog: str, doc: str, run, report=None,
                description_paragraphs: int = 2) -> int:
    """:func:`steer.config.run_command` with TRL's names too."""
    return _config.run_command(cls, argv, prog=prog, doc=doc, run=run, report=report,
                               description_paragraphs=description_paragraphs, aliases=TRL)


def report_saved(config, summary: dict) -> None:
    """The last line of a training command: where its result went."""
    if "saved" in summary:
        print(f"saved {summary['saved']} after {summary['step']} steps")
