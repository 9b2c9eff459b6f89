"""SD3 / SD3.5: SD3Transformer2DModel with three text encoders (two CLIP + T5), rectified flow."""
from __future__ import annotations

import torch

from diffalign.models.base import FamilyAdapter, model_dtype
from diffalign.models.flow_matching import FlowMatchingMixin


class SD3Adapter(FlowMatchingMixin, FamilyAdapter):
    family = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_attr = "transformer"
    is_flow = True
    text_keys = ("prompt_embeds", "pooled_prompt_embeds")
    default_max_sequence_length = 256
    default_cfg_scale = 7.0  # StableDiffusion3Pipeline's default

    def timestep_kwargs(self, num_steps: int, latent_shape: tuple[int, ...]) -> dict:
        """As StableDiffusion3Pipeline: default sigmas; resolution-dependent shift mu when the scheduler is dynamic."""
        sched = self.pipe.scheduler.config
        if not sched.get("use_dynamic_shifting", False):
            return {}
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        patch = self.denoiser.config.patch_size
        seq_len = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
        return {"mu": calculate_shift(seq_len, sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096),
                                      sched.get("base_shift", 0.5), sched.get("max_shift", 1.16))}


    def prompt_embeddings(self, captions: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            list(captions), None, None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.cfg.max_sequence_length or self.default_max_sequence_length,
        )
        return {"prompt_embeds": embeds.float(), "pooled_prompt_embeds": pooled.float()}

    def predict(self, model, x_t, t, text, micro=None):
        dtype = model_dtype(model)
        # SD3's transformer takes the timestep on the 0..1000 scale
        return model(hidden_states=x_t.to(dtype), timestep=(t * 1000).to(x_t.device, dtype),
                     encoder_hidden_states=text["prompt_embeds"].to(dtype),
                     pooled_projections=text["pooled_prompt_embeds"].to(dtype), return_dict=False)[0]
