"""VideoReward-style model on GENERATOR clips (not renders): held-out accuracy without ties per dimension.

    python bench/videoreward_on_generator.py REWARD_FOLDER [--generator world:video] [--prompts 96] [--k 4]

Samples the video generator k times for each of ``--prompts`` held-out video prompts, labels every
within-prompt pair of clips by the video oracle's VQ / MQ / TA (``videoreward_scores``; a tie when the
scores differ by <= the tie margin, 0.1 as in train-reward) and counts how often the reward model orders
the non-tied pairs the same way. The reward was trained on rendered pairs (``world:video-renders``), so
this measures transfer to what a generator actually makes: blur, smeared objects, wrong motion.
Clips are fed at 8 fps (the reward's sample_fps): the world's motion is per clip, so the label is free.
"""
from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reward", help="a train-reward output folder (e.g. of world-videoreward-composite)")
    ap.add_argument("--generator", default="world:video")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--tie-margin", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from diffalign.cli import _quiet_libraries
    from diffalign.config import ModelConfig
    from diffalign.models import load_pipeline
    from diffalign.rewards.data import labels_from_scores
    from diffalign.rewards.registry import build_reward
    from diffalign.world.pairs import generate
    from diffalign.world.video import video_prompt_splits
    from diffalign.world.video_oracle import VIDEOREWARD_DIMENSIONS, score_clips_videoreward

    _quiet_libraries()
    pipe = load_pipeline(ModelConfig(family="wan", pretrained=args.generator))
    _, held = video_prompt_splits(0)
    order = np.random.default_rng(args.seed).permutation(len(held))[:args.prompts]
    caps = [held[i].caption() for i in order for _ in range(args.k)]
    clips = generate(pipe, caps, [20_000 + i for i in range(len(caps))], steps=args.steps, show_progress=True)
    oracle = score_clips_videoreward(clips, caps)
    reward = build_reward(args.reward)
    videos = torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float() / 255.0        # [N, F, 3, H, W] in [0, 1]
    with torch.no_grad():
        pred = {d: [] for d in VIDEOREWARD_DIMENSIONS}
        for s in range(0, len(caps), 64):
            out = reward.score(videos[s:s + 64], caps[s:s + 64], fps=[8.0] * len(caps[s:s + 64]))
            for d in pred:
                pred[d].append(out[d].float().cpu().numpy())
    pred = {d: np.concatenate(v) for d, v in pred.items()}
    pairs = np.array([(p * args.k + a, p * args.k + b) for p in range(args.prompts)
                      for a, b in itertools.combinations(range(args.k), 2)])
    result = {"reward": args.reward, "generator": args.generator, "prompts": args.prompts, "k": args.k,
              "pairs": len(pairs), "tie_margin": args.tie_margin}
    for d in VIDEOREWARD_DIMENSIONS:
        labels = labels_from_scores(oracle[d][pairs[:, 0]], oracle[d][pairs[:, 1]], args.tie_margin)
        decided = labels != 0
        agree = np.sign(pred[d][pairs[:, 0]] - pred[d][pairs[:, 1]]) == labels
        result[d] = {"acc_without_ties": float(agree[decided].mean()) if decided.any() else None,
                     "non_tied_pairs": int(decided.sum()), "oracle_mean": float(oracle[d].mean())}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
