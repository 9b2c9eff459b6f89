"""Video-world reward pairs (world:video-renders) and the oracle's VideoReward mapping (VQ / MQ / TA).

The mapping is checked on hand-built clips whose single fault is known: a reversed clip loses only TA,
a jittered one only MQ, a flickering one only VQ, a wrong speed only MQ, a wrong colour only TA.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from diffalign.data.preference import DataError
from diffalign.world.video import VideoScene, render_clips, render_paths, trajectories, video_prompt_splits
from diffalign.world.video_oracle import (FLICKER_RGB_TOL, JERK_TOL, SMOOTH_POWER, VIDEOREWARD_DIMENSIONS,
                                          compare_clips, measure_clips, score_clips_videoreward, videoreward_scores)
from diffalign.world.video_pairs import render_recipe, video_pairs

DIMS = list(VIDEOREWARD_DIMENSIONS)
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _k(x, x0, p):
    return 1.0 / (1.0 + (np.asarray(x) / x0) ** p)


@pytest.fixture(scope="module")
def base_scenes() -> list[VideoScene]:
    train, _ = video_prompt_splits(0)
    return train[::90][:8]  # a spread of shapes, colours, sizes, directions, speeds


def _score(clips, scenes):
    return score_clips_videoreward(clips, scenes)


def _only(drop: dict, dim: str, big: float = 0.25, small: float = 0.06) -> None:
    """``drop`` (true minus faulty per dimension, arrays) is large on ``dim`` and small elsewhere."""
    assert (drop[dim] > big).all(), (dim, drop)
    for d in DIMS:
        if d != dim:
            assert (np.abs(drop[d]) < small).all(), (dim, d, drop)


def test_mapping_formulas_by_hand(base_scenes):
    clips = render_clips(base_scenes, jitter=0.0)
    vm = measure_clips(clips)
    s = compare_clips(vm, base_scenes)
    out = videoreward_scores(vm, s)
    assert set(out) == set(DIMS)
    mq = 0.5 * (vm.presence * _k(vm.jerk, JERK_TOL, SMOOTH_POWER) + s["speed"])
    ta = (s["color"] + s["shape"] + s["background"] + s["size"] + s["direction"]) / 5
    np.testing.assert_allclose(out["MQ"], mq)
    np.testing.assert_allclose(out["TA"], ta)
    assert (out["VQ"] <= vm.presence * _k(vm.color_flicker, FLICKER_RGB_TOL, SMOOTH_POWER) + 1e-12).all()
    # exact renders are good on every dimension
    assert all((out[d] > 0.9).all() for d in DIMS), out
    both = score_clips_videoreward(clips, base_scenes)
    assert all(np.allclose(both[d], out[d]) for d in DIMS) and "smoothness" in both


def test_mapping_reversed_direction_loses_only_ta(base_scenes):
    clips = render_clips(base_scenes)
    rev = render_clips([dataclasses.replace(s, direction=OPPOSITE[s.direction]) for s in base_scenes])
    a, b = _score(clips, base_scenes), _score(rev, base_scenes)
    _only({d: a[d] - b[d] for d in DIMS}, "TA", big=0.15)


def test_mapping_jitter_loses_only_mq(base_scenes):
    clips = render_clips(base_scenes)
    shape_idx, cx, cy, diam = trajectories(base_scenes)
    wobble = np.where(np.arange(cx.shape[1]) % 2 == 0, 0.8, -0.8)[None]  # +-0.8 px every other frame
    jit = render_paths(base_scenes, cx + wobble, cy - wobble, diam)
    a, b = _score(clips, base_scenes), _score(jit, base_scenes)
    _only({d: a[d] - b[d] for d in DIMS}, "MQ")


def test_mapping_wrong_speed_loses_only_mq_and_wrong_colour_only_ta(base_scenes):
    clips = render_clips(base_scenes)
    fast_slow = render_clips([dataclasses.replace(s, speed="fast" if s.speed == "slow" else "slow") for s in base_scenes])
    a, b = _score(clips, base_scenes), _score(fast_slow, base_scenes)
    _only({d: a[d] - b[d] for d in DIMS}, "MQ")
    recol = render_clips([dataclasses.replace(s, color="green" if s.color != "green" else "red")
                          if "green" != s.background else dataclasses.replace(s, color="red") for s in base_scenes])
    c = _score(recol, base_scenes)
    _only({d: a[d] - c[d] for d in DIMS}, "TA", big=0.1)


def test_mapping_colour_flicker_loses_only_vq(base_scenes):
    recipes = [{"scene": s, "motion": None, "appearance": None, "seed": i, "u_noise": 0.0, "u_blur": 0.0}
               for i, s in enumerate(base_scenes)]
    clean = np.stack([render_recipe(r) for r in recipes])
    flick = np.stack([render_recipe(dict(r, appearance="color_flicker")) for r in recipes])
    a, b = _score(clean, base_scenes), _score(flick, base_scenes)
    drop = {d: a[d] - b[d] for d in DIMS}
    assert (drop["VQ"] > 0.25).all() and (np.abs(drop["MQ"]) < 0.06).all(), drop
    assert (drop["VQ"] > drop["TA"]).all(), drop   # TA only loses the flickering frames' colour


def test_render_recipe_faults_hit_their_dimension(base_scenes):
    base = [{"scene": s, "motion": None, "appearance": None, "seed": i, "u_noise": 0.3, "u_blur": 0.3}
            for i, s in enumerate(base_scenes)]
    clean = _score(np.stack([render_recipe(r) for r in base]), base_scenes)
    same = _score(np.stack([render_recipe(r) for r in base]), base_scenes)
    assert all(np.array_equal(clean[d], same[d]) for d in DIMS)   # deterministic from the recipe
    for fault, dim in (("jitter", "MQ"), ("shuffle", "MQ"), ("static", "MQ"), ("stutter", "MQ")):
        s = _score(np.stack([render_recipe(dict(r, motion=fault)) for r in base]), base_scenes)
        assert np.median(clean[dim] - s[dim]) > 0.2, (fault, clean[dim], s[dim])
    for fault in ("color_flicker", "area_flicker", "dropout"):
        s = _score(np.stack([render_recipe(dict(r, appearance=fault)) for r in base]), base_scenes)
        assert np.median(clean["VQ"] - s["VQ"]) > 0.2, (fault, clean["VQ"], s["VQ"])


def test_video_pairs_deterministic_and_minimal_pairs_share_everything_else():
    caps = [s.caption() for s in video_prompt_splits(0)[1][:5]]
    a = video_pairs(caps, per_caption=3, seed=4)
    b = video_pairs(caps, per_caption=3, seed=4)
    c = video_pairs(caps, per_caption=3, seed=5)
    assert a["clips_0"].shape == (15, 8, 16, 16, 3) and a["clips_0"].dtype == np.uint8
    assert np.array_equal(a["clips_0"], b["clips_0"]) and np.array_equal(a["clips_1"], b["clips_1"])
    assert not np.array_equal(a["clips_0"], c["clips_0"])
    assert a["captions"] == [x for x in caps for _ in range(3)]
    for k in DIMS:
        np.testing.assert_allclose(a["scores_0"][k], score_clips_videoreward(a["clips_0"], a["captions"])[k])


def test_source_labels_fps_determinism_and_ties(tmp_path):
    from diffalign.rewards.data import labels_from_scores, load_labelled_pairs

    spec = "world:video-renders?split=heldout&prompts=6&per_caption=2&seed=3"
    p = load_labelled_pairs(spec, DIMS, tie_margin=0.1)
    q = load_labelled_pairs(spec, DIMS, tie_margin=0.1)
    assert len(p) == 12 and p.images_a.shape == (12, 8, 16, 16, 3) and p.in_memory
    assert np.array_equal(p.images_a, q.images_a) and torch.equal(p.labels, q.labels)
    assert p.fps_a == [8.0] * 12 and p.fps_b == [8.0] * 12
    heldout = {s.caption() for s in video_prompt_splits(0)[1]}
    assert set(p.prompts) <= heldout and set(p.groups) == {"video-renders-heldout"}
    sa, sb = score_clips_videoreward(p.images_a, p.prompts), score_clips_videoreward(p.images_b, p.prompts)
    for j, d in enumerate(DIMS):
        assert np.array_equal(p.labels[:, j].numpy(), labels_from_scores(sa[d], sb[d], 0.1)), d
    r = load_labelled_pairs("world:video-renders?split=train&prompts=4&per_caption=1&fps=16&frames=9", DIMS)
    assert r.images_a.shape[1] == 9 and r.fps_a == [16.0] * 4
    # a labelled pair of identical clips is a tie on every dimension
    from diffalign.rewards.data import world_pairs_from_scores

    tie = world_pairs_from_scores(p.images_a, p.images_a, p.prompts, sa, sa, DIMS, 0.1, source="t", group="t")
    assert (tie.labels == 0).all()
    with pytest.raises(DataError, match="unknown option"):
        load_labelled_pairs("world:video-renders?colour=1", DIMS)
    with pytest.raises(DataError, match="split"):
        load_labelled_pairs("world:video-renders?split=val", DIMS)


def test_source_reversed_clip_loses_ta_and_jittered_loses_mq():
    """Labels through the source's own labelling path: A exact, B reversed / jittered."""
    from diffalign.rewards.data import world_pairs_from_scores

    scenes = video_prompt_splits(0)[1][:6]
    caps = [s.caption() for s in scenes]
    recipes = [{"scene": s, "motion": None, "appearance": None, "seed": i, "u_noise": 0.2, "u_blur": 0.2}
               for i, s in enumerate(scenes)]
    exact = np.stack([render_recipe(r) for r in recipes])
    rev = np.stack([render_recipe(dict(r, scene=dataclasses.replace(r["scene"], direction=OPPOSITE[r["scene"].direction])))
                    for r in recipes])
    jit = np.stack([render_recipe(dict(r, motion="jitter")) for r in recipes])
    s0 = score_clips_videoreward(exact, caps)
    for other, dim in ((rev, "TA"), (jit, "MQ")):
        pairs = world_pairs_from_scores(exact, other, caps, s0, score_clips_videoreward(other, caps), DIMS, 0.1,
                                        source="t", group="t")
        j = DIMS.index(dim)
        assert (pairs.labels[:, j] == 1).all(), (dim, pairs.labels)


