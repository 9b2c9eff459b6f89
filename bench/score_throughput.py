#!/usr/bin/env python
"""Scoring throughput: batched vs one-at-a-time, for the weight-free scorers and the world oracle.

For each reward the SAME inputs are scored two ways, on the CPU by default:

``batched``   ``reward(x[i:i + B])`` over the set in batches of ``--batch-size`` (what
              ``diffalign score`` does with files of equal size, and what samplers/objectives do)
``single``    ``reward(x[i:i + 1])`` for each input (a per-image scoring loop, as in scripts that
              score files one by one)

Inputs: ``--n`` images at each of ``--sizes`` pixels for the weight-free image scorers (smooth
random colour fields plus mild noise, so JPEG sizes are realistic rather than those of pure noise);
``--n`` world renders at 32 px with their true captions for the oracle; ``--n-videos`` videos of
``--frames`` frames at ``--video-size`` px (a moving square) for flicker and motion. Every figure is
items/s from the fastest of ``--repeats`` timed passes after one untimed pass (the fastest, not the
median, because other processes on a shared machine only ever add time); ratio = batched / single.
Results are checked equal between the two ways (max abs difference printed), so the speed-up is
like for like.

``--cli`` also times the user path end to end: ``diffalign score`` (in-process) over PNG files
written to a temporary folder, --batch-size 1 vs --batch-size B (file loading included).

CPU timings on a shared machine vary; the 1-minute load average before and after is printed. The
last line is ``BENCH_JSON {...}`` with every number, for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from diffalign.rewards import build_reward  # noqa: E402

IMAGE_REWARDS = ("compressibility", "brightness", "saturation", "colorfulness")
VIDEO_REWARDS = ("flicker", "motion")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=128, help="images per reward and size")
    p.add_argument("--sizes", default="32,256", help="comma-separated image sides for the weight-free image scorers")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the batched variant")
    p.add_argument("--n-videos", type=int, default=32, help="videos for flicker/motion")
    p.add_argument("--frames", type=int, default=16, help="frames per video")
    p.add_argument("--video-size", type=int, default=64, help="video frame side")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per variant (fastest reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:i]")
    p.add_argument("--cli", action="store_true", help="also time `diffalign score` end to end over PNG files")
    return p.parse_args(argv)


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """[n, 3, size, size] in [0, 1]: upsampled 8x8 random colour fields + noise (std 0.02)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def moving_square_videos(n: int, frames: int, size: int) -> tuple[torch.Tensor, list[float]]:
    """[n, frames, 3, size, size]: a square moving 1 px per frame; fps alternating 8 / 24."""
    v = torch.zeros(n, frames, 3, size, size)
    side = size // 4
    for i in range(n):
        for f in range(frames):
            x0 = (i + f) % (size - side)
            v[i, f, i % 3, side:2 * side, x0:x0 + side] = 1.0
    return v, [8.0 if i % 2 else 24.0 for i in range(n)]


def time_passes(fn: Callable[[], dict[str, torch.Tensor]], repeats: int) -> tuple[float, dict[str, torch.Tensor]]:
    out = fn()  # untimed: first-call allocations, lazy imports
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def bench_reward(name: str, x: torch.Tensor, prompts: list[str] | None, fps: list[float] | None,
                 batch_size: int, repeats: int, device: str) -> dict:
    reward = build_reward(name, device)
    x = x.to(device)
    n = len(x)

    def run(b: int) -> Callable[[], dict[str, torch.Tensor]]:
        def go() -> dict[str, torch.Tensor]:
            parts: dict[str, list[torch.Tensor]] = {}
            with torch.no_grad():
                for i in range(0, n, b):
                    kw = {"fps": fps[i:i + b]} if fps is not None else {}
                    out = reward(x[i:i + b], prompts[i:i + b] if prompts is not None else None, **kw)
                    for k, v in out.items():
                        parts.setdefault(k, []).append(v)
            if x.is_cuda:
                torch.cuda.synchronize()
            return {k: torch.cat(v) for k, v in parts.items()}
        return go

    t_batched, out_b = time_passes(run(batch_size), repeats)
    t_single, out_s = time_passes(run(1), repeats)
    diff = max(float((out_b[k].double() - out_s[k].double()).abs().max()) for k in out_b)
    return {"reward": name, "n": n, "shape": list(x.shape[1:]), "batched_per_s": n / t_batched,
            "single_per_s": n / t_single, "ratio": t_single / t_batched, "max_abs_diff": diff}


