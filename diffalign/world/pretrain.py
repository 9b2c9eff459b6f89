"""`diffalign world pretrain`: train the embedded world's tiny generators from scratch.

Stage 1 trains the small VAE to reconstruct world renders and sets its scaling factor to 1/std of
the latents. Stage 2 trains the denoiser and the text encoder(s) jointly with the ordinary denoising
(eps) or flow-matching (velocity) loss, through the same family adapter the DPO loop uses. A fraction
of captions is deliberately replaced by another scene's caption, so that the generator is decent but
imperfect and alignment has room to show. Everything is seeded: the same config gives the same weights
on the same hardware and library versions.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

KIND_FAMILY = {"unet": "sd15", "flow": "sd3", "video": "wan"}


@dataclass
class PretrainConfig:
    kind: str = "unet"              # unet (eps UNet, Diffusion-DPO path) | flow (SD3-style transformer, Flow-DPO path)
                                    # | video (Wan-style text-to-video on the video world's 16x16, 9-frame clips)
    steps: int = 3000               # denoiser steps
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 100
    vae_steps: int = 600
    vae_lr: float = 1e-3
    pool: int = 8192                # jittered renders encoded once, then sampled each step
    jitter: float = 0.06            # centre/scale jitter of renders (fraction of image size)
    wrong_caption_fraction: float = 0.25  # imperfection on purpose: captions swapped for another scene's
    prompt_dropout: float = 0.1     # CFG support
    seed: int = 0
    device: str = "auto"
    lr_schedule: str = "constant"   # constant | cosine (to 0 after warmup)
    init_from: str = ""             # continue from a world pipeline folder (its VAE is kept, not retrained)
    # unet only (BENCHMARKS, "The UNet ignores position words"): its DDPM betas, scaled_linear (SD1.5's, the bundled
    # model's) | linear (terminal signal 0.0066 instead of 0.068; see generators.world_ddpm_scheduler); the eps loss
    # weighted by min(1/alpha_bar_t, high_noise_weight) (1 = plain; FamilyAdapter.velocity_error_scale); levels 2 | 3 (down to 4x4)
    noise_schedule: str = "scaled_linear"
    high_noise_weight: float = 1.0
    unet_levels: int = 2


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [-1, 1]; clips uint8 [N,F,H,W,3] -> float [N,3,F,H,W]."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(0, 4, 1, 2, 3)
    return x.float().div(127.5).sub(1.0)


def _world_renders(kind: str, n: int, scene_seed: int, render_seed: int, jitter: float,
                   split_seed: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """``n`` jittered renders of ``kind``'s world with their captions: pixels in [-1, 1], images
    [N, 3, 32, 32] (unet, flow) or clips [N, 3, 9, 16, 16] (video); scenes drawn from the training
    split of ``split_seed``'s prompt split, or from every scene when it is None."""
    if kind == "video":
        from diffalign.world.generators import VIDEO_GEN_FRAMES
        from diffalign.world.video import (VIDEO_SIZE, all_video_scenes, render_clips, sample_video_scenes,
                                           video_prompt_splits)

        pool = all_video_scenes() if split_seed is None else video_prompt_splits(split_seed)[0]
        scenes = sample_video_scenes(n, seed=scene_seed, pool=pool)
        clips = render_clips(scenes, VIDEO_SIZE, VIDEO_GEN_FRAMES, jitter=jitter, seed=render_seed)
        return _to_pixels(clips), [s.caption() for s in scenes]
    from diffalign.world.render import render_batch
    from diffalign.world.scenes import all_scenes, prompt_splits, sample_scenes

    scenes = sample_scenes(n, seed=scene_seed, pool=all_scenes() if split_seed is None else prompt_splits(split_seed)[0])
    return _to_pixels(render_batch(scenes, jitter=jitter, seed=render_seed)), [s.caption() for s in scenes]


