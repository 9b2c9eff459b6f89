"""Tiny but real diffusers pipelines for every family, built offline from config.

They exist so that tests and the tiny-* recipes exercise exactly the user path: the pipeline is
built with random weights (``torch.manual_seed(0)``), written with ``save_pretrained`` and then
loaded back with ``from_pretrained`` like any SDXL folder. Configs follow diffusers' own pipeline
tests (see shared/reference/OFFLINE.md). Tokenizers are built offline: a character-level CLIP BPE
tokenizer (256 byte chars, the same with ``</w>``, start and end tokens) and a WordLevel tokenizer
over printable ASCII for the T5 slot.
"""
from __future__ import annotations

import json
import os
import string
import tempfile
from pathlib import Path

import torch

from diffalign.paths import diffalign_home

TINY_FAMILIES = ("sd15", "sdxl", "sd3", "flux", "wan")
# Pixel resolution the tiny models are meant for (VAE scale factor 2 for the UNets, 1 for SD3/FLUX, 8 for Wan).
TINY_RESOLUTION = {"sd15": 32, "sdxl": 32, "sd3": 16, "flux": 16, "wan": 16}
# Frames per sample for the tiny video families (num_frames - 1 divisible by the VAE's temporal factor 4).
TINY_NUM_FRAMES = {"wan": 9}


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_char_clip_tokenizer(model_max_length: int = 77):
    """A real ``CLIPTokenizer`` with the 514-token character vocabulary (no merges)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        # from_pretrained on vocab.json + merges.txt works across transformers 4 (file args) and 5 (dict args)
        tok = CLIPTokenizer.from_pretrained(d, model_max_length=model_max_length, pad_token="<|endoftext|>")
    return tok


def build_ascii_t5_tokenizer(model_max_length: int = 32):
    """A fast tokenizer for the T5 slot: one token per printable ASCII character, ``</s>`` appended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in string.printable[:95]:
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=model_max_length,
    )


def _clip_text(hidden: int, projection: bool, layers: int = 2, intermediate: int = 37, heads: int = 4, proj_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=hidden, intermediate_size=intermediate,
        layer_norm_eps=1e-5, num_attention_heads=heads, num_hidden_layers=layers, pad_token_id=1,
        vocab_size=1000, hidden_act="gelu", projection_dim=proj_dim,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


_TINY_T5 = dict(vocab_size=99, d_model=32, d_ff=37, d_kv=8, num_layers=5, num_heads=4,
                relative_attention_num_buckets=8, decoder_start_token_id=0)


def _t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**_TINY_T5)).eval()


def _umt5():
    """Wan's text encoder class (UMT5) with the same tiny T5 sizes."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(**_TINY_T5)).eval()


def _tiny_wan():
    """Wan 2.1 with diffusers' test sizes: 3-D VAE (8x spatial, 4x temporal), 2-layer transformer, UMT5."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return WanPipeline(tokenizer=build_ascii_t5_tokenizer(), text_encoder=_umt5(), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer=transformer)


def _unet_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, norm_num_groups=2,
        sample_size=32,
    )


def _flow_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )


def build_tiny_pipeline(family: str, prediction_type: str = "epsilon"):
    """A randomly initialised (seed 0) diffusers pipeline of ``family`` with tiny components."""
    from diffusers import (DDPMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny model for family {family!r}; choose one of {TINY_FAMILIES}")
    torch.manual_seed(0)
    ddpm = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    if family == "sd15":
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
        )
        return StableDiffusionPipeline(
            unet=unet, vae=_unet_vae(), text_encoder=_clip_text(32, projection=False),
            tokenizer=build_char_clip_tokenizer(), scheduler=DDPMScheduler(**ddpm),
            safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        )
    if family == "wan":
        return _tiny_wan()
    if family == "sdxl":
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=8, sample_size=16,
            in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        )
        return StableDiffusionXLPipeline(
            unet=unet, vae=_unet_vae(), text_encoder=_clip_text(32, projection=False),
            text_encoder_2=_clip_text(32, projection=True), tokenizer=build_char_clip_tokenizer(),
            tokenizer_2=build_char_clip_tokenizer(), scheduler=DDPMScheduler(**ddpm),
            image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True,
        )
    if family == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        )
        return StableDiffusion3Pipeline(
            transformer=transformer, vae=_flow_vae(4), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=_clip_text(32, projection=True, layers=5), tokenizer=build_char_clip_tokenizer(),
            text_encoder_2=_clip_text(32, projection=True, layers=5), tokenizer_2=build_char_clip_tokenizer(),
            text_encoder_3=_t5(), tokenizer_3=build_ascii_t5_tokenizer(),
        )
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    return FluxPipeline(
        transformer=transformer, vae=_flow_vae(1), scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=_clip_text(32, projection=False, layers=5), tokenizer=build_char_clip_tokenizer(),
        text_encoder_2=_t5(), tokenizer_2=build_ascii_t5_tokenizer(),
    )


def save_tiny_pipeline(family: str, path: str | Path, prediction_type: str = "epsilon") -> Path:
    """Build the tiny ``family`` pipeline and ``save_pretrained`` it to ``path`` (a normal diffusers folder)."""
    path = Path(path)
    build_tiny_pipeline(family, prediction_type).save_pretrained(path)
    return path


def materialize_tiny(spec: str) -> Path:
    """Resolve 'tiny:<family>[-v]' to a saved folder under diffalign_home(), building it once.

    'tiny:sd15-v' is the v-prediction variant of the SD1.5 tiny model.
    """
    name = spec.split(":", 1)[1]
    family, _, suffix = name.partition("-")
    prediction_type = "v_prediction" if suffix == "v" else "epsilon"
    target = diffalign_home() / "tiny" / name
    if not (target / "model_index.json").is_file():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        save_tiny_pipeline(family, tmp, prediction_type)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its folder is identical
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return target
