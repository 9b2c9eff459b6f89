"""FLUX.1: FluxTransformer2DModel on 2x2-packed latents, CLIP pooled + T5 text, guidance embedding."""
from __future__ import annotations

import torch

from diffalign.models.base import FamilyAdapter, model_dtype
from diffalign.models.flow_matching import FlowMatchingMixin


class FluxAdapter(FlowMatchingMixin, FamilyAdapter):
    family = "flux"
    pipeline_class_name = "FluxPipeline"
    denoiser_attr = "transformer"
    is_flow = True
    text_keys = ("prompt_embeds", "pooled_prompt_embeds")
    default_max_sequence_length = 512
    # FLUX.1-dev is guidance-distilled: the guidance strength goes in through the guidance embedding
    # (ModelConfig.guidance_scale), so true classifier-free guidance is off by default (FluxPipeline's true_cfg_scale=1)
    default_cfg_scale = 1.0

    def default_resolution(self) -> tuple[int, int]:
        size = 128 * int(self.pipe.vae_scale_factor)  # FluxPipeline.default_sample_size = 128
        return size, size

    def latent_shape(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, ...]:
        """Unpacked latents [C, h, w] with h, w even (2x2 packing), as FluxPipeline.prepare_latents."""
        if num_frames is not None:
            raise ValueError("FLUX generates images; num_frames applies to video families only")
        scale = int(self.pipe.vae_scale_factor)
        return (int(self.denoiser.config.in_channels) // 4, 2 * (int(height) // (scale * 2)),
                2 * (int(width) // (scale * 2)))

    def timestep_kwargs(self, num_steps: int, latent_shape: tuple[int, ...]) -> dict:
        """As FluxPipeline: sigmas linspace(1, 1/N, N) and the resolution shift mu from the packed sequence length."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        sched = self.pipe.scheduler.config
        seq_len = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        kwargs = {"mu": calculate_shift(seq_len, sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096),
                                        sched.get("base_shift", 0.5), sched.get("max_shift", 1.15))}
        if not sched.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        return kwargs


    def prompt_embeddings(self, captions: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            list(captions), None, device=self.device,
            max_sequence_length=self.cfg.max_sequence_length or self.default_max_sequence_length,
        )
        return {"prompt_embeds": embeds.float(), "pooled_prompt_embeds": pooled.float()}

    def predict(self, model, x_t, t, text, micro=None):
        """Latents stay unpacked [N,C,H,W] everywhere else; packing is an internal detail of this call."""
        from diffusers import FluxPipeline

        dtype = model_dtype(model)
        n, c, h, w = x_t.shape
        packed = FluxPipeline._pack_latents(x_t.to(dtype), n, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x_t.device, dtype)
        txt = text["prompt_embeds"].to(dtype)
        txt_ids = torch.zeros(txt.shape[1], 3, device=x_t.device, dtype=dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((n,), self.cfg.guidance_scale, device=x_t.device, dtype=dtype)
        out = model(hidden_states=packed, timestep=t.to(x_t.device, dtype), guidance=guidance,
                    pooled_projections=text["pooled_prompt_embeds"].to(dtype), encoder_hidden_states=txt,
                    txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        # unpack [N, (h/2)(w/2), 4c] -> [N, c, h, w] (inverse of _pack_latents)
        out = out.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(n, c, h, w)
