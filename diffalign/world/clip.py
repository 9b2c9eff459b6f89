"""A tiny CLIP for the embedded world, so world reward models start from a pretrained CLIP as real ones do.

Real multi-dimensional rewards never learn to see from preference pairs alone: VideoReward fine-tunes a
pretrained VLM, PickScore/HPS a pretrained CLIP. The world's counterpart is this model: a
``transformers.CLIPModel`` (tiny ViT, patch 4 on 32x32 renders; text tower initialised from the bundled
flow generator's CLIP text encoder and its word-level tokenizer) trained contrastively on renders of the
world's TRAINING captions only (held-out captions, including the three unseen colour-shape combinations,
are never positives). Besides the usual in-batch negatives, every image also gets one HARD negative
caption per attribute (the caption with that attribute changed), so the towers must encode shape, size
and position, not just colour and background. Measured without it: a ViT trained from scratch on
pairwise BTT labels learned colour and background within a few hundred steps but stayed at chance on
shape and layout for 900+ steps.

``python -m diffalign.world.clip --out diffalign/world/bundled/clip`` rebuilds the bundled folder
(``pretrain.json`` records the settings and held-out attribute accuracies); load it with
``model.pretrained=world:clip`` in a train-reward recipe or ``CLIPModel.from_pretrained(folder)``.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BUNDLED_CLIP = Path(__file__).parent / "bundled" / "clip"
ATTRIBUTES = ("shape", "color", "size", "position", "background")


@dataclass
class WorldClipConfig:
    steps: int = 800
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 50
    hidden: int = 64            # vision width (the text tower keeps the generator's width)
    vision_layers: int = 3
    heads: int = 4
    patch_size: int = 4
    max_text_length: int = 20
    text_init: str = "world:flow"  # text tower + tokenizer from this bundled generator
    jitter: float = 0.04
    noise_std: float = 12.0
    negative_image_attributes: tuple = ("shape", "color")
    seed: int = 0


def bundled_clip() -> Path:
    if not (BUNDLED_CLIP / "config.json").is_file():
        raise FileNotFoundError(f"no bundled world CLIP at {BUNDLED_CLIP}: build it with "
                                f"`python -m diffalign.world.clip --out {BUNDLED_CLIP}`")
    return BUNDLED_CLIP


def hard_negative_captions(scenes: list, rng: np.random.Generator) -> list[list[str]]:
    """For each scene, one caption per attribute with that attribute changed to a random other value."""
    from diffalign.world.pairs import _change

    return [[_change(s, [f], rng).caption() for f in ATTRIBUTES] for s in scenes]


def _build(cfg: WorldClipConfig):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPTextModelWithProjection

    from diffalign.models import resolve_pretrained

    source = Path(resolve_pretrained(cfg.text_init))
    tokenizer = CLIPTokenizer.from_pretrained(str(source / "tokenizer"), model_max_length=cfg.max_text_length)
    text = CLIPTextModelWithProjection.from_pretrained(str(source / "text_encoder"))
    tc = text.config
    torch.manual_seed(cfg.seed)
    clip = CLIPModel(CLIPConfig(
        text_config=tc.to_dict(), projection_dim=tc.projection_dim,
        vision_config=dict(image_size=32, patch_size=cfg.patch_size, hidden_size=cfg.hidden,
                           intermediate_size=4 * cfg.hidden, num_hidden_layers=cfg.vision_layers,
                           num_attention_heads=cfg.heads, projection_dim=tc.projection_dim)))
    clip.text_model.load_state_dict(text.text_model.state_dict())
    clip.text_projection.load_state_dict(text.text_projection.state_dict())
    return clip, tokenizer


def _pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> [N, 3, H, W] normalised with mean = std = 0.5 (i.e. to [-1, 1])."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def attribute_accuracy(clip, tokenizer, scenes: list, seed: int = 0) -> dict[str, float]:
    """Per attribute: how often the true caption beats the caption with that attribute changed."""
    from diffalign.world.pairs import render_scenes_noisy

    rng = np.random.default_rng(seed)
    images = _pixels(render_scenes_noisy(scenes, rng))
    negs = hard_negative_captions(scenes, rng)
    img = F.normalize(_features(clip.get_image_features(pixel_values=images)), dim=-1)

    def embed(caps: list[str]) -> torch.Tensor:
        enc = tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        return F.normalize(_features(clip.get_text_features(**enc)), dim=-1)

    pos = (img * embed([s.caption() for s in scenes])).sum(-1)
    out = {}
    for j, f in enumerate(ATTRIBUTES):
        neg = (img * embed([n[j] for n in negs])).sum(-1)
        out[f] = float((pos > neg).float().mean())
    return out


def _features(out) -> torch.Tensor:
    # transformers 5 returns model outputs from get_*_features; older versions return the tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def pretrain_world_clip(cfg: WorldClipConfig, out_dir: str | Path, show_progress: bool = True) -> dict:
    """Train the world CLIP (see the module docstring) and save it with save_pretrained; returns the record."""
    from tqdm.auto import tqdm

    from diffalign.world.pairs import _change, render_scenes_noisy
    from diffalign.world.scenes import prompt_splits

    train, heldout = prompt_splits(0)
    clip, tok = _build(cfg)
    clip.train()
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)))
    rng = np.random.default_rng(cfg.seed)
    start = time.time()
    history = []
    bar = tqdm(range(cfg.steps), desc="world clip", disable=not show_progress)
    for step in bar:
        scenes = [train[int(i)] for i in rng.integers(0, len(train), cfg.batch_size)]
        images = _pixels(render_scenes_noisy(scenes, rng, jitter=cfg.jitter, noise_std=cfg.noise_std))
        negs = hard_negative_captions(scenes, rng)
        caps = [s.caption() for s in scenes] + [c for n in negs for c in n]
        # hard negative IMAGES: each scene with its shape or its colour changed. They include the colour-shape
        # combinations held out of training (never as a positive, never with their own caption), so the
        # vision tower learns shape apart from colour instead of guessing shape from colour.
        neg_scenes = [_change(s, [f], rng) for f in cfg.negative_image_attributes for s in scenes]
        images = torch.cat([images, _pixels(render_scenes_noisy(neg_scenes, rng, jitter=cfg.jitter,
                                                                noise_std=cfg.noise_std))])
        enc = tok(caps, padding="max_length", max_length=cfg.max_text_length, truncation=True, return_tensors="pt")
        img = F.normalize(_features(clip.get_image_features(pixel_values=images)), dim=-1)
        txt = F.normalize(_features(clip.get_text_features(**enc)), dim=-1)
        b = len(scenes)
        logits = clip.logit_scale.exp().clamp(max=100) * img @ txt.T            # [B + kB images, B + 5B captions]
        target = torch.arange(b)
        # image -> text: each true image against all captions (hard negative captions included);
        # text -> image: each caption against all images (hard negative images included)
        loss = 0.5 * (F.cross_entropy(logits[:b], target) + F.cross_entropy(logits[:, :b].T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            history.append({"step": step, "loss": float(loss)})
    clip.eval()
    record = {"config": asdict(cfg), "seconds": time.time() - start, "history": history,
              "heldout_attribute_accuracy": attribute_accuracy(clip, tok, heldout),
              "train_attribute_accuracy": attribute_accuracy(clip, tok, train[::3])}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                                                               "size": 32}, indent=2))
    (out / "pretrain.json").write_text(json.dumps(record, indent=2))
    (out / "README.md").write_text(
        "# world CLIP\n\nA tiny CLIP for the embedded world, pretrained contrastively (with one hard-negative caption "
        "per attribute) on renders of the TRAINING captions only. Built by `python -m diffalign.world.clip`; "
        "settings and held-out attribute accuracies in pretrain.json. Starting point of the world reward recipes "
        "(`model.pretrained=world:clip`).\n")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="pretrain the embedded world's tiny CLIP")
    p.add_argument("--out", default=str(BUNDLED_CLIP))
    for f, v in asdict(WorldClipConfig()).items():
        if isinstance(v, tuple):
            p.add_argument(f"--{f.replace('_', '-')}", nargs="*", default=list(v))
        else:
            p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    args = p.parse_args(argv)
    cfg = WorldClipConfig(**{f: tuple(getattr(args, f)) if isinstance(v, tuple) else getattr(args, f)
                             for f, v in asdict(WorldClipConfig()).items()})
    torch.set_num_threads(max(1, torch.get_num_threads()))
    record = pretrain_world_clip(cfg, args.out)
    print(json.dumps({k: record[k] for k in ("seconds", "heldout_attribute_accuracy", "train_attribute_accuracy")},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
