"""Reading and writing the media that rewards score: images, videos and their REAL frame rates.

Conventions (the reward interface's, see ``base.py``):

* ``load_image(path)``  -> float32 tensor [3, H, W], RGB in [0, 1].
* ``load_video(path)``  -> (float32 tensor [F, 3, H, W] in [0, 1], fps: float). ``fps`` is the
  file's own frame rate from its metadata (container/stream rate for MP4/WebM/MOV/MKV; for GIF,
  whose frames each carry a delay, 1 / gcd of the delays, with frames held accordingly), never an
  assumed default, so scorers that work per second of video time stay honest.
* ``sample_frames_by_time(frames, fps, num_frames=..., target_fps=...)`` picks frames by their
  timestamps, so a 30 fps and a 10 fps file of the same motion give the same frames.
* ``write_video(path, frames, fps)`` writes uint8 [F, H, W, 3] frames to .mp4 (H.264), .webm
  (VP9) or .gif; samplers reuse it.

Every failure raises :class:`MediaError` (a ``RewardError``) whose message names the file and what
is wrong with it (missing, not a supported type, unreadable/corrupt, zero frames).
"""
from __future__ import annotations

import math
import os
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .base import RewardError

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
# .gif counts as a video: an animated GIF is the common way generated clips are shared, and a
# one-frame GIF still loads (as a one-frame video).
VIDEO_SUFFIXES: frozenset[str] = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".gif"})
_WRITE_CODECS: dict[str, str] = {".mp4": "libx264", ".m4v": "libx264", ".mov": "libx264", ".mkv": "libx264",
                                 ".webm": "libvpx-vp9"}
# The frame "on screen" at time t is floor(t * fps); this slack keeps t = k / fps from landing one
# frame early through float rounding (e.g. 0.3 * 10 = 2.9999999999999996).
_TIME_EPS = 1e-6


class MediaError(RewardError):
    """A media file is missing, of an unsupported type, unreadable or empty; the message names it."""


