"""The embedded video world: moving-object scenes, captions, splits, clip renderer and the video oracle.

Like tests/test_world.py, the oracle is tested on EVERY video scene: true clips score high on every
dimension, a caption wrong in one attribute (or a clip played backwards) scores low on exactly the
matching dimension, shuffled / wobbling / flickering clips score low on smoothness, and scores fall
monotonically, without a cliff, with pixel noise. Assertion messages carry the worst-case numbers.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from diffalign.world import BACKGROUNDS, COLORS, SHAPES, SIZES, UNSEEN_COMBOS
from diffalign.world.video import (DIRECTIONS, SPEEDS, TRAVEL, UNSEEN_MOTIONS, VideoScene, all_video_scenes,
                                   parse_video_caption, render_clip, render_clips, render_paths, sample_video_scenes,
                                   trajectories, video_prompt_splits, video_words)
from diffalign.world.video_oracle import (VIDEO_DIMENSIONS, compare_clips, measure_clips, score_clips, subset)

VOCAB = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES, "background": tuple(BACKGROUNDS),
         "direction": tuple(DIRECTIONS), "speed": SPEEDS}
APPEARANCE = ("color", "shape", "background", "size")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _worst(scores: dict[str, np.ndarray], captions: list, dim: str, high: bool = False) -> str:
    i = int(np.argmax(scores[dim]) if high else np.argmin(scores[dim]))
    cap = captions[i].caption() if isinstance(captions[i], VideoScene) else captions[i]
    return f"{dim}={scores[dim][i]:.3f} for {cap!r}"


@pytest.fixture(scope="module")
def scenes() -> list[VideoScene]:
    return all_video_scenes()


@pytest.fixture(scope="module")
def clips16(scenes) -> np.ndarray:
    return render_clips(scenes, size=16)


@pytest.fixture(scope="module")
def measured16(clips16):
    """Measurements of every scene's exact 16x16, 8-frame clip (reused by several tests)."""
    return measure_clips(clips16)


# ---------------------------------------------------------------- scenes, captions, splits

def test_caption_round_trip_and_format(scenes):
    assert len(scenes) == 3 * 6 * 2 * 4 * 4 * 2 == len(set(scenes))
    assert scenes == all_video_scenes()
    assert all(parse_video_caption(s.caption()) == s for s in scenes)
    assert len({s.caption() for s in scenes}) == len(scenes)
    assert VideoScene("circle", "red", "small", "black", "left", "slow").caption() == \
        "a small red circle moving slowly left on a black background"
    assert VideoScene("square", "blue", "large", "white", "up", "fast").caption() == \
        "a large blue square moving fast up on a white background"
    # Every word of every caption is in video_words() (what a word-level tokenizer needs), and only those.
    assert set(video_words()) == {w for s in scenes for w in s.caption().split()}


@pytest.mark.parametrize("bad", ["", "a small red circle moving slowly left",
                                 "a small red circle moving slowly sideways on a black background",
                                 "a small red circle moving slow left on a black background",
                                 "a small red circle at the top left on a black background",
                                 "a small red circle moving slowly left on a black background "])
def test_bad_captions_raise_naming_the_caption(bad):
    with pytest.raises(ValueError, match="cannot parse video caption") as err:
        parse_video_caption(bad)
    assert repr(bad) in str(err.value)


def test_video_scene_rejects_unknown_attributes():
    with pytest.raises(ValueError, match="sideways"):
        VideoScene("circle", "red", "small", "black", "sideways", "slow")
    with pytest.raises(ValueError, match="speed"):
        VideoScene("circle", "red", "small", "black", "left", "medium")
    with pytest.raises(ValueError, match="hexagon"):
        VideoScene("hexagon", "red", "small", "black", "left", "slow")


