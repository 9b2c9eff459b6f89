"""Diffusion-DPO (Wallace et al. 2023) and Flow-DPO (VideoAlign, Liu et al. 2025) as one pure function.

Convention (printed by `diffalign train`, used by every recipe):

    Δ(x)   = err_θ(x) - err_ref(x)                      err = per-sample MEAN squared error
    inside = -(β/2) · [Δ(w) - Δ(l)]                     (winner w, loser l, same ε and t)
    loss   = mean_pairs( -log σ(inside) )

With this convention SD1.5/SDXL use β = 5000, which is the same loss as the diffusers script's
``-logsigmoid(beta_dpo * (ref_diff - model_diff))`` with ``beta_dpo = 2500``. Flow models use
β ≈ 100 to 2000 with a CONSTANT β over time; the literal port of eps-DPO, β_t = β (1-t)², is
offered only as an ablation (``time_weighting='one_minus_t_sq'``) because it reward-hacks.

The converse port, ``time_weighting='velocity'``, measures an eps-prediction model's errors in velocity
space as Flow-DPO does: β_t = β · min(1/ᾱ_t, cap). An eps error at high noise hides a large x0 error
(|v - v̂|² = |ε - ε̂|²/ᾱ_t), so constant-β eps-DPO spends its signal on the low-noise steps that refine
detail, while colour, shape and layout are decided at high noise (BENCHMARKS, "Velocity-weighted
Diffusion-DPO"). For velocity-target models (v-prediction, flow) the factor is 1, so it equals 'constant'.

The mean over pairs is taken OUTSIDE the log-sigmoid (taking it inside was an early diffusers bug).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairErrors:
    """Per-pair prediction errors, each of shape [B] (winner w, loser l, shared ε and t).

    ``t`` is the flow time in [0, 1] (1 = pure noise) for flow models and t/T for DDPM models; only
    the (1-t)² time weighting reads it.

    ``ref_w``/``ref_l`` are None when the objective declared ``needs_reference=False`` (the loop then
    runs no reference forward at all), and ``policy_l`` is None when it declared ``uses_losers=False``.
    ``score_w``/``score_l`` are the RAW per-image reward scores from the data (``data.score_column``),
    oriented with the pair, or None when the data carries none; objectives that read them scale them
    themselves (see :func:`diffalign.objectives.samples.scaled_scores`).
    """

    policy_w: torch.Tensor
    policy_l: torch.Tensor | None
    ref_w: torch.Tensor | None
    ref_l: torch.Tensor | None
    t: torch.Tensor
    score_w: torch.Tensor | None = None
    score_l: torch.Tensor | None = None
    velocity_scale: torch.Tensor | None = None


TIME_WEIGHTINGS = ("constant", "one_minus_t_sq", "velocity")
VELOCITY_WEIGHT_CAP = 100.0  # default cap of min(1/ᾱ_t, cap): 1/ᾱ_T is ~200 (SD1.5) to ~2e4 (DDPM linear)


def time_weight(errors: PairErrors, kind: str, velocity_cap: float = VELOCITY_WEIGHT_CAP) -> torch.Tensor:
    """Per-pair multiplier of β, shape [B]: 1 ('constant'), (1-t)² ('one_minus_t_sq', the eps-DPO port to flow,
    ablation only) or min(velocity_scale, velocity_cap) ('velocity': eps errors measured in velocity space)."""
    if kind == "constant":
        return torch.ones_like(errors.t)
    if kind == "one_minus_t_sq":
        return (1.0 - errors.t) ** 2
    if kind == "velocity":
        if errors.velocity_scale is None:
            raise ValueError("time_weighting='velocity' needs PairErrors.velocity_scale (err_v / err_native per pair; "
                             "the training loop fills it from adapter.velocity_error_scale)")
        return errors.velocity_scale.to(errors.t).clamp(max=velocity_cap)
    raise ValueError(f"unknown time weighting {kind!r}; use one of {TIME_WEIGHTINGS}")


def dpo_inside(errors: PairErrors, beta: float, time_weighting: str = "constant",
               velocity_cap: float = VELOCITY_WEIGHT_CAP) -> torch.Tensor:
    """The DPO logit per pair, shape [B]: -(β_t/2)[(err_θ(w)-err_ref(w)) - (err_θ(l)-err_ref(l))]."""
    beta_t = beta * time_weight(errors, time_weighting, velocity_cap)
    delta_w = errors.policy_w - errors.ref_w
    delta_l = errors.policy_l - errors.ref_l
    return -0.5 * beta_t * (delta_w - delta_l)


def preference_loss(inside: torch.Tensor, loss_type: str, beta: float) -> torch.Tensor:
    """Per-pair loss from the DPO logit ``inside`` (shape [B]).

    sigmoid: -log σ(inside)                      (Diffusion-DPO / Flow-DPO)
    hinge:   relu(1 - inside)                    (SLiC-style; same logit)
    ipo:     (inside/β - 1/(2β))²                (IPO on the β-free logit h = inside/β, as in TRL)
    """
    if loss_type == "sigmoid":
        return -F.logsigmoid(inside)
    if loss_type == "hinge":
        return torch.relu(1.0 - inside)
    if loss_type == "ipo":
        return (inside / beta - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown DPO loss type {loss_type!r}; use sigmoid, hinge or ipo")


def implicit_accuracy(inside: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose implicit reward prefers the winner; exact ties count 0.5."""
    return (inside > 0).float().mean() + 0.5 * (inside == 0).float().mean()