def media_kind(path: str | Path) -> Literal["image", "video"]:
    """'image' or 'video' from the file's suffix (.gif is a video); MediaError for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    raise MediaError(f"{path}: unsupported file type '{suffix or '(no suffix)'}'; images: "
                     f"{', '.join(sorted(IMAGE_SUFFIXES))}; videos: {', '.join(sorted(VIDEO_SUFFIXES))}")


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise MediaError(f"{path}: no such file")
    if not path.is_file():
        raise MediaError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: the file is empty (0 bytes)")


def _hwc_to_chw_float(arr: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [0, 1]."""
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # PIL hands out read-only buffers; torch warns on those
        arr = arr.copy()
    return torch.from_numpy(arr).movedim(-1, -3).float().div_(255.0)


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as float32 [3, H, W], RGB in [0, 1].

    Read with PIL (png, jpg, webp, bmp, tiff). EXIF orientation is applied (phone photos come out
    upright); an alpha channel is dropped (the colour values are kept as stored, not composited);
    greyscale is replicated to 3 channels; 16-bit images are scaled by 65535, not clipped. For an
    animated file the first frame is returned.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    _check_exists(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit greyscale: convert("RGB") would clip everything above 255 to white
                grey = np.asarray(im, dtype=np.float32) / 65535.0
                return torch.from_numpy(np.ascontiguousarray(grey)).clamp_(0, 1)[None].repeat(3, 1, 1)
            arr = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise MediaError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated/corrupt data surface as these in PIL
        raise MediaError(f"{path}: cannot decode the image: {e}") from None
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise MediaError(f"{path}: the image has no pixels (shape {arr.shape})")
    return _hwc_to_chw_float(arr)


def _read_gif(path: Path) -> tuple[np.ndarray, float, np.ndarray]:
    """Distinct uint8 frames [G, H, W, 3], the constant rate, and the index of the frame shown at each
    step of that rate ([F] into the G frames).

    A GIF is variable-rate: every frame has its own delay, and encoders (Pillow included) merge
    consecutive identical frames into one longer frame. The constant rate is 1 / gcd(delays), at
    which each frame is held for delay / gcd steps: that recovers a constant-rate clip exactly
    whenever some frame was shown for a single step, and otherwise still shows the right frame at
    every moment (e.g. a fully static clip reads back as one frame held for its whole duration).
    """
    import imageio.v3 as iio

    with iio.imopen(path, "r", plugin="pillow") as f:
        frames = f.read(index=None, mode="RGB")  # every frame, composited (disposal applied) as shown
        if frames.ndim == 3:  # a one-frame GIF reads as [H, W, 3]
            frames = frames[None]
        delays = [int(round(float(f.metadata(index=i).get("duration", 0) or 0))) for i in range(len(frames))]
    if any(d <= 0 for d in delays):
        # GIF delays are optional; browsers show delay-less frames for 100 ms (10 fps), so that is what
        # a viewer actually sees
        warnings.warn(f"{path}: {sum(d <= 0 for d in delays)} GIF frame(s) have no delay; using 100 ms "
                      f"(what browsers show)", stacklevel=3)
        delays = [d if d > 0 else 100 for d in delays]
    step = math.gcd(*delays)
    index_map = np.repeat(np.arange(len(frames)), [d // step for d in delays])
    return frames, 1000.0 / step, index_map


def _read_av(path: Path) -> tuple[list, float]:
    """The decoded frames (av.VideoFrame, still in the stream's pixel format, e.g. YUV 4:2:0 at half
    the bytes of RGB) of the first video stream, and its frame rate, with PyAV. Only the frames a
    caller keeps are converted to RGB (``load_video`` with num_frames / target_fps).

    PyAV directly rather than imageio's pyav plugin: the plugin runs gc.collect() when it closes a
    file (twice per read, ~0.15 s each once torch is loaded), which dominated batch scoring, and
    prints an ignored exception from its __del__. The rate is the stream's average frame rate
    (ffmpeg's frames / duration, = the nominal rate for constant-rate files, e.g. 30000/1001), else
    its guessed rate, else frames / container duration.
    """
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = list(container.decode(stream))
        rate = stream.average_rate or stream.guessed_rate
        duration = container.duration / 1e6 if container.duration else 0.0  # container.duration is in µs
    if not frames:
        raise MediaError(f"{path}: the video has zero frames")
    fps = float(rate) if rate else 0.0
    if not (math.isfinite(fps) and fps > 0):
        if duration <= 0:
            raise MediaError(f"{path}: the video has no frame rate in its metadata (and no duration); "
                             f"cannot score it honestly in video time")
        fps = len(frames) / duration
    return frames, fps


def load_video(path: str | Path, *, num_frames: int | None = None,
               target_fps: float | None = None) -> tuple[torch.Tensor, float]:
    """A video file as (float32 [F, 3, H, W] in [0, 1], fps).

    MP4/MOV/MKV/WebM/AVI are decoded with PyAV (fps = the stream's frame rate, see ``_read_av``);
    GIF with the pillow plugin, converted to a constant rate 1 / gcd(frame delays) with each frame
    held for its delay (see ``_read_gif``), so merged or uneven GIF frames keep their timing.
    ``num_frames`` or ``target_fps`` (at most one) subsample by time with
    :func:`sample_frames_by_time` BEFORE the float conversion, which keeps long videos small; the
    returned fps is then the effective rate of the returned frames.
    """
    path = Path(path)
    if num_frames is not None and target_fps is not None:
        raise ValueError("give at most one of num_frames and target_fps")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if target_fps is not None and not (math.isfinite(target_fps) and target_fps > 0):
        raise ValueError(f"target_fps must be a positive number, got {target_fps}")
    _check_exists(path)
    try:
        if path.suffix.lower() == ".gif":
            frames, fps, index_map = _read_gif(path)
            if frames.ndim != 4 or frames.shape[-1] != 3:
                raise MediaError(f"{path}: decoded to an unexpected shape {tuple(frames.shape)}, "
                                 f"expected [F, H, W, 3]")
        else:
            frames, fps = _read_av(path)
            index_map = np.arange(len(frames))
        if len(frames) == 0 or len(index_map) == 0:
            raise MediaError(f"{path}: the video has zero frames")
        if num_frames is not None or target_fps is not None:
            idx, fps = frame_indices_by_time(len(index_map), fps, num_frames=num_frames, target_fps=target_fps)
            index_map = index_map[idx.numpy()]
        if isinstance(frames, np.ndarray):
            rgb = frames if np.array_equal(index_map, np.arange(len(frames))) else frames[index_map]
        else:  # convert only the frames kept, each once even when it is held for several steps
            converted = {int(i): frames[int(i)].to_ndarray(format="rgb24") for i in np.unique(index_map)}
            rgb = np.stack([converted[int(i)] for i in index_map])
    except MediaError:
        raise
    except Exception as e:  # decoders raise OSError, ValueError, av errors, ...: all mean "cannot read"
        raise MediaError(f"{path}: cannot decode the video ({type(e).__name__}: {e})") from None
    return _hwc_to_chw_float(rgb), float(fps)


def frame_indices_by_time(num_source: int, fps: float, *, num_frames: int | None = None,
                          target_fps: float | None = None) -> tuple[torch.Tensor, float]:
    """Indices (long [K]) of the source frames shown at evenly spaced times, and the new rate.

    A video of ``num_source`` frames at ``fps`` lasts D = num_source / fps seconds; frame i is on
    screen during [i / fps, (i + 1) / fps). Exactly one of:

    * ``target_fps`` r: times t_k = k / r for k = 0 .. ceil(D * r) - 1; returned rate r.
    * ``num_frames`` K: times t_k = k * D / K, k = 0 .. K - 1; returned rate K / D.

    The index is the frame on screen at t_k, floor(t_k * fps). Because the times are in seconds,
    a 30 fps and a 10 fps video of the same motion yield the same moments (frame 3k of the first is
    frame k of the second). Asking for more frames than the video has repeats frames (each is held
    for its duration), it never invents in-between frames.
    """
    if (num_frames is None) == (target_fps is None):
        raise ValueError("give exactly one of num_frames and target_fps")
    if num_source <= 0:
        raise ValueError(f"cannot sample from a video with {num_source} frames")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps}")
    duration = num_source / fps
    if target_fps is not None:
        if not (math.isfinite(target_fps) and target_fps > 0):
            raise ValueError(f"target_fps must be a positive number, got {target_fps}")
        count = max(1, math.ceil(duration * target_fps - _TIME_EPS))
        times = torch.arange(count, dtype=torch.float64) / target_fps
        rate = float(target_fps)
    else:
        if num_frames <= 0:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        times = torch.arange(num_frames, dtype=torch.float64) * (duration / num_frames)
        rate = num_frames / duration
    idx = torch.floor(times * fps + _TIME_EPS).long().clamp_(0, num_source - 1)
    return idx, rate


def sample_frames_by_time(frames: torch.Tensor, fps: float, *, num_frames: int | None = None,
                          target_fps: float | None = None) -> tuple[torch.Tensor, float]:
    """(frames[idx], new_fps): the frames on screen at evenly spaced TIMES (see frame_indices_by_time).

    ``frames`` is [F, ...] (any trailing shape, e.g. [F, 3, H, W]); exactly one of ``num_frames``
    and ``target_fps``. The new fps is the rate the returned frames represent (``target_fps``, or
    num_frames / duration), which is what a per-second scorer must be given afterwards.
    """
    idx, rate = frame_indices_by_time(len(frames), fps, num_frames=num_frames, target_fps=target_fps)
    return frames[idx.to(frames.device)], rate


def to_uint8_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """float [F, 3, H, W] in [0, 1] (torch or numpy) -> uint8 [F, H, W, 3], rounding, clipped.

    The bridge from the reward/sampler convention to :func:`write_video`'s input.
    """
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected float frames [F, 3, H, W] in [0, 1]; got shape {frames.shape}")
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _write_av(path: Path, frames: np.ndarray, fps: float, codec: str) -> None:
    """Encode uint8 [F, H, W, 3] frames with PyAV (yuv420p; H.264 at CRF 18, visually near-lossless)."""
    import av

    # a rational rate keeps NTSC rates exact: 30000/1001 stays 30000/1001, 29.97 stays 2997/100
    rate = Fraction(fps).limit_denominator(65535)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)


def _write_gif(path: Path, frames: np.ndarray, delay_cs: int) -> None:
    """Every frame as its own GIF image (adaptive 256-colour local palette), ``delay_cs`` each, looping.

    Pillow's save_all merges consecutive identical frames into one longer frame, which would turn a
    static clip into a single frame; writing the frames one by one with Pillow's frame encoder
    (GifImagePlugin.getheader / getdata) keeps exactly F frames at one constant delay.
    """
    from PIL import GifImagePlugin, Image

    images = [Image.fromarray(f).convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    header, _ = GifImagePlugin.getheader(images[0], info={"loop": 0})  # loop=0: forever
    with open(path, "wb") as fp:
        for chunk in header:
            fp.write(chunk)
        for im in images:
            for chunk in GifImagePlugin.getdata(im, duration=delay_cs * 10, include_color_table=True):
                fp.write(chunk)
        fp.write(b";")  # GIF trailer


def write_video(path: str | Path, frames: np.ndarray | torch.Tensor, fps: float) -> Path:
    """Write uint8 frames [F, H, W, 3] (numpy or torch) at ``fps`` to .mp4/.mov/.mkv/.m4v (H.264,
    yuv420p, CRF 18), .webm (VP9) or .gif; returns the path. Parent folders are created.

    H.264 in yuv420p needs even H and W (an odd size is an error, not a silent crop). GIF stores
    frame delays in 1/100 s, so each delay is rounded to the nearest 10 ms: the rate round-trips
    exactly when 100 / fps is an integer (10, 20, 25, 50 fps); otherwise a warning says what the
    file will hold (e.g. 30 fps -> 3/100 s delays -> 33.3 fps). GIF frames are quantised to 256
    colours each, and every frame is kept (identical frames are not merged), so the frame count
    round-trips. Float input is rejected: convert with :func:`to_uint8_frames`. The file is written
    under a temporary name and renamed into place, so a failed encode never leaves a half file.
    """
    path = Path(path)
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise MediaError(f"{path}: write_video takes uint8 frames [F, H, W, 3] on 0-255, got dtype {frames.dtype} "
                         f"(float [F, 3, H, W] in [0, 1]: use media.to_uint8_frames first)")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"{path}: write_video takes frames [F, H, W, 3], got shape {frames.shape}")
    if len(frames) == 0:
        raise MediaError(f"{path}: no frames to write")
    if not (math.isfinite(fps) and fps > 0):
        raise MediaError(f"{path}: fps must be a positive number, got {fps}")
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        delay_cs = max(1, round(100.0 / fps))
        if abs(100.0 / delay_cs - fps) > 1e-6 * fps:
            warnings.warn(f"{path}: GIF frame delays are whole 1/100 s; {fps:g} fps is stored as "
                          f"{delay_cs}/100 s per frame = {100.0 / delay_cs:.4g} fps", stacklevel=2)
        _write_atomic(path, lambda tmp: _write_gif(tmp, frames, delay_cs))
        return path
    codec = _WRITE_CODECS.get(suffix)
    if codec is None:
        raise MediaError(f"{path}: cannot write '{suffix}'; write_video supports "
                         f"{', '.join(sorted(_WRITE_CODECS))}, .gif")
    if codec == "libx264" and (frames.shape[1] % 2 or frames.shape[2] % 2):
        raise MediaError(f"{path}: H.264 (yuv420p) needs even height and width, got "
                         f"{frames.shape[1]}x{frames.shape[2]}; crop or pad the frames, or write a .gif")
    _write_atomic(path, lambda tmp: _write_av(tmp, frames, fps, codec))
    return path


def _write_atomic(path: Path, write) -> None:
    # same folder (rename stays on one filesystem) and same suffix (PyAV picks the container from it)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
