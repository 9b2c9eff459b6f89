"""Model family adapters: one per family, chosen by ``model.family``; loading via diffusers from_pretrained."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from diffalign.config import ModelConfig
from diffalign.models.base import DTYPES, FamilyAdapter
from diffalign.models.flux import FluxAdapter
from diffalign.models.sd3 import SD3Adapter
from diffalign.models.sd15 import SD15Adapter
from diffalign.models.sdxl import SDXLAdapter
from diffalign.models.wan import WanAdapter

ADAPTERS: dict[str, type[FamilyAdapter]] = {a.family: a for a in (SD15Adapter, SDXLAdapter, SD3Adapter, FluxAdapter, WanAdapter)}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message names the path/id and the likely fix."""


def resolve_pretrained(spec: str) -> str:
    """'tiny:<family>' -> a materialised local folder; 'world:<kind>' -> the bundled world generator;
    anything else is passed to from_pretrained as is."""
    if spec.startswith("world:"):
        from diffalign.world.demo import bundled_generator

        return str(bundled_generator(spec.split(":", 1)[1]))
    if spec.startswith("tiny:"):
        from diffalign.models.tiny import materialize_tiny

        return str(materialize_tiny(spec))
    return spec


def load_pipeline(cfg: ModelConfig, torch_dtype: torch.dtype = torch.float32):
    """``<FamilyPipeline>.from_pretrained`` on a folder or hub id, with per-component overrides (vae)."""
    import diffusers

    if not cfg.pretrained:
        raise ModelLoadError("model.pretrained is empty: give a diffusers folder, a hub id or tiny:<family>")
    adapter_cls = ADAPTERS[cfg.family]
    source = resolve_pretrained(cfg.pretrained)
    local = Path(source)
    if (source.startswith((".", "/", "~")) or local.exists()) and not (local.expanduser() / "model_index.json").is_file():
        raise ModelLoadError(f"model.pretrained={cfg.pretrained!r}: no model_index.json in that folder. Point it at a "
                             "diffusers pipeline folder (pipe.save_pretrained(...)) or a hub id.")
    overrides = {}
    if cfg.vae:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            overrides["vae"] = diffusers.AutoencoderKL.from_pretrained(
                resolve_pretrained(cfg.vae), torch_dtype=torch_dtype,
                subfolder="vae" if (Path(cfg.vae) / "vae").is_dir() else None)
    index = local.expanduser() / "model_index.json"
    if index.is_file():  # components saved as null (e.g. SD3 without T5) must be passed as None explicitly
        for name, value in json.loads(index.read_text()).items():
            if isinstance(value, list) and value == [None, None]:
                overrides.setdefault(name, None)
    pipeline_cls = getattr(diffusers, adapter_cls.pipeline_class_name)
    kwargs = dict(revision=cfg.revision, variant=cfg.variant, torch_dtype=torch_dtype)
    if cfg.family == "sd15":
        overrides["safety_checker"] = None
        kwargs["requires_safety_checker"] = False
    try:
        with warnings.catch_warnings():  # torch_dtype is deprecated in new diffusers but is the only name older ones accept
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return pipeline_cls.from_pretrained(str(local.expanduser()) if local.exists() else source, **kwargs, **overrides)
    except OSError as e:
        raise ModelLoadError(f"could not load {cfg.family} pipeline from {cfg.pretrained!r}: {e}. Offline? Hub ids need "
                             "network access; pass a local diffusers folder instead.") from e


def load_adapter(cfg: ModelConfig, device: torch.device | str = "cpu", weight_dtype: torch.dtype = torch.float32) -> FamilyAdapter:
    """Load the pipeline for ``cfg`` and wrap it in its family adapter (all weights frozen, on ``device``)."""
    pipe = load_pipeline(cfg, torch_dtype=weight_dtype)
    return ADAPTERS[cfg.family](pipe, cfg, device=device, weight_dtype=weight_dtype)


__all__ = ["ADAPTERS", "DTYPES", "FamilyAdapter", "ModelLoadError", "load_adapter", "load_pipeline", "resolve_pretrained"]
