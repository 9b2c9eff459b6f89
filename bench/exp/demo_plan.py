"""Demo variant with plan overrides: python demo_plan.py KIND OUT key=value... -- cfg overrides"""
import sys, json
from diffalign.cli import _quiet_libraries
import diffalign.world.demo as demo
_quiet_libraries()
kind, out = sys.argv[1], sys.argv[2]
rest = sys.argv[3:]
cut = rest.index("--") if "--" in rest else len(rest)
for kv in rest[:cut]:
    k, v = kv.split("=", 1)
    demo.FULL_BY_FAMILY[kind][k] = v if k == "pairing" else (float(v) if "." in v else int(v))
r = demo.run_demo(kind, out, overrides=rest[cut + 1:], show_progress=False)
print(json.dumps({k: r[k] for k in ("oracle_before", "oracle_after", "win_rate", "p_value", "unseen_combinations", "per_dimension", "reward_curve", "seconds", "pairs")}, indent=1))
