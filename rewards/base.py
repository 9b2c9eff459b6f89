"""The reward interface: every scorer (weight-free, CLIP-family, trained multi-dimensional, noise-aware
latent) is called the same way and returns named dimensions.

Conventions (every implementation follows them; tests check them):

* input kinds
    - "image":  float tensor [N, 3, H, W], RGB in [0, 1] (``media.load_image`` produces this).
    - "video":  float tensor [N, F, 3, H, W] in [0, 1] plus ``fps`` (one float per video: the video's
                REAL frame rate, so scorers that sample frames by time stay honest).
    - "latent": noisy latents x_t [N, C, h, w] (or [N, C, F, h, w] for video) in the generator's
                latent space, plus ``t`` [N] in UNIT time (0 = clean, 1 = pure noise; the family
                adapter's ``unit_time`` converts native timesteps).
* ``prompts``: list[str] of length N, or None for prompt-free scorers (``needs_prompt`` says which).
* ``score(...)`` returns {dimension: float tensor [N]}, higher = better, in the scorer's raw units.
  With ``differentiable = True`` the result is differentiable w.r.t. the input tensor (call it
  outside ``torch.no_grad``); otherwise implementations may run under no_grad.
* Normalisation: ``Normalizer`` holds per-dimension (mean, std) fitted on a validation set;
  normalised = (raw - mean) / std.  ``weighted_overall`` combines dimensions with user weights
  (default: all 1, i.e. VideoReward's overall = VQ + MQ + TA).
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Sequence

import torch

InputKind = Literal["image", "video", "latent"]


class RewardError(ValueError):
    """A reward could not be built, loaded or applied; the message names the file/key and the fix."""


class Reward(ABC):
    """A scorer with named dimensions.  Subclasses set the class attributes and implement ``score``."""

    name: ClassVar[str]                    # short lowercase CLI name, e.g. "brightness", "pickscore"
    dimensions: ClassVar[tuple[str, ...]]  # e.g. ("VQ", "MQ", "TA"); one-dimensional scorers use (name,)
    input_kind: ClassVar[InputKind]
    needs_prompt: ClassVar[bool] = False
    differentiable: ClassVar[bool] = False

    @abstractmethod
    def score(self, inputs: torch.Tensor, prompts: Sequence[str] | None = None, *,
              fps: Sequence[float] | None = None, t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{dimension: [N]} raw scores; see the module docstring for input conventions."""

    def __call__(self, inputs: torch.Tensor, prompts: Sequence[str] | None = None, **kw) -> dict[str, torch.Tensor]:
        if self.needs_prompt and prompts is None:
            raise RewardError(f"reward '{self.name}' scores image-text agreement and needs prompts "
                              f"(--prompt TEXT or --prompts FILE on the command line)")
        if prompts is not None and len(prompts) != len(inputs):
            raise RewardError(f"reward '{self.name}': {len(inputs)} inputs but {len(prompts)} prompts")
        return self.score(inputs, prompts, **kw)

    def to(self, device: torch.device | str) -> "Reward":
        """Move any modules the reward holds; weight-free rewards return self unchanged."""
        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                value.to(device)
        return self


@dataclass
class Normalizer:
    """Per-dimension (mean, std) from a validation set: normalised = (raw - mean) / std."""

    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fit(cls, scores: dict[str, torch.Tensor], min_std: float = 1e-6) -> "Normalizer":
        return cls({k: float(v.float().mean()) for k, v in scores.items()},
                   {k: max(float(v.float().std(unbiased=False)), min_std) for k, v in scores.items()})

    def __call__(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v - self.mean[k]) / self.std[k] if k in self.mean else v for k, v in scores.items()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"mean": self.mean, "std": self.std}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Normalizer":
        data = json.loads(Path(path).read_text())
        return cls(dict(data["mean"]), dict(data["std"]))


def weighted_overall(scores: dict[str, torch.Tensor], weights: dict[str, float] | None = None) -> torch.Tensor:
    """sum_k w_k * score_k over the dimensions in ``weights`` (default: every dimension, weight 1)."""
    if not scores:
        raise RewardError("no dimensions to combine")
    weights = weights if weights is not None else {k: 1.0 for k in scores}
    unknown = sorted(set(weights) - set(scores))
    if unknown:
        raise RewardError(f"weights name unknown dimension(s) {unknown}; this reward has {sorted(scores)}")
    return sum(w * scores[k] for k, w in weights.items())
