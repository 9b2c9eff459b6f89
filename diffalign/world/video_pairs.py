"""Video-world preference pairs for reward training: renders of a caption's clip with the faults a video
generator makes, labelled per VideoReward dimension (VQ, MQ, TA) by the video oracle.

A clip is built from a RECIPE (a dict): the scene it shows (the caption's scene with attributes
changed: shape, colour, size, background, direction, speed), a motion fault, an appearance fault,
pixel noise and blur, and a seed for the per-frame randomness. :func:`render_recipes` draws every
recipe; :func:`video_pairs` pairs two recipes per caption and scores both clips against the caption
(:func:`diffalign.world.video_oracle.score_clips_videoreward`).

Motion faults (all at the scene's own speed and direction unless the scene was changed):

* ``jitter``: the centroid shaken per frame by Gaussian noise of std ``amp`` pixels (amp drawn in
  [0.25, 1.0] px);
* ``ease``: non-constant velocity, position at t^p (p in [2, 3.5]) of the path instead of t;
* ``shuffle``: the frames in a random order (not the identity);
* ``stutter``: 1-3 random frames replaced by their predecessor (a repeated / frozen frame);
* ``static``: no motion at all (the object stays at the path's midpoint).

Appearance faults:

* ``color_flicker``: 1-3 frames with the object in another palette colour;
* ``area_flicker``: every frame's size scaled by exp(N(0, amp)) (amp in [0.15, 0.4]);
* ``dropout``: 1-2 frames without the object.

Then Gaussian blur (per clip std in [0, ``blur``] px) and Gaussian pixel noise (per clip std in
[0, ``noise``]). A pair is either two independent recipes or (``minimal`` of them) a MINIMAL pair:
B is A's recipe, same seed, with exactly one more thing changed (an attribute, a motion fault or an
appearance fault), so the pair differs in one respect only. Slots are then swapped with probability 1/2.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffalign.world.render import _extents, coverage
from diffalign.world.scenes import BACKGROUNDS, COLORS, SHAPES, SIZES
from diffalign.world.video import (DIRECTIONS, SPEEDS, VIDEO_FRAMES, VIDEO_SIZE, VideoScene, parse_video_caption,
                                   trajectories)

ATTRIBUTES: tuple[str, ...] = ("shape", "color", "size", "background", "direction", "speed")
MOTION_FAULTS: tuple[str, ...] = ("jitter", "ease", "shuffle", "stutter", "static")
APPEARANCE_FAULTS: tuple[str, ...] = ("color_flicker", "area_flicker", "dropout")


def _vocab() -> dict[str, tuple[str, ...]]:
    return {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES, "background": tuple(BACKGROUNDS),
            "direction": tuple(DIRECTIONS), "speed": SPEEDS}


def change_attributes(scene: VideoScene, attributes: Sequence[str], rng: np.random.Generator) -> VideoScene:
    """``scene`` with each named attribute replaced by a different random value (object and background
    colour kept apart, as in every world scene)."""
    vocab = _vocab()
    attrs = {a: getattr(scene, a) for a in ATTRIBUTES}
    for a in attributes:
        others = [v for v in vocab[a] if v != attrs[a]]
        attrs[a] = others[int(rng.integers(len(others)))]
    try:
        return VideoScene(**attrs)
    except ValueError:  # e.g. an object colour equal to the background: draw again
        return change_attributes(scene, attributes, rng)


def _draw_recipe(scene: VideoScene, rng: np.random.Generator, *, change_prob: float, motion_prob: float,
                 appearance_prob: float) -> dict:
    changed = change_attributes(scene, [a for a in ATTRIBUTES if rng.random() < change_prob], rng)
    motion = MOTION_FAULTS[int(rng.integers(len(MOTION_FAULTS)))] if rng.random() < motion_prob else None
    appearance = (APPEARANCE_FAULTS[int(rng.integers(len(APPEARANCE_FAULTS)))]
                  if rng.random() < appearance_prob else None)
    return {"scene": changed, "motion": motion, "appearance": appearance, "seed": int(rng.integers(2**31)),
            "u_noise": float(rng.random()), "u_blur": float(rng.random())}


def _one_more_change(recipe: dict, rng: np.random.Generator) -> dict:
    """``recipe`` with exactly one more change: an attribute, a motion fault or an appearance fault."""
    out = dict(recipe)
    kind = int(rng.integers(3))
    if kind == 0:
        out["scene"] = change_attributes(recipe["scene"], [ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]], rng)
    elif kind == 1:
        out["motion"] = [m for m in (None, *MOTION_FAULTS) if m != recipe["motion"]][int(rng.integers(len(MOTION_FAULTS)))]
    else:
        out["appearance"] = [a for a in (None, *APPEARANCE_FAULTS)
                             if a != recipe["appearance"]][int(rng.integers(len(APPEARANCE_FAULTS)))]
    return out


def render_recipe(recipe: dict, *, size: int = VIDEO_SIZE, frames: int = VIDEO_FRAMES, jitter: float = 0.04,
                  noise: float = 12.0, blur: float = 0.6) -> np.ndarray:
    """One clip uint8 [frames, size, size, 3] from a recipe (deterministic: per-frame draws come from its seed)."""
    scene: VideoScene = recipe["scene"]
    rng = np.random.default_rng(recipe["seed"])
    shape_idx, cx, cy, diam = trajectories([scene], size, frames, jitter, rng)
    cx, cy = cx[0].copy(), cy[0].copy()
    f = frames
    diam_f = np.full(f, float(diam[0]))
    order = np.arange(f)
    motion = recipe["motion"]
    # motion-fault draws are made whatever the fault, so a minimal pair shares everything else
    amp_j = rng.uniform(0.25, 1.0)
    shake = rng.standard_normal((2, f))
    p = rng.uniform(2.0, 3.5)
    perm = rng.permutation(f)
    if (perm == np.arange(f)).all():
        perm = np.roll(perm, 1)
    n_stutter = int(rng.integers(1, 4))
    stutter_at = rng.choice(np.arange(1, f), size=n_stutter, replace=False)
    if motion == "jitter":
        cx, cy = cx + amp_j * shake[0], cy + amp_j * shake[1]
    elif motion == "ease":
        t = np.arange(f) / (f - 1)
        cx = cx[0] + (cx[-1] - cx[0]) * t ** p
        cy = cy[0] + (cy[-1] - cy[0]) * t ** p
    elif motion == "shuffle":
        order = perm
    elif motion == "stutter":
        for k in sorted(stutter_at):
            order[k] = order[k - 1]
    elif motion == "static":
        cx, cy = np.full(f, cx.mean()), np.full(f, cy.mean())
    # keep the object inside the frame (1 px margin) whatever the fault
    half, up, down = _extents(np.array([shape_idx[0]]), np.array([diam_f.max()]))
    cx = np.clip(cx, half[0] + 1, size - half[0] - 1)
    cy = np.clip(cy, up[0] + 1, size - down[0] - 1)

    appearance = recipe["appearance"]
    fg = np.tile(np.array(COLORS[scene.color], dtype=np.float64), (f, 1))
    present = np.ones(f)
    n_flick = int(rng.integers(1, 4))
    flick_at = rng.choice(f, size=n_flick, replace=False)
    other_colors = [c for c in COLORS if c not in (scene.color, scene.background)]
    flick_color = other_colors[int(rng.integers(len(other_colors)))]
    amp_a = rng.uniform(0.15, 0.4)
    area_noise = rng.standard_normal(f)
    n_drop = int(rng.integers(1, 3))
    drop_at = rng.choice(f, size=n_drop, replace=False)
    if appearance == "color_flicker":
        fg[flick_at] = COLORS[flick_color]
    elif appearance == "area_flicker":
        diam_f = diam_f * np.exp(np.clip(amp_a * area_noise, -0.6, 0.6) / 2)  # area scales as diam^2
    elif appearance == "dropout":
        present[drop_at] = 0.0
    cov = coverage(np.repeat(shape_idx, f), cx, cy, diam_f, size) * present[:, None, None]
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    clip = bg + cov[..., None] * (fg[:, None, None, :] - bg)                      # [F, S, S, 3]
    clip = clip[order]
    sigma_blur = recipe["u_blur"] * blur
    if sigma_blur > 0:
        from diffalign.world.pairs import gaussian_blur

        clip = gaussian_blur(clip, np.full(f, sigma_blur))
    clip = clip + recipe["u_noise"] * noise * rng.standard_normal(clip.shape)
    return np.clip(np.rint(clip), 0, 255).astype(np.uint8)


def video_pairs(captions: Sequence[str], *, per_caption: int = 4, seed: int = 0, change_prob: float = 0.2,
                motion_prob: float = 0.5, appearance_prob: float = 0.3, minimal: float = 0.5, noise: float = 12.0,
                blur: float = 0.6, jitter: float = 0.04, size: int = VIDEO_SIZE, frames: int = VIDEO_FRAMES) -> dict:
    """In-memory video pairs: ``per_caption`` pairs per caption, deterministic from ``seed``.

    Returns {"clips_0", "clips_1": uint8 [N, frames, size, size, 3], "captions": list[str] (N),
    "scores_0", "scores_1": {oracle dimension, 'overall', 'VQ', 'MQ', 'TA': float64 [N]},
    "recipes_0", "recipes_1": the recipes}, scores against each pair's caption.
    """
    from diffalign.world.video_oracle import score_clips_videoreward

    if not 0.0 <= minimal <= 1.0:
        raise ValueError(f"minimal must lie in [0, 1], got {minimal}")
    rng = np.random.default_rng(seed)
    caps = [c for c in captions for _ in range(per_caption)]
    kw = dict(change_prob=change_prob, motion_prob=motion_prob, appearance_prob=appearance_prob)
    first, second = [], []
    for c in caps:
        scene = parse_video_caption(c)
        a = _draw_recipe(scene, rng, **kw)
        b = _one_more_change(a, rng) if rng.random() < minimal else _draw_recipe(scene, rng, **kw)
        if rng.random() < 0.5:  # neither slot is biased towards the less changed clip
            a, b = b, a
        first.append(a)
        second.append(b)
    rkw = dict(size=size, frames=frames, jitter=jitter, noise=noise, blur=blur)
    clips_0 = np.stack([render_recipe(r, **rkw) for r in first]) if caps else np.zeros((0, frames, size, size, 3), np.uint8)
    clips_1 = np.stack([render_recipe(r, **rkw) for r in second]) if caps else np.zeros((0, frames, size, size, 3), np.uint8)
    return {"clips_0": clips_0, "clips_1": clips_1, "captions": caps,
            "scores_0": score_clips_videoreward(clips_0, caps), "scores_1": score_clips_videoreward(clips_1, caps),
            "recipes_0": first, "recipes_1": second}
