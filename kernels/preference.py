"""Preference losses on per-sequence log-probs: DPO, IPO, hinge (SLiC), SimPO, ORPO, KTO.

Inputs are per-sequence *summed* token log-probs (from `linear_logprob` summed over each
completion's tokens) and, where a loss needs them, completion lengths in tokens. Everything here
is O(batch) elementwise work, so there is no Triton version: a kernel would not pay for its launch.

Notation (pairs): h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)], the margin of
policy-over-reference log-ratios between chosen y_w and rejected y_l.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo", "orpo", "kto")
NEEDS_REFERENCE = ("sigmoid", "ipo", "hinge", "kto")
NEEDS_LENGTHS = ("ipo", "simpo", "orpo")
RPO_TYPES = ("sigmoid", "ipo", "hinge", "simpo")  # the paired losses without an NLL term of their own
# ORPO's odds P / (1 - P) is infinite at P = 1; mean log-probs are clamped to at most this.
ORPO_MAX_MEAN_LOGP = -1e-6


@dataclass(frozen=True)
class PreferenceLossConfig:
    """Hyper-parameters of `preference_loss`; validated on construction."""

    loss_type: str  # one of LOSS_TYPES
    # DPO/hinge/KTO: KL strength; IPO: tau; SimPO: reward scale; ORPO: lambda (weight of the odds-ratio term)
    beta: float
    label_smoothing: float = 0.0  # sigmoid/simpo: probability that a preference label is flipped (cDPO), in [0, 0.5)
    gamma: float = 0.0  # simpo: target reward margin (paper's gamma, in reward units), >= 0
    desirable_weight: float = 1.0  # kto: lambda_D
    undesirable_weight: float = 1.0  # kto: lambda_U
    # sigmoid/ipo/hinge/simpo: weight of the token-mean NLL of the chosen completions added to the loss
    # (RPO, Pang et al. 2024; TRL's rpo_alpha): keeps the chosen answers likely while the pair's margin grows
    rpo_alpha: float = 0.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a positive finite number; got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5); got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' or 'simpo', not {self.loss_type!r}")
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"gamma must be a finite number >= 0; got {self.gamma}")
        if self.gamma and self.loss_type != "simpo":
            raise ValueError(f"gamma (the SimPO margin) applies to loss_type 'simpo', not {self.loss_type!r}")
        if not (math.isfinite(self.rpo_alpha) and self.rpo_alpha >= 0):
            raise ValueError(f"rpo_alpha must be a finite number >= 0; got {self.rpo_alpha}")
        if self.rpo_alpha and self.loss_type not in RPO_TYPES:
            raise ValueError(f"rpo_alpha applies to loss_type {', '.join(RPO_TYPES)}, not {self.loss_type!r} "
                             "(orpo has its own NLL term; kto is unpaired)")
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number; got {value}")


@dataclass(frozen=True)
class PreferenceLossOutput:
    """The loss and what a trainer logs. Rewards are the loss's implicit rewards, detached."""

    loss: Tensor  # () differentiable scalar to call backward on
    losses: Tensor  # (B,) per example (KTO: desirable then undesirable; ORPO: the odds-ratio term only)
    chosen_rewards: Tensor  # (B,) detached
    rejected_rewards: Tensor  # (B,) detached
    margin: Tensor  # () mean chosen minus mean rejected reward
    accuracy: Tensor | None  # () fraction of pairs with chosen reward > rejected; None for unpaired KTO
    extras: dict[str, Tensor] = field(default_factory=dict)  # loss-specific scalars (nll, kl, log-odds)

    def metrics(self) -> dict[str, float]:
        """Plain floats under TRL-style names, for a logger."""
        out = {
            "loss": self.loss.item(),
            "rewards/chosen": _mean(self.chosen_rewards),
            "rewards/rejected": _mean(self.rejected_rewards),
            "rewards/margins": self.margin.item(),
        }
        if self.accuracy is not None:
            out["rewards/accuracies"] = self.accuracy.item()
        out.update({name: value.item() for name, value in self.extras.items()})
        return out


def _mean(x: Tensor) -> float:
    return x.mean().item() if x.numel() else float("nan")


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, accurate at both ends (Maechler 2012): expm1 near 0, log1p far out."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _smoothed_logsigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    # cDPO (Mitchell 2023, used by TRL): labels flipped with probability eps
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _require(loss_type: str, **tensors: Tensor | None) -> None:
    for name, value in tensors.items():
        if value is None:
            what = ("the reference model's summed log-probs" if name.startswith("ref_")
                    else "completion lengths in tokens")
            raise ValueError(f"loss_type={loss_type!r} needs {name} ({what}); got None")


