"""`diffalign train-reward CONFIG [key=value ...]`: train a multi-dimensional reward model with BTT.

The config is a dataclass tree like ``diffalign/config.py``'s (every field has help text; unknown keys
are errors naming the nearest key); recipes are YAML files with ``task: train-reward`` in configs/
(``world-reward``, ``world-latent-reward``, ``videoreward``), resolved by name like every recipe.
Heavy imports (torch, transformers, accelerate) happen inside ``run``.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from diffalign.config import (ConfigError, REWARD_TASK, _apply, _f, _field_types, _is_config, all_keys,  # noqa: F401
                              check_choices)

HELP = "train a multi-dimensional reward model (VideoReward-style, composite or noise-aware latent) with BTT"


@dataclass
class RewardModelConfig:
    kind: str = _f("frames", "frames (VideoReward-style CLIP frames + text, one head per dimension) | composite "
                   "(AnimeReward-style: one frames model per dimension, combined by weights) | latent (noise-aware "
                   "reward on noisy generator latents, for Flow-NRG guidance).")
    dimensions: list = _f(["VQ", "MQ", "TA"], "Named dimensions, one head each; labels are read per dimension.")
    weights: dict = _f({}, "Per-dimension weights of `overall` (VideoReward: all 1); empty = all 1.")
    pretrained: str = _f("world", "frames/composite: a CLIP hub id or local folder (vision + text towers and tokenizer), "
                         "'world:clip' (the bundled world CLIP) or 'world' (tiny random towers built offline with the "
                         "world's word-level tokenizer). latent: the "
                         "generator (folder, hub id, world:flow, world:unet) whose VAE encodes the pairs and whose "
                         "family adapter noises them.")
    family: str = _f("sd3", "latent only: the generator's family adapter (sd15 | sdxl | sd3 | flux).")
    text_pretrained: str = _f("", "Text tower (fine-tuned jointly): 'world' (tiny, random init), a CLIP hub id/folder, or "
                              "a generator (folder or world:flow / world:unet: its text_encoder/ and tokenizer/). "
                              "Empty = the image side's CLIP (model.pretrained; latent: model.latent_clip with the decoder backbone, "
                              "else 'world').")
    image_size: int = _f(224, "world towers: pixels per side fed to the vision tower (a pretrained CLIP uses its own).")
    patch_size: int = _f(16, "world towers: ViT patch size.")
    hidden_size: int = _f(64, "world towers: width of the vision and text transformers.")
    vision_layers: int = _f(3, "world towers: vision transformer layers.")
    vision_stem: str = _f("conv", "world towers: conv (3x3 conv stem, trains fast from scratch) | patch (plain ViT "
                          "patchify); a pretrained CLIP keeps its own.")
    text_layers: int = _f(2, "world towers / latent text tower 'world': text transformer layers.")
    num_heads: int = _f(4, "world towers: attention heads.")
    max_text_length: int = _f(77, "Prompt tokens (truncated/padded to this length).")
    fusion_dim: int = _f(128, "Width of the fusion: per-dimension query tokens cross-attending to image and prompt tokens.")
    fusion_layers: int = _f(2, "Cross-attention layers of the query fusion.")
    head_hidden: int = _f(128, "Hidden width of each dimension's MLP head.")
    temporal: str = _f("attention", "Frame pooling: attention (a transformer layer over frames with timestamp "
                       "embeddings, then mean) | mean.")
    sample_fps: float = _f(2.0, "Videos are sampled at this many frames per SECOND of their real time (VideoReward: 2).")
    max_frames: int = _f(16, "At most this many frames per video; longer clips get this many spread over the clip.")
    freeze_vision: bool = _f(False, "Keep the vision tower frozen (only fusion, temporal and heads train).")
    freeze_text: bool = _f(False, "Keep the text tower frozen.")
    members: list = _f([], "composite (and latent with the decoder backbone, whose decoded pixels a composite then reads, "
                        "every member given the noise-level embedding): groups of dimensions, one member model each, "
                        "e.g. [[color, background, layout], [shape]]; every dimension in exactly one group. Empty = one "
                        "member per dimension (composite) / one frames model (latent).")
    member_backbones: dict = _f({}, "composite / latent with model.members: backbone of a member, keyed by any one of its dimensions: frames (a "
                                "frames model on the model.* towers) | object (the object-crop pixel model: learned "
                                "foreground mask, a crop resampled at the object's centroid and size, a small conv net "
                                "on it; text tower from model.text_pretrained / model.pretrained) | track (the object-track model for "
                                "clips: the same learned mask reduced per frame to centroid, area, contrast and colour, "
                                "with their first and second differences and timestamps read by a small transformer "
                                "over frames). Unlisted: frames.")
    object_width: int = _f(32, "object members: channels of the conv net on the canonical crop.")
    object_crop: int = _f(16, "object members: crop side in samples (a multiple of 4).")
    object_extent: float = _f(2.0, "object members: the crop spans +- this many area-equivalent radii of the object.")
    track_width: int = _f(64, "track members: width of the per-frame track embedding and its transformer.")
    track_layers: int = _f(2, "track members: transformer layers over the frames.")
    track_magnitudes: bool = _f(False, "track members: also feed the lengths of the centroid's per-frame displacement "
                                "and of its change (direction-free speed and jerk).")
    latent_backbone: str = _f("conv", "latent: conv (a small FiLM conv trunk over x_t, trained from scratch; cheap on "
                              "large latents) | decoder (the generator's frozen VAE decoder, then a pretrained CLIP "
                              "frame model, model.latent_clip, with a noise-level embedding).")
    latent_clip: str = _f("world:clip", "latent with backbone decoder: the CLIP (hub id, folder, world:clip) reading "
                          "the decoded latents.")
    latent_width: int = _f(64, "latent: base width of the conv trunk.")
    latent_levels: int = _f(3, "latent: resolution levels of the conv trunk (each but the last halves h, w).")
    timestep_sampling: str = _f("uniform", "latent: training noise levels, uniform | logit_normal (flow families; eps "
                                "families draw integer timesteps uniformly).")


@dataclass
class RewardDataConfig:
    path: str | list = _f("", "Training pairs: a VideoAlign .csv, a world-pairs .parquet, world:renders?..., "
                          "world:samples?... (rewards/data.py), or a list of them.")
    val_path: str | list = _f("", "Validation pairs (same forms); empty = hold out data.val_fraction of data.path. "
                              "Accuracy is reported and the normaliser fitted on it.")
    val_fraction: float = _f(0.1, "Fraction of data.path held out for validation when data.val_path is empty.")
    root: str = _f("", "Folder that relative paths in a CSV resolve against (default: the CSV's folder).")
    tie_margin: float = _f(0.1, "World pairs: a dimension is a tie when |score_A - score_B| <= this (oracle units, 0-1).")
    max_pairs: int | None = _f(None, "Use only the first N training pairs.")
    num_workers: int = _f(0, "DataLoader worker processes (video decoding).")


@dataclass
class RewardObjectiveConfig:
    name: str = _f("btt", "Loss: btt (Bradley-Terry with ties, Rao-Kupper) per dimension, masked labels dropped.")
    theta: float = _f(5.0, "Rao-Kupper tie parameter theta > 1 (VideoReward: 5).")


@dataclass
class RewardOptimConfig:
    lr: float = _f(1e-4, "Learning rate of the backbone towers (VideoReward fine-tunes its VLM at 2e-6).")
    head_lr: float | None = _f(None, "Learning rate of the new parts (projections, temporal layer, heads, latent trunk); "
                               "null = optim.lr.")
    member_lr: dict = _f({}, "composite / latent with model.members: learning rate of every parameter of a member, keyed by one of its dimensions "
                         "(e.g. {shape: 1e-3}); other members use optim.lr / optim.head_lr.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    betas: list = _f([0.9, 0.999], "Adam betas.")
    eps: float = _f(1e-8, "Adam epsilon.")
    lr_scheduler: str = _f("constant_with_warmup", "diffusers scheduler name: constant | constant_with_warmup | linear | cosine.")
    warmup_ratio: float = _f(0.05, "Warmup as a fraction of train.max_steps (VideoReward: 0.05).")
    max_grad_norm: float | None = _f(1.0, "Gradient clipping norm; null disables clipping.")


@dataclass
class RewardTrainConfig:
    output_dir: str = _f("runs/{name}", "The reward folder (reward_config.json, model.safetensors, tokenizer/, "
                         "normalizer.json) plus metrics.jsonl, eval.json, summary.json; {name} = run name.")
    max_steps: int = _f(1000, "Optimizer steps.")
    batch_size: int = _f(32, "Pairs per process per step.")
    mixed_precision: str = _f("no", "no | fp16 | bf16 (accelerate autocast; weights stay float32).")
    seed: int = _f(0, "Seed for initialisation, data order, validation split and noise.")
    eval_every: int = _f(0, "Validate every N steps (0 = only at the end).")
    log_every: int = _f(10, "Write metrics.jsonl and the progress-bar postfix every N steps.")
    eval_batch_size: int = _f(256, "Pairs per forward during validation.")
    eval_times: list = _f([0.0, 0.25, 0.5, 0.75, 0.9], "latent: noise levels validated, in FLOW unit time; eps "
                          "families use the DDPM timestep of equal signal-to-noise ratio (t = 0.5 <-> alpha_bar = 0.5).")


@dataclass
class RewardRunConfig:
    name: str = _f("reward", "Run name (used in output_dir).")
    task: str = _f(REWARD_TASK, "The command that runs this recipe (always train-reward here).")
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    objective: RewardObjectiveConfig = field(default_factory=RewardObjectiveConfig)
    optim: RewardOptimConfig = field(default_factory=RewardOptimConfig)
    train: RewardTrainConfig = field(default_factory=RewardTrainConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir.format(name=self.name))


CHOICES: dict[str, tuple[str, ...]] = {
    "task": (REWARD_TASK,),
    "model.kind": ("frames", "composite", "latent"),
    "model.family": ("sd15", "sdxl", "sd3", "flux"),
    "model.temporal": ("attention", "mean"),
    "model.vision_stem": ("conv", "patch"),
    "model.latent_backbone": ("conv", "decoder"),
    "model.timestep_sampling": ("uniform", "logit_normal"),
    "objective.name": ("btt",),
    "train.mixed_precision": ("no", "fp16", "bf16"),
}


def _validate(cfg: RewardRunConfig) -> None:
    check_choices(cfg, CHOICES)
    m = cfg.model
    if not m.dimensions or not all(isinstance(d, str) and d for d in m.dimensions):
        raise ConfigError(f"model.dimensions must be a non-empty list of names, got {m.dimensions!r}")
    if len(set(m.dimensions)) != len(m.dimensions):
        raise ConfigError(f"model.dimensions has duplicates: {m.dimensions}")
    unknown = sorted(set(m.weights) - set(m.dimensions))
    if unknown:
        raise ConfigError(f"model.weights names {unknown}, not in model.dimensions {m.dimensions}")
    _validate_members(m)
    if cfg.optim.member_lr:
        if not has_members(m):
            raise ConfigError(f"optim.member_lr is for model.kind=composite (or latent with the decoder backbone "
                              f"and model.members), not {m.kind!r}")
        bad = sorted(set(cfg.optim.member_lr) - set(m.dimensions))
        if bad:
            raise ConfigError(f"optim.member_lr names {bad}, not in model.dimensions {m.dimensions}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in cfg.optim.member_lr.values()):
            raise ConfigError(f"optim.member_lr values must be positive numbers, got {cfg.optim.member_lr}")
    if cfg.objective.theta <= 1.0:
        raise ConfigError(f"objective.theta must be > 1 (Rao-Kupper ties need theta^2 - 1 > 0), got {cfg.objective.theta}")
    if cfg.data.tie_margin < 0:
        raise ConfigError(f"data.tie_margin must be >= 0, got {cfg.data.tie_margin}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must lie in (0, 1), got {cfg.data.val_fraction}")
    if not 0.0 <= cfg.optim.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio must lie in [0, 1), got {cfg.optim.warmup_ratio}")
    t = cfg.train
    if t.max_steps < 1 or t.batch_size < 1 or t.eval_batch_size < 1 or t.log_every < 1 or t.eval_every < 0:
        raise ConfigError("train.max_steps, batch_size, eval_batch_size, log_every must be >= 1 and eval_every >= 0")
    if m.sample_fps <= 0 or m.max_frames < 1:
        raise ConfigError("model.sample_fps must be > 0 and model.max_frames >= 1")
    if not all(isinstance(x, (int, float)) and 0.0 <= x < 1.0 for x in t.eval_times):
        raise ConfigError(f"train.eval_times must be noise levels in [0, 1), got {t.eval_times}")


MEMBER_BACKBONES = ("frames", "object", "track")


def _validate_members(m: RewardModelConfig) -> None:
    if (m.members or m.member_backbones) and not has_members(m):
        raise ConfigError("model.members / model.member_backbones are for model.kind=composite or model.kind=latent "
                          f"with model.latent_backbone=decoder (and model.members set), not {m.kind!r}")
    groups = composite_groups(m)
    flat = [d for g in groups for d in g]
    if sorted(flat) != sorted(m.dimensions) or len(set(flat)) != len(flat):
        raise ConfigError(f"model.members {m.members!r} must put every dimension of {m.dimensions} in exactly one group")
    for key, backbone in m.member_backbones.items():
        if key not in m.dimensions:
            raise ConfigError(f"model.member_backbones names {key!r}, not in model.dimensions {m.dimensions}")
        if backbone not in MEMBER_BACKBONES:
            raise ConfigError(f"model.member_backbones.{key}={backbone!r} is not one of {', '.join(MEMBER_BACKBONES)}")
    for g in groups:
        if len({m.member_backbones[d] for d in g if d in m.member_backbones}) > 1:
            raise ConfigError(f"model.member_backbones gives the member {g} two backbones")
    if m.object_width < 1 or m.object_crop < 4 or m.object_crop % 4 or m.object_extent <= 0:
        raise ConfigError("model.object_width must be >= 1, model.object_crop a positive multiple of 4 and "
                          "model.object_extent > 0")
    if m.track_width < 4 or m.track_width % 4 or m.track_layers < 1:
        raise ConfigError("model.track_width must be a positive multiple of 4 (4 attention heads) and "
                          "model.track_layers >= 1")


def has_members(m: RewardModelConfig) -> bool:
    """Whether the model is built of members: a composite, or a decoder-backbone latent model whose body is one
    (model.members given)."""
    return m.kind == "composite" or (m.kind == "latent" and m.latent_backbone == "decoder" and bool(m.members))


def composite_groups(m: RewardModelConfig) -> list[list[str]]:
    """The composite's members as dimension groups (model.members, else one group per dimension)."""
    if not m.members:
        return [[d] for d in m.dimensions]
    if not all(isinstance(g, (list, tuple)) and g for g in m.members):
        raise ConfigError(f"model.members must be a list of non-empty dimension lists, got {m.members!r}")
    return [list(g) for g in m.members]


