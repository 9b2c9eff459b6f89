"""Weight-free scorers, media loading/writing and the world-oracle reward: hand-computed numbers and round trips."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.rewards import RewardError, available, build_reward
from diffalign.rewards.media import (MediaError, frame_indices_by_time, load_image, load_video, media_kind,
                                     sample_frames_by_time, to_uint8_frames, write_video)


def flat(rgb: tuple[float, float, float], n: int = 1, size: int = 8) -> torch.Tensor:
    """n constant-colour images [n, 3, size, size] with RGB in [0, 1]."""
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


def score1(name: str, x: torch.Tensor, **kw) -> torch.Tensor:
    return build_reward(name)(x, **kw)[name]


# ------------------------------------------------------------------ registry


def test_every_scorer_is_registered_with_its_kind_and_flags():
    entries = available()
    kinds = {"compressibility": "image", "incompressibility": "image", "brightness": "image", "saturation": "image",
             "colorfulness": "image", "flicker": "video", "motion": "video", "oracle": "image"}
    for name, kind in kinds.items():
        assert entries[name].input_kind == kind
        reward = build_reward(name)
        assert reward.name == name and reward.input_kind == kind
        assert reward.dimensions == entries[name].dimensions
    assert entries["oracle"].dimensions == ("color", "shape", "background", "layout", "overall")
    smooth = {"brightness", "saturation", "colorfulness"}
    for name in kinds:
        assert build_reward(name).differentiable == (name in smooth), name
    assert build_reward("oracle").needs_prompt and not build_reward("brightness").needs_prompt
    with pytest.raises(RewardError, match="takes no checkpoint"):
        build_reward("brightness:/some/ckpt")
    with pytest.raises(RewardError, match="sampling rate"):
        build_reward("flicker:fast")


# ------------------------------------------------------------------ image statistics, by hand


def test_brightness_is_rec601_luma():
    # (0.8, 0.4, 0.2): 0.299*0.8 + 0.587*0.4 + 0.114*0.2 = 0.2392 + 0.2348 + 0.0228 = 0.4968
    assert score1("brightness", flat((0.8, 0.4, 0.2))).item() == pytest.approx(0.4968, abs=1e-6)
    # pure green is 0.587 in Rec.601 (it would be 0.7152 in Rec.709)
    assert score1("brightness", flat((0.0, 1.0, 0.0))).item() == pytest.approx(0.587, abs=1e-6)
    # half black, half white: the mean over pixels is 0.5
    x = torch.zeros(1, 3, 4, 4)
    x[..., :2] = 1.0
    assert score1("brightness", x).item() == pytest.approx(0.5, abs=1e-7)


def test_saturation_is_mean_hsv_saturation():
    # S = (max - min) / max = (0.8 - 0.2) / 0.8 = 0.75
    assert score1("saturation", flat((0.8, 0.4, 0.2))).item() == pytest.approx(0.75, abs=1e-6)
    assert score1("saturation", flat((1.0, 0.0, 0.0))).item() == pytest.approx(1.0)
    assert score1("saturation", flat((0.5, 0.5, 0.5))).item() == pytest.approx(0.0, abs=1e-7)
    assert score1("saturation", flat((0.0, 0.0, 0.0))).item() == 0.0  # black: defined as 0, not NaN
    x = flat((1.0, 0.0, 0.0), size=4)
    x[..., 2:] = 1.0  # right half white (S = 0): mean S = 0.5
    assert score1("saturation", x).item() == pytest.approx(0.5)


def test_colorfulness_hasler_suesstrunk_on_0_255():
    # flat (204, 102, 51): rg = 102, yb = (204 + 102) / 2 - 51 = 102, sigma = 0, mu = sqrt(2) * 102
    assert score1("colorfulness", flat((0.8, 0.4, 0.2))).item() == pytest.approx(0.3 * math.sqrt(2) * 102, rel=1e-5)
    # flat red: rg = 255, yb = 127.5 -> 0.3 * sqrt(255^2 + 127.5^2) = 85.5296
    assert score1("colorfulness", flat((1.0, 0.0, 0.0))).item() == pytest.approx(0.3 * math.hypot(255, 127.5), rel=1e-6)
    assert score1("colorfulness", flat((0.3, 0.3, 0.3))).item() == pytest.approx(0.0, abs=1e-5)
    # half red, half green: rg = +-255 (mean 0, std 255), yb = 127.5 everywhere (std 0)
    # -> sigma_rgyb = 255, mu_rgyb = 127.5, M = 255 + 0.3 * 127.5 = 293.25
    x = flat((1.0, 0.0, 0.0), size=4)
    x[:, :, :, 2:] = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)
    assert score1("colorfulness", x).item() == pytest.approx(293.25, rel=1e-6)


def test_scores_are_per_image_in_a_batch():
    x = torch.cat([flat((0.8, 0.4, 0.2)), flat((0.0, 1.0, 0.0)), flat((0.5, 0.5, 0.5))])
    assert score1("brightness", x).tolist() == pytest.approx([0.4968, 0.587, 0.5], abs=1e-6)
    assert score1("saturation", x).tolist() == pytest.approx([0.75, 1.0, 0.0], abs=1e-6)


@pytest.mark.parametrize("name", ["brightness", "saturation", "colorfulness"])
def test_smooth_scorers_pass_gradcheck(name):
    torch.manual_seed(0)
    # away from ties between channels (where max/min switch), the analytic gradient must match
    # finite differences
    x = (0.05 + 0.9 * torch.rand(2, 3, 4, 4, dtype=torch.float64)).requires_grad_(True)
    reward = build_reward(name)
    assert torch.autograd.gradcheck(lambda t: reward(t)[name], (x,), eps=1e-6, atol=1e-5)


def test_gradients_are_finite_where_the_formulas_have_kinks():
    # black (saturation's max = 0) and grey (colorfulness' sqrt(0)) images: finite gradients, no NaN
    for name, rgb in (("saturation", (0.0, 0.0, 0.0)), ("colorfulness", (0.4, 0.4, 0.4)),
                      ("brightness", (0.0, 0.0, 0.0))):
        x = flat(rgb).requires_grad_(True)
        build_reward(name)(x)[name].sum().backward()
        assert torch.isfinite(x.grad).all(), name
    # and the gradient points the right way: pushing red up makes a flat orange image more colourful
    x = flat((0.8, 0.4, 0.2)).requires_grad_(True)
    build_reward("colorfulness")(x)["colorfulness"].sum().backward()
    assert x.grad[:, 0].sum() > 0 and x.grad[:, 2].sum() < 0


def ddpo_jpeg_incompressibility(images: torch.Tensor) -> np.ndarray:
    """DDPO's reference code (ddpo_pytorch/rewards.py), verbatim in substance."""
    images = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy().transpose(0, 2, 3, 1)
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return np.array(sizes)


