"""Video oracle: how well a clip matches its video caption, measured from pixels alone.

The video counterpart of :mod:`diffalign.world.oracle` and built on it: every frame is measured by
the image oracle's ``measure`` (background, object colour, centroid, area, shape fit, presence) and
appearance is scored by its ``compare``; what is new is read from the per-frame measurements over
time. Like the image oracle every score is a continuous function of the pixels (no hard threshold)
in [0, 1], and a clip with no visible object scores ~0 on everything but background (never NaN).

Clips: uint8 [N, F, H, W, 3] on 0-255, or float [N, F, 3, H, W] in [-1, 1] (torch or numpy);
square frames, F >= 3. (WanAdapter.decode_latents returns [N, F, 3, H, W] in [0, 1]: pass ``2x - 1``.)

Per-frame measurements (see the image oracle): presence p_f, centroid c_f (x, y in image sides),
area a_f, object colour o_f and background b_f (RGB 0-255). Time t_f = f / (F - 1), so velocities
are in image sides PER CLIP, the unit of the world's ``TRAVEL`` (0.15 slow, 0.33 fast).

Scores, with the image oracle's kernel k(x; x0, q) = 1 / (1 + (x/x0)^q) (1 at 0 with zero slope, 1/2
at x0, heavy tail, so scores fall gradually):

* color, shape, background: the image oracle's per-frame scores (``compare`` against the frame's
  Scene) averaged over frames, so a wrong frame costs 1/F and a wrong clip everything.
* size: per frame presence * k(|log(a_f / target area)|, 0.6, 6), the image oracle's size term
  (the two sizes' areas differ by exp(1.2)), averaged over frames.
* direction: v = presence-weighted least-squares slope of c_f over t_f (robust to one bad frame,
  unlike end minus start). theta = angle between v and the caption's direction;
  direction = k(theta, 45 deg, 4) * (1 - k(|v|, 0.075, 6)). 45 deg: perpendicular motion (90 deg)
  scores 0.06 and opposite (180 deg) 0.004, while the few-degree wobble of a noisy centroid costs
  nothing. The second factor ("is it moving at all", 1/2 at half the slow travel, 0.985 at slow
  travel) makes the angle of a near-static object, which is noise, count for nothing, and keeps the
  score continuous where the angle is undefined (v = 0).
* speed: k(|log(|v| / TRAVEL[speed])|, 0.35, 4). Slow and fast differ by log 2.2 = 0.79, which
  scores 0.04; a 10% speed error costs 0.005. Uses |v|, not its component along the caption's
  direction, so a wrong direction does not leak into speed.
* smoothness: k(jerk, 0.03, 4) * k(colour flicker, 40, 4) * k(area flicker, 0.3, 4) where
  jerk = RMS of the centroid second differences c_{f+1} - 2 c_f + c_{f-1} (image sides; 0 for the
  world's constant-velocity motion, <= 0.006 measured on 16 px renders; shuffled frames give ~5
  frame steps: median 0.16, 5th percentile 0.08 for 8-frame clips), colour flicker = RMS over
  consecutive frames of sqrt(|o_{f+1} - o_f|^2 + |b_{f+1} - b_f|^2) (RGB; palette colours are
  >= 115 apart, so 40 is a third of a colour change) and area flicker = RMS of log(a_{f+1} / a_f)
  (0.3 = a 35% area jump; the sizes differ by 1.2). Differences are weighted by the product of the
  frames' presences. Pixel noise makes all three nonzero (at 16 px, noise std 20 gives median jerk
  0.010, colour flicker 15, area flicker 0.05), so the tolerances sit ~3x above that: smoothness
  should flag motion and flicker, not mild noise, which the appearance scores already price in. A
  jittering object (+-0.5 px a frame at 16 px, jerk ~0.045) scores ~0.2.
* color, shape, size, direction, speed and smoothness are multiplied by the clip's mean presence
  (color and shape per frame, through the image oracle), so a blank clip scores ~0 on them.
* overall = mean of the seven dimensions.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

from diffalign.world.oracle import LAYOUT_POWER, SIZE_TOL, Measurement, _soft_below, compare, measure
from diffalign.world.render import shape_area
from diffalign.world.video import DIRECTIONS, TRAVEL, VideoScene, parse_video_caption

VIDEO_DIMENSIONS: tuple[str, ...] = ("color", "shape", "background", "size", "direction", "speed", "smoothness")

# Tolerances (the value at which each kernel gives 1/2) and powers; reasons in the module docstring.
DIRECTION_TOL, DIRECTION_POWER = math.pi / 4, 4.0          # radians
MOVING_TOL, MOVING_POWER = 0.5 * TRAVEL["slow"], 6.0        # image sides per clip
SPEED_TOL, SPEED_POWER = 0.35, 4.0                           # |log speed ratio|
JERK_TOL, FLICKER_RGB_TOL, FLICKER_AREA_TOL, SMOOTH_POWER = 0.03, 40.0, 0.3, 4.0

_EPS = 1e-8


@dataclass(frozen=True)
class VideoMeasurement:
    """Caption-free measurements of N clips of F frames (numpy float64).

    frames: the image oracle's Measurement of all N*F frames, clip-major (frame f of clip i is row
    i*F + f); velocity: [N, 2] (x, y) centroid velocity in image sides per clip; jerk: [N] RMS
    centroid second difference (image sides); color_flicker: [N] RGB units; area_flicker: [N] RMS
    |log area ratio| of consecutive frames; presence: [N] mean per-frame presence.
    """

    frames: Measurement
    num_frames: int
    velocity: np.ndarray
    jerk: np.ndarray
    color_flicker: np.ndarray
    area_flicker: np.ndarray
    presence: np.ndarray


def _flatten_clips(clips: np.ndarray | "torch.Tensor") -> tuple[np.ndarray | "torch.Tensor", int, int]:
    """[N, F, ...] clips -> ([N*F, ...] frames for the image oracle, N, F)."""
    shape = tuple(clips.shape)
    if len(shape) != 5:
        raise ValueError(f"clips must be uint8 [N,F,H,W,3] or float [N,F,3,H,W]; got shape {shape}")
    n, f = shape[0], shape[1]
    if f < 3:
        raise ValueError(f"clips need at least 3 frames to measure motion; got {f}")
    return clips.reshape(n * f, *shape[2:]), n, f


def _weighted_rms(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sqrt(sum w x^2 / sum w) over the last axis; 0 where every weight is 0."""
    return np.sqrt(np.sum(w * x**2, axis=-1) / np.maximum(np.sum(w, axis=-1), _EPS))


