"""Command configs for judging with principles: ``label`` (RLAIF) and ``icai`` (Inverse Constitutional AI).

Like :mod:`steer.training.settings`, free of torch so that ``--help`` and config errors are instant;
each field's ``help`` metadata is its flag's help text (see ``config.py``).

* :class:`JudgeConfig`: the judge model, batching, output, logging (shared).
* :class:`LabelConfig` (``python -m steer.train label``): + data, principles, min margin.
* :class:`ICAIConfig` (``python -m steer.train icai``): + data, candidates, split, ranking, pruning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from steer.config import option
from steer.errors import InvalidInput

from .config import require_choice, require_float, require_int
from .settings import DEVICES, LOG_LEVELS

RANK_SPLITS = ("train", "heldout")
JUDGE_METHODS = ("instruction", "followup")  # steer.rewards.principle_judge.JUDGE_METHODS (torch-free copy; tested)


_f = option  # a field's flag help and options


@dataclass(frozen=True)
class JudgeConfig:
    """Fields ``label`` and ``icai`` share; each is also a flag."""

    output: str = field(default="", metadata=_f("directory to write into (created after every input is checked)"))
    model: str = field(default="default",
                       metadata=_f("judge model: 'default' (SmolLM2-135M-Instruct), a model directory or a .gguf file"))
    dtype: str = field(default="float32", metadata=_f("judge weights dtype", choices=("float32", "bfloat16")))
    device: str = field(default="auto", metadata=_f("auto (CUDA when present), cpu or cuda", choices=DEVICES))
    judge: str = field(default="instruction", metadata=_f(
        "instruction: log p(response | principle as instruction) - log p(response | its opposite); followup: "
        "FLR, log p(follow-up saying it was met) - log p(one saying it was not)", choices=JUDGE_METHODS))
    batch_size: int = field(default=32, metadata=_f("follow-up or response rows per forward"))
    prefix_batch: int = field(default=8, metadata=_f("responses whose conversation + response "
                                                     "run in one forward (FLR prefix cache)"))
    progress: bool = field(default=True, metadata=_f("tqdm progress bars"))
    log_level: str = field(default="INFO", metadata=_f("what the command logs to stderr", choices=LOG_LEVELS))

    def __post_init__(self):
        if not isinstance(self.output, str) or not self.output.strip():
            raise InvalidInput("output", "is required: the directory to write into")
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidInput("model", "is required: 'default', a model directory or a .gguf file")
        require_choice("dtype", self.dtype, ("float32", "bfloat16"))
        require_choice("device", self.device, DEVICES)
        require_choice("judge", self.judge, JUDGE_METHODS)
        require_int("batch_size", self.batch_size, 1)
        require_int("prefix_batch", self.prefix_batch, 1)
        if isinstance(self.log_level, str) and self.log_level.upper() in LOG_LEVELS:
            object.__setattr__(self, "log_level", self.log_level.upper())
        require_choice("log_level", self.log_level, LOG_LEVELS)

    def _require_files(self, name: str) -> None:
        value = getattr(self, name)
        if not value:
            raise InvalidInput(name, "is required: one or more JSONL/Parquet files")
        for i, path in enumerate(value):
            if not isinstance(path, str) or not path:
                raise InvalidInput(f"{name}[{i}]", f"must be a file path, got {path!r}")


@dataclass(frozen=True)
class LabelConfig(JudgeConfig):
    """``python -m steer.train label``: every field is also a flag (``--field-name``)."""

    data: tuple[str, ...] = field(default=(), metadata=_f("JSONL/Parquet rows {prompt, responses: [2 or more]} "
                                                          "or TRL pairs {prompt, chosen, rejected} "
                                                          "(their order is ignored)", metavar="FILE"))
    principles: str = field(default="", metadata=_f("principles file: icai's principles.json "
                                                    "(steer.judged-principles/v1) or a steer.principles/v1 "
                                                    "file (each objective judged by FLR's follow-ups for it)"))
    top: int = field(default=0, metadata=_f("judge by the first N principles of the file "
                                            "only (icai writes them best first; 0: all)"))
    ids: tuple[str, ...] = field(default=(), metadata=_f("judge by the principles with these ids "
                                                         "only, in this order (instead of --top)", metavar="ID"))
    min_margin: float = field(default=0.0, metadata=_f("skip a pair whose margin (mean over "
                                                       "principles of the score difference, nats) is "
                                                       "below this; a margin of 0 is always skipped"))

    def __post_init__(self):
        super().__post_init__()
        self._require_files("data")
        if not isinstance(self.principles, str) or not self.principles.strip():
            raise InvalidInput("principles",
                               "is required: a principles file (icai's principles.json, or a steer.principles/v1 file)")
        require_int("top", self.top, 0)
        for i, pid in enumerate(self.ids):
            if not isinstance(pid, str) or not pid.strip():
                raise InvalidInput(f"ids[{i}]", f"must be a principle id, got {pid!r}")
        if len(set(self.ids)) != len(self.ids):
            raise InvalidInput("ids", f"names a principle twice: {list(self.ids)}")
        if self.ids and self.top:
            raise InvalidInput("ids", "give --top or --ids, not both")
        require_float("min_margin", self.min_margin, minimum=0)


@dataclass(frozen=True)
class ICAIConfig(JudgeConfig):
    """``python -m steer.train icai``: every field is also a flag (``--field-name``)."""

    data: tuple[str, ...] = field(default=(), metadata=_f("TRL-format pairs {prompt, chosen, "
                                                          "rejected}, JSONL or Parquet", metavar="FILE"))
    candidates: tuple[str, ...] = field(default=(), metadata=_f(
        "more candidate principles files (steer.judged-principles/v1 or steer.principles/v1)", metavar="FILE"))
    library: bool = field(default=True,
                          metadata=_f("include the shipped candidate library (steer/data/icai_candidates.json)"))
    heldout_fraction: float = field(default=0.5,
                                    metadata=_f("share of pairs held out (seeded split); the rest is the train split"))
    seed: int = field(default=0, metadata=_f("the train/held-out split"))
    rank_by: str = field(default="train", metadata=_f("split whose agreement ranks the principles and decides "
                                                      "redundancy: train (held-out agreement then estimates "
                                                      "how the choice generalises) or heldout", choices=RANK_SPLITS))
    tie_epsilon: float = field(default=1e-3, metadata=_f("a principle's judgement of a pair is a tie (counted as "
                                                         "disagreement) when |score difference| <= this (nats)"))
    redundancy: float = field(default=0.9, metadata=_f("two principles whose judgements (prefer chosen / "
                                                       "prefer rejected / tie) are equal on at least this "
                                                       "share of pairs are redundant: the better one is kept"))
    min_agreement: float = field(default=0.5, metadata=_f("principles.json keeps only principles whose "
                                                          "agreement on the ranking split is at least "
                                                          "this (report.json lists every candidate)"))

    def __post_init__(self):
        super().__post_init__()
        self._require_files("data")
        for i, path in enumerate(self.candidates):
            if not isinstance(path, str) or not path:
                raise InvalidInput(f"candidates[{i}]", f"must be a file path, got {path!r}")
        if not self.library and not self.candidates:
            raise InvalidInput("library", "--no-library needs --candidates FILE: there would be no principles to test")
        require_float("heldout_fraction", self.heldout_fraction, minimum=0, maximum=1, exclusive_min=True,
                      exclusive_max=True)
        require_int("seed", self.seed, 0)
        require_choice("rank_by", self.rank_by, RANK_SPLITS)
        require_float("tie_epsilon", self.tie_epsilon, minimum=0)
        require_float("redundancy", self.redundancy, minimum=0, maximum=1, exclusive_min=True)
        require_float("min_agreement", self.min_agreement, minimum=0, maximum=1)
