"""The preference trainer shared by ``dpo`` and ``dpa``: losses on batches, the step loop, checkpoints.

One optimiser step takes a *global batch* of ``batch_size x grad_accum x ranks`` examples in an
order that is a pure function of ``(seed, epoch, salt)``. Each rank runs its ``grad_accum``
micro-batches (``distributed.rank_micro_batches``), scaling each micro-batch loss by
``1 / grad_accum``; DDP averages gradients over ranks; then clip, AdamW, LR schedule. Per-sequence
log-probs come from the fused op (``logprobs.py``); the reference is the adapter-disabled policy
(LoRA) or log-probs precomputed once (full fine-tuning, or ``precompute_ref``).

Batch-level statistics make some losses depend on how a global batch is cut into micro-batches
(ORPO's and SFT's token-mean NLL, KTO's reference point z_ref); sigmoid, IPO, hinge and SimPO are
plain means over pairs and give the same update however the batch is split.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from steer.kernels import preference_loss

from steer.errors import InvalidInput
from steer.models import bf16_native, pad_token_id

from .checkpoint import Checkpoint, CheckpointManager, set_rng_state
from .distributed import DistContext, all_gather_object, all_reduce_mean, all_reduce_sum_, rank_micro_batches, wrap_ddp
from .logprobs import SequenceLogprobs, completion_logprob_rows, sequence_logprobs
from .memory import HeapTrimmer
from .metrics import MetricsLogger
from .pairs import EncodedExample, collate
from .policy import Policy
from .settings import TrainerConfig


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at step s: linear warmup, then constant / linear / cosine to 0 at ``total``."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return f


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int,
                    total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule of every training loop (preference trainer, reward model): :func:`lr_lambda`
    times ``optimizer``'s peak LR, stepped once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup, total))


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``bf16`` or ``fp32`` for a ``--precision`` value (``auto``: bf16 where :func:`bf16_native`)."""
    if precision not in PRECISIONS:
        raise InvalidInput("precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """The forward context of a resolved precision: bf16 autocast, or nothing (fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def epoch_order(n: int, seed: int, epoch: int, salt: int = 0) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch, salt)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + salt * 10_007 + epoch) % (2**63))
    return torch.randperm(n, generator=g).tolist()


@torch.inference_mode()
def reference_logps(model_or_policy, data: list[EncodedExample], ctx: DistContext, *, batch_size: int,
                    impl: str = "fused", progress: bool = False, precision: str = "fp32") -> torch.Tensor:
    """``(n, S)`` reference log-probs of every sequence of every example (S = sequences per example).

    ``model_or_policy``: a LoRA :class:`Policy` (its adapter is switched off) or a frozen model.
    ``precision``: a resolved precision (``bf16`` or ``fp32``), the one the policy trains in.
    Each rank scores every ``world_size``-th example; the results are gathered on every rank.
    """
    from tqdm.auto import tqdm

    if isinstance(model_or_policy, Policy):
        model, ctx_manager = model_or_policy.model, model_or_policy.reference
    else:
        model, ctx_manager = model_or_policy, contextlib.nullcontext
    pad = _pad_id(model_or_policy)
    mine = list(range(ctx.rank, len(data), ctx.world_size))
    S = len(data[0].sequences)
    out = {}
    chunks = range(0, len(mine), batch_size)
    for start in tqdm(chunks, desc="reference log-probs", unit="batch", disable=not (progress and ctx.is_main)):
        idx = mine[start:start + batch_size]
        seqs = [data[i].sequences[s] for s in range(S) for i in idx]  # sequence-major: all s=0, then s=1
        batch = collate(seqs, pad).to(ctx.device)
        with ctx_manager(), autocast(precision, ctx.device):
            logps = sequence_logprobs(model, batch, impl=impl).logps.float().cpu()  # (S * b,)
        for j, i in enumerate(idx):
            out[i] = [float(logps[s * len(idx) + j]) for s in range(S)]
    merged = {}
    for part in all_gather_object(ctx, out):
        merged.update(part)
    with torch.inference_mode(False):  # a normal tensor: the loss takes it next to tensors that need gradients
        return torch.tensor([merged[i] for i in range(len(data))], dtype=torch.float32)  # (n, S)


