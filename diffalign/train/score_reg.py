"""Score-regularised distillation + alignment of a one-/few-step generator (Diff-Instruct*-style).

Three networks, one pipeline:
    g_θ    the GENERATOR: the pipeline's denoiser + a LoRA ('default'), run at fixed unit times
           (``objective.generator_times``, e.g. [1.0] = one step from pure noise) and read out through
           the x0-estimate; several times = a few deterministic DDIM-style steps, all differentiated.
    s_ref  the frozen REFERENCE score with CFG (ω = ``objective.omega``): the same denoiser with the
           generator's LoRA disabled (no second copy).
    s_ψ    the online FAKE score: a copy of the base denoiser + its own LoRA (B = 0, so s_ψ == s_ref at
           step 0), trained by denoising score matching on stop-gradient generator samples.
           (A copy keeps the two LoRAs' requires_grad flags independent; for large models two named
           adapters on one base would save the copy; not implemented.)

Per step: ``objective.fake_updates`` DSM steps of s_ψ, then one generator step on
    L_gen = -alpha_rev r(decode(x0), c) + E_t w(t) [ -d'(y)ᵀ (s_ψ(x_t) + ε/σ_t) ]    (objective.name=score_reg)
or the KL special case (objective.name=kl), see diffalign.objectives.score_reg.

Run: ``diffalign score-reg RECIPE [key=value ...]`` with a ``task: score-reg`` recipe
(world-flow-score-reg, tiny-sd3-score-reg). Single process (no accelerate), no resume.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from diffalign.config import (ConfigError, LoraConfig, check_choices, ModelConfig, OptimConfig, _apply, _f, config_to_dict,
                              parse_overrides, resolve_recipe)
from diffalign.objectives.score_reg import (cfg_combine, eps_from_prediction, fake_score_dsm_loss, kl_generator_loss,
                                            score_from_prediction, score_reg_generator_loss, x0_from_prediction)

SCORE_REG_TASK = "score-reg"


# ------------------------------------------------------------------------------------------ config

@dataclass
class ScoreRegDataConfig:
    prompts: str = _f("world:train", "Prompt source: 'world:train' / 'world:heldout' (the embedded world's captions), "
                      "a .txt file (one prompt a line), or 'list' (use data.prompt_list).")
    prompt_list: list = _f([], "Prompts used when data.prompts=list.")
    max_prompts: int | None = _f(None, "Use only the first N prompts.")
    resolution: int | None = _f(None, "Generated image size in pixels (square); null = the pipeline's default.")


@dataclass
class ScoreRegObjectiveConfig:
    name: str = _f("score_reg", "score_reg (pseudo-Huber score divergence, Diff-Instruct*/SIM) | kl (integral KL, "
                   "DI++/DMD: gradient (s_ψ - s_ref)ᵀ dx_t/dθ).")
    alpha_rev: float = _f(100.0, "Weight of the explicit reward term -alpha_rev * r(x0, c) (DI* default 100; 0 = pure "
                          "distillation). Its gradient goes through decode_latents into the generator.")
    reward: str | None = _f("brightness", "A DIFFERENTIABLE reward spec for build_reward (e.g. brightness, saturation); "
                            "the overall is the sum of its dimensions. null = no reward term.")
    omega: float = _f(7.5, "CFG scale ω of the reference score s(∅) + ω (s(c) - s(∅)) (DI* default 7.5).")
    huber_c: float = _f(1.0, "Pseudo-Huber c of d(y) = sqrt(|y|² + c²) - c, in score units with |y| over ALL latent "
                        "dims (so c grows like sqrt(dims) for the same per-dim tolerance).")
    detach_dprime: bool = _f(True, "Treat d'(y) as a constant weight (True) or differentiate it too (False: one more "
                             "backward through the reference).")
    time_weighting: str = _f("sigma_sq", "w(t) of the divergence: sigma_sq (w = σ_t², score -> noise units) | sigma | "
                             "constant.")
    t_min: float = _f(0.02, "Smallest unit time (0 = clean) of the divergence and the fake-score DSM loss; keeps σ_t > 0.")
    t_max: float = _f(0.98, "Largest unit time (1 = pure noise) of the divergence and the fake-score DSM loss.")
    generator_times: list = _f([1.0], "Unit times the generator is run at, first = from pure noise; [1.0] = one step, "
                               "e.g. [1.0, 0.5] = two steps (deterministic re-noising with the predicted ε̂).")
    fake_updates: int = _f(2, "Fake-score (ψ) updates per generator (θ) update. On the 1-D Gaussian toy with equal "
                            "Adam learning rates, 1 had not converged after 300 θ steps; 2 and 4 had.")


@dataclass
class ScoreRegTrainConfig:
    output_dir: str = _f("runs/{name}", "Where the generator LoRA, metrics.jsonl and summary.json go; {name} = run name.")
    max_steps: int = _f(200, "Generator (θ) optimizer steps.")
    batch_size: int = _f(8, "Prompts (= generator samples) per step.")
    seed: int = _f(0, "Seed for LoRA init, prompts, latents z, noise and timesteps.")
    log_every: int = _f(10, "Write metrics.jsonl every N generator steps.")
    fake_lr: float | None = _f(None, "Learning rate of the fake score s_ψ; null = optim.lr.")
    device: str = _f("auto", "auto (cuda if available) | cpu | cuda.")


@dataclass
class ScoreRegRunConfig:
    name: str = _f("score-reg", "Run name (used in output_dir).")
    task: str = _f(SCORE_REG_TASK, "The command that runs this recipe (always score-reg here).")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: ScoreRegDataConfig = field(default_factory=ScoreRegDataConfig)
    objective: ScoreRegObjectiveConfig = field(default_factory=ScoreRegObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: ScoreRegTrainConfig = field(default_factory=ScoreRegTrainConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir.format(name=self.name))


def _validate(cfg: ScoreRegRunConfig) -> None:
    o, t = cfg.objective, cfg.train
    check_choices(cfg, {"objective.name": ("score_reg", "kl"),
                        "objective.time_weighting": ("sigma_sq", "sigma", "constant"),
                        "model.family": ("sd15", "sdxl", "sd3", "flux"),
                        "train.device": ("auto", "cpu", "cuda")})
    if not cfg.lora.enabled:
        raise ConfigError("score-reg trains LoRAs only (the reference is the generator with its LoRA disabled): "
                          "lora.enabled must be true")
    if o.huber_c <= 0:
        raise ConfigError(f"objective.huber_c must be > 0, got {o.huber_c}")
    if not 0.0 < o.t_min < o.t_max <= 1.0:
        raise ConfigError(f"need 0 < objective.t_min < objective.t_max <= 1, got {o.t_min}, {o.t_max}")
    times = o.generator_times
    if not times or not all(isinstance(u, (int, float)) and 0 < u <= 1 for u in times) or \
            any(b >= a for a, b in zip(times, times[1:])):
        raise ConfigError(f"objective.generator_times must be decreasing unit times in (0, 1], got {times}")
    if o.fake_updates < 0 or o.alpha_rev < 0:
        raise ConfigError("objective.fake_updates and objective.alpha_rev must be >= 0")
    if t.max_steps < 1 or t.batch_size < 1 or t.log_every < 1:
        raise ConfigError("train.max_steps, train.batch_size and train.log_every must be >= 1")
    if cfg.data.prompts == "list" and not cfg.data.prompt_list:
        raise ConfigError("data.prompts=list needs a non-empty data.prompt_list")


def load_score_reg_config(name_or_path: str | None = None, overrides: Sequence[str] = ()) -> ScoreRegRunConfig:
    """A ScoreRegRunConfig from a recipe (file or shipped name with ``task: score-reg``) plus dotted overrides."""
    import yaml

    cfg = ScoreRegRunConfig()
    if name_or_path:
        path = resolve_recipe(name_or_path)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        if data.get("task") != SCORE_REG_TASK:
            raise ConfigError(f"{path}: not a score-reg recipe (no 'task: {SCORE_REG_TASK}')")
        if "name" not in data:
            cfg.name = path.stem
        _apply(cfg, data, "", str(path), ScoreRegRunConfig)
    if overrides:
        _apply(cfg, parse_overrides(overrides), "", "command line", ScoreRegRunConfig)
    _validate(cfg)
    return cfg


# ------------------------------------------------------------------------------------------ helpers

def native_timesteps(adapter, u: float | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Unit time u (0 clean, 1 pure noise) -> the adapter's native timesteps [n] (inverse of unit_time).

    Flow families: t = u. DDPM families: integer t = round(u T) clamped to T - 1 (the last trained step)."""
    u = torch.as_tensor(u, dtype=torch.float32, device=device).expand(n) if not torch.is_tensor(u) or u.ndim == 0 \
        else u.to(device, torch.float32)
    if adapter.is_flow:
        return u.clone()
    T = adapter.num_train_timesteps
    return (u * T).round().long().clamp(0, T - 1)