def _require_positive(name: str, lengths: Tensor) -> None:
    if bool((lengths <= 0).any()):
        raise ValueError(f"{name} must be positive token counts; got min {lengths.min().item()}")


def _check_shapes(pairs: dict[str, Tensor | None], paired: bool) -> None:
    shapes = {name: tuple(t.shape) for name, t in pairs.items() if t is not None}
    for name, shape in shapes.items():
        if len(shape) != 1:
            raise ValueError(f"{name} must be 1-D (one value per sequence); got shape {shape}")
    groups = [shapes] if paired else [
        {k: v for k, v in shapes.items() if "chosen" in k},
        {k: v for k, v in shapes.items() if "rejected" in k},
    ]
    for group in groups:
        if len(set(group.values())) > 1:
            raise ValueError(f"per-sequence inputs disagree on batch size: {group}")


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    loss_type: str,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_nll: Tensor | None = None,
    kl_policy_logps: Tensor | None = None,
    kl_ref_logps: Tensor | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    rpo_alpha: float = 0.0,
) -> PreferenceLossOutput:
    """One preference loss on per-sequence summed log-probs; see `PreferenceLossConfig` for the knobs.

    policy_/ref_ chosen/rejected_logps: (B,) summed completion log-probs under the policy / the
    frozen reference (sigmoid, ipo, hinge, kto need references; simpo, orpo ignore them).
    chosen_/rejected_lengths: (B,) completion token counts (ipo, simpo, orpo average by them).
    chosen_nll: ORPO's SFT term, and RPO's (``rpo_alpha`` > 0: loss + rpo_alpha * chosen_nll); default
    -sum(policy_chosen_logps) / sum(chosen_lengths), the token-mean NLL of the chosen completions (what
    a cross-entropy over their tokens gives).
    KTO: "chosen" are desirable and "rejected" undesirable examples, unpaired (batch sizes may
    differ, either may be empty). Its reference point z_ref is the mean of
    kl_policy_logps - kl_ref_logps, the log-ratios of mismatched completions y' for the same
    prompts as in the paper and TRL; without them it falls back to the batch mean of all
    policy-reference log-ratios (chosen and rejected), a cheaper but biased estimate. Either way
    z_ref is detached and clamped at 0, and is the mean over this process's batch only.
    """
    cfg = PreferenceLossConfig(loss_type, beta, label_smoothing, gamma, desirable_weight, undesirable_weight,
                               rpo_alpha)
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    if loss_type in NEEDS_REFERENCE:
        _require(loss_type, ref_chosen_logps=rc, ref_rejected_logps=rr)
    if rpo_alpha and chosen_nll is None:
        if chosen_lengths is None:
            raise ValueError("rpo_alpha needs chosen_lengths (completion lengths in tokens) or chosen_nll; got None")
        _require_positive("chosen_lengths", chosen_lengths)
    if loss_type in NEEDS_LENGTHS:
        _require(loss_type, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        _require_positive("chosen_lengths", chosen_lengths)
        _require_positive("rejected_lengths", rejected_lengths)
    _check_shapes(
        {"policy_chosen_logps": pc, "policy_rejected_logps": pr, "ref_chosen_logps": rc,
         "ref_rejected_logps": rr, "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths},
        paired=loss_type != "kto",
    )
    if loss_type == "kto":
        return _kto(cfg, pc, pr, rc, rr, kl_policy_logps, kl_ref_logps)

    extras: dict[str, Tensor] = {}
    if loss_type in ("sigmoid", "ipo", "hinge"):
        if loss_type == "ipo":
            # TRL's IPO: log-probs averaged over completion tokens (policy and reference alike),
            # so the target margin 1/(2 tau) does not depend on sequence length.
            pc, rc = pc / chosen_lengths, rc / chosen_lengths
            pr, rr = pr / rejected_lengths, rr / rejected_lengths
        chosen_ratio, rejected_ratio = pc - rc, pr - rr  # (B,) log pi/ref
        h = chosen_ratio - rejected_ratio  # (B,)
        if loss_type == "sigmoid":
            # Rafailov et al. 2023 (DPO), eq. 7: -log sigmoid(beta h); with label smoothing, cDPO.
            losses = _smoothed_logsigmoid_loss(beta * h, label_smoothing)
        elif loss_type == "ipo":
            # Azar et al. 2023 (IPO), eq. 17: (h - 1/(2 tau))^2, tau = beta.
            losses = (h - 1 / (2 * beta)) ** 2
        else:
            # Zhao et al. 2023 (SLiC-HF), eq. 1 rank-calibration hinge max(0, delta - log-ratio margin),
            # in the reference-ratio form of TRL: relu(1 - beta h), i.e. margin delta = 1/beta.
            losses = torch.relu(1 - beta * h)
        chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    elif loss_type == "simpo":
        # Meng et al. 2024 (SimPO), eq. 6: -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma);
        # no reference model. Label smoothing as in cDPO (the SimPO reference code offers it too).
        chosen_rewards, rejected_rewards = beta * pc / chosen_lengths, beta * pr / rejected_lengths
        losses = _smoothed_logsigmoid_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing)
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    else:  # orpo
        # Hong et al. 2024 (ORPO), eq. 6-7: L = L_SFT + lambda * L_OR,
        # L_OR = -log sigmoid(log odds(y_w) - log odds(y_l)), odds(y) = P(y) / (1 - P(y)) with
        # P(y) = exp(mean token log-prob) (the paper's length-normalised likelihood).
        mean_c = (pc / chosen_lengths).clamp(max=ORPO_MAX_MEAN_LOGP)  # (B,)
        mean_r = (pr / rejected_lengths).clamp(max=ORPO_MAX_MEAN_LOGP)  # (B,)
        log_odds = (mean_c - _log1mexp(mean_c)) - (mean_r - _log1mexp(mean_r))  # (B,)
        losses = -beta * F.logsigmoid(log_odds)
        nll = chosen_nll if chosen_nll is not None else -pc.sum() / chosen_lengths.sum()
        extras = {"nll_loss": nll.detach(), "log_odds_ratio": F.logsigmoid(log_odds).mean().detach(),
                  "log_odds_chosen": log_odds.mean().detach()}
        chosen_rewards, rejected_rewards = beta * mean_c.detach(), beta * mean_r.detach()
        return PreferenceLossOutput(
            loss=nll + losses.mean(), losses=losses, chosen_rewards=chosen_rewards,
            rejected_rewards=rejected_rewards, margin=(chosen_rewards - rejected_rewards).mean(),
            accuracy=(chosen_rewards > rejected_rewards).float().mean(), extras=extras,
        )
    loss = losses.mean()
    if rpo_alpha:
        # RPO: the chosen completions' token-mean NLL under the policy (before IPO's per-token averaging).
        nll = chosen_nll if chosen_nll is not None else -policy_chosen_logps.sum() / chosen_lengths.sum()
        loss = loss + rpo_alpha * nll
        extras["nll_loss"] = nll.detach()
    return PreferenceLossOutput(
        loss=loss, losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
        margin=(chosen_rewards - rejected_rewards).mean(),
        accuracy=(chosen_rewards > rejected_rewards).float().mean(), extras=extras,
    )


def _kto(cfg: PreferenceLossConfig, pc, pr, rc, rr, kl_policy_logps, kl_ref_logps) -> PreferenceLossOutput:
    # Ethayarajh et al. 2024 (KTO), eq. 8: L = E_y[lambda_y - v(x, y)], with r = log pi/ref and
    #   v = lambda_D sigmoid(beta (r - z_ref)) for desirable y, lambda_U sigmoid(beta (z_ref - r)) for undesirable.
    if (kl_policy_logps is None) != (kl_ref_logps is None):
        missing = "kl_ref_logps" if kl_ref_logps is None else "kl_policy_logps"
        raise ValueError("loss_type='kto' got one of kl_policy_logps / kl_ref_logps "
                         f"without the other ({missing} is None)")
    chosen_ratio, rejected_ratio = pc - rc, pr - rr  # (B_d,), (B_u,)
    with torch.no_grad():  # z_ref is a reference point, not a path for gradients (paper, section 4.1)
        if kl_policy_logps is not None:
            kl = (kl_policy_logps - kl_ref_logps).mean()
        else:
            kl = torch.cat([chosen_ratio, rejected_ratio]).mean()
        kl = kl.clamp(min=0)
    beta = cfg.beta
    chosen_losses = cfg.desirable_weight * (1 - torch.sigmoid(beta * (chosen_ratio - kl)))  # (B_d,)
    rejected_losses = cfg.undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected_ratio)))  # (B_u,)
    losses = torch.cat([chosen_losses, rejected_losses])  # (B_d + B_u,)
    if losses.numel() == 0:
        raise ValueError("loss_type='kto' got no examples: "
                         "policy_chosen_logps and policy_rejected_logps are both empty")
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    nan = losses.new_tensor(float("nan"))
    margin = (chosen_rewards.mean() if chosen_rewards.numel() else nan) - (
        rejected_rewards.mean() if rejected_rewards.numel() else nan)
    return PreferenceLossOutput(
        loss=losses.mean(), losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
        margin=margin, accuracy=None, extras={"kl": kl},
    )
