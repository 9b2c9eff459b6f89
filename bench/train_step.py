#!/usr/bin/env python
"""Train-step throughput: diffalign's cached single-forward DPO step vs a reference-script step.

Both variants train the SAME model (same pipeline folder or the same seeded random weights), with
the SAME LoRA (peft, same rank/alpha/targets), optimizer, LR schedule, gradient clipping, batch of
pairs, data order, timesteps and noise per step. Only where the work happens differs:

``diffalign``
    The Trainer's own step (``Trainer.compute_loss``): winner/loser latents and text embeddings are
    read from a latent cache built once with ``build_cache`` (built before timing; its one-off cost
    is printed separately). One reference forward over [winners; losers] (2B rows, no grad) with the
    LoRA adapters disabled on the policy network, one policy forward over the same 2B rows.

``baseline``
    The step as the Diffusion-DPO reference scripts run it: every step decodes the JPEG pairs
    (``PreferencePairDataset`` + ``collate_pairs``), runs the VAE encoder on winners and losers and
    the text encoder(s) on the captions, one policy forward over the concatenated 2B rows, then a
    separate reference pass over the same rows. ``--baseline-ref copy`` (default) keeps a frozen
    deep copy of the base UNet as ``ref_unet`` (the original DiffusionDPO training script);
    ``--baseline-ref adapters-off`` disables the LoRA on the policy UNet as diffusers'
    ``train_diffusion_dpo*.py`` LoRA scripts do. The loss is ``diffalign.objectives.dpo.dpo_loss``.

Inputs and random draws are identical (the baseline uses the VAE posterior mean like the cache, and
no random flip, the diffusers scripts' default), so at step 0 both variants compute the same policy
and reference errors; the bench prints their largest relative difference as a like-for-like check.
Later steps drift apart: beta = 5000 and Adam's sign-like first updates amplify float rounding.

Measurement: wall time (``time.perf_counter``) of ``--steps`` optimizer steps after ``--warmup``
steps, each step = next batch from the loader -> loss -> backward -> clip -> optimizer/LR step.
pairs/s = steps * batch / seconds. Each variant runs in its own subprocess (this script re-invokes
itself with ``--variant``) so peak memory is per variant: ``torch.cuda.max_memory_allocated`` on
CUDA; on CPU the growth of the process's peak RSS (``ru_maxrss``) from just after the imports.
On CPU, step times vary by up to ~20% from one fresh process to the next, so each variant runs
``--repeats`` times (default 3, alternating the order) and the median run is reported. CPU timings
are only meaningful on an otherwise idle machine: the "other CPU" column is the share of the CPUs
that other processes used during the timed steps (from /proc/stat), with a warning above 10%.
FLOPs: one extra untimed step under ``torch.utils.flop_counter.FlopCounterMode`` gives the FLOPs
the step executes (VAE/text encoders and checkpoint recomputation included); the model FLOPs of the
denoiser step (reference forward + policy forward and backward over 2B rows, no recomputation) are
counted on a meta-device replica of the denoiser. MFU = model FLOPs / step time / peak.

Modes:
    python bench/train_step.py [--family sd15|sdxl]    tiny built-in model (tiny:<family>) on
                                                       toy:pairs, CPU by default (target: >= 1.5x)
    python bench/train_step.py --real-sdxl             CUDA only: the real SDXL-base UNet config
                                                       (2.6B parameters, random weights), the SDXL
                                                       VAE and both text encoders (random), 1024px,
                                                       LoRA rank 8, bf16 autocast, gradient
                                                       checkpointing; prints MFU vs --peak-tflops
    python bench/train_step.py --real-sdxl --smoke     the --real-sdxl code path with the tiny
                                                       SDXL model, runnable on a CPU (plumbing check)
    python bench/train_step.py --real-sd15             the real SD1.5 UNet/VAE/CLIP-L configs (860M-
                                                       parameter UNet, random weights), CPU or CUDA,
                                                       default 256px on CPU (512 on CUDA), LoRA rank 8:
                                                       the realistic encoder/denoiser proportions that
                                                       the tiny models lack (CPU target: >= 1.5x)

The last line is ``BENCH_JSON {...}`` with every number, for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from diffalign.config import ModelConfig, RunConfig, load_config  # noqa: E402
from diffalign.models import SD15Adapter, SDXLAdapter, load_adapter  # noqa: E402
from diffalign.models.base import DTYPES, FamilyAdapter  # noqa: E402

RESULT_PREFIX = "BENCH_RESULT "
JSON_PREFIX = "BENCH_JSON "
RECIPE = "tiny-sd15-dpo"
REAL_SDXL_ID = "random:sdxl-base-1.0"
REAL_SD15_ID = "random:sd-1.5"
H100_BF16_DENSE_TFLOPS = 989.0
# Per-step metrics that depend on the data, noise, timesteps and weights: equal at step 0 iff like for like.
STEP0_KEYS = ("err_policy_w", "err_policy_l", "err_ref_w", "err_ref_l")

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (values that differ from diffusers' defaults).
SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# runwayml/stable-diffusion-v1-5 unet/config.json (values that differ from diffusers' defaults).
SD15_UNET_CONFIG: dict[str, Any] = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
# SDXL vae/config.json.
SDXL_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
# SD1.5 vae/config.json is the same architecture with SD1.5's scaling factor.
SD15_VAE_CONFIG: dict[str, Any] = dict(SDXL_VAE_CONFIG, sample_size=512, scaling_factor=0.18215, force_upcast=False)
# text_encoder (CLIP ViT-L/14 text tower) and text_encoder_2 (OpenCLIP ViT-bigG/14 text tower).
SDXL_TEXT_CONFIGS: tuple[dict[str, Any], dict[str, Any]] = (
    dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
         hidden_act="quick_gelu", projection_dim=768),
    dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
         hidden_act="gelu", projection_dim=1280),
)


# --------------------------------------------------------------------------- arguments

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("sd15", "sdxl"), default="sd15", help="tiny model family (tiny:<family>)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--batch-size", type=int, default=4, help="preference pairs per step (2x rows per forward)")
    p.add_argument("--resolution", type=int, default=None,
                   help="pixels; default: the tiny model's (32), or 1024 with --real-sdxl")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:i]")
    p.add_argument("--lora-rank", type=int, default=None, help="default: the recipe's (4), or 8 with --real-sdxl")
    p.add_argument("--baseline-ref", choices=("copy", "adapters-off"), default="copy",
                   help="baseline reference: frozen deep copy of the UNet (original DiffusionDPO script) or "
                        "LoRA adapters disabled on the policy (diffusers' LoRA DPO scripts)")
    p.add_argument("--real-sdxl", action="store_true",
                   help="CUDA: real SDXL-base UNet/VAE/text-encoder configs, random weights, 1024px, bf16, LoRA r8")
    p.add_argument("--real-sd15", action="store_true",
                   help="real SD1.5 UNet/VAE/CLIP-L configs, random weights, LoRA r8; CPU (fp32, 256px) or CUDA "
                        "(bf16, 512px)")
    p.add_argument("--smoke", action="store_true",
                   help="with --real-sdxl: use the tiny SDXL model instead (runs on CPU; checks the code path)")
    p.add_argument("--repeats", type=int, default=None,
                   help="fresh processes per variant, run alternately (A B, B A, ...); the median run is reported "
                        "(default: 3 on CPU, where process-to-process variation is large, 1 on CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak dense TFLOP/s for MFU (default on CUDA: {H100_BF16_DENSE_TFLOPS:g}, H100 bf16)")
    p.add_argument("--variant", choices=("cache", "diffalign", "baseline"), default=None,
                   help=argparse.SUPPRESS)  # internal: run one variant in this process
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)  # internal: shared temp folder
    args = p.parse_args(argv)
    if args.smoke and not args.real_sdxl:
        p.error("--smoke only applies to --real-sdxl")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or (args.repeats is not None and args.repeats < 1):
        p.error("--steps, --batch-size and --repeats must be >= 1 and --warmup >= 0")
    if args.real_sdxl and args.real_sd15:
        p.error("choose one of --real-sdxl and --real-sd15")
    if args.real_sdxl:
        args.family = "sdxl"
    if args.real_sd15:
        args.family = "sd15"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.resolution is None:
        args.resolution = (1024 if args.real_sdxl and not args.smoke else
                           (512 if args.device.startswith("cuda") else 256) if args.real_sd15 else 32)
    if args.lora_rank is None:
        args.lora_rank = 8 if args.real_sdxl or args.real_sd15 else None
    if args.repeats is None:
        args.repeats = 1 if args.device.startswith("cuda") else 3
    return args


def require_cuda_for_real_sdxl(args: argparse.Namespace) -> None:
    if args.real_sdxl and not args.smoke and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        found = "no CUDA device is available" if not torch.cuda.is_available() else f"--device is {args.device}"
        sys.exit(f"bench/train_step.py --real-sdxl needs a CUDA GPU (SDXL at 1024px is far beyond a CPU budget), "
                 f"but {found}. Run the tiny bench without --real-sdxl, or add --smoke to exercise the "
                 "--real-sdxl code path with the tiny SDXL model on a CPU.")


def make_config(args: argparse.Namespace, workdir: Path, cache_dir: Path | None = None) -> RunConfig:
    """The tiny recipe with the bench's overrides; every subprocess builds the identical config."""
    pretrained = (REAL_SDXL_ID if args.real_sdxl and not args.smoke else REAL_SD15_ID if args.real_sd15
                  else f"tiny:{args.family}")
    overrides = [
        f"model.family={args.family}",
        f"model.pretrained={pretrained}",
        # toy pairs stored as JPEGs at the training resolution; no flip (the diffusers scripts' default),
        # so that both variants see identical pixels and compute identical errors
        f"data.path=toy:pairs?n={max(16, args.batch_size)}&size={args.resolution}",
        f"data.resolution={args.resolution}",
        "data.random_flip=false",
        f"train.batch_size={args.batch_size}",
        f"cache.batch_size={args.batch_size}",  # the cache encodes as many pairs per call as the baseline does
        f"train.max_steps={args.warmup + args.steps + 1}",
        "train.log_with=none",
        "train.checkpoint_every=0",
        "train.resume=none",
        f"train.output_dir={workdir / 'run'}",
    ]
    if args.lora_rank is not None:
        overrides.append(f"lora.rank={args.lora_rank}")
    if args.real_sdxl:
        overrides += ["train.mixed_precision=bf16", "model.gradient_checkpointing=true"]
    if args.real_sd15 and args.device.startswith("cuda"):
        overrides += ["train.mixed_precision=bf16"]
    if cache_dir is not None:
        overrides.append(f"cache.dir={cache_dir}")
    return load_config(RECIPE, overrides)


