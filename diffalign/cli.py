"""`diffalign <verb>`: train, cache, config, recipes, demo, world; score, train-reward and sample plug in
from their subsystems (PLUGGED_VERBS)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from diffalign import __version__

EPILOG = """examples:
  diffalign train tiny-sd15-dpo                       # a shipped recipe, tiny model, toy data, CPU
  diffalign train configs/sdxl-diffusion-dpo.yaml data.path=/data/pickapic train.max_steps=2000
  diffalign cache sdxl-diffusion-dpo cache.dir=/data/cache && diffalign train sdxl-diffusion-dpo cache.dir=/data/cache
  accelerate launch --num_processes 8 -m diffalign train flux-flow-dpo data.path=/data/pairs.parquet
  diffalign config sd3-flow-dpo --keys               # every config key with its help
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML recipe path or the name of a shipped recipe (see `diffalign recipes`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. objective.beta=2500")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign", description="Align diffusion and flow-matching generators "
                                     "with human preferences.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"diffalign {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    p = sub.add_parser("train", help="fine-tune with a preference objective (Diffusion-DPO, Flow-DPO, SFT)")
    _add_config_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to the tracker)")
    p = sub.add_parser("cache", help="encode a preference dataset once into a latent + text-embedding cache")
    _add_config_args(p)
    p = sub.add_parser("config", help="print the resolved config (recipe + overrides) as YAML")
    _add_config_args(p)
    p.add_argument("--keys", action="store_true", help="list every valid key with its help text instead")
    sub.add_parser("recipes", help="list the shipped recipes")

    p = sub.add_parser("demo", help="alignment on the embedded world, end to end: pairs, cache, DPO, held-out oracle eval")
    p.add_argument("--family", choices=("unet", "flow", "video"), default="flow",
                   help="flow (default; ~5x faster): Flow-DPO on the bundled flow transformer; unet: Diffusion-DPO on "
                        "the bundled eps UNet; video: Flow-DPO on the bundled Wan-style video transformer (video world)")
    p.add_argument("--out", default=None, help="output folder (default runs/demo-<family>)")
    p.add_argument("--quick", action="store_true", help="a few prompts and steps: checks the path, not the effect")
    p.add_argument("--rounds", type=int, default=None,
                   help="DPO rounds (iterated DPO: round r >= 2 samples new pairs from round r-1's fused model and "
                        "uses it as the reference); default 2 for unet, 1 for flow and video")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the world-<family>-dpo recipe")
    p.add_argument("--no-progress", action="store_true")

    world = sub.add_parser("world", help="the embedded procedural world: pretrain generators, make preference pairs")
    wsub = world.add_subparsers(dest="world_verb", metavar="WORLD_VERB", required=True)
    p = wsub.add_parser("pretrain", help="train a world generator from scratch (VAE, text encoder, denoiser)")
    from diffalign.world.pretrain import PretrainConfig
    import dataclasses

    for f in dataclasses.fields(PretrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=f"default: {f.default}")
    p.add_argument("--out", required=True, help="folder for the diffusers pipeline")
    p = wsub.add_parser("pairs", help="oracle-best vs oracle-worst pairs from a generator, Pick-a-Pic parquet "
                                      "(video: GIF clips + .jsonl)")
    p.add_argument("--model", default="world:unet", help="world:unet, world:flow, world:video or a pipeline folder")
    p.add_argument("--out", required=True, help="file to write: .parquet for images; .jsonl for video (clips go to "
                                                "<stem>-clips/ beside it)")
    p.add_argument("--prompts", type=int, default=384, help="number of training prompts")
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p = wsub.add_parser("labels", help="unpaired images labelled desirable/undesirable by the oracle (Diffusion-KTO data)")
    p.add_argument("--model", default="world:flow", help="world:unet, world:flow or a pipeline folder")
    p.add_argument("--out", required=True, help="parquet file to write (columns image, caption, label, score, ...)")
    p.add_argument("--prompts", type=int, default=192, help="number of training prompts")
    p.add_argument("--k", type=int, default=6, help="samples per prompt")
    p.add_argument("--threshold", type=float, default=0.6, help="desirable when the oracle overall score >= this")
    p.add_argument("--seed", type=int, default=0)

    for verb, module in PLUGGED_VERBS.items():
        plugged = _plugged(module)
        if plugged is not None:
            plugged.configure(sub.add_parser(verb, help=plugged.HELP, description=plugged.HELP,
                                             formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


# verbs whose parser and handler live beside their subsystem; each module exposes HELP, configure(parser)
# and run(args) -> exit code, and keeps heavy imports inside run() so `diffalign --help` stays fast
PLUGGED_VERBS = {"score": "diffalign.rewards.score_cli", "train-reward": "diffalign.rewards.train_cli",
                 "sample": "diffalign.samplers.cli", "filter": "diffalign.data.filter_cli",
                 "score-reg": "diffalign.train.score_reg_cli"}


def _plugged(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        return None


def _quiet_libraries() -> None:
    # load-time chatter from diffusers/transformers buries our own progress and summary
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _convention_banner(cfg) -> str:
    """One line stating the objective's exact convention (signs, scales, which images it trains on)."""
    o = cfg.objective
    tw = {"constant": "constant", "one_minus_t_sq": "beta*(1-t)^2 (ablation)",
          "velocity": f"beta*min(1/alpha_bar_t, {o.velocity_weight_cap:g}) on eps models (errors in velocity space)"
          }[o.time_weighting]
    sft = f"; + {o.sft_weight:g} * err_θ(w)" if o.sft_weight else ""
    scale = (f"S = (score - {o.score_min:g}) / ({o.score_max:g} - {o.score_min:g}) from data.score_column="
             f"{cfg.data.score_column!r}")
    on = cfg.online
    online = (f"; ONLINE pairs: {on.num_samples} samples per data prompt ({on.steps} steps, CFG {on.guidance_scale:g}) "
              f"from the reference (base" + (f", refreshed to the current LoRA every {on.refresh_every} steps" if
                                            on.refresh_every else "") + f"), w = {on.reward!r}-best, l = worst"
              if on.enabled else "")
    if o.name == "dpo":
        return (f"objective: DPO ({o.loss_type}), beta={o.beta:g} with inside = -(beta/2)[(err_θ(w)-err_ref(w)) - "
                f"(err_θ(l)-err_ref(l))], err = per-sample mean squared error; time weighting {tw}" + sft + online)
    if o.name == "seppo":
        flip = {"sign": "s = +1 if err_ref(w) > err_θ(w) else -1", "indicator": "s = 1 if err_ref(w) > err_θ(w) else 0",
                "none": "s = 1 (no flipper)"}[o.seppo_flipper]
        return (f"objective: SePPO, loss = mean -log σ(-(beta/2)[Δ(w) - s Δ(ref_sample)]), Δ = err_θ - err_ref, "
                f"beta={o.beta:g}, {flip}; winners from the data, ref_sample = a LoRA snapshot's own sample "
                f"({on.steps} steps, CFG {on.guidance_scale:g}) drawn uniformly from the last {o.seppo_pool_size} "
                f"snapshots (one every {o.seppo_snapshot_every} steps), which is also the reference")
    if o.name == "gapo":
        return (f"objective: GAPO ({o.loss_type}), loss = mean over pairs of (2^S_w - 2^S_l) * DPO loss(inside), "
                f"each pair weighted BEFORE the mean; inside = -(beta/2)[(err_θ(w)-err_ref(w)) - (err_θ(l)-err_ref(l))], "
                f"beta={o.beta:g}, time weighting {tw}; {scale}, must lie in [0, 1] with S_w >= S_l" + sft)
    if o.name == "rwr":
        clip = (f"clipped at {o.weight_clip:g} with the excess redistributed" if o.weight_clip is not None
                else "unclipped")
        return (f"objective: Flow-RWR, loss = mean_i w_i err_θ(x_i) over winners AND losers as single images, "
                f"w = N softmax(S/tau) (sum N), tau={o.tau:g}, {clip}; {scale}; no reference model")
    if o.name == "kto":
        balance = " (rescaled by the data's class counts: kto_balance)" if o.kto_balance else ""
        return (f"objective: Diffusion-KTO, g = err_ref - err_θ, z0 = max(0, batch mean g) detached, "
                f"loss = mean lambda_y (1 - σ(±beta (g - z0))), + for desirable, - for undesirable images "
                f"(unpaired data: each image's label, own ε and t; pair data: winners desirable, losers undesirable), "
                f"beta={o.beta:g}, lambda_D={o.kto_lambda_desirable:g}, lambda_U={o.kto_lambda_undesirable:g}{balance}")
    if o.name == "mapo":
        return (f"objective: MaPO (reference-free), s(e) = γe/(exp(γe)-1) (decreasing), loss = mean err_θ(w) - "
                f"{o.mapo_weight:g} * mean log σ({o.mapo_scale:g} (s(err_θ(w)) - s(err_θ(l)))), γ={o.mapo_gamma:g}; "
                "no reference forward")
    if o.name == "sft":
        return "objective: SFT, loss = mean err_θ(w) on winners only; no reference model"
    return f"objective: {o.name}"


def cmd_train(args) -> int:
    from diffalign.config import load_config
    from diffalign.train.loop import Trainer

    cfg = load_config(args.config, args.overrides)
    _quiet_libraries()
    trainer = Trainer(cfg, show_progress=not args.no_progress)
    acc = trainer.accelerator
    acc.print(f"[diffalign] run '{cfg.name}': {cfg.model.family} from {cfg.model.pretrained}, "
              f"{'LoRA r=%d' % cfg.lora.rank if cfg.lora.enabled else 'full fine-tune'}, {acc.num_processes} process(es) on {acc.device}")
    acc.print(f"[diffalign] {_convention_banner(cfg)}")
    trainer.setup()
    if trainer.resumed_from:
        acc.print(f"[diffalign] resumed from {trainer.resumed_from} at step {trainer.step}")
    result = trainer.train()
    if acc.is_main_process:
        c = result.data_counts
        m = result.final_metrics
        lines = [
            "", "== diffalign train: summary ==",
            f"run            {cfg.name}  ({cfg.objective.name}, {cfg.model.family}, {result.steps} steps, {result.seconds:.1f}s)",
            (f"data           {trainer.data_source}: {c.get('samples')} labelled images used ({c.get('desirable')} "
             f"desirable, {c.get('undesirable')} undesirable), {c.get('skipped', 0)} bad rows skipped"
             if trainer.data_kind == "unpaired" else
             f"data           {trainer.data_source}: {c.get('pairs')} pairs used, {c.get('ties_dropped', 0)} ties "
             f"dropped, {c.get('skipped', 0)} bad rows skipped"),
            f"final window   loss {m.get('loss', float('nan')):.4f}, implicit acc {m.get('implicit_acc', float('nan')):.3f}, "
            f"grad norm {m.get('grad_norm', float('nan')):.3g}",
            f"non-finite     {result.nonfinite_steps} steps skipped",
            f"weights        {result.export_path}" + ("   (load: pipe.load_lora_weights(path))" if cfg.lora.enabled else ""),
            f"checkpoints    {result.output_dir / 'checkpoints'}   metrics {result.output_dir / 'metrics.jsonl'}",
        ]
        print("\n".join(lines))
        (result.output_dir / "summary.json").write_text(json.dumps({
            "run": cfg.name, "objective": cfg.objective.name, "family": cfg.model.family, "steps": result.steps,
            "seconds": result.seconds, "data": c, "final_metrics": m, "nonfinite_steps": result.nonfinite_steps,
            "weights": str(result.export_path), "rank_checksums": result.rank_checksums}, indent=2))
    return 0


def cmd_cache(args) -> int:
    from diffalign.config import ConfigError, load_config
    from diffalign.data.cache import build_cache
    from diffalign.models import load_adapter

    cfg = load_config(args.config, args.overrides)
    if not cfg.cache.dir:
        raise ConfigError("diffalign cache needs cache.dir=PATH (where the cache is written)")
    _quiet_libraries()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = load_adapter(cfg.model, device=device)
    manifest = build_cache(cfg, adapter)
    c = manifest["counts"]
    if manifest.get("kind") == "unpaired":
        what = (f"images    {c['samples']} labelled images encoded from {c['rows']} rows ({c['desirable']} desirable, "
                f"{c['undesirable']} undesirable); {c['skipped']} bad rows skipped\n"
                f"latents   {manifest['shapes']['latents']} per image\n")
    else:
        what = (f"pairs     {c['pairs']} encoded from {c['rows']} rows; {c['ties_dropped']} ties dropped; {c['skipped']} bad rows skipped\n"
                f"latents   {manifest['shapes']['latents_w']} per image\n")
    # the overrides that shaped this cache (objective, model, data settings) must be repeated when training on it
    kept = [o for o in args.overrides if not o.startswith(("cache.dir=", "data.path="))]
    print(f"\n== diffalign cache: summary ==\ncache     {cfg.cache.dir} ({len(manifest['shards'])} shards)\n"
          + what + "use it    " + " ".join(["diffalign train", args.config, *kept, f"cache.dir={cfg.cache.dir}"]))
    return 0


def cmd_config(args) -> int:
    from diffalign.config import all_keys, dump_config, load_config

    if args.keys:
        for k, h in all_keys().items():
            print(f"{k:32s} {h}")
        return 0
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_recipes(args) -> int:
    from diffalign.config import recipe_names, resolve_recipe

    import yaml

    for name in recipe_names():
        data = yaml.safe_load(resolve_recipe(name).read_text())
        print(f"{name:24s} {data.get('model', {}).get('family', '?'):5s} {data.get('objective', {}).get('name', 'dpo'):4s} "
              f"{data.get('model', {}).get('pretrained', '')}")
    return 0


def cmd_demo(args) -> int:
    from diffalign.world.demo import run_demo

    _quiet_libraries()
    out = args.out or f"runs/demo-{args.family}"
    r = run_demo(args.family, out, quick=args.quick, overrides=args.overrides, show_progress=not args.no_progress,
                 rounds=args.rounds)
    rows = [("overall", r["oracle_before"], r["oracle_after"])] + [
        (d, v["before"], v["after"]) for d, v in r["per_dimension"].items()]
    lines = ["", f"== diffalign demo ({r['objective']}, {r['family']}): held-out prompts, oracle scores ==",
             f"{'dimension':12s} {'base':>7s} {'aligned':>8s} {'gain':>7s}"]
    lines += [f"{name:12s} {b:7.3f} {a:8.3f} {a - b:+7.3f}" for name, b, a in rows]
    if r.get("motion"):
        m = r["motion"]
        lines.append(f"{'motion':12s} {m['before']:7.3f} {m['after']:8.3f} {m['gain']:+7.3f}  (mean of "
                     f"{', '.join(m['dimensions'])}; paired p = {m['p_value']:.2g})")
    lines.append(f"win rate {r['win_rate']:.3f} over {r['samples_heldout']} paired samples (same prompt and seed), "
                 f"paired permutation p = {r['p_value']:.2g}")
    if r["unseen_combinations"]:
        u = r["unseen_combinations"]
        lines.append(f"{r['unseen_what']}: win rate {u['win_rate']:.3f}, gain {u['gain']:+.3f}, "
                     f"p = {u['p_value']:.2g} (n={u['n']})")
    rounds = r["rounds"]
    per_round = (f" in {len(rounds)} rounds (round r >= 2: new pairs from the previous round's model, which is "
                 f"also its DPO reference)" if len(rounds) > 1 else "")
    lines.append(f"pairs {r['pairs']['pairs']} from {r['prompts_train']} prompts, {r['steps']} DPO steps{per_round}, "
                 f"{r['seconds']:.0f}s")
    grid = (f"samples.png (frame strips: each base clip above its aligned clip)  {out}/samples.gif"
            if r["family"] == "video" else "samples.png (top: base, bottom: aligned)")
    lines.append(f"outputs  {out}/report.json  {out}/{grid}  {out}/reward_curve.png")
    lines.append(f"aligned  LoRA {r['outputs']['lora']} on the model {r['outputs']['lora_applies_to']}")
    print("\n".join(lines))
    return 0


def cmd_world(args) -> int:
    _quiet_libraries()
    if args.world_verb == "pretrain":
        from diffalign.world.pretrain import PretrainConfig, pretrain

        import dataclasses

        cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
        record = pretrain(cfg, args.out)
        print(f"\n== diffalign world pretrain ==\nsaved {args.out} ({record['family']}); final loss "
              f"{record['final_loss_mean_last_100']:.4f}; VAE mse {record['vae']['vae_mse']:.4f}; {record['seconds']:.0f}s")
        return 0
    from diffalign.config import ModelConfig
    from diffalign.models import load_pipeline
    from diffalign.world.demo import world_spec
    from diffalign.world.pairs import generator_family, make_pairs, world_kind

    import numpy as np

    pipe = load_pipeline(ModelConfig(family=generator_family(args.model), pretrained=args.model))
    train_scenes, _ = world_spec(world_kind(pipe)).splits()
    order = np.random.default_rng(args.seed).permutation(len(train_scenes))[:args.prompts]
    if args.world_verb == "labels":
        from diffalign.world.pairs import make_labelled

        stats = make_labelled(pipe, [train_scenes[i].caption() for i in order], args.out, k=args.k, seed=args.seed,
                              threshold=args.threshold)
        print(f"\n== diffalign world labels ==\n{stats['images']} images from {stats['prompts']} prompts x {args.k} "
              f"samples -> {args.out}\n{stats['desirable']} desirable (oracle >= {args.threshold:g}), "
              f"{stats['undesirable']} undesirable; mean oracle {stats['mean_overall']:.3f}")
        return 0
    stats = make_pairs(pipe, [train_scenes[i].caption() for i in order], args.out, k=args.k, seed=args.seed)
    print(f"\n== diffalign world pairs ==\n{stats['pairs']} pairs from {stats['prompts']} prompts x {args.k} samples -> "
          f"{args.out}\nmean oracle: all {stats['mean_overall']:.3f}, best {stats['mean_best']:.3f}, worst {stats['mean_worst']:.3f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 0
    from diffalign.config import ConfigError
    from diffalign.data.cache import CacheMismatchError
    from diffalign.data.preference import DataError
    from diffalign.models import ModelLoadError

    handlers = {"train": cmd_train, "cache": cmd_cache, "config": cmd_config, "recipes": cmd_recipes,
                "demo": cmd_demo, "world": cmd_world}
    from diffalign.rewards.base import RewardError

    if args.verb in PLUGGED_VERBS:
        handlers[args.verb] = _plugged(PLUGGED_VERBS[args.verb]).run
    try:
        return handlers[args.verb](args)
    except (ConfigError, DataError, CacheMismatchError, ModelLoadError, RewardError, FileNotFoundError) as e:
        print(f"diffalign {args.verb}: error: {e}", file=sys.stderr)
        return 2
