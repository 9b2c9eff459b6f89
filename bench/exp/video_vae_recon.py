"""Recon oracle: renders vs VAE(renders), per video-oracle dimension."""
import sys, numpy as np, torch
torch.set_num_threads(1)
from diffusers import AutoencoderKLWan
from diffalign.world.generators import VIDEO_GEN_FRAMES
from diffalign.world.video import render_clips, sample_video_scenes, video_prompt_splits
from diffalign.world.video_oracle import score_clips
from diffalign.models import resolve_pretrained
vae = AutoencoderKLWan.from_pretrained(resolve_pretrained(sys.argv[1]), subfolder="vae").eval()
_, held = video_prompt_splits(0)
scenes = sample_video_scenes(256, seed=5, pool=held)
clips = render_clips(scenes, 16, VIDEO_GEN_FRAMES, jitter=0.06, seed=6)
x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
with torch.no_grad():
    r = torch.cat([vae.decode(vae.encode(x[i:i+64]).latent_dist.mode()).sample for i in range(0, len(x), 64)])
rec = ((r.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).numpy()
caps = [s.caption() for s in scenes]
a, b = score_clips(clips, caps), score_clips(rec, caps)
print("mse", float((r - x).pow(2).mean()))
for d in a: print(f"{d:12s} true {a[d].mean():.3f} recon {b[d].mean():.3f}")