def bench_cli(images: torch.Tensor, name: str, prompts: list[str] | None, batch_size: int, repeats: int) -> dict:
    """`diffalign score` in-process over PNG files: --batch-size 1 vs --batch-size B."""
    from PIL import Image

    from diffalign.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, img in enumerate((images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()):
            files.append(str(Path(tmp) / f"{i:05d}.png"))
            Image.fromarray(img).save(files[-1])
        extra: list[str] = []
        if prompts is not None:
            (Path(tmp) / "prompts.txt").write_text("\n".join(prompts) + "\n")
            extra = ["--prompts", str(Path(tmp) / "prompts.txt")]

        def run(b: int) -> Callable[[], dict]:
            def go() -> dict:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    code = main(["score", "--reward", name, "--format", "json", "--batch-size", str(b),
                                 "--device", "cpu", *extra, *files])
                assert code == 0, f"diffalign score exited {code}"
                return {}
            return go

        t_batched, _ = time_passes(run(batch_size), repeats)
        t_single, _ = time_passes(run(1), repeats)
    n = len(images)
    return {"reward": f"cli:{name}", "n": n, "shape": list(images.shape[1:]), "batched_per_s": n / t_batched,
            "single_per_s": n / t_single, "ratio": t_single / t_batched, "max_abs_diff": None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffalign.world import render_batch, sample_scenes

    load_before = os.getloadavg()[0]
    sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
    scenes = sample_scenes(args.n, seed=0)
    world = torch.from_numpy(render_batch(scenes, size=32)).permute(0, 3, 1, 2).float() / 255
    captions = [s.caption() for s in scenes]
    videos, fps = moving_square_videos(args.n_videos, args.frames, args.video_size)

    results = [bench_reward(r, smooth_images(args.n, size), None, None, args.batch_size, args.repeats, args.device)
               for r in IMAGE_REWARDS for size in sizes]
    results.append(bench_reward("oracle", world, captions, None, args.batch_size, args.repeats, args.device))
    results += [bench_reward(r, videos, None, fps, args.batch_size, args.repeats, args.device) for r in VIDEO_REWARDS]
    if args.cli:
        results.append(bench_cli(smooth_images(args.n, sizes[0]), "brightness", None, args.batch_size, args.repeats))
        results.append(bench_cli(world, "oracle", captions, args.batch_size, args.repeats))
    load_after = os.getloadavg()[0]

    print(f"scoring throughput on {args.device} (torch {torch.__version__}, {torch.get_num_threads()} threads), "
          f"batched = batch {args.batch_size} vs single = batch 1; items/s, fastest of {args.repeats}")
    header = (f"{'reward':18s} {'input':>16s} {'n':>5s} {'batched/s':>10s} {'single/s':>9s} {'ratio':>6s} "
              f"{'max|diff|':>9s}")
    print(header)
    print("-" * len(header))
    for r in results:
        shape = "x".join(str(s) for s in r["shape"])
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        print(f"{r['reward']:18s} {shape:>16s} {r['n']:5d} {r['batched_per_s']:10.1f} {r['single_per_s']:9.1f} "
              f"{r['ratio']:5.1f}x {diff:>9s}")
    print(f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after "
          f"({os.cpu_count()} CPUs; other processes inflate CPU timings)")
    print("BENCH_JSON " + json.dumps({"bench": "score_throughput", "device": args.device,
                                      "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                                      "load_before": load_before, "load_after": load_after, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
