"""`diffalign sample`: guided sampling from the command line (the options are SampleConfig's fields)."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "sample a model with CFG, RLG (LoRA/base mix) and reward guidance (Flow-NRG); PNG/MP4 + grid + JSON sidecar"

EPILOG = """guidance composes in a fixed order: CFG per network -> RLG across base/aligned -> reward guidance.
examples:
  diffalign sample --model world:unet --prompt "a small red circle at the top left on a black background" --out samples/
  diffalign sample --model runs/base --lora runs/dpo/lora --rlg 1.5 --prompts prompts.txt --num-per-prompt 4 --out out/
  diffalign sample --model my-sd3 --nrg-reward runs/latent-reward --nrg VQ=1,MQ=0.5,TA=1 --prompt "a cat" --out out/
  diffalign sample --from-sidecar out/samples.json --out again/      # redraw a previous run exactly
"""


def _weights(text: str) -> dict[str, float]:
    """'VQ=1,MQ=0.5' -> {'VQ': 1.0, 'MQ': 0.5}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected DIM=WEIGHT (e.g. VQ=1,MQ=0.5)") from None
    if not out:
        raise argparse.ArgumentTypeError("no DIM=WEIGHT pairs")
    return out


def configure(p: argparse.ArgumentParser) -> None:
    from diffalign.samplers.api import SampleConfig

    h = SampleConfig.help
    p.epilog = EPILOG
    src = p.add_argument_group("what to sample")
    src.add_argument("--model", help=h("model"))
    src.add_argument("--family", choices=("sd15", "sdxl", "sd3", "flux", "wan"), help=h("family"))
    prompts = src.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    prompts.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line (blank lines skipped)")
    prompts.add_argument("--from-sidecar", metavar="JSON", help="re-run the settings and seeds of a samples.json "
                         "(other options given here override it)")
    src.add_argument("--negative-prompt", help=h("negative_prompt"))
    src.add_argument("--out", help=h("out") + " Required.")

    g = p.add_argument_group("guidance (order: CFG -> RLG -> reward)")
    g.add_argument("--guidance-scale", type=float, help=h("guidance_scale"))
    g.add_argument("--guidance-rescale", type=float, help=h("guidance_rescale"))
    g.add_argument("--lora", help=h("lora"))
    g.add_argument("--base-model", help=h("base_model"))
    g.add_argument("--rlg", type=float, metavar="W", help=h("rlg"))
    g.add_argument("--rlg-end", type=float, metavar="W", help=h("rlg_end"))
    g.add_argument("--nrg-reward", metavar="PATH", help=h("nrg_reward"))
    g.add_argument("--nrg", type=_weights, metavar="DIM=W,...", help=h("nrg_weights"))
    g.add_argument("--nrg-scale", type=float, help=h("nrg_scale"))
    g.add_argument("--clean-reward", metavar="SPEC", help=h("clean_reward"))
    g.add_argument("--clean", type=_weights, metavar="DIM=W,...", help=h("clean_weights"))
    g.add_argument("--clean-scale", type=float, help=h("clean_scale"))
    g.add_argument("--t-max", type=float, help=h("t_max"))

    s = p.add_argument_group("sampler")
    s.add_argument("--seed", type=int, help=h("seed"))
    s.add_argument("--num-per-prompt", type=int, help=h("num_per_prompt"))
    s.add_argument("--steps", type=int, help=h("steps"))
    s.add_argument("--scheduler", help=h("scheduler"))
    s.add_argument("--eta", type=float, help=h("eta"))
    s.add_argument("--sde-noise", type=float, help=h("sde_noise"))
    s.add_argument("--flow-shift", type=float, help=h("flow_shift"))
    s.add_argument("--height", type=int, help=h("height"))
    s.add_argument("--width", type=int, help=h("width"))
    s.add_argument("--num-frames", type=int, help=h("num_frames"))
    s.add_argument("--fps", type=float, help=h("fps"))
    s.add_argument("--video-format", choices=("mp4", "gif"), help=h("video_format"))
    s.add_argument("--batch-size", type=int, help=h("batch_size"))
    s.add_argument("--device", help=h("device"))
    s.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help=h("dtype"))
    s.add_argument("--max-sequence-length", type=int, help=h("max_sequence_length"))
    s.add_argument("--distilled-guidance", type=float, help=h("distilled_guidance"))
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


