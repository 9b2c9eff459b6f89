"""Pair providers: components that fill a training step's pairs with latents SAMPLED during training.

The loop (diffalign.train.loop) stays the DPO loop; a provider only changes two things per micro-step:

    x0_w, x0_l, metrics = provider.pairs(trainer, x0_w, text, captions, gen)   which latents form the pair
    with provider.reference(model): ...                                       which weights are the reference

and gets ``provider.after_step(step)`` after every optimizer step (snapshots, refreshes).

Provider state is part of every checkpoint: ``provider.save_state(folder)`` writes it (safetensors, the tensors plus
the steps they were taken at) next to the trainable weights, and a provider built for a resumed run
(``trainer.resumed_from``) reads it back, so a resumed run draws from the same pool / refers to the same refreshed
reference as the uninterrupted run would have (:data:`POOL_FILE`, :data:`ONLINE_REFERENCE_FILE`).

* :class:`SePPOProvider` (objective.name=seppo): keeps a :class:`SnapshotPool` of past LoRA weights (one
  every ``seppo_snapshot_every`` updates, the last ``seppo_pool_size`` kept, the initial weights first). Each
  micro-step draws one snapshot uniformly (from the step's seeded generator, so a run is reproducible), loads
  it into the policy network, samples the LOSER for each winner's prompt with it, and the same snapshot is the
  DPO reference for the errors.
* :class:`OnlinePairsProvider` (online.enabled): samples K latents per prompt from the reference (the base
  model = adapters disabled, or the last refreshed LoRA snapshot), scores the decoded images with a reward,
  and pairs reward-best (winner) vs reward-worst (loser). No VAE encode: the sampler gives latents.

Weights are swapped IN PLACE on the policy network (no second network in memory) and always restored,
also on error; the swaps run under ``no_grad`` before the policy forward, so autograd never sees them.
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from diffalign.config import ConfigError, RunConfig

logger = logging.getLogger(__name__)

Snapshot = dict[str, torch.Tensor]

# checkpoint files written by the providers (inside checkpoints/checkpoint-N/)
POOL_FILE = "seppo_pool.safetensors"  # SePPO: every pooled snapshot as "snapshot.<i>.<param>", steps in the metadata
ONLINE_REFERENCE_FILE = "online_reference.safetensors"  # online pairs: the last refreshed reference LoRA
_POOL_FORMAT = "diffalign-seppo-pool-v1"


def save_snapshot_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors file of CPU copies of ``tensors`` (contiguous, dtype kept) with string ``metadata``."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_snapshot_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, metadata) of a file written by :func:`save_snapshot_file`; no pickle involved."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _fit(snapshot: dict[str, torch.Tensor], params: dict[str, torch.Tensor], where: str) -> Snapshot:
    """``snapshot`` moved to each parameter's device and dtype; RuntimeError if the names differ (another LoRA)."""
    missing, unexpected = set(params) - set(snapshot), set(snapshot) - set(params)
    if missing or unexpected:
        raise RuntimeError(f"{where} does not fit this model's LoRA (missing {sorted(missing)[:3]}, unexpected "
                           f"{sorted(unexpected)[:3]}): was it written with another lora/model config? "
                           "Use train.resume=none or another train.output_dir.")
    return {n: snapshot[n].to(device=p.device, dtype=p.dtype) for n, p in params.items()}