def weight_dtype_for(cfg: RunConfig) -> torch.dtype:
    """Frozen-weight dtype, the Trainer's rule: model.weight_dtype, or auto = the mixed-precision dtype."""
    if cfg.model.weight_dtype != "auto":
        return DTYPES[cfg.model.weight_dtype]
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision, torch.float32)


# --------------------------------------------------------------------------- models

def build_random_pipeline(family: str, device: torch.device, dtype: torch.dtype):
    """SDXL-base or SD1.5 with the real component configs and seeded random weights, built on ``device``.

    Tokenizers are the offline character-level CLIP tokenizers of the tiny models (77 tokens, as the real
    ones), so the text encoders run on sequences of the real length.
    """
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffalign.models.tiny import build_char_clip_tokenizer

    xl = family == "sdxl"
    tokenizers = (build_char_clip_tokenizer(), build_char_clip_tokenizer())
    ids = tokenizers[0].convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    torch.manual_seed(0)
    text_classes = (CLIPTextModel, CLIPTextModelWithProjection) if xl else (CLIPTextModel,)
    with torch.device(device):
        unet = UNet2DConditionModel(**(SDXL_UNET_CONFIG if xl else SD15_UNET_CONFIG))
        vae = AutoencoderKL(**(SDXL_VAE_CONFIG if xl else SD15_VAE_CONFIG))
        encoders = [cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=ids[0],
                                       eos_token_id=ids[1], pad_token_id=ids[1], **kw))
                    for cls, kw in zip(text_classes, SDXL_TEXT_CONFIGS)]
    for module in (unet, vae, *encoders):
        module.to(dtype=dtype)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    if not xl:
        return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )


