#!/usr/bin/env python
"""Sampling cost of inference-time alignment: seconds per image for CFG, CFG+RLG and CFG+NRG, and the
ratios to CFG.

All three variants sample the SAME prompts, seeds, steps and resolution with the same loaded model:

``cfg``      the aligned model (LoRA on) with classifier-free guidance: 2 network rows per sample per step
``cfg+rlg``  RLG: base (LoRA off) and aligned (LoRA on), each with CFG: 4 rows per sample per step
``cfg+nrg``  CFG plus noisy reward guidance: one reward forward + backward on x_t per step

Defaults need nothing on disk: ``tiny:sd3`` (a random tiny SD3 pipeline built offline), a random LoRA (rank 4,
nonzero B so it is not a no-op) and a small random noise-aware latent reward (a conv net on x_t with a time
embedding, ``SimpleLatentReward``). Pass ``--model``, ``--lora`` and ``--nrg-reward`` (a train-reward folder or
reward spec) to measure real ones. RLG runs twice the network rows, so about 2x is expected; NRG adds one reward
forward + backward per step, so its ratio is 1 + (reward cost / denoiser cost) and depends on the reward. On
tiny models fixed per-step overheads (text encoding, scheduler, Python) weigh more than on real ones. Each
variant runs ``--repeats`` times in alternating order after one warm-up batch; the median is reported (CPU
timings are only meaningful on an otherwise idle machine). The last line is ``BENCH_JSON {...}``.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/sampling_cost.py
    python bench/sampling_cost.py --model world:flow --lora runs/demo-flow/lora --nrg-reward runs/latent-reward
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn


class SimpleLatentReward:
    """A random noise-aware latent reward (default for the bench): r(x_t, t) = head(pool(conv(x_t)) + emb(t)).

    Built lazily as a diffalign Reward (input kind 'latent', differentiable, one dimension 'score')."""

    @staticmethod
    def build(latent_channels: int, width: int = 32):
        from diffalign.rewards import Reward

        class _Reward(Reward):
            name, dimensions, input_kind, differentiable = "simple_latent", ("score",), "latent", True

            def __init__(self):
                torch.manual_seed(0)
                self.net = nn.Sequential(nn.Conv2d(latent_channels, width, 3, padding=1), nn.SiLU(),
                                         nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
                                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
                self.time = nn.Linear(1, width)
                self.head = nn.Linear(width, 1)

            def score(self, inputs, prompts=None, *, fps=None, t=None):
                x = inputs if inputs.ndim == 4 else inputs.flatten(1, 2)  # video: channels x frames as channels
                h = self.net(x.float()) + self.time(t.float().view(-1, 1).to(x.device))
                return {"score": self.head(torch.tanh(h)).squeeze(-1)}

        return _Reward()


def random_lora(model: str, family: str | None, out: str, rank: int = 4) -> str:
    """Attach a rank-``rank`` LoRA with random nonzero B to ``model``'s denoiser and save it (diffusers format)."""
    from diffalign.config import LoraConfig, ModelConfig
    from diffalign.models import load_adapter
    from diffalign.samplers.api import infer_family

    adapter = load_adapter(ModelConfig(family=family or infer_family(model), pretrained=model, max_sequence_length=16))
    adapter.add_lora(LoraConfig(rank=rank))
    gen = torch.Generator().manual_seed(0)
    for name, p in adapter.denoiser.named_parameters():
        if "lora_B" in name:
            p.data = 0.1 * torch.randn(p.shape, generator=gen)
    adapter.save_lora(adapter.denoiser, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default="tiny:sd3", help="pipeline folder, hub id, tiny:<family> or world:unet|flow")
    p.add_argument("--family", default=None, help="sd15 | sdxl | sd3 | flux (default: inferred)")
    p.add_argument("--lora", default=None, help="LoRA folder (default: a random rank-4 LoRA on --model)")
    p.add_argument("--nrg-reward", default=None, help="latent reward folder/spec (default: SimpleLatentReward)")
    p.add_argument("--rlg", type=float, default=1.5, help="RLG scale for the cfg+rlg variant")
    p.add_argument("--nrg-scale", type=float, default=1.0, help="NRG scale for the cfg+nrg variant")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--num-images", type=int, default=8, help="images per timed run (one batch)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--max-sequence-length", type=int, default=16)
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffalign.cli import _quiet_libraries

    _quiet_libraries()
    from diffalign.samplers import SampleConfig, Sampler

    workdir = tempfile.mkdtemp(prefix="sampling-cost-")
    lora = args.lora or random_lora(args.model, args.family, os.path.join(workdir, "lora"))
    prompts = [f"a small red circle number {i}" for i in range(args.num_images)]
    common = dict(model=args.model, family=args.family, lora=lora, prompts=prompts, steps=args.steps,
                  guidance_scale=args.guidance_scale, batch_size=args.num_images, height=args.height,
                  width=args.width, device=args.device, progress=False, max_sequence_length=args.max_sequence_length)
    cfg_sampler = Sampler(SampleConfig(**common))
    adapter = cfg_sampler.adapter  # one loaded model (and LoRA) serves every variant
    reward = None
    if args.nrg_reward is None:
        reward = SimpleLatentReward.build(adapter.latent_shape(*adapter.default_resolution())[0]).to(adapter.device)
    samplers = {
        "cfg": cfg_sampler,
        "cfg+rlg": Sampler(SampleConfig(**common, rlg=args.rlg), adapter=adapter),
        "cfg+nrg": Sampler(SampleConfig(**common, nrg_reward=args.nrg_reward, nrg_scale=args.nrg_scale),
                           adapter=adapter, nrg_reward=reward),
    }
    for s in samplers.values():  # warm-up: first-call allocations, lazy imports
        s.sample(prompts=prompts[:1], seeds=[0])
    times: dict[str, list[float]] = {k: [] for k in samplers}
    order = list(samplers)
    for r in range(args.repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            samplers[name].sample()
            times[name].append((time.perf_counter() - start) / args.num_images)
    per_image = {k: statistics.median(v) for k, v in times.items()}
    c = cfg_sampler.config
    print(f"model {c.model} ({c.family}, {adapter.prediction_type}), LoRA {'random rank 4' if args.lora is None else lora}, "
          f"NRG reward {'SimpleLatentReward (random)' if args.nrg_reward is None else args.nrg_reward}")
    print(f"{c.steps} steps, {c.height}x{c.width}, {args.num_images} images per run, median of {args.repeats}, "
          f"device {cfg_sampler.device}, torch threads {torch.get_num_threads()}")
    print(f"{'variant':10s} {'s/image':>9s} {'ratio to CFG':>13s}   guidance")
    for name, s in samplers.items():
        print(f"{name:10s} {per_image[name]:9.4f} {per_image[name] / per_image['cfg']:13.2f}   {s.guidance.describe()}")
    print("BENCH_JSON " + json.dumps({"model": c.model, "family": c.family, "steps": c.steps, "height": c.height,
                                      "width": c.width, "num_images": args.num_images, "device": str(cfg_sampler.device),
                                      "seconds_per_image": per_image,
                                      "ratio_to_cfg": {k: v / per_image["cfg"] for k, v in per_image.items()},
                                      "runs": times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
