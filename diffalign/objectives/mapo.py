"""MaPO: margin-aware preference optimisation without a reference model (Hong, Paul et al. 2024).

Convention (printed by `diffalign train`), matching the official code (mapo-t2i ``compute_loss``):

    s(ℓ)  = γ ℓ / (exp(γ ℓ) - 1)                  γ = 0.5 (``snr_value``), ℓ = per-sample MEAN squared error
    ratio = log σ( T · (s(err_θ(w)) - s(err_θ(l))) )    T = 1000 (the DDPM ``num_train_timesteps`` in their code)
    loss  = mean_pairs err_θ(w) - λ · mean_pairs ratio  λ = 0.1 (``beta_mapo``)

Signs: s is strictly DECREASING in ℓ (s(0) = 1, s → 0 as ℓ → ∞), so s(err_w) - s(err_l) > 0 exactly when
the policy fits the winner better than the loser. Minimising the loss therefore (i) lowers err_θ(w) (the
first term is plain fine-tuning on winners) and (ii) raises log σ of the margin, i.e. lowers err_θ(w) and
raises err_θ(l). The margin term enters with a MINUS sign because log σ ≤ 0 is a log-likelihood to
maximise; -λ·ratio ≥ 0 is the "OR loss" their code logs.

Scales: the margin is multiplied by T = 1000 whatever the model family; for flow models (err of the
velocity) the same constants are used, as there is no published flow setting. Both means are over pairs.
No reference model: the loop skips the reference forward entirely (``needs_reference=False``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffalign.objectives.dpo import PairErrors, implicit_accuracy


def mapo_score(err: torch.Tensor, gamma: float = 0.5) -> torch.Tensor:
    """s(ℓ) = γℓ / (exp(γℓ) - 1) elementwise, with the limit s(0) = 1; differentiable everywhere."""
    x = gamma * err
    small = x.abs() < 1e-6
    # where() alone would still back-propagate the 0/0 of the unused branch as NaN: feed it a safe value
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1.0 - 0.5 * x, safe / torch.expm1(safe))


def mapo_loss(
    errors: PairErrors,
    gamma: float = 0.5,
    weight: float = 0.1,
    scale: float = 1000.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MaPO loss from policy errors only (``policy_w``, ``policy_l`` [B]; references are not read).

    Metrics: loss, sft (mean err_θ(w)), mapo_ratio_loss (-mean ratio, ≥ 0), mapo_margin (mean s_w - s_l),
    implicit_acc (fraction with s_w > s_l, ties 0.5), score_w / score_l (mean s), err_policy_w/l.
    """
    if errors.policy_l is None:
        raise ValueError("MaPO needs the losers' errors: register it with uses_losers=True")
    s_w, s_l = mapo_score(errors.policy_w, gamma), mapo_score(errors.policy_l, gamma)
    margin = s_w - s_l
    ratio = F.logsigmoid(scale * margin)
    sft = errors.policy_w.mean()
    loss = sft - weight * ratio.mean()
    with torch.no_grad():
        metrics = {
            "loss": loss.item(),
            "sft": sft.item(),
            "mapo_ratio_loss": (-ratio.mean()).item(),
            "mapo_margin": margin.mean().item(),
            "implicit_acc": implicit_accuracy(margin).item(),
            "mapo_s_w": s_w.mean().item(),
            "mapo_s_l": s_l.mean().item(),
            "err_policy_w": errors.policy_w.mean().item(),
            "err_policy_l": errors.policy_l.mean().item(),
        }
    return loss, metrics
