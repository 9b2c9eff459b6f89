"""diffalign.rewards: reward models behind one interface (see rewards/base.py for the conventions).

    from diffalign.rewards import build_reward
    r = build_reward("brightness")            # or "pickscore", "hps:/path/HPS_v2.1_compressed.pt", a trained folder
    scores = r(images, prompts)               # {dimension: [N]}
"""
from .base import InputKind, Normalizer, Reward, RewardError, weighted_overall
from .registry import available, build_reward, register

__all__ = ["InputKind", "Normalizer", "Reward", "RewardError", "available", "build_reward", "register",
           "weighted_overall"]