def test_jpeg_compressibility_is_ddpo_exactly():
    torch.manual_seed(0)
    noise = torch.rand(2, 3, 64, 64)
    x = torch.cat([flat((0.2, 0.5, 0.7), size=64), noise])
    inc = score1("incompressibility", x)
    comp = score1("compressibility", x)
    assert inc.tolist() == pytest.approx(ddpo_jpeg_incompressibility(x).tolist(), abs=1e-6)
    assert comp.tolist() == pytest.approx((-inc).tolist(), abs=0)
    assert inc[0] < 1.5 < 5 < inc[1]  # a flat image is ~0.6 kB, 64x64 noise ~9 kB at quality 95
    assert comp[0] > comp[1]          # so the flat image is the more compressible


def test_image_scorers_refuse_videos_and_wrong_ranges():
    video = torch.rand(2, 5, 3, 8, 8)
    for name in ("brightness", "saturation", "colorfulness", "compressibility", "oracle"):
        with pytest.raises(RewardError, match="video batch"):
            build_reward(name)(video, ["x", "y"] if name == "oracle" else None)
    with pytest.raises(RewardError, match=r"0-255 values\? divide by 255"):
        score1("brightness", flat((0.5, 0.5, 0.5)) * 255)
    with pytest.raises(RewardError, match=r"\[-1, 1\] images"):
        score1("brightness", flat((0.0, 0.0, 0.0)) - 1)
    with pytest.raises(RewardError, match="float pixels"):
        score1("brightness", (flat((0.5, 0.5, 0.5)) * 255).to(torch.uint8))
    with pytest.raises(RewardError, match="videos"):
        score1("flicker", torch.rand(2, 3, 8, 8))


