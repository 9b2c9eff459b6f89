"""SD1.x / SD2.x-style UNet2DConditionModel: DDPM noising, eps- or v-prediction, one CLIP text encoder."""
from __future__ import annotations

import torch
from torch import nn

from diffalign.models.base import FamilyAdapter, model_dtype


class DDPMNoisingMixin:
    """Discrete DDPM noising, t in 0..T-1: x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε.

    Target: ε (prediction_type='epsilon') or v = sqrt(ᾱ_t) ε - sqrt(1-ᾱ_t) x0 ('v_prediction').
    The schedule is the pipeline's own scheduler config re-read as a DDPMScheduler (as the diffusers
    training scripts do), so a DDIM/PNDM/Euler pipeline trains on its exact ᾱ_t.
    """

    def _init_noising(self) -> None:
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.prediction_type = self.cfg.prediction_type or self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} (epsilon or v_prediction)")
        self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(torch.float32)

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).long()

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod.to(like.device)[t.to(like.device)]
        shape = (-1,) + (1,) * (like.ndim - 1)
        return abar.sqrt().view(shape).to(like.dtype), (1 - abar).sqrt().view(shape).to(like.dtype)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(t, x0)
        return a * x0 + s * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return eps
        a, s = self._coefficients(t, x0)
        return a * eps - s * x0

    def unit_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.num_train_timesteps

    def noise_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(ᾱ_t), sqrt(1-ᾱ_t)) [N]. Fractional t (Euler-type samplers) interpolates ᾱ linearly between
        the integer timesteps; integer t reads the table exactly (the same values as training)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).float().reshape(-1)
        t = t.clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        frac = t - lo.float()
        abar = self.alphas_cumprod[lo] * (1 - frac) + self.alphas_cumprod[hi] * frac
        return abar.sqrt(), (1 - abar).sqrt()


class SD15Adapter(DDPMNoisingMixin, FamilyAdapter):
    family = "sd15"
    pipeline_class_name = "StableDiffusionPipeline"
    denoiser_attr = "unet"
    is_flow = False
    text_keys = ("prompt_embeds",)
    default_cfg_scale = 7.5  # StableDiffusionPipeline's default


    def prompt_embeddings(self, captions: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(list(captions), self.device, 1, False)
        return {"prompt_embeds": embeds.float()}

    def predict(self, model: nn.Module, x_t, t, text, micro=None):
        dtype = model_dtype(model)
        return model(x_t.to(dtype), t.to(x_t.device), encoder_hidden_states=text["prompt_embeds"].to(dtype),
                     return_dict=False)[0]
