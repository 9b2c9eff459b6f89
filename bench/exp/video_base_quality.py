"""Base quality of a video world generator (python bench/exp/video_base_quality.py world:video): oracle means on 64 train and 64 held-out prompts, and an untrained pipeline with the same VAE."""
import sys, numpy as np, torch
torch.set_num_threads(1)
from diffalign.cli import _quiet_libraries; _quiet_libraries()
from diffusers import WanPipeline
from diffalign.world.generators import build_world_pipeline
from diffalign.world.pairs import generate
from diffalign.world.video import video_prompt_splits
from diffalign.world.video_oracle import score_clips
from diffalign.models import resolve_pretrained
pipe = WanPipeline.from_pretrained(resolve_pretrained(sys.argv[1]))
train, held = video_prompt_splits(0)
for name, pool in (("train", train[::13][:64]), ("held", held[::7][:64])):
    caps = [s.caption() for s in pool]
    sc = score_clips(generate(pipe, caps, list(range(len(caps))), steps=15), caps)
    print(name, " ".join(f"{d} {v.mean():.3f}" for d, v in sc.items()), flush=True)
caps = [s.caption() for s in train[::13][:16]]
sc = score_clips(generate(build_world_pipeline("video", pipe.vae), caps, list(range(16)), steps=10), caps)
print("untrained", " ".join(f"{d} {v.mean():.3f}" for d, v in sc.items()))
sc = score_clips(generate(pipe, caps, list(range(16)), steps=10), caps)
print("trained10", " ".join(f"{d} {v.mean():.3f}" for d, v in sc.items()))
