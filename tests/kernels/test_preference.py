"""preference_loss: each branch against its paper's formula worked out by hand on a few scalars."""

from __future__ import annotations

import math

import pytest
import torch
from steer.kernels import PreferenceLossConfig, preference_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


# Two pairs: log-ratios chosen (1, -2), rejected (-0.5, 1), so h = (1.5, -3).
PC, PR, RC, RR = (-10.0, -20.0), (-12.0, -15.0), (-11.0, -18.0), (-11.5, -16.0)


def pairs():
    return t(*PC), t(*PR), t(*RC), t(*RR)


def test_dpo_sigmoid_eq7():
    pc, pr, rc, rr = pairs()
    beta = 0.1
    out = preference_loss(pc, pr, rc, rr, loss_type="sigmoid", beta=beta)
    expected = [-log_sigmoid(beta * 1.5), -log_sigmoid(beta * -3.0)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.2])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.05, 0.1])
    assert out.margin.item() == pytest.approx((0.15 - 0.3) / 2)
    assert out.accuracy.item() == 0.5
    # d loss / d log pi(y_w)_i = -beta sigmoid(-beta h_i) / B: raising the chosen log-prob lowers the loss.
    out.loss.backward()
    assert pc.grad.tolist() == pytest.approx([-beta * sigmoid(-0.15) / 2, -beta * sigmoid(0.3) / 2], rel=1e-12)
    assert pr.grad.tolist() == pytest.approx([beta * sigmoid(-0.15) / 2, beta * sigmoid(0.3) / 2], rel=1e-12)
    assert rc.grad.tolist() == pytest.approx((-pc.grad).tolist())  # references enter with the opposite sign


def test_dpo_label_smoothing_is_cdpo():
    pc, pr, rc, rr = pairs()
    eps, beta = 0.1, 0.1
    out = preference_loss(pc, pr, rc, rr, loss_type="sigmoid", beta=beta, label_smoothing=eps)
    expected = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in (1.5, -3.0)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_rpo_adds_alpha_times_the_chosen_token_mean_nll():
    """RPO (Pang et al. 2024; TRL's rpo_alpha): DPO's loss + alpha * (-sum log pi(y_w)) / sum |y_w|."""
    pc, pr, rc, rr = pairs()
    beta, alpha, lc = 0.1, 0.5, torch.tensor([4, 6])
    out = preference_loss(pc, pr, rc, rr, loss_type="sigmoid", beta=beta, rpo_alpha=alpha, chosen_lengths=lc)
    dpo = (-log_sigmoid(beta * 1.5) - log_sigmoid(beta * -3.0)) / 2
    nll = (10.0 + 20.0) / (4 + 6)
    assert out.loss.item() == pytest.approx(dpo + alpha * nll, rel=1e-12)
    assert out.extras["nll_loss"].item() == pytest.approx(nll)
    assert out.losses.tolist() == pytest.approx([-log_sigmoid(beta * 1.5), -log_sigmoid(beta * -3.0)])  # DPO only
    out.loss.backward()
    # the NLL pulls every chosen log-prob up by alpha / sum |y_w| on top of DPO's gradient
    dpo_grad = [-beta * sigmoid(-0.15) / 2, -beta * sigmoid(0.3) / 2]
    assert pc.grad.tolist() == pytest.approx([g - alpha / 10 for g in dpo_grad], rel=1e-12)
    assert pr.grad.tolist() == pytest.approx([beta * sigmoid(-0.15) / 2, beta * sigmoid(0.3) / 2], rel=1e-12)
    # IPO divides its log-probs by length for the margin; the NLL still uses the summed log-probs
    pc, pr, rc, rr = pairs()
    ipo = preference_loss(pc, pr, rc, rr, loss_type="ipo", beta=beta, chosen_lengths=lc,
                          rejected_lengths=torch.tensor([2, 3]))
    with_rpo = preference_loss(pc, pr, rc, rr, loss_type="ipo", beta=beta, chosen_lengths=lc,
                               rejected_lengths=torch.tensor([2, 3]), rpo_alpha=alpha)
    assert with_rpo.loss.item() == pytest.approx(ipo.loss.item() + alpha * nll, rel=1e-12)


