"""Fresh (untrained) diffusers pipelines for the embedded world, ready for `diffalign world pretrain`.

Two generators, one per training path:
- ``unet``: StableDiffusionPipeline (eps-prediction UNet2DConditionModel, DDPM schedule): Diffusion-DPO.
- ``flow``: StableDiffusion3Pipeline (SD3Transformer2DModel, rectified flow, two CLIP encoders, no T5):
  Flow-DPO.
Both share the world's image size (32x32 RGB), a small AutoencoderKL (f=2, 4 latent channels) and a
real CLIP BPE tokenizer whose merges spell each world word as ONE token, so a tiny text encoder only has
to learn a closed vocabulary (a character-level tokenizer makes it learn spelling first).

And one text-to-video generator for the video world (diffalign.world.video), on the Wan path:
- ``video``: WanPipeline (WanTransformer3DModel, rectified flow) on 16x16 clips of VIDEO_GEN_FRAMES = 9
  frames, a small AutoencoderKLWan (2x spatial, 2x temporal, 4 latent channels: latents [4, 5, 8, 8]),
  a tiny UMT5 encoder (Wan's text encoder class) and the same kind of word-level CLIP tokenizer over
  the video captions' words. Sample it with ``max_sequence_length=VIDEO_TEXT_LEN``: Wan pads the text
  to that many zero tokens, and the cross-attention was trained with 16, not the pipeline's 512.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from diffalign.models.tiny import _bytes_to_unicode

WORLD_IMAGE_SIZE = 32
TEXT_HIDDEN = 64
# Wan's causal VAE encodes one frame then chunks of 4, so clips need 4k + 1 frames (8 would lose 3).
VIDEO_GEN_FRAMES = 9
VIDEO_TEXT_LEN = 16  # tokens: the longest video caption is 11 words + start + end
# The generator's clips are written and read at this rate. The world's motion is defined per clip (not per
# second), so the rate is a label; 10 fps is a whole number of GIF delay units (1/100 s), so GIF files
# round-trip every frame exactly.
VIDEO_GEN_FPS = 10.0


def world_words() -> list[str]:
    """Every word a world caption can contain."""
    from diffalign.world.scenes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene

    words: set[str] = set()
    for vocab in (SHAPES, tuple(COLORS), tuple(BACKGROUNDS), SIZES, POSITIONS):
        for phrase in vocab:
            words.update(phrase.split())
    sample = Scene(SHAPES[0], next(iter(COLORS)), SIZES[0], POSITIONS[0], next(iter(BACKGROUNDS)))
    words.update(sample.caption().split())
    words.update(Scene(SHAPES[0], next(iter(COLORS)), SIZES[0], "center", next(iter(BACKGROUNDS))).caption().split())
    return sorted(words)


def build_word_clip_tokenizer(words: list[str], model_max_length: int = 77):
    """A real CLIPTokenizer (byte-level BPE) with merges that assemble each word into a single token.

    Vocab: 256 byte chars, the same with '</w>', the merged prefixes of every word, then the start and
    end tokens. BPE applies the lowest-ranked merge first, so a short word's first merge (e.g. 'g r' of
    'green') would fire inside a longer word ('background'); laying out whole chains longest word first
    avoids that for this vocabulary (the world tests check every word is one token).
    """
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for word in sorted(words, key=lambda w: (-len(w), w)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))
            left = left + right
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
        return CLIPTokenizer.from_pretrained(d, model_max_length=model_max_length, pad_token="<|endoftext|>")


def _text_encoder(tokenizer, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def build_world_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=8, sample_size=WORLD_IMAGE_SIZE, mid_block_add_attention=False,
        shift_factor=0.0,  # SD3 pipelines add it when decoding; None would break them
    )


def build_world_video_vae(seed: int = 0):
    """AutoencoderKLWan for 16x16 clips: 2x spatial and 2x temporal compression, 4 latent channels.

    One down level (dim_mult [1, 2]) with temporal downsampling: 9 frames -> 5 latent frames of 8x8.
    ``scale_factor_*`` must be set by hand (WanPipeline reads them from the config, defaults 4 and 8).
    latents_mean / latents_std are placeholders until the VAE is trained (pretrain sets them per channel).
    """
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=16, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                            latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=2,
                            scale_factor_spatial=2)


def _umt5_encoder(tokenizer, seed: int):
    """A tiny UMT5 encoder (Wan's text encoder class) over the word-level tokenizer's vocabulary."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=TEXT_HIDDEN, d_ff=4 * TEXT_HIDDEN, d_kv=16, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ))


NOISE_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear")
UNET_LEVELS: tuple[int, ...] = (2, 3)  # 16x16 -> 8x8 (the bundled UNet) | down to 4x4


def world_ddpm_scheduler(noise_schedule: str = "scaled_linear"):
    """The world UNet's DDPM scheduler (eps prediction, 1000 steps).

    'scaled_linear' is SD1.5's (0.00085 .. 0.012, leading spacing), the bundled UNet's: sqrt(alpha_bar_T) =
    0.068, which leaves a 16x16 latent's low frequencies readable at t = T (a model trained on it puts 52%
    of objects at the captioned position when sampling starts from noise WITH that leak, 8% from pure
    noise). 'linear' is DDPM's (1e-4 .. 0.02, trailing spacing so sampling starts at t = 999):
    sqrt(alpha_bar_T) = 0.0066. Removing the leak alone did not teach the UNet position words
    (BENCHMARKS, "The UNet ignores position words").
    """
    from diffusers import DDPMScheduler

    if noise_schedule == "linear":
        return DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                             prediction_type="epsilon", clip_sample=False, timestep_spacing="trailing",
                             steps_offset=1)  # unused by trailing spacing; StableDiffusionPipeline warns without it
    if noise_schedule == "scaled_linear":
        return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False, steps_offset=1)
    raise ValueError(f"unknown noise_schedule {noise_schedule!r}: use one of {NOISE_SCHEDULES}")


