"""The one sampling loop, for every family, through the family adapters (diffalign.models).

    x_T = init_noise_sigma * randn(seed_i)                 one torch.Generator per sample: sample i depends only on
                                                          its own seed (initial noise AND any per-step noise)
    for each step i (t_i from the noisiest):
        x_in = stepper.model_input(x, i)                   (VE-style schedulers scale; DDIM/flow: x itself)
        pred = guidance(evaluate, state)                   CFG -> RLG -> reward terms (samplers.guidance)
        x    = stepper.step(pred, i, x)
    return x                                               latents; the adapter decodes them

The loop only asks the adapter; the one distinction it makes is the adapter's own ``is_flow``, to pick the
stepper: eps/v models step with their diffusers scheduler (DDIM by default: DDIMScheduler.from_config of the
pipeline's scheduler config, as in diffusers), flow models integrate the flow ODE with Euler on the
FlowMatchEulerDiscreteScheduler sigmas (the model's shift / resolution shift), or an SDE with the same marginals.
Latents may have any rank ([N, C, h, w] images, [N, C, F, h, w] video): nothing here assumes 4-D.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from diffalign.samplers.guidance import GuidanceStack, StepState, max_ratio

EPS_SCHEDULERS = {  # name -> diffusers class name; built with from_config(pipeline scheduler config)
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}
FLOW_SCHEDULERS = ("euler", "euler_sde")


@dataclass
class Network:
    """A denoiser the guidance can query. ``lora``: None leaves the model's peft adapters as they are, True/False
    switches them on/off for the call (the RLG base of a LoRA model is the same weights with adapters off)."""

    model: nn.Module
    lora: bool | None = None

    def active(self):
        if self.lora is False:
            from diffalign.train.loop import adapters_disabled

            return adapters_disabled(self.model)
        if self.lora is True:
            return _adapters_enabled(self.model)
        return contextlib.nullcontext(self.model)


@contextlib.contextmanager
def _adapters_enabled(model: nn.Module):
    model.enable_adapters()  # idempotent; a disabled state is never left behind by adapters_disabled
    yield model


# ----------------------------------------------------------------------------------------------- steppers
class SchedulerStepper:
    """eps/v models: a diffusers scheduler (DDIM, DPM-Solver++, Euler, ...) doing the update.

    Native timesteps are the scheduler's; stochastic schedulers (DDPM, Euler-ancestral, DDIM with eta > 0) draw
    their per-step noise from the per-sample generators, like the diffusers pipelines.
    """

    def __init__(self, scheduler, num_steps: int, device: torch.device, eta: float = 0.0):
        scheduler.set_timesteps(num_steps, device=device)
        self.scheduler = scheduler
        self.timesteps = scheduler.timesteps
        self.num_steps = len(self.timesteps)
        self.init_noise_sigma = float(scheduler.init_noise_sigma)
        params = set(inspect.signature(scheduler.step).parameters)
        self._eta = {"eta": eta} if "eta" in params else {}
        if eta and not self._eta:
            raise ValueError(f"eta={eta} applies to DDIM only, not {type(scheduler).__name__}")
        self._takes_generator = "generator" in params

    def model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self.scheduler.scale_model_input(x, self.timesteps[i])

    def step(self, pred: torch.Tensor, i: int, x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        kw = dict(self._eta)
        if self._takes_generator:
            kw["generator"] = generators
        return self.scheduler.step(pred, self.timesteps[i], x, return_dict=False, **kw)[0]


class FlowStepper:
    """Rectified flow: Euler on the FlowMatchEulerDiscreteScheduler sigmas (t_0 = 1 ... t_N = 0).

    ODE ('euler'):  x_{i+1} = x_i + (t_{i+1} - t_i) v                      (== FlowMatchEulerDiscreteScheduler.step)
    SDE ('euler_sde', noise level a > 0; flow_grpo's sampler): with h = t_i - t_{i+1} > 0,
        g^2 = a^2 t / (1 - t)  (t / (1 - t) capped at t_max / (1 - t_max)),  score = -(x + (1 - t) v) / t
        x_{i+1} = x_i - h [v + g^2 / (2t) (x_i + (1 - t) v)] + g sqrt(h) z
    the reverse-time SDE with the same marginals as the ODE (Fokker-Planck: drift v - (g^2/2) score). The last
    step is the plain ODE step so the output carries no fresh noise. Native timesteps fed to the adapter are
    the sigmas themselves (flow adapters take unit time).
    """

    def __init__(self, scheduler, num_steps: int, device: torch.device, timestep_kwargs: dict,
                 sde_noise: float = 0.0, t_max: float = 0.95):
        scheduler.set_timesteps(num_steps, device=device, **timestep_kwargs)
        self.sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
        self.timesteps = self.sigmas[:-1]
        self.num_steps = len(self.timesteps)
        self.init_noise_sigma = 1.0
        self.sde_noise = float(sde_noise)
        self.ratio_cap = max_ratio(t_max)

    def model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def step(self, pred: torch.Tensor, i: int, x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        x, v = x.float(), pred.float()
        if self.sde_noise == 0.0 or i == self.num_steps - 1:
            # the same float32 arithmetic as FlowMatchEulerDiscreteScheduler.step: sample + (sigma_next - sigma) * v
            return x + (self.sigmas[i + 1] - self.sigmas[i]) * v
        t, t_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        h = t - t_next
        ratio = min(t / (1 - t), self.ratio_cap) if t < 1 else self.ratio_cap
        g2 = self.sde_noise ** 2 * ratio
        drift = v + g2 / (2 * t) * (x + (1 - t) * v)
        return x - h * drift + (g2 * h) ** 0.5 * noise_like(x, generators)


def build_stepper(adapter, name: str, num_steps: int, latent_shape: Sequence[int], *, eta: float = 0.0,
                  sde_noise: float = 0.0, flow_shift: float | None = None, t_max: float = 0.95,
                  device: torch.device | str = "cpu"):
    """A fresh stepper (schedulers are stateful) for ``adapter``; ``name`` 'auto' = ddim (eps/v) or euler (flow)."""
    import diffusers

    config = adapter.pipe.scheduler.config
    device = torch.device(device)
    if adapter.is_flow:
        name = "euler_sde" if name == "auto" and sde_noise else ("euler" if name == "auto" else name)
        if name not in FLOW_SCHEDULERS:
            raise ValueError(f"flow models sample with {FLOW_SCHEDULERS}, not {name!r}")
        if name == "euler_sde" and sde_noise <= 0:
            raise ValueError("scheduler euler_sde needs sde_noise > 0 (the SDE noise level, e.g. 0.7)")
        if name == "euler" and sde_noise:
            raise ValueError("sde_noise applies to scheduler euler_sde only")
        overrides = {"shift": float(flow_shift)} if flow_shift is not None else {}
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config, **overrides)
        return FlowStepper(scheduler, num_steps, device, adapter.timestep_kwargs(num_steps, tuple(latent_shape)),
                           sde_noise=sde_noise, t_max=t_max)
    name = "ddim" if name == "auto" else name
    if sde_noise:
        raise ValueError("sde_noise applies to flow models; eps/v models take a stochastic scheduler (ddpm, euler_a) "
                         "or DDIM eta")
    if name == "pipeline":
        cls = type(adapter.pipe.scheduler)
    elif name in EPS_SCHEDULERS:
        cls = getattr(diffusers, EPS_SCHEDULERS[name])
    else:
        raise ValueError(f"unknown scheduler {name!r} for eps/v models; one of {sorted(EPS_SCHEDULERS)} or 'pipeline'")
    # the adapter's prediction type wins over the file's (ModelConfig.prediction_type may override it)
    scheduler = cls.from_config(config, prediction_type=adapter.prediction_type)
    return SchedulerStepper(scheduler, num_steps, device, eta=eta)


# ----------------------------------------------------------------------------------------------- noise
def noise_like(x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like x, row i drawn from generators[i] (on the generator's device)."""
    rows = [torch.randn((1,) + tuple(x.shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.cat(rows).to(x.device, x.dtype)


def initial_noise(latent_shape: Sequence[int], generators: Sequence[torch.Generator], init_noise_sigma: float,
                  device: torch.device | str) -> torch.Tensor:
    """[N, *latent_shape] float32: randn from each sample's generator (as diffusers' randn_tensor with a generator
    list, so the same seed gives the diffusers pipeline's noise), times the scheduler's init_noise_sigma."""
    rows = [torch.randn((1,) + tuple(latent_shape), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.cat(rows).to(device) * init_noise_sigma


def make_generators(seeds: Sequence[int], device: str = "cpu") -> list[torch.Generator]:
    """One generator per sample. CPU by default: the same seed gives the same image on any device."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


# ----------------------------------------------------------------------------------------------- the loop
@torch.no_grad()
def denoise(adapter, guidance: GuidanceStack, networks: dict[str, Network], stepper, x: torch.Tensor,
            text: dict[str, torch.Tensor], uncond_text: dict[str, torch.Tensor] | None, prompts: list[str],
            generators: Sequence[torch.Generator], *, fps: float | None = None,
            on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Run every step of ``stepper`` on one batch ``x`` [N, ...]; returns the final latents (float32).

    ``text``/``uncond_text`` are the adapter's conditioning dicts for the prompts and the negative prompts
    (uncond_text may be None when the guidance needs no unconditional pass). Networks are called once per step
    each, with [uncond; cond] batched in one forward when CFG needs both (the diffusers pipelines' order).
    """
    missing = [n for n in guidance.networks if n not in networks]
    if missing:
        raise ValueError(f"guidance needs networks {list(guidance.networks)}; missing {missing}")
    n = x.shape[0]
    x = x.float()
    for i in range(stepper.num_steps):
        t = stepper.timesteps[i]
        t_batch = t.reshape(1).expand(n).to(adapter.device)
        x_in = stepper.model_input(x, i)
        alpha, sigma = adapter.noise_coefficients(t_batch)
        state = StepState(adapter=adapter, x=x_in, t=t_batch, t_unit=adapter.unit_time(t_batch), alpha=alpha,
                          sigma=sigma, step=i, num_steps=stepper.num_steps, prompts=prompts, fps=fps)

        def evaluate(name: str, with_uncond: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            net = networks[name]
            with net.active():
                if not with_uncond:
                    return adapter.predict(net.model, x_in, t_batch, text).float(), None
                if uncond_text is None:
                    raise ValueError("CFG needs the unconditional (negative-prompt) conditioning")
                both = {k: torch.cat([uncond_text[k], text[k]]) for k in text}
                out = adapter.predict(net.model, torch.cat([x_in, x_in]), torch.cat([t_batch, t_batch]), both).float()
                uncond, cond = out.chunk(2)
                return cond, uncond

        pred = guidance(evaluate, state)
        x = stepper.step(pred, i, x, list(generators)).float()
        if on_step is not None:
            on_step()
    return x
