"""Train a multi-objective reward model: regression on ratings + Bradley-Terry on preference pairs.

Model (:class:`steer.rewards.reward_model.RewardModel`): a causal LM backbone with LoRA adapters
(or frozen, ``lora_r=0``) and a k-output linear head on the last non-pad token's hidden state.

Losses, per batch (each term averaged over its own entries, the terms summed)::

    ratings      masked MSE        mean over rated (row, objective) of (h_o(x) - z_o)^2,
                                   z_o = (label - mean_o) / std_o  (train-split label statistics)
    preferences  Bradley-Terry     mean over pairs of -log sigmoid(h_o(chosen) - h_o(rejected))
                                   (Bradley & Terry, 1952; the reward-model loss of Ouyang et al.,
                                   2022, eq. 1), on the pair's objective o only

Eval (held-out split): per objective MSE on the label scale, Pearson correlation, and pairwise
accuracy on preference rows. The output directory is the format of
:mod:`steer.rewards.reward_model`, calibrated on the eval responses so the scorer reports rewards
on the common scale.

The run scaffold is the preference trainers' (``dpo``, ``dpa``, ``mixture``): the output directory
is checked before any work (:func:`~steer.training.output_dir.check_output_dir`) and created once
the inputs pass; ``config.yaml`` is the resolved config; ``metrics.jsonl`` (one record per step and
eval, :class:`~steer.training.metrics.MetricsLogger`) and ``training_curve.png``; the LR schedule is
:func:`~steer.training.trainer.build_scheduler` (``constant`` after linear warmup). Checkpoints
(:class:`~steer.training.checkpoint.CheckpointManager`: atomic ``checkpoints/step-*`` directories
with the trainable tensors, optimiser, schedule and every RNG) are written every
``checkpoint_every`` steps and after the last one; ``resume=True`` continues from the newest, and
a resumed run ends with the weights of an uninterrupted one. A run without ``resume`` into a
directory that holds checkpoints is refused (:func:`~steer.training.dpo.check_output`).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from steer.training.checkpoint import CHECKPOINTS, Checkpoint, CheckpointManager, latest_checkpoint, set_rng_state
from steer.training.config import config_to_dict, write_config
from steer.training.distributed import DistContext
from steer.training.dpo import check_output, seed_everything
from steer.training.metrics import MetricsLogger, plot_curves
from steer.training.output_dir import check_output_dir
from steer.training.reward_cli import RewardTrainConfig
from steer.training.reward_data import Example, PreferenceExample, RatingExample, read_reward_files
from steer.training.trainer import build_scheduler, epoch_order

from steer.errors import InvalidInput
from steer.rewards.calibration import Calibration
from steer.rewards.reward_model import (
    ADAPTER_DIR,
    RewardModel,
    RewardModelSpec,
    encode_texts,
    pad_id_of,
    render_for_reward,
    save_reward_model,
)

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2  # newest checkpoints kept: the preference trainers' default (--keep-checkpoints)
CONFIG_DUMP = "config.yaml"  # the resolved config: --config on it reproduces the run


# -- data ------------------------------------------------------------------------------------------


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(fraction * len(examples))))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def label_statistics(examples: list[Example], k: int) -> tuple[list[float], list[float]]:
    """Per-objective mean and std of the rating labels (0 and 1 where an objective has none)."""
    means, stds = [], []
    for o in range(k):
        values = [e.labels[o] for e in examples if isinstance(e, RatingExample) and e.labels[o] is not None]
        if len(values) >= 2:
            m = sum(values) / len(values)
            s = math.sqrt(sum((v - m) ** 2 for v in values) / len(values))
            means.append(m)
            stds.append(s if s > 1e-6 else 1.0)
        else:
            means.append(values[0] if values else 0.0)
            stds.append(1.0)
    return means, stds


@dataclass
class Batch:
    ids: torch.Tensor  # (S, T) every sequence of the batch, right-padded
    mask: torch.Tensor  # (S, T)
    rating_rows: torch.Tensor  # (R,) sequence index of each ratings example
    targets: torch.Tensor  # (R, k) standardised labels (0 where unrated)
    rated: torch.Tensor  # (R, k) bool
    chosen_rows: torch.Tensor  # (P,)
    rejected_rows: torch.Tensor  # (P,)
    pair_objective: torch.Tensor  # (P,)


def collate(examples: list[Example], tokenizer, max_length: int, label_mean, label_std) -> Batch:
    texts: list[str] = []
    rating_rows, targets, rated = [], [], []
    chosen_rows, rejected_rows, pair_objective = [], [], []
    for e in examples:
        if isinstance(e, RatingExample):
            rating_rows.append(len(texts))
            texts.append(render_for_reward(tokenizer, e.conversation, e.response))
            targets.append([0.0 if v is None else (v - m) / s for v, m, s in zip(e.labels, label_mean, label_std)])
            rated.append([v is not None for v in e.labels])
        else:
            chosen_rows.append(len(texts))
            texts.append(render_for_reward(tokenizer, e.conversation, e.chosen))
            rejected_rows.append(len(texts))
            texts.append(render_for_reward(tokenizer, e.conversation, e.rejected))
            pair_objective.append(e.objective)
    ids, mask = encode_texts(tokenizer, texts, max_length, pad_id_of(tokenizer))
    k = len(label_mean)
    return Batch(
        ids, mask,
        torch.tensor(rating_rows, dtype=torch.long),
        torch.tensor(targets, dtype=torch.float32).reshape(-1, k),
        torch.tensor(rated, dtype=torch.bool).reshape(-1, k),
        torch.tensor(chosen_rows, dtype=torch.long),
        torch.tensor(rejected_rows, dtype=torch.long),
        torch.tensor(pair_objective, dtype=torch.long),
    )


def batch_loss(model: RewardModel, batch: Batch, bt_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    out = model(batch.ids, batch.mask)  # (S, k)
    loss = out.new_zeros(())
    parts = {}
    if batch.rating_rows.numel():
        pred = out[batch.rating_rows]  # (R, k)
        sq = (pred - batch.targets) ** 2 * batch.rated  # (R, k), unrated entries contribute 0
        mse = sq.sum() / batch.rated.sum().clamp(min=1)
        loss = loss + mse
        parts["mse"] = float(mse.detach())
    if batch.chosen_rows.numel():
        obj = batch.pair_objective[:, None]  # (P, 1)
        margin = out[batch.chosen_rows].gather(1, obj)[:, 0] - out[batch.rejected_rows].gather(1, obj)[:, 0]  # (P,)
        bt = -F.logsigmoid(margin).mean()
        loss = loss + bt_weight * bt
        parts["bt"] = float(bt.detach())
    return loss, parts


# -- model ---------------------------------------------------------------------------------------


def build_model(config: RewardTrainConfig):
    """``(RewardModel, tokenizer, hidden_size)``: the base LM, LoRA-wrapped (or frozen), and a fresh head."""
    from steer.models import load_model

    loaded = load_model(config.model, dtype=config.dtype)
    backbone = loaded.model
    for p in backbone.parameters():
        p.requires_grad_(False)
    if config.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        target = (config.lora_target if config.lora_target == "all-linear"
                  else [t.strip() for t in config.lora_target.split(",") if t.strip()])
        backbone = get_peft_model(
            backbone,
            LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                       target_modules=target, bias="none"),
        )
    hidden = int(loaded.model.config.hidden_size)
    torch.manual_seed(config.seed)
    model = RewardModel(backbone, len(config.objectives), hidden)
    torch.nn.init.normal_(model.head.weight, std=1.0 / math.sqrt(hidden))
    torch.nn.init.zeros_(model.head.bias)
    return model, loaded.tokenizer, hidden


def trainable_state(model: RewardModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# -- eval ----------------------------------------------------------------------------------------


def _pearson(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    ta, tb = ta - ta.mean(), tb - tb.mean()
    denom = ta.norm() * tb.norm()
    return float((ta * tb).sum() / denom) if denom > 0 else None


@torch.no_grad()
def predict(model: RewardModel, tokenizer, texts: list[str], max_length: int, batch_size: int) -> torch.Tensor:
    """``(n, k)`` head outputs (standardised-label space)."""
    outs = []
    for start in range(0, len(texts), batch_size):
        ids, mask = encode_texts(tokenizer, texts[start: start + batch_size], max_length, pad_id_of(tokenizer))
        outs.append(model(ids, mask))
    return torch.cat(outs) if outs else torch.zeros(0, model.head.out_features)


def evaluate(model: RewardModel, tokenizer, examples: list[Example], config: RewardTrainConfig,
             label_mean, label_std) -> tuple[dict, torch.Tensor]:
    """Per-objective metrics and the raw (label-scale) predictions of every eval response ``(m, k)``."""
    was_training = model.training
    model.eval()
    ratings = [e for e in examples if isinstance(e, RatingExample)]
    prefs = [e for e in examples if isinstance(e, PreferenceExample)]
    texts = [render_for_reward(tokenizer, e.conversation, e.response) for e in ratings]
    for e in prefs:
        texts += [render_for_reward(tokenizer, e.conversation, e.chosen),
                  render_for_reward(tokenizer, e.conversation, e.rejected)]
    mean, std = torch.tensor(label_mean), torch.tensor(label_std)
    raw = predict(model, tokenizer, texts, config.max_length, config.batch_size) * std + mean  # (m, k) label scale
    metrics: dict[str, dict] = {}
    for o, name in enumerate(config.objectives):
        m: dict[str, float | int | None] = {}
        pairs = [(float(raw[i, o]), e.labels[o]) for i, e in enumerate(ratings) if e.labels[o] is not None]
        if pairs:
            m["n_rated"] = len(pairs)
            m["mse"] = sum((p - y) ** 2 for p, y in pairs) / len(pairs)
            m["correlation"] = _pearson([p for p, _ in pairs], [y for _, y in pairs])
        idx = [j for j, e in enumerate(prefs) if e.objective == o]
        if idx:
            base = len(ratings)
            wins = [float(raw[base + 2 * j, o]) > float(raw[base + 2 * j + 1, o]) for j in idx]
            m["n_pairs"] = len(idx)
            m["pairwise_accuracy"] = sum(wins) / len(wins)
        if m:
            metrics[name] = m
    model.train(was_training)
    return metrics, raw


# -- checkpoints ---------------------------------------------------------------------------------


def check_resume(ckpt: Checkpoint, config: RewardTrainConfig) -> None:
    """Refuse to resume ``ckpt`` with other architecture settings than it was trained with."""
    trained = ckpt.state.get("config", {})
    for key in RewardTrainConfig.RESUME_KEYS:
        saved, now = trained.get(key), getattr(config, key)
        if (tuple(saved) if isinstance(saved, list) else saved) != now:
            raise InvalidInput(key, f"is {now!r} but {ckpt.path} was trained with {saved!r}; "
                                    "use the same value to resume")


def save_checkpoint(manager: CheckpointManager, model: RewardModel, optimizer, scheduler, step: int,
                    config: RewardTrainConfig, label_mean, label_std, logger: MetricsLogger) -> Path:
    """Checkpoint ``step`` with the shared :class:`CheckpointManager`: an atomic ``step-*`` directory of
    the trainable tensors, optimiser and schedule, every RNG, the label statistics and the metrics cursor."""
    state = {
        "config": {k: getattr(config, k) for k in RewardTrainConfig.RESUME_KEYS},
        "label_mean": list(label_mean),
        "label_std": list(label_std),
        "metrics_lines": logger.lines,
        "elapsed": logger.elapsed,
    }
    optimizer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    return manager.save(step, trainable_state(model), optimizer_state, state)


def restore_checkpoint(ckpt: Checkpoint, model: RewardModel, optimizer, scheduler) -> None:
    """Load weights, optimiser, schedule and RNG from ``ckpt`` (its step and label statistics are in ``ckpt.state``)."""
    params = dict(model.named_parameters())
    for name, value in ckpt.trainable().items():
        params[name].data.copy_(value)
    opt = ckpt.optimizer()
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    set_rng_state(ckpt.rng(0))


# -- the loop ------------------------------------------------------------------------------------


def _batches(n: int, batch_size: int, seed: int, step: int) -> tuple[int, list[int]]:
    """``(epoch, indices)`` of the batch of ``step``: epochs of seeded permutations (the preference trainer's
    :func:`epoch_order`), so a resumed run sees the same order. An epoch's last batch may be short."""
    per_epoch = max(1, math.ceil(n / batch_size))
    epoch, within = divmod(step, per_epoch)
    return epoch, epoch_order(n, seed, epoch)[within * batch_size: (within + 1) * batch_size]


