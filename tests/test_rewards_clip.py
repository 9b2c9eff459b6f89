"""CLIP-family scorers: each loader is proven by building a tiny model of the same architecture family, saving
it in the OFFICIAL file format, loading it back through the user path (``build_reward("NAME:...")``) and
checking it reproduces the original model's scores and the official score formula.  Preprocessing is checked
against the libraries' own transforms (open_clip ``preprocess``, transformers CLIPProcessor) bit for bit, and the
differentiable tensor path against the official PIL path with measured tolerances."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import open_clip
from diffalign.rewards import RewardError, available, build_reward
from diffalign.rewards import clip_family as cf

# Tiny configs of the real architecture families (ViT image tower + causal text transformer, BPE tokenizer of
# 49,408 tokens, 224 px input so the preprocessing is the real one): B/32 and L/14 with QuickGELU like the
# OpenAI weights, H/14 with GELU like the laion/HPS weights.  L/14 keeps the real 768-d embedding so the
# aesthetic MLP has exactly the official shapes.
_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
TINY_ARCHS = {
    "diffalign-tiny-ViT-B-32-quickgelu": {"embed_dim": 32, "quick_gelu": True, "text_cfg": _TEXT, "vision_cfg": {
        "image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32}},
    "diffalign-tiny-ViT-H-14": {"embed_dim": 32, "text_cfg": _TEXT, "vision_cfg": {
        "image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14}},
    "diffalign-tiny-ViT-L-14-quickgelu": {"embed_dim": 768, "quick_gelu": True, "text_cfg": _TEXT, "vision_cfg": {
        "image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14}},
}
TINY_B32, TINY_H14, TINY_L14 = TINY_ARCHS

PROMPTS = ["a red ball on grass", "a cat", "two people hiking in snowy mountains at dawn"]

# laion/CLIP-ViT-H-14-laion2B-s32B-b79K's preprocessor_config.json (the processor PickScore's snippet loads),
# in its original old-style format (integer sizes)
LAION_PREPROCESSOR_CONFIG = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "size": 224,
}
OFFICIAL_AESTHETIC_KEYS = sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))

# Differentiable vs official path, measured on the images below (|diff| of normalised pixels): max 0.01501,
# i.e. exactly one uint8 step (1/255) over the smallest std 0.2613, mean 2.2e-6 .. 1.7e-4 depending on the size
# (without the straight-through uint8 rounding: max 0.0163, mean 3.9e-3).  The tolerances leave a margin.
ONE_STEP = 1 / 255 / min(open_clip.OPENAI_DATASET_STD)
PIXEL_MAX_TOL = ONE_STEP * 1.01
PIXEL_MEAN_TOL = 1e-3


class NotATensor:
    """An arbitrary object: a checkpoint that pickles one must be refused, not executed."""


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def tiny_archs(tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in TINY_ARCHS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)  # the documented way to register architecture configs


def tiny_open_clip(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.create_model(arch).eval()


def make_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth colour waves with a flat disc (sharp edges), on the uint8 grid like images read from PNG."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    out = []
    for _ in range(n):
        f = torch.rand(3, 3, generator=g) * 6
        img = torch.stack([0.5 + 0.5 * torch.sin(f[c, 0] * xx * 3 + f[c, 1] * yy * 2 + f[c, 2]) for c in range(3)])
        cx, cy = torch.rand(2, generator=g).tolist()
        img = torch.where((xx - cx) ** 2 + (yy - cy) ** 2 < 0.05, torch.rand(3, 1, 1, generator=g), img)
        out.append(img)
    return (torch.stack(out) * 255).round() / 255


def pil_from_uint8(images: torch.Tensor) -> list[Image.Image]:
    """Independent of cf.to_pil_images: how a user's PNG would arrive in the official scripts."""
    arr = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


# 256x301 resizes to 224x263 (odd crop margin 39: torchvision rounds the origin to 20, transformers floors to
# 19), 180x200 is an upscale, 512x384 a portrait downscale
SIZES = [(256, 301), (180, 200), (512, 384)]


@pytest.fixture(scope="module")
def hps_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = tiny_open_clip(TINY_H14, seed=1)
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)  # what hpsv2 reads: checkpoint['state_dict']
    return path, model


@pytest.fixture(scope="module")
def pickscore_folder(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    from transformers import CLIPConfig, CLIPModel

    from diffalign.models.tiny import build_char_clip_tokenizer

    tok = build_char_clip_tokenizer(model_max_length=77)
    vocab = len(tok)  # 514: 256 byte chars, the same with </w>, <|startoftext|>, <|endoftext|>
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(2)
    model = CLIPModel(cfg).eval()
    folder = tmp_path_factory.mktemp("pickscore") / "PickScore_v1"
    model.save_pretrained(folder)  # config.json + model.safetensors, like the hub repo
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(LAION_PREPROCESSOR_CONFIG))
    return folder, model