def time_weight(kind: str, sigma: torch.Tensor) -> torch.Tensor:
    """w(t) [N] from σ_t [N]: sigma_sq turns score units (1/σ) into noise units, keeping terms O(1) across t."""
    if kind == "sigma_sq":
        return sigma.pow(2)
    if kind == "sigma":
        return sigma
    return torch.ones_like(sigma)


def load_prompts(cfg: ScoreRegDataConfig) -> list[str]:
    if cfg.prompts.startswith("world:"):
        from diffalign.world.scenes import prompt_splits

        split = cfg.prompts.split(":", 1)[1]
        if split not in ("train", "heldout"):
            raise ConfigError(f"data.prompts={cfg.prompts!r}: world:train or world:heldout")
        train, heldout = prompt_splits(0)
        prompts = [s.caption() for s in (train if split == "train" else heldout)]
    elif cfg.prompts == "list":
        prompts = [str(p) for p in cfg.prompt_list]
    else:
        path = Path(cfg.prompts)
        if not path.is_file():
            raise ConfigError(f"data.prompts={cfg.prompts!r} is not world:train, world:heldout, list or a .txt file")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    prompts = prompts[:cfg.max_prompts] if cfg.max_prompts else prompts
    if not prompts:
        raise ConfigError(f"data.prompts={cfg.prompts!r} gave no prompts")
    return prompts


