"""Score-regularised objectives for one- or few-step generators (Diff-Instruct*, SIM, DI++, SiD family).

Pure functions, no model code. A generator x0 = g_θ(z, c) is trained against a frozen, CFG-guided
reference score while an online "fake score" network s_ψ tracks the score of the generator's own
diffused distribution (trained by denoising score matching on stop-gradient generator samples).

Conventions (every function below follows them):

* Noising: x_t = α_t x0 + σ_t ε, ε ~ N(0, I). Flow families: α = 1 - t, σ = t (t = 1 is pure noise);
  DDPM families: α = sqrt(ᾱ_t), σ = sqrt(1 - ᾱ_t). ``alpha``/``sigma`` are per-sample tensors [N].
* Score = ∇_x log p_t(x) ≈ -ε̂ / σ, where ε̂ is the network's noise estimate. The conversions from what a
  network predicts to ε̂ live in ONE place, :func:`eps_from_prediction`:
      'epsilon'       ε̂ = pred
      'v_prediction'  ε̂ = α v̂ + σ x_t           (v = α ε - σ x0, valid because α² + σ² = 1)
      'flow_velocity' ε̂ = x_t + (1 - t) v̂ = x_t + α v̂   (v = ε - x0, x_t = (1-t) x0 + t ε)
  and x̂0 = (x_t - σ ε̂) / α (flow: x̂0 = x_t - t v̂).
* CFG: s_cfg = s(∅) + ω (s(c) - s(∅)). Because score, ε̂ and every prediction type are affine in the
  prediction with weights that sum to one, CFG on predictions == CFG on scores; combine predictions first.
* Sums vs means: |y| and dot products run over ALL non-batch dims (as in the papers); the loss is the
  MEAN over the batch of the per-sample terms.
* Sign: every loss is MINIMISED. The reward term enters as -alpha_rev * r(x0, c).
"""
from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow_velocity")


