"""Family adapters on tiny models saved with save_pretrained and loaded back through from_pretrained."""
import pytest
import torch

from diffalign.config import ModelConfig
from diffalign.models import ADAPTERS, ModelLoadError, load_adapter
from diffalign.models.tiny import TINY_RESOLUTION


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_round_trip_through_from_pretrained(family, tiny_model):
    import diffusers

    adapter = load_adapter(ModelConfig(family=family, pretrained=str(tiny_model(family)), max_sequence_length=16))
    assert type(adapter.pipe).__name__ == ADAPTERS[family].pipeline_class_name
    r = TINY_RESOLUTION[family]
    pixels = torch.rand(2, 3, r, r) * 2 - 1
    x0 = adapter.encode_images(pixels)
    text = adapter.encode_prompts(["a red square on a blue background", ""])
    assert set(text) == set(adapter.text_keys) and all(v.shape[0] == 2 for v in text.values())
    gen = torch.Generator().manual_seed(0)
    t = adapter.sample_timesteps(2, gen)
    eps = torch.randn(x0.shape, generator=gen)
    micro = {"original_size": torch.tensor([[r, r]] * 2), "crop_top_left": torch.zeros(2, 2)}
    out = adapter.predict(adapter.denoiser, adapter.add_noise(x0, eps, t), t, text, micro)
    assert out.shape == x0.shape and torch.isfinite(out).all()
    # the prompt matters to the prediction (conditioning is wired through)
    swapped = {k: v.flip(0) for k, v in text.items()}
    out2 = adapter.predict(adapter.denoiser, adapter.add_noise(x0, eps, t), t, swapped, micro)
    assert (out - out2).abs().max() > 0
    # the VAE scaling matches the pipeline: decode(latents / scale + shift) reconstructs the encode input's decode
    vae = adapter.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    raw = vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(x0 / vae.config.scaling_factor + shift, raw, atol=1e-5, rtol=1e-5)
    assert isinstance(adapter.pipe, getattr(diffusers, ADAPTERS[family].pipeline_class_name))


def test_flow_identity_err_eps_equals_one_minus_t_sq_err_v(tiny_model):
    adapter = load_adapter(ModelConfig(family="sd3", pretrained=str(tiny_model("sd3")), max_sequence_length=16))
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 4, 8, 8, generator=gen, dtype=torch.float64), torch.randn(5, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.rand(5, generator=gen, dtype=torch.float64)
    x_t = adapter.add_noise(x0, eps, t)
    v = adapter.target(x0, eps, t)
    v_hat = v + 0.3 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
    eps_hat = x_t + (1 - t).view(-1, 1, 1, 1) * v_hat  # ε̂ implied by a velocity prediction
    err_eps = (eps - eps_hat).pow(2).flatten(1).mean(1)
    err_v = (v - v_hat).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(err_eps, (1 - t) ** 2 * err_v)
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(adapter.add_noise(x0, eps, torch.ones(5, dtype=torch.float64)), eps)


def test_flow_timestep_sampling_and_shift(tiny_model):
    cfg = ModelConfig(family="sd3", pretrained=str(tiny_model("sd3")), max_sequence_length=16)
    adapter = load_adapter(cfg)
    assert adapter.flow_shift == 3.0  # read from the scheduler config
    t = adapter.sample_timesteps(4000, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    # shifted logit-normal(0,1): median of u is 0.5 -> shifted median 3*0.5/(1+2*0.5) = 0.75
    assert t.median().item() == pytest.approx(0.75, abs=0.03)
    cfg.flow_shift, cfg.timestep_sampling = 1.0, "uniform"
    adapter2 = load_adapter(cfg)
    u = adapter2.sample_timesteps(4000, torch.Generator().manual_seed(0))
    assert u.mean().item() == pytest.approx(0.5, abs=0.02)


def test_ddpm_eps_and_v_targets(tiny_model):
    eps_ad = load_adapter(ModelConfig(family="sd15", pretrained=str(tiny_model("sd15"))))
    v_ad = load_adapter(ModelConfig(family="sd15", pretrained=str(tiny_model("sd15", "v_prediction"))))
    assert eps_ad.prediction_type == "epsilon" and v_ad.prediction_type == "v_prediction"
    x0, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 500, 999])
    abar = eps_ad.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps_ad.add_noise(x0, eps, t), abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    torch.testing.assert_close(eps_ad.add_noise(x0, eps, t), eps_ad.noise_scheduler.add_noise(x0, eps, t))
    torch.testing.assert_close(eps_ad.target(x0, eps, t), eps)
    torch.testing.assert_close(v_ad.target(x0, eps, t), v_ad.noise_scheduler.get_velocity(x0, eps, t))


