"""DPO / SFT math against hand-computed values and identities (ALGORITHMS.md)."""
import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.objectives import PairErrors, dpo_loss, get_objective, sft_loss
from diffalign.objectives.dpo import dpo_inside, preference_loss


def errors(pw, pl, rw, rl, t=0.5):
    def tt(x):
        return torch.tensor(x, dtype=torch.float64).reshape(-1)
    n = tt(pw).numel()
    return PairErrors(tt(pw), tt(pl), tt(rw), tt(rl), torch.full((n,), t, dtype=torch.float64))


def test_policy_equal_reference_gives_ln2_and_half_accuracy():
    e = torch.rand(6, dtype=torch.float64)
    l = torch.rand(6, dtype=torch.float64)
    loss, m = dpo_loss(PairErrors(e, l, e.clone(), l.clone(), torch.rand(6)), beta=5000)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert m["implicit_acc"] == 0.5
    assert m["reward_w"] == 0 and m["reward_l"] == 0


def test_beta_convention_equals_diffusers_2500_form():
    g = torch.Generator().manual_seed(0)
    pw, pl, rw, rl = (torch.rand(8, generator=g, dtype=torch.float64) * 1e-3 for _ in range(4))
    ours, _ = dpo_loss(PairErrors(pw, pl, rw, rl, torch.zeros(8)), beta=5000)
    # diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py
    model_diff, ref_diff = pw - pl, rw - rl
    theirs = -F.logsigmoid(2500 * (ref_diff - model_diff)).mean()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)


def test_hand_computed_sigmoid_hinge_ipo():
    # Δw = 0.1-0.2 = -0.1, Δl = 0.3-0.25 = 0.05, inside = -(10/2)(-0.15) = 0.75
    e = errors(0.1, 0.3, 0.2, 0.25)
    assert dpo_inside(e, beta=10).item() == pytest.approx(0.75)
    assert dpo_loss(e, 10, "sigmoid")[0].item() == pytest.approx(math.log1p(math.exp(-0.75)))
    assert dpo_loss(e, 10, "hinge")[0].item() == pytest.approx(0.25)
    assert dpo_loss(e, 10, "ipo")[0].item() == pytest.approx((0.075 - 0.05) ** 2)
    # hinge is flat past the margin
    assert preference_loss(torch.tensor([1.5]), "hinge", 10).item() == 0.0


def test_mean_is_outside_the_logsigmoid():
    e = errors([0.1, 0.5], [0.3, 0.1], [0.2, 0.2], [0.25, 0.2])
    inside = dpo_inside(e, 10)
    expected = (-F.logsigmoid(inside)).mean()
    assert dpo_loss(e, 10)[0].item() == pytest.approx(expected.item())
    assert dpo_loss(e, 10)[0].item() != pytest.approx((-F.logsigmoid(inside.mean())).item())


def test_zero_gradient_when_winner_equals_loser():
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    err = (theta ** 2).sum().reshape(1) + 0.1  # the same prediction error for w and l
    loss, _ = dpo_loss(PairErrors(err, err, torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.3])), beta=5000)
    loss.backward()
    assert torch.count_nonzero(theta.grad) == 0


def test_accuracy_counts_ties_half_and_rewards():
    e = errors([0.1, 0.3, 0.2], [0.3, 0.1, 0.2], [0.2, 0.2, 0.2], [0.2, 0.2, 0.2])
    _, m = dpo_loss(e, beta=2)
    assert m["implicit_acc"] == pytest.approx((1 + 0 + 0.5) / 3)
    # reward_w = -(β/2)(err_θ(w) - err_ref(w)) averaged: -(1)(-0.1 + 0.1 + 0)/3 = 0
    assert m["reward_w"] == pytest.approx(0.0, abs=1e-12)
    assert m["reward_l"] == pytest.approx(-(0.1 - 0.1 + 0.0) / 3, abs=1e-12)
    assert m["err_policy_w"] == pytest.approx(0.2)


def test_time_weighting_one_minus_t_squared_scales_beta():
    e = errors(0.1, 0.3, 0.2, 0.25, t=0.6)
    assert dpo_inside(e, 10, "one_minus_t_sq").item() == pytest.approx(0.75 * 0.16)
    assert dpo_inside(e, 10, "constant").item() == pytest.approx(0.75)


def test_velocity_time_weighting_is_dpo_on_velocity_errors():
    """'velocity' on eps errors == 'constant' on the same errors in v space (err_v = err_eps / ᾱ_t), up to the cap."""
    abar = torch.tensor([0.9, 0.3, 0.02], dtype=torch.float64)
    err_eps = {role: torch.rand(3, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i, role in enumerate(("pw", "pl", "rw", "rl"))}
    t = torch.tensor([0.1, 0.5, 0.95], dtype=torch.float64)
    eps_space = PairErrors(err_eps["pw"], err_eps["pl"], err_eps["rw"], err_eps["rl"], t, velocity_scale=1 / abar)
    v_space = PairErrors(*(err_eps[r] / abar for r in ("pw", "pl", "rw", "rl")), t)
    torch.testing.assert_close(dpo_inside(eps_space, 7.0, "velocity", velocity_cap=1e9),
                               dpo_inside(v_space, 7.0, "constant"))
    # the cap: 1/0.02 = 50 is held at 10, the other two (1.11, 3.33) pass unchanged
    capped = dpo_inside(eps_space, 7.0, "velocity", velocity_cap=10.0) / dpo_inside(eps_space, 7.0, "constant")
    torch.testing.assert_close(capped, torch.tensor([1 / 0.9, 1 / 0.3, 10.0], dtype=torch.float64))
    # the loss and the implicit rewards use the same β_t
    loss, m = dpo_loss(eps_space, 7.0, time_weighting="velocity", velocity_cap=1e9)
    loss_v, m_v = dpo_loss(v_space, 7.0)
    assert loss.item() == pytest.approx(loss_v.item()) and m["reward_margin"] == pytest.approx(m_v["reward_margin"])
    with pytest.raises(ValueError, match="velocity_scale"):
        dpo_inside(errors(0.1, 0.3, 0.2, 0.25), 10, "velocity")


def test_sft_term_and_plain_sft():
    e = errors([0.1, 0.3], [0.3, 0.1], [0.2, 0.2], [0.25, 0.2])
    base, _ = dpo_loss(e, 10)
    with_sft, m = dpo_loss(e, 10, sft_weight=0.5)
    assert with_sft.item() == pytest.approx(base.item() + 0.5 * 0.2)
    assert m["sft"] == pytest.approx(0.2)
    loss, _ = sft_loss(torch.tensor([0.2, 0.4]))
    assert loss.item() == pytest.approx(0.3)
    assert not get_objective("sft").uses_losers and get_objective("dpo").needs_reference
    with pytest.raises(ValueError, match="available: dpo"):
        get_objective("dpoo")
