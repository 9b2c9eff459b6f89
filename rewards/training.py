"""The reward-model training loop behind ``diffalign train-reward`` (accelerate; CPU or GPUs).

Per step: a batch of B labelled pairs -> ONE forward over the 2B items [A; B] -> scores r_A, r_B
[B, D] -> Rao-Kupper BTT loss over the labelled (pair, dimension) entries (``btt.py``) -> backward,
clip, AdamW step. The noise-aware latent model sees the generator's VAE latents of both images
(encoded ONCE at setup), noised by the family adapter's own ``add_noise`` at a sampled t with the SAME
t and noise for A and B (so the comparison is between the images, not between noise draws).

Validation (every ``train.eval_every`` steps and at the end, on the validation split): BTT loss and
accuracy without ties / with ties (tie-calibrated) per dimension, also per source group; the latent
model at each of ``train.eval_times`` (flow unit time; eps families at the DDPM timestep of equal
SNR) with fixed noise. The per-dimension Normalizer is fitted on the validation scores and saved.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import Normalizer, RewardError
from .btt import btt_loss
from .data import LabelledPairs, load_labelled_pairs
from .train_cli import RewardRunConfig, composite_groups
from .trained import (WORLD_MEAN_STD, CompositeRewardModel, FrameReward, TrainedReward, _clip_norm, build_model,
                      load_clip_text, load_clip_tokenizer, load_clip_vision, resize_square, sample_video,
                      stack_clips, world_text_config, world_tokenizer, world_vision_config, wrap)


# ============================================================================ model construction

def _text_tower(source: str, cfg: RewardRunConfig):
    """(tokenizer, text_config, pretrained text module or None) for 'world' (tiny, random init) or a CLIP
    hub id / folder / 'world:<generator>' (its text_encoder/ and tokenizer/ when it is a pipeline folder)."""
    m = cfg.model
    if source == "world":
        tok = world_tokenizer(m.max_text_length)
        return tok, world_text_config(tok, m.hidden_size, m.text_layers, m.num_heads, m.max_text_length), None
    tok = load_clip_tokenizer(source)
    text = load_clip_text(source)
    return tok, text.config, text


def text_source(cfg: RewardRunConfig) -> str:
    """Where the text tower comes from: model.text_pretrained, else the CLIP the image side uses
    (frames/composite: model.pretrained; latent with the decoder backbone: model.latent_clip), else 'world'."""
    m = cfg.model
    if m.text_pretrained:
        return m.text_pretrained
    if m.kind == "latent":
        return m.latent_clip if m.latent_backbone == "decoder" else "world"
    return m.pretrained


def _vision_tower(source: str, cfg: RewardRunConfig):
    """(vision config, pretrained vision module or None, mean, std) for 'world' (tiny, random) or a CLIP."""
    m = cfg.model
    if source == "world":
        return (world_vision_config(m.image_size, m.patch_size, m.hidden_size, m.vision_layers, m.num_heads), None,
                *WORLD_MEAN_STD)
    vision = load_clip_vision(source)
    return (vision.config, vision, *_clip_norm(source))


def build_reward_model(cfg: RewardRunConfig, latent_channels: int | None = None, vae=None) -> tuple[nn.Module, Any, dict]:
    """(model, tokenizer, spec) for a fresh run: pretrained towers loaded where the config names them.

    ``spec`` is what reward_config.json will hold (architecture as plain dicts, so loading needs no hub).
    ``vae`` (the generator's AutoencoderKL) is needed by the latent model with the decoder backbone.
    """
    m = cfg.model
    torch.manual_seed(cfg.train.seed)  # identical initialisation on every rank and every run
    spec: dict[str, Any] = {"name": cfg.name, "kind": m.kind, "dimensions": list(m.dimensions),
                            "weights": dict(m.weights), "theta": cfg.objective.theta}
    if m.kind == "latent" and m.latent_backbone == "decoder":
        if vae is None:
            raise RewardError("the decoder-backed latent reward needs the generator's VAE")
        tok, text_cfg, text_module = _text_tower(text_source(cfg), cfg)
        vision_cfg, vision_module, mean, std = _vision_tower(m.latent_clip, cfg)
        max_length = min(m.max_text_length, text_cfg.max_position_embeddings)
        vae_config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
        spec.update(input_kind="latent", text={"source": text_source(cfg), "max_length": max_length},
                    latent={"family": m.family, "generator": m.pretrained, "backbone": "decoder", "clip": m.latent_clip},
                    architecture={"backbone": "decoder", "vae_config": vae_config,
                                  "vae_scaling_factor": float(vae.config.scaling_factor),
                                  "vae_shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0),
                                  "vision_config": vision_cfg.to_dict(), "text_config": text_cfg.to_dict(),
                                  "image_size": vision_cfg.image_size, "image_mean": list(mean), "image_std": list(std),
                                  "fusion_dim": m.fusion_dim, "head_hidden": m.head_hidden,
                                  "fusion_layers": m.fusion_layers})
        if m.members:  # a composite body (model.members / member_backbones), every member noise-aware
            spec["architecture"]["members"] = [_member_spec(g, m) for g in composite_groups(m)]
        model = build_model(spec)
        missing, unexpected = model.vae.load_state_dict(vae.state_dict(), strict=False)
        if missing or any(not k.startswith(("encoder.", "quant_conv.")) for k in unexpected):
            raise RewardError(f"generator VAE does not fit its own config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        _load_towers(_members(model.body), vision_module, text_module)
        return model, tok, spec
    if m.kind == "latent":
        tok, text_cfg, text_module = _text_tower(text_source(cfg), cfg)
        max_length = min(m.max_text_length, text_cfg.max_position_embeddings)
        spec.update(input_kind="latent", text={"source": text_source(cfg), "max_length": max_length},
                    latent={"family": m.family, "generator": m.pretrained},
                    architecture={"text_config": text_cfg.to_dict(), "latent_channels": latent_channels,
                                  "width": m.latent_width, "levels": m.latent_levels, "fusion_dim": m.fusion_dim,
                                  "head_hidden": m.head_hidden, "grid": 4, "fusion_layers": m.fusion_layers})
        model = build_model(spec)
        if text_module is not None:
            model.text.load_state_dict(text_module.state_dict())
        return model, tok, spec
    tok, text_cfg, text_module = _text_tower(text_source(cfg), cfg)
    vision_cfg, vision_module, mean, std = _vision_tower(m.pretrained, cfg)
    max_length = min(m.max_text_length, text_cfg.max_position_embeddings)
    spec.update(input_kind="image" if m.max_frames == 1 else "video",
                text={"source": text_source(cfg), "max_length": max_length},
                frames={"image_size": vision_cfg.image_size, "mean": list(mean), "std": list(std),
                        "sample_fps": m.sample_fps, "max_frames": m.max_frames},
                architecture={"vision_config": vision_cfg.to_dict(), "text_config": text_cfg.to_dict(),
                              "fusion_dim": m.fusion_dim, "head_hidden": m.head_hidden, "temporal": m.temporal,
                              "fusion_layers": m.fusion_layers,
                              "stem": m.vision_stem if m.pretrained == "world" else "patch"})
    if m.kind == "composite":
        spec["architecture"]["members"] = [_member_spec(g, m) for g in composite_groups(m)]
    model = build_model(spec)
    _load_towers(_members(model), vision_module, text_module)
    return model, tok, spec


def _members(model: nn.Module) -> list[nn.Module]:
    """A composite's members, or the model itself."""
    return list(model.members.values()) if isinstance(model, CompositeRewardModel) else [model]


def _load_towers(members: list[nn.Module], vision_module, text_module) -> None:
    for member in members:  # every composite member starts from the same pretrained towers (object: text only)
        if vision_module is not None and hasattr(member, "vision"):
            member.vision.load_state_dict(vision_module.state_dict())
        if text_module is not None:
            member.text.load_state_dict(text_module.state_dict())


def _member_spec(dims: list[str], m) -> dict:
    """reward_config.json entry of one composite member: its dimensions, backbone and (object) architecture."""
    backbone = next((m.member_backbones[d] for d in dims if d in m.member_backbones), "frames")
    out: dict[str, Any] = {"dimensions": list(dims), "backbone": backbone}
    if backbone == "object":
        out.update(width=m.object_width, crop=m.object_crop, extent=m.object_extent)
    elif backbone == "track":
        out.update(width=m.track_width, layers=m.track_layers, magnitudes=m.track_magnitudes)
    return out


def _backbone_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(tower parameters, new-part parameters): the towers are the CLIP vision/text modules."""
    tower, new = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        (tower if "vision" in parts or "text" in parts else new).append(p)
    return tower, new


def _param_groups(model: nn.Module, cfg: RewardRunConfig) -> list[dict]:
    """AdamW groups: towers at optim.lr, new parts at optim.head_lr, and every parameter of a composite member
    named in optim.member_lr (by one of its dimensions) at that rate."""
    head_lr = cfg.optim.head_lr if cfg.optim.head_lr is not None else cfg.optim.lr
    own: list[dict] = []
    taken: set[int] = set()
    if cfg.optim.member_lr:
        composite = model.body if isinstance(getattr(model, "body", None), CompositeRewardModel) else model
        for member in composite.members.values():
            rates = {float(cfg.optim.member_lr[d]) for d in member.dimensions if d in cfg.optim.member_lr}
            if len(rates) > 1:
                raise RewardError(f"optim.member_lr gives the member {list(member.dimensions)} two learning rates")
            if rates:
                params = [p for p in member.parameters() if p.requires_grad]
                own.append({"params": params, "lr": rates.pop()})
                taken |= {id(p) for p in params}
    tower, new = _backbone_parameters(model)
    tower, new = [p for p in tower if id(p) not in taken], [p for p in new if id(p) not in taken]
    return [g for g in ({"params": tower, "lr": cfg.optim.lr}, {"params": new, "lr": head_lr}, *own) if g["params"]]


def _freeze(model: nn.Module, cfg: RewardRunConfig) -> None:
    for name, p in model.named_parameters():
        parts = name.split(".")
        if (cfg.model.freeze_vision and "vision" in parts) or (cfg.model.freeze_text and "text" in parts):
            p.requires_grad_(False)


# ============================================================================ data

class FramePairDataset(torch.utils.data.Dataset):
    """Pair i -> dict(a=(clip [K, 3, S, S] normalised, times [K]), b=(...), prompt, labels [D], mask [D]).

    In-memory images become one-frame clips, in-memory clips (``world:video-renders``) are sampled by time
    at their carried fps like files; files are read with ``rewards.media`` (videos sampled by
    time at the model's sample_fps with the file's real fps, or the CSV's fps_A/fps_B when given).
    """

    def __init__(self, pairs: LabelledPairs, frames_spec: dict):
        self.pairs = pairs
        self.size = int(frames_spec["image_size"])
        self.mean = torch.tensor(frames_spec["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(frames_spec["std"]).view(1, 3, 1, 1)
        self.sample_fps = float(frames_spec["sample_fps"])
        self.max_frames = int(frames_spec["max_frames"])

    def __len__(self) -> int:
        return len(self.pairs)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (resize_square(x.float(), self.size) - self.mean) / self.std

    def _item(self, i: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pairs
        images = p.images_a if side == "a" else p.images_b
        if images is not None and images.ndim == 5:  # in-memory clip [F, H, W, 3] at its real fps
            fps = (p.fps_a if side == "a" else p.fps_b)
            if fps is None or fps[i] is None:
                raise RewardError(f"{p.source}: in-memory clip {i} has no fps; clips are sampled by time")
            x = torch.from_numpy(np.ascontiguousarray(images[i])).permute(0, 3, 1, 2).float() / 255.0
            frames, times = sample_video(x, float(fps[i]), self.sample_fps, self.max_frames)
            return self._normalise(frames), times
        if images is not None:
            x = torch.from_numpy(np.ascontiguousarray(images[i])).permute(2, 0, 1)[None].float() / 255.0
            return self._normalise(x), torch.zeros(1)
        from .media import load_image, load_video, media_kind

        path = (p.paths_a if side == "a" else p.paths_b)[i]
        fps_override = (p.fps_a if side == "a" else p.fps_b)[i]
        if media_kind(path) == "image":
            return self._normalise(load_image(path)[None]), torch.zeros(1)
        frames, fps = load_video(path)
        frames, times = sample_video(frames, float(fps_override or fps), self.sample_fps, self.max_frames)
        return self._normalise(frames), times

    def __getitem__(self, i: int) -> dict:
        return {"a": self._item(i, "a"), "b": self._item(i, "b"), "prompt": self.pairs.prompts[i],
                "labels": self.pairs.labels[i], "mask": self.pairs.mask[i], "index": i}


def collate_frame_pairs(items: list[dict]) -> dict:
    """Stack [A items; B items] into one padded batch: frames [2B, F, 3, S, S], times, frame_mask [2B, F]."""
    clips = [it["a"][0] for it in items] + [it["b"][0] for it in items]
    times = [it["a"][1] for it in items] + [it["b"][1] for it in items]
    frames, t, mask = stack_clips(clips, times)
    prompts = [it["prompt"] for it in items]
    return {"frames": frames, "times": t, "frame_mask": mask, "prompts": prompts + prompts,
            "labels": torch.stack([it["labels"] for it in items]), "mask": torch.stack([it["mask"] for it in items]),
            "index": torch.tensor([it["index"] for it in items])}


class IndexDataset(torch.utils.data.Dataset):
    """Latent training: pair indices only (latents live on the device, encoded once)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


@torch.no_grad()
def encode_pair_latents(adapter, pairs: LabelledPairs, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE latents (posterior mean, scaled as the pipeline does) of every A and B image: two [N, C, h, w]."""
    if not pairs.in_memory:
        raise RewardError("the latent reward trains on image pairs held in memory (world pairs parquet or "
                          "world:renders/world:samples); video latents need a video VAE adapter")
    if pairs.images_a.ndim != 4:
        raise RewardError("the latent reward trains on image pairs; in-memory clips (world:video-renders) need a "
                          "frames or composite model")
    out = []
    for images in (pairs.images_a, pairs.images_b):
        chunks = []
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            chunks.append(adapter.encode_images(x).cpu())
        out.append(torch.cat(chunks))
    return out[0], out[1]


def native_time_for_level(adapter, level: float, n: int) -> torch.Tensor:
    """Native timesteps [n] at flow noise level ``level`` (unit time): itself for flow families; for DDPM
    families the timestep whose alpha_bar gives the same signal-to-noise ratio, ((1-s)/s)^2."""
    if adapter.is_flow:
        return torch.full((n,), float(level))
    target = (1 - level) ** 2 / ((1 - level) ** 2 + level ** 2)
    t = int(torch.argmin((adapter.alphas_cumprod.cpu() - target).abs()))
    return torch.full((n,), t, dtype=torch.long)


# ============================================================================ the trainer

def _split(train: LabelledPairs, fraction: float, seed: int) -> tuple[LabelledPairs, LabelledPairs]:
    n = len(train)
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(fraction * n)))
    if n - n_val < 1:
        raise RewardError(f"only {n} pairs: too few to hold out a validation split; give data.val_path")
    return train.subset(sorted(order[n_val:].tolist())), train.subset(sorted(order[:n_val].tolist()))


class RewardTrainer:
    """Sets up data, model, optimizer and accelerate from a RewardRunConfig, then trains and validates."""

    def __init__(self, cfg: RewardRunConfig, show_progress: bool = True):
        from accelerate import Accelerator

        self.cfg = cfg
        self.out = cfg.output_dir
        self.show_progress = show_progress
        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
        self.is_latent = cfg.model.kind == "latent"

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        dims = list(cfg.model.dimensions)
        root = cfg.data.root or None
        show = self.show_progress and acc.is_local_main_process
        with acc.main_process_first():  # world:samples generates and caches once, the other ranks read it
            train = load_labelled_pairs(cfg.data.path, dims, tie_margin=cfg.data.tie_margin, root=root,
                                        max_pairs=cfg.data.max_pairs, show_progress=show)
            if cfg.data.val_path:
                val = load_labelled_pairs(cfg.data.val_path, dims, tie_margin=cfg.data.tie_margin, root=root,
                                          show_progress=show)
            else:
                train, val = _split(train, cfg.data.val_fraction, cfg.train.seed)
        self.train_pairs, self.val_pairs = train, val

        latent_channels = None
        if self.is_latent:
            from diffalign.config import ModelConfig
            from diffalign.models import load_adapter

            mc = ModelConfig(family=cfg.model.family, pretrained=cfg.model.pretrained,
                             timestep_sampling=cfg.model.timestep_sampling,
                             max_sequence_length=1 if cfg.model.pretrained.startswith("world:") else None)
            self.adapter = load_adapter(mc, device=acc.device)
            self.lat_a, self.lat_b = (x.to(acc.device) for x in encode_pair_latents(self.adapter, train))
            self.val_lat_a, self.val_lat_b = (x.to(acc.device) for x in encode_pair_latents(self.adapter, val))
            latent_channels = int(self.lat_a.shape[1])
        model, self.tokenizer, self.spec = build_reward_model(cfg, latent_channels,
                                                             vae=self.adapter.vae if self.is_latent else None)
        _freeze(model, cfg)
        self.reward: TrainedReward = wrap(model, self.tokenizer, self.spec, device=acc.device)
        model.train()
        groups = _param_groups(model, cfg)
        o = cfg.optim
        optimizer = torch.optim.AdamW(groups, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                      **({"fused": True} if acc.device.type == "cuda" else {"foreach": True}))
        from diffusers.optimization import get_scheduler

        warmup = int(round(o.warmup_ratio * cfg.train.max_steps))
        scheduler = get_scheduler(o.lr_scheduler, optimizer=optimizer, num_warmup_steps=warmup * acc.num_processes,
                                  num_training_steps=cfg.train.max_steps * acc.num_processes)
        if self.is_latent:
            dataset, collate = IndexDataset(len(train)), None
        else:
            dataset, collate = FramePairDataset(train, self.spec["frames"]), collate_frame_pairs
        gen = torch.Generator().manual_seed(cfg.train.seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=min(cfg.train.batch_size, len(dataset)), shuffle=True,
                                             drop_last=True, collate_fn=collate, generator=gen,
                                             num_workers=cfg.data.num_workers)
        self.model, self.optimizer, self.loader, self.scheduler = acc.prepare(model, optimizer, loader, scheduler)
        self.noise_gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + acc.process_index)

    # ------------------------------------------------------------------ forward
    def _scores(self, model: nn.Module, batch: Any, *, t_native: torch.Tensor | None = None,
                eps: torch.Tensor | None = None, val: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(r_a [B, D], r_b [B, D], labels, mask) from one forward over the 2B items [A; B]."""
        dev = self.accelerator.device
        if self.is_latent:
            idx = batch.to(dev) if isinstance(batch, torch.Tensor) else torch.as_tensor(batch, device=dev)
            pairs = self.val_pairs if val else self.train_pairs
            la, lb = (self.val_lat_a, self.val_lat_b) if val else (self.lat_a, self.lat_b)
            x0_a, x0_b = la[idx], lb[idx]
            b = len(idx)
            if t_native is None:
                t_native = self.adapter.sample_timesteps(b, self.noise_gen)
            if eps is None:
                eps = torch.randn(x0_a.shape, generator=self.noise_gen)
            eps, t_native = eps.to(dev), t_native.to(dev)
            # the SAME t and noise for A and B: the pair differs only in its images
            x_t = torch.cat([self.adapter.add_noise(x0_a, eps, t_native), self.adapter.add_noise(x0_b, eps, t_native)])
            unit = self.adapter.unit_time(t_native).float().repeat(2)
            prompts = [pairs.prompts[i] for i in idx.tolist()]
            ids, amask = self.reward.tokenize(prompts + prompts)
            out = model(x_t, unit, ids, amask)
            cpu_idx = idx.cpu()
            labels, mask = pairs.labels[cpu_idx].to(dev), pairs.mask[cpu_idx].to(dev)
        else:
            ids, amask = self.reward.tokenize(batch["prompts"])
            out = model(batch["frames"].to(dev), batch["times"].to(dev), batch["frame_mask"].to(dev), ids, amask)
            labels, mask = batch["labels"].to(dev), batch["mask"].to(dev)
        b = out.shape[0] // 2
        return out[:b].float(), out[b:].float(), labels, mask

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def _val_scores(self, **noise: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of every validation pair, two [M, D] on the CPU (unwrapped model, eval mode)."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        bs = self.cfg.train.eval_batch_size
        n = len(self.val_pairs)
        ra, rb = [], []
        try:
            if self.is_latent:
                for s in range(0, n, bs):
                    idx = torch.arange(s, min(s + bs, n))
                    kw = {k: (v[idx] if isinstance(v, torch.Tensor) and v.ndim > 0 and len(v) == n else v)
                          for k, v in noise.items()}
                    a, b, _, _ = self._scores(model, idx, val=True, **kw)
                    ra.append(a.cpu())
                    rb.append(b.cpu())
            else:
                ds = FramePairDataset(self.val_pairs, self.spec["frames"])
                loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=False, collate_fn=collate_frame_pairs,
                                                     num_workers=self.cfg.data.num_workers)
                for batch in loader:
                    a, b, _, _ = self._scores(model, batch)
                    ra.append(a.cpu())
                    rb.append(b.cpu())
        finally:
            model.train(was_training)
        return torch.cat(ra), torch.cat(rb)

    def _metrics(self, ra: torch.Tensor, rb: torch.Tensor) -> dict:
        pairs, dims = self.val_pairs, list(self.cfg.model.dimensions)
        _, m = btt_loss(ra, rb, pairs.labels, pairs.mask, theta=self.cfg.objective.theta, dimensions=dims)
        groups = sorted(set(pairs.groups))
        if len(groups) > 1:
            m["groups"] = {}
            for g in groups:
                idx = [i for i, x in enumerate(pairs.groups) if x == g]
                _, gm = btt_loss(ra[idx], rb[idx], pairs.labels[idx], pairs.mask[idx], theta=self.cfg.objective.theta,
                                 dimensions=dims)
                m["groups"][g] = gm
        return m

    def evaluate(self) -> tuple[dict[str, dict], Normalizer]:
        """{level: metrics} ('clean' for frame models; 't=<level>' for the latent model) and the Normalizer."""
        dims = list(self.cfg.model.dimensions)
        if not self.is_latent:
            ra, rb = self._val_scores()
            norm = Normalizer.fit({d: torch.cat([ra[:, j], rb[:, j]]) for j, d in enumerate(dims)})
            return {"clean": self._metrics(ra, rb)}, norm
        n = len(self.val_pairs)
        gen = torch.Generator().manual_seed(12345)  # the same noise at every level and every evaluation
        eps = torch.randn(self.val_lat_a.shape, generator=gen)
        out = {}
        for level in self.cfg.train.eval_times:
            ra, rb = self._val_scores(t_native=native_time_for_level(self.adapter, float(level), n), eps=eps)
            out[f"t={float(level):g}"] = self._metrics(ra, rb)
        # normaliser over the training noise distribution, because guidance queries every t
        t_mix = self.adapter.sample_timesteps(n, torch.Generator().manual_seed(54321))
        ra, rb = self._val_scores(t_native=t_mix, eps=eps)
        norm = Normalizer.fit({d: torch.cat([ra[:, j], rb[:, j]]) for j, d in enumerate(dims)})
        return out, norm

    # ------------------------------------------------------------------ training
    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        if not hasattr(self, "model"):
            self.setup()
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_file = self.out / "metrics.jsonl"
        if acc.is_main_process and metrics_file.exists():
            metrics_file.unlink()
        bar = tqdm(total=cfg.train.max_steps, desc=f"train-reward {cfg.model.kind}", unit="step",
                   disable=not (self.show_progress and acc.is_local_main_process), dynamic_ncols=True)
        start = time.time()
        step, window, nonfinite = 0, [], 0
        history = []
        data_iter = iter(self.loader)
        self.model.train()
        while step < cfg.train.max_steps:
            try:
                batch = next(data_iter)
            except StopIteration:  # next epoch (the loader reshuffles)
                data_iter = iter(self.loader)
                batch = next(data_iter)
            with acc.autocast():
                ra, rb, labels, mask = self._scores(self.model, batch)
                loss, metrics = btt_loss(ra, rb, labels, mask, theta=cfg.objective.theta,
                                         dimensions=list(cfg.model.dimensions))
            if not torch.isfinite(loss):
                nonfinite += 1
                self.optimizer.zero_grad(set_to_none=True)
                if nonfinite > 10:
                    raise RewardError(f"step {step}: 10+ non-finite BTT losses; lower optim.lr")
                continue
            acc.backward(loss)
            if cfg.optim.max_grad_norm is not None and acc.sync_gradients:
                metrics["grad_norm"] = float(acc.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            window.append(metrics)
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                avg = {k: float(np.nanmean([w[k] for w in window if k in w])) for k in ("loss", "acc", "acc_ties")}
                bar.set_postfix(loss=f"{avg['loss']:.3f}", acc=f"{avg['acc']:.3f}")
                record = {"step": step, **avg, "lr": self.scheduler.get_last_lr()[0], "seconds": time.time() - start}
                history.append(record)
                if acc.is_main_process:
                    with open(metrics_file, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                window = []
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
                ev, _ = self.evaluate()
                if acc.is_main_process:
                    with open(metrics_file, "a") as fh:
                        fh.write(json.dumps({"step": step, "eval": _strip_groups(ev)}) + "\n")
                    bar.write(f"[train-reward] step {step}: " + _eval_line(ev, cfg.model.dimensions))
        bar.close()
        train_seconds = time.time() - start
        acc.wait_for_everyone()
        ev, norm = self.evaluate()
        result = {"config": dataclasses.asdict(cfg), "steps": step, "seconds": train_seconds,
                  "processes": acc.num_processes, "device": str(acc.device), "output_dir": str(self.out),
                  "nonfinite_steps": nonfinite, "eval": ev, "main_process": acc.is_main_process,
                  "data": {"train": _data_summary(self.train_pairs), "val": _data_summary(self.val_pairs)},
                  "final_train_window": history[-1] if history else {}}
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)
            self.reward.normalizer = norm
            spec = dict(self.spec, training={"steps": step, "seconds": train_seconds, "val": _strip_groups(ev),
                                             "train_pairs": len(self.train_pairs), "val_pairs": len(self.val_pairs),
                                             "tie_margin": cfg.data.tie_margin, "data": cfg.data.path,
                                             "val_data": cfg.data.val_path or f"{cfg.data.val_fraction} of data.path"})
            from .trained import save_reward_folder

            save_reward_folder(self.out, model, self.tokenizer, spec, norm)
            (self.out / "eval.json").write_text(json.dumps(ev, indent=2))
            (self.out / "summary.json").write_text(json.dumps({k: v for k, v in result.items() if k != "config"},
                                                              indent=2, default=str))
            import yaml

            (self.out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        acc.wait_for_everyone()
        return result


def _strip_groups(ev: dict) -> dict:
    return {k: {m: v for m, v in e.items() if m != "groups"} for k, e in ev.items()}


def _eval_line(ev: dict, dims: list[str]) -> str:
    parts = []
    for level, e in ev.items():
        parts.append(f"{level}: " + ", ".join(f"{d} {e['acc/' + d]:.3f}" for d in dims))
    return "val acc w/o ties " + "; ".join(parts)


def _data_summary(p: LabelledPairs) -> dict:
    return {"pairs": len(p), "source": p.source, "labels": p.label_counts(),
            "dropped_unlabelled": p.dropped_unlabelled, "groups": {g: p.groups.count(g) for g in sorted(set(p.groups))}}


def train_reward(cfg: RewardRunConfig, show_progress: bool = True) -> dict:
    """Train, validate, save; returns the run summary (see ``train_cli.summary_lines``)."""
    trainer = RewardTrainer(cfg, show_progress=show_progress)
    trainer.setup()
    return trainer.train()