# ------------------------------------------------------------------------------------------ registry
def test_registered_with_dimensions_and_prompt_needs():
    entries = available()
    for name, cls, needs_prompt in [("clipscore", cf.CLIPScore, True), ("pickscore", cf.PickScore, True),
                                    ("hps", cf.HPSv2, True), ("aesthetic", cf.LaionAesthetic, False)]:
        assert entries[name].dimensions == (name,)
        assert entries[name].input_kind == "image"
        assert cls.name == name and cls.dimensions == (name,) and cls.input_kind == "image"
        assert cls.needs_prompt is needs_prompt


# ------------------------------------------------------------------------------------------ formulas
def test_score_formulas_on_hand_vectors():
    img = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    txt = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [0.0, 1.0]])
    cos = torch.tensor([1 / math.sqrt(2), -1.0, 1.0])
    torch.testing.assert_close(cf.hps_from_features(img, txt), cos)
    # CLIP-S clips negative cosines to 0 and scales by w = 2.5
    torch.testing.assert_close(cf.clipscore_from_features(img, txt), torch.tensor([2.5 / math.sqrt(2), 0.0, 2.5]))
    torch.testing.assert_close(cf.pickscore_from_features(img, txt, torch.tensor(math.log(100.0))), 100 * cos)


# ------------------------------------------------------------------------------------------ preprocessing
@pytest.mark.parametrize("h,w", SIZES)
def test_official_path_equals_open_clip_preprocess(hps_file, h, w):
    path, _ = hps_file
    reward = build_reward(f"hps:{path}?arch={TINY_H14}")
    _, _, preprocess = open_clip.create_model_and_transforms(TINY_H14)  # open_clip's own validation transform
    images = make_images(3, h, w)
    expected = torch.stack([preprocess(p) for p in pil_from_uint8(images)])
    assert torch.equal(reward.official_pixels(images), expected)
    # and that transform is the official CLIP one: 224 bicubic shortest side, torchvision crop, OpenAI mean/std
    assert reward.prep == cf.ClipImagePrep(224, (224, 224), open_clip.OPENAI_DATASET_MEAN,
                                           open_clip.OPENAI_DATASET_STD, "round")


@pytest.mark.parametrize("h,w", SIZES)
def test_official_path_equals_clip_processor(pickscore_folder, h, w):
    from transformers import CLIPProcessor

    folder, _ = pickscore_folder
    reward = build_reward(f"pickscore:{folder}")
    processor = CLIPProcessor(image_processor=cf._pil_image_processor_class()(**LAION_PREPROCESSOR_CONFIG),
                              tokenizer=reward.tokenizer)
    images = make_images(3, h, w)
    expected = processor(images=pil_from_uint8(images), text=PROMPTS, padding=True, truncation=True, max_length=77,
                         return_tensors="pt")
    assert torch.equal(reward.official_pixels(images), expected["pixel_values"])
    assert torch.equal(reward.tokenize(PROMPTS)["input_ids"], expected["input_ids"])
    assert reward.prep == cf.ClipImagePrep(224, (224, 224), tuple(LAION_PREPROCESSOR_CONFIG["image_mean"]),
                                           tuple(LAION_PREPROCESSOR_CONFIG["image_std"]), "floor")


@pytest.mark.parametrize("crop_offset", ["round", "floor"])
@pytest.mark.parametrize("h,w", SIZES)
def test_differentiable_path_matches_official_pixels(hps_file, pickscore_folder, h, w, crop_offset):
    path, _ = hps_file
    reward = (build_reward(f"hps:{path}?arch={TINY_H14}") if crop_offset == "round"
              else build_reward(f"pickscore:{pickscore_folder[0]}"))
    noise = (torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(4)) * 255).round() / 255
    images = torch.cat([make_images(2, h, w, seed=3), noise])
    official = reward.official_pixels(images)
    tensor_path = cf.differentiable_preprocess(images, reward.prep)
    diff = (official - tensor_path).abs()
    assert diff.max() <= PIXEL_MAX_TOL, f"max {diff.max():.5f}"
    assert diff.mean() <= PIXEL_MEAN_TOL, f"mean {diff.mean():.6f}"
    # the crop convention matters: the other library's origin misaligns by a pixel on 256x301
    other = cf.ClipImagePrep(**{**reward.prep.__dict__, "crop_offset": "floor" if crop_offset == "round" else "round"})
    if (h, w) == (256, 301):
        assert (official - cf.differentiable_preprocess(images, other)).abs().mean() > 20 * PIXEL_MEAN_TOL


