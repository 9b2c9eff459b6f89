"""Guidance terms for the sampling loop, and the fixed order in which they compose.

Conventions
-----------
* Time: ``t`` is the adapter's NATIVE timestep (DDPM index 0..999, or flow time in [0, 1]); ``t_unit`` is
  the same in unit time, 0 = clean, 1 = pure noise. Rewards always receive unit time.
* Noising: x_t = alpha_t x0 + sigma_t eps (VP: alpha = sqrt(abar), sigma = sqrt(1 - abar); rectified flow:
  alpha = 1 - t, sigma = t). ``adapter.noise_coefficients(t)`` gives (alpha, sigma).
* Predictions: 'epsilon' (eps), 'v_prediction' (v = alpha eps - sigma x0, VP) or 'flow_velocity'
  (v = eps - x0). Every term returns a prediction in the model's own parameterisation, so the scheduler
  step after the guidance stack is the model's ordinary step.

Composition order (fixed; ``GuidanceStack`` sorts the terms it is given into it)
------------------------------------------------------------------------------
    1. "cfg"      per network: p_net = CFG(cond_net, uncond_net)             (CFG, optionally rescaled)
    2. "combine"  across networks: p = combine({net: p_net})                 (RLG: lerp(base, aligned, w))
    3. "reward"   in list order: p = term(p, state)                          (Flow-NRG, clean-reward guidance)

This is the order DESIGN.md and the RLG/Flow-NRG papers prescribe: RLG mixes two CFG-guided predictions, and
reward guidance adjusts the final prediction once. Plain CFG and RLG are affine with weights summing to one, so
on their own they would commute; the order becomes observable with CFG rescale (non-linear per network) and
with where the reward term enters (applied before CFG to the conditional branch only it would be scaled by
the CFG scale, applied to one network before RLG by w) - tests/test_samplers.py checks the composed value
against a hand-written formula that would fail for those wrong orders.

Adding a method = one small class with a ``stage`` and ``__call__``; the sampling loop does not change.

Reward guidance and the score (derivation)
------------------------------------------
All reward guidance here means: add ``Delta = w * grad_{x_t} r`` to the score, i.e. sample from
p_t(x) exp(w r(x, t)) at every noise level. With score(x_t) = -eps_hat / sigma_t:

    eps' = eps - sigma * Delta                                       ('epsilon')
    v'   = v - (sigma / alpha) * Delta     (eps = alpha v + sigma x_t, alpha^2 + sigma^2 = 1)   ('v_prediction')
    v'   = v - (t / (1 - t)) * Delta       (eps = x_t + (1 - t) v, sigma = t, alpha = 1 - t)   ('flow_velocity')

The last line is Flow-NRG (VideoAlign): v_guided = v_cfg - w t/(1-t) grad r. The eps and flow forms agree:
a VP model rewritten in flow coordinates (x_f = x / (alpha + sigma), t_f = sigma / (alpha + sigma),
grad_f = (alpha + sigma) grad) gives eps' = eps - t_f grad_f w = eps - sigma w grad (tested). Sign: w > 0
moves samples towards HIGHER reward (the prediction moves AGAINST grad r because the samplers integrate from
noise towards data along -v / -eps).

Near pure noise the factor sigma / alpha (= t / (1 - t)) diverges. The clamp: the noise-to-signal ratio is
capped at ``t_max / (1 - t_max)`` (t_max in flow time, default 0.95 -> 19), i.e. the guidance on the score is
multiplied by min(1, cap / (sigma / alpha)); for eps models this gives min(sigma, alpha * cap).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow_velocity")
STAGES = ("cfg", "combine", "reward")


# ----------------------------------------------------------------------------------------------- math
def max_ratio(t_max: float) -> float:
    """Cap on the noise-to-signal ratio sigma/alpha for a flow-time clamp ``t_max`` in (0, 1): t_max/(1-t_max)."""
    if not 0.0 < t_max < 1.0:
        raise ValueError(f"t_max must lie in (0, 1), got {t_max}")
    return t_max / (1.0 - t_max)


def score_to_prediction_scale(prediction_type: str, alpha: torch.Tensor, sigma: torch.Tensor,
                              ratio_cap: float = float("inf")) -> torch.Tensor:
    """c [N] such that adding Delta to the score equals ``pred - c * Delta`` in ``prediction_type``.

    eps: c = sigma; v (VP): c = sigma/alpha; flow velocity: c = t/(1-t) = sigma/alpha. With ``ratio_cap`` the
    noise-to-signal ratio sigma/alpha is capped first (the t/(1-t) clamp), the same for every parameterisation.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; one of {PREDICTION_TYPES}")
    alpha, sigma = alpha.double(), sigma.double()
    # alpha = 0 (flow t = 1) gives inf, which the cap turns into the cap
    ratio = torch.where(alpha > 0, sigma / alpha.clamp(min=1e-300), torch.full_like(sigma, float("inf")))
    ratio = ratio.clamp(max=ratio_cap)
    c = alpha * ratio if prediction_type == "epsilon" else ratio
    return c.float()


