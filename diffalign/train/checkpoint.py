"""Resumable checkpoints, written atomically: a temporary folder renamed into place, keep-last-K.

A checkpoint holds only what training changes: the trainable weights (LoRA or full), optimizer,
LR scheduler, grad scaler and EMA state, the step counter, and the state of a pair provider
(diffalign.train.online: SePPO's snapshot pool, the online reference) as safetensors files that the
provider writes through ``extra_writer`` and reads back itself on resume. Frozen base weights are never copied
(users' top complaint about "LoRA" checkpoints of several GB). Randomness needs no state: it is a
pure function of (seed, step, rank), see train.randomness.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (trainer_state.json present), oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = re.fullmatch(rf"{PREFIX}(\d+)", p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(output_dir: str | Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    scheduler_state: dict, state: dict[str, Any], ema_state: dict | None = None,
                    scaler_state: dict | None = None, keep: int = 3, extra_writer=None) -> Path:
    """Write checkpoint-<step> atomically and prune to the newest ``keep``. Call on the main process only.

    ``extra_writer(folder)`` may add files (e.g. the diffusers-format LoRA) before the rename.
    """
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler_state, tmp / "scheduler.pt")
    if ema_state is not None:
        torch.save(ema_state, tmp / "ema.pt")
    if scaler_state is not None:
        torch.save(scaler_state, tmp / "scaler.pt")
    if extra_writer is not None:
        extra_writer(tmp)
    # trainer_state.json last: its presence marks the folder complete
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Everything save_checkpoint wrote; tensors via safetensors / torch.load(weights_only=True), never pickle."""
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    out: dict[str, Any] = {
        "state": json.loads((path / "trainer_state.json").read_text()),
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
    }
    for name in ("ema", "scaler"):
        f = path / f"{name}.pt"
        out[name] = torch.load(f, weights_only=True) if f.is_file() else None
    return out