def load_reward_config(name_or_path: str | None = None, overrides: Sequence[str] = ()) -> RewardRunConfig:
    """A RewardRunConfig from a recipe (file or shipped name, ``task: train-reward``) plus dotted overrides."""
    import yaml

    from diffalign.config import parse_overrides, resolve_recipe

    cfg = RewardRunConfig()
    if name_or_path:
        path = resolve_recipe(name_or_path)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        if data.get("task") != REWARD_TASK:
            raise ConfigError(f"{path}: not a reward-model recipe (no 'task: {REWARD_TASK}'); training recipes run "
                              f"with `diffalign train {name_or_path}`")
        if "name" not in data:
            cfg.name = path.stem
        _apply(cfg, data, "", str(path), RewardRunConfig)
    if overrides:
        _apply(cfg, parse_overrides(overrides), "", "command line", RewardRunConfig)
    _validate(cfg)
    return cfg


# ------------------------------------------------------------------------------------------ CLI

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="a YAML recipe path or a shipped reward recipe (world-reward, "
                        "world-latent-reward, videoreward)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=500")
    parser.add_argument("--keys", action="store_true", help="list every config key with its help text and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fmt(x: float) -> str:
    return "  -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def summary_lines(result: dict) -> list[str]:
    """The human summary printed at the end of a run (also used by tests)."""
    cfg = result["config"]
    dims = cfg["model"]["dimensions"]
    lines = ["", "== diffalign train-reward: summary ==",
             f"run          {cfg['name']} ({cfg['model']['kind']}, dimensions {', '.join(dims)}, {result['steps']} steps, "
             f"{result['seconds']:.1f}s, {result['processes']} process(es) on {result['device']})",
             f"train data   {result['data']['train']['pairs']} pairs from {result['data']['train']['source']}",
             f"val data     {result['data']['val']['pairs']} pairs from {result['data']['val']['source']}"]
    ev = result["eval"]
    if list(ev) == ["clean"]:
        e = ev["clean"]
        lines.append(f"validation   BTT loss {e['loss']:.4f}; pairwise accuracy per dimension, without ties and with ties "
                     "(tie-calibrated)")
        lines.append(f"    {'dimension':12s} {'w/o ties':>9s} {'w/ ties':>8s} {'labelled':>9s} {'ties':>6s}")
        for d in dims:
            lines.append(f"    {d:12s} {_fmt(e['acc/' + d]):>9s} {_fmt(e['acc_ties/' + d]):>8s} "
                         f"{int(e['n/' + d]):9d} {int(e['n_ties/' + d]):6d}")
        for group, g in e.get("groups", {}).items():
            lines.append(f"    {group}: w/o ties " + ", ".join(f"{d} {_fmt(g['acc/' + d])}" for d in dims))
    else:  # the latent model at several noise levels
        levels = list(ev)
        lines.append("validation   pairwise accuracy WITHOUT ties per dimension and noise level (flow unit time; "
                     "eps families at the DDPM step of equal SNR)")
        lines.append("    " + f"{'dimension':12s}" + "".join(f"{lv:>9s}" for lv in levels))
        for d in dims:
            lines.append("    " + f"{d:12s}" + "".join(f"{_fmt(ev[lv]['acc/' + d]):>9s}" for lv in levels))
        lines.append("    " + f"{'w/ ties, mean':12s}" + "".join(f"{_fmt(ev[lv]['acc_ties']):>9s}" for lv in levels))
        lines.append("    " + f"{'BTT loss':12s}" + "".join(f"{_fmt(ev[lv]['loss']):>9s}" for lv in levels))
        for group in ev[levels[0]].get("groups", {}):
            lines.append(f"    {group} (w/o ties, " + ", ".join(dims) + "): " + "; ".join(
                f"{lv} " + "/".join(_fmt(ev[lv]['groups'][group]['acc/' + d]) for d in dims) for lv in levels))
    lines.append(f"model        {result['output_dir']}   (load: diffalign.rewards.build_reward('{result['output_dir']}'))")
    lines.append(f"logs         {result['output_dir']}/metrics.jsonl, eval.json, summary.json")
    return lines


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    if args.keys:
        for k, h in all_keys(RewardRunConfig).items():
            print(f"{k:28s} {h}")
        return 0
    if not args.config:
        raise ConfigError("diffalign train-reward needs a recipe: world-reward, world-reward-composite, "
                          "world-latent-reward, videoreward or a YAML file (diffalign train-reward --keys lists every key)")
    cfg = load_reward_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
        return 0
    from diffalign.cli import _quiet_libraries

    _quiet_libraries()
    from diffalign.rewards.training import train_reward

    result = train_reward(cfg, show_progress=not args.no_progress)
    if result.get("main_process", True):
        print("\n".join(summary_lines(result)))
        sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m diffalign.rewards.train_cli ...` (the same as `diffalign train-reward ...`)."""
    parser = argparse.ArgumentParser(prog="diffalign train-reward", description=HELP)
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
