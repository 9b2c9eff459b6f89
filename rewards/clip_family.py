"""CLIP-family image scorers people expect: CLIPScore, PickScore, HPSv2/v2.1 and the LAION aesthetic predictor.

Each scorer loads the OFFICIAL checkpoint (a local file/folder or a hub id) and preprocesses exactly as the
official inference code does; all four follow the reward conventions of ``rewards/base.py`` (images
float [N, 3, H, W] RGB in [0, 1]; ``score`` returns {name: [N]}, higher = better, in the scorer's raw units).

Registered names and specs (``build_reward("NAME")`` or ``build_reward("NAME:WEIGHTS?option=value&...")``):

================  ==========================================================================================
``clipscore``     Hessel et al. 2021: 2.5 * max(cos(image, "A photo depicts " + prompt), 0) with OpenAI CLIP
                  ViT-B/32 (open_clip ``ViT-B-32-quickgelu`` + tag ``openai``, the paper's model).
                  WEIGHTS: an open_clip pretrained tag, a state-dict file, ``hf-hub:org/repo``, or
                  ``ARCH/TAG_OR_FILE`` (e.g. ``clipscore:ViT-L-14-quickgelu/openai``).
                  Options: ``arch``, ``prefix`` (``?prefix=`` drops the prompt prefix).  Every scorer also
                  takes ``?differentiable=1`` (see below).
``pickscore``     Kirstain et al. 2023: logit_scale.exp() * cos(image, prompt) with the transformers CLIPModel
                  ``yuvalkirstain/PickScore_v1`` and the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
                  WEIGHTS: a save_pretrained folder or hub id.  Options: ``processor`` (folder or hub id; by
                  default the model folder when it holds preprocessor_config.json, else the laion processor).
``hps``           HPSv2 / v2.1 (Wu et al. 2023): cos(image, prompt), i.e. diag(image_features @ text_features.T)
                  of normalised open_clip ViT-H-14 features, as ``hpsv2.score`` computes it.
                  WEIGHTS: ``v2.1`` (default), ``v2`` / ``v2.0``, a file (HPS_v2*_compressed.pt), a folder
                  holding it, or ``org/repo[/file]`` on the hub (default ``xswu/HPSv2``).  Options: ``arch``.
``aesthetic``     LAION improved aesthetic predictor: the MLP of ``sac+logos+ava1-l14-linearMSE.pth`` on the
                  L2-normalised image embedding of OpenAI CLIP ViT-L/14; no prompt.  WEIGHTS: the MLP file,
                  a folder holding it, or ``org/repo[/file]`` (default ``trl-lib/ddpo-aesthetic-predictor``:
                  TRL's hub copy of that predictor).  Options: ``clip_arch``, ``clip`` (tag or file).
================  ==========================================================================================

Two preprocessing paths, chosen by ``differentiable`` (the spec option ``?differentiable=1``, the loaders'
argument, or the instance attribute; the official path is the default):

* official (default): the [0, 1] tensor is rounded to uint8 and turned into PIL images, then fed to the
  library's own inference transform, i.e. open_clip's validation transform (PIL bicubic resize of the
  shortest side, torchvision CenterCrop, ToTensor, Normalize) or the PIL-backed CLIPImageProcessor.  For
  media loaded from 8-bit files the uint8 round trip is lossless, so scores equal the official scripts'.
* differentiable: ``torch.nn.functional.interpolate`` (bicubic, antialias: PIL's kernel) in PIL's two passes,
  the same crop offsets and Normalize, all on the tensor, so gradients flow back to the images (reward
  guidance, reward backprop); values are kept on the uint8 grid straight-through.  It agrees with the
  official path to within one uint8 step per pixel; tests/test_rewards_clip.py measures the gap.

Loading is safe by construction: safetensors where it exists; ``.pt`` / ``.pth`` / ``.bin`` files through
``torch.load(weights_only=True)`` (no arbitrary unpickling, so OpenAI's TorchScript archives are refused with a
hint); no ``trust_remote_code``.  A hub id that is not in the local cache while offline (``HF_HUB_OFFLINE=1``)
raises a RewardError naming the repo, the file and how to fix it.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence
from urllib.parse import parse_qsl

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .base import Reward, RewardError
from .registry import register

# ----------------------------------------------------------------------------------------------- defaults
# OpenAI CLIP uses QuickGELU; open_clip's "-quickgelu" configs build it, so a state-dict FILE of OpenAI weights
# loads into the right activation as well as the "openai" tag does.
CLIPSCORE_ARCH = "ViT-B-32-quickgelu"
CLIPSCORE_WEIGHTS = "openai"
CLIPSCORE_W = 2.5                      # Hessel et al.: rescales cosines of ViT-B/32 to roughly [0, 1]
CLIPSCORE_PREFIX = "A photo depicts "  # the prompt prefix of the official clipscore.py

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE_MAX_LENGTH = 77

HPS_ARCH = "ViT-H-14"
HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2": "HPS_v2_compressed.pt", "v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_DEFAULT_VERSION = "v2.1"

AESTHETIC_CLIP_ARCH = "ViT-L-14-quickgelu"
AESTHETIC_CLIP_WEIGHTS = "openai"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"  # name of the official file (GitHub, improved-aesthetic-predictor)
AESTHETIC_REPO = "trl-lib/ddpo-aesthetic-predictor"   # the same state dict on the hub (TRL's DDPO example)
AESTHETIC_REPO_FILE = "aesthetic-model.pth"

_OFFICIAL_BATCH = 32  # official-path chunk size: bounds memory of the PIL tensors and activations


# ------------------------------------------------------------------------------------------ preprocessing
@dataclass(frozen=True)
class ClipImagePrep:
    """The numbers of a CLIP inference transform: resize the shortest side to ``size`` (bicubic), centre crop
    ``crop`` = (height, width), normalise with ``mean`` / ``std`` (per channel, on [0, 1] values).

    ``crop_offset`` reproduces each library's rounding of the crop origin when the margin is odd:
    torchvision's CenterCrop (open_clip) uses ``int(round(margin / 2))``, transformers' image processors use
    ``margin // 2``; a one-pixel shift would otherwise separate the two paths.
    """

    size: int
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_offset: Literal["round", "floor"]

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """Output (h, w) of the shortest-side resize: short -> size, long -> int(size * long / short), exactly as
        torchvision's Resize(int) and transformers' get_resize_output_image_size compute it."""
        short, long = (height, width) if height <= width else (width, height)
        new_long = int(self.size * long / short)
        return (self.size, new_long) if height <= width else (new_long, self.size)

    def crop_origin(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of the centre crop in a (height, width) image."""
        def off(margin: int) -> int:
            return int(round(margin / 2.0)) if self.crop_offset == "round" else margin // 2
        ch, cw = self.crop
        if ch > height or cw > width:
            raise RewardError(f"centre crop {self.crop} is larger than the resized image {(height, width)}; "
                              f"this transform (size {self.size}) cannot be reproduced differentiably")
        return off(height - ch), off(width - cw)


