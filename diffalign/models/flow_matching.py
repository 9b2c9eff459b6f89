"""Rectified-flow noising shared by SD3, FLUX and Wan-class models.

x_t = (1 - t) x0 + t ε with t in [0, 1] (t = 1 is pure noise); the network predicts the velocity
v = ε - x0. Identity used in tests: ε - ε̂ = (1 - t)(v - v̂), so err_ε = (1 - t)² err_v.
"""
from __future__ import annotations

import torch


def scheduler_shift(sched) -> float:
    """The static flow shift s of a scheduler config (dict-like), as the pipelines apply it at inference.

    FlowMatchEulerDiscreteScheduler stores it as ``shift``; the multistep solvers Wan checkpoints ship with
    (UniPCMultistepScheduler / DPMSolverMultistepScheduler with ``use_flow_sigmas``) as ``flow_shift``.
    Dynamic (resolution-dependent) shifting is an inference-time choice: training then stays unshifted (1.0).
    """
    if sched.get("use_dynamic_shifting", False):
        return 1.0
    if "shift" in sched:
        return float(sched["shift"])
    if sched.get("use_flow_sigmas", False):
        return float(sched.get("flow_shift", 1.0))
    return 1.0


class FlowMatchingMixin:
    prediction_type = "flow_velocity"

    def _init_noising(self) -> None:
        if self.cfg.flow_shift is not None:
            self.flow_shift = float(self.cfg.flow_shift)
        else:
            self.flow_shift = scheduler_shift(self.pipe.scheduler.config)

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Logit-normal(m, s) or uniform t in (0, 1), then the shift t' = s t / (1 + (s-1) t)."""
        if self.cfg.timestep_sampling == "logit_normal":
            u = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * torch.randn(n, generator=generator))
        else:
            u = torch.rand(n, generator=generator)
        s = self.flow_shift
        return s * u / (1 + (s - 1) * u)

    @staticmethod
    def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.device, like.dtype).view((-1,) + (1,) * (like.ndim - 1))

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = self._bcast(t, x0)
        return (1 - tt) * x0 + tt * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps - x0

    def unit_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def noise_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) = (1 - t, t), [N] float32."""
        t = torch.as_tensor(t).float().reshape(-1)
        return 1 - t, t