def measure_clips(clips: np.ndarray | "torch.Tensor") -> VideoMeasurement:
    """Measure appearance per frame and motion / temporal consistency per clip (pixels only)."""
    frames, n, f = _flatten_clips(clips)
    m = measure(frames)
    p = m.presence.reshape(n, f)
    c = m.centroid.reshape(n, f, 2)
    # Presence-weighted least-squares slope of the centroid against t = f / (F-1): a frame without a
    # visible object (centroid meaningless) has no say. The tiny floor keeps a blank clip finite.
    w = p + 1e-6
    t = np.arange(f, dtype=np.float64) / (f - 1)
    t_mean = np.sum(w * t, axis=1) / np.sum(w, axis=1)
    dt = t[None, :] - t_mean[:, None]
    c_mean = np.sum(w[..., None] * c, axis=1) / np.sum(w, axis=1)[:, None]
    velocity = (np.sum((w * dt)[..., None] * (c - c_mean[:, None]), axis=1)
                / np.maximum(np.sum(w * dt**2, axis=1), _EPS)[:, None])
    accel = np.linalg.norm(c[:, 2:] - 2 * c[:, 1:-1] + c[:, :-2], axis=-1)                   # [N, F-2]
    jerk = _weighted_rms(accel, p[:, 2:] * p[:, 1:-1] * p[:, :-2])
    pair_w = p[:, 1:] * p[:, :-1]
    obj, bg = m.object_rgb.reshape(n, f, 3), m.background_rgb.reshape(n, f, 3)
    d_rgb = np.sqrt(np.sum(np.diff(obj, axis=1) ** 2, axis=-1) + np.sum(np.diff(bg, axis=1) ** 2, axis=-1))
    log_area = np.log(np.maximum(m.area.reshape(n, f), _EPS))
    return VideoMeasurement(frames=m, num_frames=f, velocity=velocity, jerk=jerk,
                            color_flicker=_weighted_rms(d_rgb, pair_w),
                            area_flicker=_weighted_rms(np.diff(log_area, axis=1), pair_w),
                            presence=p.mean(axis=1))


