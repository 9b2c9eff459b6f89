#!/usr/bin/env python
"""Few-step generators on the embedded world: a LoRA (e.g. `diffalign score-reg` output) vs its initialisation.

Samples the held-out world prompts with the base model (no LoRA) and with the LoRA, the SAME seeds, the SAME
number of steps (``--steps``, e.g. 1 for a one-step generator) and guidance, and scores both with the oracle:
mean before/after, gain, paired win rate, permutation p, per-dimension gains.

    diffalign score-reg world-flow-score-reg train.output_dir=runs/score-reg
    python bench/world_few_step.py --model world:flow --lora runs/score-reg/lora --steps 1 --guidance-scale 1

The last line is ``BENCH_JSON {...}``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default="world:flow")
    p.add_argument("--lora", required=True, help="the trained generator's LoRA folder")
    p.add_argument("--steps", type=int, nargs="+", default=[1], help="sampling steps (one row each)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale (1 = none, a distilled generator's)")
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts (default all 210)")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)

    from diffalign.cli import _quiet_libraries
    from diffalign.samplers import SampleConfig, Sampler
    from diffalign.world.demo import compare
    from diffalign.world.oracle import score
    from diffalign.world.scenes import prompt_splits

    _quiet_libraries()
    _, held = prompt_splits(0)
    caps = [s.caption() for s in held][:args.prompts]
    seeds = [30_000 + i for i in range(len(caps))]
    record = {"bench": "world_few_step", "model": args.model, "lora": args.lora, "n": len(caps),
              "guidance_scale": args.guidance_scale, "command": shlex.join(["python", "bench/world_few_step.py", *argv]),
              "rows": []}
    adapter = None
    for steps in args.steps:
        common = dict(model=args.model, prompts=caps, seeds=seeds, steps=steps, guidance_scale=args.guidance_scale,
                      batch_size=args.batch_size, progress=False)
        t0 = time.time()
        plain = Sampler(SampleConfig(**common), adapter=adapter)
        adapter = plain.adapter
        base = plain.sample()
        tuned = Sampler(SampleConfig(**common, lora=args.lora), adapter=adapter).sample()
        c = compare(score(base.images, caps), score(tuned.images, caps))
        row = {"steps": steps, "before": c["oracle_before"], "after": c["oracle_after"], "gain": c["gain"],
               "win_rate": c["win_rate"], "p": c["p_value"],
               "per_dimension": {d: round(v["gain"], 4) for d, v in c["per_dimension"].items()},
               "seconds": round(time.time() - t0)}
        record["rows"].append(row)
        print(f"{steps} step(s): oracle {row['before']:.4f} (init) -> {row['after']:.4f} (LoRA)  gain {row['gain']:+.4f}"
              f"  win {row['win_rate']:.3f}  p {row['p']:.2g}  " +
              " ".join(f"{d} {g:+.3f}" for d, g in row["per_dimension"].items()), flush=True)
    print("BENCH_JSON " + json.dumps(record))
    return record


if __name__ == "__main__":
    main()
