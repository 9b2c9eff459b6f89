"""The Wan 2.1 video adapter on a tiny WanPipeline saved with save_pretrained and loaded back through from_pretrained.

Oracles are diffusers' own code paths: WanPipeline's decode (run through the pipeline itself), its
prepare_latents shape, its scheduler's noising and one pipeline denoising step.
"""
import math
from pathlib import Path

import pytest
import torch

from diffalign.config import LoraConfig, ModelConfig
from diffalign.models import ADAPTERS, load_adapter
from diffalign.models.tiny import TINY_NUM_FRAMES, TINY_RESOLUTION, build_tiny_pipeline

SEQ = 16  # max_sequence_length for the tiny UMT5


@pytest.fixture(scope="module")
def wan(tiny_model):
    return load_adapter(ModelConfig(family="wan", pretrained=str(tiny_model("wan")), max_sequence_length=SEQ))


def _video(n=1, frames=5, size=16, seed=0):
    return torch.rand(n, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _pipeline_decode(pipe, latents):
    """WanPipeline's own decode path on ``latents``: a one-step run whose step-end callback hands back ``latents``
    as the final latents, which the pipeline then un-normalises, decodes and post-processes (output_type='pt')."""
    n, _, f, h, w = latents.shape
    frames = (f - 1) * pipe.vae_scale_factor_temporal + 1
    size = h * pipe.vae_scale_factor_spatial
    return pipe(prompt=[""] * n, height=size, width=size, num_frames=frames, num_inference_steps=1, guidance_scale=1.0,
                max_sequence_length=SEQ, output_type="pt", callback_on_step_end=lambda p, i, t, kw: {"latents": latents},
                ).frames


def test_loads_through_from_pretrained_and_encodes_normalised_video_latents(wan):
    import diffusers

    assert isinstance(wan.pipe, diffusers.WanPipeline) and ADAPTERS["wan"] is type(wan)
    assert TINY_RESOLUTION["wan"] == 16 and TINY_NUM_FRAMES["wan"] == 9
    assert wan.flow_shift == 7.0  # the tiny scheduler's shift, read from the saved scheduler config
    video = _video()
    x0 = wan.encode_images(video)
    # [1, 3, 5, 16, 16] -> [1, C=16, (5-1)/4+1 = 2, 16/8, 16/8], and that is the pipeline's own latent shape
    assert x0.shape == (1, 16, 2, 2, 2) and x0.dtype == torch.float32
    assert wan.latent_shape(16, 16, 5) == tuple(x0.shape[1:])
    assert tuple(wan.pipe.prepare_latents(1, 16, 16, 16, 5, torch.float32, "cpu").shape[1:]) == tuple(x0.shape[1:])
    assert wan.latent_shape(16, 16, 9) == (16, 3, 2, 2)
    with pytest.raises(ValueError, match="divisible by 4"):
        wan.latent_shape(16, 16, 6)
    # normalisation: x0 = (posterior mean - latents_mean) / latents_std, per channel (the VAE's non-trivial defaults)
    raw = wan.vae.encode(video).latent_dist.mode()
    mean = torch.tensor(wan.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(wan.vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert (mean != 0).any() and (std != 1).any()
    torch.testing.assert_close(x0, (raw - mean) / std, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0 * std + mean, raw, atol=1e-5, rtol=1e-5)
    # an image is a one-frame video
    img = wan.encode_images(video[:, :, 0])
    assert img.shape == (1, 16, 1, 2, 2)
    torch.testing.assert_close(img, wan.encode_images(video[:, :, :1]))
    with pytest.raises(ValueError, match="videos"):
        wan.encode_images(torch.zeros(1, 4, 5, 16, 16))


def test_decode_matches_the_pipelines_decode_path(wan):
    video = _video(seed=1)
    x0 = wan.encode_images(video)
    ours = wan.decode_latents(x0)
    theirs = _pipeline_decode(wan.pipe, x0)
    assert ours.shape == theirs.shape == (1, 5, 3, 16, 16)  # [N, F, 3, H, W] in [0, 1]
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    # round trip: decode(encode(x)) through our un-normalisation is the VAE's decode of the raw posterior mean
    raw = wan.vae.encode(video).latent_dist.mode()
    direct = ((wan.vae.decode(raw).sample + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(ours, direct, atol=1e-5, rtol=1e-5)
    # unclamped decode keeps gradients to the latents (for reward guidance through the VAE)
    z = x0.clone().requires_grad_(True)
    wan.decode_latents(z, clamp=False).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_noising_and_target_are_shifted_rectified_flow(wan):
    gen = torch.Generator().manual_seed(3)
    n = 6
    t = wan.sample_timesteps(n, gen)
    u = torch.sigmoid(wan.cfg.logit_mean + wan.cfg.logit_std * torch.randn(n, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(t, 7.0 * u / (1 + 6.0 * u))  # logit-normal u, then the scheduler's shift 7
    x0 = torch.randn(n, 16, 3, 2, 2, generator=gen)
    eps = torch.randn(n, 16, 3, 2, 2, generator=gen)
    tt = t.view(n, 1, 1, 1, 1)
    torch.testing.assert_close(wan.add_noise(x0, eps, t), (1 - tt) * x0 + tt * eps)
    torch.testing.assert_close(wan.target(x0, eps, t), eps - x0)
    torch.testing.assert_close(wan.unit_time(t), t)
    # the same convention as the pipeline's scheduler: at its timestep 1000 sigma, x_t = sigma eps + (1 - sigma) x0
    sched = wan.pipe.scheduler
    sched.set_timesteps(4)
    for ts in sched.timesteps:
        sigma = (ts / 1000).reshape(1)
        ref = sched.scale_noise(x0[:1], ts.reshape(1), eps[:1])
        torch.testing.assert_close(wan.add_noise(x0[:1], eps[:1], sigma), ref, atol=1e-5, rtol=1e-5)
    assert wan.timestep_kwargs(4, (16, 3, 2, 2)) == {}  # WanPipeline calls set_timesteps(num_steps) only


def test_shift_comes_from_unipc_flow_shift_or_the_config(tmp_path):
    from diffusers import UniPCMultistepScheduler

    pipe = build_tiny_pipeline("wan")
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe.save_pretrained(tmp_path / "wan-unipc")  # the scheduler the Wan 2.1 hub checkpoints ship with
    cfg = ModelConfig(family="wan", pretrained=str(tmp_path / "wan-unipc"), max_sequence_length=SEQ)
    adapter = load_adapter(cfg)
    assert type(adapter.pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert adapter.flow_shift == 3.0
    cfg.flow_shift = 5.0
    assert load_adapter(cfg).flow_shift == 5.0


def test_predict_on_5d_latents_matches_a_pipeline_step(wan):
    text = wan.encode_prompts(["a red ball bouncing", "waves on a beach"])
    assert set(text) == {"prompt_embeds"} and text["prompt_embeds"].shape == (2, SEQ, 32)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 16, 3, 2, 2, generator=gen)  # 9 frames of 16x16
    eps = torch.randn(x0.shape, generator=gen)
    t = wan.sample_timesteps(2, gen)
    out = wan.predict(wan.denoiser, wan.add_noise(x0, eps, t), t, text)
    assert out.shape == x0.shape and torch.isfinite(out).all()
    swapped = wan.predict(wan.denoiser, wan.add_noise(x0, eps, t), t, {k: v.flip(0) for k, v in text.items()})
    assert (out - swapped).abs().max() > 0  # the prompt is wired through
    # one Euler step of the pipeline from pure noise (sigma 1 -> 0, no CFG) returns eps - v(eps, t=1, prompt)
    prompt = "a red ball bouncing"
    stepped = wan.pipe(prompt=prompt, height=16, width=16, num_frames=9, num_inference_steps=1, guidance_scale=1.0,
                       max_sequence_length=SEQ, latents=eps[:1].clone(), output_type="latent").frames
    v = wan.predict(wan.denoiser, eps[:1], torch.ones(1), wan.encode_prompts([prompt]))
    torch.testing.assert_close(stepped, eps[:1] - v, atol=1e-5, rtol=1e-5)


def test_flow_dpo_on_video_latents_reaches_the_lora(tiny_model):
    from diffalign.objectives import PairErrors, dpo_loss
    from diffalign.train.loop import adapters_disabled, per_sample_mse

    adapter = load_adapter(ModelConfig(family="wan", pretrained=str(tiny_model("wan")), max_sequence_length=SEQ))
    adapter.add_lora(LoraConfig(rank=4))
    model = adapter.denoiser
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    b = 2
    x0_w = adapter.encode_images(_video(b, 9, seed=5))
    x0_l = adapter.encode_images(_video(b, 9, seed=6))
    assert x0_w.shape == (b, 16, 3, 2, 2)
    text = adapter.encode_prompts(["a cat jumping", "a car driving at night"])
    gen = torch.Generator().manual_seed(7)
    t = adapter.sample_timesteps(b, gen)
    eps = torch.randn(x0_w.shape, generator=gen)
    # winners and losers share eps and t; one forward over 2B rows, the reference with adapters disabled
    x0, eps2, t2 = torch.cat([x0_w, x0_l]), torch.cat([eps, eps]), torch.cat([t, t])
    text2 = {k: torch.cat([v, v]) for k, v in text.items()}
    x_t, target = adapter.add_noise(x0, eps2, t2), adapter.target(x0, eps2, t2)
    with torch.no_grad(), adapters_disabled(model):
        ref_err = per_sample_mse(adapter.predict(model, x_t, t2, text2), target)
    err = per_sample_mse(adapter.predict(model, x_t, t2, text2), target)
    loss, metrics = dpo_loss(PairErrors(err[:b], err[b:], ref_err[:b], ref_err[b:], adapter.unit_time(t)), beta=1000)
    # LoRA B starts at zero: policy == reference, so loss = ln 2 and accuracy 0.5
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5) and metrics["implicit_acc"] == 0.5
    loss.backward()
    grads = {n: p.grad for n, p in lora.items()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    # a step on the LoRA moves the policy away from the reference
    with torch.no_grad():
        for p in lora.values():
            p -= 1e-2 * p.grad.sign()
    err_after = per_sample_mse(adapter.predict(model, x_t, t2, text2), target)
    assert (err_after - ref_err).abs().max() > 0


def test_saved_wan_lora_loads_into_plain_diffusers(tiny_model, tmp_path):
    import diffusers

    adapter = load_adapter(ModelConfig(family="wan", pretrained=str(tiny_model("wan")), max_sequence_length=SEQ))
    adapter.add_lora(LoraConfig(rank=4))
    with torch.no_grad():
        for n, p in adapter.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    adapter.save_lora(adapter.denoiser, str(tmp_path / "lora"))
    pipe = diffusers.WanPipeline.from_pretrained(tiny_model("wan"))
    kw = dict(prompt="a cat", height=16, width=16, num_frames=5, num_inference_steps=2, max_sequence_length=SEQ,
              output_type="pt")
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    pipe.load_lora_weights(str(tmp_path / "lora"))
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    assert (before - after).abs().max() > 1e-4


def test_wan_22_two_expert_folders_are_refused(tmp_path):
    pipe = build_tiny_pipeline("wan")
    pipe.register_to_config(boundary_ratio=0.875)
    pipe.save_pretrained(tmp_path / "wan22")
    with pytest.raises(ValueError, match="Wan 2.2"):
        load_adapter(ModelConfig(family="wan", pretrained=str(tmp_path / "wan22"), max_sequence_length=SEQ))


# --------------------------------------------------------------------------- the shared training loop, unchanged

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny-wan-flow-dpo.yaml"


def _trainer(tiny_model, tmp_path, *overrides):
    from diffalign.config import load_config
    from diffalign.train.loop import Trainer

    cfg = load_config(str(RECIPE), [f"model.pretrained={tiny_model('wan')}", "train.log_with=none", "train.log_every=1",
                                    "train.checkpoint_every=0", "data.center_crop=true", "data.random_flip=false",
                                    f"train.output_dir={tmp_path / 'run'}", *overrides])
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    return trainer


@pytest.mark.slow
def test_tiny_wan_recipe_overfits_image_pairs_as_one_frame_videos(tiny_model, tmp_path):
    trainer = _trainer(tiny_model, tmp_path, "data.path=toy:pairs?n=4", "lora.rank=8", "optim.lr=5e-3",
                       "train.max_steps=40")
    assert trainer.cfg.model.family == "wan" and trainer.cfg.objective.beta == 1000
    result = trainer.train()
    first, last10 = result.history[0], result.history[-10:]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference before any update
    acc = sum(h["implicit_acc"] for h in last10) / 10
    median_loss = sorted(h["loss"] for h in last10)[5]
    # 16x16 images are ONE token each for the tiny Wan (1 frame, 2x2 latents, 1x2x2 patches): learning is slow,
    # so the bar is lower than the image families' 0.3
    assert acc >= 0.9 and median_loss < 0.6, [(h["step"], round(h["loss"], 3), h["implicit_acc"]) for h in result.history]
    assert (result.export_path / "pytorch_lora_weights.safetensors").is_file()


def test_loop_step_on_cached_video_latents(tiny_model, tmp_path):
    """A cache-format micro-batch of 5-D video latents ([B, C, F, h, w], 3 latent frames) goes through the loop's own
    compute_loss (shared eps/t, reference = adapters disabled) and its gradient reaches the LoRA."""
    trainer = _trainer(tiny_model, tmp_path, "train.max_steps=1")
    gen = torch.Generator().manual_seed(0)
    b = 2
    batch = {"latents_w": torch.randn(b, 16, 3, 2, 2, generator=gen), "latents_l": torch.randn(b, 16, 3, 2, 2, generator=gen),
             "text": trainer.adapter.encode_prompts(["a cat jumping", "waves"]),
             "original_size_w": torch.tensor([[16, 16]] * b), "original_size_l": torch.tensor([[16, 16]] * b),
             "crop_top_left": torch.zeros(b, 2)}
    loss, metrics = trainer.compute_loss(batch, torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5) and metrics["implicit_acc"] == 0.5
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# --------------------------------------------------------------------------- sampling (diffalign.samplers, unchanged)

def test_cfg_video_sampling_reproduces_the_wan_pipeline(wan, tiny_model):
    """Same seeds, the pipeline's FlowMatchEuler scheduler, CFG 4: the sampler's video latents equal WanPipeline's
    output_type='latent' and the decoded frames match its output_type='np'."""
    import numpy as np

    from diffalign.samplers import SampleConfig, Sampler

    prompts = ["a red ball bouncing", "waves on a beach"]
    cfg = SampleConfig(model=str(tiny_model("wan")), prompts=prompts, steps=4, guidance_scale=4.0, batch_size=2,
                       progress=False, device="cpu", num_frames=5, height=16, width=16, max_sequence_length=SEQ)
    result = Sampler(cfg, adapter=wan).sample()
    assert result.images.shape == (2, 5, 16, 16, 3) and result.latents.shape == (2, 16, 2, 2, 2)
    pipe = wan.pipe
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=result.prompts, num_inference_steps=4, guidance_scale=4.0, height=16, width=16, num_frames=5,
              max_sequence_length=SEQ)
    gens = lambda: [torch.Generator().manual_seed(s) for s in result.seeds]  # noqa: E731
    latents = pipe(generator=gens(), output_type="latent", **kw).frames
    frames = pipe(generator=gens(), output_type="np", **kw).frames
    torch.testing.assert_close(result.latents, latents.float(), atol=1e-5, rtol=1e-5)
    expected = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    assert expected.shape == result.images.shape
    assert np.abs(result.images.astype(int) - expected.astype(int)).max() <= 1
    assert result.latents.abs().max() > 0.1


def test_latent_cache_round_trip_on_wan(tiny_model, tmp_path):
    """`diffalign cache` on the wan family: 5-D latents in the shards, and a cached step equals the on-the-fly step."""
    from diffalign.config import load_config
    from diffalign.data.cache import build_cache, check_manifest
    from diffalign.models import load_adapter
    from diffalign.train.loop import Trainer
    from diffalign.train.randomness import step_generator

    overrides = [f"model.pretrained={tiny_model('wan')}", "train.log_with=none", "train.checkpoint_every=0",
                 "data.center_crop=true", "data.random_flip=false", "data.path=toy:pairs?n=8", "train.max_steps=2"]
    cfg = load_config(str(RECIPE), overrides + [f"cache.dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'c'}"])
    manifest = build_cache(cfg, load_adapter(cfg.model), show_progress=False)
    assert manifest["counts"]["pairs"] == 8
    assert manifest["shapes"]["latents_w"] == [16, 1, 2, 2]  # [C, F=1, h, w]: images are one-frame videos
    check_manifest(cfg.cache.dir, cfg)
    cached = Trainer(cfg, show_progress=False)
    cached.setup()
    fly = Trainer(load_config(str(RECIPE), overrides + [f"train.output_dir={tmp_path / 'f'}"]), show_progress=False)
    fly.setup()
    b_cached, b_fly = next(cached._loader(0)), next(fly._loader(0))
    assert b_cached["row"] == b_fly["row"] and b_cached["latents_w"].ndim == 5
    loss_c, _ = cached.compute_loss(b_cached, step_generator(0, 0, 0))
    loss_f, _ = fly.compute_loss(b_fly, step_generator(0, 0, 0))
    assert loss_c.item() == pytest.approx(loss_f.item(), rel=1e-4)
    assert cached.train().steps == 2


def test_bf16_wan_predicts_in_bf16_with_a_float32_timestep_like_the_pipeline(tiny_model):
    adapter = load_adapter(ModelConfig(family="wan", pretrained=str(tiny_model("wan")), max_sequence_length=SEQ),
                           weight_dtype=torch.bfloat16)
    from diffalign.models.base import model_dtype

    model = adapter.denoiser
    # diffusers keeps some Wan modules in float32, the first parameter (scale_shift_table) among them
    assert next(model.parameters()).dtype == torch.float32 and model.dtype == torch.bfloat16
    assert model_dtype(model) == torch.bfloat16
    text = adapter.encode_prompts(["a red ball bouncing"])
    x_t = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([0.7234])
    assert torch.tensor([723.4]).bfloat16().item() == 724.0  # what a bf16 timestep would become
    out = adapter.predict(model, x_t, t, text)
    assert out.dtype == torch.bfloat16 and out.shape == x_t.shape
    # WanPipeline: latents cast to the transformer dtype, timestep = the scheduler's float32 timestep
    pipeline_way = model(hidden_states=x_t.bfloat16(), timestep=torch.tensor([723.4]),
                         encoder_hidden_states=text["prompt_embeds"].bfloat16(), return_dict=False)[0]
    torch.testing.assert_close(out, pipeline_way, atol=0, rtol=0)
