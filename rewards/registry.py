"""Reward names -> factories, so the CLI, samplers and objectives build rewards from one short string.

A spec is ``NAME`` (the scorer's default checkpoint, e.g. the official hub id), ``NAME:PATH_OR_ID``
(the same scorer from a local file/folder or another hub id), or the path of a folder written by
``diffalign train-reward`` (it holds reward_config.json and names its own kind).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .base import Reward, RewardError

# modules whose import registers rewards; imported lazily so `diffalign --help` stays fast
_PROVIDERS = ("diffalign.rewards.weightfree", "diffalign.rewards.clip_family", "diffalign.rewards.world",
              "diffalign.rewards.trained")


@dataclass(frozen=True)
class RewardEntry:
    name: str
    factory: Callable[[str | None, torch.device], Reward]  # (checkpoint or None, device) -> Reward
    dimensions: tuple[str, ...]
    input_kind: str
    help: str


_REGISTRY: dict[str, RewardEntry] = {}


def register(name: str, *, dimensions: tuple[str, ...], input_kind: str, help: str):
    """Decorator for a factory ``f(checkpoint: str | None, device) -> Reward``."""
    def wrap(factory):
        _REGISTRY[name] = RewardEntry(name, factory, tuple(dimensions), input_kind, help)
        return factory
    return wrap


def _load_providers() -> None:
    for module in _PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a provider that exists but fails to import is a real error
                raise


def available() -> dict[str, RewardEntry]:
    _load_providers()
    return dict(sorted(_REGISTRY.items()))


def build_reward(spec: str, device: torch.device | str = "cpu") -> Reward:
    """Build a reward from ``NAME``, ``NAME:PATH_OR_ID`` or a train-reward output folder."""
    device = torch.device(device)
    path = Path(spec)
    if spec.startswith("world:"):  # a reward bundled with the embedded world, e.g. world:reward
        from diffalign.world.demo import BUNDLED

        bundled = BUNDLED / spec[len("world:"):]
        path = bundled if (bundled / "reward_config.json").is_file() else path
    if path.is_dir() and (path / "reward_config.json").is_file():
        try:
            from diffalign.rewards.trained import load_trained_reward
        except ModuleNotFoundError as e:
            if e.name != "diffalign.rewards.trained":
                raise
            raise RewardError(f"{path} is a train-reward folder, but this diffalign has no trained-reward loader "
                              "(diffalign.rewards.trained) yet") from None
        return load_trained_reward(path, device)
    name, _, checkpoint = spec.partition(":")
    entries = available()
    if name not in entries:
        import difflib

        close = difflib.get_close_matches(name, list(entries), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RewardError(f"unknown reward '{name}'.{hint} `diffalign score --list` lists them: {', '.join(entries)}")
    return entries[name].factory(checkpoint or None, device)
