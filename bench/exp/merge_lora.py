"""Fuse a LoRA into a world generator and save the result as a pipeline folder (round 2 of iterated DPO by hand):
python bench/exp/merge_lora.py KIND LORA OUT [BASE]   (BASE defaults to world:KIND)."""
import sys
from diffalign.cli import _quiet_libraries
from diffalign.config import load_config
from diffalign.world import demo

_quiet_libraries()
kind, lora, out = sys.argv[1:4]
base = sys.argv[4] if len(sys.argv) > 4 else f"world:{kind}"
demo.fuse_lora_into_folder(load_config(demo.RECIPES[kind], [f"model.pretrained={base}"]), lora, out)
print("saved", out)