def train_reward_model(config: RewardTrainConfig) -> dict:
    """Train, evaluate, save; returns the final eval metrics (also stored in reward_model.json)."""
    from tqdm.auto import tqdm

    seed_everything(config.seed)  # LoRA initialisation and dropout draw from the global RNGs
    output = check_output_dir(config.output)  # before the data and the model: creates nothing
    if config.resume:  # a missing checkpoint or a mismatch fails before any loading
        found = latest_checkpoint(output)
        if found is None:
            raise InvalidInput("resume", f"no checkpoint in {output / CHECKPOINTS}; run without --resume to start "
                                         "fresh")
        check_resume(found, config)
    examples = read_reward_files(config.data, config.objectives)
    if config.eval_data:
        train, held = examples, read_reward_files(config.eval_data, config.objectives)
    else:
        train, held = split_examples(examples, config.eval_fraction, config.seed)
    if not train:
        raise InvalidInput("data", "no training rows left after the eval split")
    log.info("reward model: %d train rows, %d eval rows, objectives %s", len(train), len(held),
             ",".join(config.objectives))

    model, tokenizer, hidden = build_model(config)
    output.mkdir(parents=True, exist_ok=True)  # every input passed: a refused run leaves no empty directory
    manager = CheckpointManager(output, DistContext(), KEEP_CHECKPOINTS)
    ckpt = check_output(config, manager)  # a fresh run never mixes into an old run's checkpoints
    label_mean, label_std = label_statistics(train, len(config.objectives))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, "constant", config.warmup_steps, config.steps)
    logger = MetricsLogger(output, resume_lines=ckpt.state["metrics_lines"] if ckpt else None,
                           elapsed=ckpt.state.get("elapsed", 0.0) if ckpt else 0.0)
    step = 0
    if ckpt is not None:
        restore_checkpoint(ckpt, model, optimizer, scheduler)
        step = ckpt.step
        label_mean, label_std = ckpt.state["label_mean"], ckpt.state["label_std"]
        log.info("resumed from %s at step %d", ckpt.path, step)
    else:
        write_config(config, output / CONFIG_DUMP)
        logger.log({"type": "start", "step": 0, "train_rows": len(train), "eval_rows": len(held),
                    "steps": config.steps, "trainable_parameters": sum(p.numel() for p in params)})

    model.train()
    saved = step if ckpt is not None else -1
    bar = tqdm(total=config.steps, initial=step, desc="reward model", disable=not config.progress, dynamic_ncols=True)
    while step < config.steps:
        epoch, idx = _batches(len(train), config.batch_size, config.seed, step)
        batch = collate([train[i] for i in idx], tokenizer, config.max_length, label_mean, label_std)
        loss, parts = batch_loss(model, batch, config.bt_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        step += 1
        logger.log({"type": "step", "step": step, "epoch": epoch, "loss": float(loss.detach()), **parts,
                    "grad_norm": float(grad_norm), "lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", **{k: f"{v:.4f}" for k, v in parts.items()})
        if held and config.eval_every and step % config.eval_every == 0 and step < config.steps:
            metrics, _ = evaluate(model, tokenizer, held, config, label_mean, label_std)
            logger.log({"type": "eval", "step": step, **_flat_metrics(metrics)})
            bar.write(f"step {step}: {_format_metrics(metrics)}")
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            saved = step
            save_checkpoint(manager, model, optimizer, scheduler, step, config, label_mean, label_std, logger)
    bar.close()
    if saved != step:  # the last step is always a checkpoint: --resume with more --steps continues the run
        save_checkpoint(manager, model, optimizer, scheduler, step, config, label_mean, label_std, logger)

    calibration_set = held or train[:512]
    metrics, raw = evaluate(model, tokenizer, calibration_set, config, label_mean, label_std)
    calibration = (Calibration.fit(config.objectives, raw, "eval split" if held else "train rows")
                   if raw.shape[0] >= 2 else None)
    spec = RewardModelSpec(
        objectives=config.objectives,
        base_model=str(Path(config.model).resolve()) if Path(config.model).exists() else config.model,
        hidden_size=hidden,
        max_length=config.max_length,
        adapter=ADAPTER_DIR if config.lora_r > 0 else None,
        label_mean=tuple(label_mean),
        label_std=tuple(label_std),
        calibration=dict(calibration.stats) if calibration else None,
        metrics=metrics if held else {},
        training={**{k: v for k, v in asdict(config).items() if k not in ("progress", "resume")},
                  "train_rows": len(train), "eval_rows": len(held), "seconds": round(logger.elapsed, 1)},
    )
    save_reward_model(output, model, spec)
    if held:
        logger.log({"type": "eval", "step": step, **_flat_metrics(metrics)})
        log.info("eval: %s", _format_metrics(metrics))
    logger.log({"type": "summary", "step": step, "saved": str(output), "config": config_to_dict(config)})
    plot_curves(output, title="steer reward model")
    return metrics


def _flat_metrics(metrics: dict) -> dict:
    """``{objective: {name: value}}`` as metrics.jsonl fields ``eval/<objective>/<name>``."""
    return {f"eval/{objective}/{name}": value for objective, m in metrics.items() for name, value in m.items()}


def _format_metrics(metrics: dict) -> str:
    out = []
    for name, m in metrics.items():
        bits = []
        if "mse" in m:
            corr = m.get("correlation")
            bits.append(f"mse {m['mse']:.3f} r {corr:.2f}" if corr is not None else f"mse {m['mse']:.3f}")
        if "pairwise_accuracy" in m:
            bits.append(f"acc {m['pairwise_accuracy']:.2f} ({m['n_pairs']} pairs)")
        out.append(f"{name}: " + ", ".join(bits))
    return "; ".join(out)
