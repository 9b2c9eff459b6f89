"""SDXL: UNet with two CLIP text encoders, pooled text embeddings and add_time_ids micro-conditioning."""
from __future__ import annotations

import torch

from diffalign.models.base import model_dtype
from diffalign.models.sd15 import SD15Adapter


class SDXLAdapter(SD15Adapter):
    family = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_keys = ("prompt_embeds", "pooled_prompt_embeds")
    default_cfg_scale = 5.0  # StableDiffusionXLPipeline's default

    @torch.no_grad()
    def encode_negative_prompts(self, negatives: list[str] | None, n: int) -> dict[str, torch.Tensor]:
        """No negative prompt + ``force_zeros_for_empty_prompt`` (SDXL base): zero embeddings, as the pipeline does."""
        text = super().encode_negative_prompts(negatives, n)
        if negatives is None and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            text = {k: torch.zeros_like(v) for k, v in text.items()}
        return text

    def prompt_embeddings(self, captions: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(list(captions), device=self.device, do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds.float(), "pooled_prompt_embeds": pooled.float()}

    @staticmethod
    def time_ids(micro: dict[str, torch.Tensor], target_hw: tuple[int, int]) -> torch.Tensor:
        """add_time_ids per row: (orig_h, orig_w, crop_top, crop_left, target_h, target_w), shape [N, 6]."""
        n = micro["original_size"].shape[0]
        target = torch.tensor(target_hw, dtype=torch.float32, device=micro["original_size"].device).expand(n, 2)
        return torch.cat([micro["original_size"].float(), micro["crop_top_left"].float(), target], dim=1)

    def predict(self, model, x_t, t, text, micro=None):
        dtype = model_dtype(model)
        scale = self.pipe.vae_scale_factor
        target_hw = (x_t.shape[-2] * scale, x_t.shape[-1] * scale)
        if micro is None:  # no crop information: the plain "uncropped, native size" conditioning
            n = x_t.shape[0]
            micro = {"original_size": torch.tensor(target_hw).expand(n, 2), "crop_top_left": torch.zeros(n, 2)}
        added = {"text_embeds": text["pooled_prompt_embeds"].to(dtype),
                 "time_ids": self.time_ids(micro, target_hw).to(x_t.device, dtype)}
        return model(x_t.to(dtype), t.to(x_t.device), encoder_hidden_states=text["prompt_embeds"].to(dtype),
                     added_cond_kwargs=added, return_dict=False)[0]