def load_bench_adapter(cfg: ModelConfig, device: torch.device | str = "cpu",
                       weight_dtype: torch.dtype = torch.float32) -> FamilyAdapter:
    """``diffalign.models.load_adapter``, plus the random real-size SDXL / SD1.5 for ``model.pretrained=random:...``."""
    if cfg.pretrained not in (REAL_SDXL_ID, REAL_SD15_ID):
        return load_adapter(cfg, device=device, weight_dtype=weight_dtype)
    family = "sdxl" if cfg.pretrained == REAL_SDXL_ID else "sd15"
    adapter_cls = SDXLAdapter if family == "sdxl" else SD15Adapter
    return adapter_cls(build_random_pipeline(family, torch.device(device), weight_dtype), cfg,
                       device=device, weight_dtype=weight_dtype)


@contextlib.contextmanager
def bench_adapter_loader() -> Iterator[None]:
    """Let ``Trainer.setup`` (which calls ``diffalign.models.load_adapter``) load the random real SDXL."""
    import diffalign.models as models

    original = models.load_adapter
    models.load_adapter = load_bench_adapter
    try:
        yield
    finally:
        models.load_adapter = original


def make_accelerator(cfg: RunConfig, device: str):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=device == "cpu")


# --------------------------------------------------------------------------- the two steps