# CLI option -> SampleConfig field, for options whose names differ
_RENAMED = {"nrg": "nrg_weights", "clean": "clean_weights"}
_NOT_CONFIG = {"verb", "prompt", "prompts", "from_sidecar", "no_progress"}


def build_config(args: argparse.Namespace):
    """SampleConfig from parsed args: defaults (or the sidecar's settings), then every option given."""
    from diffalign.config import ConfigError
    from diffalign.samplers.api import SampleConfig

    base = SampleConfig.from_sidecar(args.from_sidecar) if args.from_sidecar else SampleConfig()
    changes = {}
    for key, value in vars(args).items():
        if key in _NOT_CONFIG or value is None:
            continue
        changes[_RENAMED.get(key, key)] = value
    if args.prompt:
        changes["prompts"] = list(args.prompt)
    elif args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {args.prompts}: no such file (one prompt per line)")
        changes["prompts"] = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not changes["prompts"]:
            raise ConfigError(f"--prompts {args.prompts}: the file holds no prompts")
    if args.no_progress:
        changes["progress"] = False
    if args.from_sidecar and ("prompts" in changes or "num_per_prompt" in changes) and "seeds" not in changes:
        changes["seeds"] = None  # the recorded per-sample seeds belong to the recorded prompts
    import dataclasses

    cfg = dataclasses.replace(base, **changes)
    if not cfg.model:
        raise ConfigError("--model is required (a diffusers folder, hub id, tiny:<family> or world:unet/world:flow)")
    if not cfg.prompts:
        raise ConfigError("give --prompt TEXT (repeatable), --prompts FILE or --from-sidecar JSON")
    if not cfg.out:
        raise ConfigError("--out DIR is required (where the samples, grid.png and samples.json go)")
    return cfg


def run(args: argparse.Namespace) -> int:
    from diffalign.cli import _quiet_libraries

    cfg = build_config(args)
    _quiet_libraries()
    from diffalign.samplers.api import SIDECAR_NAME, Sampler

    sampler = Sampler(cfg)
    c = sampler.config
    print(f"[diffalign] sampling {c.model} ({c.family}, {sampler.adapter.prediction_type}) on {sampler.device}: "
          f"{sampler.guidance.describe()}")
    result = sampler.sample()
    n = len(result.images)
    kind = "videos" if result.images.ndim == 5 else "images"
    what = [f"{c.model} ({c.family})"] + ([f"LoRA {c.lora}"] if c.lora else []) + (
        [f"base {c.base_model}"] if c.base_model else [])
    shown = ", ".join(str(f) for f in result.files[:2]) + (f", ... ({n} files)" if n > 2 else "")
    lines = [
        "", "== diffalign sample: summary ==",
        f"model      {'; '.join(what)}",
        f"guidance   {result.guidance}",
        f"sampler    {c.scheduler}, {c.steps} steps, {c.height}x{c.width}"
        + (f"x{c.num_frames} frames" if c.num_frames else "") + f", batch {c.batch_size}, {sampler.device} {c.dtype}",
        f"samples    {n} {kind} ({len(c.prompts)} prompt(s) x {c.num_per_prompt}), seeds {result.seeds[0]}.."
        f"{result.seeds[-1]}, {result.seconds:.1f}s ({result.seconds / max(n, 1):.2f}s per sample)",
        f"outputs    {shown}",
        f"grid       {result.grid}",
        f"settings   {result.sidecar} (every setting and seed)",
        f"reproduce  diffalign sample --from-sidecar {Path(c.out) / SIDECAR_NAME} --out OTHER_DIR",
    ]
    print("\n".join(lines))
    return 0
