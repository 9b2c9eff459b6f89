"""Typed run configuration: YAML recipes in, dotted ``key=value`` overrides, strict keys.

One dataclass tree drives the CLI, the docs (every field carries a ``help`` string) and the code.
Unknown keys are errors that name the nearest valid key, because a typo that silently falls
back to a default (``objective.betta=5000``) is the worst kind of training bug.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says where and how."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    family: str = _f("sd15", "Model family adapter: sd15 | sdxl | sd3 | flux | wan (Wan 2.1 video).")
    pretrained: str = _f("", "Diffusers pipeline folder, hub id, or 'tiny:<family>' for the built-in tiny test model.")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of `pretrained`.")
    variant: str | None = _f(None, "Weight variant to load, e.g. 'fp16'.")
    vae: str | None = _f(None, "Override the pipeline's VAE with this folder or hub id (e.g. madebyollin/sdxl-vae-fp16-fix).")
    prediction_type: str | None = _f(None, "UNet families: 'epsilon' or 'v_prediction'; null reads the scheduler config.")
    timestep_sampling: str = _f("logit_normal", "Flow families: 'logit_normal' (SD3 practice) or 'uniform' in [0, 1].")
    logit_mean: float = _f(0.0, "Mean of the logit-normal timestep density (flow).")
    logit_std: float = _f(1.0, "Std of the logit-normal timestep density (flow).")
    flow_shift: float | None = _f(None, "Flow time shift t' = s t / (1 + (s - 1) t); null uses the scheduler's `shift` (`flow_shift` for UniPC/DPM flow schedulers; 1.0 when dynamic).")
    guidance_scale: float = _f(3.5, "FLUX guidance-embedding value fed during training (guidance-distilled models only).")
    max_sequence_length: int | None = _f(None, "T5 token length for SD3/FLUX/Wan prompts; null uses the family default.")
    weight_dtype: str = _f("auto", "dtype of frozen weights (VAE, text encoders, LoRA base): auto (= mixed precision) | float32 | bfloat16 | float16.")
    attention: str = _f("sdpa", "Attention backend: 'sdpa' (PyTorch fused scaled_dot_product_attention) or 'xformers'.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")


@dataclass
class LoraConfig:
    enabled: bool = _f(True, "Train a LoRA (reference = adapters disabled). False = full fine-tune (reference = frozen copy).")
    rank: int = _f(8, "LoRA rank r.")
    alpha: float | None = _f(None, "LoRA alpha; null = rank (scale 1).")
    dropout: float = _f(0.0, "LoRA dropout.")
    target_modules: list = _f(["to_q", "to_k", "to_v", "to_out.0"], "Module names that get LoRA layers.")


@dataclass
class DataConfig:
    path: str = _f("", "Preference data: parquet file/folder, datasets save_to_disk folder, .jsonl, .csv, a hub dataset id, or 'toy:pairs'. Pairs (jpg_0/jpg_1 + label_0) for every objective; or UNPAIRED labelled images (one 'image' column, a caption and a desirable/undesirable column data.label_column; 'toy:unpaired') for objective.name=kto.")
    label_column: str = _f("label", "Unpaired data (objective kto): the column holding each image's label: desirable/undesirable, true/false, 1/0, up/down or thumbs_up/thumbs_down (case-insensitive). A file with this column and one image column ('image' or 'jpg') and no pair columns is read as unpaired.")
    split: str = _f("train", "Split name for datasets folders and hub ids.")
    caption_column: str = _f("caption", "Column holding the prompt.")
    score_column: str | None = _f(None, "Per-image reward columns read with each pair and oriented with it (objectives gapo and rwr need them): a base name 'score' -> columns score_0/score_1 (the world's pairs parquet: score = oracle overall, or color, shape, background, layout), or two names 'col_a,col_b' for jpg_0/jpg_1. null = no scores.")
    resolution: int = _f(512, "Training resolution in pixels (square), or the height when data.width is set.")
    width: int | None = _f(None, "Output width in pixels for non-square training (video recipes: resolution 480, width 832); each image/clip is resized to just cover resolution x width, then cropped. null = square.")
    center_crop: bool = _f(False, "Center crop instead of a random crop (the same crop for both images of a pair).")
    random_flip: bool = _f(True, "Random horizontal flip (the same flip for both images of a pair).")
    prompt_dropout: float = _f(0.0, "Probability of training a pair with the empty prompt (CFG support).")
    ties: str = _f("drop", "label_0 == 0.5 rows: 'drop' (counted in the summary) or 'error'.")
    on_error: str = _f("raise", "Bad rows (corrupt image, missing file, bad label): 'raise' naming the row, or 'skip' and count.")
    max_pairs: int | None = _f(None, "Use only the first N usable pairs of the source (unpaired data: the first N usable labelled images).")
    num_workers: int = _f(0, "DataLoader worker processes for on-the-fly decoding.")
    num_frames: int | None = _f(None, "Video pairs (rows pointing at .mp4/.gif/.webm/... files): frames per clip, the first num_frames frames on screen at times k / data.fps (sampled BY TIME from the file's real frame rate). Pixels are then [3, F, R, R]. Wan needs num_frames - 1 divisible by 4 (5, 9, 81). A clip shorter than num_frames / fps seconds is a bad row. null = image pairs (a video file is then an error).")
    fps: float = _f(16.0, "Video pairs: the model's frame rate; frames are taken at times k / fps whatever the file's own rate (Wan 2.1: 16).")
    dimension_weights: dict | None = _f(None, "VideoAlign CSV (columns path_A, path_B, prompt, VQ, MQ, TA with A/B/same) for DPO: the winner is A when sum_d w_d * (+1 A, -1 B, 0 same/missing) > 0, B when < 0; 0 is a tie (dropped and counted, or an error with data.ties=error). {dim: weight}; null = {VQ: 1, MQ: 1, TA: 1}.")


@dataclass
class CacheConfig:
    dir: str | None = _f(None, "Latent + text-embedding cache folder. `diffalign cache` writes it; training reads it when set.")
    shard_size: int = _f(256, "Pairs per safetensors shard.")
    dtype: str = _f("float32", "Storage dtype of cached tensors: float32 | float16 | bfloat16.")
    batch_size: int = _f(8, "Pairs encoded per VAE/text-encoder call while caching.")


@dataclass
class ObjectiveConfig:
    name: str = _f("dpo", "Training objective: dpo (Diffusion-DPO / Flow-DPO) | sft (plain denoising loss on winners) | gapo (DPO, each pair weighted by 2^S_w - 2^S_l) | rwr (Flow-RWR, reward-weighted loss on every image) | kto (Diffusion-KTO: unpaired labelled images, or pairs read as winners desirable, losers undesirable) | mapo (MaPO, reference-free) | seppo (SePPO: winners only, the loser is sampled by a past-checkpoint reference drawn from a pool; LoRA only).")
    beta: float = _f(5000.0, "DPO/GAPO beta in the convention inside = -(beta/2)[(err_θ(w)-err_ref(w)) - (err_θ(l)-err_ref(l))], err = per-sample MEAN squared error. SD1.5/SDXL: 5000 (= diffusers' beta_dpo 2500); flow: 100-2000. Diffusion-KTO: the beta of σ(±beta (g - z0)), 1000 in the paper's code.")
    loss_type: str = _f("sigmoid", "sigmoid (-log σ(inside)) | hinge (relu(1 - inside)) | ipo ((inside/beta - 1/(2 beta))^2).")
    time_weighting: str = _f("constant", "DPO/GAPO beta over time: 'constant' (default; Diffusion-DPO, and Flow-DPO as in VideoAlign) | 'velocity' (eps-prediction models: beta * min(1/alpha_bar_t, velocity_weight_cap), the errors measured in velocity space as Flow-DPO's are; moves colour/shape/layout, decided at high noise, instead of fine detail; = constant for velocity-target models) | 'one_minus_t_sq' (flow: beta (1-t)^2, ablation only: reward-hacks).")
    velocity_weight_cap: float = _f(100.0, "time_weighting=velocity: cap of the 1/alpha_bar_t factor (1/alpha_bar_T is ~200 on SD1.5's schedule).")
    sft_weight: float = _f(0.0, "Add sft_weight * err_θ(w) to the DPO or GAPO loss (stabiliser).")
    score_min: float = _f(0.0, "gapo/rwr: rewards are scaled as S = (score - score_min) / (score_max - score_min); GAPO needs S in [0, 1]. The defaults keep [0, 1] scores (the world oracle's) unchanged.")
    score_max: float = _f(1.0, "gapo/rwr: upper end of the score scaling (see score_min).")
    tau: float = _f(0.1, "rwr: temperature of the weights w = N softmax(S / tau) over the batch's N images, in units of the scaled score S.")
    weight_clip: float | None = _f(4.0, "rwr: clip each weight at this value (>= 1) and redistribute the excess so weights still sum to N (default; keeps the effective sample size >= N/weight_clip). null = plain self-normalised exp weights.")
    kto_lambda_desirable: float = _f(1.0, "kto: weight λ_D of the desirable (winner) samples' loss.")
    kto_lambda_undesirable: float = _f(1.0, "kto: weight λ_U of the undesirable (loser) samples' loss.")
    kto_balance: bool = _f(False, "kto: rescale λ_D and λ_U by the data's class counts, λ_D' = λ_D N/(2 n_D) and λ_U' = λ_U N/(2 n_U) (n_D, n_U = desirable/undesirable images of the whole dataset, N = n_D + n_U, counted before step 1), so both classes weigh alike in the expected loss whatever the desirable fraction; the λs used are printed. Pair data is balanced already (no change). KTO (Ethayarajh et al. 2024) recommends λ_D n_D / (λ_U n_U) in [1, 4/3]: with kto_balance it is λ_D/λ_U.")
    mapo_gamma: float = _f(0.5, "mapo: γ of s(err) = γ err / (exp(γ err) - 1) (the official snr_value).")
    mapo_weight: float = _f(0.1, "mapo: weight λ of the margin term, loss = err_θ(w) - λ log σ(scale (s(err_w) - s(err_l))) (the official beta_mapo).")
    mapo_scale: float = _f(1000.0, "mapo: multiplier of the margin inside log σ (the official code uses num_train_timesteps = 1000).")
    seppo_flipper: str = _f("sign", "seppo: anchor-based flipper s of inside = -(beta/2)[Δ(w) - s Δ(ref_sample)]: 'sign' (s = +1 if err_ref(w) > err_θ(w) else -1, the paper's), 'indicator' (s = 1 or 0: drop the sample term instead of flipping), 'none' (s = 1 always) or 'reversed' (s = -1 where 'sign' gives +1: the opposite direction, for the direction study).")
    seppo_pool_size: int = _f(7, "seppo: keep the last K LoRA snapshots as the reference pool (paper: 7); the initial weights are the first snapshot.")
    seppo_snapshot_every: int = _f(30, "seppo: add a LoRA snapshot to the pool every N optimizer steps (paper: 30).")


@dataclass
class OnlineConfig:
    enabled: bool = _f(False, "Online best-vs-worst pairs (flow_grpo style): per data prompt, sample num_samples latents from the reference, score them with `reward`, and train objective dpo on the reward-best vs reward-worst latents (the data's images are not used). Needs LoRA.")
    num_samples: int = _f(4, "Online pairs: samples K per prompt (>= 2).")
    reward: str = _f("oracle", "Online pairs: reward spec for diffalign.rewards.build_reward (e.g. 'oracle' on the world, 'brightness', a trained reward folder). Images are decoded from the sampled latents.")
    reward_weights: dict | None = _f(None, "Online pairs: per-dimension weights {dim: w} of the scalar reward; null = the 'overall' dimension when the reward has one, else every dimension at 1.")
    refresh_every: int = _f(0, "Online pairs: every N optimizer steps copy the current LoRA into the frozen reference (it samples AND is the DPO reference); 0 = the reference stays the base model (adapters disabled).")
    steps: int = _f(10, "Sampling steps for generated latents (online pairs, and SePPO's reference samples).")
    guidance_scale: float = _f(1.0, "CFG scale when sampling generated latents (1 = off: one forward per step).")
    scheduler: str = _f("auto", "Sampler for generated latents: auto (ddim for eps/v models, euler for flow) or a diffalign sample scheduler name.")


@dataclass
class OptimConfig:
    optimizer: str = _f("adamw", "adamw (fused where the device supports it) | adamw8bit (bitsandbytes).")
    lr: float = _f(1e-5, "Peak learning rate.")
    weight_decay: float = _f(1e-2, "AdamW weight decay.")
    betas: list = _f([0.9, 0.999], "Adam betas.")
    eps: float = _f(1e-8, "Adam epsilon.")
    lr_scheduler: str = _f("constant_with_warmup", "diffusers scheduler name: constant | constant_with_warmup | linear | cosine.")
    warmup_steps: int = _f(0, "Warmup optimizer steps.")
    max_grad_norm: float | None = _f(1.0, "Gradient clipping norm; null disables clipping (the norm is still logged).")


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/{name}", "Where checkpoints, the final LoRA/model and logs go; {name} expands to the run name.")
    max_steps: int = _f(1000, "Optimizer steps.")
    batch_size: int = _f(1, "Pairs per process per micro-step.")
    gradient_accumulation_steps: int = _f(1, "Micro-steps per optimizer step.")
    mixed_precision: str = _f("no", "no | fp16 | bf16 (accelerate autocast; trainable weights stay float32).")
    seed: int = _f(0, "Seed for data order, augmentation, noise and timesteps (resume-exact).")
    checkpoint_every: int = _f(500, "Write a resumable checkpoint every N optimizer steps (0 = only at the end).")
    keep_checkpoints: int = _f(3, "Keep the last K checkpoints.")
    resume: str = _f("auto", "'auto' resumes from the latest checkpoint in output_dir, 'none' starts fresh, or a checkpoint path.")
    log_every: int = _f(10, "Log metrics every N optimizer steps.")
    log_with: str = _f("tensorboard", "accelerate tracker: tensorboard | wandb | none.")
    ema: bool = _f(False, "Keep an EMA of trainable weights; the exported weights are the EMA weights.")
    ema_decay: float = _f(0.999, "EMA decay per optimizer step.")
    nan_policy: str = _f("skip", "Non-finite loss: 'skip' the step (counted) or 'stop' the run. Never written to a checkpoint.")
    max_consecutive_nan: int = _f(10, "Stop after this many consecutive non-finite steps, even with nan_policy=skip.")
    reference_dtype: str = _f("bfloat16", "Full fine-tune only: dtype of the frozen reference copy.")


@dataclass
class RunConfig:
    name: str = _f("run", "Run name (used in output_dir and tracker names).")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir.format(name=self.name))


CHOICES: dict[str, tuple[str, ...]] = {
    "model.family": ("sd15", "sdxl", "sd3", "flux", "wan"),
    "model.prediction_type": ("epsilon", "v_prediction"),
    "model.timestep_sampling": ("logit_normal", "uniform"),
    "model.weight_dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.attention": ("sdpa", "xformers"),
    "data.ties": ("drop", "error"),
    "data.on_error": ("raise", "skip"),
    "cache.dtype": ("float32", "float16", "bfloat16"),
    "objective.name": ("dpo", "sft", "gapo", "rwr", "kto", "mapo", "seppo"),
    "objective.seppo_flipper": ("sign", "indicator", "none", "reversed"),
    "objective.loss_type": ("sigmoid", "hinge", "ipo"),
    "objective.time_weighting": ("constant", "one_minus_t_sq", "velocity"),
    "optim.optimizer": ("adamw", "adamw8bit"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.nan_policy": ("skip", "stop"),
    "train.reference_dtype": ("float32", "bfloat16", "float16"),
}


# --------------------------------------------------------------------------- introspection

def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls: type = RunConfig, prefix: str = "") -> dict[str, str]:
    """Every valid dotted key with its help text, e.g. {'objective.beta': '...'}."""
    out: dict[str, str] = {}
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if _is_config(hints[f.name]):
            out.update(all_keys(hints[f.name], key + "."))
        else:
            out[key] = f.metadata.get("help", "")
    return out


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # try matching on the last component, e.g. 'betta' -> 'objective.beta'
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in valid}
        near = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        close = [leaves[near[0]]] if near else []
    return f" Did you mean '{close[0]}'?" if close else ""


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert a YAML value against a field's annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    return value


def _apply(obj: Any, mapping: dict, prefix: str, source: str, root: type | None = None) -> None:
    """Set fields of the dataclass tree ``obj`` from a nested mapping; unknown keys are errors that
    suggest the nearest key of ``root`` (the top-level config class; default RunConfig)."""
    hints = _field_types(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"{source}: unknown config key '{key}'.{_suggest(key, all_keys(root or RunConfig))}")
        tp = hints[k]
        if _is_config(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: '{key}' is a section; give it a mapping, not {v!r}")
            _apply(getattr(obj, k), v, key + ".", source, root)
        else:
            setattr(obj, k, _coerce(f"{source}: {key}", v, tp))


def check_choices(cfg: Any, choices: dict[str, tuple[str, ...]], *, allow_none: bool = False) -> None:
    """ConfigError naming the key when a dotted key's value (e.g. ``model.family``) is not one of its choices;
    ``allow_none`` lets null pass (for keys whose null means "the default")."""
    for key, allowed in choices.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if (value is not None or not allow_none) and value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def _validate(cfg: RunConfig) -> None:
    check_choices(cfg, CHOICES, allow_none=True)
    if cfg.train.batch_size < 1 or cfg.train.gradient_accumulation_steps < 1 or cfg.train.max_steps < 1:
        raise ConfigError("train.batch_size, train.gradient_accumulation_steps and train.max_steps must be >= 1")
    if not 0.0 <= cfg.data.prompt_dropout <= 1.0:
        raise ConfigError(f"data.prompt_dropout must lie in [0, 1], got {cfg.data.prompt_dropout}")
    if cfg.data.width is not None and (isinstance(cfg.data.width, bool) or int(cfg.data.width) < 1):
        raise ConfigError(f"data.width must be a positive number of pixels or null, got {cfg.data.width!r}")
    if cfg.data.num_frames is not None and (isinstance(cfg.data.num_frames, bool) or int(cfg.data.num_frames) < 1):
        raise ConfigError(f"data.num_frames must be a positive integer or null, got {cfg.data.num_frames!r}")
    if not (isinstance(cfg.data.fps, (int, float)) and not isinstance(cfg.data.fps, bool) and cfg.data.fps > 0):
        raise ConfigError(f"data.fps must be a positive number, got {cfg.data.fps!r}")
    if cfg.data.dimension_weights is not None:
        w = cfg.data.dimension_weights
        if not isinstance(w, dict) or not w or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in w.values()):
            raise ConfigError(f"data.dimension_weights must be a non-empty mapping {{dimension: number}}, got {w!r}")
    if cfg.objective.beta <= 0:
        raise ConfigError(f"objective.beta must be > 0, got {cfg.objective.beta}")
    o = cfg.objective
    if not o.score_max > o.score_min:
        raise ConfigError(f"objective.score_max ({o.score_max}) must be greater than objective.score_min ({o.score_min})")
    if o.tau <= 0:
        raise ConfigError(f"objective.tau must be > 0, got {o.tau}")
    if o.weight_clip is not None and o.weight_clip < 1:
        raise ConfigError(f"objective.weight_clip must be >= 1 (weights average 1) or null, got {o.weight_clip}")
    if o.velocity_weight_cap < 1:
        raise ConfigError(f"objective.velocity_weight_cap must be >= 1 (it caps 1/alpha_bar_t >= 1), got {o.velocity_weight_cap}")
    if o.kto_lambda_desirable < 0 or o.kto_lambda_undesirable < 0:
        raise ConfigError("objective.kto_lambda_desirable and objective.kto_lambda_undesirable must be >= 0")
    if o.kto_balance and o.name != "kto":
        raise ConfigError(f"objective.kto_balance=true applies to objective.name=kto only, not {o.name!r}")
    if not cfg.data.label_column.strip():
        raise ConfigError("data.label_column is empty: name the column holding unpaired images' labels (default 'label')")
    if o.mapo_gamma <= 0 or o.mapo_scale <= 0 or o.mapo_weight < 0:
        raise ConfigError("objective.mapo_gamma and objective.mapo_scale must be > 0, objective.mapo_weight >= 0")
    # the DPO-logit options mean nothing to the other objectives: refuse them instead of silently ignoring them
    if o.name not in ("dpo", "gapo"):
        for key, default in (("loss_type", "sigmoid"), ("time_weighting", "constant"), ("sft_weight", 0.0),
                             ("velocity_weight_cap", ObjectiveConfig.velocity_weight_cap)):
            if getattr(o, key) != default:
                raise ConfigError(f"objective.{key}={getattr(o, key)!r} applies to objective.name=dpo or gapo only, "
                                  f"not {o.name!r}")
    if o.name == "seppo" or cfg.online.enabled:  # both keep snapshots of / swap LoRA weights
        what = "objective.name=seppo" if o.name == "seppo" else "online.enabled=true"
        if not cfg.lora.enabled:
            raise ConfigError(f"{what} needs lora.enabled=true (reference snapshots are LoRA weights)")
        if cfg.online.steps < 1:
            raise ConfigError(f"online.steps must be >= 1, got {cfg.online.steps}")
    if o.name == "seppo" and (o.seppo_pool_size < 1 or o.seppo_snapshot_every < 1):
        raise ConfigError("objective.seppo_pool_size and objective.seppo_snapshot_every must be >= 1")
    if cfg.online.enabled:
        if o.name != "dpo":
            raise ConfigError(f"online.enabled=true trains objective.name=dpo on the sampled pairs, not {o.name!r}")
        if cfg.online.num_samples < 2 or cfg.online.refresh_every < 0:
            raise ConfigError("online.num_samples must be >= 2 (best vs worst) and online.refresh_every >= 0")
    if cfg.data.score_column is not None and not cfg.data.score_column.strip():
        raise ConfigError("data.score_column is empty: give a base name like 'score' or two columns 'a,b', or null")


# --------------------------------------------------------------------------- loading

# A recipe's top-level ``task`` says which command runs it; recipes without one are `diffalign train`
# recipes. Reward-model recipes (``task: train-reward``) live in the same configs/ package.
TRAIN_TASK = "train"
REWARD_TASK = "train-reward"


def recipe_task(path: Path) -> str:
    """The ``task`` of a recipe file: 'train' (the default) or 'train-reward'."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    task = data.get("task", TRAIN_TASK) if isinstance(data, dict) else TRAIN_TASK
    return str(task)