def test_prompt_splits(scenes):
    train, heldout = video_prompt_splits(seed=0)
    assert video_prompt_splits(seed=0) == (train, heldout)
    assert video_prompt_splits(seed=1) != (train, heldout)
    assert heldout and not set(train) & set(heldout)
    assert len(train) + len(heldout) == len(scenes) and set(train) | set(heldout) == set(scenes)
    combos, motions = set(UNSEEN_COMBOS), set(UNSEEN_MOTIONS)
    assert len(motions) >= 2
    assert not any((s.color, s.shape) in combos or (s.shape, s.direction) in motions for s in train)
    forced = [s for s in scenes if (s.color, s.shape) in combos or (s.shape, s.direction) in motions]
    assert set(forced) <= set(heldout)
    assert len(heldout) - len(forced) == round(0.1 * (len(scenes) - len(forced)))
    assert any((s.shape, s.direction) in motions for s in heldout) and any((s.color, s.shape) in combos for s in heldout)
    # Training sees every value of every attribute: the held-out combinations are of known parts.
    for attr, values in VOCAB.items():
        assert {getattr(s, attr) for s in train} == set(values), attr
    assert video_prompt_splits(seed=0, heldout_fraction=0.0)[1] == forced
    with pytest.raises(ValueError):
        video_prompt_splits(heldout_fraction=1.0)
    a = sample_video_scenes(40, seed=3, pool=train)
    assert a == sample_video_scenes(40, seed=3, pool=train) != sample_video_scenes(40, seed=4, pool=train)
    assert set(a) <= set(train)


# ---------------------------------------------------------------- renderer

def test_render_determinism(scenes):
    some = scenes[::41]
    a = render_clips(some, size=16, jitter=0.05, seed=7)
    assert a.dtype == np.uint8 and a.shape == (len(some), 8, 16, 16, 3)
    assert a.tobytes() == render_clips(some, size=16, jitter=0.05, seed=7).tobytes()
    assert a.tobytes() != render_clips(some, size=16, jitter=0.05, seed=8).tobytes()
    exact = render_clips(some, size=16)
    assert exact.tobytes() == render_clips(some, size=16, seed=123).tobytes()  # jitter 0 ignores the seed
    assert render_clip(some[0]).tobytes() == exact[0].tobytes()
    assert render_clip(some[0], jitter=0.05, rng=np.random.default_rng(7)).tobytes() == a[0].tobytes()
    for frames in (9, 13, 17):
        assert render_clips(some[:2], size=16, frames=frames).shape == (2, frames, 16, 16, 3)
    assert render_clips([], size=16).shape == (0, 8, 16, 16, 3)
    for bad in ({"frames": 7}, {"frames": 18}, {"size": 4}):
        with pytest.raises(ValueError):
            render_clips(some[:1], **bad)
    with pytest.raises(ValueError, match="rng"):
        render_clip(some[0], jitter=0.05)


@pytest.mark.parametrize("size,frames,jitter", [(16, 8, 0.0), (16, 17, 0.06), (32, 8, 0.06)])
def test_render_geometry(scenes, size, frames, jitter):
    """Exact linear motion of the planned length, border ring pure background in every frame."""
    shape_idx, cx, cy, diam = trajectories(scenes, size, frames, jitter, np.random.default_rng(1))
    path = np.stack([cx, cy], axis=-1) / size                                          # [N, F, 2] sides
    assert np.abs(np.diff(path, n=2, axis=1)).max() < 1e-12                           # constant velocity
    want = np.array([DIRECTIONS[s.direction] for s in scenes]) * np.array([TRAVEL[s.speed] for s in scenes])[:, None]
    np.testing.assert_allclose(path[:, -1] - path[:, 0], want, atol=1e-12)
    clips = render_clips(scenes, size, frames, jitter, seed=1)
    bg = np.array([BACKGROUNDS[s.background] for s in scenes], dtype=np.uint8)[:, None, None, :]
    for ring in (clips[:, :, 0], clips[:, :, -1], clips[:, :, :, 0], clips[:, :, :, -1]):
        assert (ring == bg).all(), "object touches the border ring"
    # The object is really drawn: colour of the most covered pixel is the object's colour.
    fg = np.array([COLORS[s.color] for s in scenes], dtype=np.float64)
    far = np.abs(clips.astype(np.float64) - bg[:, None]).sum(-1).reshape(len(scenes), frames, -1).argmax(-1)
    px = np.take_along_axis(clips.reshape(len(scenes), frames, -1, 3), far[..., None, None], axis=2)[:, :, 0]
    assert np.abs(px - fg[:, None]).max() <= 1.0