def build_world_pipeline(kind: str, vae, seed: int = 0, noise_schedule: str = "scaled_linear", unet_levels: int = 2):
    """An untrained world pipeline of ``kind`` ('unet', 'flow' or 'video') around a (trained) ``vae``;
    ``noise_schedule`` (see :func:`world_ddpm_scheduler`) and ``unet_levels`` (2: 16x16 -> 8x8, the bundled
    UNet; 3: down to 4x4) are the UNet's."""
    if unet_levels not in UNET_LEVELS:
        raise ValueError(f"unet_levels={unet_levels}: use one of {UNET_LEVELS}")
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)

    tokenizer = build_word_clip_tokenizer(world_words())
    latent = WORLD_IMAGE_SIZE // 2
    if kind == "unet":
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            # text enters at 8x8 (and 4x4 with three levels) and in the mid block; attention at 16x16 would
            # cost 4x per step on a CPU
            sample_size=latent, in_channels=4, out_channels=4, block_out_channels=(48, 96, 96)[:unet_levels],
            layers_per_block=1, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (unet_levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (unet_levels - 1) + ("UpBlock2D",),
            cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=16,
        )
        scheduler = world_ddpm_scheduler(noise_schedule)
        return StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=_text_encoder(tokenizer, False, seed + 1), tokenizer=tokenizer,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
            requires_safety_checker=False,
        )
    if kind == "flow":
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=latent, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=2 * TEXT_HIDDEN, caption_projection_dim=128,
            pooled_projection_dim=2 * TEXT_HIDDEN, pos_embed_max_size=latent // 2,
        )
        return StableDiffusion3Pipeline(
            transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
            text_encoder=_text_encoder(tokenizer, True, seed + 1), tokenizer=tokenizer,
            text_encoder_2=_text_encoder(tokenizer, True, seed + 2), tokenizer_2=tokenizer,
            text_encoder_3=None, tokenizer_3=None,
        )
    if kind == "video":
        from diffusers import WanPipeline, WanTransformer3DModel

        from diffalign.world.video import video_words

        tokenizer = build_word_clip_tokenizer(video_words())
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(
            # patch (1, 2, 2) on [4, 5, 8, 8] latents: 80 tokens a clip; head dim 32 splits into rope
            # parts of 12 (time) + 10 + 10 (space)
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4,
            text_dim=TEXT_HIDDEN, freq_dim=256, ffn_dim=256, num_layers=4, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        )
        return WanPipeline(tokenizer=tokenizer, text_encoder=_umt5_encoder(tokenizer, seed + 1), vae=vae,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), transformer=transformer)
    raise ValueError(f"unknown world generator kind {kind!r}: use 'unet', 'flow' or 'video'")