def check_images(images: torch.Tensor, who: str) -> None:
    """Raise a RewardError unless ``images`` is a float tensor [N, 3, H, W] (values meant to lie in [0, 1])."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise RewardError(f"reward '{who}' scores images: expected a float tensor [N, 3, H, W] in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise RewardError(f"reward '{who}': images must be float in [0, 1] (got dtype {images.dtype}); "
                          "divide uint8 pixels by 255")


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] float in [0, 1] -> N RGB PIL images (values clamped, then rounded to uint8).

    Rounding is the exact inverse of ``ToTensor`` (uint8 / 255), so images loaded from 8-bit files survive the
    round trip bit for bit."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in arr]


def _on_uint8_grid(x: torch.Tensor) -> torch.Tensor:
    """Round to multiples of 1/255 in the forward pass, identity in the backward pass (straight-through)."""
    return x + ((x * 255).round() / 255 - x).detach()


def differentiable_preprocess(images: torch.Tensor, prep: ClipImagePrep, *, quantize: bool = True) -> torch.Tensor:
    """Tensor twin of the official transform: [N, 3, H, W] in [0, 1] -> normalised [N, 3, crop_h, crop_w].

    Mirrors PIL's bicubic resize step by step: ``antialias=True`` bicubic is PIL's kernel (a = -0.5, support
    widened when downscaling); PIL resizes horizontally first, then vertically, clipping to uint8 after each
    pass, so we do the two passes separately with a clamp after each.  With ``quantize`` the input and both
    passes are also rounded to the uint8 grid straight-through (forward = PIL's 8-bit values, backward = the
    smooth interpolation), which takes the gap to the official path from ~1/255 mean to ~0 (see the tests).
    Gradients flow to ``images``."""
    _, _, h, w = images.shape
    nh, nw = prep.resized_hw(h, w)
    grid = _on_uint8_grid if quantize else (lambda t: t)
    x = grid(images.clamp(0, 1))
    if nw != w:  # horizontal pass
        x = grid(F.interpolate(x, size=(h, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1))
    if nh != h:  # vertical pass
        x = grid(F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1))
    top, left = prep.crop_origin(nh, nw)
    ch, cw = prep.crop
    x = x[:, :, top:top + ch, left:left + cw]
    mean = torch.tensor(prep.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------ score formulas
def _unit(x: torch.Tensor) -> torch.Tensor:
    # x / ||x||, as every official script writes it (F.normalize only adds an eps that never binds here)
    return F.normalize(x, dim=-1)


def clipscore_from_features(image_features: torch.Tensor, text_features: torch.Tensor,
                            w: float = CLIPSCORE_W) -> torch.Tensor:
    """Hessel et al. CLIP-S: w * max(cos(image, text), 0), row by row.  [N, D], [N, D] -> [N]."""
    return w * (_unit(image_features) * _unit(text_features)).sum(-1).clamp(min=0)


def hps_from_features(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """HPSv2: diag(normalise(image) @ normalise(text).T), without the logit scale.  [N, D], [N, D] -> [N]."""
    return (_unit(image_features) * _unit(text_features)).sum(-1)


def pickscore_from_features(image_features: torch.Tensor, text_features: torch.Tensor,
                            logit_scale: torch.Tensor) -> torch.Tensor:
    """PickScore: logit_scale.exp() * cos(image, text) (the official snippet's logits).  [N, D] x2 -> [N]."""
    return logit_scale.exp() * (_unit(image_features) * _unit(text_features)).sum(-1)


# ------------------------------------------------------------------------------------------ spec helpers
def split_spec_options(checkpoint: str | None, allowed: dict[str, str], who: str) -> tuple[str | None, dict[str, str]]:
    """``"WEIGHTS?key=value&..."`` -> (WEIGHTS or None, {key: value}); unknown keys are errors naming the options.

    ``allowed`` maps option name -> one-line help (used in the error)."""
    if not checkpoint:
        return None, {}
    main, _, query = checkpoint.partition("?")
    options: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in allowed:
            listed = "; ".join(f"{k}: {h}" for k, h in allowed.items()) or "none"
            raise RewardError(f"reward '{who}': unknown option '{key}' in '{checkpoint}'. Options: {listed}")
        options[key] = value
    return (main or None), options


def _hub_download(repo: str, filename: str, who: str, local_hint: str, note: str = "") -> Path:
    """One file from the hub cache (or the network when allowed); a RewardError with the fix otherwise."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as e:  # offline cache miss, missing repo/file, network error: all end here
        raise RewardError(
            f"reward '{who}': {note}could not get '{filename}' from the hub repo '{repo}' ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Offline (HF_HUB_OFFLINE=1) only the local hub cache is "
            f"used: fetch it where a network exists (`huggingface-cli download {repo} {filename}`) or pass the "
            f"file itself, e.g. '{who}:{local_hint}'.") from e


def _looks_local(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", "\\")) or (len(spec) > 1 and spec[1] == ":")


def resolve_weights_file(spec: str, *, who: str, local_names: Sequence[str], default_repo: str,
                         default_filename: str) -> Path:
    """A single-file checkpoint from a file, a folder holding one of ``local_names``, or the hub
    (``org/repo`` -> ``default_filename`` in it; ``org/repo/path/in/repo.pt`` -> that file)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in local_names:
            if (path / name).is_file():
                return path / name
        raise RewardError(f"reward '{who}': folder {path} holds none of {list(local_names)}; "
                          f"pass the weights file itself ('{who}:/path/to/{local_names[0]}')")
    parts = spec.strip("/").split("/")
    if _looks_local(spec) or len(parts) < 2:
        raise RewardError(f"reward '{who}': weights file not found: {spec}. Pass an existing file or folder, or a "
                          f"hub id like '{default_repo}' (file '{default_filename}' in it).")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or default_filename
    return _hub_download(repo, filename, who, f"/path/to/{Path(filename).name}",
                         note=f"'{spec}' is no local file or folder; as a hub id: ")


def read_state_dict(path: str | Path, who: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, never unpickling objects.

    ``.safetensors`` -> safetensors; anything else -> ``torch.load(weights_only=True)``.  A ``{'state_dict': ...}``
    wrapper (HPSv2's files, open_clip training checkpoints) is unwrapped and a DDP ``module.`` prefix stripped."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise RewardError(
            f"reward '{who}': cannot read {path} as a weights file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Only safetensors and plain state dicts saved with "
            "torch.save are loaded (torch.load(weights_only=True): no arbitrary pickles, no TorchScript archives "
            "such as OpenAI's original CLIP .pt; use open_clip's 'openai' tag instead).") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RewardError(f"reward '{who}': {path} is not a state dict (name -> tensor) nor {{'state_dict': ...}}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, who: str, arch_hint: str) -> None:
    """load_state_dict(strict) with a RewardError naming the file, the architecture and the first mismatches."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        def head(items: list[str]) -> str:
            return f"{items[:4]}{' ...' if len(items) > 4 else ''}"
        raise RewardError(f"reward '{who}': {path} does not fit the architecture {arch_hint}: missing {head(missing)}, "
                          f"unexpected {head(unexpected)}, shape mismatches {head(shapes)}. Pass the architecture the "
                          "weights were trained with (?arch=... / ?clip_arch=...).")
    module.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------ open_clip loading
class _DropOpenClipNoise(logging.Filter):
    """open_clip logs "No pretrained weights loaded ... initialized randomly" when we build the architecture and
    then load the official file ourselves (misleading), and logs download failures that our RewardError repeats."""

    _NOISE = ("No pretrained weights loaded", "Failed to download weights for tag")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._NOISE)


@contextmanager
def _quiet_open_clip_logs():
    root, drop = logging.getLogger(), _DropOpenClipNoise()
    root.addFilter(drop)  # open_clip logs through the root logger (logging.warning / logging.error)
    try:
        yield
    finally:
        root.removeFilter(drop)


@dataclass
class OpenClipBundle:
    """A loaded open_clip model with its official inference transform, tokenizer and differentiable prep."""

    model: torch.nn.Module
    transform: Callable[[Image.Image], torch.Tensor]  # PIL -> [3, h, w] normalised
    tokenizer: Callable[[Sequence[str]], torch.Tensor]  # prompts -> [N, context] token ids
    prep: ClipImagePrep | None  # None when the transform has no tensor twin (non-bicubic / non-shortest)
    source: str


def load_open_clip(arch: str, weights: str, device: torch.device | str = "cpu", *, who: str = "clip") -> OpenClipBundle:
    """Build open_clip ``arch`` with ``weights`` and its official validation transform.

    ``weights``: an open_clip pretrained tag of ``arch`` (resolved by open_clip from the hub cache; a tag that
    was trained with QuickGELU forces it, which open_clip itself only warns about), a state-dict file
    (safetensors, or a torch.save'd dict, optionally ``{'state_dict': ...}``), or ``hf-hub:org/repo``
    (config and weights from the hub; ``arch`` is ignored).  Real use passes e.g. ("ViT-H-14", HPS file);
    tests pass a tiny registered architecture of the same family.
    """
    import open_clip

    model_name, pretrained, file, force_quick_gelu = arch, None, None, False
    if weights.startswith("hf-hub:"):
        model_name = weights
    else:
        if arch not in open_clip.list_models():
            raise RewardError(f"reward '{who}': unknown open_clip architecture '{arch}'; see open_clip.list_models() "
                              "(e.g. ViT-B-32-quickgelu, ViT-L-14-quickgelu, ViT-H-14)")
        if Path(weights).expanduser().is_file():
            file = Path(weights).expanduser()
        else:
            tag_cfg = open_clip.get_pretrained_cfg(arch, weights)
            if not tag_cfg:
                if _looks_local(weights) or Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors"):
                    raise RewardError(f"reward '{who}': weights file not found: {weights}")
                raise RewardError(f"reward '{who}': '{weights}' is neither a file nor a pretrained tag of {arch} "
                                  f"(tags: {open_clip.list_pretrained_tags_by_model(arch)})")
            pretrained = weights
            force_quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    try:
        with _quiet_open_clip_logs():
            model, _, transform = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, force_quick_gelu=force_quick_gelu, device="cpu")
    except Exception as e:  # download failures arrive as RuntimeError / OSError with open_clip's wording
        hub = (open_clip.get_pretrained_cfg(arch, pretrained).get("hf_hub", "").strip("/") if pretrained
               else model_name.removeprefix("hf-hub:"))
        fetch = f"run `huggingface-cli download {hub}`" if hub else "download the weights"
        raise RewardError(
            f"reward '{who}': could not load open_clip {model_name} with weights '{weights}' ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Offline (HF_HUB_OFFLINE=1) only the local hub cache is "
            f"used: {fetch} where a network exists, or pass a local state-dict file.") from e
    if file is not None:
        state = read_state_dict(file, who)
        # open_clip's own loader reshapes a scalar logit_scale saved by older versions; do the same
        if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
            state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        _load_strict(model, state, file, who, f"open_clip '{arch}'")
    model = model.eval().requires_grad_(False).to(device)
    tokenizer = open_clip.get_tokenizer(model_name)
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    size = size if isinstance(size, int) else tuple(size)
    prep = None
    square = isinstance(size, int) or size[0] == size[1]
    if cfg.get("interpolation", "bicubic") == "bicubic" and cfg.get("resize_mode", "shortest") == "shortest" and square:
        s = size if isinstance(size, int) else size[0]
        prep = ClipImagePrep(size=s, crop=(s, s), mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                             std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)), crop_offset="round")
    return OpenClipBundle(model, transform, tokenizer, prep, f"{model_name}:{weights}")


# ------------------------------------------------------------------------------------------ scorers
class _ClipImageScorer(Reward):
    """Shared image handling: shape checks, the official PIL path and the differentiable tensor path."""

    input_kind = "image"

    def __init__(self, *, prep: ClipImagePrep | None, differentiable: bool) -> None:
        self.prep = prep
        # instance attribute on purpose: one loaded model serves both the official and the gradient path
        self.differentiable = differentiable  # type: ignore[misc]

    # subclasses: the module whose first parameter says where inputs go
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device  # type: ignore[attr-defined]

    def official_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Official transform of [N, 3, H, W] in [0, 1] -> normalised pixels [N, 3, h, w] (no gradient)."""
        raise NotImplementedError

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """Model input for ``images`` [N, 3, H, W] in [0, 1] along the active path -> [N, 3, h, w]."""
        check_images(images, self.name)
        if self.differentiable:
            if self.prep is None:
                raise RewardError(f"reward '{self.name}': this checkpoint's transform has no differentiable twin "
                                  "(only bicubic shortest-side resize + centre crop is reproduced)")
            return differentiable_preprocess(images.to(self._device(), torch.float32), self.prep)
        return self.official_pixels(images).to(self._device())

    def _chunks(self, n: int) -> list[slice]:
        step = n if self.differentiable else _OFFICIAL_BATCH
        return [slice(i, min(i + step, n)) for i in range(0, n, max(step, 1))]

    def _run(self, fn: Callable[[slice], torch.Tensor], n: int) -> torch.Tensor:
        """Concatenate ``fn`` over batch chunks; no_grad on the official path, gradients on the other."""
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            return torch.cat([fn(s) for s in self._chunks(n)]) if n else torch.zeros(0, device=self._device())


class _OpenClipScorer(_ClipImageScorer):
    """A scorer over an open_clip model: image/text features normalised the open_clip way."""

    def __init__(self, bundle: OpenClipBundle, *, differentiable: bool = False) -> None:
        super().__init__(prep=bundle.prep, differentiable=differentiable)
        # frozen: gradients (differentiable mode) go to the images only; eval: no dropout
        self.model = bundle.model.eval().requires_grad_(False)
        self.transform = bundle.transform
        self.tokenizer = bundle.tokenizer
        self.source = bundle.source

    def official_pixels(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.name)
        return torch.stack([self.transform(p) for p in to_pil_images(images)])

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """open_clip tokens [N, context_length] (SimpleTokenizer BPE for the CLIP architectures)."""
        return self.tokenizer(list(prompts))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> unnormalised image embeddings [N, D] (active preprocessing path)."""
        return self.model.encode_image(self.pixel_values(images))

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts -> unnormalised text embeddings [N, D]."""
        return self.model.encode_text(self.tokenize(prompts).to(self._device()))


class CLIPScore(_OpenClipScorer):
    """CLIP-S (Hessel et al. 2021): 2.5 * max(cos(E_image, E_text("A photo depicts " + prompt)), 0).

    Defaults to the paper's model, OpenAI ViT-B/32 (open_clip ``ViT-B-32-quickgelu``, tag ``openai``) and the
    official script's prompt prefix; scores lie in [0, 2.5]."""

    name: ClassVar[str] = "clipscore"
    dimensions: ClassVar[tuple[str, ...]] = ("clipscore",)
    needs_prompt: ClassVar[bool] = True

    def __init__(self, bundle: OpenClipBundle, *, prefix: str = CLIPSCORE_PREFIX, w: float = CLIPSCORE_W,
                 differentiable: bool = False) -> None:
        super().__init__(bundle, differentiable=differentiable)
        self.prefix, self.w = prefix, w

    def score(self, inputs, prompts=None, *, fps=None, t=None):
        check_images(inputs, self.name)
        texts = [self.prefix + p for p in prompts]  # type: ignore[union-attr]  # __call__ checked prompts
        out = self._run(lambda s: clipscore_from_features(self.image_features(inputs[s]),
                                                          self.text_features(texts[s]), self.w), len(inputs))
        return {"clipscore": out}


class HPSv2(_OpenClipScorer):
    """Human Preference Score v2 / v2.1: cos(image, prompt) of the fine-tuned open_clip ViT-H-14
    (``hpsv2.score``: diag(image_features @ text_features.T) of normalised features; typical values ~0.2-0.35)."""

    name: ClassVar[str] = "hps"
    dimensions: ClassVar[tuple[str, ...]] = ("hps",)
    needs_prompt: ClassVar[bool] = True

    def score(self, inputs, prompts=None, *, fps=None, t=None):
        check_images(inputs, self.name)
        texts = list(prompts)  # type: ignore[arg-type]
        out = self._run(lambda s: hps_from_features(self.image_features(inputs[s]), self.text_features(texts[s])),
                        len(inputs))
        return {"hps": out}


class AestheticMLP(torch.nn.Module):
    """The improved-aesthetic-predictor head, layer for layer (its ReLUs are commented out upstream, so this is
    an affine map in eval mode); state-dict keys ``layers.{0,2,4,6,7}.{weight,bias}`` as in the official file."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """[N, input_size] L2-normalised CLIP image embeddings -> [N, 1] predicted rating (~1-10)."""
        return self.layers(embedding)


class LaionAesthetic(_OpenClipScorer):
    """LAION improved aesthetic predictor: MLP(normalise(CLIP ViT-L/14 image embedding)); no prompt."""

    name: ClassVar[str] = "aesthetic"
    dimensions: ClassVar[tuple[str, ...]] = ("aesthetic",)
    needs_prompt: ClassVar[bool] = False

    def __init__(self, bundle: OpenClipBundle, mlp: AestheticMLP, *, differentiable: bool = False) -> None:
        super().__init__(bundle, differentiable=differentiable)
        self.mlp = mlp.eval().requires_grad_(False).to(self._device())

    def score(self, inputs, prompts=None, *, fps=None, t=None):
        check_images(inputs, self.name)
        out = self._run(lambda s: self.mlp(_unit(self.image_features(inputs[s]))).squeeze(-1), len(inputs))
        return {"aesthetic": out}


class PickScore(_ClipImageScorer):
    """PickScore v1: logit_scale.exp() * cos(image, prompt) from a transformers CLIPModel (CLIP-H fine-tuned on
    Pick-a-Pic) with the laion CLIP-H processor (PIL backend: the numerics PickScore was published with)."""

    name: ClassVar[str] = "pickscore"
    dimensions: ClassVar[tuple[str, ...]] = ("pickscore",)
    needs_prompt: ClassVar[bool] = True

    def __init__(self, model: torch.nn.Module, image_processor: Any, tokenizer: Any, *, source: str = "",
                 differentiable: bool = False) -> None:
        super().__init__(prep=_hf_prep(image_processor), differentiable=differentiable)
        self.model = model.eval().requires_grad_(False)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.source = source

    def official_pixels(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.name)
        return self.image_processor(images=to_pil_images(images), return_tensors="pt")["pixel_values"]

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The official snippet's text call: padding=True, truncation=True, max_length=77."""
        return dict(self.tokenizer(list(prompts), padding=True, truncation=True, max_length=PICKSCORE_MAX_LENGTH,
                                   return_tensors="pt"))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """visual_projection(vision_model(pixels).pooler_output) = CLIPModel.get_image_features -> [N, D]."""
        pooled = self.model.vision_model(pixel_values=self.pixel_values(images)).pooler_output
        return self.model.visual_projection(pooled)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """text_projection(text_model(tokens).pooler_output) = CLIPModel.get_text_features -> [N, D]."""
        tokens = {k: v.to(self._device()) for k, v in self.tokenize(prompts).items()
                  if k in ("input_ids", "attention_mask")}
        return self.model.text_projection(self.model.text_model(**tokens).pooler_output)

    def score(self, inputs, prompts=None, *, fps=None, t=None):
        check_images(inputs, self.name)
        texts = list(prompts)  # type: ignore[arg-type]
        out = self._run(lambda s: pickscore_from_features(self.image_features(inputs[s]), self.text_features(texts[s]),
                                                          self.model.logit_scale), len(inputs))
        return {"pickscore": out}


def _hf_prep(ip: Any) -> ClipImagePrep | None:
    """The tensor twin of a CLIP image processor, or None when it does something else (e.g. no centre crop)."""
    def get(d: Any, key: str) -> Any:
        return getattr(d, key, None) if not isinstance(d, dict) else d.get(key)

    size, crop = get(ip.size, "shortest_edge"), (get(ip.crop_size, "height"), get(ip.crop_size, "width"))
    if not (ip.do_resize and ip.do_center_crop and ip.do_rescale and ip.do_normalize and size and all(crop)):
        return None
    if int(ip.resample) != int(Image.Resampling.BICUBIC):
        return None
    return ClipImagePrep(size=int(size), crop=(int(crop[0]), int(crop[1])), mean=tuple(ip.image_mean),
                         std=tuple(ip.image_std), crop_offset="floor")


def _pil_image_processor_class() -> Any:
    """The PIL-backed CLIP image processor: ``CLIPImageProcessorPil`` in transformers 5, the (then PIL-based)
    ``CLIPImageProcessor`` in 4.x.  transformers 5's default CLIPImageProcessor resizes with torchvision tensors,
    which is not what PickScore was published with."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def _is_local(spec: str) -> bool:
    return Path(spec).expanduser().exists() or _looks_local(spec)


def load_pickscore(model: str | None = None, processor: str | None = None, device: torch.device | str = "cpu",
                   *, differentiable: bool = False) -> PickScore:
    """PickScore from a save_pretrained folder or hub id (default ``yuvalkirstain/PickScore_v1``).

    ``processor``: folder or hub id of the CLIP processor; by default the model folder when it holds a
    preprocessor_config.json (a folder written by save_pretrained with its processor), else the official
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``."""
    from transformers import AutoTokenizer, CLIPModel

    model_src = model or PICKSCORE_MODEL
    if _looks_local(model_src) and not Path(model_src).expanduser().exists():
        raise RewardError(f"reward 'pickscore': model folder not found: {model_src}")
    if processor is None:
        local = Path(model_src).expanduser()
        processor = str(local) if (local / "preprocessor_config.json").is_file() else PICKSCORE_PROCESSOR
    what = "model"
    try:
        # a concrete class (no Auto* with remote code): config.json must describe a CLIPModel
        clip = CLIPModel.from_pretrained(str(Path(model_src).expanduser()) if _is_local(model_src) else model_src)
        what = "processor"
        image_processor = _pil_image_processor_class().from_pretrained(processor)
        tokenizer = AutoTokenizer.from_pretrained(processor)
    except Exception as e:
        src = model_src if what == "model" else processor
        hint = ("save one there with AutoProcessor.from_pretrained('laion/CLIP-ViT-H-14-laion2B-s32B-b79K')"
                ".save_pretrained(FOLDER), or pass ?processor=FOLDER" if what == "processor" else
                "download it where a network exists (`huggingface-cli download yuvalkirstain/PickScore_v1`) "
                "and pass the folder: 'pickscore:/path/to/PickScore_v1'")
        raise RewardError(f"reward 'pickscore': could not load the {what} from '{src}' ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}). Offline (HF_HUB_OFFLINE=1) only local "
                          f"folders and the hub cache are used; {hint}.") from e
    return PickScore(clip.to(device), image_processor, tokenizer, source=f"{model_src} (processor {processor})",
                     differentiable=differentiable)


def load_clipscore(weights: str | None = None, arch: str | None = None, device: torch.device | str = "cpu", *,
                   prefix: str = CLIPSCORE_PREFIX, differentiable: bool = False) -> CLIPScore:
    """CLIPScore; ``weights`` as in the module docstring (tag, file, hf-hub:..., or ``ARCH/TAG_OR_FILE``)."""
    import open_clip

    weights = weights or CLIPSCORE_WEIGHTS
    if arch is None:
        head, sep, tail = weights.partition("/")
        if sep and tail and head in open_clip.list_models():
            arch, weights = head, tail  # open_clip's "MODEL/PRETRAINED" shorthand
    bundle = load_open_clip(arch or CLIPSCORE_ARCH, weights, device, who="clipscore")
    return CLIPScore(bundle, prefix=prefix, differentiable=differentiable)


def load_hps(weights: str | None = None, arch: str = HPS_ARCH, device: torch.device | str = "cpu", *,
             differentiable: bool = False) -> HPSv2:
    """HPSv2 / v2.1 from ``v2`` / ``v2.1`` (hub ``xswu/HPSv2``), a file, a folder or ``org/repo[/file]``.

    Unlike hpsv2 we do not first download the laion2B ViT-H-14 weights: the HPS state dict is loaded strictly
    and replaces every parameter, so the base weights would be overwritten anyway."""
    spec = weights or HPS_DEFAULT_VERSION
    if spec in HPS_FILES:
        file = _hub_download(HPS_REPO, HPS_FILES[spec], "hps", f"/path/to/{HPS_FILES[spec]}")
    else:
        file = resolve_weights_file(spec, who="hps", local_names=(HPS_FILES["v2.1"], HPS_FILES["v2"]),
                                    default_repo=HPS_REPO, default_filename=HPS_FILES[HPS_DEFAULT_VERSION])
    return HPSv2(load_open_clip(arch, str(file), device, who="hps"), differentiable=differentiable)


def load_aesthetic(weights: str | None = None, clip_arch: str = AESTHETIC_CLIP_ARCH,
                   clip_weights: str = AESTHETIC_CLIP_WEIGHTS, device: torch.device | str = "cpu", *,
                   differentiable: bool = False) -> LaionAesthetic:
    """The LAION aesthetic predictor: MLP file (``sac+logos+ava1-l14-linearMSE.pth``, a plain state dict) on the
    image embeddings of ``clip_arch`` / ``clip_weights`` (default OpenAI ViT-L/14)."""
    file = resolve_weights_file(weights or AESTHETIC_REPO, who="aesthetic",
                                local_names=(AESTHETIC_FILE, AESTHETIC_REPO_FILE), default_repo=AESTHETIC_REPO,
                                default_filename=AESTHETIC_REPO_FILE)
    state = read_state_dict(file, "aesthetic")
    if "layers.0.weight" not in state:
        raise RewardError(f"reward 'aesthetic': {file} is not an aesthetic-predictor MLP (no 'layers.0.weight'; "
                          f"keys: {sorted(state)[:6]})")
    mlp = AestheticMLP(int(state["layers.0.weight"].shape[1]))
    _load_strict(mlp, state, file, "aesthetic", "AestheticMLP (768-1024-128-64-16-1)")
    bundle = load_open_clip(clip_arch, clip_weights, device, who="aesthetic")
    embed_dim = int(bundle.model.visual.output_dim)
    if embed_dim != mlp.input_size:
        raise RewardError(f"reward 'aesthetic': the MLP in {file} expects {mlp.input_size}-d CLIP embeddings but "
                          f"{clip_arch} gives {embed_dim}-d; the official predictor uses ViT-L-14 (768)")
    return LaionAesthetic(bundle, mlp, differentiable=differentiable)


# ------------------------------------------------------------------------------------------ registration
_DIFF_OPTION = {"differentiable": "1/true: the tensor preprocessing path, so gradients reach the images "
                                  "(reward guidance / backprop); default: the official PIL path"}


def _differentiable(opts: dict[str, str], who: str) -> bool:
    value = opts.get("differentiable", "0").strip().lower()
    if value not in ("0", "1", "true", "false", "yes", "no", ""):
        raise RewardError(f"reward '{who}': option differentiable must be 1/true or 0/false, got '{value}'")
    return value in ("1", "true", "yes")


@register("clipscore", dimensions=("clipscore",), input_kind="image",
          help="CLIPScore (Hessel et al.): 2.5*max(cos,0) with OpenAI CLIP ViT-B/32 and the 'A photo depicts' "
               "prefix; clipscore:TAG|FILE|ARCH/TAG_OR_FILE|hf-hub:ID, options ?arch=&prefix=")
def _clipscore_factory(checkpoint: str | None, device: torch.device) -> Reward:
    weights, opts = split_spec_options(checkpoint, {"arch": "open_clip architecture (default ViT-B-32-quickgelu)",
                                                    "prefix": "text before each prompt (default 'A photo depicts ')",
                                                    **_DIFF_OPTION}, "clipscore")
    return load_clipscore(weights, opts.get("arch"), device, prefix=opts.get("prefix", CLIPSCORE_PREFIX),
                          differentiable=_differentiable(opts, "clipscore"))


@register("pickscore", dimensions=("pickscore",), input_kind="image",
          help="PickScore v1 (transformers CLIP-H, yuvalkirstain/PickScore_v1): logit_scale.exp()*cos; "
               "pickscore:FOLDER|HUB_ID, option ?processor=FOLDER|HUB_ID")
def _pickscore_factory(checkpoint: str | None, device: torch.device) -> Reward:
    weights, opts = split_spec_options(checkpoint, {"processor": f"processor folder or hub id (default: the model "
                                                                 f"folder if it has one, else {PICKSCORE_PROCESSOR})",
                                                    **_DIFF_OPTION}, "pickscore")
    return load_pickscore(weights, opts.get("processor"), device, differentiable=_differentiable(opts, "pickscore"))


@register("hps", dimensions=("hps",), input_kind="image",
          help="HPSv2/v2.1 (open_clip ViT-H-14): cosine of normalised features; hps:v2.1 (default)|v2|FILE|FOLDER"
               "|ORG/REPO[/FILE], option ?arch=")
def _hps_factory(checkpoint: str | None, device: torch.device) -> Reward:
    weights, opts = split_spec_options(checkpoint, {"arch": f"open_clip architecture (default {HPS_ARCH})",
                                                    **_DIFF_OPTION}, "hps")
    return load_hps(weights, opts.get("arch", HPS_ARCH), device, differentiable=_differentiable(opts, "hps"))


@register("aesthetic", dimensions=("aesthetic",), input_kind="image",
          help="LAION improved aesthetic predictor (MLP on normalised CLIP ViT-L/14 image embeddings), no prompt; "
               "aesthetic:FILE|FOLDER|ORG/REPO[/FILE], options ?clip_arch=&clip=")
def _aesthetic_factory(checkpoint: str | None, device: torch.device) -> Reward:
    weights, opts = split_spec_options(checkpoint, {
        "clip_arch": f"open_clip architecture of the embedder (default {AESTHETIC_CLIP_ARCH})",
        "clip": f"embedder weights: open_clip tag or state-dict file (default {AESTHETIC_CLIP_WEIGHTS})",
        **_DIFF_OPTION}, "aesthetic")
    return load_aesthetic(weights, opts.get("clip_arch", AESTHETIC_CLIP_ARCH),
                          opts.get("clip", AESTHETIC_CLIP_WEIGHTS), device,
                          differentiable=_differentiable(opts, "aesthetic"))


__all__ = [
    "AestheticMLP", "CLIPScore", "ClipImagePrep", "HPSv2", "LaionAesthetic", "OpenClipBundle", "PickScore",
    "clipscore_from_features", "differentiable_preprocess", "hps_from_features", "load_aesthetic", "load_clipscore",
    "load_hps", "load_open_clip", "load_pickscore", "pickscore_from_features", "read_state_dict",
    "resolve_weights_file", "split_spec_options", "to_pil_images",
]