def test_ipo_eq17_on_length_averaged_log_ratios():
    pc, pr, rc, rr = pairs()
    lc, lr = torch.tensor([4, 5]), torch.tensor([2, 10])
    beta = 0.5  # tau; target margin 1 / (2 tau) = 1
    out = preference_loss(pc, pr, rc, rr, loss_type="ipo", beta=beta, chosen_lengths=lc, rejected_lengths=lr)
    h = [(1 / 4) - (-0.5 / 2), (-2 / 5) - (1 / 10)]  # (0.5, -0.5)
    assert out.losses.tolist() == pytest.approx([(h[0] - 1) ** 2, (h[1] - 1) ** 2], rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([beta / 4, beta * -2 / 5])
    out.loss.backward()
    assert pc.grad.tolist() == pytest.approx([2 * (h[0] - 1) / 4 / 2, 2 * (h[1] - 1) / 5 / 2], rel=1e-12)


def test_hinge_slic():
    pc, pr, rc, rr = pairs()
    out = preference_loss(pc, pr, rc, rr, loss_type="hinge", beta=0.5)
    assert out.losses.tolist() == pytest.approx([max(0.0, 1 - 0.5 * 1.5), max(0.0, 1 + 0.5 * 3.0)])  # (0.25, 2.5)
    out.loss.backward()
    assert pc.grad.tolist() == pytest.approx([-0.5 / 2, -0.5 / 2])
    # beyond the margin (beta h >= 1) the pair contributes neither loss nor gradient
    pc2, pr2, rc2, rr2 = t(-1.0), t(-9.0), t(-5.0), t(-5.0)  # h = 4 + 4 = 8
    out = preference_loss(pc2, pr2, rc2, rr2, loss_type="hinge", beta=0.5)
    out.loss.backward()
    assert out.loss.item() == 0.0 and pc2.grad.item() == 0.0


def test_simpo_eq6():
    pc, pr = t(-10.0, -6.0), t(-12.0, -3.0)
    lc, lr = torch.tensor([4, 2]), torch.tensor([3, 3])
    beta, gamma = 2.0, 0.5
    out = preference_loss(pc, pr, loss_type="simpo", beta=beta, gamma=gamma, chosen_lengths=lc, rejected_lengths=lr)
    # first pair: beta * (-10/4) - beta * (-12/3) - gamma = -5 + 8 - 0.5 = 2.5
    # second pair: beta * (-6/2) - beta * (-3/3) - gamma = -6 + 2 - 0.5 = -4.5
    assert out.losses.tolist() == pytest.approx([-log_sigmoid(2.5), -log_sigmoid(-4.5)], rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([-5.0, -6.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-8.0, -2.0])
    assert out.accuracy.item() == 0.5


def test_orpo_eq6_7():
    pc, pr = t(-4.0), t(-9.0)
    lc, lr = torch.tensor([8]), torch.tensor([6])
    lam = 0.1
    out = preference_loss(pc, pr, loss_type="orpo", beta=lam, chosen_lengths=lc, rejected_lengths=lr)
    mc, mr = -0.5, -1.5  # mean token log-probs
    log_odds = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))
    l_or = -log_sigmoid(log_odds)
    nll = 4.0 / 8  # token-mean NLL of the chosen completion
    assert out.losses.item() == pytest.approx(lam * l_or, rel=1e-12)
    assert out.loss.item() == pytest.approx(nll + lam * l_or, rel=1e-12)
    assert out.extras["nll_loss"].item() == pytest.approx(nll)
    assert out.extras["log_odds_chosen"].item() == pytest.approx(log_odds, rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(lam * mc)
    # an explicit NLL (e.g. from a cross-entropy the trainer already has) replaces the default
    out = preference_loss(pc, pr, loss_type="orpo", beta=lam, chosen_lengths=lc, rejected_lengths=lr,
                          chosen_nll=torch.tensor(0.7, dtype=torch.float64))
    assert out.loss.item() == pytest.approx(0.7 + lam * l_or, rel=1e-12)


def test_orpo_is_finite_when_a_sequence_has_probability_one():
    pc, pr = t(0.0), t(-3.0)
    out = preference_loss(pc, pr, loss_type="orpo", beta=0.1, chosen_lengths=torch.tensor([3]),
                          rejected_lengths=torch.tensor([3]))
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and math.isfinite(pc.grad.item())


def test_kto_eq8_with_batch_kl_fallback():
    pc, rc = t(-10.0, -8.0), t(-11.0, -8.0)  # desirable, log-ratios (1, 0)
    pr, rr = t(-12.0), t(-11.0)  # undesirable, log-ratio -1
    beta, lam_d, lam_u = 0.1, 1.0, 1.5
    out = preference_loss(pc, pr, rc, rr, loss_type="kto", beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)
    z = max(0.0, (1 + 0 - 1) / 3)  # batch mean of all log-ratios, clamped at 0
    expected = [lam_d * (1 - sigmoid(beta * (1 - z))), lam_d * (1 - sigmoid(beta * (0 - z))),
                lam_u * (1 - sigmoid(beta * (z + 1)))]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-12)
    assert out.accuracy is None and out.extras["kl"].item() == pytest.approx(z)
    assert out.margin.item() == pytest.approx(beta * 0.5 - beta * -1)
    # z_ref is detached: the gradient through the first example is its direct term only
    out.loss.backward()
    x = beta * (1 - z)
    assert pc.grad[0].item() == pytest.approx(-lam_d * beta * sigmoid(x) * (1 - sigmoid(x)) / 3, rel=1e-12)