def test_differentiable_scores_close_and_gradients_reach_images(hps_file):
    path, _ = hps_file
    reward = build_reward(f"hps:{path}?arch={TINY_H14}")
    images = make_images(3, 256, 301, seed=5)
    official = reward(images, PROMPTS)["hps"]
    assert not reward.differentiable
    reward = build_reward(f"hps:{path}?arch={TINY_H14}&differentiable=1")
    assert reward.differentiable
    x = images.clone().requires_grad_(True)
    scores = reward(x, PROMPTS)["hps"]
    assert scores.requires_grad and official.grad_fn is None
    # measured: <= 5.7e-5 apart on these images (cosines of magnitude ~0.1)
    torch.testing.assert_close(scores.detach(), official, rtol=0, atol=5e-4)
    scores.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.model.parameters())  # the reward model stays frozen


# ------------------------------------------------------------------------------------------ HPS
def _hpsv2_reference(model: torch.nn.Module, preprocess, images: torch.Tensor, prompts) -> torch.Tensor:
    """hpsv2.score, verbatim in spirit: outputs = model(image, text) with output_dict; diag(I @ T.T)."""
    tokenizer = open_clip.get_tokenizer(TINY_H14)
    model.output_dict = True
    with torch.no_grad():
        out = model(torch.stack([preprocess(p) for p in pil_from_uint8(images)]), tokenizer(prompts))
    model.output_dict = False
    return torch.diagonal(out["image_features"] @ out["text_features"].T)


def test_hps_round_trip_official_file(hps_file):
    path, original = hps_file
    reward = build_reward(f"hps:{path}?arch={TINY_H14}")
    assert isinstance(reward, cf.HPSv2)
    loaded = reward.model.state_dict()
    assert loaded.keys() == original.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in original.state_dict().items())

    images = make_images(3, 256, 301, seed=6)
    scores = reward(images, PROMPTS)["hps"]
    assert scores.shape == (3,) and scores.dtype == torch.float32
    # the same computation on the in-memory original gives bit-identical scores
    _, _, preprocess = open_clip.create_model_and_transforms(TINY_H14)
    bundle = cf.OpenClipBundle(original, preprocess, open_clip.get_tokenizer(TINY_H14), reward.prep, "memory")
    assert torch.equal(scores, cf.HPSv2(bundle)(images, PROMPTS)["hps"])
    # and it is hpsv2's formula
    torch.testing.assert_close(scores, _hpsv2_reference(original, preprocess, images, PROMPTS), rtol=0, atol=1e-6)


def test_hps_accepts_folder_plain_and_ddp_state_dicts(hps_file, tmp_path):
    path, original = hps_file
    images = make_images(2, 180, 200, seed=7)
    expected = build_reward(f"hps:{path}?arch={TINY_H14}")(images, PROMPTS[:2])["hps"]
    # a folder holding the official file name
    assert torch.equal(build_reward(f"hps:{path.parent}?arch={TINY_H14}")(images, PROMPTS[:2])["hps"], expected)
    # a bare state dict with DDP's module. prefix
    ddp = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in original.state_dict().items()}, ddp)
    assert torch.equal(build_reward(f"hps:{ddp}?arch={TINY_H14}")(images, PROMPTS[:2])["hps"], expected)


def test_hps_refuses_pickled_objects_and_wrong_architecture(hps_file, tmp_path):
    path, original = hps_file
    evil = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": original.state_dict(), "extra": NotATensor()}, evil)
    with pytest.raises(RewardError, match="weights_only"):
        build_reward(f"hps:{evil}?arch={TINY_H14}")
    with pytest.raises(RewardError, match=f"does not fit the architecture open_clip '{TINY_B32}'"):
        build_reward(f"hps:{path}?arch={TINY_B32}")


