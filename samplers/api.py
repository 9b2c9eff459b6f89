"""The Python API of `diffalign sample`: one SampleConfig drives the CLI, the sidecar and scripts.

    from diffalign.samplers import SampleConfig, Sampler, sample

    result = sample(model="runs/dpo/model-folder-or-hub-id", lora="runs/dpo/lora", rlg=1.5,
                    prompts=["a red circle"], num_per_prompt=4, steps=30, out="samples/")
    result.images      # uint8 [N, H, W, 3] (video: [N, F, H, W, 3]); result.seeds, result.prompts, result.files

    sampler = Sampler(SampleConfig(model="tiny:sd3", prompts=["x"]))   # load once, sample many times
    a = sampler.sample(); b = sampler.sample(prompts=["y"], seeds=[7])

Reproducibility: the sidecar (samples.json) stores the RESOLVED SampleConfig (defaults filled in) and every
seed; ``SampleConfig.from_sidecar(path)`` + ``sample(...)`` (or ``diffalign sample --from-sidecar``) redraws the
same images on the same software stack.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffalign.samplers.guidance import CFG, RLG, CleanRewardGuidance, GuidanceStack, NoisyRewardGuidance
from diffalign.samplers.loop import Network, build_stepper, denoise, initial_noise, make_generators

SIDECAR_NAME = "samples.json"
SIDECAR_FORMAT = "diffalign-samples/1"


def _f(default: Any, help: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class SampleConfig:
    """Every setting of a sampling run (also the sidecar's "config"); None means "the model's default"."""

    model: str = _f("", "Diffusers pipeline folder, hub id, 'tiny:<family>' or 'world:unet' / 'world:flow' / 'world:video'.")
    prompts: list = _f([], "Prompts; each is sampled num_per_prompt times.")
    out: str | None = _f(None, "Output folder (PNG/MP4 per sample, grid.png, samples.json); None = return only.")
    family: str | None = _f(None, "sd15 | sdxl | sd3 | flux | wan; None = read from model_index.json / the spec.")
    lora: str | None = _f(None, "LoRA folder or .safetensors written by `diffalign train` (diffusers format).")
    base_model: str | None = _f(None, "RLG with two models: the base pipeline folder (aligned = --model); "
                                      "it must share the text encoders and VAE.")
    rlg: float | None = _f(None, "RLG scale w: base_cfg + w (aligned_cfg - base_cfg); 0 = base, 1 = aligned, "
                                 ">1 extrapolates. Needs lora (base = adapters off) or base_model.")
    rlg_end: float | None = _f(None, "RLG schedule: w ramps linearly from rlg (first step) to rlg_end (last step).")
    nrg_reward: str | None = _f(None, "Noise-aware LATENT reward for Flow-NRG: a train-reward folder or reward spec.")
    nrg_weights: dict | None = _f(None, "Per-dimension NRG weights {dim: w}; None = every dimension at 1.")
    nrg_scale: float = _f(1.0, "NRG scale: pred - scale * t/(1-t) * grad r (flow); negative lowers the reward.")
    clean_reward: str | None = _f(None, "Image/video reward for clean-reward guidance through the x0 estimate "
                                        "(differentiable; weaker than NRG).")
    clean_weights: dict | None = _f(None, "Per-dimension weights of the clean reward; None = every dimension at 1.")
    clean_scale: float = _f(1.0, "Clean-reward guidance scale.")
    t_max: float = _f(0.95, "Reward-guidance clamp: t/(1-t) (sigma/alpha) is capped at t_max/(1-t_max).")
    negative_prompt: str | None = _f(None, "Negative prompt for the CFG unconditional branch (None = the "
                                           "pipeline's default: empty prompt; zeros for SDXL).")
    seed: int = _f(0, "Base seed: sample k (prompt-major order) uses seed + k.")
    seeds: list | None = _f(None, "Explicit per-sample seeds (overrides seed); length = prompts x num_per_prompt.")
    num_per_prompt: int = _f(1, "Samples per prompt.")
    steps: int = _f(30, "Sampling steps.")
    guidance_scale: float | None = _f(None, "CFG scale (1 = off, one forward); None = the pipeline's default "
                                            "(SD1.5 7.5, SDXL 5, SD3 7, FLUX 1: FLUX uses its guidance embedding).")
    guidance_rescale: float = _f(0.0, "CFG rescale in [0, 1] (diffusers' guidance_rescale).")
    scheduler: str = _f("auto", "eps/v: ddim (auto) | ddpm | euler | euler_a | dpm++ | pndm | unipc | pipeline; "
                                "flow: euler (auto) | euler_sde.")
    eta: float = _f(0.0, "DDIM eta (0 = deterministic DDIM).")
    sde_noise: float = _f(0.0, "Flow SDE noise level a (g^2 = a^2 t/(1-t)); > 0 selects euler_sde.")
    flow_shift: float | None = _f(None, "Flow time shift; None = the scheduler config's.")
    height: int | None = _f(None, "Height in pixels; None = the pipeline's default.")
    width: int | None = _f(None, "Width in pixels; None = the pipeline's default.")
    num_frames: int | None = _f(None, "Video families: frames per sample; None for world:video = the 9 it was trained with.")
    fps: float | None = _f(None, "Video frame rate written to MP4/GIF (and given to video rewards); None = 16 (Wan 2.1's), world:video 10.")
    video_format: str = _f("mp4", "Video file format: mp4 | gif.")
    batch_size: int = _f(4, "Samples per batch (results do not depend on it beyond float rounding).")
    device: str = _f("auto", "auto (cuda if available) | cpu | cuda[:i].")
    dtype: str = _f("auto", "Weights dtype: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16.")
    max_sequence_length: int | None = _f(None, "T5 tokens for SD3/FLUX/Wan prompts; None = family default (world:flow: 1).")
    distilled_guidance: float | None = _f(None, "FLUX guidance-embedding value; None = 3.5.")
    progress: bool = _f(True, "Show a progress bar.")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SampleConfig":
        from diffalign.config import ConfigError

        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown sampling setting(s) {unknown}; valid: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_sidecar(cls, path: str | Path) -> "SampleConfig":
        """The resolved config a previous run recorded in its samples.json (a folder holding one also works)."""
        from diffalign.config import ConfigError

        path = Path(path)
        if path.is_dir():
            path = path / SIDECAR_NAME
        if not path.is_file():
            raise FileNotFoundError(f"sidecar {path}: no such file (a samples.json written by diffalign sample)")
        data = json.loads(path.read_text())
        if data.get("format") != SIDECAR_FORMAT or "config" not in data:
            raise ConfigError(f"{path} is not a diffalign sample sidecar (format {SIDECAR_FORMAT})")
        return cls.from_dict(data["config"])

    @staticmethod
    def help(name: str) -> str:
        return next(f.metadata["help"] for f in dataclasses.fields(SampleConfig) if f.name == name)


@dataclass
class SampleResult:
    """Samples in prompt-major order: index k = prompt k // num_per_prompt, copy k % num_per_prompt."""

    images: np.ndarray                    # uint8 [N, H, W, 3] or [N, F, H, W, 3]
    latents: torch.Tensor                 # float32 [N, ...] on the CPU, as sampled (before decoding)
    prompts: list[str]
    seeds: list[int]
    config: SampleConfig                  # resolved
    guidance: str                         # the composed terms, e.g. "CFG(scale=7.5) -> RLG(w=1.5)"
    seconds: float
    files: list[Path] = field(default_factory=list)
    grid: Path | None = None
    sidecar: Path | None = None


# ----------------------------------------------------------------------------------------------- loading
def infer_family(model: str) -> str:
    """The adapter family of a model spec: 'tiny:<family>', 'world:unet|flow|video', or a folder's model_index.json."""
    from diffalign.models import ADAPTERS, ModelLoadError

    by_pipeline = {cls.pipeline_class_name: fam for fam, cls in ADAPTERS.items()}
    if model.startswith("tiny:"):
        return model.split(":", 1)[1].partition("-")[0]
    if model.startswith("world:"):
        from diffalign.world.pretrain import KIND_FAMILY

        kind = model.split(":", 1)[1]
        if kind not in KIND_FAMILY:
            raise ModelLoadError(f"unknown world generator {model!r}: world:unet, world:flow or world:video")
        return KIND_FAMILY[kind]
    path = Path(model).expanduser()
    index = path / "model_index.json"
    if not index.is_file():
        # hub ids are "name" or "org/name"; anything else that does not exist is a mistyped local path
        if path.exists() or model.startswith((".", "/", "~")) or model.strip("/").count("/") >= 2:
            what = "no model_index.json in that folder" if path.exists() else "no such folder"
            raise ModelLoadError(f"--model {model}: {what}. Give a diffusers pipeline folder (pipe.save_pretrained), "
                                 "a hub id, tiny:<family> or world:unet / world:flow / world:video.")
        try:  # a hub id: its model_index.json from the local cache (or the hub when online)
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(model, "model_index.json"))
        except Exception as e:  # offline and not cached, gated, ...: the user can say which family it is
            raise ModelLoadError(f"--model {model}: no local folder of that name, and as a hub id its model_index.json "
                                 f"could not be read ({type(e).__name__}; offline?). Give a local diffusers folder, or "
                                 f"--family ({' | '.join(ADAPTERS)}) for a hub id in the local cache") from None
    class_name = json.loads(index.read_text()).get("_class_name", "")
    if class_name not in by_pipeline:
        raise ModelLoadError(f"--model {model}: pipeline class {class_name!r} is not supported "
                             f"({', '.join(by_pipeline)}); pass --family to force one")
    return by_pipeline[class_name]


