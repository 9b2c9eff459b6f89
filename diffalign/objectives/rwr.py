"""Flow-RWR: reward-weighted regression / flow matching (VideoAlign, Liu et al. 2025) as one pure function.

Convention (printed by `diffalign train`):

    S_i  = (score_i - score_min) / (score_max - score_min)       reward of image i (world oracle: already [0, 1])
    w_i  = N · softmax_i(S_i / τ)                                 weights over the batch, Σ_i w_i = N
    loss = mean_i( w_i · err_θ(x_i) ) = Σ_i w_i err_θ(x_i) / N    err = per-sample MEAN squared error

The weights are data (no gradient flows through them); with τ → ∞ this is plain fine-tuning on every
image, with τ → 0 fine-tuning on the batch's best image only. No reference model is involved. "The batch"
is this process's micro-batch (N = 2 × train.batch_size images), so the weighting is local to each rank
and each accumulation micro-step, and the effect of τ depends on the batch size.

Samples: RWR trains on single images with their rewards, not on preferences. From a pair source both
images are samples (winners AND losers, N = 2B per micro-batch), because the loser's lower reward is
exactly what down-weights it; a winner and a loser of the same pair share ε and t (the loop's one forward
over [w; l]), which only reduces the variance of the weighted mean. The pair label is not read: the
weights come from ``data.score_column`` alone.

Normalisation (the paper leaves it open). Two variants:

* ``weight_clip = None``: the plain self-normalised exponential weights above.
* ``weight_clip = c`` (c ≥ 1, the DEFAULT, c = 4): clip every weight at c and give the removed mass back
  to the unclipped samples in proportion to their exponential weights, repeating until no weight exceeds
  c (water-filling), so Σ w = N and max w ≤ c hold exactly.

Why clipped is the default: with a reward spread of a few τ inside one batch the plain normaliser hands
almost all of the batch's weight to one image, so the effective sample size N²/Σw² collapses towards 1
and the update becomes a high-variance fit of a single sample. With max w ≤ c, Σw² ≤ c·Σw = cN, so the
effective sample size stays ≥ N/c: clipping bounds the variance while keeping the ranking of the weights.
"""
from __future__ import annotations

import math

import torch

from diffalign.objectives.dpo import PairErrors
from diffalign.objectives.samples import masked_mean, pairs_as_samples, require_scores, scaled_scores


def rwr_weights(rewards: torch.Tensor, tau: float, weight_clip: float | None = None) -> torch.Tensor:
    """Per-sample weights, shape [N], summing to N: N·softmax(rewards/τ), clipped at ``weight_clip`` with
    the excess mass redistributed proportionally (see the module docstring). No gradient."""
    if tau <= 0:
        raise ValueError(f"RWR temperature tau must be > 0, got {tau}")
    n = rewards.shape[0]
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    # log-space throughout: exp(S/τ) overflows or underflows for small τ, the log-weights never do
    logits = rewards.detach().double() / tau
    log_w = logits - torch.logsumexp(logits, 0) + math.log(n)
    if weight_clip is None:
        return log_w.exp().to(out_dtype)
    if weight_clip < 1:
        raise ValueError(f"RWR weight_clip must be >= 1 (weights average 1), got {weight_clip}")
    clipped = torch.zeros(n, dtype=torch.bool, device=rewards.device)
    w = log_w.exp()
    for _ in range(n):  # each round clips at least one more sample, so n rounds always suffice
        free = ~clipped
        remaining = n - weight_clip * int(clipped.sum())
        if remaining <= 0 or not bool(free.any()):
            break
        # free samples share the remaining mass in proportion to exp(S/τ)
        scaled = (log_w - torch.logsumexp(log_w[free], 0) + math.log(remaining)).exp()
        w = torch.where(clipped, torch.full_like(log_w, weight_clip), scaled)
        newly = free & (w > weight_clip * (1 + 1e-12))
        if not bool(newly.any()):
            break
        clipped |= newly
    w = torch.where(w > weight_clip, torch.full_like(w, weight_clip), w)
    return w.to(out_dtype)


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """(Σw)² / Σw²: N for equal weights, 1 when one sample holds all the weight."""
    return weights.sum() ** 2 / (weights ** 2).sum()


def rwr_loss(
    errors: PairErrors,
    tau: float,
    weight_clip: float | None = 4.0,
    score_min: float = 0.0,
    score_max: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-RWR loss over the 2B images of a pair batch (winners and losers as single samples).

    Needs ``errors.score_w``/``score_l`` [B] (raw rewards) and ``policy_w``/``policy_l`` [B]; reads no
    reference. Metrics: loss, err_policy (unweighted mean), err_policy_w, err_policy_l, weight_max,
    weight_w (mean weight of the winners), ess_frac (effective sample size / N), score (mean scaled reward).
    """
    require_scores(errors, "rwr")
    samples = pairs_as_samples(errors)
    rewards = scaled_scores(samples.score, score_min, score_max)
    weights = rwr_weights(rewards, tau, weight_clip).to(samples.policy.device)
    loss = (weights * samples.policy).mean()
    with torch.no_grad():
        n = weights.shape[0]
        metrics = {
            "loss": loss.item(),
            "err_policy": samples.policy.mean().item(),
            "err_policy_w": errors.policy_w.mean().item(),
            "err_policy_l": errors.policy_l.mean().item(),
            "weight_max": weights.max().item(),
            "weight_w": masked_mean(weights, samples.desirable).item(),
            "ess_frac": (effective_sample_size(weights) / n).item(),
            "score": rewards.mean().item(),
        }
    return loss, metrics
