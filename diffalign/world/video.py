"""Video scenes of the embedded world: one image-world object MOVING in a straight line, and their captions.

A :class:`VideoScene` is the image world's object (shape, colour, size, background; same palette and
vocabularies as :mod:`diffalign.world.scenes`) plus a motion: a ``direction`` (left, right, up, down)
and a ``speed`` (slow, fast). Its caption is a fixed template, e.g. ``"a small red circle moving
slowly left on a black background"`` or ``"a large blue square moving fast up on a white
background"``; :func:`parse_video_caption` is its exact inverse. Everything is pure and
deterministic from a seed. The scorer is :mod:`diffalign.world.video_oracle`.

Clips are uint8 ``[F, H, W, 3]`` (a batch ``[N, F, H, W, 3]``), RGB 0-255, frame 0 first.

Geometry (fractions of the image side, origin top-left, y down, as in :mod:`diffalign.world.render`):

* The object keeps the image world's area-equivalent diameter for its size and moves at constant
  velocity: its area centroid travels ``TRAVEL[speed]`` image sides over the WHOLE clip (0.15 slow,
  0.33 fast), whatever the number of frames F, so frame f sits at ``start + dir * TRAVEL * f/(F-1)``.
  Speed is per clip, not per frame, so a 16-frame clip frames the same path as an 8-frame one.
* The path is centred on the image centre, then shifted (never clamped per frame) so that every
  frame keeps the shape at least ``max(1 px, 2%)`` inside the image, the image world's margin: the
  1-pixel border ring stays pure background (the oracle reads the background from it) and motion
  stays exactly linear. 0.33 is the largest travel for which a large triangle still fits at 16 px
  (available centroid range 0.335 sides); slow/fast differ by a factor 2.2 so the oracle can tell them.
* Optional jitter (per clip, as ``render``'s): the path is shifted by up to ``jitter * size`` pixels
  per axis (then shifted back inside the frame if needed) and the shape scaled by ``1 +- jitter``
  (capped where the scaled path would not fit: only large fast shapes at 16 px); 3 uniforms per
  clip, in clip order. Frames are never jittered independently: that would be flicker.
* Every frame is drawn with the image renderer's own anti-aliased ``coverage`` and ``_paint``.

Default size is 16x16 with 8 frames (allowed 8-17, so Wan-style ``4k + 1`` frame counts such as 9,
13 and 17 fit; the Wan generator of ``world pretrain --kind video`` uses 9, since Wan's causal VAE
encodes one frame and then chunks of 4). Why 16 and not the image world's 32: a clip is F images, so 8 x 16 x 16 is already
twice the pixels of one 32x32 world image, and the tiny generator must learn it on a shared 2-core
CPU (32x32 would be 4x the tokens, and attention is quadratic in them). The oracle still resolves
everything at 16 px: the image oracle is tested at 16 px, and the slowest travel is 2.4 px per
clip, far above the sub-pixel centroid precision of anti-aliased renders. 32 px works as well.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from diffalign.world.render import _MARGIN, _extents, _jitter_draws, _paint, _shapes_and_diameters, coverage
from diffalign.world.scenes import BACKGROUNDS, COLORS, SHAPES, SIZES, UNSEEN_COMBOS, Scene, split_forced

DIRECTIONS: dict[str, tuple[float, float]] = {  # unit (dx, dy) in image coordinates (y points down)
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPEEDS: tuple[str, ...] = ("slow", "fast")
TRAVEL: dict[str, float] = {"slow": 0.15, "fast": 0.33}  # centroid travel over the whole clip, image sides
# "fast", not "quickly": the word-level BPE tokenizer's merge for "qu" would split "square" (see
# generators.build_word_clip_tokenizer; tests check every caption word is one token).
_ADVERB = {"slow": "slowly", "fast": "fast"}
VIDEO_SIZE = 16
VIDEO_FRAMES = 8
MIN_FRAMES, MAX_FRAMES = 8, 17

# (shape, direction) pairs that never occur in the training split, next to the image world's unseen
# (colour, shape) pairs: every shape and every direction is still seen in training, just not together.
# Two pairs, not three: with the three colour-shape pairs they already hold out 352 of the 1152 scenes.
UNSEEN_MOTIONS: tuple[tuple[str, str], ...] = (("circle", "right"), ("triangle", "up"))

_CAPTION_EXAMPLE = "a small red circle moving slowly left on a black background"


@dataclass(frozen=True)
class VideoScene:
    """One object moving in a straight line over a plain background; fields from the vocabularies above."""

    shape: str
    color: str
    size: str
    background: str
    direction: str
    speed: str

    def __post_init__(self) -> None:
        for field, value, allowed in (("direction", self.direction, tuple(DIRECTIONS)),
                                      ("speed", self.speed, SPEEDS)):
            if value not in allowed:
                raise ValueError(f"VideoScene.{field}={value!r} is not one of {allowed}")
        self.frame_scene()  # the image world validates shape, colour, size and background

    def frame_scene(self) -> Scene:
        """The image-world Scene of one frame's appearance (position 'center' is a placeholder: it moves)."""
        return Scene(self.shape, self.color, self.size, "center", self.background)

    def caption(self) -> str:
        """E.g. 'a small red circle moving slowly left on a black background'."""
        return (f"a {self.size} {self.color} {self.shape} moving {_ADVERB[self.speed]} {self.direction} "
                f"on a {self.background} background")


