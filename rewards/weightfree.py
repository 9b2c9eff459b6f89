"""Weight-free scorers: pixel statistics that need no model and no download.

Images are float [N, 3, H, W] RGB in [0, 1]; videos float [N, F, 3, H, W] in [0, 1] with one fps per
video (the reward interface's conventions, ``base.py``). Each returns {name: [N]}, higher = better
for the name (so "compressibility" is minus the JPEG size). An image scorer given a video (or the
reverse) raises RewardError instead of silently scoring something else; so do inputs that are
plainly not in [0, 1] (0-255 values, or [-1, 1] images).

==================  =====================================================================  =========
name                definition                                                             differen-
                                                                                           tiable
==================  =====================================================================  =========
incompressibility   DDPO: size in kB (bytes / 1000) of the uint8 image as JPEG, quality 95  no
compressibility     DDPO: minus that size                                                  no
brightness          mean Rec. 601 luma Y' = 0.299 R' + 0.587 G' + 0.114 B', in [0, 1]      yes
saturation          mean HSV saturation (max - min) / max (0 where max = 0), in [0, 1]     yes
colorfulness        Hasler & Suesstrunk 2003, M = sigma_rgyb + 0.3 mu_rgyb on 0-255 values  yes
flicker             (255 - mean |x_{t+1} - x_t|) / 255 on 0-255 values, in [0, 1]           no
motion              mean |x_{t+1} - x_t| / dt on [0, 1] values: intensity change per SECOND  no
==================  =====================================================================  =========

flicker and motion accept an optional sampling rate as their checkpoint: ``flicker:8`` /
``motion:8`` first pick the frames on screen at 8 frames per second of video time
(``media.sample_frames_by_time``), so files of the same clip at different frame rates compare.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import torch

from .base import Reward, RewardError
from .media import frame_indices_by_time
from .registry import register

# Inputs outside these bounds are not [0, 1] images with a little overshoot (decoded latents often
# overshoot slightly, and guidance needs their gradients unclipped) but another convention.
_RANGE_LO, _RANGE_HI = -0.5, 1.5
# On the CPU these statistics are memory-bound chains of elementwise passes: over a whole large
# batch every pass streams from DRAM, while one image at a time stays in cache (measured in
# bench/score_throughput.py: at 256 px a 64-image batch was up to 1.5x SLOWER than a loop). So CPU
# batches are scored in chunks of about this many bytes (a typical L2 cache), which keeps the
# per-call savings of batching for small images and the cache locality for large ones.
_CPU_CHUNK_BYTES = 2 << 20


def _chunked(fn, x: torch.Tensor) -> torch.Tensor:
    """fn over cache-sized chunks of the batch x (CPU only), concatenated; autograd flows through."""
    per_item = x[0].numel() * x.element_size() if len(x) else 1
    step = max(1, _CPU_CHUNK_BYTES // max(per_item, 1))
    if x.device.type != "cpu" or len(x) <= step:
        return fn(x)
    return torch.cat([fn(x[i:i + step]) for i in range(0, len(x), step)])


# Rec. 601 luma weights (the JPEG/BT.601 Y' of gamma-encoded R'G'B'), the classic "brightness".
REC601 = (0.299, 0.587, 0.114)


def _check_range(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise RewardError(f"reward '{name}' takes float pixels in [0, 1]; got dtype {x.dtype} "
                          f"(for uint8 images use x.float() / 255)")
    if x.numel():
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))  # one pass over the data
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise RewardError(f"reward '{name}': the input contains NaN or inf")
        if lo < _RANGE_LO or hi > _RANGE_HI:
            hint = "0-255 values? divide by 255" if hi > _RANGE_HI else "[-1, 1] images? use (x + 1) / 2"
            raise RewardError(f"reward '{name}' takes pixels in [0, 1]; got values in [{lo:.3g}, {hi:.3g}] ({hint})")


def check_images(name: str, images: torch.Tensor) -> None:
    """RewardError unless ``images`` is float [N, 3, H, W] in [0, 1] (a video batch is named as such)."""
    if not isinstance(images, torch.Tensor):
        raise RewardError(f"reward '{name}' takes a torch tensor [N, 3, H, W]; got {type(images).__name__}")
    if images.ndim == 5:
        raise RewardError(f"reward '{name}' scores images [N, 3, H, W]; got a video batch {tuple(images.shape)}. "
                          f"Score frames explicitly (e.g. videos.flatten(0, 1)) if that is what you mean")
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardError(f"reward '{name}' scores RGB images [N, 3, H, W]; got shape {tuple(images.shape)}")
    _check_range(name, images)


def check_videos(name: str, videos: torch.Tensor, fps: Sequence[float] | torch.Tensor | None,
                 need_fps: bool, min_frames: int = 1) -> torch.Tensor | None:
    """RewardError unless ``videos`` is float [N, F, 3, H, W] in [0, 1] with F >= min_frames; returns
    fps as float64 [N] (None when not given and not needed)."""
    if not isinstance(videos, torch.Tensor):
        raise RewardError(f"reward '{name}' takes a torch tensor [N, F, 3, H, W]; got {type(videos).__name__}")
    if videos.ndim == 4:
        raise RewardError(f"reward '{name}' scores videos [N, F, 3, H, W]; got a 4-D tensor {tuple(videos.shape)} "
                          f"(an image batch? a single video needs a leading batch axis: video[None])")
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise RewardError(f"reward '{name}' scores RGB videos [N, F, 3, H, W]; got shape {tuple(videos.shape)}")
    if videos.shape[1] < min_frames:
        raise RewardError(f"reward '{name}' needs videos of >= {min_frames} frames; got {videos.shape[1]}")
    _check_range(name, videos)
    if fps is None:
        if need_fps:
            raise RewardError(f"reward '{name}' works in video time and needs fps (one per video: the file's real "
                              f"frame rate, as media.load_video returns it)")
        return None
    rates = torch.as_tensor(fps, dtype=torch.float64).reshape(-1)
    if rates.numel() == 1 and len(videos) > 1:
        rates = rates.expand(len(videos))
    if rates.numel() != len(videos):
        raise RewardError(f"reward '{name}': {len(videos)} videos but {rates.numel()} fps values")
    if not bool(torch.all(torch.isfinite(rates) & (rates > 0))):
        raise RewardError(f"reward '{name}': fps must be positive numbers, got {rates.tolist()}")
    return rates


class ImageScorer(Reward):
    """An image statistic: subclasses implement ``_score(images [N, 3, H, W]) -> [N]``."""

    input_kind = "image"

    def score(self, inputs: torch.Tensor, prompts: Sequence[str] | None = None, *,
              fps: Sequence[float] | None = None, t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        check_images(self.name, inputs)
        return {self.dimensions[0]: _chunked(self._score, inputs)}

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Incompressibility(ImageScorer):
    """DDPO's JPEG incompressibility: the image's JPEG size in kB (bytes / 1000) at quality 95.

    Exactly DDPO's ``jpeg_incompressibility``: (x * 255).round().clamp(0, 255) to uint8, PIL JPEG
    at quality 95 (PIL's default 4:2:0 chroma subsampling), size = bytes / 1000. Not
    differentiable (JPEG is a discrete codec).
    """

    name = "incompressibility"
    dimensions = ("incompressibility",)
    sign = 1.0

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        sizes = []
        for image in images.detach():
            # one image at a time: the uint8 conversion stays in cache instead of streaming the batch
            arr = image.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            buffer = io.BytesIO()
            Image.fromarray(arr).save(buffer, format="JPEG", quality=95)
            sizes.append(buffer.tell() / 1000.0)
        return torch.tensor(sizes, dtype=torch.float32, device=images.device) * self.sign


class Compressibility(Incompressibility):
    """DDPO's JPEG compressibility: minus the JPEG size in kB at quality 95 (smaller file = higher)."""

    name = "compressibility"
    dimensions = ("compressibility",)
    sign = -1.0


class Brightness(ImageScorer):
    """Mean Rec. 601 luma Y' = 0.299 R' + 0.587 G' + 0.114 B' of the (gamma-encoded) pixels, in [0, 1].

    Rec. 601 rather than 709 because it is the luma JPEG, PIL's convert("L") and most "brightness"
    filters use, so the number matches what users compute elsewhere. Differentiable (linear).
    """

    name = "brightness"
    dimensions = ("brightness",)
    differentiable = True

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        w = torch.tensor(REC601, dtype=images.dtype, device=images.device)
        # luma is linear, so mean luma = sum_c w_c * mean(channel c): one reduction pass, no [N, H, W] temporary
        return images.mean(dim=(2, 3)) @ w


class Saturation(ImageScorer):
    """Mean HSV saturation S = (max - min) / max over R, G, B per pixel (0 for black), in [0, 1].

    Differentiable almost everywhere (max/min are piecewise linear; at black pixels the gradient is
    taken as 0, since S is defined as 0 there).
    """

    name = "saturation"
    dimensions = ("saturation",)
    differentiable = True

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        hi = images.amax(dim=1)
        lo = images.amin(dim=1)
        positive = hi > 1e-8
        # where() on a clamped denominator keeps the unused branch finite, so no NaN gradients at black
        s = torch.where(positive, (hi - lo) / hi.clamp_min(1e-8), torch.zeros_like(hi))
        return s.flatten(1).mean(dim=1)


def _safe_sqrt(x: torch.Tensor, tiny: float = 1e-12) -> torch.Tensor:
    """sqrt with a finite gradient at 0: 0 below ``tiny``, so at most sqrt(tiny) = 1e-6 below the true root
    (2.6e-4 colourfulness units after the 255 scaling)."""
    return torch.where(x > tiny, x.clamp_min(tiny).sqrt(), torch.zeros_like(x))


class Colorfulness(ImageScorer):
    """Hasler & Suesstrunk (2003) colourfulness M = sigma_rgyb + 0.3 * mu_rgyb on 0-255 values.

    rg = R - G, yb = (R + G) / 2 - B per pixel (signed, as in the paper);
    sigma_rgyb = sqrt(var(rg) + var(yb)) (population variances over the image's pixels),
    mu_rgyb = sqrt(mean(rg)^2 + mean(yb)^2). Grey images score 0; the paper calls ~33 "moderately"
    and ~59 "quite" colourful; a flat pure red image scores 0.3 * sqrt(255^2 + 127.5^2) = 85.5.
    Differentiable (the square roots use a gradient-safe form at 0, e.g. for grey images).
    """

    name = "colorfulness"
    dimensions = ("colorfulness",)
    differentiable = True

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        r, g, b = images[:, 0].flatten(1), images[:, 1].flatten(1), images[:, 2].flatten(1)
        rg = r - g
        yb = 0.5 * (r + g) - b
        # fused single-pass variance and mean (population variance, correction=0, as in the paper)
        var_rg, mean_rg = torch.var_mean(rg, dim=1, correction=0)
        var_yb, mean_yb = torch.var_mean(yb, dim=1, correction=0)
        # computed on [0, 1] and scaled: M is homogeneous of degree 1, so M(255 x) = 255 M(x), which
        # spares a full-size copy of the batch
        m = _safe_sqrt(var_rg + var_yb) + 0.3 * _safe_sqrt(mean_rg.square() + mean_yb.square())
        return 255.0 * m


class VideoScorer(Reward):
    """A statistic of consecutive-frame differences; ``sample_fps`` resamples each video by time first."""

    input_kind = "video"
    needs_fps = False

    def __init__(self, sample_fps: float | None = None) -> None:
        if sample_fps is not None and not (math.isfinite(sample_fps) and sample_fps > 0):
            raise RewardError(f"reward '{self.name}': the sampling rate must be a positive number, got {sample_fps}")
        self.sample_fps = sample_fps

    def score(self, inputs: torch.Tensor, prompts: Sequence[str] | None = None, *,
              fps: Sequence[float] | None = None, t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        rates = check_videos(self.name, inputs, fps, need_fps=self.needs_fps or self.sample_fps is not None)
        if self.sample_fps is None:
            diffs = _chunked(lambda v: (v[:, 1:] - v[:, :-1]).abs().flatten(2).mean(dim=2), inputs)  # [N, F-1]
            steps = torch.ones_like(diffs)                                           # frames per step
            out = self._combine(diffs, steps, rates)
        else:
            # Videos in one batch may have different rates, so each picks its own frame indices.
            out = []
            for i, video in enumerate(inputs):
                idx, _ = frame_indices_by_time(video.shape[0], float(rates[i]), target_fps=self.sample_fps)
                idx = idx.to(video.device)
                diffs = (video[idx[1:]] - video[idx[:-1]]).abs().flatten(1).mean(dim=1)
                steps = (idx[1:] - idx[:-1]).to(diffs.dtype)
                out.append(self._combine(diffs[None], steps[None], rates[i:i + 1]))
            out = torch.cat(out)
        return {self.dimensions[0]: out}

    def _combine(self, diffs: torch.Tensor, steps: torch.Tensor, rates: torch.Tensor | None) -> torch.Tensor:
        """diffs [N, K]: mean |x_b - x_a| on [0, 1] per picked pair; steps [N, K]: b - a in source frames.
        K = 0 (a one-frame video, e.g. a static GIF whose identical frames were merged) is a still:
        no change, so flicker 1 and motion 0 (the limits of the definitions, never NaN)."""
        raise NotImplementedError


class Flicker(VideoScorer):
    """Temporal flicker score (255 - mean |x_{t+1} - x_t|) / 255 on 0-255 values, in [0, 1], 1 = static.

    The mean runs over every consecutive pair, pixel and channel; on [0, 1] values this is exactly
    1 - mean |x_{t+1} - x_t|. By its definition it is per FRAME (flicker is a frame-to-frame
    artefact), so the same clip at a higher frame rate scores closer to 1; ``flicker:R`` compares
    files of different rates by first picking the frames shown at R fps. Not marked differentiable:
    |.| has its kink at zero change, exactly where a good (static) pixel sits.
    """

    name = "flicker"
    dimensions = ("flicker",)

    def _combine(self, diffs, steps, rates):
        if diffs.shape[1] == 0:
            return diffs.new_ones(diffs.shape[0])
        return 1.0 - diffs.mean(dim=1)


class Motion(VideoScorer):
    """Motion magnitude: mean |x_b - x_a| / (t_b - t_a) on [0, 1] values, per SECOND of video time.

    For consecutive frames t_b - t_a = 1 / fps, so this is mean |frame diff| * fps: the fraction of
    full-scale intensity that changes per second. Dividing by the real time step (not per frame)
    is what makes it comparable across frame rates: for motion that is small against the scene's
    detail (the common case at video rates) a frame difference grows linearly with the time
    between frames, so the rate cancels. With ``motion:R`` the frames are first picked at R fps
    of video time and each difference is divided by the true time between the two picked frames.
    Optical flow would measure displacement rather than intensity change, but needs a model or a
    heavy dependency; this is the weight-free proxy (0 for a static clip, larger for faster or
    larger motion). Not marked differentiable (|.| has its kink at zero change).
    """

    name = "motion"
    dimensions = ("motion",)
    needs_fps = True

    def _combine(self, diffs, steps, rates):
        if diffs.shape[1] == 0:
            return diffs.new_zeros(diffs.shape[0])
        dt = steps / rates.to(diffs.dtype).to(diffs.device)[:, None]  # seconds between the two frames
        return (diffs / dt).mean(dim=1)


def _no_checkpoint(name: str, checkpoint: str | None) -> None:
    if checkpoint is not None:
        raise RewardError(f"reward '{name}' is weight-free and takes no checkpoint; got '{name}:{checkpoint}'")


def _rate(name: str, checkpoint: str | None) -> float | None:
    if checkpoint is None:
        return None
    try:
        return float(checkpoint)
    except ValueError:
        raise RewardError(f"reward '{name}' is weight-free; '{name}:{checkpoint}' must give a sampling rate in frames "
                          f"per second, e.g. '{name}:8'") from None


@register("incompressibility", dimensions=("incompressibility",), input_kind="image",
          help="JPEG size in kB at quality 95 (DDPO); higher = more detail/noise")
def _incompressibility(checkpoint: str | None, device: torch.device) -> Reward:
    _no_checkpoint("incompressibility", checkpoint)
    return Incompressibility()


@register("compressibility", dimensions=("compressibility",), input_kind="image",
          help="minus the JPEG size in kB at quality 95 (DDPO); higher = simpler image")
def _compressibility(checkpoint: str | None, device: torch.device) -> Reward:
    _no_checkpoint("compressibility", checkpoint)
    return Compressibility()


@register("brightness", dimensions=("brightness",), input_kind="image",
          help="mean Rec.601 luma in [0, 1]; differentiable")
def _brightness(checkpoint: str | None, device: torch.device) -> Reward:
    _no_checkpoint("brightness", checkpoint)
    return Brightness()


@register("saturation", dimensions=("saturation",), input_kind="image",
          help="mean HSV saturation in [0, 1]; differentiable")
def _saturation(checkpoint: str | None, device: torch.device) -> Reward:
    _no_checkpoint("saturation", checkpoint)
    return Saturation()


@register("colorfulness", dimensions=("colorfulness",), input_kind="image",
          help="Hasler-Suesstrunk colourfulness on 0-255 values (grey = 0); differentiable")
def _colorfulness(checkpoint: str | None, device: torch.device) -> Reward:
    _no_checkpoint("colorfulness", checkpoint)
    return Colorfulness()


@register("flicker", dimensions=("flicker",), input_kind="video",
          help="(255 - mean |frame diff|) / 255, 1 = static; flicker:R samples frames at R fps first")
def _flicker(checkpoint: str | None, device: torch.device) -> Reward:
    return Flicker(_rate("flicker", checkpoint))


@register("motion", dimensions=("motion",), input_kind="video",
          help="mean |frame diff| per second of video time (uses fps); motion:R samples at R fps first")
def _motion(checkpoint: str | None, device: torch.device) -> Reward:
    return Motion(_rate("motion", checkpoint))


__all__ = ["Brightness", "Colorfulness", "Compressibility", "Flicker", "ImageScorer", "Incompressibility", "Motion",
           "REC601", "Saturation", "VideoScorer", "check_images", "check_videos"]