# ------------------------------------------------------------------------------------------ CLIPScore
def test_clipscore_round_trip_safetensors_and_bin(tmp_path):
    from safetensors.torch import save_file

    original = tiny_open_clip(TINY_B32, seed=8)
    st = tmp_path / "open_clip_model.safetensors"  # open_clip's hub file names
    save_file(original.state_dict(), str(st))
    pt = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(original.state_dict(), pt)

    reward = build_reward(f"clipscore:{TINY_B32}/{st}")  # open_clip's "MODEL/PRETRAINED" form
    assert isinstance(reward, cf.CLIPScore)
    # QuickGELU, as the OpenAI weights need, comes from the -quickgelu architecture
    assert isinstance(reward.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)

    images = make_images(3, 512, 384, seed=9)
    scores = reward(images, PROMPTS)["clipscore"]
    assert torch.equal(scores, build_reward(f"clipscore:{pt}?arch={TINY_B32}")(images, PROMPTS)["clipscore"])

    # by hand: Hessel et al. with the official prefix, from the original model's normalised features
    _, _, preprocess = open_clip.create_model_and_transforms(TINY_B32)
    tok = open_clip.get_tokenizer(TINY_B32)
    with torch.no_grad():
        fi = original.encode_image(torch.stack([preprocess(p) for p in pil_from_uint8(images)]))
        fi = fi / fi.norm(dim=-1, keepdim=True)
        for prefix, spec in [("A photo depicts ", f"clipscore:{st}?arch={TINY_B32}"),
                             ("", f"clipscore:{st}?arch={TINY_B32}&prefix=")]:
            ft = original.encode_text(tok([prefix + p for p in PROMPTS]))
            ft = ft / ft.norm(dim=-1, keepdim=True)
            by_hand = 2.5 * torch.clamp((fi * ft).sum(-1), min=0)
            torch.testing.assert_close(build_reward(spec)(images, PROMPTS)["clipscore"], by_hand, rtol=0, atol=1e-6)
    assert torch.equal(scores, build_reward(f"clipscore:{st}?arch={TINY_B32}")(images, PROMPTS)["clipscore"])


def test_clipscore_tag_and_spec_errors():
    with pytest.raises(RewardError, match="neither a file nor a pretrained tag.*openai"):
        build_reward("clipscore:ViT-B-32/not-a-tag")
    with pytest.raises(RewardError, match="weights file not found: /no/such/clip.safetensors"):
        build_reward("clipscore:/no/such/clip.safetensors")
    with pytest.raises(RewardError, match="unknown option 'archh'.*arch"):
        build_reward("clipscore:openai?archh=ViT-B-32")
    with pytest.raises(RewardError, match="unknown open_clip architecture 'ViT-Z-99'"):
        build_reward("clipscore:openai?arch=ViT-Z-99")