def all_video_scenes() -> list[VideoScene]:
    """Every video scene (3 shapes x 6 colours x 2 sizes x 4 backgrounds x 4 directions x 2 speeds = 1152)."""
    return list(_all_video_scenes())


@lru_cache(maxsize=1)
def _all_video_scenes() -> tuple[VideoScene, ...]:
    return tuple(VideoScene(*fields) for fields in itertools.product(SHAPES, COLORS, SIZES, BACKGROUNDS,
                                                                     DIRECTIONS, SPEEDS))


@lru_cache(maxsize=1)
def _caption_index() -> dict[str, VideoScene]:
    # Finite vocabulary: the exact inverse of caption() is a lookup table (as for image captions).
    return {s.caption(): s for s in _all_video_scenes()}


def parse_video_caption(caption: str) -> VideoScene:
    """The VideoScene whose ``caption()`` is exactly ``caption``; ValueError naming the caption otherwise."""
    try:
        return _caption_index()[caption]
    except (KeyError, TypeError):
        raise ValueError(f"cannot parse video caption {caption!r}: expected the exact form {_CAPTION_EXAMPLE!r} "
                         f"with shape in {SHAPES}, colour in {tuple(COLORS)}, size in {SIZES}, speed adverb in "
                         f"{tuple(_ADVERB.values())}, direction in {tuple(DIRECTIONS)}, background in "
                         f"{tuple(BACKGROUNDS)}") from None


def video_words() -> list[str]:
    """Every word a video caption can contain (for a word-level tokenizer)."""
    return sorted({w for s in _all_video_scenes() for w in s.caption().split()})


def video_prompt_splits(seed: int = 0, heldout_fraction: float = 0.1) -> tuple[list[VideoScene], list[VideoScene]]:
    """(train, heldout) video scenes, disjoint, together all_video_scenes(), each in that order.

    Held-out holds every scene whose (colour, shape) is in the image world's UNSEEN_COMBOS or whose
    (shape, direction) is in UNSEEN_MOTIONS, plus a random ``heldout_fraction`` of the rest
    (rounded), chosen with ``np.random.default_rng(seed)``.
    """
    combos, motions = set(UNSEEN_COMBOS), set(UNSEEN_MOTIONS)
    scenes = all_video_scenes()
    return split_forced(scenes, [(s.color, s.shape) in combos or (s.shape, s.direction) in motions for s in scenes],
                        seed, heldout_fraction)


def sample_video_scenes(n: int, seed: int, pool: Sequence[VideoScene] | None = None) -> list[VideoScene]:
    """``n`` video scenes drawn uniformly WITH replacement from ``pool`` (default all), from ``seed``."""
    pool = all_video_scenes() if pool is None else list(pool)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not pool and n:
        raise ValueError("cannot sample video scenes from an empty pool")
    return [pool[int(i)] for i in np.random.default_rng(seed).integers(0, len(pool), size=n)]


def _check(size: int, frames: int) -> None:
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    if not MIN_FRAMES <= frames <= MAX_FRAMES:
        raise ValueError(f"frames must be in [{MIN_FRAMES}, {MAX_FRAMES}], got {frames}")