def _grad_norm_clip(params: list[nn.Parameter], max_norm: float | None) -> float:
    if max_norm is None:
        return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])) \
            if hasattr(torch.nn.utils, "get_total_norm") else float("nan")
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


# ------------------------------------------------------------------------------------------ trainer

class ScoreRegTrainer:
    """setup() loads the pipeline and builds g_θ / s_ψ / s_ref; step() does fake_updates ψ steps + one θ step."""

    def __init__(self, cfg: ScoreRegRunConfig):
        self.cfg = cfg
        dev = cfg.train.device
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev)
        self.out = cfg.output_dir

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from diffalign.models import load_adapter

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # LoRA A init
        self.adapter = load_adapter(cfg.model, device=self.device, weight_dtype=torch.float32)
        ad = self.adapter
        self.prediction_type = ad.prediction_type
        base = ad.denoiser
        self.fake_net = copy.deepcopy(base)  # copy BEFORE the generator LoRA: s_ψ starts as the reference
        ad.add_lora(cfg.lora)                # generator; reference = this network with adapters disabled
        ad.add_lora(cfg.lora, module=self.fake_net)
        self.gen_net = base
        self.gen_params = [p for p in self.gen_net.parameters() if p.requires_grad]
        self.fake_params = [p for p in self.fake_net.parameters() if p.requires_grad]
        from diffalign.train.optim import build_lr_scheduler, build_optimizer

        self.gen_opt = build_optimizer(self.gen_params, cfg.optim, self.device)
        fake_optim = copy.deepcopy(cfg.optim)
        if cfg.train.fake_lr is not None:
            fake_optim.lr = cfg.train.fake_lr
        self.fake_opt = build_optimizer(self.fake_params, fake_optim, self.device)
        self.gen_sched = build_lr_scheduler(self.gen_opt, cfg.optim, cfg.train.max_steps, 1)

        self.prompts = load_prompts(cfg.data)
        self.text = ad.encode_prompts(self.prompts)            # {key: [P, ...]}, no grad, once
        self.empty = ad.encode_negative_prompts(None, 1)        # {key: [1, ...]} unconditional branch
        res = cfg.data.resolution or ad.default_resolution()[0]
        self.latent_shape = tuple(ad.latent_shape(res, res))
        self.reward = None
        o = cfg.objective
        if o.reward is not None and o.alpha_rev > 0:
            from diffalign.rewards import build_reward

            self.reward = build_reward(o.reward, device=self.device)
            if not getattr(self.reward, "differentiable", False):
                raise ConfigError(f"objective.reward={o.reward!r} is not differentiable; the score-reg reward term "
                                  "backpropagates through it (use e.g. brightness, saturation, or alpha_rev=0)")
            if self.reward.input_kind != "image":
                raise ConfigError(f"objective.reward={o.reward!r} scores {self.reward.input_kind}s; score-reg decodes "
                                  "images")
        self.gen = torch.Generator().manual_seed(cfg.train.seed + 1)
        self.step_count = 0
        self.gen_net.train()
        self.fake_net.train()

    # ------------------------------------------------------------------ pieces
    def _text(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[idx].to(self.device) for k, v in self.text.items()}

    def _uncond(self, n: int) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device).expand(n, *v.shape[1:]) for k, v in self.empty.items()}

    def _coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = self.adapter.noise_coefficients(t)
        return a.to(self.device), s.to(self.device)

    def generate(self, z: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """x0 = g_θ(z, c) [N, C, h, w] from pure noise z; differentiable w.r.t. the generator LoRA.

        Step k: x̂0 = x0-estimate at unit time u_k; before the next time, x ← α' x̂0 + σ' ε̂ (DDIM, η = 0)."""
        ad, n = self.adapter, z.shape[0]
        times = self.cfg.objective.generator_times
        x = z
        for k, u in enumerate(times):
            t = native_timesteps(ad, float(u), n, self.device)
            a, s = self._coeffs(t)
            pred = ad.predict(self.gen_net, x, t, text).float()
            x0 = x0_from_prediction(pred, x, a, s, self.prediction_type)
            if k + 1 < len(times):
                eps_hat = eps_from_prediction(pred, x, a, s, self.prediction_type)
                a2, s2 = self._coeffs(native_timesteps(ad, float(times[k + 1]), n, self.device))
                x = a2.view(-1, 1, 1, 1) * x0 + s2.view(-1, 1, 1, 1) * eps_hat
        return x0

    def _sample_t(self, n: int) -> torch.Tensor:
        o = self.cfg.objective
        u = o.t_min + (o.t_max - o.t_min) * torch.rand(n, generator=self.gen)
        return native_timesteps(self.adapter, u, n, self.device)

    def _batch(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str], torch.Tensor]:
        n = self.cfg.train.batch_size
        idx = torch.randint(0, len(self.prompts), (n,), generator=self.gen)
        z = torch.randn((n, *self.latent_shape), generator=self.gen).to(self.device)
        return idx, self._text(idx), [self.prompts[i] for i in idx.tolist()], z

    def fake_step(self) -> dict[str, float]:
        """One DSM step of s_ψ on x_t built from sg(g_θ(z)): the family's own denoising loss."""
        ad = self.adapter
        _, text, _, z = self._batch()
        with torch.no_grad():
            x0 = self.generate(z, text)
        t = self._sample_t(z.shape[0])
        eps = torch.randn(x0.shape, generator=self.gen).to(self.device)
        x_t = ad.add_noise(x0, eps, t)
        pred = ad.predict(self.fake_net, x_t, t, text)
        loss, metrics = fake_score_dsm_loss(pred, ad.target(x0, eps, t))
        self.fake_opt.zero_grad(set_to_none=True)
        loss.backward()
        metrics["grad_norm_fake"] = _grad_norm_clip(self.fake_params, self.cfg.optim.max_grad_norm)
        self.fake_opt.step()
        return metrics

    def _reference_score(self, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                         a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """CFG-guided reference score at x_t: one forward over [cond; uncond] with the generator LoRA disabled."""
        from diffalign.train.loop import adapters_disabled

        n = x_t.shape[0]
        both = {k: torch.cat([v, self._uncond(n)[k]]) for k, v in text.items()}
        with adapters_disabled(self.gen_net):
            pred = self.adapter.predict(self.gen_net, torch.cat([x_t, x_t]), torch.cat([t, t]), both).float()
        pred = cfg_combine(pred[n:], pred[:n], self.cfg.objective.omega)
        return score_from_prediction(pred, x_t, a, s, self.prediction_type)

    def generator_step(self) -> dict[str, float]:
        """One θ step on L_gen (ψ frozen for this step: its LoRA does not require grad here)."""
        ad, o = self.adapter, self.cfg.objective
        _, text, prompts, z = self._batch()
        for p in self.fake_params:  # gradients reach θ THROUGH s_ψ's input, never into ψ
            p.requires_grad_(False)
        try:
            x0 = self.generate(z, text)
            t = self._sample_t(z.shape[0])
            a, s = self._coeffs(t)
            eps = torch.randn(x0.shape, generator=self.gen).to(self.device)
            x_t = ad.add_noise(x0, eps, t)
            s_fake = score_from_prediction(ad.predict(self.fake_net, x_t, t, text).float(), x_t, a, s,
                                           self.prediction_type)
            need_ref_grad = o.name == "score_reg" and not o.detach_dprime
            with torch.set_grad_enabled(need_ref_grad):
                s_ref = self._reference_score(x_t, t, text, a, s)
            reward = None
            if self.reward is not None:
                from diffalign.rewards import weighted_overall

                pixels = ad.decode_latents(x0, clamp=True)
                reward = weighted_overall(self.reward(pixels, prompts if self.reward.needs_prompt else None))
            w = time_weight(o.time_weighting, s)
            if o.name == "kl":
                loss, metrics = kl_generator_loss(s_fake, s_ref, x_t, w, reward, o.alpha_rev)
            else:
                loss, metrics = score_reg_generator_loss(s_fake, s_ref, eps, s, o.huber_c, w, o.detach_dprime,
                                                         reward, o.alpha_rev)
            if not torch.isfinite(loss):
                metrics["skipped_nonfinite"] = 1.0  # never step on a NaN/inf loss
                return metrics
            self.gen_opt.zero_grad(set_to_none=True)
            loss.backward()
            metrics["grad_norm"] = _grad_norm_clip(self.gen_params, self.cfg.optim.max_grad_norm)
            self.gen_opt.step()
            self.gen_sched.step()
        finally:
            for p in self.fake_params:
                p.requires_grad_(True)
        return metrics

    def step(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for _ in range(self.cfg.objective.fake_updates):
            metrics.update(self.fake_step())
        metrics.update(self.generator_step())
        self.step_count += 1
        metrics["step"] = float(self.step_count)
        return metrics

    # ------------------------------------------------------------------ run
    def train(self, show_progress: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        start = time.time()
        history: list[dict[str, float]] = []
        skipped = 0
        with open(self.out / "metrics.jsonl", "a") as log:
            for _ in range(cfg.train.max_steps):
                m = self.step()
                skipped += int(m.get("skipped_nonfinite", 0))
                if self.step_count % cfg.train.log_every == 0 or self.step_count == cfg.train.max_steps:
                    history.append(m)
                    log.write(json.dumps(m) + "\n")
                    log.flush()
                    if show_progress:
                        print(f"[score-reg] step {self.step_count}: " + ", ".join(
                            f"{k}={v:.4g}" for k, v in m.items() if k != "step"), flush=True)
        export = self.out / "generator_lora"
        self.adapter.save_lora(self.gen_net, str(export))
        summary = {"run": cfg.name, "objective": cfg.objective.name, "steps": self.step_count,
                   "generator_times": list(cfg.objective.generator_times), "seconds": time.time() - start,
                   "nonfinite_steps": skipped, "final_metrics": history[-1] if history else {},
                   "weights": str(export)}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int = 0) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1] from the current generator (the same steps it trains with)."""
        text = {k: v.to(self.device) for k, v in self.adapter.encode_prompts(prompts).items()}
        z = torch.randn((len(prompts), *self.latent_shape), generator=torch.Generator().manual_seed(seed))
        return self.adapter.decode_latents(self.generate(z.to(self.device), text))


def convention_banner(cfg: ScoreRegRunConfig) -> str:
    o = cfg.objective
    div = (f"E_t w(t)[-d'(y)ᵀ(s_ψ + ε/σ)], d = pseudo-Huber c={o.huber_c:g}, d' {'detached' if o.detach_dprime else 'differentiated'}"
           if o.name == "score_reg" else "KL surrogate, gradient (s_ψ - s_ref)ᵀ dx_t/dθ")
    rew = f"-{o.alpha_rev:g} * {o.reward}(decode(x0))" if o.reward and o.alpha_rev else "no reward term"
    return (f"objective: {o.name}: L_gen = {rew} + {div}; y = s_ψ - s_ref_cfg, ω={o.omega:g}; w(t)={o.time_weighting}; "
            f"generator times {list(o.generator_times)}; {o.fake_updates} ψ update(s) per θ update")
