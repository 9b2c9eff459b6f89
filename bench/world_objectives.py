#!/usr/bin/env python
"""One row of the objectives table on the embedded world: train a recipe on world pairs, compare with the base.

Trains ``--recipe`` (any world-* training recipe: DPO, GAPO, Flow-RWR, KTO, MaPO, SePPO, online DPO, or
``objective.name=sft`` as an override) through the normal loop on the pairs and latent cache of a demo run
(``diffalign demo`` writes ``runs/demo-<family>/pairs.parquet`` and ``cache/``), then samples the held-out world
prompts with the LoRA off (base) and on (aligned) with the SAME seeds and scores both with the oracle.

    python bench/world_objectives.py --recipe world-unet-gapo --pairs runs/demo-unet --tag gapo
    python bench/world_objectives.py --recipe world-unet-dpo --pairs runs/demo-unet --tag sft objective.name=sft

Prints and appends to ``--results`` (JSON lines) one row: mean oracle before/after, gain, paired win rate,
permutation p, per-dimension gains, seconds. Base samples are cached per model and prompt set
(``runs/world-objectives/base-<model>-<n>.npy``) so rows compare against identical base images.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--recipe", required=True, help="a world-* training recipe (name or YAML path)")
    p.add_argument("--pairs", required=True, help="a demo run folder holding pairs.parquet and cache/")
    p.add_argument("--tag", required=True, help="row name")
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts (default all 210)")
    p.add_argument("--steps", type=int, default=15, help="sampling steps")
    p.add_argument("--out", default="runs/world-objectives", help="folder for runs, base caches and results")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. objective.name=sft")
    args = p.parse_args(argv)

    import torch

    from diffalign.cli import _quiet_libraries
    from diffalign.config import load_config
    from diffalign.train.loop import Trainer, adapters_disabled
    from diffalign.world.demo import compare
    from diffalign.world.oracle import score
    from diffalign.world.pairs import generate
    from diffalign.world.scenes import UNSEEN_COMBOS, prompt_splits

    _quiet_libraries()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    src = Path(args.pairs)
    overrides = [f"data.path={src / 'pairs.parquet'}", f"cache.dir={src / 'cache'}",
                 f"train.output_dir={out / args.tag}", "train.resume=none", *args.overrides]
    cfg = load_config(args.recipe, overrides)
    _, held = prompt_splits(0)
    held = held[:args.prompts]
    caps = [s.caption() for s in held]
    seeds = [10_000 + 2 * i for i in range(len(caps))]
    unseen = np.array([(s.color, s.shape) in UNSEEN_COMBOS for s in held])
    kw = dict(steps=args.steps, guidance_scale=3.0)
    start = time.time()
    if cfg.cache.dir and not (Path(cfg.cache.dir) / "manifest.json").is_file():
        # e.g. GAPO/RWR need a cache that carries the per-image scores: build it once, as `diffalign cache` does
        from diffalign.data.cache import build_cache
        from diffalign.models import load_adapter

        build_cache(cfg, load_adapter(cfg.model), show_progress=False)
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    model_tag = str(cfg.model.pretrained).replace(":", "-").replace("/", "_")
    base_file = out / f"base-{model_tag}-{len(caps)}-{args.steps}.npy"
    if base_file.is_file():
        base = np.load(base_file)
    else:
        with adapters_disabled(trainer.accelerator.unwrap_model(trainer.model)):
            base = generate(trainer.adapter.pipe, caps, seeds, **kw)
        out.mkdir(parents=True, exist_ok=True)
        np.save(base_file, base)
    result = trainer.train()
    aligned = generate(trainer.adapter.pipe, caps, seeds, **kw)
    before, after = score(base, caps), score(aligned, caps)
    c = compare(before, after)
    cu = compare(before, after, mask=unseen)
    row = {"tag": args.tag, "recipe": args.recipe, "objective": cfg.objective.name, "overrides": args.overrides,
           "pairs": str(src), "n": len(caps), "before": c["oracle_before"], "after": c["oracle_after"],
           "gain": c["oracle_after"] - c["oracle_before"], "win_rate": c["win_rate"], "p": c["p_value"],
           "unseen_win_rate": cu["win_rate"], "unseen_p": cu["p_value"],
           "per_dimension": {d: round(v["gain"], 4) for d, v in c["per_dimension"].items()},
           "steps": cfg.train.max_steps, "seconds": round(time.time() - start),
           "final_train_metrics": {k: round(v, 4) for k, v in result.final_metrics.items()},
           "command": shlex.join(["python", "bench/world_objectives.py", *argv])}
    print(f"{args.tag:12s} {cfg.objective.name:10s} oracle {row['before']:.4f} -> {row['after']:.4f} "
          f"(gain {row['gain']:+.4f}, win {row['win_rate']:.3f}, p {row['p']:.2g}; unseen win "
          f"{row['unseen_win_rate']:.3f}) {row['seconds']} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print("BENCH_JSON " + json.dumps(row))
    return row


if __name__ == "__main__":
    main()