# ---------------------------------------------------------------- oracle

@pytest.mark.parametrize("size,jitter", [(16, 0.0), (16, 0.06), (32, 0.06)])
def test_true_clips_score_high_on_every_dimension(scenes, measured16, size, jitter):
    picked = scenes if size == 16 else scenes[::5]
    m = measured16 if (size, jitter) == (16, 0.0) else measure_clips(render_clips(picked, size, jitter=jitter, seed=3))
    scores = compare_clips(m, picked)
    assert set(scores) == {*VIDEO_DIMENSIONS, "overall"}
    for dim in (*VIDEO_DIMENSIONS, "overall"):
        assert scores[dim].min() >= 0.9, f"{size}px jitter {jitter}: worst {_worst(scores, picked, dim)}"


DIM_OF = {"color": "color", "shape": "shape", "background": "background", "size": "size",
          "direction": "direction", "speed": "speed"}


@pytest.mark.parametrize("attr", list(VOCAB))
def test_wrong_attribute_scores_low_on_that_dimension_only(scenes, measured16, attr):
    """Every scene's clip against EVERY caption that differs from it in `attr` only."""
    idx, wrong = [], []
    for i, s in enumerate(scenes):
        for value in VOCAB[attr]:
            if value != getattr(s, attr):
                idx.append(i)
                wrong.append(dataclasses.replace(s, **{attr: value}))
    scores = compare_clips(subset(measured16, np.array(idx)), wrong)
    dim = DIM_OF[attr]
    assert scores[dim].max() <= 0.1, f"wrong {attr}: worst {_worst(scores, wrong, dim, high=True)}"
    for other in VIDEO_DIMENSIONS:
        if other != dim:
            assert scores[other].min() >= 0.9, f"wrong {attr} leaked into {other}: worst {_worst(scores, wrong, other)}"
    assert scores["overall"].max() <= 0.9


def test_reversed_clip_scores_low_on_direction_only(scenes, clips16, measured16):
    true = compare_clips(measured16, scenes)
    rev = score_clips(clips16[:, ::-1], scenes)
    assert rev["direction"].max() <= 0.05, _worst(rev, scenes, "direction", high=True)
    for dim in VIDEO_DIMENSIONS:
        if dim != "direction":
            assert np.abs(rev[dim] - true[dim]).max() <= 0.02, f"reversing changed {dim}"
    # ...and matches the caption with the opposite direction as well as the original matches its own.
    opposite = [dataclasses.replace(s, direction=OPPOSITE[s.direction]) for s in scenes]
    assert score_clips(clips16[:, ::-1], opposite)["direction"].min() >= 0.9


def test_shuffled_frames_score_low_on_smoothness(scenes, clips16, measured16):
    rng = np.random.default_rng(0)
    shuffled = np.stack([c[rng.permutation(len(c))] for c in clips16])
    scores = score_clips(shuffled, scenes)
    true = compare_clips(measured16, scenes)
    s = scores["smoothness"]
    assert s.mean() <= 0.1 and np.quantile(s, 0.95) <= 0.3, (s.mean(), np.quantile(s, 0.95))
    # A fixed interleaving (0, 2, 4, 6, 1, 3, 5, 7) is never smooth.
    inter = score_clips(clips16[:, [0, 2, 4, 6, 1, 3, 5, 7]], scenes)
    assert inter["smoothness"].max() <= 0.1, _worst(inter, scenes, "smoothness", high=True)
    for dim in APPEARANCE:  # the same frames: appearance is unchanged
        assert np.abs(scores[dim] - true[dim]).max() <= 1e-9, dim


