"""The embedded world's oracle as a reward: how well an image matches its world caption, from pixels.

Wraps :func:`diffalign.world.oracle.score` behind the reward interface, so the CLI, samplers and
evaluation score world renders and generations the same way as any other reward.

* input: float [N, 3, H, W] RGB in [0, 1], SQUARE, H >= 8. The oracle's own float convention is
  [-1, 1] NCHW, so pixels are passed as 2 x - 1 in float64 (no uint8 rounding; the oracle clips to
  [-1, 1] as saving the image would, and works on 255 x).
* size: the oracle measures geometry in fractions of the image side, but its shape templates are
  blurred by a few PIXELS (tuned on the world's 32 x 32 images). Images larger than 32 px are
  therefore area-averaged down to 32 x 32 (which is also what rendering at 32 px computes: pixel
  values are covered fractions), keeping the scores on the world's scale and the cost flat
  (the oracle is ~50x slower at 256 px). 8 to 32 px are scored as they are. Non-square images
  are an error (the world has none; cropping would move the layout).
* prompts: exact world captions (``Scene.caption()``, e.g. "a small red circle at the top left on
  a black background"); anything else is a RewardError naming the prompt.
* output: {"color", "shape", "background", "layout", "overall"} -> float32 [N] in [0, 1];
  "overall" is the oracle's mean of the four. Not differentiable (numpy).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import Reward, RewardError
from .registry import register
from .weightfree import check_images

WORLD_SIZE = 32  # the world's native resolution; larger images are area-downsampled to it
ORACLE_DIMENSIONS: tuple[str, ...] = ("color", "shape", "background", "layout", "overall")


class OracleReward(Reward):
    """diffalign.world.oracle.score as a Reward (see the module docstring for sizes and conventions)."""

    name = "oracle"
    dimensions = ORACLE_DIMENSIONS
    input_kind = "image"
    needs_prompt = True
    differentiable = False

    def score(self, inputs: torch.Tensor, prompts: Sequence[str] | None = None, *,
              fps: Sequence[float] | None = None, t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        from diffalign.world.oracle import score as oracle_score
        from diffalign.world.scenes import parse_caption

        check_images(self.name, inputs)
        if prompts is None:
            raise RewardError("reward 'oracle' needs the world caption of each image as its prompt")
        h, w = inputs.shape[-2:]
        if h != w:
            raise RewardError(f"reward 'oracle' scores square world images; got {h}x{w} (H x W)")
        if h < 8:
            raise RewardError(f"reward 'oracle' needs images of at least 8x8 pixels; got {h}x{w}")
        scenes = []
        for i, caption in enumerate(prompts):
            try:
                scenes.append(parse_caption(caption))
            except ValueError as e:
                raise RewardError(f"reward 'oracle', prompt {i}: {e}") from None
        x = inputs.detach()
        if h > WORLD_SIZE:
            x = torch.nn.functional.interpolate(x.float(), size=(WORLD_SIZE, WORLD_SIZE), mode="area")
        scores = oracle_score(x.to("cpu", torch.float64) * 2.0 - 1.0, scenes)
        return {d: torch.as_tensor(scores[d], dtype=torch.float32).to(inputs.device) for d in ORACLE_DIMENSIONS}


@register("oracle", dimensions=ORACLE_DIMENSIONS, input_kind="image",
          help="embedded world's pixel oracle vs the exact world caption (needs prompts); overall = mean of 4")
def _oracle(checkpoint: str | None, device: torch.device) -> Reward:
    if checkpoint is not None:
        raise RewardError(f"reward 'oracle' is computed from pixels and takes no checkpoint; got 'oracle:{checkpoint}'")
    return OracleReward()
