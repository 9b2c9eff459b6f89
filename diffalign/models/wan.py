"""Wan 2.1: WanTransformer3DModel on 5-D video latents [N, C, F, h, w], UMT5 text, rectified flow.

Everything follows diffusers' ``WanPipeline``:

* latents are the AutoencoderKLWan posterior mean normalised per channel with the VAE config's
  ``latents_mean`` / ``latents_std``: z = (raw - mean) / std, which the pipeline undoes before decoding
  (``latents / (1 / std) + mean``; the same arithmetic is used here so the two agree bit for bit);
* the flow shift is the scheduler's: ``shift`` (FlowMatchEulerDiscreteScheduler) or ``flow_shift``
  (the UniPCMultistepScheduler the Wan 2.1 checkpoints ship with), see ``flow_matching.scheduler_shift``;
* the transformer takes the timestep on the 0..num_train_timesteps scale (scheduler timesteps = sigma x 1000);
* one text tensor: UMT5 last hidden states, zeroed past each prompt's length (``prompt_embeds``).

Images are one-frame videos: ``encode_images`` takes [N, 3, H, W] as well as [N, 3, F, H, W], so the
image-preference training path works unchanged (latents [N, C, 1, h, w]).

Not covered: Wan 2.2's two-expert pipelines (``transformer_2`` / ``boundary_ratio``) and per-token timesteps
(``expand_timesteps``, TI2V-5B); loading such a folder fails with a message instead of training one expert.
"""
from __future__ import annotations

import torch

from diffalign.models.base import FamilyAdapter, model_dtype
from diffalign.models.flow_matching import FlowMatchingMixin


class WanAdapter(FlowMatchingMixin, FamilyAdapter):
    family = "wan"
    pipeline_class_name = "WanPipeline"
    denoiser_attr = "transformer"
    is_flow = True
    text_keys = ("prompt_embeds",)
    default_max_sequence_length = 512  # WanPipeline.__call__'s default
    default_cfg_scale = 5.0  # WanPipeline's guidance_scale default
    default_num_frames = 81  # WanPipeline's num_frames default

    def __init__(self, pipe, cfg, device="cpu", weight_dtype=torch.float32):
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("boundary_ratio") is not None:
            raise ValueError("family 'wan' supports Wan 2.1-class pipelines (one transformer); this folder is a Wan 2.2 "
                             "two-expert pipeline (transformer_2 / boundary_ratio), which is not supported yet")
        if pipe.config.get("expand_timesteps", False):
            raise ValueError("family 'wan' supports Wan 2.1-class pipelines; expand_timesteps=True (Wan 2.2 TI2V) "
                             "is not supported yet")
        super().__init__(pipe, cfg, device=device, weight_dtype=weight_dtype)

    # ----------------------------------------------------------------- VAE normalisation
    def _latent_stats(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) as [1, C, 1, 1, 1], built exactly as WanPipeline builds them for its decode."""
        vae_cfg = self.vae.config
        mean = torch.tensor(vae_cfg.latents_mean).view(1, vae_cfg.z_dim, 1, 1, 1).to(device, dtype)
        inv_std = 1.0 / torch.tensor(vae_cfg.latents_std).view(1, vae_cfg.z_dim, 1, 1, 1).to(device, dtype)
        return mean, inv_std

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Videos [N, 3, F, H, W] (or images [N, 3, H, W], taken as F = 1) in [-1, 1] -> normalised latents
        [N, C, (F-1)/4 + 1, H/8, W/8] (posterior mean, (raw - latents_mean) / latents_std), float32."""
        if pixels.ndim == 4:
            pixels = pixels.unsqueeze(2)
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(f"wan encodes videos [N, 3, F, H, W] or images [N, 3, H, W]; got shape {tuple(pixels.shape)}")
        vae = self.vae
        raw = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mode()
        mean, inv_std = self._latent_stats(raw.device, raw.dtype)
        return ((raw - mean) * inv_std).float()

    encode_videos = encode_images

    def decode_latents(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised latents [N, C, F', h, w] -> RGB video in [0, 1], [N, F, 3, H, W] float32 (as WanPipeline's
        output_type='pt'). Differentiable, like the base class's."""
        vae = self.vae
        z = latents.to(self.device, vae.dtype)
        mean, inv_std = self._latent_stats(z.device, z.dtype)
        video = vae.decode(z / inv_std + mean, return_dict=False)[0].float()  # [N, 3, F, H, W] in [-1, 1]
        video = ((video + 1) / 2).permute(0, 2, 1, 3, 4)
        return video.clamp(0, 1) if clamp else video

    # ----------------------------------------------------------------- shapes
    def default_resolution(self) -> tuple[int, int]:
        return 480, 832  # WanPipeline's default height, width

    def latent_shape(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, ...]:
        """(C, (F-1)//4 + 1, H/8, W/8) as WanPipeline.prepare_latents; ``num_frames`` None means 81."""
        frames = self.default_num_frames if num_frames is None else int(num_frames)
        temporal, spatial = int(self.pipe.vae_scale_factor_temporal), int(self.pipe.vae_scale_factor_spatial)
        if frames < 1 or (frames - 1) % temporal:
            raise ValueError(f"num_frames={frames}: Wan needs num_frames - 1 divisible by {temporal} (e.g. 5, 9, 81)")
        return (int(self.denoiser.config.in_channels), (frames - 1) // temporal + 1,
                int(height) // spatial, int(width) // spatial)

    # ----------------------------------------------------------------- text and network
    def prompt_embeddings(self, captions: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(
            list(captions), None, do_classifier_free_guidance=False, device=self.device,
            max_sequence_length=self.cfg.max_sequence_length or self.default_max_sequence_length,
        )
        return {"prompt_embeds": embeds.float()}

    def predict(self, model, x_t, t, text, micro=None):
        """The timestep goes in as float32 on the 0..1000 scale, as WanPipeline passes its scheduler's timesteps
        (the transformer casts the sinusoidal projection itself; a bf16 timestep would round e.g. 723.4 to 724)."""
        dtype = model_dtype(model)
        scale = float(self.pipe.scheduler.config.get("num_train_timesteps", 1000))
        return model(hidden_states=x_t.to(dtype), timestep=(t.float() * scale).to(x_t.device),
                     encoder_hidden_states=text["prompt_embeds"].to(dtype), return_dict=False)[0]