Step = Callable[[int], dict[str, float]]  # step(k) runs optimizer step k and returns its metrics


def diffalign_step(trainer) -> Step:
    """diffalign's cached single-forward step: the Trainer's loader and compute_loss, then backward/clip/step."""
    from diffalign.train.randomness import step_generator

    cfg, acc = trainer.cfg, trainer.accelerator
    batches = trainer._loader(0)
    max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else float("inf")

    def step(k: int) -> dict[str, float]:
        batch = next(batches)
        gen = step_generator(cfg.train.seed, k, acc.process_index)
        with acc.autocast():
            loss, metrics = trainer.compute_loss(batch, gen)
        acc.backward(loss)
        acc.clip_grad_norm_(trainer.trainable, max_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return metrics

    return step


class ReferenceScriptStep:
    """One Diffusion-DPO step the way the reference training scripts do it (no cache, separate reference).

    Per step: decode the JPEG pairs, VAE-encode winners and losers, run the text encoder(s), one policy
    forward over the concatenated 2B rows, one reference pass over the same rows (``ref_unet`` copy or
    adapters disabled), DPO loss, backward, clip, optimizer and LR step. Random draws come from the same
    per-step generator as the Trainer's, in the same order, so step 0 matches diffalign's exactly.
    """

    def __init__(self, cfg: RunConfig, accelerator, adapter: FamilyAdapter, reference: str) -> None:
        from diffalign.data.loading import load_source_for
        from diffalign.data.preference import PreferencePairDataset, collate_pairs
        from diffalign.data.transforms import JointTransform
        from diffalign.train.optim import build_lr_scheduler, build_optimizer
        from diffalign.train.randomness import PairBatchSampler

        self.cfg, self.acc, self.adapter = cfg, accelerator, adapter
        unet = adapter.denoiser
        self.ref_unet: nn.Module | None = None
        if reference == "copy":  # frozen copy of the base weights, made before the LoRA is attached
            self.ref_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        adapter.add_lora(cfg.lora)  # same peft LoRA (rank, alpha, targets, gaussian init) as diffalign
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = build_optimizer(self.params, cfg.optim, accelerator.device)
        scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps, accelerator.num_processes)
        self.unet, self.optimizer, self.lr_scheduler = accelerator.prepare(unet, optimizer, scheduler)

        source = load_source_for(cfg.data)
        dataset = PreferencePairDataset(source, JointTransform(cfg.data.resolution, cfg.data.center_crop,
                                                               cfg.data.random_flip),
                                        seed=cfg.train.seed, on_error=cfg.data.on_error)
        sampler = PairBatchSampler(len(dataset), cfg.train.batch_size, cfg.train.seed)  # same pair order
        self.batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_pairs,
                                                        num_workers=cfg.data.num_workers))
        self.max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else float("inf")

    def _reference_pass(self, x_t, t, text, micro) -> torch.Tensor:
        with torch.no_grad():
            if self.ref_unet is not None:
                return self.adapter.predict(self.ref_unet, x_t, t, text, micro)
            unwrapped = self.acc.unwrap_model(self.unet)
            unwrapped.disable_adapters()
            try:
                return self.adapter.predict(unwrapped, x_t, t, text, micro)
            finally:
                unwrapped.enable_adapters()

    def __call__(self, k: int) -> dict[str, float]:
        from diffalign.objectives.dpo import PairErrors, dpo_loss
        from diffalign.train.loop import per_sample_mse
        from diffalign.train.randomness import step_generator

        cfg, acc, adapter, dev = self.cfg, self.acc, self.adapter, self.acc.device
        batch = next(self.batches)  # JPEG decode + resize/crop happen here, every step
        gen = step_generator(cfg.train.seed, k, acc.process_index)
        captions = list(batch["caption"])
        if cfg.data.prompt_dropout > 0:
            drop = torch.rand(len(captions), generator=gen) < cfg.data.prompt_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        b = len(captions)
        # frozen encoders in the weight dtype, outside autocast (as in the scripts and in build_cache)
        latents = adapter.encode_images(torch.cat([batch["pixels_w"], batch["pixels_l"]]).to(dev))  # VAE
        text = adapter.encode_prompts(captions)  # text encoder(s)
        with acc.autocast():
            t = adapter.sample_timesteps(b, gen)
            eps = torch.randn(latents[:b].shape, generator=gen).to(dev)
            t = t.to(dev)
            t2, eps2 = torch.cat([t, t]), torch.cat([eps, eps])
            text2 = {key: torch.cat([v, v]) for key, v in text.items()}
            micro = {"original_size": torch.cat([batch["original_size_w"], batch["original_size_l"]]).to(dev),
                     "crop_top_left": torch.cat([batch["crop_top_left"]] * 2).to(dev)}
            x_t = adapter.add_noise(latents, eps2, t2)
            target = adapter.target(latents, eps2, t2)
            err = per_sample_mse(adapter.predict(self.unet, x_t, t2, text2, micro), target)  # policy, 2B rows
            ref_err = per_sample_mse(self._reference_pass(x_t, t2, text2, micro), target)  # reference, 2B rows
            errors = PairErrors(policy_w=err[:b], policy_l=err[b:], ref_w=ref_err[:b], ref_l=ref_err[b:],
                                t=adapter.unit_time(t))
            o = cfg.objective
            loss, metrics = dpo_loss(errors, o.beta, o.loss_type, o.time_weighting, o.sft_weight)
        acc.backward(loss)
        acc.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics


