"""The family-adapter interface: everything the training loop and samplers need to know about a model.

Model families differ only in how they noise, what they predict and how they are conditioned, so the
loop never branches on the family; it calls these methods:

    encode_images(pixels)            [N,3,H,W] in [-1,1]         -> latents x0 [N,C,h,w] (scaled/shifted)
    encode_prompts(captions)         list[str]                   -> {key: [N,...]} text conditioning
    sample_timesteps(n, generator)                               -> t [n] in the model's native units
    add_noise(x0, eps, t)                                        -> x_t
    target(x0, eps, t)                                           -> what the network is trained to predict
    predict(model, x_t, t, text, micro)                          -> prediction, same shape as x0
    unit_time(t)                                                 -> t mapped to [0, 1] (1 = pure noise)

and, for the samplers (diffalign.samplers; the training path never calls these):

    prediction_type                  'epsilon' | 'v_prediction' | 'flow_velocity'
    noise_coefficients(t)                                        -> (alpha [N], sigma [N]): x_t = alpha x0 + sigma eps
    default_resolution()                                         -> (height, width) in pixels, the pipeline's default
    latent_shape(height, width, num_frames)                      -> per-sample latent shape (C, h, w) or (C, F, h, w)
    timestep_kwargs(num_steps, latent_shape)                     -> extra set_timesteps kwargs (flow sigmas / mu)
    encode_negative_prompts(negatives or None, n)                -> text dict for the unconditional CFG branch
    decode_latents(latents, clamp)                               -> pixels in [0, 1], [N,3,H,W] (video [N,F,3,H,W])

The adapter owns a loaded diffusers pipeline (``self.pipe``) so that prompt encoding, VAE scaling
and LoRA export are exactly those of inference.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from diffalign.config import LoraConfig, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FamilyAdapter(ABC):
    family: ClassVar[str]
    pipeline_class_name: ClassVar[str]
    denoiser_attr: ClassVar[str]  # "unet" or "transformer"
    is_flow: ClassVar[bool]
    # keys of encode_prompts' output, in a fixed order (the cache stores them as text.<key>)
    text_keys: ClassVar[tuple[str, ...]]

    def __init__(self, pipe, cfg: ModelConfig, device: torch.device | str = "cpu", weight_dtype: torch.dtype = torch.float32):
        self.pipe = pipe
        self.cfg = cfg
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        for name, module in pipe.components.items():
            if isinstance(module, nn.Module):
                module.requires_grad_(False)
                module.eval()
                module.to(self.device)  # from_pretrained already applied torch_dtype
        self._init_noising()

    def _init_noising(self) -> None:
        """Read the noise schedule from the pipeline (implemented by the DDPM / flow-matching mixins)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- components
    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def vae(self):
        return self.pipe.vae

    # ----------------------------------------------------------------- encoding
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior MEAN, scaled (and shifted for SD3/FLUX) the way the pipeline un-scales it."""
        vae = self.vae
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning {key: [N, ...]} (float32) for the training loop and the cache; no gradients."""
        return self.prompt_embeddings(captions)

    @abstractmethod
    def prompt_embeddings(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Like encode_prompts but differentiable (pretraining trains the text encoder jointly)."""

    # ----------------------------------------------------------------- noising
    @abstractmethod
    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        ...

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def unit_time(self, t: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                text: dict[str, torch.Tensor], micro: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Run ``model`` (the denoiser, possibly DDP-wrapped) on x_t; output has x_t's shape."""

    # ----------------------------------------------------------------- sampling (diffalign.samplers)
    prediction_type: str  # set by the noising mixin: 'epsilon' | 'v_prediction' | 'flow_velocity'
    default_cfg_scale: ClassVar[float] = 5.0  # classifier-free guidance scale when the user gives none

    @abstractmethod
    def noise_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t), each [N] float32, with x_t = alpha_t x0 + sigma_t eps at native timesteps ``t``."""

    def velocity_error_scale(self, t: torch.Tensor) -> torch.Tensor:
        """err_velocity / err_native per sample at native timesteps ``t``, [N] float32.

        For eps-prediction on a variance-preserving schedule (α² + σ² = 1), v = α ε - σ x0 gives
        |v - v̂|² = |ε - ε̂|² / α_t², so the factor is 1/α_t² (1/ᾱ_t): large at high noise, where an eps error
        hides an x0 error. Models whose target already is a velocity (v-prediction, rectified flow) get 1.
        The DPO objectives' ``time_weighting='velocity'`` multiplies β by it (capped).
        """
        if self.prediction_type != "epsilon":
            return torch.ones(t.shape[0], dtype=torch.float32)
        alpha, _ = self.noise_coefficients(t)
        return 1.0 / alpha.float().cpu().pow(2)

    def default_resolution(self) -> tuple[int, int]:
        """(height, width) in pixels the pipeline samples at when none is given (its own default)."""
        size = int(self.denoiser.config.sample_size) * int(self.pipe.vae_scale_factor)
        return size, size

    def latent_shape(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, ...]:
        """Per-sample latent shape for ``height`` x ``width`` pixels, as the pipeline's prepare_latents makes it.

        Image families return (C, h, w); a video family returns (C, F, h, w) and takes ``num_frames``.
        """
        if num_frames is not None:
            raise ValueError(f"family {self.family!r} generates images; num_frames applies to video families only")
        scale = int(self.pipe.vae_scale_factor)
        return int(self.denoiser.config.in_channels), int(height) // scale, int(width) // scale

    def timestep_kwargs(self, num_steps: int, latent_shape: tuple[int, ...]) -> dict:
        """Extra keyword arguments for ``scheduler.set_timesteps`` (flow families: sigmas, resolution shift mu)."""
        return {}

    @torch.no_grad()
    def encode_negative_prompts(self, negatives: list[str] | None, n: int) -> dict[str, torch.Tensor]:
        """Conditioning of the unconditional CFG branch; ``None`` means "no negative prompt" (the empty prompt
        here; SDXL overrides it with the zeros its pipeline uses)."""
        return self.encode_prompts(list(negatives) if negatives is not None else [""] * n)

    def decode_latents(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Latents (as sampled, scaled/shifted) -> RGB in [0, 1], [N, 3, H, W], float32.

        Differentiable (no ``no_grad`` here) so that clean-image reward guidance can backpropagate through the
        VAE; ``clamp=False`` keeps values outside [0, 1] (and their gradients).
        """
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents.to(self.device, vae.dtype) / vae.config.scaling_factor + shift
        pixels = (vae.decode(z, return_dict=False)[0].float() + 1) / 2
        return pixels.clamp(0, 1) if clamp else pixels

    # ----------------------------------------------------------------- fine-tuning setup
    def add_lora(self, lora: LoraConfig, module: nn.Module | None = None) -> None:
        """Attach a peft LoRA adapter named 'default'; B is zero-initialised, so policy == base at step 0.

        ``module``: the network to adapt (default: this pipeline's denoiser; score-regularised training
        also adapts a copy of it, the fake-score network)."""
        from peft import LoraConfig as PeftLoraConfig

        cfg = PeftLoraConfig(
            r=lora.rank, lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
            lora_dropout=lora.dropout, init_lora_weights="gaussian", target_modules=list(lora.target_modules),
        )
        module = self.denoiser if module is None else module
        module.add_adapter(cfg)
        for p in module.parameters():  # LoRA weights train in float32 even over a bf16 base
            if p.requires_grad:
                p.data = p.data.float()

    def frozen_reference_copy(self, dtype: torch.dtype) -> nn.Module:
        """Full fine-tune reference: a frozen copy of the denoiser in ``dtype``."""
        ref = copy.deepcopy(self.denoiser).to(dtype=dtype)
        ref.requires_grad_(False)
        return ref.eval()

    def lora_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The LoRA weights in peft key format (``...to_q.lora_A.weight``), which every diffusers LoRA loader
        reads. Not ``convert_state_dict_to_diffusers``: with targets beyond to_q/k/v/out (e.g. SD3's
        add_q_proj) it renames only the known ones to ``lora.down``/``lora.up``, and diffusers, seeing a mixed
        dict, silently drops the renamed layers on load (measured: to_q/k/v/out of a world:flow LoRA)."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(model)

    def save_lora(self, model: nn.Module, directory: str) -> None:
        """Write the LoRA in the diffusers format: ``pipe.load_lora_weights(directory)`` loads it."""
        import diffusers

        pipeline_cls = getattr(diffusers, self.pipeline_class_name)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.lora_state_dict(model).items()}
        metadata = model.peft_config["default"].to_dict()
        for k, v in list(metadata.items()):  # sets are not JSON serialisable
            if isinstance(v, set):
                metadata[k] = sorted(v)
        pipeline_cls.save_lora_weights(
            directory, **{f"{self.denoiser_attr}_lora_layers": state,
                          f"{self.denoiser_attr}_lora_adapter_metadata": metadata},
        )

    def set_attention_backend(self, backend: str) -> None:
        """'sdpa' is diffusers' default (torch scaled_dot_product_attention, FlashAttention kernels on GPU)."""
        if backend == "xformers":
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise RuntimeError("model.attention=xformers but xformers is not installed: "
                                   "pip install 'diffalign[gpu]' or use model.attention=sdpa") from None
            self.denoiser.enable_xformers_memory_efficient_attention()



def model_dtype(model: nn.Module) -> torch.dtype:
    """dtype of the (possibly DDP-wrapped) network's first weight: what inputs are cast to.

    Weights of the modules a diffusers model keeps in float32 (``_keep_in_fp32_modules``; WanTransformer3DModel's
    ``scale_shift_table`` is its FIRST parameter) are skipped, as diffusers' own ``ModelMixin.dtype`` does: a bf16
    Wan otherwise reads as float32 and its bf16 patch embedding fails on float32 inputs.
    """
    inner = getattr(model, "module", model)  # DDP
    keep = getattr(inner, "_keep_in_fp32_modules", None) or ()
    for name, p in inner.named_parameters():
        if p.is_floating_point() and not any(k in name for k in keep):
            return p.dtype
    return next(model.parameters()).dtype