# ------------------------------------------------------------------ video scorers


def moving_bar(fps: int, seconds: float = 1.0, speed: float = 30.0, size: int = 48) -> torch.Tensor:
    """[F, 3, size, size]: a white bar 8 px wide moving right at ``speed`` px per SECOND on black."""
    n = int(round(fps * seconds))
    frames = torch.zeros(n, 3, size, size)
    for i in range(n):
        x0 = 4 + int(round(speed * i / fps))
        frames[i, :, 8:40, x0:x0 + 8] = 1.0
    return frames


def test_flicker_hand_values():
    static = torch.full((2, 6, 3, 8, 8), 0.37)
    assert score1("flicker", static).tolist() == [1.0, 1.0]
    # 0 -> 0.5 -> 0: mean |diff| = 0.5 = 127.5 / 255 -> (255 - 127.5) / 255 = 0.5
    v = torch.zeros(1, 3, 3, 4, 4)
    v[:, 1] = 0.5
    assert score1("flicker", v).item() == pytest.approx(0.5)
    # only the red channel of a quarter of the pixels toggles 0 <-> 1: mean |diff| = 1/3 * 1/4
    v = torch.zeros(1, 4, 3, 4, 4)
    v[:, 1::2, 0, :2, :2] = 1.0
    assert score1("flicker", v).item() == pytest.approx(1 - 1 / 12, abs=1e-6)
    # a one-frame video (e.g. a static GIF whose identical frames were merged) is a still: flicker 1
    assert score1("flicker", torch.rand(2, 1, 3, 4, 4)).tolist() == [1.0, 1.0]
    assert score1("motion", torch.rand(1, 1, 3, 4, 4), fps=[5.0]).item() == 0.0


def test_motion_is_change_per_second_and_needs_fps():
    v = torch.zeros(1, 3, 3, 4, 4)
    v[:, 1] = 0.1
    v[:, 2] = 0.2  # every step changes every value by 0.1
    assert score1("motion", v, fps=[10.0]).item() == pytest.approx(1.0, abs=1e-6)   # 0.1 per 1/10 s
    assert score1("motion", v, fps=[25.0]).item() == pytest.approx(2.5, abs=1e-6)
    assert score1("motion", torch.zeros(1, 4, 3, 4, 4), fps=[24.0]).item() == 0.0
    with pytest.raises(RewardError, match="needs fps"):
        score1("motion", v)
    with pytest.raises(RewardError, match="positive"):
        score1("motion", v, fps=[0.0])


def test_video_scorers_honour_fps():
    fast, slow = moving_bar(30), moving_bar(10)  # the same 1-second motion at 30 and 10 fps
    # native motion is per second: 30 steps of 1 px vs 10 steps of 3 px give the same rate
    m30 = score1("motion", fast[None], fps=[30.0]).item()
    m10 = score1("motion", slow[None], fps=[10.0]).item()
    assert m30 > 0 and m30 == pytest.approx(m10, rel=1e-6)
    # flicker is per frame by definition: the 30 fps file flickers less per frame ...
    assert score1("flicker", fast[None]).item() > score1("flicker", slow[None]).item()
    # ... and flicker:10 / motion:10 first pick the frames shown at 10 fps, so both files agree exactly
    for spec in ("flicker:10", "motion:10"):
        reward = build_reward(spec)
        a = reward(fast[None], fps=[30.0])[reward.dimensions[0]]
        b = reward(slow[None], fps=[10.0])[reward.dimensions[0]]
        assert a.item() == pytest.approx(b.item(), abs=1e-7), spec
    # one batch with different rates per video
    both = torch.stack([fast[:10], fast[:10]])
    out = score1("motion", both, fps=[30.0, 10.0])
    assert out[0].item() == pytest.approx(3 * out[1].item(), rel=1e-6)


