"""diffalign.samplers: one sampling loop for every family, composable guidance, media output.

    from diffalign.samplers import sample
    result = sample(model="tiny:sd15", prompts=["a red circle"], lora="runs/x/lora", rlg=1.5, out="samples/")

* ``loop``     the sampling loop (adapters + a stepper: diffusers scheduler for eps/v, Euler ODE/SDE for flow)
* ``guidance`` CFG -> RLG -> reward guidance (Flow-NRG and its eps/v form, clean-reward guidance), fixed order
* ``media``    PNG per sample / MP4-GIF per video, grid.png, samples.json sidecar
* ``api``      SampleConfig (every CLI option), Sampler, sample(); ``cli`` is `diffalign sample`

Names are imported lazily so that `diffalign --help` (which imports ``diffalign.samplers.cli``) stays light.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "SampleConfig": "api", "SampleResult": "api", "Sampler": "api", "sample": "api",
    "CFG": "guidance", "RLG": "guidance", "CleanRewardGuidance": "guidance", "GuidanceStack": "guidance",
    "GuidanceTerm": "guidance", "NoisyRewardGuidance": "guidance", "StepState": "guidance",
    "Network": "loop", "build_stepper": "loop", "denoise": "loop",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"diffalign.samplers.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'diffalign.samplers' has no attribute {name!r}")