def _pad_id(model_or_policy) -> int:
    """:func:`steer.models.pad_token_id` of a Policy (its tokenizer) or a bare model (its config)."""
    return pad_token_id(getattr(model_or_policy, "tokenizer", None), getattr(model_or_policy, "config", None))


@dataclass
class StepResult:
    loss: torch.Tensor  # () differentiable
    metrics: dict[str, float]
    tokens: int


class PreferenceTrainer:
    """Owns the optimiser, LR schedule, step counter and checkpoints of one policy."""

    def __init__(self, config: TrainerConfig, policy: Policy, ctx: DistContext, total_steps: int,
                 manager: CheckpointManager | None = None, logger: MetricsLogger | None = None):
        self.config = config
        self.policy = policy
        self.ctx = ctx
        self.precision = resolve_precision(config.precision, ctx.device)  # "bf16" or "fp32"
        self.forward = wrap_ddp(SequenceLogprobs(policy.model, config.logprob_impl), ctx)
        self.params = [p for _, p in policy.named_trainable()]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay,
                                           eps=config.adam_eps)
        self.scheduler = build_scheduler(self.optimizer, config.lr_schedule, config.warmup_steps, total_steps)
        self.total_steps = total_steps
        self.manager = manager
        self.logger = logger
        self.step = 0
        self.pad_id = _pad_id(policy)
        # Precomputed reference log-probs of the current data, (n, S); None: live adapter-disabled reference.
        self.ref: torch.Tensor | None = None
        self.trimmer = HeapTrimmer(policy.model) if config.release_memory and ctx.device.type == "cpu" else None

    # -- losses -----------------------------------------------------------------------------

    def _reference(self, batch, idx: list[int], column: int) -> torch.Tensor:
        """Reference log-probs: precomputed, sequence ``column`` of examples ``idx`` ``(b,)``; live,
        every row of ``batch`` ``(rows,)`` through the adapter-disabled policy."""
        if self.ref is not None:
            return self.ref[idx, column].to(self.ctx.device)
        model = self.policy.model
        with torch.inference_mode(), self.policy.reference(), self.autocast():
            # The reference is a fixed model: no dropout in it (the base model's own, if it has any).
            model.eval()
            try:
                logps = sequence_logprobs(model, batch, impl=self.config.logprob_impl).logps
            finally:
                model.train()
        return logps.clone()  # a normal tensor: inference tensors cannot be saved for the loss's backward

    def autocast(self):
        """The context every forward of this trainer runs in (policy, reference, KL rows)."""
        return autocast(self.precision, self.ctx.device)

    def micro_batch_loss(self, data: list[EncodedExample], idx: list[int]) -> StepResult:
        """The configured loss on examples ``data[idx]`` (policy log-probs with gradients)."""
        cfg = self.config
        examples = [data[i] for i in idx]
        b = len(examples)
        dev = self.ctx.device
        if cfg.loss == "distill":
            return self._distill_loss(examples)
        if cfg.loss == "sft":
            batch = collate([e.sequences[0] for e in examples], self.pad_id).to(dev)
            with self.autocast(), self.policy.rows(examples):
                logps, counts = self.forward(batch.input_ids, batch.attention_mask, batch.labels)  # (b,), (b,)
            loss = -logps.sum() / counts.sum()  # token-mean NLL of the chosen responses
            return StepResult(loss, {"loss": loss.item(), "nll": loss.item(), "logps/chosen": logps.mean().item()},
                              batch.tokens)
        if examples[0].label is None:  # pairs: one forward over chosen rows then rejected rows
            batch = collate([e.sequences[0] for e in examples] + [e.sequences[1] for e in examples],
                            self.pad_id).to(dev)
            rc = rr = None
            if cfg.needs_reference:  # before the policy pass, so its activations never coexist with the policy's graph
                if self.ref is not None:
                    rc, rr = self._reference(None, idx, 0), self._reference(None, idx, 1)
                else:
                    ref = self._reference(batch, idx, 0)  # (2b,): the same rows, adapter off
                    rc, rr = ref[:b], ref[b:]
            with self.autocast(), self.policy.rows(examples, copies=2):
                logps, counts = self.forward(batch.input_ids, batch.attention_mask, batch.labels)  # (2b,), (2b,)
            out = preference_loss(
                logps[:b], logps[b:], rc, rr, loss_type=cfg.loss, beta=cfg.effective_beta,
                chosen_lengths=counts[:b], rejected_lengths=counts[b:], label_smoothing=cfg.label_smoothing,
                gamma=cfg.effective_gamma, rpo_alpha=cfg.rpo_alpha,
            )
            metrics = out.metrics()
            metrics.update({"logps/chosen": logps[:b].mean().item(), "logps/rejected": logps[b:].mean().item()})
            return StepResult(out.loss, metrics, batch.tokens)
        # KTO, unpaired: completions with gradients, KL (mismatched) rows without.
        batch = collate([e.sequences[0] for e in examples], self.pad_id).to(dev)
        kl_batch = collate([e.sequences[1] for e in examples], self.pad_id).to(dev)
        ref = self._reference(batch, idx, 0)  # (b,)
        kl_ref = self._reference(kl_batch, idx, 1)  # (b,)
        with torch.inference_mode(), self.autocast(), self.policy.rows(examples):
            kl_policy = sequence_logprobs(self.policy.model, kl_batch, impl=cfg.logprob_impl).logps.clone()  # (b,)
        with self.autocast(), self.policy.rows(examples):
            logps, _ = self.forward(batch.input_ids, batch.attention_mask, batch.labels)  # (b,)
        desirable = torch.tensor([bool(e.label) for e in examples], device=dev)  # (b,)
        out = preference_loss(
            logps[desirable], logps[~desirable], ref[desirable], ref[~desirable], loss_type="kto",
            beta=cfg.effective_beta, kl_policy_logps=kl_policy, kl_ref_logps=kl_ref,
        )
        return StepResult(out.loss, out.metrics(), batch.tokens + kl_batch.tokens)

    def _distill_loss(self, examples: list[EncodedExample]) -> StepResult:
        """Context distillation (:mod:`steer.training.distill`): the teacher is the adapter-disabled
        model on ``sequences[1]`` (the instructed prompt), the student the policy on ``sequences[0]``
        (the direction line), on the same completion tokens. Teacher first, under inference mode,
        so its activations never coexist with the student's graph."""
        from .distill import distill_loss

        dev = self.ctx.device
        student = collate([e.sequences[0] for e in examples], self.pad_id).to(dev)
        teacher = collate([e.sequences[1] for e in examples], self.pad_id).to(dev)
        model = self.policy.model
        with torch.inference_mode(), self.policy.reference(), self.autocast():
            model.eval()
            try:
                teacher_logp = completion_logprob_rows(model, teacher)  # (N, V)
            finally:
                model.train()
        teacher_logp = teacher_logp.clone()  # a normal tensor next to the student's graph
        with self.autocast(), self.policy.rows(examples):
            student_logp = self.forward(student.input_ids, student.attention_mask, student.labels, rows=True)  # (N, V)
        loss, metrics = distill_loss(student_logp, teacher_logp)
        return StepResult(loss, metrics, student.tokens + teacher.tokens)

    # -- steps ------------------------------------------------------------------------------

    def train_step(self, data: list[EncodedExample], micro_batches: list[list[int]]) -> dict[str, float]:
        """One optimiser step over this rank's micro-batches; returns metrics averaged over micro-batches and ranks."""
        self.policy.model.train()
        n = len(micro_batches)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        tokens = 0
        for i, idx in enumerate(micro_batches):
            last = i == n - 1
            # DDP all-reduces gradients on the last micro-batch only; the others accumulate locally.
            sync = self.forward.no_sync() if (self.ctx.enabled and not last) else contextlib.nullcontext()
            with self.trimmer.active() if self.trimmer else contextlib.nullcontext():
                result = self.micro_batch_loss(data, idx)
                with sync:
                    (result.loss / n).backward()
            tokens += result.tokens
            for k, v in result.metrics.items():
                if isinstance(v, float) and math.isfinite(v):
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
        if self.config.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm()
                                                              for p in self.params if p.grad is not None]))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = {k: sums[k] / counts[k] for k in sums}
        metrics = all_reduce_mean(self.ctx, metrics) if self.ctx.enabled else metrics
        total_tokens = all_reduce_sum_(self.ctx, torch.tensor([tokens], dtype=torch.float64, device=self.ctx.device))
        metrics.update({"grad_norm": float(grad_norm), "lr": lr, "tokens": int(total_tokens.item())})
        return metrics

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.config.grad_accum * self.ctx.world_size

    def steps_per_epoch(self, n: int) -> int:
        return math.ceil(n / self.global_batch)

    def fit(self, data: list[EncodedExample], *, epochs: int, cursor: tuple[int, int] = (0, 0), salt: int = 0,
            max_steps: int = 0, extra_state: Callable[[], dict] | None = None, record: dict | None = None,
            desc: str = "train") -> int:
        """Train ``epochs`` passes over ``data`` from ``cursor = (epoch, batch)``; returns steps taken.

        Like ``DistributedSampler(drop_last=False)``, an epoch whose size is not a multiple of the
        global batch is padded with its own first examples, so every step (and every rank) gets a
        full batch and no example is left out. ``record`` adds fields to every metrics record (DPA: the
        iteration). Checkpoints every ``save_every`` global steps record the cursor and ``extra_state()``.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        G = self.global_batch
        per_epoch = self.steps_per_epoch(len(data))
        planned = epochs * per_epoch
        done = cursor[0] * per_epoch + cursor[1]
        if max_steps:
            planned = min(planned, done + max(0, max_steps - self.step))
        bar = tqdm(total=planned, initial=min(done, planned), desc=desc, unit="step",
                   disable=not (cfg.progress and self.ctx.is_main))
        taken = 0
        try:
            for epoch in range(cursor[0], epochs):
                order = epoch_order(len(data), cfg.seed, epoch, salt)
                order += [order[i % len(order)] for i in range(per_epoch * G - len(order))]  # pad to whole batches
                for b in range(cursor[1] if epoch == cursor[0] else 0, per_epoch):
                    if max_steps and self.step >= max_steps:
                        return taken
                    micro = rank_micro_batches(order[b * G:(b + 1) * G], self.ctx.rank, self.ctx.world_size,
                                               cfg.grad_accum)
                    metrics = self.train_step(data, micro)
                    taken += 1
                    if self.logger is not None:
                        self.logger.log({"type": "step", "step": self.step, "epoch": epoch,
                                         **(record or {}), **metrics})
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}")
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        nxt = (epoch, b + 1) if b + 1 < per_epoch else (epoch + 1, 0)
                        self.save(nxt, extra_state() if extra_state else {})
        finally:
            bar.close()
        return taken

    # -- checkpoints ------------------------------------------------------------------------

    def save(self, cursor: tuple[int, int], extra: dict) -> None:
        if self.manager is None:
            return
        state = {"cursor": list(cursor), "extra": extra,
                 "metrics_lines": self.logger.lines if self.logger else 0,
                 "elapsed": self.logger.elapsed if self.logger else 0.0}
        optimizer = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        self.manager.save(self.step, self.policy.trainable_state(), optimizer, state)

    def restore(self, ckpt: Checkpoint) -> dict:
        """Load weights, optimiser, schedule, step and this rank's RNG from ``ckpt``; returns its state."""
        if ckpt.state.get("world_size", 1) != self.ctx.world_size:
            raise InvalidInput("resume", f"{ckpt.path} was written by {ckpt.state.get('world_size')} ranks; "
                               f"resume with the same number (now {self.ctx.world_size})")
        self.policy.load_trainable_state(ckpt.trainable())
        opt = ckpt.optimizer()
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        self.step = ckpt.step
        set_rng_state(ckpt.rng(self.ctx.rank))
        return ckpt.state