def add_sft(loss: torch.Tensor, errors: PairErrors, sft_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """``loss + sft_weight * mean(err_θ(winner))`` and its {"sft": ...} metric; unchanged when the weight is 0."""
    if not sft_weight:
        return loss, {}
    sft = errors.policy_w.mean()
    return loss + sft_weight * sft, {"sft": sft.item()}


@torch.no_grad()
def dpo_pair_metrics(errors: PairErrors, inside: torch.Tensor, beta: float, time_weighting: str = "constant",
                     velocity_cap: float = VELOCITY_WEIGHT_CAP) -> dict[str, float]:
    """The metrics every DPO-style objective reports: implicit_acc, reward_w, reward_l, reward_margin (implicit
    rewards -(β_t/2)(err_θ - err_ref) per role, batch means) and err_policy_w/l, err_ref_w/l (batch means)."""
    half_beta_t = 0.5 * beta * time_weight(errors, time_weighting, velocity_cap)
    reward_w = -(half_beta_t * (errors.policy_w - errors.ref_w)).mean()
    reward_l = -(half_beta_t * (errors.policy_l - errors.ref_l)).mean()
    return {
        "implicit_acc": implicit_accuracy(inside).item(),
        "reward_w": reward_w.item(),
        "reward_l": reward_l.item(),
        "reward_margin": (reward_w - reward_l).item(),
        "err_policy_w": errors.policy_w.mean().item(),
        "err_policy_l": errors.policy_l.mean().item(),
        "err_ref_w": errors.ref_w.mean().item(),
        "err_ref_l": errors.ref_l.mean().item(),
    }


def dpo_loss(
    errors: PairErrors,
    beta: float,
    loss_type: str = "sigmoid",
    time_weighting: str = "constant",
    sft_weight: float = 0.0,
    velocity_cap: float = VELOCITY_WEIGHT_CAP,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion-/Flow-DPO loss (mean over pairs) and its metrics.

    Returns ``(loss, metrics)`` with metrics: loss, implicit_acc, reward_w, reward_l, reward_margin,
    err_policy_w, err_policy_l, err_ref_w, err_ref_l (and sft when ``sft_weight`` > 0). Implicit
    rewards are -(β_t/2)(err_θ - err_ref) per role, batch means.
    """
    inside = dpo_inside(errors, beta, time_weighting, velocity_cap)
    loss, metrics_sft = add_sft(preference_loss(inside, loss_type, beta).mean(), errors, sft_weight)
    metrics = {"loss": loss.item(), **dpo_pair_metrics(errors, inside, beta, time_weighting, velocity_cap),
               **metrics_sft}
    return loss, metrics
