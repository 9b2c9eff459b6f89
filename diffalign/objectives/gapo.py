"""GAPO: gap-aware preference optimisation (AnimeReward paper, 2025) on the Diffusion-/Flow-DPO logit.

Convention (printed by `diffalign train`):

    inside_i = -(β/2) · [Δ(w_i) - Δ(l_i)],   Δ(x) = err_θ(x) - err_ref(x)    (exactly dpo.dpo_inside)
    S        = (score - score_min) / (score_max - score_min)  ∈ [0, 1]         (reward of each image)
    loss     = mean_i[ (2^{S_w,i} - 2^{S_l,i}) · (-log σ(inside_i)) ]

Each pair's DPO loss is weighted by how far apart the two images' rewards are: a near-tie (S_w ≈ S_l)
contributes almost nothing, a clear win (S_w = 1, S_l = 0) contributes with weight 1. The weight lies in
[0, 1], so at equal β the gradients are smaller than plain DPO's.

The weight multiplies EACH PAIR's loss before the batch mean. The official code averages the weights and
the losses over the batch separately and multiplies the two means, mean(w)·mean(ℓ); that equals the
formula only at batch size 1 and otherwise lets a wide-gap pair up-weight a near-tie pair's gradient.

A pair whose score contradicts its label (S_w < S_l) would get a NEGATIVE weight, i.e. a loss that is
unbounded below and pushes towards the loser; such data is refused (:func:`check_gapo_scores`) rather
than clamped, so the score column and the labels must agree (the world's ``score`` column does: its
labels are derived from it).
"""
from __future__ import annotations

import torch

from diffalign.objectives.dpo import (VELOCITY_WEIGHT_CAP, PairErrors, add_sft, dpo_inside, dpo_pair_metrics,
                                      preference_loss)
from diffalign.objectives.samples import require_scores, scaled_scores

_TOL = 1e-6


def gapo_weights(s_w: torch.Tensor, s_l: torch.Tensor) -> torch.Tensor:
    """Per-pair weight 2^{S_w} - 2^{S_l}, shape [B]; S already scaled to [0, 1]."""
    return torch.exp2(s_w) - torch.exp2(s_l)


def check_gapo_scores(s_w: torch.Tensor, s_l: torch.Tensor, rows: list[int] | None = None) -> None:
    """Raise ValueError naming the first bad pair if a scaled score leaves [0, 1] or S_w < S_l.

    ``rows`` (source rows, for messages) defaults to the batch positions.
    """
    where = rows if rows is not None else list(range(s_w.shape[0]))
    out = ((s_w < -_TOL) | (s_w > 1 + _TOL) | (s_l < -_TOL) | (s_l > 1 + _TOL)).nonzero()
    if out.numel():
        i = int(out[0])
        raise ValueError(
            f"GAPO needs scores scaled to [0, 1]; row {where[i]} has S_w={s_w[i].item():.4g}, S_l={s_l[i].item():.4g} "
            f"({out.numel()} pairs out of range). Set objective.score_min / objective.score_max to the score "
            "column's range (S = (score - score_min) / (score_max - score_min)).")
    bad = (s_w < s_l - _TOL).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"GAPO: row {where[i]}: the winner's score S_w={s_w[i].item():.4g} is below the loser's S_l={s_l[i].item():.4g} "
            f"({bad.numel()} such pairs): the score column disagrees with label_0, and the weight 2^S_w - 2^S_l would "
            "be negative (a loss unbounded below). Use the score column the labels were made from (the world's "
            "'score'), or fix the labels.")


def gapo_loss(
    errors: PairErrors,
    beta: float,
    loss_type: str = "sigmoid",
    time_weighting: str = "constant",
    score_min: float = 0.0,
    score_max: float = 1.0,
    sft_weight: float = 0.0,
    velocity_cap: float = VELOCITY_WEIGHT_CAP,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GAPO loss (per-pair weighted, then the mean over pairs) and its metrics.

    ``errors`` must carry ``ref_w``/``ref_l`` and the raw ``score_w``/``score_l`` [B]. ``loss_type`` and
    ``time_weighting`` mean what they mean for DPO (the paper's loss is ``sigmoid``: -log σ(inside)).
    Metrics: loss, implicit_acc, gapo_weight (batch mean of the weights), reward_w/l/margin as for DPO,
    score_w, score_l (scaled), err_policy_w/l, err_ref_w/l (and sft when ``sft_weight`` > 0).
    """
    raw_w, raw_l = require_scores(errors, "gapo")
    s_w, s_l = scaled_scores(raw_w, score_min, score_max), scaled_scores(raw_l, score_min, score_max)
    check_gapo_scores(s_w, s_l)
    weight = gapo_weights(s_w, s_l)
    inside = dpo_inside(errors, beta, time_weighting, velocity_cap)
    loss = (weight * preference_loss(inside, loss_type, beta)).mean()  # weight each pair, THEN average
    loss, extra = add_sft(loss, errors, sft_weight)
    metrics = {
        "loss": loss.item(),
        "gapo_weight": weight.mean().item(),
        "score_w": s_w.mean().item(),
        "score_l": s_l.mean().item(),
        **dpo_pair_metrics(errors, inside, beta, time_weighting, velocity_cap),
        **extra,
    }
    return loss, metrics
