"""SePPO: semi-policy preference optimisation (Zhang et al. 2024) on the Diffusion-/Flow-DPO logit.

Only WINNING images come from the data. The loser slot holds a sample generated on the fly by a reference
model that is a past checkpoint of the policy (drawn uniformly from a pool; see
:mod:`diffalign.train.seppo_pool`), and that same checkpoint is the DPO reference. With the loop's
PairErrors, ``policy_l``/``ref_l`` are the errors on that reference sample ("ref_sample" below), at the
winner's (t, ε).

Convention (printed by `diffalign train`, same β convention as dpo.py):

    Δ(x)   = err_θ(x) - err_ref(x)                      err = per-sample MEAN squared error
    inside = -(β/2) · [Δ(w) - s · Δ(ref_sample)]
    loss   = mean_pairs( -log σ(inside) )

Anchor-based flipper, decided per pair from the winner (the anchor), never differentiated:

    sign:       s = +1 if err_ref(w) > err_θ(w) else -1
    indicator:  s = +1 if err_ref(w) > err_θ(w) else  0   (drop the reference-sample term)
    none:       s = +1                                     (plain DPO with the reference sample as loser)

Why: when the policy already fits the winner better than the reference does (err_θ(w) < err_ref(w)), the
reference's own sample is presumed worse than what the policy would make, so it is a fair loser (s = +1).
Otherwise the policy is not yet better than the reference even on the winner; pushing away from the
reference's sample would be noise, so SePPO flips the sign (s = -1: both terms pull the policy towards
lower error, an SFT-like step) or, in the indicator form, drops the term (s = 0: DPO on the winner alone).
The paper reports the flipper matters (PickScore 21.57 with, 20.88 without, SFT 21.32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffalign.objectives.dpo import PairErrors, implicit_accuracy

FLIPPERS = ("sign", "indicator", "none", "reversed")


def seppo_flip(policy_w: torch.Tensor, ref_w: torch.Tensor, flipper: str = "sign") -> torch.Tensor:
    """The per-pair multiplier s of the reference-sample term, shape [B], float, no gradient.

    ``policy_w``/``ref_w``: err_θ(w) and err_ref(w), each [B]. An exact tie (err_ref(w) == err_θ(w), e.g. at
    step 0 when the pool holds only the initial weights) is NOT "better", so it gets -1 (sign) or 0 (indicator).
    """
    if flipper not in FLIPPERS:
        raise ValueError(f"unknown SePPO flipper {flipper!r}; one of {', '.join(FLIPPERS)}")
    better = (ref_w.detach() > policy_w.detach()).float()  # 1 where the policy beats the reference on the winner
    if flipper == "sign":
        return 2.0 * better - 1.0
    if flipper == "indicator":
        return better
    if flipper == "reversed":  # the opposite direction, to settle the paper's choice empirically (BENCHMARKS)
        return 1.0 - 2.0 * better
    return torch.ones_like(better)


def seppo_inside(errors: PairErrors, beta: float, flipper: str = "sign") -> tuple[torch.Tensor, torch.Tensor]:
    """(inside [B], s [B]): inside = -(β/2)[Δ(w) - s Δ(ref_sample)] with s from :func:`seppo_flip`."""
    if errors.ref_w is None or errors.policy_l is None or errors.ref_l is None:
        raise ValueError("SePPO needs err_θ/err_ref on the winner AND on the reference sample (policy_l, ref_l)")
    s = seppo_flip(errors.policy_w, errors.ref_w, flipper)
    delta_w = errors.policy_w - errors.ref_w
    delta_s = errors.policy_l - errors.ref_l
    return -0.5 * beta * (delta_w - s * delta_s), s


def seppo_loss(errors: PairErrors, beta: float, flipper: str = "sign") -> tuple[torch.Tensor, dict[str, float]]:
    """SePPO loss (mean over pairs of -log σ(inside)) and its metrics.

    ``errors``: policy_w/ref_w on the data winners, policy_l/ref_l on the reference model's samples, all [B].
    Metrics: loss, implicit_acc (of ``inside``), flip_pos / flip_neg (fraction of pairs with s = +1 / s = -1;
    the rest are dropped, indicator form), reward_w, reward_sample (-(β/2)Δ per role, batch means),
    err_policy_w, err_policy_l, err_ref_w, err_ref_l.
    """
    inside, s = seppo_inside(errors, beta, flipper)
    loss = (-F.logsigmoid(inside)).mean()  # mean OUTSIDE the log-sigmoid, as in dpo.py
    with torch.no_grad():
        metrics = {
            "loss": loss.item(),
            "implicit_acc": implicit_accuracy(inside).item(),
            "flip_pos": (s > 0).float().mean().item(),
            "flip_neg": (s < 0).float().mean().item(),
            "reward_w": (-0.5 * beta * (errors.policy_w - errors.ref_w)).mean().item(),
            "reward_sample": (-0.5 * beta * (errors.policy_l - errors.ref_l)).mean().item(),
            "err_policy_w": errors.policy_w.mean().item(),
            "err_policy_l": errors.policy_l.mean().item(),
            "err_ref_w": errors.ref_w.mean().item(),
            "err_ref_l": errors.ref_l.mean().item(),
        }
    return loss, metrics