def test_kto_reference_point_from_mismatched_completions():
    pc, rc, pr, rr = t(-10.0, -8.0), t(-11.0, -8.0), t(-12.0), t(-11.0)
    kl_policy, kl_ref = t(-9.0, -9.5), t(-10.0, -10.0)  # log-ratios (1, 0.5): z_ref = 0.75
    out = preference_loss(pc, pr, rc, rr, loss_type="kto", beta=0.1, kl_policy_logps=kl_policy, kl_ref_logps=kl_ref)
    z = 0.75
    expected = [1 - sigmoid(0.1 * (1 - z)), 1 - sigmoid(0.1 * (0 - z)), 1 - sigmoid(0.1 * (z + 1))]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    out.loss.backward()
    assert kl_policy.grad is None, "z_ref must not carry gradients"
    # a negative KL estimate is clamped to 0
    out = preference_loss(pc, pr, rc, rr, loss_type="kto", beta=0.1, kl_policy_logps=t(-11.0), kl_ref_logps=t(-10.0))
    assert out.extras["kl"].item() == 0.0


def test_kto_accepts_unpaired_and_one_sided_batches():
    out = preference_loss(t(-3.0, -4.0, -5.0), t(), t(-3.0, -4.0, -5.0), t(), loss_type="kto", beta=0.1)
    assert out.losses.shape == (3,) and out.loss.item() == pytest.approx(0.5)  # all log-ratios 0: 1 - sigmoid(0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo", "orpo", "kto"])
def test_gradients_match_finite_differences(loss_type):
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-(torch.rand(4, generator=gen, dtype=torch.float64) * 20 + 1) for _ in range(4))
    lengths = torch.tensor([3, 7, 11, 20])
    kwargs = {"loss_type": loss_type, "beta": 0.1, "chosen_lengths": lengths, "rejected_lengths": lengths.flip(0)}
    if loss_type == "simpo":
        kwargs["gamma"] = 0.3
    if loss_type in ("sigmoid", "simpo"):  # and RPO's NLL term on top
        kwargs["rpo_alpha"] = 0.7

    def loss(a, b):
        return preference_loss(a, b, rc, rr, **kwargs).loss

    assert torch.autograd.gradcheck(loss, (pc.requires_grad_(), pr.requires_grad_()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_type": "dpo"}, "loss_type='dpo' is not one of sigmoid, ipo"),
        ({"loss_type": "sigmoid", "ref_chosen_logps": None}, "needs ref_chosen_logps"),
        ({"loss_type": "kto", "ref_rejected_logps": None}, "needs ref_rejected_logps"),
        ({"loss_type": "simpo", "chosen_lengths": None}, "needs chosen_lengths"),
        ({"loss_type": "ipo", "rejected_lengths": None}, "needs rejected_lengths"),
        ({"loss_type": "orpo", "chosen_lengths": torch.tensor([3, 0])}, "chosen_lengths must be positive"),
        ({"loss_type": "sigmoid", "beta": 0.0}, "beta must be a positive"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing applies to"),
        ({"loss_type": "sigmoid", "label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"loss_type": "sigmoid", "gamma": 1.0}, "gamma .* applies to loss_type 'simpo'"),
        ({"loss_type": "sigmoid", "policy_rejected_logps": torch.zeros(3)}, "disagree on batch size"),
        ({"loss_type": "sigmoid", "policy_chosen_logps": torch.zeros(2, 1)}, "must be 1-D"),
        ({"loss_type": "kto", "kl_policy_logps": torch.zeros(2)}, "kl_ref_logps is None"),
        ({"loss_type": "orpo", "rpo_alpha": 1.0}, "rpo_alpha applies to loss_type sigmoid, ipo, hinge, simpo"),
        ({"loss_type": "sigmoid", "rpo_alpha": -1.0}, "rpo_alpha must be a finite number >= 0"),
        ({"loss_type": "sigmoid", "rpo_alpha": 1.0, "chosen_lengths": None}, "rpo_alpha needs chosen_lengths"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_arguments_are_named(kwargs, match):
    args = {
        "policy_chosen_logps": torch.tensor([-1.0, -2.0]), "policy_rejected_logps": torch.tensor([-3.0, -4.0]),
        "ref_chosen_logps": torch.tensor([-1.5, -2.0]), "ref_rejected_logps": torch.tensor([-3.0, -3.5]),
        "chosen_lengths": torch.tensor([3, 4]), "rejected_lengths": torch.tensor([5, 6]), "beta": 0.1,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        preference_loss(**args)


def test_config_is_frozen_and_metrics_are_floats():
    cfg = PreferenceLossConfig("sigmoid", 0.1)
    with pytest.raises(AttributeError):
        cfg.beta = 0.2  # type: ignore[misc]
    pc, pr, rc, rr = pairs()
    metrics = preference_loss(pc, pr, rc, rr, loss_type="sigmoid", beta=0.1).metrics()
    assert set(metrics) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["rewards/accuracies"] == 0.5
