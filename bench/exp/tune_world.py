"""DPO tuning on an existing demo run's pairs + cache, any world kind (unet, flow, video):
python bench/exp/tune_world.py KIND DEMO_DIR TAG [key=value ...]; held-out = the demo's prompts and seeds.
With TUNE_HELDOUT=all (what bench/exp/tune.py sets): every held-out prompt once, seeds 10000 + 2i, base samples
cached in runs/exp/base-KIND.npy (the setting of the older tune.py rows in BENCHMARKS)."""
import json, os, sys, time
from pathlib import Path
import numpy as np
from diffalign.cli import _quiet_libraries
from diffalign.config import load_config
from diffalign.train.loop import Trainer, adapters_disabled
from diffalign.world import demo
from diffalign.world.pairs import generate

_quiet_libraries()
kind, src, tag = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
overrides = sys.argv[4:]
out = Path(f"runs/exp/{kind}-{tag}")
spec = demo.world_spec(kind)
plan = {**demo.FULL, **demo.FULL_BY_FAMILY[kind]}
pairs = src / ("pairs.jsonl" if kind == "video" else "pairs.parquet")
cfg = load_config(demo.RECIPES[kind], [f"data.path={pairs}", f"cache.dir={src/'cache'}",
                                       f"train.output_dir={out}", "train.resume=none", *overrides])
every_heldout = os.environ.get("TUNE_HELDOUT") == "all"
if every_heldout:
    caps, seeds, unseen = demo.heldout_samples(spec, spec.splits()[1], 1, seed_stride=2)
else:
    caps, seeds, unseen = demo.heldout_samples(spec, demo.demo_prompts(spec, plan)[1], plan["heldout_seeds"])
kw = dict(steps=plan["sample_steps"], guidance_scale=3.0)
t0 = time.time()
tr = Trainer(cfg, show_progress=False)
tr.setup()
basef = Path(f"runs/exp/base-{kind}.npy") if every_heldout else src / "tune_base.npy"
if basef.exists():
    base = np.load(basef)
else:
    with adapters_disabled(tr.accelerator.unwrap_model(tr.model)):
        base = generate(tr.adapter.pipe, caps, seeds, **kw)
    np.save(basef, base)
before = spec.score(base, caps)
curve = []
def cb(t):
    if t.step % 100 == 0 and t.step < cfg.train.max_steps:
        with t._ema_weights():  # EMA weights when train.ema=true, the live ones otherwise
            c = demo.compare(before, spec.score(generate(t.adapter.pipe, caps, seeds, **kw), caps), spec.dimensions)
        curve.append((t.step, round(c["gain"], 4), round(c["win_rate"], 3)))
        print("  step", t.step, curve[-1], flush=True)
res = tr.train(callback=cb)
with tr._ema_weights():
    after = spec.score(generate(tr.adapter.pipe, caps, seeds, **kw), caps)
c = demo.compare(before, after, spec.dimensions)
cu = demo.compare(before, after, spec.dimensions, mask=unseen)
rec = {"kind": kind, "tag": tag, "overrides": overrides, "before": c["oracle_before"], "after": c["oracle_after"],
       "win": c["win_rate"], "p": c["p_value"], "unseen_win": cu["win_rate"], "unseen_p": cu["p_value"], "curve": curve,
       "motion": c.get("motion"), "per_dim": {d: round(v["gain"], 4) for d, v in c["per_dimension"].items()},
       "train": {k: round(v, 4) for k, v in res.final_metrics.items()}, "sec": round(time.time() - t0)}
print(json.dumps(rec))
with open("runs/exp/results.jsonl", "a") as f:
    f.write(json.dumps(rec) + "\n")