def _unmixed_lora(weights: Path) -> dict | None:
    """The file's state dict with every layer in peft format when it MIXES ``lora_A``/``lora_B`` keys with old
    ``lora.down``/``lora.up`` ones (LoRAs written by diffalign before the save fix; diffusers drops the old-style
    layers of a mixed dict without a word); None when the file is not mixed."""
    from safetensors.torch import load_file

    state = load_file(str(weights))
    keys = list(state)
    if not (any(".lora_A." in k for k in keys) and any(".lora.down." in k for k in keys)):
        return None
    return {k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v for k, v in state.items()}


def load_lora(adapter, path: str, adapter_name: str = "aligned") -> None:
    """Load a diffusers-format LoRA (``diffalign train`` output) into ``adapter``'s denoiser, as peft adapter
    ``adapter_name``; raises FileNotFoundError / ModelLoadError with the fix."""
    from diffalign.models import ModelLoadError

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--lora {path}: no such file or folder (give the folder `diffalign train` wrote, "
                                f"e.g. runs/NAME/lora, or its pytorch_lora_weights.safetensors)")
    if p.is_file():
        directory, kwargs = p.parent, {"weight_name": p.name}
    else:
        directory, kwargs = p, {}
        if not any(p.glob("*.safetensors")):
            raise ModelLoadError(f"--lora {path}: no .safetensors LoRA weights in that folder")
    source: str | dict = str(directory)
    weights = directory / kwargs.get("weight_name", "pytorch_lora_weights.safetensors")
    if weights.is_file():
        source = _unmixed_lora(weights) or source
        if isinstance(source, dict):
            kwargs = {}
    try:
        adapter.pipe.load_lora_weights(source, adapter_name=adapter_name, **kwargs)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise ModelLoadError(f"--lora {path}: could not load it into the {adapter.family} model: {e}") from e
    if adapter_name not in (getattr(adapter.denoiser, "peft_config", None) or {}):
        raise ModelLoadError(f"--lora {path}: it holds no weights for this {adapter.family} model's "
                             f"{adapter.denoiser_attr} (a LoRA of another model family?)")
    adapter.denoiser.requires_grad_(False)
    adapter.loaded_lora = str(path)  # so a Sampler handed this adapter does not load the same LoRA twice


