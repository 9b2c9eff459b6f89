"""`diffalign score-reg RECIPE [key=value ...]`: one-/few-step generator training with a score-regularised
objective (Diff-Instruct*-style) plus an explicit differentiable reward; see diffalign.train.score_reg.
Heavy imports stay inside run() so `diffalign --help` stays fast."""
from __future__ import annotations

import argparse

HELP = ("train a one-/few-step generator: score-regularised distillation from the CFG reference + a differentiable "
        "reward (Diff-Instruct*, KL/DI++); recipes with 'task: score-reg'")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="a YAML recipe path or a shipped score-reg recipe "
                        "(tiny-sd3-score-reg, world-flow-score-reg)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. objective.alpha_rev=10")
    parser.add_argument("--keys", action="store_true", help="list every config key with its help text and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--no-progress", action="store_true", help="no per-log-step lines")


def run(args: argparse.Namespace) -> int:
    import yaml

    from diffalign.config import all_keys, config_to_dict
    from diffalign.train.score_reg import (ScoreRegRunConfig, ScoreRegTrainer, convention_banner,
                                           load_score_reg_config)

    if args.keys:
        for k, h in all_keys(ScoreRegRunConfig).items():
            print(f"{k:32s} {h}")
        return 0
    cfg = load_score_reg_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    from diffalign.cli import _quiet_libraries

    _quiet_libraries()
    trainer = ScoreRegTrainer(cfg)
    print(f"[diffalign] run '{cfg.name}': {cfg.model.family} from {cfg.model.pretrained}, LoRA r={cfg.lora.rank} "
          f"(generator) + LoRA r={cfg.lora.rank} (fake score), on {trainer.device}")
    print(f"[diffalign] {convention_banner(cfg)}")
    trainer.setup()
    s = trainer.train(show_progress=not args.no_progress)
    m = s["final_metrics"]
    print("\n".join(["", "== diffalign score-reg: summary ==",
                     f"run            {cfg.name}  ({cfg.objective.name}, {s['steps']} steps, {s['seconds']:.1f}s)",
                     f"final          loss {m.get('loss', float('nan')):.4g}, reward {m.get('reward', float('nan')):.4g}, "
                     f"fake DSM {m.get('loss_fake', float('nan')):.4g}",
                     f"non-finite     {s['nonfinite_steps']} steps skipped",
                     f"weights        {s['weights']}   (generator LoRA; sample with the same generator_times)"]))
    return 0