def compare_clips(vm: VideoMeasurement, captions: Sequence[str | VideoScene]) -> dict[str, np.ndarray]:
    """Scores of measured clips against video captions (or VideoScenes): {dimension: [N] in [0, 1], 'overall'}."""
    scenes = [c if isinstance(c, VideoScene) else parse_video_caption(c) for c in captions]
    n, f = len(vm.velocity), vm.num_frames
    if len(scenes) != n:
        raise ValueError(f"got {n} clips but {len(scenes)} captions")
    # Appearance: the image oracle per frame, against the frame's Scene; its layout (position) is
    # meaningless for a moving object and is not used.
    per_frame = compare(vm.frames, [s.frame_scene() for s in scenes for _ in range(f)])
    scores = {d: per_frame[d].reshape(n, f).mean(axis=1) for d in ("color", "shape", "background")}
    area_t = np.repeat([shape_area(s.size) for s in scenes], f)
    size = vm.frames.presence * _soft_below(np.abs(np.log(np.maximum(vm.frames.area, _EPS) / area_t)),
                                            SIZE_TOL, LAYOUT_POWER)
    scores["size"] = size.reshape(n, f).mean(axis=1)

    target = np.array([DIRECTIONS[s.direction] for s in scenes], dtype=np.float64).reshape(n, 2)
    v = vm.velocity
    speed = np.linalg.norm(v, axis=1)
    along = np.sum(v * target, axis=1)
    across = np.abs(v[:, 0] * target[:, 1] - v[:, 1] * target[:, 0])
    theta = np.arctan2(across, along)  # in [0, pi]; arbitrary at v = 0, where `moving` is 0
    moving = 1.0 - _soft_below(speed, MOVING_TOL, MOVING_POWER)
    scores["direction"] = vm.presence * moving * _soft_below(theta, DIRECTION_TOL, DIRECTION_POWER)
    travel_t = np.array([TRAVEL[s.speed] for s in scenes], dtype=np.float64)
    scores["speed"] = vm.presence * _soft_below(np.abs(np.log(np.maximum(speed, _EPS) / travel_t)),
                                                SPEED_TOL, SPEED_POWER)
    scores["smoothness"] = (vm.presence * _soft_below(vm.jerk, JERK_TOL, SMOOTH_POWER)
                            * _soft_below(vm.color_flicker, FLICKER_RGB_TOL, SMOOTH_POWER)
                            * _soft_below(vm.area_flicker, FLICKER_AREA_TOL, SMOOTH_POWER))
    scores = {d: scores[d] for d in VIDEO_DIMENSIONS}
    scores["overall"] = np.mean(np.stack([scores[d] for d in VIDEO_DIMENSIONS]), axis=0)
    return scores


def score_clips(clips: np.ndarray | "torch.Tensor", captions: Sequence[str | VideoScene]) -> dict[str, np.ndarray]:
    """Per-dimension scores of clips against video captions, from pixels alone.

    clips: uint8 [N, F, H, W, 3] (0-255) or float [N, F, 3, H, W] in [-1, 1] (torch or numpy).
    captions: N captions in the exact VideoScene.caption() form (or VideoScene objects).
    Returns {"color", "shape", "background", "size", "direction", "speed", "smoothness", "overall"}
    -> float64 numpy [N] in [0, 1]; "overall" is the mean of the seven dimensions.
    """
    if len(clips) != len(captions):
        raise ValueError(f"got {len(clips)} clips but {len(captions)} captions")
    return compare_clips(measure_clips(clips), captions)


