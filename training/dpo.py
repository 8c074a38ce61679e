"""``steer.train dpo``: preference-optimise a policy on a fixed set of TRL-format pairs (or KTO rows).

    data files -> examples (pairs.py) -> token ids with masked prompts -> [reference log-probs]
      -> PreferenceTrainer.fit (trainer.py) -> adapter/ (or model/), metrics.jsonl, training_curve.png

Reference log-probs: LoRA runs use the adapter-disabled policy on every batch (no second copy of
the model); full fine-tuning (``--full``) and ``--precompute-ref`` compute them once before the
first step, on the initial weights, and cache them in ``<output>/reference_logps.pt`` (keyed by
the data's token ids and the base model) so a resumed run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from steer.errors import InvalidInput
from steer.files import atomic_file, atomic_write_text

from .checkpoint import CheckpointManager
from .config import config_to_dict, write_config
from .distributed import DistContext, barrier, run_in_process_group
from .metrics import MetricsLogger, plot_curves
from .output_dir import check_output_dir
from .pairs import Encoder, PairExample, encode_examples, pairs_to_unpaired, read_examples
from .policy import Policy, build_policy
from .settings import DPOConfig, TrainerConfig
from .trainer import PreferenceTrainer, reference_logps, resolve_precision

log = logging.getLogger(__name__)
REFERENCE_FILE = "reference_logps.pt"


def prepare_examples(config: TrainerConfig, examples: list) -> list:
    """Match data format and loss: KTO reads unpaired rows (or splits pairs into them); other losses need pairs."""
    paired = isinstance(examples[0], PairExample)
    if config.loss == "kto":
        return pairs_to_unpaired(examples) if paired else examples
    if not paired:
        raise InvalidInput("loss", f"{config.loss!r} needs preference pairs (prompt/chosen/rejected); "
                           f"{examples[0].where} is an unpaired KTO row: use --loss kto")
    return examples


def data_key(data, base_dir: Path) -> str:
    """Hash of the token ids of every sequence and the base model: what reference log-probs depend on."""
    h = hashlib.sha256(str(base_dir).encode())
    for e in data:
        for s in e.sequences:
            h.update(np.asarray(s.input_ids, dtype=np.int64).tobytes())
            h.update(str(s.prompt_len).encode())
    return h.hexdigest()[:24]


def cached_reference(config: TrainerConfig, policy: Policy, data, ctx: DistContext, path: Path,
                     key: str) -> torch.Tensor:
    """Reference log-probs of ``data`` from ``path`` if it matches ``key``, else computed (on the
    policy's current = initial weights) and written there by rank 0."""
    precision = resolve_precision(config.precision, ctx.device)
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if (stored.get("key") == key and stored.get("impl") == config.logprob_impl
                and stored.get("precision", "fp32") == precision):
            return stored["logps"]
    was_training = policy.model.training
    policy.model.eval()
    try:
        # LoRA: the policy with its adapter switched off; full: the model itself, still at its initial weights.
        source = policy if policy.lora else policy.model
        ref = reference_logps(source, data, ctx, batch_size=config.batch_size, impl=config.logprob_impl,
                              progress=config.progress, precision=precision)
    finally:
        policy.model.train(was_training)
    if ctx.is_main:
        with atomic_file(path) as tmp:  # a torn cache file would break the next resume's load
            torch.save({"key": key, "impl": config.logprob_impl, "precision": precision, "logps": ref}, tmp)
    barrier(ctx)
    return ref


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_output(config: TrainerConfig, manager: CheckpointManager):
    """The checkpoint to resume from (None: fresh start); refuses to mix a new run into an old one."""
    latest = manager.latest()
    if config.resume:
        if latest is None:
            log.warning("--resume: no checkpoint in %s; starting from the beginning", manager.root)
        return latest
    if latest is not None:
        raise InvalidInput("output", f"{config.output} already holds checkpoints ({latest.path.name}); "
                           "pass --resume to continue that run, or choose a new --output")
    return None


def train_dpo(config: DPOConfig) -> dict:
    """Run the whole command; returns a summary (also the last record of metrics.jsonl)."""
    return run_in_process_group(_train, config)


def _train(config: DPOConfig, ctx: DistContext) -> dict:
    seed_everything(config.seed)
    output = check_output_dir(config.output)  # before the data and the model: creates nothing
    examples = prepare_examples(config, read_examples(config.data))
    policy = build_policy(config.policy_spec(), ctx.device)
    encoder = Encoder(policy.tokenizer, config.max_length, config.max_prompt_length)
    data = encode_examples(examples, encoder, sft=config.loss == "sft")
    G = config.batch_size * config.grad_accum * ctx.world_size
    if len(data) < G:  # a batch made mostly of repeats is a mistake in a fixed data set
        raise InvalidInput("batch_size", f"{len(data)} examples cannot fill one global batch of {G} "
                           f"(batch_size x grad_accum x {ctx.world_size} ranks)")
    if ctx.is_main:  # every input passed: a refused run leaves no empty directory behind
        output.mkdir(parents=True, exist_ok=True)
    barrier(ctx)
    manager = CheckpointManager(output, ctx, config.keep_checkpoints)
    ckpt = check_output(config, manager)

    total = config.epochs * -(-len(data) // G)
    if config.max_steps:
        total = min(total, config.max_steps)
    logger = MetricsLogger(output, ctx.is_main, resume_lines=ckpt.state["metrics_lines"] if ckpt else None,
                           elapsed=ckpt.state.get("elapsed", 0.0) if ckpt else 0.0)
    trainer = PreferenceTrainer(config, policy, ctx, total, manager, logger)
    if config.precomputes_reference:  # before the checkpoint's weights are loaded: the reference is the start
        trainer.ref = cached_reference(config, policy, data, ctx, output / REFERENCE_FILE,
                                       data_key(data, policy.base_dir))
    cursor = (0, 0)
    if ckpt is not None:
        cursor = tuple(trainer.restore(ckpt)["cursor"])
        log.info("resumed from %s (step %d)", ckpt.path, ckpt.step)
    else:
        if ctx.is_main:
            write_config(config, output / "config.yaml")
        truncated = sum(s.prompt_truncated for e in data for s in e.sequences)
        logger.log({"type": "start", "step": 0, "examples": len(data), "steps": total, "global_batch": G,
                    "world_size": ctx.world_size, "truncated_prompts": truncated,
                    "reference": ("precomputed" if trainer.ref is not None
                                  else ("adapter-disabled" if config.needs_reference else "none")),
                    "trainable_parameters": sum(p.numel() for p in trainer.params)})
    trainer.fit(data, epochs=config.epochs, cursor=cursor, max_steps=config.max_steps, desc=f"dpo/{config.loss}")
    summary = {"type": "summary", "step": trainer.step, "config": config_to_dict(config)}
    if ctx.is_main:
        summary["saved"] = str(policy.save(output))
        logger.log(summary)
        plot_curves(output, title=f"steer dpo ({config.loss})")
        atomic_write_text(output / "summary.json", json.dumps(summary, indent=1))
    barrier(ctx)
    return summary