def _bcast(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """[N] (or a scalar) -> broadcastable against ``like`` [N, ...]."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape((-1,) + (1,) * (like.ndim - 1)) if v.ndim else v


def _acc(y: torch.Tensor) -> torch.Tensor:
    """At least float32 for reductions (bf16 sums over a whole latent lose digits); float64 stays float64."""
    return y.to(torch.promote_types(y.dtype, torch.float32))


def _sq_norm(y: torch.Tensor) -> torch.Tensor:
    """Per-sample |y|² over every non-batch dim: [N, ...] -> [N] (at least float32 accumulation)."""
    return _acc(y).flatten(1).pow(2).sum(dim=1)


# ------------------------------------------------------------------------------------ pseudo-Huber

def pseudo_huber(y: torch.Tensor, c: float) -> torch.Tensor:
    """d(y) = sqrt(|y|² + c²) - c per sample, |y| over all non-batch dims. y [N, ...] -> [N].

    ≈ |y|²/(2c) for |y| << c (an L2 divergence), ≈ |y| - c for |y| >> c (robust, bounded gradient).
    """
    if c <= 0:
        raise ValueError(f"pseudo-Huber c must be > 0, got {c}")
    return (_sq_norm(y) + c * c).sqrt() - c


def pseudo_huber_grad(y: torch.Tensor, c: float) -> torch.Tensor:
    """d'(y) = y / sqrt(|y|² + c²), same shape as y; |d'(y)| < 1 always.

    Limits: -> y / c for |y| << c; -> y / |y| (a unit vector) for |y| >> c.
    """
    if c <= 0:
        raise ValueError(f"pseudo-Huber c must be > 0, got {c}")
    denom = (_sq_norm(y) + c * c).sqrt()
    return y / _bcast(denom, y).to(y.dtype)


# ------------------------------------------------------------------------------------ conversions

def eps_from_prediction(pred: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                        prediction_type: str) -> torch.Tensor:
    """Noise estimate ε̂ [N, ...] from a network output ``pred`` at x_t = α x0 + σ ε (see module docstring)."""
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return a * pred + s * x_t
    if prediction_type == "flow_velocity":
        # x_t = (1-t) x0 + t ε and v = ε - x0  =>  ε = x_t + (1-t) v, and α = 1 - t
        return x_t + a * pred
    raise ValueError(f"unknown prediction_type {prediction_type!r}; one of {', '.join(PREDICTION_TYPES)}")


def x0_from_prediction(pred: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                       prediction_type: str) -> torch.Tensor:
    """Clean-sample estimate x̂0 = (x_t - σ ε̂) / α [N, ...]; flow: x_t - t v̂ (no division, exact at t = 1)."""
    if prediction_type == "flow_velocity":
        return x_t - _bcast(sigma, x_t) * pred
    if prediction_type == "v_prediction":  # x0 = α x_t - σ v, no division by a small α
        return _bcast(alpha, x_t) * x_t - _bcast(sigma, x_t) * pred
    eps = eps_from_prediction(pred, x_t, alpha, sigma, prediction_type)
    return (x_t - _bcast(sigma, x_t) * eps) / _bcast(alpha, x_t)


def score_from_prediction(pred: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                          prediction_type: str) -> torch.Tensor:
    """Score estimate s = -ε̂ / σ [N, ...] (∇_x log p_t at x_t). Needs σ > 0."""
    return -eps_from_prediction(pred, x_t, alpha, sigma, prediction_type) / _bcast(sigma, x_t)


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, omega: float) -> torch.Tensor:
    """s(∅) + ω (s(c) - s(∅)); ω = 1 is the plain conditional, ω = 0 the unconditional."""
    return uncond + omega * (cond - uncond)


# ------------------------------------------------------------------------------------ losses

def _reward_term(reward: torch.Tensor | None, alpha_rev: float, like: torch.Tensor) -> tuple[torch.Tensor, dict]:
    if reward is None or alpha_rev == 0:
        return like.new_zeros(()), {}
    return -alpha_rev * _acc(reward).mean(), {"reward": float(reward.detach().float().mean())}


def score_reg_generator_loss(score_fake: torch.Tensor, score_ref: torch.Tensor, eps: torch.Tensor,
                             sigma: torch.Tensor, c: float, weight: torch.Tensor | None = None,
                             detach_dprime: bool = True, reward: torch.Tensor | None = None,
                             alpha_rev: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Diff-Instruct* / SIM generator loss (pseudo-Huber score divergence), minimised over θ:

        L_gen = -alpha_rev * mean r(x0, c) + mean_i w_i [ -d'(y_i)ᵀ (s_ψ(x_t,i) + ε_i / σ_i) ],
        y = s_ψ(x_t) - s_ref_cfg(x_t).

    Args (all [N, ...] unless said otherwise):
        score_fake: s_ψ(x_t) with x_t = α g_θ(z) + σ ε DIFFERENTIABLE w.r.t. θ (through x_t only: ψ's own
            parameters must not be stepped by this loss); the gradient reaches θ via ∂s_ψ/∂x_t.
        score_ref: the frozen CFG-guided reference score at the same x_t. Only enters through y.
        eps: the noise used to make x_t (no gradient). s_ψ + ε/σ = (ε - ε̂_ψ)/σ is s_ψ minus the
            conditional score ∇ log q(x_t | x0) = -ε/σ, so its expectation is zero when s_ψ is exact.
        sigma: σ_t [N]. c: pseudo-Huber constant (> 0), in score units (|y| over all dims).
        weight: w(t) [N]; None = 1.
        detach_dprime: True treats d'(y) as a constant weight (the gradient then flows only through s_ψ);
            False also differentiates d'(y) (through s_ψ and s_ref, one more backward through the reference).
        reward: r(x0, c) [N], differentiable w.r.t. θ; alpha_rev its weight.
    Returns (loss, metrics) with metrics 'score_div' (mean d(y)), 'dprime_norm', 'loss_div', 'reward'.
    """
    y = score_fake - score_ref
    dprime = pseudo_huber_grad(y.detach() if detach_dprime else y, c)
    inner = _acc(dprime * (score_fake + eps / _bcast(sigma, eps))).flatten(1).sum(dim=1)  # [N]
    w = torch.ones_like(inner) if weight is None else weight.to(inner)
    div = -(w * inner).mean()
    reward_loss, metrics = _reward_term(reward, alpha_rev, div)
    metrics.update({"loss_div": float(div.detach()), "score_div": float(pseudo_huber(y.detach(), c).mean()),
                    "dprime_norm": float(_sq_norm(dprime.detach()).sqrt().mean())})
    loss = div + reward_loss
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def kl_generator_loss(score_fake: torch.Tensor, score_ref: torch.Tensor, x_t: torch.Tensor,
                      weight: torch.Tensor | None = None, reward: torch.Tensor | None = None,
                      alpha_rev: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The KL / integral-KL special case (DI++, DMD): a surrogate whose θ-gradient is

        -alpha_rev ∇ mean r  +  mean_i w_i (s_ψ(x_t,i) - s_ref(x_t,i))ᵀ ∂x_t,i/∂θ.

    The score difference is detached (it is the KL's gradient field, not something to differentiate);
    ``x_t`` [N, ...] must carry the gradient to θ. The surrogate's VALUE is not a KL; log 'kl_grad_norm'.
    """
    g = (score_fake - score_ref).detach()
    inner = _acc(g * x_t).flatten(1).sum(dim=1)
    w = torch.ones_like(inner) if weight is None else weight.to(inner)
    div = (w * inner).mean()
    reward_loss, metrics = _reward_term(reward, alpha_rev, div)
    metrics.update({"loss_div": float(div.detach()), "kl_grad_norm": float(_sq_norm(g).sqrt().mean())})
    loss = div + reward_loss
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def fake_score_dsm_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Denoising score matching for s_ψ on x_t made from sg(generator samples): mean over the batch of the
    per-sample MEAN squared error between the fake network's prediction and the family's training target
    (ε, v or ε - x0), i.e. the family's own pretraining loss. [N, ...] x2 -> scalar."""
    per = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    loss = per.mean()
    return loss, {"loss_fake": float(loss.detach())}


__all__ = ["PREDICTION_TYPES", "cfg_combine", "eps_from_prediction", "fake_score_dsm_loss", "kl_generator_loss",
           "pseudo_huber", "pseudo_huber_grad", "score_from_prediction", "score_reg_generator_loss",
           "x0_from_prediction"]
