#!/usr/bin/env python
"""Inference-time alignment on the embedded world: RLG over w and Flow-NRG over per-dimension weights.

Held-out prompts of the world (``prompt_splits``), one fixed seed per (prompt, copy); every variant
samples the SAME (prompt, seed) list, so differences are paired. Scores: the world oracle.

    python bench/world_guidance.py rlg --model world:flow --lora runs/demo-flow/train/lora
        oracle overall for RLG w in --ws (default 0 0.5 1 1.5 2); w = 0 must equal the base samples
    python bench/world_guidance.py nrg --model world:flow --reward runs/latent-reward --dims color,shape
        no guidance vs NRG on each named dimension alone (weights DIM=1): per-dimension oracle gains with
        paired permutation p-values, so one sees the guided dimension move and the others less

The last line is ``BENCH_JSON {...}`` with every number, for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def heldout(n_prompts: int | None, copies: int) -> tuple[list[str], list[int]]:
    from diffalign.world.scenes import prompt_splits

    _, held = prompt_splits(0)
    caps = [s.caption() for s in held][:n_prompts]
    caps = [c for c in caps for _ in range(copies)]
    return caps, [20_000 + i for i in range(len(caps))]


def oracle(images: np.ndarray, caps: list[str]) -> dict[str, np.ndarray]:
    from diffalign.world.oracle import score

    return score(images, caps)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("mode", choices=("rlg", "nrg"))
    p.add_argument("--model", default="world:flow")
    p.add_argument("--lora", default=None, help="rlg: the aligned LoRA (base = adapters off)")
    p.add_argument("--ws", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0], help="rlg: scales")
    p.add_argument("--reward", default=None, help="nrg: noise-aware latent reward (train-reward folder)")
    p.add_argument("--dims", default=None, help="nrg: comma-separated dimensions to guide one at a time "
                                                "(default: every dimension of the reward)")
    p.add_argument("--scale", type=float, default=1.0, help="nrg: guidance scale")
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts (default all 210)")
    p.add_argument("--copies", type=int, default=1, help="seeds per prompt")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--scheduler", default="auto", help="eps models: 'pipeline' samples as the demo does (DDPM)")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)

    from diffalign.cli import _quiet_libraries
    from diffalign.samplers import SampleConfig, Sampler
    from diffalign.world.demo import paired_permutation_p, win_rate

    _quiet_libraries()
    caps, seeds = heldout(args.prompts, args.copies)
    common = dict(model=args.model, prompts=caps, seeds=seeds, steps=args.steps, guidance_scale=args.guidance_scale,
                  scheduler=args.scheduler, batch_size=args.batch_size, progress=False)
    rows, record = [], {"bench": "world_guidance", "mode": args.mode, "model": args.model, "n": len(caps),
                        "command": shlex.join(["python", "bench/world_guidance.py", *argv])}
    if args.mode == "rlg":
        if not args.lora:
            p.error("rlg needs --lora")
        plain = Sampler(SampleConfig(**common))
        base = plain.sample()
        base_scores = oracle(base.images, caps)
        adapter = plain.adapter
        for w in args.ws:
            t0 = time.time()
            res = Sampler(SampleConfig(**common, lora=args.lora, rlg=w), adapter=adapter).sample()
            s = oracle(res.images, caps)
            diff = s["overall"] - base_scores["overall"]
            rows.append({"w": w, "overall": float(s["overall"].mean()), "gain": float(diff.mean()),
                         "win_rate": win_rate(s["overall"], base_scores["overall"]),
                         "p": paired_permutation_p(diff), "equals_base": bool(np.array_equal(res.images, base.images)),
                         **{d: float(v.mean()) for d, v in s.items() if d != "overall"}, "seconds": time.time() - t0})
            print(f"w={w:<4g} overall {rows[-1]['overall']:.4f}  gain {rows[-1]['gain']:+.4f}  win {rows[-1]['win_rate']:.3f}"
                  f"  p {rows[-1]['p']:.2g}  identical to base: {rows[-1]['equals_base']}", flush=True)
        overall = [r["overall"] for r in rows]
        record["monotonic"] = bool(all(b > a for a, b in zip(overall, overall[1:])))
        record["base_overall"] = float(base_scores["overall"].mean())
    else:
        if not args.reward:
            p.error("nrg needs --reward")
        from diffalign.rewards import build_reward

        reward = build_reward(args.reward)
        dims = args.dims.split(",") if args.dims else list(reward.dimensions)
        plain = Sampler(SampleConfig(**common))
        base = plain.sample()
        base_scores = oracle(base.images, caps)
        record["base"] = {d: float(v.mean()) for d, v in base_scores.items()}
        for dim in dims:
            t0 = time.time()
            res = Sampler(SampleConfig(**common, nrg_weights={dim: 1.0}, nrg_scale=args.scale),
                          adapter=plain.adapter, nrg_reward=reward).sample()
            s = oracle(res.images, caps)
            row = {"guided": dim, "seconds": time.time() - t0}
            for d, v in s.items():
                diff = v - base_scores[d]
                row[d] = {"after": float(v.mean()), "gain": float(diff.mean()), "p": paired_permutation_p(diff),
                          "win_rate": win_rate(v, base_scores[d])}
            rows.append(row)
            print(f"NRG on {dim:10s} " + "  ".join(f"{d} {row[d]['gain']:+.3f} (p {row[d]['p']:.2g})"
                                                  for d in base_scores), flush=True)
    record["rows"] = rows
    print("BENCH_JSON " + json.dumps(record))


if __name__ == "__main__":
    main()
