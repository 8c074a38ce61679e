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
on the common scale. ``checkpoint.pt`` in the output directory is written atomically every
``checkpoint_every`` steps; ``resume=True`` continues from it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from steer.training.output_dir import check_output_dir
from steer.training.reward_cli import RewardTrainConfig
from steer.training.reward_data import Example, PreferenceExample, RatingExample, read_reward_files

from steer.errors import InvalidInput
from steer.files import atomic_file
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

CHECKPOINT_FILE = "checkpoint.pt"


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


def save_checkpoint(path: Path, model: RewardModel, optimizer, scheduler, step: int,
                    config: RewardTrainConfig, label_mean, label_std) -> None:
    """One file, written to a temp name and renamed: a crash never leaves a torn checkpoint."""
    state = {
        "step": step,
        "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": {k: getattr(config, k) for k in RewardTrainConfig.RESUME_KEYS},
        "label_mean": list(label_mean),
        "label_std": list(label_std),
        "rng": torch.get_rng_state(),
    }
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: Path, config: RewardTrainConfig) -> dict:
    """The checkpoint's state, after checking it was trained with the same architecture settings."""
    if not path.is_file():
        raise InvalidInput("resume", f"no checkpoint at {path}; run without --resume to start fresh")
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in RewardTrainConfig.RESUME_KEYS:
        saved, now = state["config"].get(key), getattr(config, key)
        if (tuple(saved) if isinstance(saved, list) else saved) != now:
            raise InvalidInput(key, f"is {now!r} but {path} was trained with {saved!r}; use the same value to resume")
    return state


def restore_checkpoint(state: dict, model: RewardModel, optimizer, scheduler) -> dict:
    params = dict(model.named_parameters())
    for name, value in state["trainable"].items():
        params[name].data.copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state


# -- the loop ------------------------------------------------------------------------------------


def _batches(n: int, batch_size: int, seed: int, step: int):
    """The index batch for ``step``: epochs of seeded permutations, so a resumed run sees the same order."""
    per_epoch = max(1, math.ceil(n / batch_size))
    epoch, within = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return order[within * batch_size: (within + 1) * batch_size]


def train_reward_model(config: RewardTrainConfig) -> dict:
    """Train, evaluate, save; returns the final eval metrics (also stored in reward_model.json)."""
    from tqdm.auto import tqdm

    output = check_output_dir(config.output)  # before the data and the model: creates nothing
    checkpoint = output / CHECKPOINT_FILE
    resumed = read_checkpoint(checkpoint, config) if config.resume else None  # a mismatch fails before any loading
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
    label_mean, label_std = label_statistics(train, len(config.objectives))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
    step = 0
    if resumed is not None:
        state = restore_checkpoint(resumed, model, optimizer, scheduler)
        step = int(state["step"])
        label_mean, label_std = state["label_mean"], state["label_std"]
        log.info("resumed from %s at step %d", checkpoint, step)

    model.train()
    metrics: dict = {}
    started = time.monotonic()
    bar = tqdm(total=config.steps, initial=step, desc="reward model", disable=not config.progress, dynamic_ncols=True)
    while step < config.steps:
        batch = collate([train[i] for i in _batches(len(train), config.batch_size, config.seed, step)],
                        tokenizer, config.max_length, label_mean, label_std)
        loss, parts = batch_loss(model, batch, config.bt_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", **{k: f"{v:.4f}" for k, v in parts.items()})
        if held and config.eval_every and step % config.eval_every == 0 and step < config.steps:
            metrics, _ = evaluate(model, tokenizer, held, config, label_mean, label_std)
            bar.write(f"step {step}: {_format_metrics(metrics)}")
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint(checkpoint, model, optimizer, scheduler, step, config, label_mean, label_std)
    bar.close()

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
                  "train_rows": len(train), "eval_rows": len(held), "seconds": round(time.monotonic() - started, 1)},
    )
    save_reward_model(output, model, spec)
    save_checkpoint(checkpoint, model, optimizer, scheduler, step, config, label_mean, label_std)
    if held:
        log.info("eval: %s", _format_metrics(metrics))
    return metrics


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
