"""Writing samples: one PNG (or MP4/GIF for video) per sample, a grid PNG and a JSON sidecar.

Pixel conventions: decoded samples are float RGB in [0, 1], [N, 3, H, W] (video [N, F, 3, H, W]); files hold
uint8 = round(255 x), the rounding diffusers' ``numpy_to_pil`` uses, so a PNG equals the pipeline's PIL output.
Videos go through ``diffalign.rewards.media.write_video`` (the project's one video writer: H.264 yuv420p for
.mp4, GIF delays in 1/100 s) when it is importable; ``_write_video_fallback`` is a private copy of the essentials
for installs without it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] -> [N, H, W, 3] (video [N, F, 3, H, W] -> [N, F, H, W, 3]) uint8 = round(255 clamp(x, 0, 1))."""
    arr = pixels.detach().float().clamp(0, 1).cpu().numpy()
    arr = np.moveaxis(arr, -3, -1)  # channels last
    return (arr * 255).round().astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one [rows*(H+pad)+pad, ncols*(W+pad)+pad, 3] image, row-major, white padding."""
    n, h, w, c = images.shape
    ncols = max(1, min(ncols, n))
    rows = math.ceil(n / ncols)
    grid = np.full((rows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = img
    return grid


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def write_video(path: Path, frames: np.ndarray, fps: float) -> Path:
    """uint8 [F, H, W, 3] -> .mp4 / .gif; the rewards package's writer when present, else the private fallback."""
    try:
        from diffalign.rewards.media import write_video as project_write_video
    except ImportError:
        return _write_video_fallback(path, frames, fps)
    return project_write_video(path, frames, fps)


def _write_video_fallback(path: Path, frames: np.ndarray, fps: float) -> Path:
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        iio.imwrite(path, frames, extension=".gif", plugin="pillow", duration=max(1, round(100.0 / fps)) * 10, loop=0)
    else:  # H.264 in yuv420p needs even sizes: callers pick sizes that are multiples of the VAE factor
        iio.imwrite(path, frames, plugin="pyav", codec="libx264", fps=fps, out_pixel_format="yuv420p")
    return path


def sample_filename(index: int, seed: int, suffix: str) -> str:
    return f"{index:05d}_seed{seed}{suffix}"


def save_samples(images: np.ndarray, seeds: Sequence[int], out: Path, *, fps: float = 16.0,
                 video_format: str = "mp4") -> list[Path]:
    """One file per sample: PNG for [N, H, W, 3], ``video_format`` (mp4/gif) for [N, F, H, W, 3]."""
    out = Path(out)
    paths = []
    for i, (img, seed) in enumerate(zip(images, seeds)):
        if img.ndim == 4:
            paths.append(write_video(out / sample_filename(i, seed, f".{video_format}"), img, fps))
        else:
            paths.append(write_png(out / sample_filename(i, seed, ".png"), img))
    return paths


def save_grid(images: np.ndarray, path: Path, ncols: int) -> Path:
    """Grid PNG; for video the first frame of each sample (the files hold the motion)."""
    stills = images[:, 0] if images.ndim == 5 else images
    return write_png(Path(path), make_grid(stills, ncols))


def write_sidecar(path: Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)  # never a half-written sidecar next to the images
    return path