# --------------------------------------------------------------------------- measurement

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def executed_tflops(step: Step, k: int) -> float:
    """FLOPs one real step executes (encoders and gradient-checkpointing recomputation included), in TFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(k)
    return counter.get_total_flops() / 1e12


def model_tflops(cfg: RunConfig, adapter: FamilyAdapter) -> float:
    """Model FLOPs of the denoiser DPO step, counted on a meta-device replica (no memory, no recomputation).

    Reference forward (no grad) + policy forward + backward, over 2B rows shaped like the training
    rows, with the same LoRA. This is the useful work both variants share; encoders are excluded.
    """
    from peft import LoraConfig as PeftLoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    denoiser = adapter.denoiser
    rows = 2 * cfg.train.batch_size
    with torch.device("meta"):
        replica = type(denoiser).from_config(denoiser.config)
    replica.requires_grad_(False)
    lora = cfg.lora
    replica.add_adapter(PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
                                       target_modules=list(lora.target_modules), init_lora_weights="gaussian"))
    side = cfg.data.resolution // adapter.pipe.vae_scale_factor
    x_t = torch.zeros(rows, denoiser.config.in_channels, side, side, device="meta")
    t = torch.zeros(rows, dtype=torch.long, device="meta")
    text = {k: torch.zeros(rows, *v.shape[1:], device="meta") for k, v in adapter.encode_prompts([""]).items()}
    micro = {"original_size": torch.full((rows, 2), cfg.data.resolution),  # SDXL builds time_ids on the CPU
             "crop_top_left": torch.zeros(rows, 2)}
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            replica.disable_adapters()
            adapter.predict(replica, x_t, t, text, micro)
            replica.enable_adapters()
        adapter.predict(replica, x_t, t, text, micro).float().pow(2).mean().backward()
    return counter.get_total_flops() / 1e12


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine have used (Linux /proc/stat); None where unavailable."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def time_steps(step: Step, warmup: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Time ``steps`` steps after ``warmup`` untimed ones.

    Returns the total seconds, each timed step's seconds, every step's metrics, and the share of the
    machine's CPUs that OTHER processes used meanwhile (contention makes CPU timings meaningless).
    """
    history = [step(k) for k in range(warmup)]
    synchronize(device)
    busy0, own0 = busy_cpu_seconds(), time.process_time()
    start = time.perf_counter()
    step_seconds = []
    for k in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        history.append(step(k))  # the loss metric is read with .item(): each step ends synchronised
        step_seconds.append(time.perf_counter() - t0)
    synchronize(device)
    seconds = time.perf_counter() - start
    busy1, own1 = busy_cpu_seconds(), time.process_time()
    other = None
    if busy0 is not None and busy1 is not None:
        other = max(0.0, (busy1 - busy0) - (own1 - own0)) / (seconds * (os.cpu_count() or 1))
    return {"seconds": seconds, "step_seconds": step_seconds, "history": history, "other_cpu_share": other}


