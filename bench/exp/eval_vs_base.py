"""Paired oracle comparison of MODEL (+ optional LORA) against BASE on a demo run's held-out prompts and seeds:
python bench/exp/eval_vs_base.py KIND BASE MODEL [LORA]. Base samples are cached in runs/exp/base-demo-KIND.npy
(BASE = world:KIND only). Prints the comparison as JSON and appends it to runs/exp/results.jsonl."""
import json, sys
from pathlib import Path
import numpy as np
from diffalign.cli import _quiet_libraries
from diffalign.config import load_config
from diffalign.models import load_adapter
from diffalign.world import demo
from diffalign.world.pairs import generate
from diffalign.samplers.api import load_lora

_quiet_libraries()
kind, base_spec, model_spec = sys.argv[1:4]
lora = sys.argv[4] if len(sys.argv) > 4 else None
spec = demo.world_spec(kind)
plan = {**demo.FULL, **demo.FULL_BY_FAMILY[kind]}
_, held = demo.demo_prompts(spec, plan)
caps, seeds, unseen = demo.heldout_samples(spec, held, plan["heldout_seeds"])
kw = dict(steps=plan["sample_steps"], guidance_scale=3.0)


def samples(model: str, lora_path: str | None) -> np.ndarray:
    adapter = load_adapter(load_config(demo.RECIPES[kind], [f"model.pretrained={model}"]).model)
    if lora_path:
        load_lora(adapter, lora_path)
    return generate(adapter.pipe, caps, seeds, **kw)


cache = Path(f"runs/exp/base-demo-{kind}.npy")
if base_spec == f"world:{kind}" and cache.exists():
    base = np.load(cache)
else:
    base = samples(base_spec, None)
    if base_spec == f"world:{kind}":
        np.save(cache, base)
before, after = spec.score(base, caps), spec.score(samples(model_spec, lora), caps)
c = demo.compare(before, after, spec.dimensions)
cu = demo.compare(before, after, spec.dimensions, mask=unseen)
rec = {"kind": kind, "tag": f"eval {model_spec} {lora or ''} vs {base_spec}", "before": c["oracle_before"],
       "after": c["oracle_after"], "win": c["win_rate"], "p": c["p_value"], "unseen_win": cu["win_rate"],
       "unseen_p": cu["p_value"], "per_dim": {d: round(v["gain"], 4) for d, v in c["per_dimension"].items()}}
print(json.dumps(rec))
with open("runs/exp/results.jsonl", "a") as f:
    f.write(json.dumps(rec) + "\n")