def trajectories(scenes: Sequence[VideoScene], size: int = VIDEO_SIZE, frames: int = VIDEO_FRAMES,
                 jitter: float = 0.0, rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shape index [N], centroid x and y [N, F] and diameter [N], all in PIXELS, of each clip's path.

    Deterministic for jitter 0; otherwise draws 3 uniforms per clip from ``rng`` (required), in order.
    """
    _check(size, frames)
    n = len(scenes)
    u = _jitter_draws(n, jitter, rng)
    shape_idx, diam = _shapes_and_diameters(scenes, size)
    step = np.array([DIRECTIONS[s.direction] for s in scenes], dtype=np.float64).reshape(n, 2)
    step = step * np.array([TRAVEL[s.speed] for s in scenes])[:, None] * size   # whole-clip displacement, px
    shift = np.zeros((n, 2))
    if u is not None:
        shift = u[:, :2] * jitter * size
        diam = diam * (1.0 + u[:, 2] * jitter)
    m = max(1.0, _MARGIN * size)
    # A scaled-up shape's path may no longer fit (a jittered large fast triangle at 16 px): shrink it
    # just enough. Extents are linear in the diameter, so one factor per clip does it.
    half, up, down = _extents(shape_idx, diam)
    room = size - 2 * m - np.abs(step)                       # [N, 2] room left for the shape per axis
    diam = diam * np.minimum(1.0, np.minimum(room[:, 0] / (2 * half), room[:, 1] / (up + down)))
    half, up, down = _extents(shape_idx, diam)
    lo = np.stack([half + m, up + m], axis=1)                  # allowed centroid range per axis [N, 2]
    hi = np.stack([size - half - m, size - down - m], axis=1)
    # Path centred on the image centre (plus jitter), then the whole path shifted inside [lo, hi]:
    # the start s must satisfy lo <= min(s, s + step) and max(s, s + step) <= hi.
    start = size / 2 + shift - step / 2
    start = np.minimum(np.maximum(start, lo - np.minimum(step, 0)), hi - np.maximum(step, 0))
    t = np.arange(frames, dtype=np.float64) / (frames - 1)
    path = start[:, None, :] + t[None, :, None] * step[:, None, :]  # [N, F, 2]
    return shape_idx, path[..., 0], path[..., 1], diam


def render_paths(scenes: Sequence[VideoScene], cx: np.ndarray, cy: np.ndarray, diam: np.ndarray,
                 size: int = VIDEO_SIZE) -> np.ndarray:
    """Clips uint8 [N, F, size, size, 3] of each scene's object at ANY per-frame centroids (pixels).

    ``cx``, ``cy``: [N, F]; ``diam``: [N]. Used by :func:`render_clips` and by tests that need
    off-template motion (wobbly or non-linear paths).
    """
    cx, cy = np.asarray(cx, dtype=np.float64), np.asarray(cy, dtype=np.float64)
    n, f = cx.shape
    shape_idx = np.repeat([SHAPES.index(s.shape) for s in scenes], f)
    cov = coverage(shape_idx, cx.reshape(-1), cy.reshape(-1), np.repeat(np.asarray(diam, dtype=np.float64), f), size)
    return _paint([s for s in scenes for _ in range(f)], cov).reshape(n, f, size, size, 3)


def render_clips_rng(scenes: Sequence[VideoScene], size: int = VIDEO_SIZE, frames: int = VIDEO_FRAMES,
                     jitter: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """render_clips with a caller-owned generator (3 draws per clip when jitter > 0)."""
    _check(size, frames)
    scenes = list(scenes)
    if not scenes:
        return np.zeros((0, frames, size, size, 3), dtype=np.uint8)
    _, cx, cy, diam = trajectories(scenes, size, frames, jitter, rng)
    return render_paths(scenes, cx, cy, diam, size)


def render_clips(scenes: Sequence[VideoScene], size: int = VIDEO_SIZE, frames: int = VIDEO_FRAMES,
                 jitter: float = 0.0, seed: int = 0) -> np.ndarray:
    """Clips uint8 [N, frames, size, size, 3], deterministic from ``seed`` (jitter drawn in clip order)."""
    return render_clips_rng(scenes, size, frames, jitter, np.random.default_rng(seed))


def render_clip(scene: VideoScene, size: int = VIDEO_SIZE, frames: int = VIDEO_FRAMES, jitter: float = 0.0,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """One clip uint8 [frames, size, size, 3]; equals ``render_clips([scene], ..., seed=k)[0]`` with rng seeded k."""
    return render_clips_rng([scene], size, frames, jitter, rng)[0]