def test_velocity_error_scale_turns_eps_errors_into_v_errors(tiny_model):
    """|v - v̂|² = |ε - ε̂|² / ᾱ_t for an eps model (v̂ implied by ε̂), so the scale is 1/ᾱ_t; velocity targets get 1."""
    eps_ad = load_adapter(ModelConfig(family="sd15", pretrained=str(tiny_model("sd15"))))
    v_ad = load_adapter(ModelConfig(family="sd15", pretrained=str(tiny_model("sd15", "v_prediction"))))
    flow_ad = load_adapter(ModelConfig(family="sd3", pretrained=str(tiny_model("sd3")), max_sequence_length=16))
    gen = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    eps_hat = eps + 0.2 * torch.randn(3, 4, 4, 4, generator=gen)
    t = torch.tensor([10, 500, 990])
    x_t = eps_ad.add_noise(x0, eps, t)
    abar = eps_ad.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0_hat = (x_t - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
    v_hat = abar.sqrt() * eps_hat - (1 - abar).sqrt() * x0_hat
    err_eps = (eps - eps_hat).pow(2).flatten(1).mean(1)
    err_v = (eps_ad.noise_scheduler.get_velocity(x0, eps, t) - v_hat).pow(2).flatten(1).mean(1)
    scale = eps_ad.velocity_error_scale(t)
    torch.testing.assert_close(scale, 1 / eps_ad.alphas_cumprod[t])
    torch.testing.assert_close(err_eps * scale, err_v, rtol=1e-4, atol=1e-6)
    assert scale[2] > 50 * scale[0]  # the factor lives at high noise
    torch.testing.assert_close(v_ad.velocity_error_scale(t), torch.ones(3))
    torch.testing.assert_close(flow_ad.velocity_error_scale(torch.tensor([0.1, 0.9])), torch.ones(2))


def test_flux_pack_unpack_is_exact(tiny_model):
    from diffusers import FluxPipeline

    x = torch.randn(2, 1, 8, 8)
    packed = FluxPipeline._pack_latents(x, 2, 1, 8, 8)
    back = packed.view(2, 4, 4, 1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 1, 8, 8)
    torch.testing.assert_close(back, x)


def test_vae_override_and_missing_folder_errors(tiny_model, tmp_path):
    sd15 = tiny_model("sd15")
    cfg = ModelConfig(family="sd15", pretrained=str(sd15), vae=str(sd15 / "vae"))
    assert load_adapter(cfg).vae.config.latent_channels == 4
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_adapter(ModelConfig(family="sd15", pretrained=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="pretrained is empty"):
        load_adapter(ModelConfig(family="sd15", pretrained=""))


def test_sdxl_time_ids_stay_on_the_micro_conditioning_device():
    from diffalign.models.sdxl import SDXLAdapter

    micro = {"original_size": torch.tensor([[40, 48]], device="meta"), "crop_top_left": torch.zeros(1, 2, device="meta")}
    assert SDXLAdapter.time_ids(micro, (32, 32)).device.type == "meta"  # was built on CPU: breaks on CUDA
    cpu = {"original_size": torch.tensor([[40, 48]]), "crop_top_left": torch.tensor([[3, 5]])}
    assert SDXLAdapter.time_ids(cpu, (32, 32)).tolist() == [[40.0, 48.0, 3.0, 5.0, 32.0, 32.0]]