def x0_from_prediction(prediction_type: str, x_t: torch.Tensor, pred: torch.Tensor, alpha: torch.Tensor,
                       sigma: torch.Tensor) -> torch.Tensor:
    """The model's clean estimate x0_hat; alpha/sigma are [N] and broadcast over the other dims (any rank)."""
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    if prediction_type == "epsilon":
        return (x_t - s * pred) / a
    if prediction_type == "v_prediction":  # v = a eps - s x0 and x_t = a x0 + s eps with a^2 + s^2 = 1
        return a * x_t - s * pred
    if prediction_type == "flow_velocity":  # v = eps - x0, x_t = (1 - t) x0 + t eps  =>  x0 = x_t - t v
        return x_t - s * pred
    raise ValueError(f"unknown prediction_type {prediction_type!r}; one of {PREDICTION_TYPES}")


def rescale_cfg(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023, diffusers' ``guidance_rescale``): match the per-sample std of the conditional
    prediction, mixed by ``rescale`` in [0, 1]. Non-linear, so it is where CFG-before-RLG becomes observable."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).view((-1,) + (1,) * (like.ndim - 1))


# ----------------------------------------------------------------------------------------------- state
@dataclass
class StepState:
    """What guidance terms may read at one sampling step (one batch).

    x:        the network's input x_t [N, ...] (for VE-style schedulers the scaled model input, i.e. VP x_t)
    t:        native timesteps [N];  t_unit: unit time [N] (0 clean, 1 noise)
    alpha, sigma: [N] float32, x_t = alpha x0 + sigma eps
    step, num_steps: index of this step (0 = the noisiest) and the total
    prompts:  the batch's prompts; fps: the video frame rate (None for images)
    """

    adapter: Any
    x: torch.Tensor
    t: torch.Tensor
    t_unit: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    step: int
    num_steps: int
    prompts: list[str]
    fps: float | None = None

    @property
    def prediction_type(self) -> str:
        return self.adapter.prediction_type


class GuidanceTerm:
    """Base class; ``stage`` is one of STAGES and fixes where the term acts (see the module docstring)."""

    stage: ClassVar[str]

    def describe(self) -> str:
        return type(self).__name__

    def settings(self) -> dict[str, Any]:
        """JSON-able settings for the sidecar."""
        return {}


# ----------------------------------------------------------------------------------------------- 1. cfg
class CFG(GuidanceTerm):
    """Classifier-free guidance: p = uncond + scale (cond - uncond), per network; optional CFG rescale.

    ``scale == 1`` is the plain conditional prediction and skips the unconditional pass (one forward).
    """

    stage = "cfg"

    def __init__(self, scale: float = 1.0, rescale: float = 0.0):
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"CFG rescale must lie in [0, 1], got {rescale}")
        self.scale, self.rescale = float(scale), float(rescale)

    @property
    def needs_uncond(self) -> bool:
        return self.scale != 1.0

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor | None, state: StepState) -> torch.Tensor:
        if uncond is None:
            return cond
        guided = uncond + self.scale * (cond - uncond)
        return rescale_cfg(guided, cond, self.rescale) if self.rescale > 0 else guided

    def describe(self) -> str:
        return f"CFG(scale={self.scale:g}" + (f", rescale={self.rescale:g})" if self.rescale else ")")

    def settings(self) -> dict[str, Any]:
        return {"scale": self.scale, "rescale": self.rescale}


