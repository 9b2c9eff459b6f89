"""Quick DPO tuning on existing world pairs/cache: train with overrides, evaluate on held-out (1 seed)."""
import json, sys, time
from pathlib import Path
import numpy as np, torch
from diffalign.cli import _quiet_libraries
from diffalign.config import load_config
from diffalign.train.loop import Trainer
from diffalign.world.demo import RECIPES, compare
from diffalign.world.oracle import score
from diffalign.world.pairs import generate
from diffalign.world.scenes import UNSEEN_COMBOS, prompt_splits

_quiet_libraries()
kind, src, tag = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
overrides = sys.argv[4:]
out = Path(f"runs/exp/{kind}-{tag}")
cfg = load_config(RECIPES[kind], [f"data.path={src/'pairs.parquet'}", f"cache.dir={src/'cache'}",
                                  f"train.output_dir={out}", "train.resume=none", *overrides])
_, held = prompt_splits(0)
caps = [s.caption() for s in held]
seeds = [10_000 + 2 * i for i in range(len(caps))]
unseen = np.array([(s.color, s.shape) in UNSEEN_COMBOS for s in held])
kw = dict(steps=15, guidance_scale=3.0)
t0 = time.time()
tr = Trainer(cfg, show_progress=False)
tr.setup()
basef = Path(f"runs/exp/base-{kind}.npy")
if basef.exists():
    base = np.load(basef)
else:
    from diffalign.train.loop import adapters_disabled
    with adapters_disabled(tr.accelerator.unwrap_model(tr.model)):
        base = generate(tr.adapter.pipe, caps, seeds, **kw)
    np.save(basef, base)
before = score(base, caps)
curve = []
def cb(t):
    if t.step % 100 == 0 and t.step < cfg.train.max_steps:
        with t._ema_weights():
            imgs = generate(t.adapter.pipe, caps, seeds, **kw)
        a = score(imgs, caps); c = compare(before, a)
        curve.append((t.step, round(c["gain"], 4), round(c["win_rate"], 3)))
        print("  step", t.step, curve[-1], flush=True)
res = tr.train(callback=cb)
with tr._ema_weights():
    imgs = generate(tr.adapter.pipe, caps, seeds, **kw)
after = score(imgs, caps)
c = compare(before, after)
cu = compare({k: v[unseen] for k, v in before.items()}, {k: v[unseen] for k, v in after.items()})
rec = {"tag": tag, "overrides": overrides, "before": c["oracle_before"], "after": c["oracle_after"], "win": c["win_rate"],
       "p": c["p_value"], "unseen_win": cu["win_rate"], "unseen_p": cu["p_value"], "curve": curve,
       "per_dim": {d: round(v["gain"], 4) for d, v in c["per_dimension"].items()},
       "train": {k: round(v, 4) for k, v in res.final_metrics.items()}, "sec": round(time.time() - t0)}
print(json.dumps(rec))
with open("runs/exp/results.jsonl", "a") as f:
    f.write(json.dumps(rec) + "\n")
