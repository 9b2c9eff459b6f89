"""Video preference data: time-based frame sampling, joint video augmentation, the VideoAlign CSV combination rule,
errors naming file and row, and the Wan latent cache / training loop on tiny video pairs.

Clips are tiny (9 frames, 16x24) and written here with imageio (GIF) and PyAV through imageio's pyav plugin
(MP4, lossless RGB H.264), so frames round-trip exactly and can be compared bit for bit.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.data.preference import (DataError, PreferencePairDataset, collate_pairs, decode_video,
                                       load_preference_source, validate_images)
from diffalign.data.transforms import JointTransform

H, W, N = 16, 24, 9  # clip height, width, frames at 10 fps (0.9 s)
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]], np.uint8)


def moving_square(n=N, seed=0) -> np.ndarray:
    """uint8 [n, H, W, 3]: a 4x4 square moving right on a background whose left half differs from its right half
    (so a horizontal flip is visible), colours from a small palette (exact in a GIF)."""
    rng = np.random.default_rng(seed)
    bg = PALETTE[rng.integers(0, len(PALETTE), size=2)]
    frames = np.zeros((n, H, W, 3), np.uint8)
    for i in range(n):
        frames[i, :, : W // 2] = bg[0]
        frames[i, :, W // 2:] = bg[1]
        top, left = 2 + (i % 3) * 3, (2 * i) % (W - 4)
        frames[i, top:top + 4, left:left + 4] = 255
    return frames


def write_gif(path: Path, frames: np.ndarray, fps: float) -> Path:
    import imageio.v3 as iio

    # one frame per entry, delay 1000/fps ms; consecutive frames of moving_square always differ, so none is merged
    iio.imwrite(path, frames, plugin="pillow", duration=int(round(1000 / fps)), loop=0)
    return path


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> Path:
    import imageio.v3 as iio

    # libx264rgb at qp 0 is lossless RGB: decoded frames equal the written ones
    with iio.imopen(path, "w", plugin="pyav") as f:
        f.init_video_stream("libx264rgb", fps=fps, pixel_format="rgb24")
        f._video_stream.options = {"qp": "0"}
        f.write(frames)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    a, b = moving_square(seed=0), moving_square(seed=1)
    out = {
        "a10.gif": write_gif(d / "a10.gif", a, 10), "a10.mp4": write_mp4(d / "a10.mp4", a, 10),
        "a30.mp4": write_mp4(d / "a30.mp4", np.repeat(a, 3, axis=0), 30),  # each frame tripled at 30 fps
        "b10.mp4": write_mp4(d / "b10.mp4", b, 10), "b10.gif": write_gif(d / "b10.gif", b, 10),
    }
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 4)
    out["broken.mp4"] = d / "broken.mp4"
    return d, out, a, b


# --------------------------------------------------------------------------- frames sampled by time

@pytest.mark.parametrize("num_frames,fps", [(5, 10.0), (5, 5.0), (9, 10.0), (3, 3.4)])
def test_frames_sampled_by_time_are_the_same_for_10_and_30_fps_files(clips, num_frames, fps):
    _, c, a, _ = clips
    got = {name: decode_video(str(c[name]), source="t", row=0, num_frames=num_frames, fps=fps)
           for name in ("a10.gif", "a10.mp4", "a30.mp4")}
    expected = a[[math.floor(k / fps * 10 + 1e-6) for k in range(num_frames)]]  # frame on screen at t = k / fps
    for name, frames in got.items():
        assert frames.dtype == np.uint8 and frames.shape == (num_frames, H, W, 3), name
        np.testing.assert_array_equal(frames, expected, err_msg=name)


def test_row_fps_override_replaces_the_files_rate(clips):
    _, c, a, _ = clips
    # the 30 fps file declared as 10 fps: 27 frames now last 2.7 s, so t = k / 10 shows tripled frame k -> a[k // 3]
    frames = decode_video(str(c["a30.mp4"]), source="t", row=0, num_frames=6, fps=10.0, file_fps=10.0)
    np.testing.assert_array_equal(frames, a[[k // 3 for k in range(6)]])


# --------------------------------------------------------------------------- joint augmentation

def test_video_pairs_share_one_crop_and_flip_over_all_frames(clips, tmp_path):
    _, c, a, b = clips
    rows = [{"jpg_0": str(c["a10.mp4"]), "jpg_1": str(c["b10.gif"]), "label_0": 1, "caption": "square"},
            {"jpg_0": str(c["a30.mp4"]), "jpg_1": str(c["b10.mp4"]), "label_0": 0, "caption": "square"}]
    path = tmp_path / "pairs.jsonl"
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = load_preference_source(str(path))
    ds = PreferencePairDataset(source, JointTransform(16, center_crop=False, random_flip=True), seed=0,
                               num_frames=5, fps=10.0)
    seen_flips, seen_lefts = set(), set()
    for epoch in range(12):
        for i in range(2):
            item = ds[(i, epoch)]
            win, lose = (a, b) if i == 0 else (b, a)  # row 1 has label_0 = 0: the second clip won
            assert item["pixels_w"].shape == (3, 5, 16, 16) and item["pixels_l"].shape == (3, 5, 16, 16)
            top, left = item["crop_top_left"].tolist()
            flipped = None
            for raw, pix in ((win[:5], item["pixels_w"]), (lose[:5], item["pixels_l"])):
                got = ((pix.permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()  # [F, 16, 16, 3]
                matches = {f: np.array_equal(got, (raw[:, :, ::-1] if f else raw)[:, top:top + 16, left:left + 16])
                           for f in (False, True)}
                assert any(matches.values()), (i, epoch)
                f = matches[True]
                assert flipped is None or f == flipped  # the same flip for winner and loser, every frame
                flipped = f
            seen_flips.add(flipped)
            seen_lefts.add(left)
    assert seen_flips == {False, True} and len(seen_lefts) > 1  # both flips and several crops were exercised
    batch = collate_pairs([ds[0], ds[1]])
    assert batch["pixels_w"].shape == (2, 3, 5, 16, 16) and batch["pixels_w"].min() >= -1 and batch["pixels_w"].max() <= 1


def test_non_square_output_covers_then_crops_every_frame_alike(clips):
    _, c, a, b = clips
    t = JointTransform(16, center_crop=False, random_flip=True, width=20)  # 16x24 clips: no resize, crop 16x20
    lefts = set()
    for seed in range(8):
        fw = decode_video(str(c["a10.mp4"]), source="t", row=0, num_frames=5, fps=10.0)
        fl = decode_video(str(c["b10.gif"]), source="t", row=0, num_frames=5, fps=10.0)
        pw, pl, meta = t.videos(fw, fl, torch.Generator().manual_seed(seed))
        assert pw.shape == pl.shape == (3, 5, 16, 20)
        top, left = meta.crop_top_left
        assert top == 0
        lefts.add(left)
        for raw, pix in ((a[:5], pw), (b[:5], pl)):
            got = ((pix.permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
            ref = raw[:, :, ::-1] if meta.flipped else raw
            np.testing.assert_array_equal(got, ref[:, :, left:left + 20])
    assert len(lefts) > 1
    # downscaling covers the target: 16x24 -> scale max(8/16, 10/24) = 0.5 -> 8x12, then a 8x10 crop
    pw, _, _ = JointTransform(8, center_crop=True, random_flip=False, width=10).videos(a[:2], b[:2], torch.Generator())
    assert pw.shape == (3, 2, 8, 10)


# --------------------------------------------------------------------------- VideoAlign CSV

def write_videoalign(path: Path, rows: list[dict], extra=()) -> Path:
    cols = ["path_A", "path_B", "prompt", "VQ", "MQ", "TA", "fps_A", "fps_B", "num_frames", *extra]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    return path


def _va_rows(folder: Path) -> list[dict]:
    # paths relative to the CSV's folder
    p = {"path_A": "a10.mp4", "path_B": "b10.mp4", "num_frames": 9}
    return [
        {**p, "prompt": "r0", "VQ": "A", "MQ": "A", "TA": "B"},        # 1+1-1 = +1 -> A; weights {VQ:1,MQ:1,TA:3}: -1 -> B
        {**p, "prompt": "r1", "VQ": "B", "MQ": "same", "TA": ""},      # -1 -> B (TA missing, masked)
        {**p, "prompt": "r2", "VQ": "A", "MQ": "B", "TA": "same"},     # 0 -> tie, dropped
        {**p, "prompt": "r3", "VQ": "", "MQ": "", "TA": ""},           # no labels -> tie, dropped
        {**p, "prompt": "r4", "VQ": "", "MQ": "", "TA": "A"},          # only TA -> A
        {**p, "prompt": "r5", "VQ": "same", "MQ": "same", "TA": "same"},  # all same -> tie
    ]


def test_videoalign_combination_rule_picks_winners_drops_ties_masks_missing(clips):
    d, c, _, _ = clips
    path = write_videoalign(d / "va.csv", _va_rows(d))
    src = load_preference_source(str(path))
    assert [r.row for r in src.records] == [0, 1, 4]
    a, b = str(c["a10.mp4"]), str(c["b10.mp4"])
    assert [(r.image_w, r.image_l) for r in src.records] == [(a, b), (b, a), (a, b)]
    assert [r.caption for r in src.records] == ["r0", "r1", "r4"]
    assert (src.counts.rows, len(src), src.counts.ties_dropped) == (6, 3, 3)
    assert "6 rows read, 3 pairs kept, 3 ties dropped, 0 bad rows skipped" in src.summary()

    custom = load_preference_source(str(path), dimension_weights={"VQ": 1, "MQ": 1, "TA": 3})
    # r0: 1 + 1 - 3 = -1 -> B; r1: -1 -> B; r2: 1 - 1 + 0 = 0 -> tie; r4: +3 -> A
    assert [(r.row, r.image_w) for r in custom.records] == [(0, b), (1, b), (4, a)]
    only_vq = load_preference_source(str(path), dimension_weights={"VQ": 1.0})
    assert [(r.row, r.image_w) for r in only_vq.records] == [(0, a), (1, b), (2, a)]  # MQ/TA ignored
    assert only_vq.counts.ties_dropped == 3  # rows 3, 4 (VQ missing) and 5 (same)
    with pytest.raises(DataError, match=r"row 2: tie \(combined score 0"):
        load_preference_source(str(path), ties="error")


def test_videoalign_fps_columns_travel_with_the_winner(clips):
    d, c, a, b = clips
    path = write_videoalign(d / "va_fps.csv", [
        {"path_A": "a30.mp4", "path_B": "b10.mp4", "prompt": "x", "VQ": "B", "fps_A": "10", "fps_B": ""}])
    rec = load_preference_source(str(path)).records[0]
    assert rec.image_w == str(c["b10.mp4"]) and (rec.fps_w, rec.fps_l) == (None, 10.0)
    ds = PreferencePairDataset(load_preference_source(str(path)), JointTransform(16, center_crop=True, random_flip=False),
                               num_frames=6, fps=10.0)
    item = ds[0]
    loser = ((item["pixels_l"].permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(loser, a[[k // 3 for k in range(6)]][:, :, 4:20])  # read as a 10 fps file


# --------------------------------------------------------------------------- errors name the file and the row

def test_missing_file_names_row_and_file_or_is_counted(clips):
    d, _, _, _ = clips
    rows = _va_rows(d)[:2] + [{"path_A": "a10.mp4", "path_B": "nope.mp4", "prompt": "m", "VQ": "A"}]
    path = write_videoalign(d / "va_missing.csv", rows)
    with pytest.raises(DataError, match=r"va_missing\.csv: row 2: path_B: file not found: .*nope\.mp4"):
        load_preference_source(str(path))
    src = load_preference_source(str(path), on_error="skip")
    assert len(src) == 2 and src.counts.skipped[0][0] == 2 and "1 bad rows skipped" in src.summary()


def test_unreadable_and_too_short_videos_name_file_and_row(clips, tmp_path):
    d, c, _, _ = clips
    path = write_videoalign(d / "va_bad.csv", [
        {"path_A": "a10.mp4", "path_B": "b10.mp4", "prompt": "ok", "VQ": "A"},
        {"path_A": "a10.mp4", "path_B": "broken.mp4", "prompt": "bad", "VQ": "A"},
    ])
    src = load_preference_source(str(path))
    t = JointTransform(16, center_crop=True, random_flip=False)
    ds = PreferencePairDataset(src, t, num_frames=5, fps=10.0)
    assert ds[0]["pixels_w"].shape == (3, 5, 16, 16)
    with pytest.raises(DataError, match=r"va_bad\.csv: row 1: corrupt or unreadable video .*broken\.mp4"):
        ds[1]
    with pytest.raises(DataError, match=r"va_bad\.csv: row 1: loser image: corrupt or unreadable video"):
        validate_images(src, num_frames=5, fps=10.0)
    kept = validate_images(src, on_error="skip", num_frames=5, fps=10.0)
    assert [r.row for r in kept.records] == [0] and kept.counts.skipped[-1][0] == 1
    skip = PreferencePairDataset(src, t, num_frames=5, fps=10.0, on_error="skip")
    assert skip[1] is None and collate_pairs([skip[0], skip[1]])["skipped"] == 1
    # 9 frames at 10 fps = 0.9 s; 6 frames at 5 fps need 1.2 s
    short = PreferencePairDataset(src, t, num_frames=6, fps=5.0)
    with pytest.raises(DataError, match=r"va_bad\.csv: row 0: video too short: .*a10\.mp4 lasts 5 frame\(s\) at "
                                        r"data\.fps=5 .*data\.num_frames=6"):
        short[0]
    # a video row without data.num_frames, and a pair mixing an image and a video
    with pytest.raises(DataError, match=r"row 0: .*a10\.mp4 is a video but data\.num_frames is null"):
        PreferencePairDataset(src, t)[0]
    from PIL import Image

    Image.fromarray(moving_square()[0]).save(d / "still.png")
    mixed = write_videoalign(d / "va_mixed.csv", [{"path_A": "still.png", "path_B": "b10.mp4", "prompt": "m", "VQ": "A"}])
    with pytest.raises(DataError, match=r"row 0: path_A and path_B must both be videos or both images"):
        load_preference_source(str(mixed))


def test_declared_num_frames_must_match_each_file(clips):
    d, _, a, _ = clips
    path = write_videoalign(d / "va_len.csv", [
        {"path_A": "a10.mp4", "path_B": "b10.gif", "prompt": "ok", "VQ": "A", "num_frames": "9"},
        {"path_A": "a10.mp4", "path_B": "a30.mp4", "prompt": "long", "VQ": "A", "num_frames": "9"},
        {"path_A": "a10.mp4", "path_B": "b10.mp4", "prompt": "bad", "VQ": "A", "num_frames": "nine"},
    ])
    with pytest.raises(DataError, match=r"va_len\.csv: row 2: num_frames: 'nine' is not a positive whole number"):
        load_preference_source(str(path))
    src = load_preference_source(str(path), on_error="skip")
    assert [r.source_frames for r in src.records] == [9, 9] and len(src.counts.skipped) == 1
    ds = PreferencePairDataset(src, JointTransform(16, center_crop=True, random_flip=False), num_frames=5, fps=10.0)
    winner = ((ds[0]["pixels_w"].permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(winner, a[:5, :, 4:20])  # the full-decode path samples the same frames
    with pytest.raises(DataError, match=r"va_len\.csv: row 1: length mismatch: .*a30\.mp4 has 27 frames at 30 fps, "
                                        r"the row's num_frames says 9"):
        ds[1]


# --------------------------------------------------------------------------- Wan cache and training

def _wan_cfg(tiny_model, tmp_path, csv_path, *overrides):
    from diffalign.config import load_config

    base = [
        "model.family=wan", f"model.pretrained={tiny_model('wan')}", "model.max_sequence_length=16",
        f"data.path={csv_path}", "data.resolution=16", "data.num_frames=5", "data.fps=10",
        "data.center_crop=true", "data.random_flip=false", "lora.rank=4", "optim.lr=1e-3", "optim.weight_decay=0",
        "objective.beta=1000", "train.batch_size=2", "train.max_steps=3", "train.checkpoint_every=0",
        "train.log_every=1", "train.log_with=none", f"train.output_dir={tmp_path / 'run'}",
    ]
    return load_config(None, base + list(overrides))


def test_wan_video_cache_round_trip_and_refused_when_video_settings_change(clips, tiny_model, tmp_path):
    from diffalign.data.cache import CacheMismatchError, CachedPairDataset, build_cache, check_manifest
    from diffalign.models import load_adapter

    d, _, _, _ = clips
    path = write_videoalign(d / "va_two.csv", [
        {"path_A": "a10.mp4", "path_B": "b10.mp4", "prompt": "square right", "VQ": "A", "MQ": "A"},
        {"path_A": "a10.gif", "path_B": "b10.gif", "prompt": "square left", "VQ": "B", "TA": "same"},
    ])
    cfg = _wan_cfg(tiny_model, tmp_path, path, f"cache.dir={tmp_path / 'cache'}")
    adapter = load_adapter(cfg.model)
    manifest = build_cache(cfg, adapter, show_progress=False)
    assert manifest["counts"]["pairs"] == 2
    assert manifest["shapes"]["latents_w"] == [16, 2, 2, 2]  # [C, (5-1)/4 + 1, 16/8, 16/8]
    assert manifest["keys"]["data.num_frames"] == 5 and manifest["keys"]["data.fps"] == 10.0
    check_manifest(cfg.cache.dir, cfg)
    cached = CachedPairDataset(cfg.cache.dir, manifest)
    item = cached[1]
    assert item["latents_w"].shape == (16, 2, 2, 2) and item["row"] == 1
    # the cached latents are the adapter's encoding of the dataset's pixels
    from diffalign.data.loading import dataset_for, load_source_for

    fly = dataset_for(cfg.data, load_source_for(cfg.data), seed=0)[(1, 0)]
    torch.testing.assert_close(item["latents_w"], adapter.encode_images(fly["pixels_w"][None])[0], atol=1e-5, rtol=1e-5)

    with pytest.raises(CacheMismatchError, match=r"data\.num_frames: cache has 5, config wants 9(.|\n)*other video "
                                                 r"settings"):
        check_manifest(cfg.cache.dir, _wan_cfg(tiny_model, tmp_path, path, "data.num_frames=9"))
    with pytest.raises(CacheMismatchError, match=r"data\.fps: cache has 10\.0, config wants 8\.0"):
        check_manifest(cfg.cache.dir, _wan_cfg(tiny_model, tmp_path, path, "data.fps=8"))
    with pytest.raises(CacheMismatchError, match=r"data\.width: cache has None, config wants 32"):
        check_manifest(cfg.cache.dir, _wan_cfg(tiny_model, tmp_path, path, "data.width=32"))


def test_wan_trains_three_steps_on_a_videoalign_csv_of_four_video_pairs(clips, tiny_model, tmp_path):
    from diffalign.train.loop import Trainer

    d, _, _, _ = clips
    path = write_videoalign(d / "va_four.csv", [
        {"path_A": "a10.mp4", "path_B": "b10.mp4", "prompt": "one", "VQ": "A"},
        {"path_A": "b10.gif", "path_B": "a30.mp4", "prompt": "two", "MQ": "B"},
        {"path_A": "a10.gif", "path_B": "b10.mp4", "prompt": "three", "TA": "A", "VQ": "same"},
        {"path_A": "b10.mp4", "path_B": "a10.mp4", "prompt": "four", "VQ": "B", "MQ": "B"},
        {"path_A": "b10.mp4", "path_B": "a10.mp4", "prompt": "tie", "VQ": "B", "MQ": "A"},
    ])
    # non-square (16 x 32: the 16x24 clips are upscaled to cover it) with random crop and flip
    trainer = Trainer(_wan_cfg(tiny_model, tmp_path, path, "data.random_flip=true", "data.center_crop=false",
                               "data.width=32"), show_progress=False)
    trainer.setup()
    assert trainer.data_counts == {"rows": 5, "pairs": 4, "ties_dropped": 1, "skipped": 0}
    batch = next(trainer._loader(0))
    assert batch["pixels_w"].shape == (2, 3, 5, 16, 32)
    assert trainer.adapter.encode_images(batch["pixels_w"]).shape == (2, 16, 2, 2, 4)
    result = trainer.train()
    assert result.steps == 3
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)


@pytest.mark.slow
def test_flow_dpo_overfits_four_video_pairs_to_high_implicit_accuracy(clips, tiny_model, tmp_path):
    """A short overfit on real VIDEO pairs (GIF and MP4 files, 5 frames -> 2 latent frames each) through
    the normal loop: the implicit accuracy (policy prefers the winner more than the reference does) climbs
    from chance to >= 0.9 and the loss falls well below log 2."""
    import json

    from diffalign.train.loop import Trainer

    d, _, _, _ = clips
    rows = [{"jpg_0": "a10.gif", "jpg_1": "b10.mp4", "label_0": 1, "caption": "a white square moving right"},
            {"jpg_0": "b10.gif", "jpg_1": "a10.mp4", "label_0": 0, "caption": "a white square moving right"},
            {"jpg_0": "a30.mp4", "jpg_1": "b10.gif", "label_0": 1, "caption": "a square on two colours"},
            {"jpg_0": "b10.mp4", "jpg_1": "a10.gif", "label_0": 0, "caption": "a square on two colours"}]
    path = d / "overfit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = Trainer(_wan_cfg(tiny_model, tmp_path, path, "lora.rank=8", "optim.lr=5e-3", "train.max_steps=40",
                               "train.batch_size=4"), show_progress=False)
    trainer.setup()
    assert trainer.data_counts["pairs"] == 4
    result = trainer.train()
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    last10 = result.history[-10:]
    acc = sum(h["implicit_acc"] for h in last10) / 10
    median_loss = sorted(h["loss"] for h in last10)[5]
    assert acc >= 0.9 and median_loss < 0.6, [(h["step"], round(h["loss"], 3), h["implicit_acc"]) for h in result.history]
