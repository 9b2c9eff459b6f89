"""Scenes of the embedded world: one coloured shape on a plain background, and their captions.

A :class:`Scene` is five categorical attributes (shape, colour, size, position, background). Its
caption is a fixed English template, e.g. ``"a small red circle at the top left on a black
background"`` or ``"a large blue square in the center on a white background"``, and
:func:`parse_caption` is its exact inverse. Everything here is pure and deterministic from a seed.

Palette: every object colour is at least ~135 RGB units (0-255 scale, Euclidean) from every
background colour, object colours are >= ~115 apart from each other and backgrounds >= ~120 apart,
so the oracle can tell them apart from pixels alone even under noise (values chosen by a small
max-min-distance search near each colour's name).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 45),
    "green": (30, 200, 50),
    "blue": (35, 90, 250),
    "yellow": (240, 235, 50),
    "purple": (170, 30, 220),
    "orange": (255, 125, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 12),  # not 0: noise added to a pure-black image would be half clipped away
    "white": (245, 245, 245),
    "gray": (122, 122, 122),
    "teal": (0, 80, 110),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")

# (colour, shape) pairs that never occur in the training split: held-out prompts with these test
# compositional generalisation (every colour and every shape is still seen in training, just not
# together).
UNSEEN_COMBOS: tuple[tuple[str, str], ...] = (("purple", "triangle"), ("orange", "circle"), ("green", "square"))

_CAPTION_EXAMPLE = "a small red circle at the top left on a black background"


@dataclass(frozen=True)
class Scene:
    """One object on a plain background; every field must be one of the vocabularies above."""

    shape: str
    color: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for field, value, allowed in (("shape", self.shape, SHAPES), ("color", self.color, tuple(COLORS)),
                                      ("size", self.size, SIZES), ("position", self.position, POSITIONS),
                                      ("background", self.background, tuple(BACKGROUNDS))):
            if value not in allowed:
                raise ValueError(f"Scene.{field}={value!r} is not one of {allowed}")

    def caption(self) -> str:
        """The scene as text, e.g. 'a small red circle at the top left on a black background'."""
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.color} {self.shape} {where} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every scene (3 shapes x 6 colours x 2 sizes x 5 positions x 4 backgrounds = 720), fixed order."""
    return list(_all_scenes())


@lru_cache(maxsize=1)
def _all_scenes() -> tuple[Scene, ...]:
    return tuple(Scene(shape, color, size, position, background)
                 for shape, color, size, position, background
                 in itertools.product(SHAPES, COLORS, SIZES, POSITIONS, BACKGROUNDS))


@lru_cache(maxsize=1)
def _caption_index() -> dict[str, Scene]:
    # The vocabulary is finite, so the exact inverse of caption() is a lookup table: no grammar to
    # keep in sync with the template above.
    return {scene.caption(): scene for scene in _all_scenes()}


def parse_caption(caption: str) -> Scene:
    """The Scene whose ``caption()`` is exactly ``caption``; ValueError naming the caption otherwise."""
    try:
        return _caption_index()[caption]
    except (KeyError, TypeError):
        raise ValueError(f"cannot parse caption {caption!r}: expected the exact form {_CAPTION_EXAMPLE!r} "
                         f"(or '... in the center on a ... background') with shape in {SHAPES}, colour in "
                         f"{tuple(COLORS)}, size in {SIZES}, position in {POSITIONS}, background in "
                         f"{tuple(BACKGROUNDS)}") from None


def prompt_splits(seed: int = 0, heldout_fraction: float = 0.15) -> tuple[list[Scene], list[Scene]]:
    """(train, heldout) scenes, disjoint, together all_scenes(), each in all_scenes() order.

    Held-out holds (a) every scene whose (colour, shape) is in UNSEEN_COMBOS, so those combinations
    never appear in training, and (b) a random ``heldout_fraction`` of the remaining scenes
    (rounded), chosen with ``np.random.default_rng(seed)``.
    """
    unseen = set(UNSEEN_COMBOS)
    return split_forced(all_scenes(), [(s.color, s.shape) in unseen for s in all_scenes()], seed, heldout_fraction)


def split_forced(items: list, forced: list[bool], seed: int, heldout_fraction: float) -> tuple[list, list]:
    """(train, heldout), each in ``items`` order: held-out is every item with ``forced`` True plus a
    random ``heldout_fraction`` (rounded) of the others, drawn with ``np.random.default_rng(seed)``.
    Shared by the image and the video world (diffalign.world.video) so their splits are drawn alike."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    rest = [i for i, f in enumerate(forced) if not f]
    rng = np.random.default_rng(seed)
    n_random = int(round(heldout_fraction * len(rest)))
    picked = rng.choice(len(rest), size=n_random, replace=False) if n_random else np.empty(0, dtype=int)
    heldout_idx = {i for i, f in enumerate(forced) if f} | {rest[int(k)] for k in picked}
    return ([s for i, s in enumerate(items) if i not in heldout_idx],
            [s for i, s in enumerate(items) if i in heldout_idx])


def sample_scenes(n: int, seed: int, pool: list[Scene] | None = None) -> list[Scene]:
    """``n`` scenes drawn uniformly WITH replacement from ``pool`` (default all_scenes()), from ``seed``."""
    pool = all_scenes() if pool is None else list(pool)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not pool and n:
        raise ValueError("cannot sample scenes from an empty pool")
    idx = np.random.default_rng(seed).integers(0, len(pool), size=n)
    return [pool[int(i)] for i in idx]
