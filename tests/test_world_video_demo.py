"""The video world end to end on a barely trained Wan-style generator (the path, not the quality):
clips sampled per seed, generator pairs written as GIF files the data path reads back exactly, and
`diffalign demo --family video` writing a well-formed report with the motion test."""
import json

import numpy as np
import pytest
import torch

from diffalign.world.video import video_prompt_splits


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    from diffalign.world.pretrain import PretrainConfig, pretrain

    folder = tmp_path_factory.mktemp("world-video")
    pretrain(PretrainConfig(kind="video", steps=2, vae_steps=2, pool=8, batch_size=4), folder, show_progress=False)
    return folder


@pytest.fixture(scope="module")
def video_pipe(video_folder):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(video_folder)


def _captions(n: int) -> list[str]:
    train, _ = video_prompt_splits(0)
    return [s.caption() for s in train[:n]]


def test_generate_gives_clips_that_depend_only_on_their_own_seed(video_pipe):
    from diffalign.world.generators import VIDEO_GEN_FRAMES
    from diffalign.world.pairs import generate, world_kind

    assert world_kind(video_pipe) == "video"
    caps = _captions(3)
    clips = generate(video_pipe, caps, [5, 6, 7], steps=2)
    assert clips.shape == (3, VIDEO_GEN_FRAMES, 16, 16, 3) and clips.dtype == np.uint8
    alone = generate(video_pipe, caps[1:2], [6], steps=2)
    np.testing.assert_array_equal(alone[0], clips[1])
    assert not np.array_equal(generate(video_pipe, caps[1:2], [8], steps=2)[0], clips[1])