# ----------------------------------------------------------------------------------------------- 2. combine
ScaleSchedule = Callable[[int, int], float]  # (step, num_steps) -> w; step 0 is the noisiest


class RLG(GuidanceTerm):
    """Reinforcement-learning guidance (Jin et al. 2025): p = p_base_cfg + w (p_aligned_cfg - p_base_cfg).

    Computed as ``torch.lerp(base, aligned, w)``, which returns ``base`` exactly at w = 0 and ``aligned`` exactly
    at w = 1 (so RLG at w = 1 is bit-identical to sampling the aligned model). w > 1 extrapolates (acts like
    dividing the fine-tune's KL coefficient by w). Valid for eps, v and flow-velocity predictions alike since
    the weights sum to one. ``scale`` is a number, or with ``end_scale`` a linear ramp from ``scale`` at the
    first step to ``end_scale`` at the last, or any callable (step, num_steps) -> w.
    """

    stage = "combine"
    networks: ClassVar[tuple[str, ...]] = ("base", "aligned")

    def __init__(self, scale: float | ScaleSchedule, end_scale: float | None = None):
        if callable(scale) and end_scale is not None:
            raise ValueError("give either a schedule callable or scale/end_scale, not both")
        self.scale, self.end_scale = scale, end_scale

    def weight(self, step: int, num_steps: int) -> float:
        if callable(self.scale):
            return float(self.scale(step, num_steps))
        if self.end_scale is None or num_steps <= 1:
            return float(self.scale)
        frac = step / (num_steps - 1)
        return float(self.scale) + (float(self.end_scale) - float(self.scale)) * frac

    def __call__(self, preds: dict[str, torch.Tensor], state: StepState) -> torch.Tensor:
        return torch.lerp(preds["base"], preds["aligned"], self.weight(state.step, state.num_steps))

    def describe(self) -> str:
        if callable(self.scale):
            return "RLG(w=schedule)"
        return f"RLG(w={self.scale:g}" + (f"->{self.end_scale:g})" if self.end_scale is not None else ")")

    def settings(self) -> dict[str, Any]:
        return {"scale": None if callable(self.scale) else self.scale, "end_scale": self.end_scale,
                "schedule": getattr(self.scale, "__name__", "callable") if callable(self.scale) else
                ("linear" if self.end_scale is not None else "constant")}


# ----------------------------------------------------------------------------------------------- 3. reward
def _check_weights(reward, weights: dict[str, float] | None) -> dict[str, float]:
    """The weights to use: the given ones, else the reward's own default weights (trained rewards carry them in
    their reward_config.json), else every dimension at 1."""
    from diffalign.rewards import RewardError

    weights = dict(weights or getattr(reward, "weights", None) or {d: 1.0 for d in reward.dimensions})
    unknown = sorted(set(weights) - set(reward.dimensions))
    if unknown:
        raise RewardError(f"reward '{reward.name}' has dimensions {list(reward.dimensions)}; "
                          f"weights name unknown dimension(s) {unknown}")
    return weights


def _scores(reward, inputs: torch.Tensor, prompts: list[str], **kw) -> dict[str, torch.Tensor]:
    """reward(...) per dimension, validation-normalised when the reward carries a Normalizer (trained rewards):
    (raw - mean)/std, so per-dimension weights compare like with like (only 1/std matters for the gradient).
    Prompts are always passed; prompt-free rewards ignore them."""
    scores = reward(inputs, prompts, **kw)
    normalizer = getattr(reward, "normalizer", None)
    return normalizer(scores) if normalizer is not None else scores


