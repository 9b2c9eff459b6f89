import sys, json
from diffalign.cli import _quiet_libraries
import diffalign.world.demo as demo
_quiet_libraries()
kind, out, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3])
demo.FULL["train_prompts"] = prompts
r = demo.run_demo(kind, out, overrides=sys.argv[4:], show_progress=False)
print(json.dumps({k: r[k] for k in ("oracle_before", "oracle_after", "win_rate", "p_value", "unseen_combinations", "per_dimension", "reward_curve", "seconds", "pairs")}, indent=1))