def test_video_pairs_are_gif_files_the_data_path_reads_back_exactly(video_pipe, tmp_path):
    """Each pair's clips are written as GIFs beside a .jsonl of relative paths; decoding them at the
    recipe's num_frames / fps gives the sampled clips bit for bit, and labels follow the oracle."""
    from diffalign.data.preference import decode_video, load_preference_source
    from diffalign.world.generators import VIDEO_GEN_FPS, VIDEO_GEN_FRAMES
    from diffalign.world.pairs import generate, make_pairs
    from diffalign.world.video_oracle import VIDEO_DIMENSIONS, score_clips

    caps, k = _captions(3), 3
    out = tmp_path / "pairs.jsonl"
    stats = make_pairs(video_pipe, caps, out, k=k, seed=1, steps=2, show_progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["pairs"] == len(rows) and 1 <= len(rows) <= 3
    clips = generate(video_pipe, [c for c in caps for _ in range(k)], [1_000_003 + i for i in range(3 * k)], steps=2)
    scores = score_clips(clips, [c for c in caps for _ in range(k)])
    for row in rows:
        for slot in (0, 1):
            assert {f"{d}_{slot}" for d in VIDEO_DIMENSIONS} <= set(row)
            flat = int((tmp_path / row[f"jpg_{slot}"]).stem)
            assert row[f"score_{slot}"] == pytest.approx(scores["overall"][flat])
            frames = decode_video(str(tmp_path / row[f"jpg_{slot}"]), source=str(out), row=0,
                                  num_frames=VIDEO_GEN_FRAMES, fps=VIDEO_GEN_FPS)
            np.testing.assert_array_equal(np.asarray(frames), clips[flat])
        assert row["label_0"] == (1.0 if row["score_0"] > row["score_1"] else 0.0)
    source = load_preference_source(str(out))
    assert len(source.records) == len(rows)
    best = [r["jpg_0"] if r["label_0"] == 1.0 else r["jpg_1"] for r in rows]
    assert [str(rec.image_w).endswith(b) for rec, b in zip(source.records, best)] == [True] * len(rows)


def test_video_pairs_refuse_a_parquet_before_sampling(video_pipe, tmp_path):
    from diffalign.world.pairs import make_pairs

    with pytest.raises(ValueError, match=r"\.jsonl"):
        make_pairs(video_pipe, _captions(1), tmp_path / "pairs.parquet", k=2, steps=1000, show_progress=False)


def test_compare_adds_the_motion_dimension_by_hand():
    from diffalign.world.demo import compare
    from diffalign.world.video_oracle import VIDEO_DIMENSIONS

    before = {d: np.array([0.2, 0.4, 0.6, 0.5]) for d in VIDEO_DIMENSIONS}
    after = {d: v.copy() for d, v in before.items()}
    after["direction"] = np.array([0.5, 0.7, 0.6, 0.2])       # +0.3 +0.3 0 -0.3
    after["speed"] = np.array([0.5, 0.4, 0.9, 0.5])           # +0.3 0 +0.3 0
    for s in (before, after):
        s["overall"] = np.mean([s[d] for d in VIDEO_DIMENSIONS], axis=0)
    r = compare(before, after, VIDEO_DIMENSIONS)
    assert r["motion"]["dimensions"] == ["direction", "speed", "smoothness"]
    # motion per sample = mean(direction, speed, smoothness): gains +0.2, +0.1, +0.1, -0.1
    assert r["motion"]["gain"] == pytest.approx(0.075)
    assert r["motion"]["win_rate"] == pytest.approx(0.75)
    assert r["per_dimension"]["direction"]["gain"] == pytest.approx(0.075)
    assert r["per_dimension"]["color"]["p_value"] == 1.0   # no change at all
    assert "motion" not in compare(before, after, ("color", "shape"))


def test_quick_video_demo_writes_a_report_with_motion_and_an_animated_grid(video_folder, tmp_path):
    from PIL import Image

    from diffalign.rewards.media import load_video
    from diffalign.world.demo import run_demo
    from diffalign.world.video_oracle import VIDEO_DIMENSIONS

    out = tmp_path / "demo"
    report = run_demo("video", out, quick=True, overrides=[f"model.pretrained={video_folder}"], show_progress=False)
    assert report["objective"] == "flow-dpo" and report["family"] == "video" and report["model_family"] == "wan"
    assert report["steps"] == 4 and report["prompts_heldout"] == 8
    assert set(report["per_dimension"]) == set(VIDEO_DIMENSIONS)
    assert 0.0 <= report["motion"]["p_value"] <= 1.0 and "shape-direction" in report["unseen_what"]
    assert report["base_reproduced_with_adapters_disabled"]
    assert (out / "pairs.jsonl").is_file() and any((out / "pairs-clips").glob("*.gif"))
    # frame strips: the first 6 clips (columns // 2), base above aligned, 9 frames of 16 px tiles, scale 3
    n = min(6, report["samples_heldout"])
    assert Image.open(out / "samples.png").size == (9 * 17 * 3, (2 * n * 17 + n - 1) * 3)
    frames, fps = load_video(out / "samples.gif")
    assert len(frames) == 9 and fps == pytest.approx(10.0)


def test_world_family_is_read_from_the_pipeline_class(video_folder, tmp_path):
    from diffalign.models import ModelLoadError
    from diffalign.world.pairs import generator_family

    assert generator_family(str(video_folder)) == "wan"
    assert generator_family("world:flow") == "sd3" and generator_family("world:unet") == "sd15"
    with pytest.raises(ModelLoadError, match="model_index.json"):
        generator_family(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ModelLoadError, match="not a world generator"):
        generator_family(str(tmp_path))


def test_world_samples_source_reads_video_generator_pairs_with_videoreward_labels(video_folder, tmp_path, monkeypatch):
    """`world:samples?model=<a Wan world folder>` samples the video world, labels every within-prompt pair of
    clips by VQ / MQ / TA, caches the GIFs + .jsonl, and a second call reads the cache (no resampling)."""
    from diffalign.rewards.data import labels_from_scores, load_labelled_pairs
    from diffalign.world.generators import VIDEO_GEN_FPS, VIDEO_GEN_FRAMES
    from diffalign.world.pairs import generate
    from diffalign.world.video_oracle import score_clips_videoreward

    monkeypatch.setenv("DIFFALIGN_HOME", str(tmp_path))
    spec = f"world:samples?model={video_folder}&prompts=2&k=3&steps=2&seed=0"
    pairs = load_labelled_pairs(spec, ["VQ", "MQ", "TA"], tie_margin=0.0, show_progress=False)
    cached = list((tmp_path / "world-pairs").glob("*/pairs.jsonl"))
    assert len(cached) == 1 and not list((tmp_path / "world-pairs").glob("*.tmp"))
    assert pairs.images_a.shape[1:] == (VIDEO_GEN_FRAMES, 16, 16, 3) and set(pairs.fps_a) == {VIDEO_GEN_FPS}
    assert len(pairs) == 6  # 2 prompts x 3 within-prompt pairs, none tied at margin 0
    # labels are the oracle's on the sampled clips: find each pair's two clips among the 6 samples
    from diffalign.rewards.data import _world_captions

    caps = [c for c in _world_captions("train", 2, 0, kind="video") for _ in range(3)]
    clips = generate(__import__("diffusers").WanPipeline.from_pretrained(video_folder), caps, list(range(6)), steps=2)
    oracle = score_clips_videoreward(clips, caps)
    which = lambda clip: [i for i in range(6) if np.array_equal(clips[i], clip)]  # noqa: E731
    for j in range(len(pairs)):
        (ia,), (ib,) = which(pairs.images_a[j]), which(pairs.images_b[j])
        assert ia // 3 == ib // 3 and pairs.prompts[j] == caps[ia]
        for d, dim in enumerate(("VQ", "MQ", "TA")):
            assert pairs.labels[j, d] == labels_from_scores(oracle[dim][[ia]], oracle[dim][[ib]], 0.0)[0]
    again = load_labelled_pairs(spec, ["VQ", "MQ", "TA"], tie_margin=0.0, show_progress=False)
    assert torch.equal(again.labels, pairs.labels)


def test_bundled_video_generator_loads_through_from_pretrained_and_follows_captions():
    """world:video resolves to the bundled WanPipeline folder, loads through the wan adapter, and its clips
    match their captions far better than an untrained pipeline's (same VAE, same seeds)."""
    from diffalign.config import ModelConfig
    from diffalign.models import load_adapter
    from diffalign.world.generators import VIDEO_TEXT_LEN, build_world_pipeline
    from diffalign.world.pairs import generate
    from diffalign.world.video_oracle import score_clips

    adapter = load_adapter(ModelConfig(family="wan", pretrained="world:video", max_sequence_length=VIDEO_TEXT_LEN))
    assert (adapter.pipe.config._name_or_path or "").endswith("bundled/video")
    train, _ = video_prompt_splits(0)
    caps = [s.caption() for s in train[::13][:12]]
    seeds = list(range(len(caps)))
    trained = score_clips(generate(adapter.pipe, caps, seeds, steps=10), caps)
    untrained = score_clips(generate(build_world_pipeline("video", adapter.vae), caps, seeds, steps=10), caps)
    # measured 2026-11-23 (16 prompts): overall 0.595 vs 0.223 untrained, direction 0.886 vs 0.265
    assert trained["overall"].mean() > untrained["overall"].mean() + 0.2, (trained["overall"], untrained["overall"])
    assert trained["direction"].mean() > untrained["direction"].mean() + 0.3


def test_sample_world_video_writes_clips_as_the_generator_was_trained(tmp_path):
    """`diffalign sample --model world:video` needs no video flags: 9-frame 16x16 clips at 10 fps, 16 text tokens,
    recorded in the sidecar; CFG and the clips' oracle scores are finite."""
    from diffalign.cli import main
    from diffalign.rewards.media import load_video, to_uint8_frames
    from diffalign.world.video_oracle import score_clips

    caption = "a large red square moving fast right on a white background"
    assert main(["sample", "--model", "world:video", "--prompt", caption, "--num-per-prompt", "2", "--steps", "4",
                 "--guidance-scale", "3", "--video-format", "gif", "--out", str(tmp_path), "--no-progress"]) == 0
    config = json.loads((tmp_path / "samples.json").read_text())["config"]
    assert (config["family"], config["num_frames"], config["fps"], config["height"], config["max_sequence_length"]) == \
        ("wan", 9, 10.0, 16, 16)
    clips = []
    for f in sorted(tmp_path.glob("*.gif")):
        frames, fps = load_video(f)
        assert len(frames) == 9 and fps == pytest.approx(10.0)
        clips.append(np.asarray(to_uint8_frames(frames)))
    assert len(clips) == 2 and clips[0].shape == (9, 16, 16, 3)
    assert all(np.isfinite(v).all() for v in score_clips(np.stack(clips), [caption] * 2).values())