def train_vae(vae, cfg: PretrainConfig, device: torch.device, show_progress: bool = True) -> dict[str, float]:
    """Train ``vae`` to reconstruct world renders; then normalise its latents to unit std.

    AutoencoderKL (unet, flow): ``scaling_factor`` = 1/std of all latents. AutoencoderKLWan (video):
    per-channel ``latents_mean`` / ``latents_std``, which is how WanPipeline normalises.
    """
    pixels = _world_renders(cfg.kind, 2048, cfg.seed + 11, cfg.seed + 12, cfg.jitter)[0].to(device)
    vae.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 13)
    bar = tqdm(range(cfg.vae_steps), desc="world vae", disable=not show_progress)
    for _ in bar:
        idx = torch.randint(0, len(pixels), (cfg.batch_size,), generator=gen)
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        rec_loss = (recon - x).pow(2).mean()
        loss = rec_loss + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(mse=f"{rec_loss.item():.4f}", refresh=False)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mode() for i in range(0, len(pixels), 256)])
        recon = torch.cat([vae.decode(latents[i:i + 256]).sample for i in range(0, len(latents), 256)])
    scaling = float(1.0 / latents.std())
    stats = {"vae_mse": float((recon - pixels).pow(2).mean()), "scaling_factor": scaling}
    from diffusers import AutoencoderKLWan

    if isinstance(vae, AutoencoderKLWan):  # [N, C, F, h, w] latents, normalised per channel
        per_channel = latents.transpose(0, 1).reshape(latents.shape[1], -1)
        stats["latents_mean"] = [float(v) for v in per_channel.mean(dim=1)]
        stats["latents_std"] = [float(v) for v in per_channel.std(dim=1)]
        vae.register_to_config(latents_mean=stats["latents_mean"], latents_std=stats["latents_std"])
    else:
        vae.register_to_config(scaling_factor=scaling)
    return stats


