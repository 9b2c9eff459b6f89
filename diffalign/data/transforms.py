"""Joint augmentation of a preference pair: both images get THE SAME crop and THE SAME flip.

Conventions (shared with the latent cache and the SDXL micro-conditioning):

* sizes and offsets are ``(height, width)`` / ``(top, left)`` in pixels;
* pipeline order is resize (shorter side -> ``resolution``, bilinear with PIL's antialiasing) ->
  horizontal flip of the whole resized image -> square crop; ``crop_top_left`` is therefore in the
  coordinates of the resized, possibly mirrored image, exactly what diffusers' SDXL scripts feed as
  ``crops_coords_top_left``;
* output tensors are float32 ``[3, R, R]`` in ``[-1, 1]`` (uint8 ``v`` -> ``v / 127.5 - 1``); with ``width``
  set the output is ``[3, R, width]`` (R = height) and the resize scales each image to just cover R x width
  (video recipes, e.g. Wan's 480 x 832);
* every random decision comes from the ``torch.Generator`` passed in, so a pair's augmentation is a
  pure function of ``(seed, index, epoch)`` via :func:`pair_generator` (resume-exact, and identical
  across DataLoader worker counts).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class PairMeta:
    """SDXL micro-conditioning for one pair, pixel units.

    ``original_size_*`` is each image's ``(height, width)`` before resizing; ``crop_top_left`` is the
    ``(top, left)`` offset of the crop in resized (and, if ``flipped``, mirrored) coordinates, shared
    by both images.
    """

    original_size_w: tuple[int, int]
    original_size_l: tuple[int, int]
    crop_top_left: tuple[int, int]
    flipped: bool


def pair_generator(seed: int, index: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded deterministically from ``(seed, index, epoch)``.

    The three numbers are mixed with sha256 (not Python's ``hash``, which is salted per process) so
    the same pair in the same epoch gets the same augmentation in every process and after a resume,
    while neighbouring indices/epochs get unrelated streams.
    """
    digest = hashlib.sha256(f"diffalign-pair:{int(seed)}:{int(index)}:{int(epoch)}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def _resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(height, width) with the shorter side == resolution; the long side truncated like torchvision."""
    if height <= width:
        return resolution, max(resolution, int(resolution * width / height))
    return max(resolution, int(resolution * height / width)), resolution


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    # 255 / 127.5 - 1 == 1.0 exactly in float32, so the range is exactly [-1, 1].
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)


class JointTransform:
    """Resize, flip and crop a (winner, loser) pair identically; see the module docstring.

    Args:
        resolution: output side R in pixels (square output).
        center_crop: centre crop instead of a random crop. With two differently sized images the
            shared offset is the centre of the range valid for both.
        random_flip: flip both images horizontally with probability 1/2 (one decision per pair).
        width: output width for a non-square output of height ``resolution``; None = square.
    """

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = True,
                 width: int | None = None) -> None:
        if int(resolution) <= 0:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution!r}")
        if width is not None and int(width) <= 0:
            raise ValueError(f"width must be a positive number of pixels or None, got {width!r}")
        self.resolution = int(resolution)
        self.width = None if width is None or int(width) == self.resolution else int(width)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)

    def __repr__(self) -> str:
        return (f"JointTransform(resolution={self.resolution}, center_crop={self.center_crop}, "
                f"random_flip={self.random_flip}" + (f", width={self.width})" if self.width else ")"))

    def _resize(self, img: Image.Image) -> Image.Image:
        h, w = img.height, img.width
        if self.width is None:
            nh, nw = _resized_size(h, w, self.resolution)
        else:  # the smallest scale that covers resolution x width; the other side truncated, never below target
            scale = max(self.resolution / h, self.width / w)
            nh, nw = max(self.resolution, int(h * scale)), max(self.width, int(w * scale))
        if (nh, nw) == (h, w):
            return img  # no resampling at all when the size already fits: keeps pixels exact
        # PIL's BILINEAR widens its kernel when downscaling, i.e. it is antialiased.
        return img.resize((nw, nh), Image.BILINEAR)

    def _plan(self, sizes: list[tuple[int, int]], generator: torch.Generator) -> tuple[bool, int, int]:
        """(flipped, top, left) shared by every image, from resized (h, w) sizes; draws flip, then top, then left."""
        R, Wd = self.resolution, self.width or self.resolution
        flipped = False
        if self.random_flip:
            flipped = bool(torch.rand((), generator=generator).item() < 0.5)
        # One offset valid for all images: the smallest of the offset ranges.
        max_top = min(h - R for h, _ in sizes)
        max_left = min(w - Wd for _, w in sizes)
        if self.center_crop:
            top, left = int(round(max_top / 2.0)), int(round(max_left / 2.0))
        else:
            top = int(torch.randint(0, max_top + 1, (), generator=generator).item())
            left = int(torch.randint(0, max_left + 1, (), generator=generator).item())
        return flipped, top, left

    def _apply(self, img: Image.Image, flipped: bool, top: int, left: int) -> Image.Image:
        R, Wd = self.resolution, self.width or self.resolution
        if flipped:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return img.crop((left, top, left + Wd, top + R))

    def __call__(self, image_w: Image.Image, image_l: Image.Image,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, PairMeta]:
        """Return ``(pixels_w [3,R,R], pixels_l [3,R,R], PairMeta)``; draws flip, then top, then left."""
        imgs = []
        for img in (image_w, image_l):
            if img.mode != "RGB":
                img = img.convert("RGB")
            imgs.append(img)
        original = [(img.height, img.width) for img in imgs]
        imgs = [self._resize(img) for img in imgs]
        flipped, top, left = self._plan([(img.height, img.width) for img in imgs], generator)
        imgs = [self._apply(img, flipped, top, left) for img in imgs]
        pixels_w, pixels_l = (_to_tensor(img) for img in imgs)
        meta = PairMeta(original_size_w=original[0], original_size_l=original[1],
                        crop_top_left=(top, left), flipped=flipped)
        return pixels_w, pixels_l, meta

    def single(self, image: Image.Image, generator: torch.Generator
               ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """One unpaired image (Diffusion-KTO data): ``(pixels [3,R,R], original_size (h, w), crop_top_left (top,
        left))`` by the same rules and the same draws (flip, then top, then left) as a pair's."""
        img = image if image.mode == "RGB" else image.convert("RGB")
        original = (img.height, img.width)
        img = self._resize(img)
        flipped, top, left = self._plan([(img.height, img.width)], generator)
        return _to_tensor(self._apply(img, flipped, top, left)), original, (top, left)

    def videos(self, frames_w: np.ndarray, frames_l: np.ndarray,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, PairMeta]:
        """A video pair: uint8 ``[F, H, W, 3]`` each -> ``(pixels_w [3,F,R,R], pixels_l [3,F,R,R], PairMeta)``.

        Every frame of BOTH videos gets the same resize rule, the same flip and the same crop offset
        (one draw per pair, in the same order as for images), so motion and the pair's alignment are kept.
        """
        clips = [[Image.fromarray(np.ascontiguousarray(f)) for f in frames] for frames in (frames_w, frames_l)]
        original = [(clip[0].height, clip[0].width) for clip in clips]
        clips = [[self._resize(img) for img in clip] for clip in clips]
        flipped, top, left = self._plan([(clip[0].height, clip[0].width) for clip in clips], generator)
        out = [torch.stack([_to_tensor(self._apply(img, flipped, top, left)) for img in clip], dim=1) for clip in clips]
        meta = PairMeta(original_size_w=original[0], original_size_l=original[1],
                        crop_top_left=(top, left), flipped=flipped)
        return out[0], out[1], meta