def _reward_gradient(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """grad_x sum_i r_i(x) (per-sample gradients, since sample i's reward depends only on x_i), float32."""
    x = x.detach().float().requires_grad_(True)
    with torch.enable_grad():
        r = fn(x)
        if not r.requires_grad:
            raise RuntimeError("the reward is not differentiable with respect to its input (did it run under no_grad "
                               "or detach?); reward guidance needs a differentiable reward")
        (grad,) = torch.autograd.grad(r.sum(), x)
    return grad


class NoisyRewardGuidance(GuidanceTerm):
    """Flow-NRG (VideoAlign) and its eps/v equivalent: a NOISE-AWARE latent reward guides every step.

        r(x_t, t) = sum_k w_k r_k(x_t, t_unit)                      (per-dimension weights, weighted_overall)
        flow:  v'   = v   - scale * c(t) * grad_{x_t} r,  c = t/(1-t) capped at t_max/(1-t_max)
        eps:   eps' = eps - scale * c(t) * grad_{x_t} r,  c = sigma  (min(sigma, alpha * cap))
        v:     v'   = v   - scale * c(t) * grad_{x_t} r,  c = sigma/alpha capped

    (derivation and sign in the module docstring: scale > 0 raises the reward, scale < 0 lowers it).
    ``reward`` must have input_kind 'latent' and be differentiable: it is called as
    ``reward(x_t, prompts, t=t_unit)`` on the network's input latents (any rank, images or video). A reward that
    carries a ``normalizer`` / default ``weights`` (trained rewards) has them honoured (see _scores/_check_weights).
    """

    stage = "reward"

    def __init__(self, reward, weights: dict[str, float] | None = None, scale: float = 1.0, t_max: float = 0.95):
        from diffalign.rewards import RewardError

        if reward.input_kind != "latent":
            raise RewardError(f"noisy reward guidance needs a noise-aware latent reward (input kind 'latent'); "
                              f"'{reward.name}' scores {reward.input_kind}s. Use clean-reward guidance "
                              f"(--clean-reward) for image/video rewards.")
        if not reward.differentiable:
            raise RewardError(f"reward '{reward.name}' is not differentiable; reward guidance needs gradients")
        self.reward, self.weights, self.scale = reward, _check_weights(reward, weights), float(scale)
        self.t_max, self.ratio_cap = float(t_max), max_ratio(t_max)

    def __call__(self, pred: torch.Tensor, state: StepState) -> torch.Tensor:
        from diffalign.rewards import weighted_overall

        if self.scale == 0.0:
            return pred
        grad = _reward_gradient(lambda x: weighted_overall(
            _scores(self.reward, x, state.prompts, t=state.t_unit.to(x.device)), self.weights), state.x)
        c = score_to_prediction_scale(state.prediction_type, state.alpha, state.sigma, self.ratio_cap)
        return pred - self.scale * _bcast(c, pred) * grad.to(pred.dtype)

    def describe(self) -> str:
        w = ",".join(f"{k}={v:g}" for k, v in self.weights.items())
        return f"NRG({self.reward.name}: {w}; scale={self.scale:g}, t_max={self.t_max:g})"

    def settings(self) -> dict[str, Any]:
        return {"reward": self.reward.name, "weights": self.weights, "scale": self.scale, "t_max": self.t_max}


class CleanRewardGuidance(GuidanceTerm):
    """Clean-reward guidance through the x0 estimate: any differentiable image (or video) reward.

        x0_hat = x0_from_prediction(pred);  pixels = VAE.decode(x0_hat)
        grad_{x_t} r ~= (1/alpha) grad_{x0_hat} r(pixels)     (eps held fixed: the network Jacobian is dropped)
        pred' = pred - scale * c(t) * grad_{x_t} r           (same score relation and clamp as NRG)

    WEAKER than noise-aware guidance (VideoAlign Table 7): early on x0_hat is a blurry average, the decoded
    image is off the reward model's training distribution, and dropping the network Jacobian makes the
    gradient only approximate. It also costs a VAE decode and backward per step. 1/alpha uses alpha clamped to
    at least 1/(1 + cap), the same t_max clamp as the ratio.
    """

    stage = "reward"

    def __init__(self, reward, weights: dict[str, float] | None = None, scale: float = 1.0, t_max: float = 0.95):
        from diffalign.rewards import RewardError

        if reward.input_kind not in ("image", "video"):
            raise RewardError(f"clean-reward guidance scores decoded pixels; '{reward.name}' takes {reward.input_kind}s "
                              f"(latent rewards go to noisy reward guidance, --nrg-reward)")
        if not reward.differentiable:
            raise RewardError(f"reward '{reward.name}' is not differentiable; clean-reward guidance needs gradients")
        self.reward, self.weights, self.scale = reward, _check_weights(reward, weights), float(scale)
        self.t_max, self.ratio_cap = float(t_max), max_ratio(t_max)

    def __call__(self, pred: torch.Tensor, state: StepState) -> torch.Tensor:
        from diffalign.rewards import weighted_overall

        if self.scale == 0.0:
            return pred
        x0 = x0_from_prediction(state.prediction_type, state.x.float(), pred.float(), state.alpha, state.sigma)
        kw = {"fps": [state.fps] * len(x0)} if self.reward.input_kind == "video" else {}
        grad_x0 = _reward_gradient(lambda z: weighted_overall(
            _scores(self.reward, state.adapter.decode_latents(z), state.prompts, **kw), self.weights), x0)
        inv_alpha = 1.0 / state.alpha.clamp(min=1.0 / (1.0 + self.ratio_cap))
        c = score_to_prediction_scale(state.prediction_type, state.alpha, state.sigma, self.ratio_cap) * inv_alpha
        return pred - self.scale * _bcast(c, pred) * grad_x0.to(pred.dtype)

    def describe(self) -> str:
        w = ",".join(f"{k}={v:g}" for k, v in self.weights.items())
        return f"clean-reward({self.reward.name}: {w}; scale={self.scale:g})"

    def settings(self) -> dict[str, Any]:
        return {"reward": self.reward.name, "weights": self.weights, "scale": self.scale, "t_max": self.t_max}


# ----------------------------------------------------------------------------------------------- the stack
# evaluate(network_name, with_uncond) -> (cond [N, ...], uncond [N, ...] or None): the loop's network call
Evaluate = Callable[[str, bool], tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass
class GuidanceStack:
    """Terms in the fixed stage order cfg -> combine -> reward, whatever order they were given in.

    At most one "cfg" term (default: CFG(1.0), the plain conditional prediction) and at most one "combine"
    term (default: a single network called "model"); any number of "reward" terms, applied in the given order.
    """

    terms: Sequence[GuidanceTerm] = field(default_factory=list)

    def __post_init__(self) -> None:
        for term in self.terms:
            if getattr(term, "stage", None) not in STAGES:
                raise ValueError(f"{term!r} has no valid stage (one of {STAGES})")
        by_stage = {s: [t for t in self.terms if t.stage == s] for s in STAGES}
        for s in ("cfg", "combine"):
            if len(by_stage[s]) > 1:
                raise ValueError(f"at most one '{s}' guidance term, got {[t.describe() for t in by_stage[s]]}")
        self.cfg: GuidanceTerm = by_stage["cfg"][0] if by_stage["cfg"] else CFG(1.0)
        self.combine: GuidanceTerm | None = by_stage["combine"][0] if by_stage["combine"] else None
        self.reward_terms: list[GuidanceTerm] = by_stage["reward"]
        self.terms = [self.cfg] + ([self.combine] if self.combine else []) + self.reward_terms

    @property
    def networks(self) -> tuple[str, ...]:
        """Names of the networks the loop must provide ("model", or e.g. ("base", "aligned") for RLG)."""
        return tuple(self.combine.networks) if self.combine is not None else ("model",)

    def __call__(self, evaluate: Evaluate, state: StepState) -> torch.Tensor:
        per_network = {}
        for name in self.networks:                                    # 1. CFG, per network
            cond, uncond = evaluate(name, self.cfg.needs_uncond)
            per_network[name] = self.cfg(cond, uncond, state)
        pred = self.combine(per_network, state) if self.combine is not None else per_network["model"]  # 2. RLG
        for term in self.reward_terms:                                # 3. reward guidance
            pred = term(pred, state)
        return pred

    def describe(self) -> str:
        return " -> ".join(t.describe() for t in self.terms)

    def settings(self) -> list[dict[str, Any]]:
        return [{"term": type(t).__name__, "stage": t.stage, **t.settings()} for t in self.terms]
