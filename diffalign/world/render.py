"""Render scenes to small anti-aliased RGB images (uint8, [H, W, 3], values 0-255).

Geometry (all in units of the image side, origin at the top-left corner, y pointing down):

* Every shape of a given size has the SAME AREA, that of a circle of diameter ``DIAMETER[size]``
  (0.22 small, 0.40 large). So "size" is a pure area attribute that the oracle can measure without
  knowing the shape: the square's side is 0.886 d, the upward equilateral triangle's side 1.347 d
  (its bounding box is about 0.3 small / 0.54 large).
* Position is where the shape's AREA CENTROID sits (for the triangle that is 1/3 of its height
  above the base, not the middle of its bounding box), so the measured centre of mass is the
  anchor for every shape. Anchors: the image centre, or corners at ``CORNER[size]`` from both
  near edges (0.25 = quadrant centres for small shapes; large shapes sit at 0.35 so they stay in
  bounds). Every shape is clamped to stay >= 1 pixel (and >= 2% of the side) inside the image, so
  the 1-pixel border ring is always pure background; at 32 px and above no exact render needs it
  (at 16 px a large triangle at the top moves down by 0.4 px).
* Anti-aliasing: each pixel row is split into ``SUPERSAMPLE`` (8) bands; in each band the shape is
  an interval whose overlap with every pixel is computed exactly, weighted by how much of the band
  lies inside the shape's vertical extent. This is supersampling (8x vertically, exact
  horizontally, exact for horizontal edges): smoother than drawing at 4x and box-downsampling,
  with areas within 0.4% of nominal even at 16 px, and cheap enough to vectorise over thousands of
  images ([N, 8H, W] work). The oracle draws its shape templates with the same function, so a
  true render matches its template up to uint8 rounding.
* Pixels are bg + c * (fg - bg) for covered fraction c, rounded to uint8.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from diffalign.world.scenes import BACKGROUNDS, COLORS, SHAPES, Scene

SUPERSAMPLE = 8
DIAMETER: dict[str, float] = {"small": 0.22, "large": 0.40}  # area-equivalent circle diameter / image side
CORNER: dict[str, float] = {"small": 0.25, "large": 0.35}    # corner anchor distance from the near edges
_MARGIN = 0.02  # shapes are clamped at least this far (image-side fraction, and >= 1 px) inside the image
_SQUARE_SIDE = math.sqrt(math.pi) / 2                        # side / d for equal area
_TRI_SIDE = math.sqrt(math.pi / math.sqrt(3.0))              # side / d for equal area
_TRI_HEIGHT = _TRI_SIDE * math.sqrt(3.0) / 2                 # height / d


def anchor(size: str, position: str) -> tuple[float, float]:
    """(x, y) of the shape's area centroid for this size and position, as fractions of the side."""
    c = CORNER[size]
    if position == "center":
        return 0.5, 0.5
    vertical, horizontal = position.split()
    return (c if horizontal == "left" else 1.0 - c), (c if vertical == "top" else 1.0 - c)


def shape_area(size: str) -> float:
    """Area of any shape of this size as a fraction of the image area (pi/4 * DIAMETER**2)."""
    return math.pi / 4 * DIAMETER[size] ** 2