# ------------------------------------------------------------------ time-based frame sampling


def test_frame_indices_by_time():
    idx, rate = frame_indices_by_time(30, 30.0, target_fps=10)
    assert idx.tolist() == list(range(0, 30, 3)) and rate == 10.0
    idx, rate = frame_indices_by_time(30, 30.0, num_frames=5)
    assert idx.tolist() == [0, 6, 12, 18, 24] and rate == pytest.approx(5.0)
    idx, _ = frame_indices_by_time(10, 10.0, num_frames=5)
    assert idx.tolist() == [0, 2, 4, 6, 8]  # the same moments (0, .2, .4, .6, .8 s) as the 30 fps file
    idx, _ = frame_indices_by_time(4, 2.0, target_fps=4)  # upsampling holds frames, never invents them
    assert idx.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="exactly one"):
        frame_indices_by_time(10, 10.0)


def test_sample_frames_by_time_same_motion_same_frames():
    fast, slow = moving_bar(30), moving_bar(10)
    for kw in ({"num_frames": 5}, {"target_fps": 10.0}, {"target_fps": 5.0}):
        a, ra = sample_frames_by_time(fast, 30.0, **kw)
        b, rb = sample_frames_by_time(slow, 10.0, **kw)
        assert torch.equal(a, b) and ra == pytest.approx(rb), kw


# ------------------------------------------------------------------ media files


def test_video_round_trip_mp4_gif_and_fps(tmp_path):
    fast = to_uint8_frames(moving_bar(30))
    slow = to_uint8_frames(moving_bar(10))
    assert fast.shape == (30, 48, 48, 3) and fast.dtype == np.uint8
    for suffix in (".mp4", ".gif"):
        slow_fps = 10.0
        fast_fps = 30.0 if suffix == ".mp4" else 20.0  # GIF delays are 1/100 s: 20 fps is exact, 30 is not
        fast_frames = fast if suffix == ".mp4" else to_uint8_frames(moving_bar(20))
        pa = write_video(tmp_path / f"fast{suffix}", fast_frames, fast_fps)
        pb = write_video(tmp_path / f"slow{suffix}", slow, slow_fps)
        va, fa = load_video(pa)
        vb, fb = load_video(pb)
        assert (len(va), fa) == (len(fast_frames), fast_fps) and (len(vb), fb) == (10, slow_fps), suffix
        assert va.shape[1:] == (3, 48, 48) and va.dtype == torch.float32 and 0 <= va.min() and va.max() <= 1
        tol = 0.02 if suffix == ".mp4" else 1e-6  # H.264 is lossy; a 2-colour GIF is exact
        assert (va - torch.from_numpy(fast_frames).permute(0, 3, 1, 2) / 255).abs().mean() < tol
        # time-based sampling of the two files gives the same moments of the motion
        a, _ = sample_frames_by_time(va, fa, num_frames=5)
        b, _ = sample_frames_by_time(vb, fb, num_frames=5)
        assert (a - b).abs().mean() < tol, suffix
        # loading with a target rate samples by time before the float conversion
        c, rc = load_video(pa, target_fps=10.0)
        assert rc == 10.0 and len(c) == 10 and (c - vb).abs().mean() < tol


def test_fractional_fps_and_gif_delay_rounding(tmp_path):
    frames = np.zeros((6, 16, 16, 3), np.uint8)
    frames[:, 4:8, 4:8] = 200
    _, fps = load_video(write_video(tmp_path / "ntsc.mp4", frames, 30000 / 1001))
    assert fps == pytest.approx(29.97, abs=1e-3)
    with pytest.warns(UserWarning, match="33.33 fps"):
        path = write_video(tmp_path / "thirty.gif", frames, 30)
    video, fps = load_video(path)
    assert fps == pytest.approx(100 / 3)  # the file's REAL rate, not the requested one
    assert len(video) == 6 and score1("flicker", video[None]).item() == 1.0  # identical frames are all kept