def test_wobble_and_flicker_score_low_on_smoothness(scenes):
    picked = scenes[::4]
    _, cx, cy, diam = trajectories(picked, 16, 8)
    # Wobble: +-0.35 px per frame around the true path on both axes (a shaky object), in the pattern
    # + - - + + - - +, which is uncorrelated with time so it leaves the fitted velocity alone.
    wob = 0.35 * np.array([1, -1, -1, 1, 1, -1, -1, 1], dtype=np.float64)
    shaky = render_paths(picked, cx + wob, cy + wob, diam, 16)
    scores = score_clips(shaky, picked)
    assert scores["smoothness"].max() <= 0.3, _worst(scores, picked, "smoothness", high=True)
    for dim in ("color", "background", "size", "direction", "speed"):
        assert scores[dim].min() >= 0.8, f"wobble leaked into {dim}: {_worst(scores, picked, dim)}"
    # Colour flicker: every other frame in the next palette colour; area flicker: every other frame
    # the other size (same path).
    colors = tuple(COLORS)
    other = [dataclasses.replace(s, color=colors[(colors.index(s.color) + 1) % len(colors)]) for s in picked]
    flick = render_clips(picked, 16)
    flick[:, 1::2] = render_clips(other, 16)[:, 1::2]
    scores = score_clips(flick, picked)
    assert scores["smoothness"].max() <= 0.1, _worst(scores, picked, "smoothness", high=True)
    assert 0.3 <= scores["color"].min() and scores["color"].max() <= 0.7  # half the frames are right
    resized = [dataclasses.replace(s, size="large" if s.size == "small" else "small") for s in picked]
    rd = trajectories(resized, 16, 8)[3]
    pulse = render_clips(picked, 16)
    pulse[:, 1::2] = render_paths(resized, cx, cy, rd, 16)[:, 1::2]
    scores = score_clips(pulse, picked)
    assert scores["smoothness"].max() <= 0.1, _worst(scores, picked, "smoothness", high=True)


def test_noise_degrades_scores_smoothly(scenes, clips16):
    picked = scenes[::3]  # 384 clips: every attribute value
    clean = clips16[::3].astype(np.float64)
    stds = list(range(0, 81, 10))
    curves = {d: [] for d in (*VIDEO_DIMENSIONS, "overall")}
    at10 = None
    for std in stds:
        noisy = clean + np.random.default_rng(std).normal(0.0, std, clean.shape)
        scores = score_clips(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), picked)
        assert all(np.isfinite(v).all() and (v >= 0).all() and (v <= 1).all() for v in scores.values())
        for d in curves:
            curves[d].append(float(scores[d].mean()))
        if std == 10:
            at10 = scores
    curve = curves["overall"]
    msg = "mean overall vs noise std: " + ", ".join(f"{s}:{c:.3f}" for s, c in zip(stds, curve))
    steps = -np.diff(curve)
    assert (steps > 0).all(), "not monotone; " + msg
    assert steps.max() < 0.12, "cliff between adjacent levels; " + msg
    assert curve[-1] < 0.7, "std 80 should clearly hurt; " + msg
    # The new dimensions degrade monotonically too (up to tiny wiggles of an already-flat start).
    for d in ("direction", "speed", "smoothness"):
        assert (np.diff(curves[d]) <= 0.005).all(), f"{d}: {np.round(curves[d], 3)}"
        assert curves[d][0] - curves[d][-1] > 0.2, f"{d} ignores noise: {np.round(curves[d], 3)}"
    assert at10["overall"].min() >= 0.85, f"std 10: worst {_worst(at10, picked, 'overall')}; " + msg
    for dim in VIDEO_DIMENSIONS:
        assert at10[dim].mean() >= 0.9, f"std 10: mean {dim} {at10[dim].mean():.3f}"


def test_torch_float_input_matches_uint8(scenes):
    picked = scenes[::97]
    clips = render_clips(picked, 16)
    as_float = torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float().div(127.5).sub(1.0)  # [N, F, 3, H, W]
    a, b = score_clips(clips, picked), score_clips(as_float, [s.caption() for s in picked])
    for d in a:
        np.testing.assert_allclose(a[d], b[d], atol=1e-9)


def test_degenerate_clips_score_low_never_nan(scenes):
    picked = scenes[:4]
    blank = np.stack([np.broadcast_to(np.array(BACKGROUNDS[s.background], np.uint8), (8, 16, 16, 3)) for s in picked])
    scores = score_clips(blank, picked)
    for d in ("color", "shape", "size", "direction", "speed", "smoothness"):
        assert np.isfinite(scores[d]).all() and scores[d].max() <= 0.05, (d, scores[d])
    assert scores["background"].min() >= 0.95
    # A static object (every frame the first frame): direction and speed low, appearance high.
    still = render_clips(picked, 16)[:, :1].repeat(8, axis=1)
    scores = score_clips(still, picked)
    assert scores["direction"].max() <= 0.05 and scores["speed"].max() <= 0.05, scores
    assert scores["color"].min() >= 0.9 and scores["smoothness"].min() >= 0.9


