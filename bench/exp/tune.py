"""Quick DPO tuning on existing world pairs/cache, evaluated on EVERY held-out prompt with one seed (10000 + 2i):
python bench/exp/tune.py KIND PAIRS_DIR TAG [key=value ...]. The commands of BENCHMARKS' older tuning rows; it is
bench/exp/tune_world.py with TUNE_HELDOUT=all (tune_world.py alone evaluates a demo run's own held-out samples)."""
import os
import runpy
from pathlib import Path

os.environ["TUNE_HELDOUT"] = "all"
runpy.run_path(str(Path(__file__).with_name("tune_world.py")), run_name="__main__")