# ----------------------------------------------------------------------------------------------- LoRA weights
def lora_params(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    """The named trainable (LoRA) parameters of ``model`` (unwrapped), in ``names`` order."""
    named = dict(model.named_parameters())
    return {n: named[n] for n in names}


def capture(params: dict[str, torch.Tensor]) -> Snapshot:
    """A detached copy of each tensor (same device and dtype): the LoRA is small, K copies are cheap."""
    return {n: p.detach().clone() for n, p in params.items()}


@contextlib.contextmanager
def loaded(params: dict[str, nn.Parameter], snapshot: Snapshot) -> Iterator[None]:
    """Copy ``snapshot`` into ``params`` for the block, then restore the live values (also on error)."""
    live = capture(params)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(snapshot[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(live[n])


class SnapshotPool:
    """The last ``size`` snapshots, one taken every ``every`` optimizer steps (step 0 = the initial weights)."""

    def __init__(self, size: int, every: int):
        if size < 1 or every < 1:
            raise ValueError(f"pool size and snapshot interval must be >= 1, got {size}, {every}")
        self.every = every
        self.entries: deque[tuple[int, Snapshot]] = deque(maxlen=size)  # (step taken, weights), oldest first

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def steps(self) -> list[int]:
        """The optimizer step each kept snapshot was taken at, oldest first."""
        return [s for s, _ in self.entries]

    def add(self, step: int, params: dict[str, torch.Tensor]) -> None:
        """Snapshot ``params`` now (the oldest snapshot drops out when the pool is full)."""
        self.entries.append((step, capture(params)))

    def maybe_add(self, step: int, params: dict[str, torch.Tensor]) -> bool:
        """Snapshot ``params`` if ``step`` is a multiple of ``every``; True when one was taken."""
        if step % self.every:
            return False
        self.add(step, params)
        return True

    def draw(self, gen: torch.Generator) -> int:
        """Index of a uniformly drawn snapshot (one ``randint`` from ``gen``)."""
        if not self.entries:
            raise RuntimeError("the SePPO reference pool is empty (no snapshot taken yet)")
        return int(torch.randint(len(self.entries), (1,), generator=gen))

    def __getitem__(self, i: int) -> Snapshot:
        return self.entries[i][1]

    def save(self, path: str | Path) -> None:
        """Write every snapshot to one safetensors file: tensor ``snapshot.<i>.<param name>`` (i = 0 the oldest),
        metadata ``steps`` (JSON list, the step each was taken at), ``every`` and ``size``."""
        tensors = {f"snapshot.{i}.{n}": t for i, (_, snap) in enumerate(self.entries) for n, t in snap.items()}
        save_snapshot_file(path, tensors, {"format": _POOL_FORMAT, "steps": json.dumps(self.steps),
                                           "every": str(self.every), "size": str(self.entries.maxlen)})

    def load(self, path: str | Path, params: dict[str, torch.Tensor]) -> None:
        """Replace the pool by the snapshots in ``path`` (written by :meth:`save`), each moved to the device and
        dtype of ``params`` (the live LoRA parameters, whose names the file must hold exactly). A pool saved with
        more entries than this pool's size keeps its newest ``size`` (the deque drops the oldest)."""
        tensors, meta = load_snapshot_file(path)
        if meta.get("format") != _POOL_FORMAT:
            raise RuntimeError(f"{path}: not a SePPO pool file (format {meta.get('format')!r}, want {_POOL_FORMAT!r})")
        steps = [int(s) for s in json.loads(meta["steps"])]
        snaps: list[dict[str, torch.Tensor]] = [{} for _ in steps]
        for key, t in tensors.items():
            _, i, name = key.split(".", 2)  # "snapshot.<i>.<param name with dots>"
            snaps[int(i)][name] = t
        self.entries.clear()
        for i, (step, snap) in enumerate(zip(steps, snaps)):
            self.entries.append((step, _fit(snap, params, f"{path} (snapshot {i}, step {step})")))


# ----------------------------------------------------------------------------------------------- sampling
def sample_latents(adapter, model: nn.Module, text: dict[str, torch.Tensor], latent_shape: Sequence[int],
                   seeds: Sequence[int], *, steps: int, guidance_scale: float = 1.0, scheduler: str = "auto",
                   uncond_text: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Latents [N, *latent_shape] (float32, the training latent space) drawn from ``model`` AS IT IS (adapters
    and weights as the caller set them) through diffalign.samplers' loop; sample i uses seeds[i]."""
    from diffalign.samplers.guidance import CFG, GuidanceStack
    from diffalign.samplers.loop import Network, build_stepper, denoise, initial_noise, make_generators

    n = len(seeds)
    stepper = build_stepper(adapter, scheduler, steps, latent_shape, device=adapter.device)
    generators = make_generators(seeds)
    x = initial_noise(latent_shape, generators, stepper.init_noise_sigma, adapter.device)
    guidance = GuidanceStack([CFG(guidance_scale)])
    if guidance.cfg.needs_uncond and uncond_text is None:
        raise ValueError("guidance_scale != 1 needs the unconditional conditioning (uncond_text)")
    with torch.no_grad():
        return denoise(adapter, guidance, {"model": Network(model)}, stepper, x, text, uncond_text, [""] * n,
                       generators)


def draw_seeds(gen: torch.Generator, n: int) -> list[int]:
    """n sampling seeds from the micro-step's generator (so a resumed step samples the same latents)."""
    return [int(s) for s in torch.randint(0, 2**62, (n,), generator=gen)]


def best_worst(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(best [B], worst [B]) column indices of ``rewards`` [B, K]; ties: the first occurrence."""
    return rewards.argmax(dim=1), rewards.argmin(dim=1)


def select_pairs(latents: torch.Tensor, rewards: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reward-best vs reward-worst of each prompt's k samples.

    ``latents`` [B*k, ...] and ``rewards`` [B*k] in prompt-major order (row i = prompt i // k). Returns
    (x_w [B, ...], x_l [B, ...], r_w [B], r_l [B]); r_w >= r_l always (equal only if all k rewards tie).
    """
    if latents.shape[0] != rewards.shape[0] or rewards.shape[0] % k:
        raise ValueError(f"{latents.shape[0]} latents / {rewards.shape[0]} rewards is not B x k={k}")
    r = rewards.reshape(-1, k)
    best, worst = best_worst(r)
    rows = torch.arange(r.shape[0], device=r.device) * k
    return latents[rows + best], latents[rows + worst], r.gather(1, best[:, None])[:, 0], r.gather(1, worst[:, None])[:, 0]


# ----------------------------------------------------------------------------------------------- providers
class _Provider:
    """Shared plumbing: the trainer's unwrapped policy network, its LoRA parameters, sampling settings."""

    def __init__(self, trainer):
        self.cfg: RunConfig = trainer.cfg
        self.adapter = trainer.adapter
        self.model: nn.Module = trainer.accelerator.unwrap_model(trainer.model)
        self.params = lora_params(self.model, trainer.trainable_names)
        self.empty_text = trainer.empty_text  # cached data: the empty prompt's conditioning ([1, ...] per key)

    def _uncond(self, n: int) -> dict[str, torch.Tensor] | None:
        if self.cfg.online.guidance_scale == 1.0:
            return None
        if self.empty_text is not None:
            return {k: v.expand((n,) + tuple(v.shape[1:])) for k, v in self.empty_text.items()}
        return self.adapter.encode_negative_prompts(None, n)

    def _sample(self, text: dict[str, torch.Tensor], latent_shape: Sequence[int], seeds: list[int]) -> torch.Tensor:
        o = self.cfg.online
        return sample_latents(self.adapter, self.model, text, latent_shape, seeds, steps=o.steps,
                              guidance_scale=o.guidance_scale, scheduler=o.scheduler, uncond_text=self._uncond(len(seeds)))

    def after_step(self, step: int) -> None:  # pragma: no cover - overridden
        pass

    def save_state(self, folder: Path) -> None:
        """Write what a resumed run needs into the checkpoint ``folder`` (nothing by default)."""


class SePPOProvider(_Provider):
    """SePPO: loser = the drawn pool snapshot's sample for the winner's prompt; reference = that snapshot."""

    def __init__(self, trainer):
        super().__init__(trainer)
        o = self.cfg.objective
        self.pool = SnapshotPool(o.seppo_pool_size, o.seppo_snapshot_every)
        resumed = getattr(trainer, "resumed_from", None)
        if resumed is not None and (Path(resumed) / POOL_FILE).is_file():
            # the pool as it was when the checkpoint was written (snapshots and their steps): the resumed run draws
            # its references from exactly the snapshots the uninterrupted run would have drawn from
            self.pool.load(Path(resumed) / POOL_FILE, self.params)
        else:
            if resumed is not None:  # a checkpoint written before pools were saved: the best we can do
                logger.warning("%s has no %s (written by an older diffalign): the SePPO pool restarts from the "
                               "resumed weights", resumed, POOL_FILE)
            self.pool.add(trainer.step, self.params)  # the weights training starts from (LoRA B = 0: the base)
        self.current: int | None = None

    def pairs(self, trainer, x0_w: torch.Tensor, text: dict[str, torch.Tensor], captions: list[str] | None,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        self.current = self.pool.draw(gen)
        seeds = draw_seeds(gen, x0_w.shape[0])
        with loaded(self.params, self.pool[self.current]):
            x0_l = self._sample(text, tuple(x0_w.shape[1:]), seeds).to(x0_w.dtype)
        return x0_w, x0_l, {"pool_size": float(len(self.pool)),
                            "ref_age": float(trainer.step - self.pool.steps[self.current])}

    def reference(self, model: nn.Module):
        if self.current is None:
            raise RuntimeError("SePPO reference asked for before pairs() drew one")
        return loaded(self.params, self.pool[self.current])

    def after_step(self, step: int) -> None:
        self.pool.maybe_add(step, self.params)

    def save_state(self, folder: Path) -> None:
        self.pool.save(Path(folder) / POOL_FILE)


class OnlinePairsProvider(_Provider):
    """Online best-vs-worst pairs from the reference's own samples, scored by a reward."""

    def __init__(self, trainer, reward=None):
        super().__init__(trainer)
        from diffalign.rewards import build_reward

        o = self.cfg.online
        self.reward = (reward if reward is not None else build_reward(o.reward, self.adapter.device)).to(self.adapter.device)
        dims = tuple(self.reward.dimensions)
        if o.reward_weights is not None:
            unknown = sorted(set(o.reward_weights) - set(dims))
            if unknown:
                raise ConfigError(f"online.reward_weights names {unknown}; reward {o.reward!r} has {list(dims)}")
            self.weights = dict(o.reward_weights)
        else:  # a reward with an 'overall' dimension already combines the others (the world oracle)
            self.weights = {"overall": 1.0} if "overall" in dims else {d: 1.0 for d in dims}
        self.snapshot: dict[str, torch.Tensor] | None = None  # None = the base model (adapters disabled)
        resumed = getattr(trainer, "resumed_from", None)
        if resumed is not None and (Path(resumed) / ONLINE_REFERENCE_FILE).is_file():
            # the reference last refreshed before the checkpoint (not the resumed weights, unless they coincide)
            tensors, _ = load_snapshot_file(Path(resumed) / ONLINE_REFERENCE_FILE)
            self.snapshot = _fit(tensors, self.params, str(Path(resumed) / ONLINE_REFERENCE_FILE))

    def scalar_reward(self, latents: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """[N] weighted reward of the decoded latents (float32, on the CPU)."""
        with torch.no_grad():
            pixels = self.adapter.decode_latents(latents.to(self.adapter.device))
            scores = self.reward(pixels, prompts)
        return sum(w * scores[d].float().cpu() for d, w in self.weights.items())

    def pairs(self, trainer, x0_w: torch.Tensor, text: dict[str, torch.Tensor], captions: list[str] | None,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        k, b = self.cfg.online.num_samples, x0_w.shape[0]
        if captions is None and getattr(self.reward, "needs_prompt", False):
            raise ConfigError(f"online.reward={self.cfg.online.reward!r} scores image-text agreement, but the batches "
                              f"carry no captions: the latent cache {self.cfg.cache.dir!r} was built before caches "
                              "stored them. Rebuild it (diffalign cache CONFIG cache.dir=NEW_DIR) or train without it.")
        text_k = {key: v.repeat_interleave(k, dim=0) for key, v in text.items()}  # prompt-major, like Sampler
        prompts = [c for c in captions for _ in range(k)] if captions is not None else None
        seeds = draw_seeds(gen, b * k)
        with self.reference(self.model):
            latents = self._sample(text_k, tuple(x0_w.shape[1:]), seeds)
        rewards = self.scalar_reward(latents, prompts)
        x_w, x_l, r_w, r_l = select_pairs(latents, rewards.to(latents.device), k)
        return x_w.to(x0_w.dtype), x_l.to(x0_w.dtype), {
            "online_reward_best": r_w.mean().item(), "online_reward_worst": r_l.mean().item(),
            "online_reward_mean": rewards.mean().item(), "online_tied": (r_w == r_l).float().mean().item()}

    def reference(self, model: nn.Module):
        if self.snapshot is None:
            from diffalign.train.loop import adapters_disabled

            return adapters_disabled(model)
        return loaded(self.params, self.snapshot)

    def after_step(self, step: int) -> None:
        every = self.cfg.online.refresh_every
        if every and step % every == 0:
            self.snapshot = capture(self.params)

    def save_state(self, folder: Path) -> None:
        if self.snapshot is not None:  # no file = the base model is the reference
            save_snapshot_file(Path(folder) / ONLINE_REFERENCE_FILE, self.snapshot, {"format": "diffalign-online-reference-v1"})


def build_provider(trainer):
    """The trainer's pair provider for its config, or None (pairs come from the data, reference = base)."""
    if trainer.objective.generates_losers:
        return SePPOProvider(trainer)
    if trainer.cfg.online.enabled:
        return OnlinePairsProvider(trainer)
    return None
