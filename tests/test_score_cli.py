"""`diffalign score`: columns, formats, prompts, batching, corrupt files and exit codes (in-process)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.rewards import Reward, available
from diffalign.rewards.media import write_video

# hand-computed Rec.601 luma of flat uint8 colours: (0.299 R + 0.587 G + 0.114 B) / 255
ORANGE, GREEN, GREY = (204, 102, 51), (0, 255, 0), (128, 128, 128)
LUMA = {ORANGE: (0.299 * 204 + 0.587 * 102 + 0.114 * 51) / 255, GREEN: 0.587, GREY: 128 / 255}
SAT = {ORANGE: (204 - 51) / 204, GREEN: 1.0, GREY: 0.0}


def png(path: Path, rgb: tuple[int, int, int], size: int = 16) -> str:
    Image.fromarray(np.full((size, size, 3), rgb, np.uint8)).save(path)
    return str(path)


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    f = {"orange": png(tmp_path / "orange.png", ORANGE), "green": png(tmp_path / "green.png", GREEN),
         "grey": png(tmp_path / "grey.png", GREY, size=24)}
    (tmp_path / "bad.png").write_bytes(b"this is not an image")
    f["bad"] = str(tmp_path / "bad.png")
    f["missing"] = str(tmp_path / "missing.png")
    return f


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["score", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str) -> tuple[int, list[dict], str]:
    code, out, err = run(capsys, "--format", "json", *argv)
    return code, json.loads(out), err


# ------------------------------------------------------------------ listing and usage errors


def test_list_names_every_registered_reward(capsys):
    code, out, _ = run(capsys, "--list")
    assert code == 0
    for name, entry in available().items():
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        assert entry.input_kind in line and ",".join(entry.dimensions) in line and entry.help in line
    assert "color,shape,background,layout,overall" in out
    code, out, _ = run(capsys, "--list", "--format", "json")
    listed = json.loads(out)
    assert [r["name"] for r in listed] == list(available())
    assert {"name": "flicker", "input_kind": "video", "dimensions": ["flicker"]}.items() <= listed[
        [r["name"] for r in listed].index("flicker")].items()


def test_unknown_reward_is_exit_2_with_a_suggestion(capsys, files):
    code, out, err = run(capsys, "--reward", "brightnes", files["orange"])
    assert code == 2 and out == ""
    assert "unknown reward 'brightnes'" in err and "Did you mean 'brightness'?" in err


@pytest.mark.parametrize("argv, message", [
    ((), "no reward given"),
    (("--reward", "brightness"), "no MEDIA files"),
    (("--reward", "brightness", "--weights", "brightness", "x.png"), "not COLUMN=NUMBER"),
    (("--reward", "brightness", "--weights", "brightnes=1", "x.png"), "unknown column(s) ['brightnes']"),
    (("--reward", "brightness,brightness", "x.png"), "given twice"),
    (("--reward", "oracle", "x.png"), "need prompts"),
    (("--reward", "brightness", "--batch-size", "0", "x.png"), "--batch-size must be >= 1"),
])
def test_usage_errors_are_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in err, err


# ------------------------------------------------------------------ values, columns, formats


def test_single_reward_json_hand_values(capsys, files):
    code, rows, err = run_json(capsys, "--reward", "brightness", files["orange"], files["green"], files["grey"])
    assert code == 0 and "3 file(s) scored" in err
    assert [r["file"] for r in rows] == [files["orange"], files["green"], files["grey"]]  # MEDIA order
    assert set(rows[0]) == {"file", "brightness", "error"}  # one reward: bare dimension names
    for row, rgb in zip(rows, (ORANGE, GREEN, GREY)):
        assert row["brightness"] == pytest.approx(LUMA[rgb], abs=1e-6) and row["error"] is None


def test_several_rewards_columns_weights_and_csv(capsys, files):
    argv = ("--reward", "brightness,saturation", "-r", "colorfulness", "--weights", "brightness=2,saturation=-1",
            files["orange"], files["grey"])
    code, rows, _ = run_json(capsys, *argv)
    assert code == 0
    assert list(rows[0]) == ["file", "brightness", "saturation", "colorfulness", "overall", "error"]
    for row, rgb in zip(rows, (ORANGE, GREY)):
        assert row["saturation"] == pytest.approx(SAT[rgb], abs=1e-6)
        assert row["overall"] == pytest.approx(2 * LUMA[rgb] - SAT[rgb], abs=1e-6)
    assert rows[0]["colorfulness"] == pytest.approx(0.3 * np.hypot(204 - 102, (204 + 102) / 2 - 51), rel=1e-5)
    assert rows[1]["colorfulness"] == pytest.approx(0.0, abs=1e-4)
    code, out, _ = run(capsys, "--format", "csv", *argv)
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and list(parsed[0]) == ["file", "brightness", "saturation", "colorfulness", "overall", "error"]
    assert float(parsed[0]["overall"]) == pytest.approx(rows[0]["overall"]) and parsed[0]["error"] == ""


def test_multi_dimensional_reward_columns_are_prefixed(capsys, tmp_path):
    from diffalign.world import render_batch, sample_scenes

    scene = sample_scenes(1, 5)[0]
    path = tmp_path / "w.png"
    Image.fromarray(render_batch([scene])[0]).save(path)
    code, rows, _ = run_json(capsys, "--reward", "oracle,brightness", "--prompt", scene.caption(), str(path))
    assert code == 0
    assert list(rows[0])[1:] == ["oracle.color", "oracle.shape", "oracle.background", "oracle.layout",
                                 "oracle.overall", "brightness", "error"]
    assert rows[0]["oracle.overall"] > 0.95


def test_table_is_aligned_and_readable(capsys, files):
    code, out, _ = run(capsys, "--reward", "brightness,saturation", files["orange"], files["grey"])
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["file", "brightness", "saturation"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == [files["orange"], f"{LUMA[ORANGE]:.4f}", f"{SAT[ORANGE]:.4f}"]
    assert len(lines[2]) == len(lines[3]) == len(lines[0])  # numbers right-aligned under their headers


# ------------------------------------------------------------------ corrupt files


def test_corrupt_and_missing_files_are_named_and_the_batch_continues(capsys, files):
    media = [files["orange"], files["bad"], files["missing"], files["green"]]
    code, rows, err = run_json(capsys, "--reward", "brightness,saturation", *media)
    assert code == 1
    assert [r["file"] for r in rows] == media
    assert rows[0]["brightness"] == pytest.approx(LUMA[ORANGE], abs=1e-6) and rows[0]["error"] is None
    assert rows[3]["saturation"] == pytest.approx(1.0) and rows[3]["error"] is None
    assert "not a readable image" in rows[1]["error"] and rows[1]["brightness"] is None
    assert "no such file" in rows[2]["error"] and rows[2]["saturation"] is None
    assert "2 of 4 file(s) failed" in err and files["bad"] in err and files["missing"] in err
    code, out, _ = run(capsys, "--format", "csv", "--reward", "brightness", *media)
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert code == 1 and parsed[1]["brightness"] == "" and "not a readable image" in parsed[1]["error"]
    assert float(parsed[3]["brightness"]) == pytest.approx(0.587, abs=1e-6)
    code, out, _ = run(capsys, "--reward", "brightness", *media)
    header, _, *body = out.splitlines()
    assert code == 1 and header.split()[-1] == "error"
    assert "not a readable image" in body[1] and body[1].startswith(files["bad"])


def test_one_bad_prompt_fails_only_its_row(capsys, tmp_path):
    from diffalign.world import render_batch, sample_scenes

    scenes = sample_scenes(3, 2)
    paths = []
    for i, img in enumerate(render_batch(scenes)):
        Image.fromarray(img).save(tmp_path / f"w{i}.png")
        paths.append(str(tmp_path / f"w{i}.png"))
    captions = [scenes[0].caption(), "a photo of a cat", scenes[2].caption()]
    (tmp_path / "caps.txt").write_text("\n".join(captions) + "\n")
    code, rows, err = run_json(capsys, "--reward", "oracle", "--prompts", str(tmp_path / "caps.txt"), *paths)
    assert code == 1 and "1 of 3 file(s) failed" in err
    assert rows[0]["overall"] > 0.95 and rows[2]["overall"] > 0.95  # the batch failed, then was scored one by one
    assert "cannot parse caption 'a photo of a cat'" in rows[1]["error"] and rows[1]["color"] is None


# ------------------------------------------------------------------ prompts


@pytest.fixture
def world_files(tmp_path):
    from diffalign.world import render_batch, sample_scenes

    scenes = sample_scenes(4, 11)
    paths = []
    for i, img in enumerate(render_batch(scenes)):
        Image.fromarray(img).save(tmp_path / f"scene{i}.png")
        paths.append(str(tmp_path / f"scene{i}.png"))
    return paths, [s.caption() for s in scenes]


def test_prompts_as_lines_json_and_csv_agree(capsys, tmp_path, world_files):
    paths, captions = world_files
    (tmp_path / "p.txt").write_text("\n".join(captions) + "\n")
    (tmp_path / "p.json").write_text(json.dumps({Path(p).name: c for p, c in zip(paths, captions)}))
    with open(tmp_path / "p.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "prompt"])
        w.writerows([[p, c] for p, c in zip(paths, captions)])
    (tmp_path / "list.json").write_text(json.dumps(captions))
    results = []
    for name in ("p.txt", "p.json", "p.csv", "list.json"):
        code, rows, _ = run_json(capsys, "--reward", "oracle", "--weights", "color=1,shape=1",
                                 "--prompts", str(tmp_path / name), *paths)
        assert code == 0, name
        # one reward: bare dimensions; its own "overall" exists, so the weighted sum is weighted_overall
        assert list(rows[0]) == ["file", "color", "shape", "background", "layout", "overall", "weighted_overall",
                                 "error"]
        for r in rows:
            assert r["overall"] > 0.95 and r["weighted_overall"] == pytest.approx(r["color"] + r["shape"])
        results.append([r["overall"] for r in rows])
    assert all(r == results[0] for r in results)
    # a wrong (shuffled) caption scores low: the prompts really are matched to their own files
    code, rows, _ = run_json(capsys, "--reward", "oracle", "--prompt", captions[0], *paths)
    assert rows[0]["overall"] > 0.95 and min(r["overall"] for r in rows[1:]) < 0.8


def test_prompt_file_errors_are_exit_2(capsys, tmp_path, world_files):
    paths, captions = world_files
    (tmp_path / "short.txt").write_text("\n".join(captions[:2]))
    code, _, err = run(capsys, "--reward", "oracle", "--prompts", str(tmp_path / "short.txt"), *paths)
    assert code == 2 and "2 prompts for 4 files" in err
    (tmp_path / "partial.json").write_text(json.dumps({Path(paths[0]).name: captions[0]}))
    code, _, err = run(capsys, "--reward", "oracle", "--prompts", str(tmp_path / "partial.json"), *paths)
    assert code == 2 and "no prompt for 3 file(s)" in err and Path(paths[1]).name in err
    code, _, err = run(capsys, "--reward", "oracle", "--prompts", str(tmp_path / "nope.txt"), *paths)
    assert code == 2 and "nope.txt: no such file" in err


# ------------------------------------------------------------------ batching


def test_files_of_the_same_size_are_batched(capsys, monkeypatch, tmp_path):
    from diffalign.rewards import registry

    calls: list[tuple[int, ...]] = []

    class MeanRed(Reward):
        name = "meanred"
        dimensions = ("meanred",)
        input_kind = "image"

        def score(self, inputs, prompts=None, *, fps=None, t=None):
            calls.append(tuple(inputs.shape))
            return {"meanred": inputs[:, 0].flatten(1).mean(1)}

    monkeypatch.setitem(registry._REGISTRY, "meanred", registry.RewardEntry(
        "meanred", lambda ckpt, device: MeanRed(), ("meanred",), "image", "test reward"))
    reds = [10, 20, 30, 40, 50, 60, 70]
    sizes = [16, 16, 24, 16, 16, 24, 16]
    media = [png(tmp_path / f"{i}.png", (r, 0, 0), size=s) for i, (r, s) in enumerate(zip(reds, sizes))]
    code, rows, _ = run_json(capsys, "--reward", "meanred", "--batch-size", "2", *media)
    assert code == 0
    assert [r["meanred"] for r in rows] == pytest.approx([r / 255 for r in reds], abs=1e-6)  # order kept
    # 5 files of 16 px: batches of 2, 2, 1; 2 files of 24 px: one batch of 2
    assert sorted(calls) == [(1, 3, 16, 16), (2, 3, 16, 16), (2, 3, 16, 16), (2, 3, 24, 24)]


# ------------------------------------------------------------------ videos


def test_videos_at_their_real_fps(capsys, tmp_path, files):
    static = np.full((12, 32, 32, 3), 90, np.uint8)
    moving = np.zeros((10, 32, 32, 3), np.uint8)
    for i in range(10):
        moving[i, 8:24, 2 + 2 * i:10 + 2 * i] = 255  # 2 px per frame
    s = str(write_video(tmp_path / "static.mp4", static, 24))
    m10 = str(write_video(tmp_path / "moving10.gif", moving, 10))
    m20 = str(write_video(tmp_path / "moving20.gif", moving, 20))
    code, rows, _ = run_json(capsys, "--reward", "flicker,motion", s, m10, m20)
    assert code == 0
    assert rows[0]["flicker"] == pytest.approx(1.0, abs=1e-3) and rows[0]["motion"] == pytest.approx(0.0, abs=0.02)
    # the same frames played twice as fast: same flicker (per frame), twice the motion (per second)
    assert rows[1]["flicker"] == pytest.approx(rows[2]["flicker"], abs=1e-6) and rows[1]["flicker"] < 0.99
    assert rows[2]["motion"] == pytest.approx(2 * rows[1]["motion"], rel=1e-5) and rows[1]["motion"] > 0
    motion10 = rows[1]["motion"]
    # --video-fps samples by time: the 20 fps file at 10 fps shows every other frame
    code, rows, _ = run_json(capsys, "--reward", "flicker,motion", "--video-fps", "10", m20)
    every_other = torch.from_numpy(moving[::2]).float() / 255
    expected = 1 - (every_other[1:] - every_other[:-1]).abs().mean().item()
    assert code == 0 and rows[0]["flicker"] == pytest.approx(expected, abs=1e-6)
    # 4 px per 0.1 s is the same speed as 2 px per 0.05 s: motion per second does not change
    assert rows[0]["motion"] == pytest.approx(2 * motion10, rel=1e-5)
    # --num-frames 5 over the 0.5 s clip picks the frames at 0, 0.1, ..., 0.4 s: the same frames
    code, rows_k, _ = run_json(capsys, "--reward", "flicker,motion", "--num-frames", "5", m20)
    assert code == 0 and rows_k[0]["flicker"] == pytest.approx(rows[0]["flicker"], abs=1e-7)
    assert rows_k[0]["motion"] == pytest.approx(rows[0]["motion"], rel=1e-6)
    # image rewards do not score videos, video rewards not images: a clear cell error, exit 1
    code, rows, err = run_json(capsys, "--reward", "brightness,flicker", files["orange"], m10)
    assert code == 1
    assert rows[0]["brightness"] == pytest.approx(LUMA[ORANGE], abs=1e-6) and rows[0]["flicker"] is None
    assert "flicker: scores videos, not images" in rows[0]["error"]
    assert "brightness: scores images, not videos" in rows[1]["error"] and rows[1]["flicker"] < 1


def test_a_reward_that_cannot_be_built_is_exit_2(capsys, monkeypatch, files):
    from diffalign.rewards import registry

    def broken(ckpt, device):
        raise OSError("weights.safetensors not found in the offline cache")

    monkeypatch.setitem(registry._REGISTRY, "broken", registry.RewardEntry("broken", broken, ("b",), "image", "x"))
    code, out, err = run(capsys, "--reward", "broken", files["orange"])
    assert code == 2 and "cannot build reward 'broken': OSError: weights.safetensors not found" in err