def subset(vm: VideoMeasurement, idx: np.ndarray) -> VideoMeasurement:
    """The measurements of clips ``idx`` (an index array), e.g. to compare one render with many captions."""
    idx = np.asarray(idx)
    rows = (idx[:, None] * vm.num_frames + np.arange(vm.num_frames)[None]).reshape(-1)
    frames = Measurement(*(getattr(vm.frames, fl.name)[rows] for fl in dataclasses.fields(vm.frames)))
    return VideoMeasurement(frames=frames, num_frames=vm.num_frames, velocity=vm.velocity[idx], jerk=vm.jerk[idx],
                            color_flicker=vm.color_flicker[idx], area_flicker=vm.area_flicker[idx],
                            presence=vm.presence[idx])


# ------------------------------------------------------------------------------ VideoReward's three dimensions

VIDEOREWARD_DIMENSIONS: tuple[str, ...] = ("VQ", "MQ", "TA")


def videoreward_scores(vm: VideoMeasurement, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The world oracle mapped to VideoReward's VQ / MQ / TA (the ONE place this mapping lives).

    ``vm``: :func:`measure_clips` of the clips; ``scores``: :func:`compare_clips` of the same clips.
    Returns {"VQ", "MQ", "TA"} -> float64 [N] in [0, 1]. The split follows VideoAlign's definitions
    (VQ: how the frames look, whatever the prompt; MQ: how the motion moves; TA: does the video show
    what the prompt says), so each perturbation of a clip lands in one dimension:

    * VQ (visual quality) = presence * mean over frames of k(1 - best shape IoU, 0.35, 4)
      * k(colour flicker, 40, 4) * k(area flicker, 0.3, 4). The best IoU over ALL three shape
      templates is caption-free shape FIDELITY (a crisp circle, square or triangle scores ~1; noise,
      blur and broken outlines lower it; a wrong but clean shape does not), and the flicker terms are
      the appearance half of the oracle's smoothness (the object's colour or size jumping between
      frames is a rendering artefact, not motion). A missing object (presence) is the worst VQ.
    * MQ (motion quality) = mean(presence * k(jerk, 0.03, 4), speed): the motion half of the oracle's
      smoothness (constant velocity; jitter, shuffled, repeated or eased frames give jerk) averaged
      with the oracle's speed score (moving at the captioned pace; a static object scores 0 on it).
      Speed uses |v|, so a wrong DIRECTION does not touch MQ. A mean, not a product, so a clip that is
      both jerky and at the wrong pace ranks below one with only one of those faults.
    * TA (text alignment) = mean(color, shape, background, size, direction): the caption-match
      dimensions of the oracle (object colour, the captioned shape, background colour, size word,
      direction word). Speed's word is also in the caption, but its score already counts in MQ and
      each oracle score is used once, so a pair that differs only in speed is a TA tie.
    """
    presence = vm.presence
    iou_best = vm.frames.iou.max(axis=1).reshape(-1, vm.num_frames)
    fidelity = _soft_below(1.0 - iou_best, 0.35, 4.0).mean(axis=1)
    vq = (presence * fidelity * _soft_below(vm.color_flicker, FLICKER_RGB_TOL, SMOOTH_POWER)
          * _soft_below(vm.area_flicker, FLICKER_AREA_TOL, SMOOTH_POWER))
    mq = 0.5 * (presence * _soft_below(vm.jerk, JERK_TOL, SMOOTH_POWER) + scores["speed"])
    ta = np.mean(np.stack([scores[d] for d in ("color", "shape", "background", "size", "direction")]), axis=0)
    return {"VQ": vq, "MQ": mq, "TA": ta}


def score_clips_videoreward(clips: np.ndarray | "torch.Tensor", captions: Sequence[str | VideoScene]
                            ) -> dict[str, np.ndarray]:
    """:func:`score_clips`' seven dimensions and 'overall' plus VideoReward's VQ, MQ, TA
    (:func:`videoreward_scores`), each float64 [N] in [0, 1]."""
    if len(clips) != len(captions):
        raise ValueError(f"got {len(clips)} clips but {len(captions)} captions")
    vm = measure_clips(clips)
    scores = compare_clips(vm, captions)
    return {**scores, **videoreward_scores(vm, scores)}