def import_libraries() -> None:
    """Import diffusers/transformers/peft/accelerate before the RSS baseline, so it is not charged to a variant."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    from diffusers import (AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline,  # noqa: F401
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in this process and return its numbers (the parent prints them)."""
    from diffalign.data.cache import build_cache
    from diffalign.train.loop import Trainer

    import_libraries()

    workdir = Path(args.workdir)
    cache_dir = workdir / "cache"
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_start = peak_rss_mb()
    setup_start = time.perf_counter()

    if args.variant == "cache":
        cfg = make_config(args, workdir)
        adapter = load_bench_adapter(cfg.model, device=device, weight_dtype=weight_dtype_for(cfg))
        manifest = build_cache(cfg, adapter, cache_dir, show_progress=False)
        return {"variant": "cache", "seconds": time.perf_counter() - setup_start,
                "pairs": manifest["counts"]["pairs"]}

    if args.variant == "diffalign":
        cfg = make_config(args, workdir, cache_dir)
        trainer = Trainer(cfg, accelerator=make_accelerator(cfg, args.device), show_progress=False)
        with bench_adapter_loader():
            trainer.setup()
        adapter, step = trainer.adapter, diffalign_step(trainer)
    else:
        cfg = make_config(args, workdir)
        acc = make_accelerator(cfg, args.device)
        adapter = load_bench_adapter(cfg.model, device=acc.device, weight_dtype=weight_dtype_for(cfg))
        step = ReferenceScriptStep(cfg, acc, adapter, args.baseline_ref)
    setup_s = time.perf_counter() - setup_start

    timing = time_steps(step, args.warmup, args.steps, device)
    seconds = timing["seconds"]
    if device.type == "cuda":
        peak_mb, peak_kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    else:
        peak_mb, peak_kind = peak_rss_mb() - rss_start, "peak RSS growth"
    return {
        "variant": args.variant, "seconds": seconds, "steps": args.steps, "warmup": args.warmup,
        "batch_size": args.batch_size, "pairs_per_s": args.steps * args.batch_size / seconds,
        "step_s": seconds / args.steps, "median_step_s": statistics.median(timing["step_seconds"]),
        "other_cpu_share": timing["other_cpu_share"], "peak_mem_mb": peak_mb, "peak_mem_kind": peak_kind,
        "peak_rss_mb": peak_rss_mb(), "setup_s": setup_s,
        "step0_errors": {key: timing["history"][0][key] for key in STEP0_KEYS},
        "executed_tflops_per_step": executed_tflops(step, args.warmup + args.steps),
        "model_tflops_per_step": model_tflops(cfg, adapter),
    }