def test_gif_with_merged_and_uneven_delays_keeps_its_timing(tmp_path):
    # Pillow's save_all merges identical consecutive frames (A A B -> A for 200 ms, B for 100 ms);
    # load_video must hold frames for their delays at 1 / gcd(delays): A A B at 10 fps again
    a = np.zeros((8, 8, 3), np.uint8)
    b = a + 255
    Image.fromarray(a).save(tmp_path / "m.gif", save_all=True, append_images=[Image.fromarray(a), Image.fromarray(b)],
                            duration=100, loop=0)
    assert Image.open(tmp_path / "m.gif").n_frames == 2  # really merged on disk
    video, fps = load_video(tmp_path / "m.gif")
    assert fps == pytest.approx(10.0) and len(video) == 3
    assert video[:2].max() == 0 and video[2].min() == 1
    # uneven delays 30 ms and 50 ms -> 100 fps steps (gcd 10 ms): 3 + 5 frames
    Image.fromarray(a).save(tmp_path / "u.gif", save_all=True, append_images=[Image.fromarray(b)],
                            duration=[30, 50], loop=0)
    video, fps = load_video(tmp_path / "u.gif")
    assert fps == pytest.approx(100.0) and len(video) == 8 and video[2].max() == 0 and video[3].min() == 1
    # one full flip over 7 steps of 10 ms
    assert score1("motion", video[None], fps=[fps]).item() == pytest.approx(100 / 7)


def test_write_video_rejects_bad_input(tmp_path):
    with pytest.raises(MediaError, match="uint8"):
        write_video(tmp_path / "a.mp4", np.zeros((2, 8, 8, 3), np.float32), 10)
    with pytest.raises(MediaError, match="even height and width"):
        write_video(tmp_path / "a.mp4", np.zeros((2, 9, 8, 3), np.uint8), 10)
    with pytest.raises(MediaError, match="no frames"):
        write_video(tmp_path / "a.gif", np.zeros((0, 8, 8, 3), np.uint8), 10)


