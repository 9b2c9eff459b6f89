"""Shared pieces of the per-sample objectives (Flow-RWR, Diffusion-KTO) and of the score-reading ones (GAPO).

The loop always hands objectives a :class:`~diffalign.objectives.dpo.PairErrors` (one policy forward over
[winners; losers], winner and loser of a pair sharing ε and t). Objectives that think in single images
rather than pairs view that batch as 2B independent samples with :func:`pairs_as_samples`: every winner is
a *desirable* sample and every loser an *undesirable* one, each with its own reward score.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.objectives.dpo import PairErrors


@dataclass(frozen=True)
class SampleErrors:
    """Per-sample errors of N single images, each of shape [N].

    ``desirable`` is a bool mask (True = desirable / winner, False = undesirable / loser); ``ref`` is None
    when no reference forward ran; ``score`` holds the raw reward of each image or None.
    """

    policy: torch.Tensor
    ref: torch.Tensor | None
    desirable: torch.Tensor
    t: torch.Tensor
    score: torch.Tensor | None = None


def pairs_as_samples(errors: PairErrors) -> SampleErrors:
    """[winners; losers] of a pair batch as N = 2B single samples (winners first, so row i and row B+i
    are the two images of pair i). Winners are desirable, losers undesirable. Raises if the loop ran
    without losers (the objective must declare ``uses_losers=True``)."""
    if errors.policy_l is None:
        raise ValueError("this objective reads winners and losers as single samples, but the batch has no "
                         "losers: register it with uses_losers=True")
    b = errors.policy_w.shape[0]
    ref = None
    if errors.ref_w is not None and errors.ref_l is not None:
        ref = torch.cat([errors.ref_w, errors.ref_l])
    score = None
    if errors.score_w is not None and errors.score_l is not None:
        score = torch.cat([errors.score_w, errors.score_l])
    desirable = torch.cat([torch.ones(b, dtype=torch.bool, device=errors.policy_w.device),
                           torch.zeros(b, dtype=torch.bool, device=errors.policy_w.device)])
    return SampleErrors(policy=torch.cat([errors.policy_w, errors.policy_l]), ref=ref, desirable=desirable,
                        t=torch.cat([errors.t, errors.t]), score=score)


def scaled_scores(raw: torch.Tensor, score_min: float = 0.0, score_max: float = 1.0) -> torch.Tensor:
    """S = (raw - score_min) / (score_max - score_min): the reward on the scale the objectives assume
    (GAPO needs S in [0, 1]; Flow-RWR's temperature τ is in units of S). The defaults (0, 1) leave scores
    that already lie in [0, 1], such as the world oracle's, unchanged. No gradient (rewards are data); floating
    inputs keep their dtype (the loop passes float32), integer ones become float32."""
    if not score_max > score_min:
        raise ValueError(f"score_max ({score_max}) must be greater than score_min ({score_min})")
    raw = raw.detach() if raw.is_floating_point() else raw.detach().float()
    return (raw - score_min) / (score_max - score_min)


def require_scores(errors: PairErrors, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(score_w, score_l), or a ValueError naming the config key that makes the data carry them."""
    if errors.score_w is None or errors.score_l is None:
        raise ValueError(f"objective {objective!r} needs a reward score per image, but the batch carries none: "
                         "set data.score_column (e.g. 'score' for the world's score_0/score_1 columns) and, "
                         "with a latent cache, rebuild the cache with it")
    return errors.score_w, errors.score_l


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; 0 when the mask is empty (so every step logs the same keys, which
    the cross-rank metric reduction needs)."""
    n = mask.sum()
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / n.clamp(min=1)