# --------------------------------------------------------------------------- orchestration

def run_subprocess(argv: list[str], variant: str, workdir: Path) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--variant", variant, "--workdir", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        sys.exit(f"variant {variant!r} failed (exit code {proc.returncode}); its output is above")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def describe_setup(args: argparse.Namespace) -> str:
    if args.real_sd15:
        precision = "bf16 autocast" if args.device.startswith("cuda") else "fp32"
        return (f"model: SD1.5 configs, random weights (UNet 860M params), {args.resolution}px, LoRA r{args.lora_rank}, "
                f"{precision}")
    if args.real_sdxl and not args.smoke:
        return (f"model: SDXL-base configs, random weights (UNet 2.57B params), {args.resolution}px, LoRA r{args.lora_rank}, "
                "bf16 autocast, gradient checkpointing")
    smoke = " (--real-sdxl --smoke: bf16 autocast, gradient checkpointing)" if args.real_sdxl else ""
    rank = args.lora_rank if args.lora_rank is not None else load_config(RECIPE).lora.rank
    return f"model: tiny:{args.family}, {args.resolution}px, LoRA rank {rank}{smoke}"


def fmt_list(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def report(args: argparse.Namespace, command: str, load_before: float, cache: dict[str, Any],
           results: dict[str, dict[str, Any]]) -> None:
    ours, base = results["diffalign"], results["baseline"]
    ratio = ours["pairs_per_s"] / base["pairs_per_s"]
    median_ratio = base["median_step_s"] / ours["median_step_s"]
    step0_diff = max(abs(ours["step0_errors"][k] - base["step0_errors"][k]) / abs(base["step0_errors"][k])
                     for k in STEP0_KEYS)
    on_cuda = args.device.startswith("cuda")
    peak = args.peak_tflops if args.peak_tflops is not None else (H100_BF16_DENSE_TFLOPS if on_cuda else None)
    for r in results.values():
        r["model_tflops_per_s"] = r["model_tflops_per_step"] / r["step_s"]
        r["executed_tflops_per_s"] = r["executed_tflops_per_step"] / r["step_s"]
        if peak:
            r["mfu"] = r["model_tflops_per_s"] / peak
            r["hfu"] = r["executed_tflops_per_s"] / peak

    device = args.device if not on_cuda else f"{args.device} ({torch.cuda.get_device_name(torch.device(args.device))})"
    print(f"command: {command}")
    print(f"device: {device}; os.cpu_count()={os.cpu_count()}, torch threads={torch.get_num_threads()}, "
          f"1-min load average before the run {load_before:.2f}; torch {torch.__version__}")
    print(f"{describe_setup(args)}; batch {args.batch_size} pairs ({2 * args.batch_size} rows per forward); "
          f"{args.steps} timed steps after {args.warmup} warmup; baseline reference: {args.baseline_ref}; "
          f"{args.repeats} fresh process(es) per variant, median reported")
    print(f"latent cache (one-off, before timing): {cache['pairs']} pairs in {cache['seconds']:.1f} s")
    print()
    columns = [("variant", "<10"), ("pairs/s", ">9"), ("mean step ms", ">13"), ("median step ms", ">15"),
               ("peak MB", ">9"), ("TFLOP/step", ">11"), ("other CPU", ">10")] + ([("MFU", ">7")] if peak else [])
    print(" ".join(f"{name:{fmt}}" for name, fmt in columns))
    for name in ("diffalign", "baseline"):
        r = results[name]
        other = "n/a" if r["other_cpu_share"] is None else f"{100 * r['other_cpu_share']:.0f}%"
        cells = [name, f"{r['pairs_per_s']:.2f}", f"{1e3 * r['step_s']:.1f}", f"{1e3 * r['median_step_s']:.1f}",
                 f"{r['peak_mem_mb']:.1f}", f"{r['executed_tflops_per_step']:.4g}", other]
        cells += [f"{100 * r['mfu']:.1f}%"] if peak else []
        print(" ".join(f"{cell:{fmt}}" for cell, (_, fmt) in zip(cells, columns)))
    print()
    target = "" if on_cuda else f"  (CPU target >= 1.5x: {'met' if ratio >= 1.5 else 'NOT met'})"
    print(f"speed ratio diffalign/baseline: {ratio:.2f}x (median step times: {median_ratio:.2f}x){target}")
    if args.repeats > 1:
        per_run = ", ".join(f"{d / b:.2f}x" for d, b in zip(ours["pairs_per_s_runs"], base["pairs_per_s_runs"]))
        print(f"  pairs/s of every run: diffalign {fmt_list(ours['pairs_per_s_runs'])}, baseline "
              f"{fmt_list(base['pairs_per_s_runs'])}; run-by-run ratios {per_run}")
    print(f"peak memory ratio diffalign/baseline: {ours['peak_mem_mb'] / base['peak_mem_mb']:.2f} "
          f"({ours['peak_mem_kind']})")
    print(f"model FLOPs per step (denoiser ref fwd + policy fwd/bwd, 2B rows): {ours['model_tflops_per_step']:.4g} "
          "TFLOP; the TFLOP/step column counts what each step executes (encoders, recomputation included)")
    extra = 1 - ours["executed_tflops_per_step"] / base["executed_tflops_per_step"]
    print(f"share of the baseline's executed FLOPs that diffalign does not run (VAE, text encoders): {100 * extra:.1f}%")
    if peak:
        print(f"MFU = model FLOPs / mean step time / {peak:g} TFLOP/s peak; executed-FLOP utilisation: "
              f"diffalign {100 * ours['hfu']:.1f}%, baseline {100 * base['hfu']:.1f}%")
    print(f"like-for-like check: step-0 policy/reference errors (winners, losers) differ by at most "
          f"{step0_diff:.2g} relative between the variants")
    contended = [n for n, r in results.items() if (r["other_cpu_share"] or 0.0) > 0.1]
    if contended and not on_cuda:
        print(f"WARNING: other processes used over 10% of the CPUs during a timed run of {', '.join(contended)}; "
              "CPU timings are skewed, rerun on an idle machine")
    summary = {
        "bench": "train_step", "command": command, "family": args.family, "real_sdxl": args.real_sdxl, "real_sd15": args.real_sd15,
        "smoke": args.smoke, "device": device, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before, "torch": torch.__version__, "resolution": args.resolution,
        "batch_pairs": args.batch_size, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "baseline_ref": args.baseline_ref,
        "peak_tflops": peak, "ratio": ratio, "median_step_ratio": median_ratio, "step0_error_rel_diff": step0_diff,
        "encoder_flop_share_of_baseline": extra,
        "cache_build_s": cache["seconds"],
        **{f"{name}_{key}": value for name, r in results.items() for key, value in r.items()
           if key not in ("variant", "step0_errors", "steps", "warmup", "batch_size")},
    }
    print(JSON_PREFIX + json.dumps(summary))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    require_cuda_for_real_sdxl(args)
    if args.variant is not None:
        print(RESULT_PREFIX + json.dumps(run_variant(args)), flush=True)
        return
    command = shlex.join(["HF_HUB_OFFLINE=1", sys.executable, os.path.relpath(__file__), *argv])
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="diffalign-bench-") as tmp:
        workdir = Path(tmp)
        cache = run_subprocess(argv, "cache", workdir)
        runs: dict[str, list[dict[str, Any]]] = {"diffalign": [], "baseline": []}
        for r in range(args.repeats):  # alternate the order so slow drifts of the machine hit both variants
            for variant in (("diffalign", "baseline") if r % 2 == 0 else ("baseline", "diffalign")):
                runs[variant].append(run_subprocess(argv, variant, workdir))
    report(args, command, load_before, cache, {v: median_run(rs) for v, rs in runs.items()})


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median pairs/s (all its numbers belong together), plus every run's pairs/s."""
    chosen = dict(sorted(runs, key=lambda r: r["pairs_per_s"])[len(runs) // 2])
    chosen["pairs_per_s_runs"] = [r["pairs_per_s"] for r in runs]
    shares = [r["other_cpu_share"] for r in runs if r["other_cpu_share"] is not None]
    chosen["other_cpu_share"] = max(shares) if shares else None  # the worst contention seen in any run
    return chosen


if __name__ == "__main__":
    main()
