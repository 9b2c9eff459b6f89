"""Training objectives: pure functions from per-sample errors to (loss, metrics). No model code, no I/O.

The training loop asks an :class:`Objective` three questions (does it read losers? does it need the
reference model? does it need a reward score per image?) and calls it with a :class:`PairErrors`.
On UNPAIRED data (single images labelled desirable / undesirable, diffalign.data.unpaired) it calls the
objective's ``sample_fn`` with a :class:`SampleErrors` instead; objectives without one need pairs and
refuse such data. Adding an objective = one function + one entry in :data:`OBJECTIVES`.

    name   losers  reference  scores   what
    dpo    yes     yes        no       Diffusion-DPO / Flow-DPO (dpo.py)
    sft    no      no         no       plain denoising / flow-matching loss on winners (sft.py)
    gapo   yes     yes        yes      DPO with each pair weighted by 2^S_w - 2^S_l (gapo.py)
    rwr    yes     no         yes      Flow-RWR: reward-weighted loss on winners AND losers as images (rwr.py)
    kto    yes     yes        no       Diffusion-KTO: unpaired labelled images, or pairs as winners desirable and
                                       losers undesirable (kto.py); the only objective with a sample_fn
    mapo   yes     no         no       MaPO: reference-free margin + SFT on winners (mapo.py)
    seppo  sampled yes        no       SePPO: data winners vs a pooled past checkpoint's own sample (seppo.py)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from diffalign.objectives.dpo import PairErrors, dpo_loss, implicit_accuracy
from diffalign.objectives.gapo import check_gapo_scores, gapo_loss
from diffalign.objectives.kto import kto_loss, kto_sample_loss
from diffalign.objectives.mapo import mapo_loss
from diffalign.objectives.rwr import rwr_loss, rwr_weights
from diffalign.objectives.seppo import seppo_flip, seppo_loss
from diffalign.objectives.samples import SampleErrors, pairs_as_samples, scaled_scores
from diffalign.objectives.sft import sft_loss


@dataclass(frozen=True)
class Objective:
    """A training objective as the loop sees it.

    ``fn(errors, objective_cfg) -> (loss, metrics)``. ``needs_scores``: the data must carry a reward score
    per image (``data.score_column``); ``check_scores(score_w, score_l, rows, objective_cfg)``, if set, is run
    by the loop once over the whole dataset's raw scores before training, so bad data fails before step 1.
    """

    name: str
    uses_losers: bool
    needs_reference: bool
    fn: Callable[[PairErrors, "object"], tuple[torch.Tensor, dict[str, float]]]
    needs_scores: bool = False
    check_scores: Callable[[torch.Tensor, torch.Tensor, list[int], "object"], None] | None = None
    # the loser slot is filled by the training loop's sampler (diffalign.train.online), not read from the data;
    # the reference is then whatever that component loads (a pooled LoRA snapshot for SePPO)
    generates_losers: bool = False
    # ``sample_fn(samples, objective_cfg) -> (loss, metrics)`` on a batch of N single labelled images (unpaired
    # data: each with its own ε and t); None = the objective needs pairs, and the loop refuses unpaired data
    sample_fn: Callable[[SampleErrors, "object"], tuple[torch.Tensor, dict[str, float]]] | None = None

    def __call__(self, errors: PairErrors, cfg) -> tuple[torch.Tensor, dict[str, float]]:
        return self.fn(errors, cfg)


def _check_gapo(score_w: torch.Tensor, score_l: torch.Tensor, rows: list[int], c) -> None:
    check_gapo_scores(scaled_scores(score_w, c.score_min, c.score_max),
                      scaled_scores(score_l, c.score_min, c.score_max), rows)


OBJECTIVES: dict[str, Objective] = {
    "dpo": Objective(
        "dpo", uses_losers=True, needs_reference=True,
        fn=lambda e, c: dpo_loss(e, c.beta, c.loss_type, c.time_weighting, c.sft_weight, c.velocity_weight_cap),
    ),
    "sft": Objective("sft", uses_losers=False, needs_reference=False, fn=lambda e, c: sft_loss(e.policy_w)),
    "gapo": Objective(
        "gapo", uses_losers=True, needs_reference=True, needs_scores=True, check_scores=_check_gapo,
        fn=lambda e, c: gapo_loss(e, c.beta, c.loss_type, c.time_weighting, c.score_min, c.score_max, c.sft_weight,
                                  c.velocity_weight_cap),
    ),
    "rwr": Objective(
        "rwr", uses_losers=True, needs_reference=False, needs_scores=True,
        fn=lambda e, c: rwr_loss(e, c.tau, c.weight_clip, c.score_min, c.score_max),
    ),
    "kto": Objective(
        "kto", uses_losers=True, needs_reference=True,
        fn=lambda e, c: kto_loss(e, c.beta, c.kto_lambda_desirable, c.kto_lambda_undesirable),
        sample_fn=lambda s, c: kto_sample_loss(s, c.beta, c.kto_lambda_desirable, c.kto_lambda_undesirable),
    ),
    "mapo": Objective(
        "mapo", uses_losers=True, needs_reference=False,
        fn=lambda e, c: mapo_loss(e, c.mapo_gamma, c.mapo_weight, c.mapo_scale),
    ),
    "seppo": Objective(
        "seppo", uses_losers=True, needs_reference=True, generates_losers=True,
        fn=lambda e, c: seppo_loss(e, c.beta, c.seppo_flipper),
    ),
}


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(OBJECTIVES)}") from None


__all__ = ["Objective", "OBJECTIVES", "PairErrors", "SampleErrors", "dpo_loss", "gapo_loss", "get_objective",
           "implicit_accuracy", "kto_loss", "kto_sample_loss", "mapo_loss", "pairs_as_samples", "rwr_loss", "rwr_weights",
           "scaled_scores", "seppo_flip", "seppo_loss", "sft_loss"]