def pretrain(cfg: PretrainConfig, out_dir: str | Path, show_progress: bool = True) -> dict:
    """Train a world generator of ``cfg.kind`` and save it as a diffusers pipeline folder in ``out_dir``."""
    from diffalign.config import ModelConfig
    from diffalign.models import ADAPTERS
    from diffalign.world.generators import (NOISE_SCHEDULES, UNET_LEVELS, VIDEO_TEXT_LEN, build_world_pipeline,
                                             build_world_vae, build_world_video_vae, world_ddpm_scheduler)

    if cfg.kind not in KIND_FAMILY:
        raise ValueError(f"unknown kind {cfg.kind!r}: use one of {tuple(KIND_FAMILY)}")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if cfg.noise_schedule not in NOISE_SCHEDULES:
        raise ValueError(f"unknown noise_schedule {cfg.noise_schedule!r}: use one of {NOISE_SCHEDULES}")
    if cfg.unet_levels not in UNET_LEVELS:
        raise ValueError(f"unet_levels={cfg.unet_levels}: use one of {UNET_LEVELS}")
    if cfg.high_noise_weight < 1 or (cfg.high_noise_weight != 1 and cfg.kind != "unet"):
        raise ValueError(f"high_noise_weight={cfg.high_noise_weight}: must be >= 1, and only the eps UNet (kind unet) "
                         "has one (1 = the plain eps loss)")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}: constant or cosine")
    torch.manual_seed(cfg.seed)
    start = time.time()
    family = KIND_FAMILY[cfg.kind]
    # Text length the denoiser is trained with (and must be sampled with): the SD3-style world model
    # has no T5, so 1; Wan pads its UMT5 states with zeros up to this length.
    max_seq = VIDEO_TEXT_LEN if cfg.kind == "video" else 1
    previous = None
    if cfg.init_from:
        from diffalign.models import load_pipeline, resolve_pretrained

        pipe = load_pipeline(ModelConfig(family=family, pretrained=cfg.init_from, max_sequence_length=1))
        vae = pipe.vae
        if cfg.kind == "unet":  # the continued stage trains (and ships) the schedule it names
            pipe.scheduler = world_ddpm_scheduler(cfg.noise_schedule)
        prev_record = Path(resolve_pretrained(cfg.init_from)) / "pretrain.json"
        previous = json.loads(prev_record.read_text()) if prev_record.is_file() else None
        vae_stats = previous["vae"] if previous else {"vae_mse": float("nan"), "scaling_factor": vae.config.scaling_factor}
    else:
        vae = build_world_video_vae(cfg.seed) if cfg.kind == "video" else build_world_vae(cfg.seed)
        vae_stats = train_vae(vae, cfg, device, show_progress)
        pipe = build_world_pipeline(cfg.kind, vae, cfg.seed, cfg.noise_schedule, cfg.unet_levels)
    adapter = ADAPTERS[family](pipe, ModelConfig(family=family, pretrained="(pretraining)", max_sequence_length=max_seq,
                                                 timestep_sampling="logit_normal"), device=device)
    trainable_modules = [adapter.denoiser] + [m for name in ("text_encoder", "text_encoder_2")
                                             if (m := getattr(pipe, name, None)) is not None]
    params = []
    for m in trainable_modules:
        m.train().requires_grad_(True)
        params += list(m.parameters())

    pixels, captions = _world_renders(cfg.kind, cfg.pool, cfg.seed + 21, cfg.seed + 22, cfg.jitter,
                                       split_seed=cfg.seed)
    with torch.no_grad():
        latents = torch.cat([adapter.encode_images(pixels[i:i + 256]) for i in range(0, len(pixels), 256)]).cpu()
    rng = np.random.default_rng(cfg.seed + 23)
    wrong = rng.random(len(captions)) < cfg.wrong_caption_fraction
    shuffled = rng.permutation(len(captions))
    captions = [captions[shuffled[i]] if wrong[i] else c for i, c in enumerate(captions)]

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    def lr_factor(s: int) -> float:
        warm = min(1.0, (s + 1) / max(cfg.warmup, 1))
        if cfg.lr_schedule == "constant" or s < cfg.warmup:
            return warm
        return 0.5 * (1.0 + math.cos(math.pi * (s - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(cfg.seed + 24)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=f"world pretrain {cfg.kind}", disable=not show_progress)
    for _ in bar:
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen)
        x0 = latents[idx].to(device)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.prompt_dropout
        batch_captions = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        t = adapter.sample_timesteps(cfg.batch_size, gen).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        text = adapter.prompt_embeddings(batch_captions)
        pred = adapter.predict(adapter.denoiser, adapter.add_noise(x0, eps, t), t, text)
        per_sample = (pred.float() - adapter.target(x0, eps, t).float()).pow(2).flatten(1).mean(1)
        if cfg.high_noise_weight != 1:
            # min(1/alpha_bar_t, cap): v-prediction's weighting of the same error, capped (its variance near t = T).
            # Position is decided at high noise, where the plain eps loss barely notices a wrong image.
            per_sample = per_sample * adapter.velocity_error_scale(t).to(device).clamp(max=cfg.high_noise_weight)
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
    for m in trainable_modules:
        m.eval().requires_grad_(False)

    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir)
    record = {"config": asdict(cfg), "family": family, "vae": vae_stats,
              "final_loss_mean_last_100": float(np.mean(losses[-100:])), "seconds": time.time() - start,
              "device": str(device), "torch": torch.__version__}
    if previous is not None:  # a continuation: keep the whole chain, so the card says how the weights were made
        record["continued_from"] = previous
        record["total_denoiser_steps"] = previous.get("total_denoiser_steps", previous["config"]["steps"]) + cfg.steps
    (out_dir / "pretrain.json").write_text(json.dumps(record, indent=2))
    write_model_card(out_dir, record)
    return record


def _vae_steps(record: dict) -> str:
    """The VAE's training steps: a continued run keeps the VAE of its first stage."""
    while record.get("continued_from") is not None:
        record = record["continued_from"]
    return str(record["config"]["vae_steps"])


def _continuation_note(record: dict) -> str:
    """Card lines for a continued run: the earlier stage(s), oldest first, so the chain is reproducible."""
    stages, prev = [], record.get("continued_from")
    while prev is not None:
        c = prev["config"]
        stages.append(f"`{_command(c)}` ({c['steps']} denoiser steps, VAE {c['vae_steps']} steps)")
        prev = prev.get("continued_from")
    if not stages:
        return ""
    return ("\n- This run CONTINUED an earlier model (`--init-from`, VAE kept); earlier stages, oldest first: "
            + "; ".join(reversed(stages)) + f". Denoiser steps in total: {record['total_denoiser_steps']}.")