def load_base_denoiser(adapter, spec: str, dtype: torch.dtype) -> nn.Module:
    """The RLG base network from another pipeline folder of the same family: only its denoiser is loaded (the
    aligned model's text encoders and VAE serve both), frozen, on the adapter's device."""
    import warnings

    from diffalign.models import ModelLoadError, resolve_pretrained

    source = resolve_pretrained(spec)
    folder = Path(source).expanduser()
    if folder.exists() and not (folder / adapter.denoiser_attr).is_dir():
        raise ModelLoadError(f"--base-model {spec}: no '{adapter.denoiser_attr}' folder in it (a {adapter.family} "
                             f"diffusers pipeline folder is expected)")
    if not folder.exists() and (spec.startswith((".", "/", "~")) or spec.strip("/").count("/") >= 2):
        raise ModelLoadError(f"--base-model {spec}: no such folder")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            net = type(adapter.denoiser).from_pretrained(str(folder) if folder.exists() else source,
                                                         subfolder=adapter.denoiser_attr, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--base-model {spec}: could not load its {adapter.denoiser_attr}: {e}") from e
    return net.to(adapter.device).eval().requires_grad_(False)


def load_reward_spec(spec: str, device: torch.device, option: str):
    """build_reward(spec) with a FileNotFoundError for a path that does not exist (instead of 'unknown name')."""
    from diffalign.rewards import RewardError, available, build_reward

    if spec.startswith("<object "):
        raise RewardError(f"{option}: the recorded run used a Python reward object ({spec}); pass a reward spec or "
                          f"folder instead (or the object through the Python API)")
    p = Path(spec).expanduser()
    if p.is_dir() and not (p / "reward_config.json").is_file():
        raise RewardError(f"{option} {spec}: that folder has no reward_config.json (not written by diffalign train-reward)")
    name = spec.partition(":")[0]
    if not p.exists() and name not in available() and (os.sep in spec or spec.startswith((".", "~"))):
        raise FileNotFoundError(f"{option} {spec}: no such file or folder")
    reward = build_reward(str(p) if p.exists() else spec, device)
    return reward


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    from diffalign.models.base import DTYPES

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------- the sampler
class Sampler:
    """Loads the model (+ LoRA, base model, rewards) for a SampleConfig once; ``sample()`` draws from it.

    Already-built objects may be passed in (tests, benchmarks, notebooks): ``adapter`` (a FamilyAdapter; a
    configured lora is loaded INTO it), ``nrg_reward`` / ``clean_reward`` (Reward objects instead of specs) and
    ``base_denoiser`` (the RLG base network instead of ``base_model``). An adapter that already holds
    ``config.lora`` (loaded by an earlier Sampler) is reused as is.
    """

    def __init__(self, config: SampleConfig, *, adapter=None, nrg_reward=None, clean_reward=None,
                 base_denoiser: nn.Module | None = None):
        from diffalign.config import ConfigError, ModelConfig
        from diffalign.models import load_adapter

        cfg = config
        self.device = adapter.device if adapter is not None else _resolve_device(cfg.device)
        self.dtype = _resolve_dtype(cfg.dtype, self.device)
        if cfg.nrg_weights and not (cfg.nrg_reward or nrg_reward is not None):
            raise ConfigError("NRG weights given without an NRG reward (--nrg needs --nrg-reward)")
        if cfg.clean_weights and not (cfg.clean_reward or clean_reward is not None):
            raise ConfigError("clean-reward weights given without a reward (--clean needs --clean-reward)")
        if cfg.rlg is None and (cfg.rlg_end is not None or cfg.base_model):
            raise ConfigError("--rlg-end / --base-model only apply with --rlg W")
        if cfg.video_format not in ("mp4", "gif"):
            raise ConfigError(f"video_format {cfg.video_format!r}: mp4 or gif")
        if cfg.num_per_prompt < 1 or cfg.steps < 1 or cfg.batch_size < 1:
            raise ConfigError("num_per_prompt, steps and batch_size must be >= 1")

        family = cfg.family or (adapter.family if adapter is not None else infer_family(cfg.model))
        # a bundled world generator is sampled as it was trained (world:flow: one zero T5 token; world:video: 16
        # text tokens, 9-frame 16x16 clips at 10 fps): the same settings `diffalign world pairs` and the demo use
        trained: dict = {}
        if cfg.model.startswith("world:"):
            from diffalign.world.generators import VIDEO_GEN_FPS
            from diffalign.world.pairs import world_sample_kwargs

            kind = cfg.model.split(":", 1)[1]
            trained = {**world_sample_kwargs(kind), **({"fps": VIDEO_GEN_FPS} if kind == "video" else {})}
        max_seq = trained.get("max_sequence_length") if cfg.max_sequence_length is None else cfg.max_sequence_length
        num_frames = trained.get("num_frames") if cfg.num_frames is None else cfg.num_frames
        fps = trained.get("fps", 16.0) if cfg.fps is None else cfg.fps
        world_size = (trained["height"], trained["width"]) if "height" in trained else None
        if adapter is None:
            mcfg = ModelConfig(family=family, pretrained=cfg.model, max_sequence_length=max_seq,
                               **({"guidance_scale": cfg.distilled_guidance} if cfg.distilled_guidance is not None else {}))
            adapter = load_adapter(mcfg, device=self.device, weight_dtype=self.dtype)
        elif cfg.distilled_guidance is not None:
            adapter.cfg.guidance_scale = cfg.distilled_guidance
        self.adapter = adapter
        if cfg.lora and getattr(adapter, "loaded_lora", None) != cfg.lora:
            load_lora(adapter, cfg.lora)

        # networks + guidance terms, in the fixed order CFG -> RLG -> reward
        denoiser = adapter.denoiser
        # a shared adapter may hold a LoRA from an earlier Sampler: this config says whether it is on
        lora_state = bool(cfg.lora) if getattr(adapter, "loaded_lora", None) else None
        terms = []
        scale = cfg.guidance_scale if cfg.guidance_scale is not None else adapter.default_cfg_scale
        if not 0.0 <= cfg.guidance_rescale <= 1.0 or not 0.0 < cfg.t_max < 1.0:
            raise ConfigError(f"guidance_rescale must lie in [0, 1] (got {cfg.guidance_rescale}) and t_max in (0, 1) "
                              f"(got {cfg.t_max})")
        terms.append(CFG(scale, cfg.guidance_rescale))
        if cfg.rlg is not None:
            if base_denoiser is None and cfg.base_model:
                base_denoiser = load_base_denoiser(adapter, cfg.base_model, self.dtype)
            if base_denoiser is not None:
                self.networks = {"base": Network(base_denoiser), "aligned": Network(denoiser, lora=lora_state)}
            elif cfg.lora:
                self.networks = {"base": Network(denoiser, lora=False), "aligned": Network(denoiser, lora=True)}
            else:
                raise ConfigError("--rlg needs an aligned and a base model: --lora PATH (base = the same weights with "
                                  "the LoRA off) or --base-model PATH (aligned = --model)")
            terms.append(RLG(cfg.rlg, cfg.rlg_end))
        else:
            self.networks = {"model": Network(denoiser, lora=lora_state)}
        if nrg_reward is None and cfg.nrg_reward:
            nrg_reward = load_reward_spec(cfg.nrg_reward, self.device, "--nrg-reward")
        if nrg_reward is not None:
            terms.append(NoisyRewardGuidance(nrg_reward.to(self.device), cfg.nrg_weights, cfg.nrg_scale, cfg.t_max))
        if clean_reward is None and cfg.clean_reward:
            clean_reward = load_reward_spec(cfg.clean_reward, self.device, "--clean-reward")
        if clean_reward is not None:
            terms.append(CleanRewardGuidance(clean_reward.to(self.device), cfg.clean_weights, cfg.clean_scale, cfg.t_max))
        self.guidance = GuidanceStack(terms)

        height, width = world_size or adapter.default_resolution()
        scheduler = cfg.scheduler
        if scheduler == "auto":
            scheduler = ("euler_sde" if cfg.sde_noise else "euler") if adapter.is_flow else "ddim"
        # the resolved config: what the sidecar records, so a re-run does not depend on defaults changing
        self.config = dataclasses.replace(
            cfg, family=family, guidance_scale=float(scale), scheduler=scheduler, max_sequence_length=max_seq,
            dtype=str(self.dtype).replace("torch.", ""),
            height=cfg.height or height, width=cfg.width or width, num_frames=num_frames, fps=float(fps),
            nrg_reward=cfg.nrg_reward if cfg.nrg_reward or nrg_reward is None else f"<object {nrg_reward.name}>",
            clean_reward=cfg.clean_reward if cfg.clean_reward or clean_reward is None else f"<object {clean_reward.name}>",
        )
        try:
            self.latent_shape = adapter.latent_shape(self.config.height, self.config.width, self.config.num_frames)
        except ValueError as e:  # e.g. --num-frames for an image family
            raise ConfigError(str(e)) from e
        # fail now, not after the first batch: a bad scheduler name / option combination is a ConfigError
        try:
            build_stepper(adapter, scheduler, cfg.steps, self.latent_shape, eta=cfg.eta, sde_noise=cfg.sde_noise,
                          flow_shift=cfg.flow_shift, t_max=cfg.t_max, device=self.device)
        except ValueError as e:
            raise ConfigError(f"sampler settings: {e}") from e

    # ------------------------------------------------------------------
    def expand(self, prompts: list[str] | None = None, seeds: list[int] | None = None) -> tuple[list[str], list[int]]:
        """Prompt-major (prompt, seed) lists: each prompt num_per_prompt times, seed + k unless seeds are given."""
        from diffalign.config import ConfigError

        cfg = self.config
        prompts = list(cfg.prompts if prompts is None else prompts)
        if not prompts:
            raise ConfigError("no prompts: --prompt TEXT or --prompts FILE")
        expanded = [p for p in prompts for _ in range(cfg.num_per_prompt)]
        seeds = seeds if seeds is not None else cfg.seeds
        if seeds is None:
            seeds = [cfg.seed + k for k in range(len(expanded))]
        if len(seeds) != len(expanded):
            raise ConfigError(f"{len(seeds)} seeds for {len(expanded)} samples ({len(prompts)} prompts x "
                              f"{cfg.num_per_prompt})")
        return expanded, [int(s) for s in seeds]

    def sample(self, prompts: list[str] | None = None, seeds: list[int] | None = None,
               out: str | Path | None = None) -> SampleResult:
        """Draw every (prompt, seed); save to ``out`` (default: config.out) when set."""
        from tqdm.auto import tqdm

        cfg, adapter = self.config, self.adapter
        expanded, seed_list = self.expand(prompts, seeds)
        n, bs = len(expanded), cfg.batch_size
        negatives_all = None if cfg.negative_prompt is None else [cfg.negative_prompt] * n
        start_time = time.time()
        latents, images = [], []
        batches = range(0, n, bs)
        bar = tqdm(total=len(batches) * cfg.steps, desc="sampling", unit="step", disable=not cfg.progress)
        for start in batches:
            caps, batch_seeds = expanded[start:start + bs], seed_list[start:start + bs]
            generators = make_generators(batch_seeds)
            stepper = build_stepper(adapter, cfg.scheduler, cfg.steps, self.latent_shape, eta=cfg.eta,
                                    sde_noise=cfg.sde_noise, flow_shift=cfg.flow_shift, t_max=cfg.t_max,
                                    device=self.device)
            if start == 0:  # multistep schedulers (PNDM's Runge-Kutta warm-up) may take more steps than asked
                bar.total = len(batches) * stepper.num_steps
                bar.refresh()
            x = initial_noise(self.latent_shape, generators, stepper.init_noise_sigma, self.device)
            text = adapter.encode_prompts(caps)
            uncond = None
            if self.guidance.cfg.needs_uncond:
                negs = None if negatives_all is None else negatives_all[start:start + bs]
                uncond = adapter.encode_negative_prompts(negs, len(caps))
            z = denoise(adapter, self.guidance, self.networks, stepper, x, text, uncond, caps, generators,
                        fps=cfg.fps if cfg.num_frames else None, on_step=bar.update)
            with torch.no_grad():
                pixels = adapter.decode_latents(z)
            from diffalign.samplers.media import to_uint8

            latents.append(z.cpu())
            images.append(to_uint8(pixels))
        bar.close()
        result = SampleResult(images=np.concatenate(images), latents=torch.cat(latents), prompts=expanded,
                              seeds=seed_list,
                              config=dataclasses.replace(cfg, prompts=list(prompts if prompts is not None else cfg.prompts),
                                                         seeds=list(seeds) if seeds is not None else cfg.seeds),
                              guidance=self.guidance.describe(), seconds=time.time() - start_time)
        out = out if out is not None else cfg.out
        if out is not None:
            self.save(result, out)
        return result

    def save(self, result: SampleResult, out: str | Path) -> SampleResult:
        """Write per-sample files, grid.png and samples.json (every setting + every seed) into ``out``."""
        from diffalign import __version__
        from diffalign.samplers import media

        out = Path(out)
        cfg = dataclasses.replace(result.config, out=str(out))
        result.files = media.save_samples(result.images, result.seeds, out, fps=cfg.fps, video_format=cfg.video_format)
        result.grid = media.save_grid(result.images, out / "grid.png", ncols=cfg.num_per_prompt if
                                      len(result.images) > cfg.num_per_prompt else len(result.images))
        import diffusers

        payload = {
            "format": SIDECAR_FORMAT,
            "config": cfg.to_dict(),
            "guidance": result.guidance,
            "guidance_terms": self.guidance.settings(),
            "samples": [{"index": k, "prompt": p, "negative_prompt": cfg.negative_prompt, "seed": s,
                         "file": f.name} for k, (p, s, f) in enumerate(zip(result.prompts, result.seeds, result.files))],
            "grid": result.grid.name,
            "latent_shape": list(self.latent_shape),
            "prediction_type": self.adapter.prediction_type,
            "seconds": result.seconds,
            "software": {"diffalign": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                         "device": str(self.device), "dtype": str(self.dtype).replace("torch.", "")},
            "reproduce": f"diffalign sample --from-sidecar {out / SIDECAR_NAME} --out OTHER_DIR",
        }
        result.sidecar = media.write_sidecar(out / SIDECAR_NAME, payload)
        result.config = cfg
        return result


def sample(config: SampleConfig | None = None, /, **options: Any) -> SampleResult:
    """One-call API with the CLI's options: ``sample(model=..., prompts=[...], rlg=1.5, out=...)``, or a
    SampleConfig (keyword options override its fields)."""
    cfg = dataclasses.replace(config, **options) if config is not None else SampleConfig(**options)
    return Sampler(cfg).sample()
