"""Command configs for policy training: one frozen dataclass per command, and the fields they share.

Kept free of torch and the model stack so that ``--help`` and config errors are instant; the
constants that mirror heavier modules (loss names, devices) are checked against them in the tests.
Each field's ``help`` metadata is its documentation and its flag's help text (see ``config.py``).

* :class:`TrainerConfig`: the policy, the loss, the optimiser, batching, checkpoints.
* :class:`DPOConfig` (``python -m steer.train dpo``): + data files, epochs.
* :class:`DPAConfig` (``python -m steer.train dpa``): + prompts, scorer, directions, sampling, iterations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from steer.config import option
from steer.errors import InvalidInput
from steer.objectives import DEFAULT_OBJECTIVES, validate_objectives

from .config import require_choice, require_float, require_int

# Mirrors of steer.kernels.preference.LOSS_TYPES / NEEDS_REFERENCE / RPO_TYPES (importing it loads torch).
PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo", "kto")
NEEDS_REFERENCE = ("sigmoid", "ipo", "hinge", "kto")
RPO_LOSSES = ("sigmoid", "ipo", "hinge", "simpo")
LOSSES = PREFERENCE_LOSSES + ("sft", "distill")
LOGPROB_IMPLS = ("fused", "naive")  # steer.training.logprobs.IMPLS
DEVICES = ("auto", "cpu", "cuda")  # steer.training.distributed.DEVICES
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")  # steer.logs.LEVELS


# Per-loss beta when none is given: TRL's defaults (SimPO: the paper's 2.0; ORPO: lambda 0.1).
DEFAULT_BETA = {"sigmoid": 0.1, "ipo": 0.1, "hinge": 0.1, "kto": 0.1, "simpo": 2.0, "orpo": 0.1, "sft": 0.0,
                "distill": 0.0}
DEFAULT_SIMPO_GAMMA = 1.0  # TRL: gamma_beta_ratio 0.5 x beta 2.0
SCHEDULES = ("constant", "linear", "cosine")
# How a DPA pool's pair is chosen: by the scorer's v . r, or by the instructions the base model answered
# (RLCD: the sample under instructions for v over the one under instructions against v).
PAIR_BY = ("reward", "instruction")
PRECISIONS = ("auto", "bf16", "fp32")  # steer.training.trainer.resolve_precision


def _require_paths(name: str, paths) -> None:
    """Every item of ``paths`` is a non-empty string; else InvalidInput naming ``name[i]``."""
    for i, path in enumerate(paths):
        if not isinstance(path, str) or not path:
            raise InvalidInput(f"{name}[{i}]", f"must be a file path, got {path!r}")


_f = option  # a field's flag help and options


@dataclass(frozen=True)
class TrainerConfig:
    """Fields every policy-training command shares (``dpo``, ``dpa``); each is also a flag."""

    output: str = field(default="", metadata=_f("run directory: adapter/ (or model/), checkpoints/, "
                                                "metrics.jsonl, training_curve.png, config.yaml"))
    model: str = field(default="default", metadata=_f("base causal LM: 'default' (SmolLM2-135M-Instruct), "
                                                      "a model directory or a .gguf file"))
    loss: str = field(default="sigmoid", metadata=_f("preference loss: sigmoid (DPO), ipo, hinge, simpo, "
                                                     "orpo, kto, sft (NLL on the chosen response), or distill "
                                                     "(dpa only: context distillation of the principles into "
                                                     "the direction line, see steer.training.distill)", choices=LOSSES))
    beta: float | None = field(default=None, metadata=_f("loss strength (DPO/hinge/KTO: KL weight; IPO: tau; "
                                                         "SimPO: reward scale; ORPO: lambda)", unset="0.1; simpo 2.0"))
    gamma: float | None = field(default=None,
                                metadata=_f("SimPO target reward margin (simpo only)", unset="1.0 for simpo"))
    label_smoothing: float = field(default=0.0,
                                   metadata=_f("cDPO label-flip probability in [0, 0.5) (sigmoid and simpo only)"))
    rpo_alpha: float = field(default=0.0, metadata=_f(
        "add rpo_alpha x the token-mean NLL of the chosen responses to the loss (RPO; sigmoid, ipo, hinge, simpo): "
        "keeps the chosen answers, end-of-turn token included, likely while the pairs' margin grows; 0: off"))
    full: bool = field(default=False, metadata=_f("train every weight instead of a LoRA adapter "
                                                  "(reference log-probs are then precomputed)"))
    lora_r: int = field(default=16, metadata=_f("LoRA rank"))
    lora_alpha: float = field(default=32.0, metadata=_f("LoRA scaling numerator (scale = alpha / r)"))
    lora_dropout: float = field(default=0.0, metadata=_f("dropout on the LoRA input"))
    lora_target: str = field(default="all-linear",
                             metadata=_f("modules to adapt: 'all-linear' or comma-separated names (q_proj,v_proj)"))
    init_adapter: str = field(default="none", metadata=_f(
        "start the LoRA adapter from this PEFT adapter directory instead of zero ('default': the shipped "
        "adapter; its rank and alpha must match --lora-r/--lora-alpha); the reference stays the base model "
        "(adapter off)", metavar="DIR"))
    precision: str = field(default="auto", metadata=_f(
        "compute precision: bf16 (autocast: bf16 decoder matmuls; fp32 LoRA weights, "
        "gradients, AdamW state and log-probs), fp32, or auto: bf16 where the hardware "
        "multiplies bf16 natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32", choices=PRECISIONS))
    gradient_checkpointing: bool = field(default=True, metadata=_f(
        "recompute each decoder layer's activations in backward (one extra forward): "
        "a fraction of the memory; --no-gradient-checkpointing keeps them all"))
    release_memory: bool = field(default=True, metadata=_f("CPU: give freed activation memory back to the OS between "
                                                           "decoder layers (glibc malloc_trim once the process grew "
                                                           "256 MB since the last trim): 0.6x the peak RSS, ~7% slower "
                                                           "steps; --no-release-memory when memory is plentiful"))
    threads: int = field(default=0, metadata=_f("CPU intra-op threads (0: the CPUs this process "
                                                "may use, from its affinity mask and cgroup "
                                                "quota, shared among the ranks on this machine)"))
    precompute_ref: bool = field(default=False, metadata=_f("LoRA: compute reference log-probs once "
                                                            "before training instead of per step"))
    lr: float = field(default=5e-5, metadata=_f("AdamW peak learning rate"))
    lr_schedule: str = field(default="linear", metadata=_f("after warmup: constant, linear "
                                                           "decay to 0, or cosine decay to 0", choices=SCHEDULES))
    warmup_steps: int = field(default=0, metadata=_f("linear warmup steps"))
    weight_decay: float = field(default=0.0, metadata=_f("AdamW weight decay"))
    adam_eps: float = field(default=1e-8, metadata=_f("AdamW epsilon (the floor of the per-element update normaliser)"))
    max_grad_norm: float = field(default=1.0, metadata=_f("clip the gradient norm to this (0: no clipping)"))
    batch_size: int = field(default=4, metadata=_f("examples per micro-batch per rank (a "
                                                   "pair counts once and runs two sequences)"))
    grad_accum: int = field(default=1, metadata=_f("micro-batches per optimiser step; global "
                                                   "batch = batch_size x grad_accum x ranks"))
    max_length: int = field(default=512, metadata=_f("prompt + completion tokens per sequence (completions are cut)"))
    max_prompt_length: int = field(default=384,
                                   metadata=_f("prompt tokens kept (the end: question and assistant header)"))
    seed: int = field(default=0, metadata=_f("adapter init, data order, dropout"))
    save_every: int = field(default=0, metadata=_f("optimiser steps between checkpoints (0: none during training)"))
    keep_checkpoints: int = field(default=2, metadata=_f("newest checkpoints kept"))
    resume: bool = field(default=False,
                         metadata=_f("continue from the newest checkpoint in output (same data order and RNG)"))
    dtype: str = field(default="float32", metadata=_f("storage dtype of the base model's weights (bfloat16 "
                                                      "halves them; LoRA weights stay float32); what the "
                                                      "matmuls run in is --precision", choices=("float32", "bfloat16")))
    device: str = field(default="auto", metadata=_f("auto (CUDA when present), cpu or cuda", choices=DEVICES))
    logprob_impl: str = field(default="fused", metadata=_f("log-probs: fused (linear_logprob, no N x V logits) "
                                                           "or naive (full logits)", choices=LOGPROB_IMPLS))
    progress: bool = field(default=True, metadata=_f("tqdm progress bars (rank 0)"))
    log_level: str = field(default="INFO", metadata=_f("what the command logs to stderr", choices=LOG_LEVELS))

    def __post_init__(self):
        if not isinstance(self.output, str) or not self.output.strip():
            raise InvalidInput("output", "is required: the run directory to write into")
        require_choice("loss", self.loss, LOSSES)
        if self.beta is not None:
            require_float("beta", self.beta, minimum=0, exclusive_min=True)
        if self.gamma is not None:
            require_float("gamma", self.gamma, minimum=0)
            if self.loss != "simpo":
                raise InvalidInput("gamma", f"is SimPO's margin; loss {self.loss!r} does not use it")
        require_float("label_smoothing", self.label_smoothing, minimum=0, maximum=0.5, exclusive_max=True)
        if self.label_smoothing and self.loss not in ("sigmoid", "simpo"):
            raise InvalidInput("label_smoothing", f"applies to loss sigmoid or simpo, not {self.loss!r}")
        require_float("rpo_alpha", self.rpo_alpha, minimum=0)
        if self.rpo_alpha and self.loss not in RPO_LOSSES:
            raise InvalidInput("rpo_alpha", f"applies to loss {', '.join(RPO_LOSSES)}, not {self.loss!r} (orpo has "
                                            "its own NLL term, sft is one, kto is unpaired)")
        require_int("lora_r", self.lora_r, 1)
        require_float("lora_alpha", self.lora_alpha, minimum=0, exclusive_min=True)
        require_float("lora_dropout", self.lora_dropout, minimum=0, maximum=1, exclusive_max=True)
        if not isinstance(self.lora_target, str) or not self.lora_target.strip():
            raise InvalidInput("lora_target", "is empty: use 'all-linear' or module names such as q_proj,v_proj")
        if not isinstance(self.init_adapter, str) or not self.init_adapter.strip():
            raise InvalidInput("init_adapter", "is empty: use 'none', 'default' or a PEFT adapter directory")
        if self.init_adapter != "none":
            if self.full:
                raise InvalidInput("init_adapter", "starts a LoRA adapter; --full trains every weight")
            from .policy import init_adapter_path

            init_adapter_path(self.init_adapter, self.model, self.lora_r, self.lora_alpha)  # before any model loads
        require_float("lr", self.lr, minimum=0, exclusive_min=True)
        require_choice("lr_schedule", self.lr_schedule, SCHEDULES)
        require_int("warmup_steps", self.warmup_steps, 0)
        require_float("weight_decay", self.weight_decay, minimum=0)
        require_float("adam_eps", self.adam_eps, minimum=0, exclusive_min=True)
        require_float("max_grad_norm", self.max_grad_norm, minimum=0)
        require_int("batch_size", self.batch_size, 1)
        require_int("grad_accum", self.grad_accum, 1)
        require_int("max_length", self.max_length, 2)
        require_int("max_prompt_length", self.max_prompt_length, 1)
        if self.max_prompt_length >= self.max_length:
            raise InvalidInput("max_prompt_length",
                               f"must be < max_length ({self.max_length}) to leave room for the completion")
        require_int("seed", self.seed, 0)
        require_choice("precision", self.precision, PRECISIONS)
        require_int("threads", self.threads, 0)
        require_int("save_every", self.save_every, 0)
        require_int("keep_checkpoints", self.keep_checkpoints, 1)
        require_choice("dtype", self.dtype, ("float32", "bfloat16"))
        require_choice("device", self.device, DEVICES)
        require_choice("logprob_impl", self.logprob_impl, LOGPROB_IMPLS)
        if isinstance(self.log_level, str) and self.log_level.upper() in LOG_LEVELS:
            object.__setattr__(self, "log_level", self.log_level.upper())
        require_choice("log_level", self.log_level, LOG_LEVELS)

    @property
    def effective_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[self.loss]

    @property
    def effective_gamma(self) -> float:
        if self.loss != "simpo":
            return 0.0
        return self.gamma if self.gamma is not None else DEFAULT_SIMPO_GAMMA

    @property
    def needs_reference(self) -> bool:
        return self.loss in NEEDS_REFERENCE

    @property
    def precomputes_reference(self) -> bool:
        return self.needs_reference and (self.full or self.precompute_ref)

    def policy_spec(self):
        from .policy import PolicySpec

        return PolicySpec(self.model, self.full, self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_target,
                          self.dtype, self.seed, self.gradient_checkpointing,
                          None if self.init_adapter == "none" else self.init_adapter)


PACKAGED_PROMPTS = Path(__file__).parent / "data" / "prompts.jsonl"


@dataclass(frozen=True)
class DPOConfig(TrainerConfig):
    """``python -m steer.train dpo``: every field is also a flag (``--field-name``)."""

    data: tuple[str, ...] = field(default=(), metadata=_f("training files, JSONL or Parquet, "
                                                          "TRL format (see steer.training.pairs)", metavar="FILE"))
    epochs: int = field(default=1, metadata=_f("passes over the data"))
    max_steps: int = field(default=0, metadata=_f("stop after this many optimiser steps (0: run every epoch)"))

    def __post_init__(self):
        super().__post_init__()
        if not self.data:
            raise InvalidInput("data", "is required: one or more JSONL/Parquet files")
        _require_paths("data", self.data)
        require_int("epochs", self.epochs, 1)
        if self.loss == "distill":
            raise InvalidInput("loss", "distill needs a teacher prompt per response, which pair files do not have; "
                                       "use python -m steer.train dpa --loss distill")
        require_int("max_steps", self.max_steps, 0)


@dataclass(frozen=True)
class DPAConfig(TrainerConfig):
    """``python -m steer.train dpa``: every field is also a flag (``--field-name``).

    Directions per iteration: ``round(corner_share * m)`` of the m (prompt, direction) slots get a
    corner (all weight on one objective, cycling through the objectives from a random start), the
    rest a Dirichlet(``dirichlet_alpha``) mix (alpha 1: uniform on the simplex). Every direction is
    rounded to the two decimals the conditioning line shows, so v . r uses what the policy reads.
    """

    prompts: str = field(default="", metadata=_f("JSONL/Parquet prompt file: rows {\"prompt\": text or messages}",
                                                 unset="the packaged training/data/prompts.jsonl"))
    scorer: str = field(default="default", metadata=_f("reward vector: 'default' (FLR + length for "
                                                       "conciseness), 'flr', a reward-model directory, "
                                                       "or parts joined by '+' (see steer.rewards.build)"))
    scorer_model: str | None = field(default=None, metadata=_f("run FLR on this model instead of the "
                                                               "base policy ('default', a directory "
                                                               "or .gguf)", unset="the base model, adapter off"))
    scorer_calibration: str = field(default="auto", metadata=_f("FLR calibration: auto (shipped/cached/computed), "
                                                                "none (raw), or a JSON path"))
    objectives: tuple[str, ...] = field(default=DEFAULT_OBJECTIVES, metadata=_f(
        "objectives of the directions and the reward vector, in order", metavar="NAME"))
    iterations: int = field(default=2, metadata=_f("sample -> score -> pair -> train rounds"))
    prompts_per_iteration: int = field(default=16, metadata=_f("prompts drawn per iteration (cycling "
                                                               "through a seeded shuffle of the file)"))
    directions_per_prompt: int = field(default=1, metadata=_f("directions sampled per prompt and iteration"))
    samples: int = field(default=2, metadata=_f("on-policy responses per (prompt, direction): "
                                                "the current policy under the direction line"))
    guided_samples: int = field(default=2, metadata=_f("base-model responses per (prompt, direction) under "
                                                       "principles chosen FOR the direction (0: none)"))
    contrast_samples: int = field(default=1, metadata=_f("base-model responses per (prompt, direction) "
                                                         "under principles AGAINST the direction (0: none)"))
    principles: str = field(default="", metadata=_f("principles file (JSON, see steer.principles): "
                                                    "instructions per objective for guided/contrast "
                                                    "samples", unset="the packaged steer/data/principles.json"))
    corner_share: float = field(default=0.25, metadata=_f("share of directions that are corners (one "
                                                          "objective only); the rest are Dirichlet mixes"))
    dirichlet_alpha: float = field(default=1.0, metadata=_f("Dirichlet concentration of the mixed "
                                                            "directions (1: uniform on the simplex)"))
    min_margin: float = field(default=0.1, metadata=_f("skip a pair whose v . r difference (common "
                                                       "scale) is below this; sft ignores it"))
    pair_by: str = field(default="reward", metadata=_f(
        "reward: chosen/rejected = argmax/argmin of v . r under --scorer; instruction (RLCD): each guided "
        "sample over a contrast sample of the same (prompt, direction), labelled by the instructions, "
        "with no scorer (for an objective the scorer cannot see)", choices=PAIR_BY))
    corner_pairs: bool = field(default=False, metadata=_f(
        "also pair every pool under each corner direction it was not sampled for (reward "
        "vectors do not depend on the direction): the same prompt with opposite preferences, "
        "at no sampling cost; distill: also distill every response under each other corner"))
    chosen_must_end: bool = field(default=False, metadata=_f(
        "--pair-by instruction: only a guided sample that ended with the end-of-turn token within "
        "max_new_tokens may be chosen (a cut one is a ramble or a loop, not an answer to learn); the i-th "
        "ended guided sample pairs with contrast sample i, and a slot without one is skipped"))
    reject_cut_policy: bool = field(default=False, metadata=_f(
        "--pair-by instruction with --samples >= 1: every on-policy sample (the current policy for the "
        "direction) that did not end within max_new_tokens -- a loop or a ramble of the policy itself -- is "
        "rejected against an ended guided sample of the same (prompt, direction); on-policy samples that "
        "ended are not paired (nothing labels them); the end-of-turn ramp ends most rambles before the cap, "
        "so pair it with --end-ramp-bias 0"))
    missing_eos_penalty: float = field(default=1.0, metadata=_f(
        "subtracted from v . r of a candidate cut at max_new_tokens (no end-of-turn token), as TRL's "
        "online trainers do: ended answers win pairs, so the policy learns where to stop (0: off)"))
    max_new_tokens: int = field(default=320, metadata=_f("tokens per sampled response at most"))
    temperature: float = field(default=0.8, metadata=_f("sampling temperature (> 0: pairs need diverse samples)"))
    top_p: float = field(default=0.95, metadata=_f("nucleus sampling mass"))
    dry_multiplier: float = field(default=0.0, metadata=_f(
        "DRY loop penalty while sampling (steer.dry: a token that would continue a repeat of the answer's own "
        "tokens loses logit; base 1.75, allowed length 2); 0: off"))
    end_ramp_bias: float = field(default=10.0, metadata=_f(
        "end-of-turn ramp while sampling (steer.generation.EndRamp): the logit the end-of-turn token has "
        "gained by max_new_tokens, rising linearly from --end-ramp-start; a ramble or loop ends at the next "
        "point where ending was plausible (a sentence end) instead of running into the cap, so the answers "
        "learned from end; 0: off"))
    end_ramp_start: float = field(default=0.5, metadata=_f(
        "share of max_new_tokens after which the end-of-turn ramp starts (answers that end before it are "
        "untouched)"))
    generation_batch_size: int = field(default=16, metadata=_f("sequences per generate() batch"))
    epochs_per_iteration: int = field(default=1, metadata=_f("passes over each iteration's pairs"))
    lr_schedule: str = field(default="constant", metadata=_f("after warmup: constant, linear "
                                                             "decay to 0, or cosine decay to 0", choices=SCHEDULES))

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.prompts, str):
            raise InvalidInput("prompts", f"must be a file path, got {self.prompts!r}")
        if not isinstance(self.scorer, str) or not self.scorer.strip() or self.scorer.strip() == "none":
            raise InvalidInput("scorer",
                               "is required: 'default', 'flr', a reward-model directory, or parts joined by '+'")
        if not isinstance(self.scorer_calibration, str) or not self.scorer_calibration:
            raise InvalidInput("scorer_calibration", "is 'auto', 'none' or a calibration JSON path")
        object.__setattr__(self, "objectives", validate_objectives(self.objectives, "objectives"))
        require_int("iterations", self.iterations, 1)
        require_int("prompts_per_iteration", self.prompts_per_iteration, 1)
        require_int("directions_per_prompt", self.directions_per_prompt, 1)
        require_int("samples", self.samples, 0)
        require_int("guided_samples", self.guided_samples, 0)
        require_int("contrast_samples", self.contrast_samples, 0)
        single = self.loss in ("sft", "distill")
        if self.pool_size < (1 if single else 2):
            raise InvalidInput("samples", "the candidate pool (samples + guided_samples + contrast_samples = "
                               f"{self.pool_size}) needs at least {1 if single else 2} responses per "
                               "(prompt, direction) to pick a pair from")
        if self.loss == "distill" and self.full:
            raise InvalidInput("full", "distill's teacher is the base model with the adapter "
                                       "switched off; full fine-tuning has no such switch (use LoRA)")
        require_choice("pair_by", self.pair_by, PAIR_BY)
        if self.pair_by == "instruction":
            self._check_instruction_pairs()
        if not isinstance(self.principles, str):
            raise InvalidInput("principles", f"must be a file path, got {self.principles!r}")
        require_float("corner_share", self.corner_share, minimum=0, maximum=1)
        require_float("dirichlet_alpha", self.dirichlet_alpha, minimum=0, exclusive_min=True)
        require_float("min_margin", self.min_margin, minimum=0)
        self._check_chosen_must_end()
        require_float("missing_eos_penalty", self.missing_eos_penalty, minimum=0)
        require_int("max_new_tokens", self.max_new_tokens, 1)
        require_float("temperature", self.temperature, minimum=0, exclusive_min=True)
        require_float("top_p", self.top_p, minimum=0, maximum=1, exclusive_min=True)
        require_float("dry_multiplier", self.dry_multiplier, minimum=0)
        require_float("end_ramp_bias", self.end_ramp_bias, minimum=0)
        require_float("end_ramp_start", self.end_ramp_start, minimum=0, maximum=1)
        require_int("generation_batch_size", self.generation_batch_size, 1)
        require_int("epochs_per_iteration", self.epochs_per_iteration, 1)

    def _check_instruction_pairs(self) -> None:
        """What --pair-by instruction needs: labelled samples of both kinds, and only them."""
        if self.loss == "distill":
            raise InvalidInput("pair_by", "instruction chooses pairs, and distill trains on every sample "
                                          "without pairing: drop --pair-by")
        if self.guided_samples < 1 or self.contrast_samples < 1:
            raise InvalidInput("pair_by", "instruction pairs a guided sample with a contrast sample: needs "
                               f"guided_samples >= 1 and contrast_samples >= 1 (got {self.guided_samples} and "
                               f"{self.contrast_samples})")
        if self.samples and not self.reject_cut_policy:
            raise InvalidInput("samples", "must be 0 with --pair-by instruction: on-policy samples answer no "
                                          "instruction, so nothing labels them (--reject-cut-policy pairs "
                                          "the ones that did not end)")
        if self.corner_pairs:
            raise InvalidInput("corner_pairs", "needs --pair-by reward: instructions for one direction say "
                                               "nothing about what another corner prefers")

    def _check_chosen_must_end(self) -> None:
        if not isinstance(self.chosen_must_end, bool):
            raise InvalidInput("chosen_must_end", f"must be true or false, got {self.chosen_must_end!r}")
        if not isinstance(self.reject_cut_policy, bool):
            raise InvalidInput("reject_cut_policy", f"must be true or false, got {self.reject_cut_policy!r}")
        if self.reject_cut_policy and (self.pair_by != "instruction" or self.samples < 1):
            raise InvalidInput("reject_cut_policy", "needs --pair-by instruction and --samples >= 1 (with "
                                                    "--pair-by reward, --missing-eos-penalty makes ended answers win)")
        if self.chosen_must_end and self.pair_by != "instruction":
            raise InvalidInput("chosen_must_end", "needs --pair-by instruction (with --pair-by reward, "
                                                  "--missing-eos-penalty makes ended answers win)")

    @property
    def scored(self) -> bool:
        """Whether the pools get reward vectors: not for distill, nor for pairs labelled by instructions."""
        return self.loss != "distill" and self.pair_by == "reward"

    @property
    def instruction_pairs(self) -> int:
        """Pairs per (prompt, direction) under --pair-by instruction at most: guided i with contrast i, and
        with --reject-cut-policy an ended guided sample with each on-policy sample."""
        return min(self.guided_samples, self.contrast_samples) + (self.samples if self.reject_cut_policy else 0)

    @property
    def prompt_carries_direction(self) -> bool:
        """dpa: the training prompt carries the direction line (the policy reads it); a mixture mixes adapters
        instead."""
        return True

    @property
    def pool_size(self) -> int:
        """Candidates per (prompt, direction): on-policy + guided + contrast."""
        return self.samples + self.guided_samples + self.contrast_samples

    @property
    def uses_principles(self) -> bool:
        """Guided or contrast samples need the principles; so does distill (its teacher's instructions)."""
        return self.loss == "distill" or self.guided_samples + self.contrast_samples > 0

    @property
    def prompts_path(self) -> Path:
        return Path(self.prompts) if self.prompts else PACKAGED_PROMPTS


@dataclass(frozen=True)
class MixtureConfig(DPAConfig):
    """``python -m steer.train mixture``: every field is also a flag (``--field-name``).

    One LoRA adapter per objective (same targets and rank), trained jointly: an example paired under
    direction ``v`` trains the model whose update is ``sum_i v_i * delta_W_i``. Pairs come from the
    principle-guided generator of ``dpa`` (base-model samples under instructions for and against ``v``,
    chosen/rejected by ``v . r``), or from ``--data`` (pairs.jsonl files a ``dpa`` run wrote). The
    prompt carries no direction line: the mix of adapters is the direction.
    """

    data: tuple[str, ...] = field(default=(), metadata=_f("train on these pairs.jsonl files of a dpa/mixture run (rows "
                                                          "with a direction) instead of sampling", metavar="FILE"))
    samples: int = field(default=0, metadata=_f("on-policy samples per (prompt, direction): the current mix "
                                                "of adapters for the direction, on the plain prompt (0: the pool "
                                                "is the principle-guided samples only)"))

    def __post_init__(self):
        super().__post_init__()
        if self.loss == "kto":
            raise InvalidInput("loss", "kto is not available for mixture (unpaired rows lose their "
                                       "direction); use sigmoid, ipo, hinge, simpo, orpo or sft")
        if self.loss == "distill" and self.data:
            raise InvalidInput("data", "distill samples its own responses and needs a teacher prompt "
                                       "per response, which pair files do not have; drop --data")
        if self.full:
            raise InvalidInput("full", "a mixture is k LoRA adapters; full fine-tuning has nothing to mix")
        if self.init_adapter != "none":
            raise InvalidInput("init_adapter", "starts one adapter; a mixture's k adapters start from zero")
        _require_paths("data", self.data)

    @property
    def prompt_carries_direction(self) -> bool:
        return False
