import sys, numpy as np, torch
from diffalign.cli import _quiet_libraries
_quiet_libraries()
from diffalign.models import load_adapter
from diffalign.config import load_config
from diffalign.world.demo import RECIPES
from diffalign.world.pairs import generate
from diffalign.world.oracle import score
from diffalign.world.scenes import prompt_splits
kind, lora, tag = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = load_config(RECIPES[kind])
ad = load_adapter(cfg.model)
pipe = ad.pipe
pipe.load_lora_weights(lora)
_, held = prompt_splits(0)
caps = [s.caption() for s in held]; seeds = [10_000 + 2 * i for i in range(len(caps))]
base = np.load(f"runs/exp/base-{kind}.npy")
al = generate(pipe, caps, seeds, steps=15, guidance_scale=3.0)
b, a = score(base, caps), score(al, caps)
np.savez(f"runs/exp/an-{tag}.npz", **{f"b_{k}": v for k, v in b.items()}, **{f"a_{k}": v for k, v in a.items()}, al=al)
d = a["overall"] - b["overall"]
print("win", np.mean(d > 0), "gain", d.mean())
for thr in (0.005, 0.02, 0.05, 0.1):
    print(thr, "small", np.mean(abs(d) < thr), "big+", np.mean(d >= thr), "big-", np.mean(d <= -thr))