def test_score_rejects_bad_inputs(scenes):
    clips = render_clips(scenes[:2], 16)
    with pytest.raises(ValueError, match="captions"):
        score_clips(clips, [scenes[0]])
    with pytest.raises(ValueError, match=r"\[N,F,H,W,3\]"):
        score_clips(clips[0], scenes[:8])
    with pytest.raises(ValueError, match="3 frames"):
        score_clips(clips[:, :2], scenes[:2])
    with pytest.raises(ValueError, match="cannot parse video caption"):
        score_clips(clips, ["a small red circle at the top left on a black background"] * 2)


# ---------------------------------------------------------------- generator (`diffalign world pretrain --kind video`)

def test_every_video_word_is_one_bpe_token():
    from diffalign.world.generators import build_word_clip_tokenizer

    tok = build_word_clip_tokenizer(video_words())
    for word in video_words():
        assert len(tok(word).input_ids) == 3, (word, tok.convert_ids_to_tokens(tok(word).input_ids))
    for s in all_video_scenes()[::53]:
        ids = tok(s.caption()).input_ids
        assert len(ids) == len(s.caption().split()) + 2
        assert tok.decode(ids, skip_special_tokens=True).strip() == s.caption()


def test_pretrain_video_saves_a_wan_folder_that_loads_and_samples(tmp_path):
    """The CLI path for 2 steps (the path, not the quality): a WanPipeline folder that loads through
    diffusers and through diffalign's wan adapter, and samples 9-frame 16x16 clips the oracle can score."""
    import json

    from diffusers import WanPipeline

    from diffalign.cli import main
    from diffalign.config import ModelConfig
    from diffalign.models import load_adapter
    from diffalign.world.generators import VIDEO_GEN_FRAMES, VIDEO_TEXT_LEN

    folder = tmp_path / "world-video"
    assert main(["world", "pretrain", "--kind", "video", "--steps", "2", "--vae-steps", "2", "--pool", "8",
                 "--batch-size", "4", "--out", str(folder)]) == 0
    record = json.loads((folder / "pretrain.json").read_text())
    assert record["config"]["kind"] == "video" and record["family"] == "wan"
    assert np.isfinite(record["final_loss_mean_last_100"]) and len(record["vae"]["latents_std"]) == 4
    assert "text-to-video WanPipeline" in (folder / "README.md").read_text()

    pipe = WanPipeline.from_pretrained(folder)
    assert list(pipe.vae.config.latents_std) == pytest.approx(record["vae"]["latents_std"])
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (2, 2)
    caption = all_video_scenes()[0].caption()
    frames = pipe(prompt=[caption], height=16, width=16, num_frames=VIDEO_GEN_FRAMES, num_inference_steps=2,
                  guidance_scale=1.0, max_sequence_length=VIDEO_TEXT_LEN, output_type="np",
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, VIDEO_GEN_FRAMES, 16, 16, 3)
    scores = score_clips((np.clip(frames, 0, 1) * 255).round().astype(np.uint8), [caption])
    assert all(np.isfinite(v).all() for v in scores.values())

    adapter = load_adapter(ModelConfig(family="wan", pretrained=str(folder), max_sequence_length=VIDEO_TEXT_LEN))
    assert adapter.latent_shape(16, 16, VIDEO_GEN_FRAMES) == (4, 5, 8, 8)
    clip = torch.from_numpy(render_clips(all_video_scenes()[:1], 16, VIDEO_GEN_FRAMES)).permute(0, 4, 1, 2, 3)
    latents = adapter.encode_videos(clip.float() / 127.5 - 1.0)
    assert latents.shape == (1, 4, 5, 8, 8) and torch.isfinite(latents).all()
    assert adapter.decode_latents(latents).shape == (1, VIDEO_GEN_FRAMES, 3, 16, 16)