# ------------------------------------------------------------------------------------------ aesthetic
def test_aesthetic_round_trip_official_mlp_file(tmp_path):
    clip = tiny_open_clip(TINY_L14, seed=10)
    clip_file = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clip.state_dict(), clip_file)
    torch.manual_seed(11)
    mlp = cf.AestheticMLP(768).eval()
    assert sorted(mlp.state_dict()) == OFFICIAL_AESTHETIC_KEYS
    assert [tuple(mlp.state_dict()[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == \
        [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    mlp_file = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(mlp.state_dict(), mlp_file)  # the official file is a plain state dict

    reward = build_reward(f"aesthetic:{mlp_file}?clip_arch={TINY_L14}&clip={clip_file}")
    assert isinstance(reward, cf.LaionAesthetic)
    assert all(torch.equal(reward.mlp.state_dict()[k], v) for k, v in mlp.state_dict().items())
    images = make_images(3, 256, 301, seed=12)
    scores = reward(images)["aesthetic"]  # no prompt needed
    assert scores.shape == (3,)
    assert torch.equal(scores, reward(images)["aesthetic"])  # eval mode: dropout off, deterministic
    # the folder spec finds the official file name
    assert torch.equal(build_reward(f"aesthetic:{tmp_path}?clip_arch={TINY_L14}&clip={clip_file}")(images)["aesthetic"],
                       scores)
    # simple_inference.py by hand: normalised CLIP image embedding -> MLP
    _, _, preprocess = open_clip.create_model_and_transforms(TINY_L14)
    with torch.no_grad():
        emb = clip.encode_image(torch.stack([preprocess(p) for p in pil_from_uint8(images)]))
        by_hand = mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(scores, by_hand, rtol=0, atol=1e-6)


def test_aesthetic_embedding_size_mismatch_is_clear(tmp_path):
    torch.save(cf.AestheticMLP(768).state_dict(), tmp_path / "mlp.pth")
    torch.save(tiny_open_clip(TINY_B32).state_dict(), tmp_path / "clip.bin")
    with pytest.raises(RewardError, match="expects 768-d CLIP embeddings but .* gives 32-d"):
        build_reward(f"aesthetic:{tmp_path / 'mlp.pth'}?clip_arch={TINY_B32}&clip={tmp_path / 'clip.bin'}")


# ------------------------------------------------------------------------------------------ PickScore
def test_pickscore_round_trip_save_pretrained_folder(pickscore_folder, tmp_path):
    folder, original = pickscore_folder
    assert (folder / "model.safetensors").is_file()
    reward = build_reward(f"pickscore:{folder}")
    assert isinstance(reward, cf.PickScore)
    assert all(torch.equal(reward.model.state_dict()[k], v) for k, v in original.state_dict().items())

    images = make_images(3, 256, 301, seed=13)
    scores = reward(images, PROMPTS)["pickscore"]
    assert scores.shape == (3,)
    same_on_original = cf.PickScore(original, reward.image_processor, reward.tokenizer)(images, PROMPTS)["pickscore"]
    assert torch.equal(scores, same_on_original)

    # the official snippet, by hand: processor -> get_*_features -> normalise -> logit_scale.exp() * cos
    inputs_i = reward.image_processor(images=pil_from_uint8(images), return_tensors="pt")
    inputs_t = reward.tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        fi = original.get_image_features(pixel_values=inputs_i["pixel_values"])
        ft = original.get_text_features(input_ids=inputs_t["input_ids"], attention_mask=inputs_t["attention_mask"])
        fi = fi if isinstance(fi, torch.Tensor) else fi.pooler_output  # transformers 5 returns an output object
        ft = ft if isinstance(ft, torch.Tensor) else ft.pooler_output
        fi, ft = fi / fi.norm(dim=-1, keepdim=True), ft / ft.norm(dim=-1, keepdim=True)
        by_hand = original.logit_scale.exp() * (fi * ft).sum(-1)
        # CLIPModel's own logits agree: diag(logits_per_image) = logit_scale.exp() * cos
        logits = original(pixel_values=inputs_i["pixel_values"], **inputs_t).logits_per_image.diagonal()
    torch.testing.assert_close(scores, by_hand, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(scores, logits, rtol=1e-6, atol=1e-5)


def test_pickscore_processor_option_and_missing_processor(pickscore_folder, tmp_path):
    folder, original = pickscore_folder
    model_only = tmp_path / "model_only"
    original.save_pretrained(model_only)
    images = make_images(2, 180, 200, seed=14)
    expected = build_reward(f"pickscore:{folder}")(images, PROMPTS[:2])["pickscore"]
    assert torch.equal(build_reward(f"pickscore:{model_only}?processor={folder}")(images, PROMPTS[:2])["pickscore"],
                       expected)
    if _hub_cached(cf.PICKSCORE_PROCESSOR, "preprocessor_config.json"):
        pytest.skip("the laion processor is in this machine's hub cache")
    # no processor in the folder -> the official laion processor id, which is not cached offline
    with pytest.raises(RewardError, match="processor from 'laion/CLIP-ViT-H-14-laion2B-s32B-b79K'.*save_pretrained"):
        build_reward(f"pickscore:{model_only}")


# ------------------------------------------------------------------------------------------ offline errors
def _hub_cached(repo: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename), str)


@pytest.mark.parametrize("spec,repo,filename", [
    ("hps", "xswu/HPSv2", "HPS_v2.1_compressed.pt"),
    ("hps:v2", "xswu/HPSv2", "HPS_v2_compressed.pt"),
    ("aesthetic", "trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"),
    ("pickscore", "yuvalkirstain/PickScore_v1", "config.json"),
    ("clipscore", "timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors"),
])
def test_uncached_hub_ids_fail_fast_and_clearly(spec, repo, filename, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if _hub_cached(repo, filename):
        pytest.skip(f"{repo}/{filename} is in this machine's hub cache")
    start = time.monotonic()
    with pytest.raises(RewardError) as err:
        build_reward(spec)
    assert time.monotonic() - start < 30  # offline: no network wait, no hang
    message = str(err.value)
    assert f"reward '{spec.partition(':')[0]}'" in message
    assert repo in message
    assert "download" in message


def test_missing_local_files_are_named():
    with pytest.raises(RewardError, match="weights file not found: /no/such/HPS_v2.1_compressed.pt"):
        build_reward("hps:/no/such/HPS_v2.1_compressed.pt")
    with pytest.raises(RewardError, match="model folder not found: /no/such/PickScore_v1"):
        build_reward("pickscore:/no/such/PickScore_v1")


def test_bad_inputs_are_refused(hps_file):
    path, _ = hps_file
    reward = build_reward(f"hps:{path}?arch={TINY_H14}")
    with pytest.raises(RewardError, match=r"\[N, 3, H, W\]"):
        reward(torch.rand(2, 4, 32, 32), PROMPTS[:2])
    with pytest.raises(RewardError, match="float"):
        reward(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), PROMPTS[:2])
    with pytest.raises(RewardError, match="needs prompts"):
        reward(torch.rand(2, 3, 32, 32))
