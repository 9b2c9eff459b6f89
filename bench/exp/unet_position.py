"""Does a world generator follow position words? (BENCHMARKS, "The UNet ignores position words")

python bench/exp/unet_position.py centroids MODEL...   mean object centroid per captioned position, 120 held-out prompts
python bench/exp/unet_position.py leak MODEL           UNet: sample from pure noise vs from noise carrying the training
                                                       leak sqrt(alpha_bar_T) z0 of the true render (64 corner prompts)
python bench/exp/unet_position.py swap MODEL...        denoising loss on 96 renders with the true caption vs the same
                                                       caption with the opposite corner / another background / empty
MODEL: world:unet, world:flow or a pipeline folder (a name containing "flow" is read as the SD3-style family).
"""
import dataclasses
import sys

import numpy as np
import torch

from diffalign.cli import _quiet_libraries
from diffalign.config import ModelConfig
from diffalign.models import load_adapter
from diffalign.world import oracle
from diffalign.world.pairs import generate
from diffalign.world.render import anchor, render_batch
from diffalign.world.scenes import BACKGROUNDS, POSITIONS, prompt_splits

_quiet_libraries()
OPPOSITE = {"top left": "bottom right", "bottom right": "top left", "top right": "bottom left", "bottom left": "top right"}


def adapter_of(model: str):
    return load_adapter(ModelConfig(family="sd3" if "flow" in model else "sd15", pretrained=model, max_sequence_length=1))


def position_error(images: np.ndarray, scenes) -> np.ndarray:
    anchors = np.array([anchor(s.size, s.position) for s in scenes])
    return np.linalg.norm(oracle.measure(images).centroid - anchors, axis=1)


def centroids(models: list[str]) -> None:
    held = prompt_splits(0)[1][:120]
    caps = [s.caption() for s in held]
    for model in models:
        images = generate(adapter_of(model).pipe, caps, [10_000 + 2 * i for i in range(len(caps))], steps=15)
        c, err = oracle.measure(images).centroid, position_error(images, held)
        print(model, {k: round(float(v.mean()), 3) for k, v in oracle.score(images, caps).items()},
              f"at the captioned position (error < 0.13): {(err < 0.13).mean():.2f}")
        for p in POSITIONS:
            sel = np.array([s.position == p for s in held])
            print(f"  {p:13s} mean centroid (x, y) {c[sel].mean(0).round(2)}  anchor {np.array(anchor('small', p))}")


def leak(model: str) -> None:
    held = [s for s in prompt_splits(0)[1] if s.position != "center"][:64]
    pipe = adapter_of(model).pipe
    pipe.set_progress_bar_config(disable=True)
    x = torch.from_numpy(render_batch(held, 32)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    ab = pipe.scheduler.alphas_cumprod[-1]
    print(f"{model}: sqrt(alpha_bar_T) = {ab.sqrt().item():.4f}")
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    for name, w in [("pure noise", 0.0), ("noise + the training leak", 1.0)]:
        out = pipe(prompt=[s.caption() for s in held], num_inference_steps=15, guidance_scale=3.0, output_type="np",
                   latents=w * ab.sqrt() * z0 + (1 - w * ab).sqrt() * eps).images
        err = position_error((np.clip(out, 0, 1) * 255).round().astype(np.uint8), held)
        print(f"  from {name}: at the captioned position {(err < 0.13).mean():.2f}, median error {np.median(err):.3f}")


def swap(models: list[str]) -> None:
    scenes = [s for s in prompt_splits(0)[0] if s.position != "center"][:96]
    variants = {"true caption": scenes,
                "opposite corner": [dataclasses.replace(s, position=OPPOSITE[s.position]) for s in scenes],
                "other background": [dataclasses.replace(s, background=next(b for b in BACKGROUNDS if b != s.background))
                                     for s in scenes]}
    x = torch.from_numpy(render_batch(scenes, 32)).permute(0, 3, 1, 2).float() / 127.5 - 1
    for model in models:
        ad = adapter_of(model)
        times = (0.1, 0.4, 0.7, 0.9, 0.99) if "flow" in model else (100, 400, 700, 900, 990)
        with torch.no_grad():
            z = ad.encode_images(x)
            print(model, "loss at t:", " | ".join(variants) + " | empty caption")
            for t in times:
                eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(int(t * 1000)))
                tt = torch.full((len(scenes),), t)
                xt = ad.add_noise(z, eps, tt)
                def loss(caps):
                    return (ad.predict(ad.denoiser, xt, tt, ad.prompt_embeddings(caps)) - ad.target(z, eps, tt)).pow(2).mean().item()
                row = [loss([s.caption() for s in v]) for v in variants.values()] + [loss([""] * len(scenes))]
                print(f"  t={t}: " + " | ".join(f"{r:.4f}" for r in row))


if __name__ == "__main__":
    what, models = sys.argv[1], sys.argv[2:]
    {"centroids": lambda: centroids(models), "leak": lambda: leak(models[0]), "swap": lambda: swap(models)}[what]()