def _command(cfg: dict) -> str:
    """The `diffalign world pretrain` command line of a recorded config (flags that differ from the defaults)."""
    defaults = asdict(PretrainConfig())
    cfg = dict(cfg)
    if cfg["kind"] != "unet":  # only the UNet has them
        for key in ("noise_schedule", "high_noise_weight", "unet_levels"):
            cfg.pop(key, None)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in cfg.items()
                     if k not in ("device", "kind") and v != defaults.get(k))
    return f"diffalign world pretrain --kind {cfg['kind']} {flags} --out <folder>"


def write_model_card(out_dir: str | Path, record: dict) -> None:
    """README.md beside the weights: what the model is and the exact command that reproduces it."""
    cfg = record["config"]
    if cfg["kind"] == "video":
        what = ("A tiny text-to-video WanPipeline for diffalign's embedded video world (16x16 RGB clips of 9 frames,\n"
                "diffalign.world.video): a WanTransformer3DModel trained with rectified flow (velocity target), a small\n"
                "AutoencoderKLWan (2x spatial, 2x temporal, 4 latent channels, per-channel latents_mean/std) and a CLIP\n"
                "BPE tokenizer whose merges spell every caption word as one token, with a tiny UMT5 encoder trained\n"
                "jointly. Sample it with num_frames=9, height=width=16 and max_sequence_length=16 (the text length it\n"
                "was trained with).")
    else:
        schedule = cfg.get("noise_schedule", "scaled_linear")  # records from before the option: SD1.5's
        denoiser = (f"an eps-prediction UNet2DConditionModel (DDPM, {schedule} betas; see\n"
                    f"diffalign.world.generators.world_ddpm_scheduler), the Diffusion-DPO path"
                    if cfg["kind"] == "unet" else
                    "an SD3Transformer2DModel trained with rectified flow (velocity target), the Flow-DPO path")
        what = (f"A tiny text-to-image diffusers pipeline for diffalign's embedded procedural world (32x32 RGB scenes):\n"
                f"{denoiser}, a small AutoencoderKL (f=2, 4 latent channels) and a CLIP BPE tokenizer whose merges spell\n"
                f"every world word as one token, with a tiny CLIP text encoder trained jointly.")
    if cfg["kind"] == "video":  # WanPipeline normalises per channel
        latent_note = "latents normalised per channel (latents_mean / latents_std in the VAE config)"
        load_note = "`model.family=wan model.pretrained=world:video` in diffalign (the bundled copy; or the folder)"
    else:
        latent_note = f"scaling factor {record['vae']['scaling_factor']:.4f} = 1/std of the latents"
        load_note = f"`model.pretrained=world:{cfg['kind']}` in diffalign"
    text = f"""# diffalign world generator: {cfg['kind']}

{what}

It is decent but imperfect on purpose: {cfg['wrong_caption_fraction']:.0%} of training captions were replaced by another
scene's caption, so preference alignment has room to show.

## How it was made

    {_command(cfg)}

- VAE: {_vae_steps(record)} steps (reconstruction MSE {record['vae']['vae_mse']:.4f}); {latent_note}.
- Denoiser + text encoder(s): {cfg['steps']} steps, batch {cfg['batch_size']}, lr {cfg['lr']}, prompt dropout {cfg['prompt_dropout']},
  on a pool of {cfg['pool']} jittered renders of training-split scenes (held-out scenes never seen).
- Final training loss (mean of the last 100 steps): {record['final_loss_mean_last_100']:.4f}.{_continuation_note(record)}
- Ran on {record['device']} in {record['seconds'] / 60:.1f} minutes with torch {record['torch']}; seeded, so the same
  command, config and library versions reproduce it.

Load it like any diffusers folder: {load_note}, or
`DiffusionPipeline.from_pretrained(<folder>)`.
"""
    (Path(out_dir) / "README.md").write_text(text)