def _extents(shape_idx: np.ndarray, diam: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-width, extent above and extent below the centroid, in the units of ``diam``."""
    half = np.select([shape_idx == 0, shape_idx == 1], [diam / 2, diam * _SQUARE_SIDE / 2], diam * _TRI_SIDE / 2)
    up = np.select([shape_idx == 0, shape_idx == 1], [diam / 2, diam * _SQUARE_SIDE / 2], diam * _TRI_HEIGHT * 2 / 3)
    down = np.select([shape_idx == 0, shape_idx == 1], [diam / 2, diam * _SQUARE_SIDE / 2], diam * _TRI_HEIGHT / 3)
    return half, up, down


def coverage(shape_idx: np.ndarray, cx: np.ndarray, cy: np.ndarray, diam: np.ndarray, size: int,
             supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel covered by each shape: float64 [N, size, size] in [0, 1].

    ``shape_idx`` indexes SHAPES; ``cx``, ``cy`` (area centroid) and ``diam`` (area-equivalent
    diameter) are in PIXELS, shape [N]. Pixel (i, j) spans x in [j, j+1], y in [i, i+1].
    """
    shape_idx = np.asarray(shape_idx)[:, None]
    cx, cy, diam = (np.asarray(v, dtype=np.float64)[:, None] for v in (cx, cy, diam))
    half, up, down = _extents(shape_idx, diam)
    step = 1.0 / supersample
    y = (np.arange(size * supersample, dtype=np.float64) + 0.5) * step       # sub-row centres [R]
    # Each sub-row is a band of height `step`; the part of it inside the shape's vertical extent
    # sets its weight, so horizontal edges (square, triangle base) are exact too, and the shape's
    # horizontal slice is taken at the middle of that part.
    lo = np.maximum(y[None, :] - step / 2, cy - up)
    hi = np.minimum(y[None, :] + step / 2, cy + down)
    weight = np.clip((hi - lo) / step, 0.0, 1.0)                               # [N, R]
    dy = (lo + hi) / 2 - cy
    circle = np.sqrt(np.clip((diam / 2) ** 2 - dy ** 2, 0.0, None))
    square = np.broadcast_to(diam * _SQUARE_SIDE / 2, dy.shape)
    triangle = (dy + up) / (up + down) * half                                 # 0 at the apex, half at the base
    halfw = np.select([shape_idx == 0, shape_idx == 1], [circle, square], triangle)
    halfw = np.where(weight > 0, np.maximum(halfw, 0.0), 0.0)
    x0, x1 = cx - halfw, cx + halfw
    cols = np.arange(size, dtype=np.float64)
    cov = np.clip(np.minimum(x1[..., None], cols + 1) - np.maximum(x0[..., None], cols), 0.0, 1.0)  # [N, R, W]
    cov = cov * weight[..., None]
    return cov.reshape(len(cx), size, supersample, size).mean(axis=2)


def _jitter_draws(n: int, jitter: float, rng: np.random.Generator | None) -> np.ndarray | None:
    """Validated jitter uniforms [n, 3] in [-1, 1], (dx, dy, dscale) per item in order; None for jitter 0.

    Shared by the image and the video renderer (diffalign.world.video), so both draw alike.
    """
    if not 0.0 <= jitter <= 0.25:
        raise ValueError(f"jitter must be in [0, 0.25] (a fraction of the image side), got {jitter}")
    if jitter > 0 and rng is None:
        raise ValueError("jitter > 0 needs an explicit rng (np.random.default_rng(seed)) so renders stay reproducible")
    return rng.uniform(-1.0, 1.0, size=(n, 3)) if jitter > 0 else None


def _shapes_and_diameters(scenes: Sequence, size: int) -> tuple[np.ndarray, np.ndarray]:
    """SHAPES index [N] and area-equivalent diameter in pixels [N] of anything with .shape and .size."""
    shape_idx = np.array([SHAPES.index(s.shape) for s in scenes], dtype=np.int64)
    return shape_idx, np.array([DIAMETER[s.size] for s in scenes], dtype=np.float64) * size


def _layout(scenes: Sequence[Scene], size: int, jitter: float,
            rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shape index, centroid x, y and diameter in pixels for each scene (jittered if asked)."""
    n = len(scenes)
    u = _jitter_draws(n, jitter, rng)
    shape_idx, diam = _shapes_and_diameters(scenes, size)
    xy = np.array([anchor(s.size, s.position) for s in scenes], dtype=np.float64).reshape(n, 2) * size
    if u is not None:
        xy = xy + u[:, :2] * jitter * size
        diam = diam * (1.0 + u[:, 2] * jitter)
    # Keep every shape at least one pixel inside the image, so the 1-pixel border ring (from which
    # the oracle reads the background) is pure background. A no-op for exact renders at >= 32 px.
    half, up, down = _extents(shape_idx, diam)
    m = max(1.0, _MARGIN * size)
    xy[:, 0] = np.clip(xy[:, 0], half + m, size - half - m)
    xy[:, 1] = np.clip(xy[:, 1], up + m, size - down - m)
    return shape_idx, xy[:, 0], xy[:, 1], diam


def _paint(scenes: Sequence[Scene], cov: np.ndarray) -> np.ndarray:
    fg = np.array([COLORS[s.color] for s in scenes], dtype=np.float64).reshape(-1, 1, 1, 3)
    bg = np.array([BACKGROUNDS[s.background] for s in scenes], dtype=np.float64).reshape(-1, 1, 1, 3)
    return np.clip(np.rint(bg + cov[..., None] * (fg - bg)), 0, 255).astype(np.uint8)


def render(scene: Scene, size: int = 32, jitter: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """One scene as uint8 [size, size, 3] (RGB, 0-255).

    ``jitter`` (fraction of the side) shifts the centroid by up to ``jitter*size`` pixels per axis
    and scales the shape by up to ``1 +- jitter``, drawing 3 uniforms from ``rng`` (required when
    jitter > 0); jitter=0 is fully deterministic. With the same jitter,
    ``render(s, rng=np.random.default_rng(k))`` equals ``render_batch([s], seed=k)[0]``.
    Captions stay true (every oracle score >= 0.9) up to jitter 0.06; much more can move a shape
    towards a neighbouring position's anchor.
    """
    return render_batch_rng([scene], size, jitter, rng)[0]


def render_batch(scenes: Sequence[Scene], size: int = 32, jitter: float = 0.0, seed: int = 0) -> np.ndarray:
    """Scenes as uint8 [N, size, size, 3], deterministic from ``seed`` (jitter drawn in scene order)."""
    return render_batch_rng(scenes, size, jitter, np.random.default_rng(seed))


def render_batch_rng(scenes: Sequence[Scene], size: int, jitter: float,
                     rng: np.random.Generator | None) -> np.ndarray:
    """render_batch with a caller-owned generator (advanced by 3 draws per scene when jitter > 0)."""
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    scenes = list(scenes)
    if not scenes:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    shape_idx, cx, cy, diam = _layout(scenes, size, jitter, rng)
    return _paint(scenes, coverage(shape_idx, cx, cy, diam, size))