def recipe_names(task: str | None = None) -> list[str]:
    """Names of the recipes shipped in configs/ (installed as diffalign.configs); ``task`` filters by
    the command that runs them ('train' or 'train-reward'; None = all)."""
    names = sorted(p.name[:-5] for p in resources.files("diffalign.configs").iterdir() if p.name.endswith(".yaml"))
    if task is None:
        return names
    return [n for n in names if recipe_task(resolve_recipe(n)) == task]


def resolve_recipe(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped recipe ('tiny-sd15-dpo')."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    packaged = resources.files("diffalign.configs") / f"{name}.yaml"
    if packaged.is_file():
        return Path(str(packaged))
    hint = _suggest(name, recipe_names()).replace("Did you mean", "Did you mean the recipe")
    raise ConfigError(f"config '{name_or_path}' is neither a YAML file nor a shipped recipe.{hint} "
                      f"Shipped recipes: {', '.join(recipe_names())}")


def parse_overrides(items: typing.Sequence[str]) -> dict:
    """['objective.beta=2500', 'lora.enabled=false'] -> nested dict with YAML-typed values."""
    nested: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. objective.beta=2500)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def load_config(name_or_path: str | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Build a RunConfig from a recipe (file or shipped name) plus dotted overrides."""
    cfg = RunConfig()
    if name_or_path:
        path = resolve_recipe(name_or_path)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        if data.get("task", TRAIN_TASK) != TRAIN_TASK:
            raise ConfigError(f"{path}: this is a '{data['task']}' recipe, run it with `diffalign {data['task']} "
                              f"{name_or_path}`")
        data.pop("task", None)
        if "name" not in data:
            cfg.name = path.stem
        _apply(cfg, data, "", str(path))
    if overrides:
        _apply(cfg, parse_overrides(overrides), "", "command line")
    _validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
