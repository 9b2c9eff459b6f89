"""Diffusion-KTO (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility") as one pure function.

Convention (printed by `diffalign train`), per single image x_i with label y_i ∈ {desirable, undesirable}:

    g_i  = err_ref(x_i) - err_θ(x_i)               implicit reward: > 0 when the policy fits x_i better than the reference
    z0   = sg( max(0, mean_i g_i) )                 reference point: batch mean over ALL samples, clamped at 0, detached
    loss = mean_i λ_{y_i} · (1 - σ(sign(y_i) · β · (g_i - z0)))    sign = +1 desirable, -1 undesirable

β = 1000 is the official code's ``beta_dpo`` default with err = per-sample MEAN squared error (the same err
as our DPO; note DPO's β enters as β/2, KTO's as β). λ_desirable = λ_undesirable = 1 by default.
At policy == reference g = 0, z0 = 0 and the loss is λ/2 per sample.

KTO is unpaired: it needs only a good/bad label per image. On UNPAIRED data (diffalign.data.unpaired: one image,
caption and desirable/undesirable label per row) the loop hands :func:`kto_sample_loss` a batch of B labelled
images, each with its own ε and t, and the classes come in the data's own proportion. From a pair source the
loop's batch of B pairs is read as 2B single images by :func:`kto_loss`, winners desirable and losers undesirable
(the classes balanced 1:1; the winner and loser of one pair share ε and t, which KTO does not need but does not
mind). The official example samples 80% desirable images (``positive_ratio 0.8``); a different desirable fraction
is weighted by λ_D / λ_U (``objective.kto_balance`` rescales them by the data's class counts so that both classes
weigh alike in the expected loss; the loop passes the rescaled λs, this function just applies them).

z0 is the mean over this process's micro-batch. The official code additionally averages it over processes
(``accelerator.reduce``); per-process z0 keeps this a pure function and differs only by batch noise.
"""
from __future__ import annotations

import torch

from diffalign.objectives.dpo import PairErrors, implicit_accuracy
from diffalign.objectives.samples import SampleErrors, masked_mean, pairs_as_samples


def kto_reference_point(g: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean(g)), detached: a scalar (the KL estimate of the paper's Eq. 8)."""
    return g.mean().clamp(min=0).detach()


def kto_sample_loss(
    samples: SampleErrors,
    beta: float,
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO over N single samples (``samples.ref`` required). Returns (loss, metrics) with metrics: loss,
    kto_z0, implicit_acc (fraction with sign·(g - z0) > 0, ties 0.5), reward_desirable / reward_undesirable
    (mean g of each class, 0 for an empty class), frac_desirable, err_policy, err_ref."""
    if samples.ref is None:
        raise ValueError("Diffusion-KTO needs reference errors: register it with needs_reference=True")
    g = samples.ref - samples.policy
    z0 = kto_reference_point(g)
    sign = torch.where(samples.desirable, 1.0, -1.0).to(g.dtype)
    lam = torch.where(samples.desirable, lambda_desirable, lambda_undesirable).to(g.dtype)
    logit = sign * beta * (g - z0)
    loss = (lam * (1.0 - torch.sigmoid(logit))).mean()
    with torch.no_grad():
        metrics = {
            "loss": loss.item(),
            "kto_z0": z0.item(),
            "implicit_acc": implicit_accuracy(logit).item(),
            "reward_desirable": masked_mean(g, samples.desirable).item(),
            "reward_undesirable": masked_mean(g, ~samples.desirable).item(),
            "frac_desirable": samples.desirable.float().mean().item(),
            "err_policy": samples.policy.mean().item(),
            "err_ref": samples.ref.mean().item(),
        }
    return loss, metrics


def kto_loss(
    errors: PairErrors,
    beta: float,
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion-KTO on a pair batch read as 2B unpaired samples (winners desirable, losers undesirable);
    see :func:`kto_sample_loss`. Also logs err_policy_w / err_policy_l."""
    loss, metrics = kto_sample_loss(pairs_as_samples(errors), beta, lambda_desirable, lambda_undesirable)
    metrics["err_policy_w"] = errors.policy_w.mean().item()
    metrics["err_policy_l"] = errors.policy_l.mean().item()
    return loss, metrics