def test_load_image_round_trip_and_modes(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png")
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    assert torch.equal((x * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(arr))
    rgba = np.concatenate([arr, np.full((5, 7, 1), 10, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert torch.equal(load_image(tmp_path / "rgba.png"), x)  # alpha dropped, colours kept
    Image.fromarray(arr[..., 0]).save(tmp_path / "grey.png")
    g = load_image(tmp_path / "grey.png")
    assert g.shape == (3, 5, 7) and torch.equal(g[0], g[2])
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png").min() == 1.0  # 16-bit white is 1.0, not clipped nonsense
    Image.fromarray(np.full((16, 16, 3), (90, 160, 30), np.uint8)).save(tmp_path / "a.jpg", quality=95)
    assert (load_image(tmp_path / "a.jpg") - torch.tensor([90, 160, 30]).view(3, 1, 1) / 255).abs().max() < 3 / 255


def test_media_errors_name_the_file_and_the_problem(tmp_path, monkeypatch):
    with pytest.raises(MediaError, match=r"missing\.png: no such file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty\.png: the file is empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "junk.png").write_bytes(b"definitely not a png")
    with pytest.raises(MediaError, match=r"junk\.png: not a readable image"):
        load_image(tmp_path / "junk.png")
    good = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8) + 90).save(good, format="PNG")
    (tmp_path / "cut.png").write_bytes(good.getvalue()[:60])
    with pytest.raises(MediaError, match=r"cut\.png: "):
        load_image(tmp_path / "cut.png")
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 100)
    with pytest.raises(MediaError, match=r"junk\.mp4: cannot decode the video"):
        load_video(tmp_path / "junk.mp4")
    with pytest.raises(MediaError, match=r"x\.txt: unsupported file type '\.txt'"):
        media_kind(tmp_path / "x.txt")
    assert media_kind("a.GIF") == "video" and media_kind("b.webp") == "image"
    # a container that decodes to zero frames
    import diffalign.rewards.media as media

    monkeypatch.setattr(media, "_read_av", lambda path: (np.zeros((0, 8, 8, 3), np.uint8), 24.0))
    (tmp_path / "hollow.mp4").write_bytes(b"x")
    with pytest.raises(MediaError, match=r"hollow\.mp4: the video has zero frames"):
        load_video(tmp_path / "hollow.mp4")


# ------------------------------------------------------------------ world oracle


def world_batch(n: int, size: int = 32, seed: int = 0):
    from diffalign.world import render_batch, sample_scenes

    scenes = sample_scenes(n, seed)
    images = render_batch(scenes, size=size)
    return scenes, images, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def test_oracle_true_captions_near_one_wrong_captions_low():
    from diffalign.world import Scene, score

    scenes, images, x = world_batch(12)
    oracle = build_reward("oracle")
    true = oracle(x, [s.caption() for s in scenes])
    assert set(true) == {"color", "shape", "background", "layout", "overall"}
    assert all(v.shape == (12,) and v.dtype == torch.float32 for v in true.values())
    assert true["overall"].min() > 0.95 and true["color"].min() > 0.95 and true["background"].min() > 0.95
    # the conversion from [0, 1] floats is exact: same numbers as the oracle on the uint8 renders
    ref = score(images, [s.caption() for s in scenes])
    for d in true:
        assert np.allclose(true[d].numpy(), ref[d], atol=1e-6), d
    # wrong colour (another palette colour) and wrong background: those dimensions collapse
    other = {"red": "blue", "green": "red", "blue": "yellow", "yellow": "purple", "purple": "green", "orange": "blue"}
    other_bg = {"black": "white", "white": "black", "gray": "teal", "teal": "white"}
    wrong = [Scene(s.shape, other[s.color], s.size, s.position, other_bg[s.background]).caption() for s in scenes]
    bad = oracle(x, wrong)
    assert bad["color"].max() < 0.2 and bad["background"].max() < 0.2 and bad["overall"].max() < 0.6
    assert (true["overall"] - bad["overall"]).min() > 0.4


def test_oracle_sizes_and_prompt_errors():
    scenes, _, x32 = world_batch(6, size=32, seed=3)
    _, _, x64 = world_batch(6, size=64, seed=3)
    oracle = build_reward("oracle")
    captions = [s.caption() for s in scenes]
    s32 = oracle(x32, captions)["overall"]
    s64 = oracle(x64, captions)["overall"]  # area-downsampled to the world's 32 px
    assert s64.min() > 0.95 and (s64 - s32).abs().max() < 0.02
    _, _, x16 = world_batch(2, size=16)
    assert oracle(x16, [s.caption() for s in world_batch(2, size=16)[0]])["background"].min() > 0.95
    with pytest.raises(RewardError, match="square"):
        oracle(x32[:, :, :, :30], captions)
    with pytest.raises(RewardError, match="needs prompts"):
        oracle(x32)
    with pytest.raises(RewardError, match="prompt 1: cannot parse caption 'a cat'"):
        oracle(x32[:2], [captions[0], "a cat"])


def test_cpu_chunking_gives_the_same_scores_and_gradients(monkeypatch):
    import diffalign.rewards.weightfree as wf

    torch.manual_seed(1)
    x = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    v = torch.rand(3, 4, 3, 8, 8)
    whole = {n: build_reward(n)(x)[n] for n in ("brightness", "saturation", "colorfulness")}
    flick = score1("flicker", v)
    monkeypatch.setattr(wf, "_CPU_CHUNK_BYTES", 2 * 3 * 8 * 8 * 8)  # two images per chunk: 3 chunks
    for name, expected in whole.items():
        xs = x.clone().requires_grad_(True)
        out = build_reward(name)(xs)[name]
        assert torch.allclose(out, expected, rtol=1e-12, atol=0), name
        out.sum().backward()
        assert xs.grad.abs().sum() > 0  # gradients reach every chunk
        assert (xs.grad.flatten(1).abs().sum(1) > 0).all()
    assert torch.equal(score1("flicker", v), flick)
