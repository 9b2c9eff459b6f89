"""Trained reward models: data readers, save/load, gradients, the train-reward CLI and a short learning run."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.data.preference import DataError
from diffalign.rewards.base import RewardError

WORLD_DIMS = ["color", "shape", "background", "layout"]
TINY = ["model.pretrained=world", "model.text_pretrained=world", "model.image_size=32", "model.patch_size=4", "model.hidden_size=32", "model.vision_layers=1",
        "model.text_layers=1", "model.num_heads=2", "model.max_text_length=20", "model.fusion_dim=32",
        "model.fusion_layers=1", "model.head_hidden=32", "model.latent_width=16", "model.latent_levels=2"]


def _cfg(*overrides: str):
    from diffalign.rewards.train_cli import load_reward_config

    return load_reward_config("world-reward", [*TINY, *overrides])


# ------------------------------------------------------------------------------------------- data

def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    from diffalign.rewards.media import write_video

    write_video(path, frames, fps)


def _csv(path: Path, rows: list[dict], header: list[str] | None = None) -> Path:
    header = header or ["path_A", "path_B", "prompt", "VQ", "MQ", "TA", "fps_A", "fps_B"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


@pytest.fixture
def clips(tmp_path) -> Path:
    """Two short GIF clips in tmp_path/videos (16x16, 4 frames at 10 fps)."""
    (tmp_path / "videos").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.gif", "b.gif"):
        _write_gif(tmp_path / "videos" / name, rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8), 10)
    return tmp_path


def test_videoalign_csv_labels_ties_and_missing(clips):
    from diffalign.rewards.data import read_videoalign_csv

    rows = [
        {"path_A": "videos/a.gif", "path_B": "videos/b.gif", "prompt": "p0", "VQ": "A", "MQ": "B", "TA": "same"},
        {"path_A": "videos/b.gif", "path_B": "videos/a.gif", "prompt": "p1", "VQ": "tie", "MQ": "", "TA": " b ",
         "fps_A": "24", "fps_B": ""},
        {"path_A": "videos/a.gif", "path_B": "videos/b.gif", "prompt": "p2", "VQ": "", "MQ": "nan", "TA": ""},
    ]
    pairs = read_videoalign_csv(_csv(clips / "data.csv", rows))
    assert len(pairs) == 2 and pairs.dropped_unlabelled == 1  # the row with no label at all
    assert pairs.labels.tolist() == [[1, -1, 0], [0, 0, -1]]
    assert pairs.mask.tolist() == [[True, True, True], [True, False, True]]
    assert pairs.fps_a == [None, 24.0] and pairs.fps_b == [None, None]
    assert pairs.paths_a[0] == str(clips / "videos" / "a.gif")  # relative to the CSV's folder
    assert pairs.label_counts()["MQ"] == {"A": 0, "B": 1, "same": 0, "missing": 1}


@pytest.mark.parametrize("row,message", [
    ({"VQ": "maybe"}, r"row 0 \(line 2\), column 'VQ': label 'maybe' is not one of A, B, same"),
    ({"path_A": "videos/nope.mp4"}, r"row 0 \(line 2\), column 'path_A': file not found: .*nope.mp4"),
    ({"path_B": ""}, r"row 0 \(line 2\), column 'path_B': empty path"),
    ({"fps_B": "-3"}, r"column 'fps_B': fps '-3' is not a positive number"),
    ({"prompt": "  "}, r"column 'prompt': empty prompt"),
])
def test_videoalign_csv_errors_name_row_and_column(clips, row, message):
    from diffalign.rewards.data import read_videoalign_csv

    good = {"path_A": "videos/a.gif", "path_B": "videos/b.gif", "prompt": "p", "VQ": "A", "MQ": "A", "TA": "A"}
    with pytest.raises(DataError, match=message):
        read_videoalign_csv(_csv(clips / "bad.csv", [{**good, **row}]))


def test_videoalign_csv_structure_errors_and_root(clips, tmp_path):
    from diffalign.rewards.data import read_videoalign_csv

    with pytest.raises(DataError, match=r"missing column\(s\) \['TA'\]"):
        read_videoalign_csv(_csv(tmp_path / "cols.csv", [], ["path_A", "path_B", "prompt", "VQ", "MQ"]))
    with pytest.raises(DataError, match="header but no rows"):
        read_videoalign_csv(_csv(tmp_path / "empty.csv", []))
    # data.root: relative paths resolve against it instead of the CSV's folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    row = {"path_A": "videos/a.gif", "path_B": "videos/b.gif", "prompt": "p", "VQ": "A", "MQ": "B", "TA": "same"}
    pairs = read_videoalign_csv(_csv(elsewhere / "d.csv", [row]), root=clips)
    assert pairs.paths_b == [str(clips / "videos" / "b.gif")]


def test_world_pairs_labels_follow_oracle_scores_with_a_tie_margin(tmp_path):
    import pyarrow.parquet as pq

    from diffalign.rewards.data import read_world_pairs
    from diffalign.world.pairs import make_render_pairs
    from diffalign.world.scenes import prompt_splits

    caps = [s.caption() for s in prompt_splits(0)[0][:6]]
    make_render_pairs(caps, tmp_path / "p.parquet", per_caption=2, seed=3)
    table = pq.read_table(tmp_path / "p.parquet").to_pydict()
    for margin in (0.0, 0.1):
        pairs = read_world_pairs(tmp_path / "p.parquet", WORLD_DIMS, margin)
        assert len(pairs) == 12 and pairs.images_a.shape == (12, 32, 32, 3) and bool(pairs.mask.all())
        for j, d in enumerate(WORLD_DIMS):
            diff = np.array(table[f"{d}_0"]) - np.array(table[f"{d}_1"])
            want = np.where(diff > margin, 1, np.where(diff < -margin, -1, 0))
            assert pairs.labels[:, j].tolist() == want.tolist(), d
    with pytest.raises(DataError, match=r"missing column\(s\) \['depth_0', 'depth_1'\]"):
        read_world_pairs(tmp_path / "p.parquet", ["depth"], 0.1)


def test_render_pairs_vary_every_dimension():
    from diffalign.rewards.data import load_labelled_pairs

    pairs = load_labelled_pairs("world:renders?split=heldout&per_caption=1&seed=2", WORLD_DIMS, tie_margin=0.1)
    counts = pairs.label_counts()
    for d in WORLD_DIMS:  # A, B and ties all occur on every dimension
        assert min(counts[d]["A"], counts[d]["B"], counts[d]["same"]) >= 20, (d, counts[d])
    with pytest.raises(DataError, match="unknown option 'colour'"):
        load_labelled_pairs("world:renders?colour=1", WORLD_DIMS)


def test_blur_and_warp_are_exact_at_zero_and_lower_the_shape_score():
    import numpy as np

    from diffalign.world.pairs import elastic_warp, gaussian_blur, render_pairs

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (3, 12, 12, 3))
    assert np.allclose(gaussian_blur(x, np.zeros(3)), x)
    blurred = gaussian_blur(x, np.array([0.0, 1.0, 2.0]))
    assert np.allclose(blurred[0], x[0]) and blurred[2].std() < blurred[1].std() < x[1].std()
    assert np.allclose(gaussian_blur(np.full((1, 9, 9, 3), 77.0), np.array([1.5])), 77.0)  # constants stay
    assert np.allclose(elastic_warp(x, np.zeros(3), rng), x)                                 # zero field: identity
    assert np.allclose(elastic_warp(np.full((2, 9, 9, 3), 5.0), np.array([3.0, 1.0]), rng), 5.0)
    caps = ["a large red square at the top left on a white background"] * 40
    plain = render_pairs(caps, per_caption=1, seed=3, change_prob=0.0)
    again = render_pairs(caps, per_caption=1, seed=3, change_prob=0.0, blur=0.0, warp=0.0)
    assert np.array_equal(plain["images_0"], again["images_0"])  # the options draw nothing when off
    warped = render_pairs(caps, per_caption=1, seed=3, change_prob=0.0, warp=4.0)
    # bent squares explain worse as squares; colour and background are untouched by geometry
    assert warped["scores_0"]["shape"].mean() < plain["scores_0"]["shape"].mean() - 0.1
    assert abs(warped["scores_0"]["background"].mean() - plain["scores_0"]["background"].mean()) < 0.02


# ------------------------------------------------------------------------------------------- models

def _build(kind: str, *overrides: str):
    from diffalign.rewards.trained import wrap
    from diffalign.rewards.training import build_reward_model

    cfg = _cfg(f"model.kind={kind}", *overrides)
    model, tok, spec = build_reward_model(cfg, latent_channels=4 if kind == "latent" else None)
    return wrap(model, tok, spec), cfg


def _world_batch(n: int = 4):
    from diffalign.world.render import render_batch
    from diffalign.world.scenes import all_scenes

    scenes = all_scenes()[::97][:n]
    images = torch.from_numpy(render_batch(scenes)).permute(0, 3, 1, 2).float() / 255.0
    return images, [s.caption() for s in scenes]


OBJECT_SHAPE = ["model.members=[[color,background,layout],[shape]]", "model.member_backbones={shape: object}",
                "model.object_width=8", "model.object_crop=8"]


@pytest.mark.parametrize("kind", ["frames", "composite", "composite-object", "latent"])
def test_save_load_round_trip_reproduces_scores_exactly(kind, tmp_path):
    from diffalign.rewards import Normalizer, build_reward

    reward, _ = _build("composite", *OBJECT_SHAPE) if kind == "composite-object" else _build(kind)
    reward.normalizer = Normalizer({d: 0.5 for d in WORLD_DIMS}, {d: 2.0 for d in WORLD_DIMS})
    images, caps = _world_batch()
    if kind == "latent":
        inputs, kw = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0)), {"t": torch.rand(4)}
    else:
        inputs, kw = images, {}
    with torch.no_grad():
        before = reward(inputs, caps, **kw)
    reward.save(tmp_path / "r")
    assert {p.name for p in (tmp_path / "r").iterdir()} >= {"reward_config.json", "model.safetensors", "tokenizer",
                                                          "normalizer.json"}
    loaded = build_reward(str(tmp_path / "r"))  # the registry path users take
    assert type(loaded) is type(reward) and loaded.dimensions == tuple(WORLD_DIMS)
    assert loaded.input_kind == ("latent" if kind == "latent" else "image")
    with torch.no_grad():
        after = loaded(inputs, caps, **kw)
    for d in WORLD_DIMS:
        assert torch.equal(before[d], after[d]), d
    assert loaded.normalizer.mean == reward.normalizer.mean
    assert torch.equal(loaded.overall(after), sum((after[d] - 0.5) / 2.0 for d in WORLD_DIMS))
    assert build_reward(f"trained:{tmp_path / 'r'}").dimensions == tuple(WORLD_DIMS)


def test_composite_members_are_separate_models():
    reward, _ = _build("composite")
    members = reward.model.members
    assert list(members) == WORLD_DIMS
    ids = [{id(p) for p in m.parameters()} for m in members.values()]
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1:])  # no shared weights
    images, caps = _world_batch(2)
    with torch.no_grad():
        scores = reward(images, caps)
        frames, times, mask = reward.prepare(images)
        ids_, am = reward.tokenize(caps)
        only_color = members["color"](frames, times, mask, ids_, am)[:, 0]
    assert torch.equal(scores["color"], only_color)


def test_composite_with_an_object_crop_shape_member():
    """A composite whose members score groups of dimensions: a frames model for colour/background/layout and
    the object-crop pixel model for shape; scores come back in model.dimensions order."""
    from diffalign.rewards.trained import FrameRewardModel, ObjectCropRewardModel

    reward, _ = _build("composite", *OBJECT_SHAPE)
    members = reward.model.members
    assert list(members) == ["color__background__layout", "shape"]
    assert isinstance(members["shape"], ObjectCropRewardModel) and isinstance(members["color__background__layout"], FrameRewardModel)
    assert reward.spec["architecture"]["members"][1] == {"dimensions": ["shape"], "backbone": "object", "width": 8,
                                                         "crop": 8, "extent": 2.0}
    images, caps = _world_batch(3)
    pixels = images.clone().requires_grad_(True)
    scores = reward(pixels, caps)
    assert set(scores) == set(WORLD_DIMS) and all(v.shape == (3,) for v in scores.values())
    scores["shape"].sum().backward()  # differentiable in the pixels through the mask and the resampled crop
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    with torch.no_grad():
        frames, times, mask = reward.prepare(images)
        ids, am = reward.tokenize(caps)
        group = members["color__background__layout"](frames, times, mask, ids, am)
        shape = members["shape"](frames, times, mask, ids, am)
        again = reward(images, caps)
    assert torch.equal(again["layout"], group[:, 2]) and torch.equal(again["shape"], shape[:, 0])


def test_object_crop_is_centred_on_the_object_and_scaled_to_its_size():
    """The canonical crop of the same shape is (nearly) the same wherever it is drawn and whatever its size."""
    from diffalign.rewards.trained import ObjectCropRewardModel, world_text_config, world_tokenizer
    from diffalign.world.render import render_batch
    from diffalign.world.scenes import Scene

    tok = world_tokenizer(20)
    model = ObjectCropRewardModel(world_text_config(tok, 16, 1, 2, 20), ["shape"], width=8, crop=16)
    scenes = [Scene(shape, "red", size, position, "white") for shape in ("square", "triangle")
              for size, position in (("small", "top left"), ("small", "bottom right"), ("large", "center"))]
    x = torch.from_numpy(render_batch(scenes)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        crop, glob = model.canonical(x)
    alpha = crop[:, 0]
    assert (alpha[:3] - alpha[0]).abs().mean(dim=(1, 2)).max() < 0.05          # squares agree
    assert (alpha[3:] - alpha[3]).abs().mean(dim=(1, 2)).max() < 0.05          # triangles agree
    assert (alpha[0] - alpha[3]).abs().mean() > 0.04                            # a square is not a triangle
    assert glob[2, 0] > glob[0, 0] + 0.5                                        # log area: large > small


def test_composite_member_config_errors():
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="for model.kind=composite"):
        _cfg("model.member_backbones={shape: object}")
    with pytest.raises(ConfigError, match="exactly one group"):
        _cfg("model.kind=composite", "model.members=[[color,background],[shape]]")
    with pytest.raises(ConfigError, match="exactly one group"):
        _cfg("model.kind=composite", "model.members=[[color,background,layout,shape],[shape]]")
    with pytest.raises(ConfigError, match="is not one of frames, object"):
        _cfg("model.kind=composite", "model.member_backbones={shape: conv}")
    with pytest.raises(ConfigError, match="not in model.dimensions"):
        _cfg("model.kind=composite", "model.member_backbones={size: object}")
    with pytest.raises(ConfigError, match="multiple of 4"):
        _cfg("model.kind=composite", "model.object_crop=10")
    with pytest.raises(ConfigError, match="optim.member_lr is for model.kind=composite"):
        _cfg("optim.member_lr={shape: 0.001}")
    with pytest.raises(ConfigError, match="positive numbers"):
        _cfg("model.kind=composite", "optim.member_lr={shape: fast}")


def test_member_lr_puts_a_whole_member_in_its_own_optimizer_group():
    from diffalign.rewards.training import _param_groups

    reward, cfg = _build("composite", *OBJECT_SHAPE, "optim.lr=3e-4", "optim.member_lr={shape: 0.001}")
    groups = _param_groups(reward.model, cfg)
    shape_ids = {id(p) for p in reward.model.members["shape"].parameters()}
    assert [g["lr"] for g in groups] == [3e-4, 3e-4, 1e-3]
    assert {id(p) for p in groups[2]["params"]} == shape_ids
    assert not shape_ids & {id(p) for g in groups[:2] for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(reward.model.parameters()))


def test_decoder_latent_reward_reads_x_t_through_the_generators_vae(tmp_path):
    """The world-latent-reward recipe's backbone: the generator's frozen VAE decoder + the world CLIP, with
    gradients to x_t, noise-level dependence, and an exact save/load round trip."""
    from diffusers import AutoencoderKL

    from diffalign.models import resolve_pretrained
    from diffalign.rewards import build_reward
    from diffalign.rewards.trained import wrap
    from diffalign.rewards.training import build_reward_model

    vae = AutoencoderKL.from_pretrained(resolve_pretrained("world:flow"), subfolder="vae")
    cfg = _cfg("model.kind=latent", "model.latent_backbone=decoder", "model.latent_clip=world:clip",
               "model.text_pretrained=")
    model, tok, spec = build_reward_model(cfg, latent_channels=vae.config.latent_channels, vae=vae)
    for name, p in vae.decoder.state_dict().items():  # the generator's own decoder, frozen
        assert torch.equal(model.vae.decoder.state_dict()[name], p), name
    assert not any(p.requires_grad for p in model.vae.parameters())
    reward = wrap(model, tok, spec)
    _, caps = _world_batch(2)
    side = 32 // 2 ** (len(vae.config.block_out_channels) - 1)
    x_t = torch.randn(2, vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(0),
                      requires_grad=True)
    scores = reward(x_t, caps, t=torch.tensor([0.2, 0.7]))
    sum(scores.values()).sum().backward()
    assert torch.isfinite(x_t.grad).all() and x_t.grad.abs().sum() > 0
    with torch.no_grad():
        other_t = reward(x_t, caps, t=torch.tensor([0.9, 0.1]))
    assert not torch.allclose(other_t["color"], scores["color"].detach())  # the noise level is an input
    reward.save(tmp_path / "lat")
    loaded = build_reward(str(tmp_path / "lat"))
    with torch.no_grad():
        again = loaded(x_t.detach(), caps, t=torch.tensor([0.2, 0.7]))
    for d in WORLD_DIMS:
        assert torch.equal(again[d], scores[d].detach()), d


def _decoder_latent(*overrides: str):
    from diffusers import AutoencoderKL

    from diffalign.models import resolve_pretrained
    from diffalign.rewards.trained import wrap
    from diffalign.rewards.training import build_reward_model

    vae = AutoencoderKL.from_pretrained(resolve_pretrained("world:flow"), subfolder="vae")
    cfg = _cfg("model.kind=latent", "model.latent_backbone=decoder", "model.latent_clip=world:clip",
               "model.text_pretrained=", *overrides)
    model, tok, spec = build_reward_model(cfg, latent_channels=vae.config.latent_channels, vae=vae)
    side = 32 // 2 ** (len(vae.config.block_out_channels) - 1)
    return wrap(model, tok, spec), cfg, (vae.config.latent_channels, side, side)


def test_decoder_latent_reward_with_a_composite_body(tmp_path):
    """world-latent-reward-composite: the decoded noisy pixels are read by a frames member (colour, background,
    layout) and a noise-aware object-crop member (shape); gradients reach x_t, every member sees t, and the
    folder round-trips through build_reward."""
    from diffalign.rewards import build_reward
    from diffalign.rewards.trained import CompositeRewardModel, FrameRewardModel, ObjectCropRewardModel
    from diffalign.rewards.training import _param_groups

    reward, cfg, shape = _decoder_latent(*OBJECT_SHAPE, "optim.member_lr={shape: 0.001}")
    body = reward.model.body
    assert isinstance(body, CompositeRewardModel) and list(body.members) == ["color__background__layout", "shape"]
    assert isinstance(body.members["color__background__layout"], FrameRewardModel)
    obj = body.members["shape"]
    assert isinstance(obj, ObjectCropRewardModel) and obj.time_dim == cfg.model.fusion_dim
    assert reward.spec["architecture"]["members"][1]["backbone"] == "object"
    groups = _param_groups(reward.model, cfg)  # the shape member's own learning rate
    assert groups[-1]["lr"] == 1e-3 and {id(p) for p in groups[-1]["params"]} == {id(p) for p in obj.parameters()}
    # the time conditioning starts at zero (the clean-image model); give it weights so t visibly matters
    with torch.no_grad():
        for p in (*obj.time_proj.parameters(), *obj.mask_time.parameters(), *obj.mask_net[-1].parameters()):
            p.normal_(0, 0.1)
    _, caps = _world_batch(3)
    x_t = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    t = torch.tensor([0.2, 0.5, 0.7])
    scores = reward(x_t, caps, t=t)
    assert list(scores) == WORLD_DIMS and all(v.shape == (3,) for v in scores.values())
    scores["shape"].sum().backward()  # through the object member and the frozen decoder
    assert torch.isfinite(x_t.grad).all() and x_t.grad.abs().sum() > 0
    with torch.no_grad():
        other_t = reward(x_t, caps, t=torch.tensor([0.9, 0.1, 0.3]))
    for d in WORLD_DIMS:  # the noise level reaches every member
        assert not torch.allclose(other_t[d], scores[d].detach()), d
    reward.save(tmp_path / "latc")
    loaded = build_reward(str(tmp_path / "latc"))
    assert isinstance(loaded.model.body, CompositeRewardModel)
    with torch.no_grad():
        again = loaded(x_t.detach(), caps, t=t)
    for d in WORLD_DIMS:
        assert torch.equal(again[d], scores[d].detach()), d


def test_latent_member_config_errors():
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="for model.kind=composite or model.kind=latent"):
        _cfg("model.kind=latent", "model.latent_backbone=conv", *OBJECT_SHAPE)
    with pytest.raises(ConfigError, match="for model.kind=composite or model.kind=latent"):
        _cfg("model.kind=latent", "model.latent_backbone=decoder", "model.member_backbones={shape: object}")
    with pytest.raises(ConfigError, match="optim.member_lr is for model.kind=composite"):
        _cfg("model.kind=latent", "model.latent_backbone=decoder", "optim.member_lr={shape: 0.001}")
    cfg = _cfg("model.kind=latent", "model.latent_backbone=decoder", *OBJECT_SHAPE, "optim.member_lr={shape: 0.001}")
    assert cfg.model.members == [["color", "background", "layout"], ["shape"]]


def test_latent_reward_gradient_wrt_noisy_latents_is_finite():
    reward, _ = _build("latent")
    _, caps = _world_batch(3)
    x_t = torch.randn(3, 4, 16, 16, requires_grad=True)
    scores = reward(x_t, caps, t=0.5)
    assert reward.differentiable and set(scores) == set(WORLD_DIMS)
    sum(scores.values()).sum().backward()
    assert x_t.grad is not None and torch.isfinite(x_t.grad).all() and x_t.grad.abs().sum() > 0
    # video latents [N, C, F, h, w] score too, and t is required
    assert reward(torch.randn(2, 4, 3, 16, 16), caps[:2], t=torch.tensor([0.1, 0.9]))["color"].shape == (2,)
    with pytest.raises(RewardError, match="noise-aware: pass t"):
        reward(x_t, caps)


def test_video_frames_are_sampled_by_real_time():
    """The same clip stored at 30 fps and at 10 fps (each frame held 3x) scores the same: fps is honoured."""
    reward, _ = _build("frames", "model.max_frames=4", "model.sample_fps=2", "model.temporal=attention")
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 20).view(1, 20, 1, 1, 1)  # frames differ in time: brightness rises
    slow = (0.5 * ramp + 0.5 * torch.rand(1, 20, 3, 32, 32, generator=g)).clamp(0, 1)  # 2 s at 10 fps
    fast = slow.repeat_interleave(3, dim=1)            # the same 2 s at 30 fps
    caps = ["a small red circle at the top left on a black background"]
    with torch.no_grad():
        a = reward(slow, caps, fps=[10.0])["color"]
        b = reward(fast, caps, fps=[30.0])["color"]
        wrong = reward(fast, caps, fps=[10.0])["color"]  # 6 s of video: other frames
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, wrong, atol=1e-4)
    with pytest.raises(RewardError, match="needs fps"):
        reward(slow, caps)


# ------------------------------------------------------------------------------------------- config and CLI

def test_reward_config_errors_and_recipes(capsys):
    from diffalign.cli import main
    from diffalign.config import ConfigError, load_config, recipe_names
    from diffalign.rewards.train_cli import load_reward_config

    with pytest.raises(ConfigError, match="unknown config key 'model.dimensionz'.*Did you mean 'model.dimensions'"):
        load_reward_config("world-reward", ["model.dimensionz=[a]"])
    with pytest.raises(ConfigError, match="objective.theta must be > 1"):
        load_reward_config("world-reward", ["objective.theta=1"])
    with pytest.raises(ConfigError, match="not a reward-model recipe"):
        load_reward_config("tiny-sd15-dpo")
    with pytest.raises(ConfigError, match="run it with `diffalign train-reward world-reward`"):
        load_config("world-reward")
    rewards = recipe_names(task="train-reward")
    assert {"world-reward", "world-reward-composite", "world-latent-reward", "videoreward"} <= set(rewards)
    for name in rewards:
        load_reward_config(name)
    vr = load_reward_config("videoreward")
    assert vr.model.dimensions == ["VQ", "MQ", "TA"] and vr.objective.theta == 5.0 and vr.model.sample_fps == 2.0
    assert main(["recipes"]) == 0  # lists train and train-reward recipes without breaking
    out = capsys.readouterr().out
    assert "world-reward" in out and "tiny-sd15-dpo" in out
    assert main(["train-reward", "--keys"]) == 0 and "data.tie_margin" in capsys.readouterr().out


def test_videoreward_registry_entry_needs_a_folder():
    from diffalign.rewards import available, build_reward

    assert available()["videoreward"].dimensions == ("VQ", "MQ", "TA")
    with pytest.raises(RewardError, match="diffalign train-reward videoreward"):
        build_reward("videoreward")


def test_train_reward_from_a_saved_clip_folder_on_videoalign_csv(clips, tmp_path, capsys):
    """The real-recipe path: a CLIP loaded with from_pretrained from a folder, a VideoAlign CSV of videos."""
    from transformers import CLIPConfig, CLIPModel

    from diffalign.cli import main
    from diffalign.rewards import build_reward
    from diffalign.rewards.trained import world_tokenizer

    tok = world_tokenizer(16)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=16),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, projection_dim=16), projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    rows = [{"path_A": "videos/a.gif", "path_B": "videos/b.gif", "prompt": f"a red circle {i}",
             "VQ": "AB"[i % 2], "MQ": "same", "TA": ["A", "", "B"][i % 3]} for i in range(6)]
    _csv(clips / "train.csv", rows)
    out = tmp_path / "vr"
    code = main(["train-reward", "videoreward", f"model.pretrained={tmp_path / 'clip'}", f"data.path={clips / 'train.csv'}",
                 f"data.val_path={clips / 'train.csv'}", "model.max_frames=3", "model.fusion_dim=16",
                 "model.head_hidden=16", "model.fusion_layers=1", "train.max_steps=2", "train.batch_size=2",
                 "train.eval_batch_size=4", f"train.output_dir={out}", "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "== diffalign train-reward: summary ==" in text and "VQ" in text and str(out) in text
    spec = json.loads((out / "reward_config.json").read_text())
    assert spec["frames"]["image_size"] == 16 and spec["input_kind"] == "video"
    reward = build_reward(str(out))
    from diffalign.rewards.media import load_video

    video, fps = load_video(clips / "videos" / "a.gif")
    with torch.no_grad():
        s = reward(video[None], ["a red circle"], fps=[fps])
    assert set(s) == {"VQ", "MQ", "TA"} and all(torch.isfinite(v).all() for v in s.values())


def test_train_reward_learns_on_a_tiny_world_set(tmp_path, capsys):
    """A short `diffalign train-reward` run on world renders beats chance on held-out prompts by a clear margin."""
    from diffalign.cli import main

    out = tmp_path / "wr"
    # the recipe's own starting point, the bundled world CLIP (tiny random towers need far more steps)
    code = main(["train-reward", "world-reward", *TINY, "model.pretrained=world:clip", "model.text_pretrained=",
                 "model.dimensions=[color,background]",
                 "data.path=world:renders?split=train&per_caption=1&change_prob=0.5",
                 "data.val_path=world:renders?split=heldout&per_caption=1&seed=1&change_prob=0.5",
                 "train.max_steps=150", "train.batch_size=32", "optim.lr=3e-4", "optim.head_lr=2e-3", f"train.output_dir={out}", "--no-progress"])
    assert code == 0
    ev = json.loads((out / "eval.json").read_text())["clean"]
    assert ev["acc/background"] >= 0.85 and ev["acc/color"] >= 0.7, ev
    assert "without ties" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["steps"] == 150
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 150 and math.isfinite(json.loads(lines[-1])["loss"])


# ------------------------------------------------------------------------------- bundled world reward

def test_bundled_world_reward_prefers_the_matching_background_and_colour():
    """`world:reward` loads through build_reward and ranks, per dimension, a held-out scene's render above the
    same render judged against a caption that differs in exactly that attribute (every pair, not on average)."""
    import dataclasses

    from diffalign.rewards import build_reward
    from diffalign.world import BACKGROUNDS, COLORS, prompt_splits, render_batch

    reward = build_reward("world:reward")
    assert reward.dimensions == tuple(WORLD_DIMS) and reward.differentiable and reward.needs_prompt
    _, heldout = prompt_splits(0)
    scenes = heldout[:12]
    images = torch.from_numpy(render_batch(scenes, 32)).permute(0, 3, 1, 2).float() / 255
    true_caps = [s.caption() for s in scenes]
    with torch.no_grad():
        true = reward(images, true_caps)
        for dim, attr, values in (("background", "background", list(BACKGROUNDS)), ("color", "color", list(COLORS))):
            wrong_caps = [dataclasses.replace(s, **{attr: next(v for v in values if v != getattr(s, attr))}).caption()
                          for s in scenes]
            wrong = reward(images, wrong_caps)
            assert (true[dim] > wrong[dim]).all(), (dim, true[dim], wrong[dim])
    pixels = images[:2].clone().requires_grad_(True)
    reward(pixels, true_caps[:2])["color"].sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