@pytest.mark.parametrize("recipe", ["world-videoreward", "world-videoreward-composite"])
def test_train_reward_on_video_renders_saves_a_loadable_video_reward(recipe, tmp_path, capsys):
    """A few-step run of each recipe (frames model; composite with the object-track MQ member) on the source
    saves a folder that build_reward loads and scores videos with (fps given, frames sampled by time)."""
    from diffalign.cli import main
    from diffalign.rewards import build_reward

    out = tmp_path / "vr"
    code = main(["train-reward", recipe,
                 "data.path=world:video-renders?split=train&prompts=8&per_caption=2",
                 "data.val_path=world:video-renders?split=heldout&prompts=4&per_caption=2&seed=1",
                 "train.max_steps=3", "train.batch_size=4", "train.eval_every=0", "train.eval_batch_size=8",
                 f"train.output_dir={out}", "--no-progress"])
    assert code == 0
    ev = json.loads((out / "eval.json").read_text())["clean"]
    assert all(f"acc/{d}" in ev for d in DIMS)
    assert "without ties" in capsys.readouterr().out
    spec = json.loads((out / "reward_config.json").read_text())
    assert spec["input_kind"] == "video" and spec["frames"]["sample_fps"] == 8.0
    reward = build_reward(str(out))
    assert reward.dimensions == tuple(DIMS)
    scenes = video_prompt_splits(0)[1][:2]
    clips = torch.from_numpy(render_clips(scenes)).permute(0, 1, 4, 2, 3).float() / 255   # [N, F, 3, H, W]
    with torch.no_grad():
        s = reward(clips, [x.caption() for x in scenes], fps=[8.0, 8.0])
    assert set(s) == set(DIMS) and all(v.shape == (2,) and torch.isfinite(v).all() for v in s.values())
    if recipe.endswith("composite"):
        assert spec["architecture"]["members"][1] == {"dimensions": ["MQ"], "backbone": "track", "width": 64,
                                                      "layers": 2, "magnitudes": True}
        pixels = clips.clone().requires_grad_(True)
        reward(pixels, [x.caption() for x in scenes], fps=[8.0, 8.0])["MQ"].sum().backward()
        assert pixels.grad is not None and pixels.grad.abs().sum() > 0   # the track member is differentiable


def test_track_backbone_config_checks():
    from diffalign.rewards.train_cli import ConfigError, load_reward_config

    cfg = load_reward_config("world-videoreward-composite", [])
    assert cfg.model.member_backbones == {"MQ": "track"} and cfg.model.members == [["VQ", "TA"], ["MQ"]]
    with pytest.raises(ConfigError, match="track_width"):
        load_reward_config("world-videoreward-composite", ["model.track_width=6"])
