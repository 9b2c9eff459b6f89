"""The one latent training loop every objective plugs into.

Per optimizer step (per micro-step when accumulating):
    1. a batch of preference pairs, as latents from the cache or encoded on the fly; with a pair provider
       (diffalign.train.online: SePPO, online best-vs-worst pairs) sampled latents replace the loser (or
       both images) and the provider's weights (a LoRA snapshot) are the reference;
    2. ONE shared (t, ε) per pair, one reference forward over [winners; losers] (2B rows, no grad;
       LoRA: the same network with adapters disabled) and ONE policy forward over the same rows; an
       objective that declares needs_reference=False (sft, rwr, mapo) gets no reference forward at all,
       one with uses_losers=False (sft) only the B winner rows;
    3. per-sample mean squared errors (+ the pairs' reward scores, when the data carries them)
       -> objective(PairErrors) -> (loss, metrics);
    4. NaN/inf guard (agreed across ranks), backward, clip, step, EMA, log, checkpoint.

Unpaired data (diffalign.data.unpaired: single images labelled desirable / undesirable, for Diffusion-KTO) runs
through the same loop; only steps 1-3 read a batch of B labelled images instead of B pairs: B rows, each with its
OWN (t, ε), one reference and one policy forward over them, -> objective.sample_fn(SampleErrors). The kind of data
(pairs / unpaired) is known before the model loads, and an objective without a sample_fn refuses unpaired data.

The loop never branches on the model family: that lives in the adapter (diffalign.models).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffalign.config import ConfigError, RunConfig, config_to_dict, dump_config
from diffalign.models.base import DTYPES
from diffalign.objectives import PairErrors, SampleErrors, get_objective
from diffalign.train import checkpoint as ckpt
from diffalign.train.optim import build_lr_scheduler, build_optimizer
from diffalign.train.randomness import PairBatchSampler, mix_seed, step_generator


@dataclass
class TrainResult:
    output_dir: Path
    export_path: Path
    steps: int
    final_metrics: dict[str, float]
    data_counts: dict[str, Any]
    nonfinite_steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    rank_checksums: list[float] = field(default_factory=list)  # one per process; equal unless ranks diverged


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dim, in float32: shape [N]."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """LoRA reference: the same weights with the adapters switched off, restored even on error."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


def _flat_config(cfg: RunConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, values in config_to_dict(cfg).items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
        else:
            flat[section] = values
    return flat


class Trainer:
    """Sets up model, reference, data, optimizer and accelerate from a RunConfig, then trains."""

    def __init__(self, cfg: RunConfig, accelerator=None, show_progress: bool = True):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.cfg = cfg
        self.out = cfg.output_dir
        self.show_progress = show_progress
        log_with = None if cfg.train.log_with == "none" else cfg.train.log_with
        self.accelerator = accelerator or Accelerator(
            mixed_precision=cfg.train.mixed_precision, log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        self.objective = get_objective(cfg.objective.name)
        if self.objective.needs_scores and cfg.data.score_column is None:  # before any model is loaded
            raise ConfigError(f"objective.name={cfg.objective.name} needs a reward score per image: set data.score_column "
                              "(e.g. data.score_column=score for the world's pairs parquet, which has score_0/score_1 "
                              "oracle scores; or 'col_a,col_b' for your own columns)")
        from diffalign.data.loading import data_kind

        self.data_kind = data_kind(cfg)  # 'pairs' or 'unpaired', from column names or the cache manifest
        if self.data_kind == "unpaired" and self.objective.sample_fn is None:  # before any model is loaded
            where = f"cache.dir={cfg.cache.dir}" if cfg.cache.dir else f"data.path={cfg.data.path}"
            raise ConfigError(
                f"objective.name={cfg.objective.name} needs preference pairs, but {where} holds UNPAIRED labelled "
                f"images (one image and a desirable/undesirable label per row, column {cfg.data.label_column!r}). "
                "Train them with objective.name=kto, or give pair data (jpg_0/jpg_1 + label_0) for "
                f"objective.name={cfg.objective.name}.")
        # the objective's settings as the loop passes them (kto_balance replaces the λs once the data is counted)
        self.objective_cfg = cfg.objective

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from diffalign.models import load_adapter

        cfg, acc = self.cfg, self.accelerator
        torch.manual_seed(mix_seed(cfg.train.seed, 0))  # LoRA A init: identical on every rank and every run
        weight_dtype = self._weight_dtype()
        self.adapter = load_adapter(cfg.model, device=acc.device, weight_dtype=weight_dtype)
        self.adapter.set_attention_backend(cfg.model.attention)
        denoiser = self.adapter.denoiser
        if cfg.lora.enabled:
            self.adapter.add_lora(cfg.lora)
            self.reference = None  # adapters disabled on the policy network
        else:
            denoiser.to(dtype=torch.float32)  # full fine-tune: trainable master weights in fp32
            denoiser.requires_grad_(True)
            self.reference = (self.adapter.frozen_reference_copy(DTYPES[cfg.train.reference_dtype])
                              if self.objective.needs_reference else None)
        if cfg.model.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        denoiser.train()
        self.trainable = [p for p in denoiser.parameters() if p.requires_grad]
        self.trainable_names = [n for n, p in denoiser.named_parameters() if p.requires_grad]

        self._setup_data()
        optimizer = build_optimizer(self.trainable, cfg.optim, acc.device)
        scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps, acc.num_processes)
        self.model, self.optimizer, self.lr_scheduler = acc.prepare(denoiser, optimizer, scheduler)
        self.ema = None
        if cfg.train.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable, decay=cfg.train.ema_decay)
            self.ema.to(acc.device)

        self.step = 0
        self.resumed_from = self._maybe_resume()
        from diffalign.train.online import build_provider

        # SePPO / online pairs: latents sampled during training fill the pairs (None = pairs from the data)
        self.pair_provider = build_provider(self)

    def _weight_dtype(self) -> torch.dtype:
        choice = self.cfg.model.weight_dtype
        if choice != "auto":
            return DTYPES[choice]
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.train.mixed_precision, torch.float32)

    def _setup_data(self) -> None:
        cfg = self.cfg
        if cfg.cache.dir:
            from diffalign.data.cache import cached_dataset, check_manifest, collate_cached

            manifest = check_manifest(cfg.cache.dir, cfg)
            self.dataset = cached_dataset(cfg.cache.dir, manifest)
            self.collate = collate_cached
            self.empty_text = {k: v.to(self.accelerator.device) for k, v in self.dataset.empty_text.items()}
            self.data_counts = dict(manifest["counts"])
            self.data_counts.pop("skipped_rows", None)
            self.data_source = f"cache {cfg.cache.dir}"
        else:
            from diffalign.data.loading import collate_for, dataset_for, load_source_for

            source = load_source_for(cfg.data)
            self.dataset = dataset_for(cfg.data, source, seed=cfg.train.seed)
            self.collate = collate_for(source)
            self.empty_text = None
            if source.kind == "unpaired":
                self.data_counts = source.count_dict()
            else:
                self.data_counts = {"rows": source.counts.rows, "pairs": len(source.records),
                                    "ties_dropped": source.counts.ties_dropped, "skipped": len(source.counts.skipped)}
            self.data_source = f"{cfg.data.path} (encoded on the fly)"
        self.skipped_rows: set[int] = set()  # decode failures in skip mode, each row counted once
        if self.objective.check_scores is not None:
            self._check_scores()
        if cfg.objective.kto_balance:
            self._balance_kto()

    def _balance_kto(self) -> None:
        """objective.kto_balance: λ_D' = λ_D N/(2 n_D), λ_U' = λ_U N/(2 n_U) from the whole dataset's class counts
        (pairs: n_D = n_U = pairs, no change), so each class weighs alike in the expected loss."""
        c = self.data_counts
        n_d, n_u = (c["desirable"], c["undesirable"]) if self.data_kind == "unpaired" else (c["pairs"], c["pairs"])
        o = self.cfg.objective
        if n_d == 0 or n_u == 0:  # one class only: nothing to balance against
            self.accelerator.print(f"[diffalign] objective.kto_balance: the data has {n_d} desirable and {n_u} "
                                   "undesirable images; λs left unchanged")
            return
        total = n_d + n_u
        self.objective_cfg = dataclasses.replace(o, kto_lambda_desirable=o.kto_lambda_desirable * total / (2 * n_d),
                                                 kto_lambda_undesirable=o.kto_lambda_undesirable * total / (2 * n_u))
        self.accelerator.print(
            f"[diffalign] objective.kto_balance: {n_d} desirable / {n_u} undesirable images -> "
            f"lambda_D={self.objective_cfg.kto_lambda_desirable:.4g}, "
            f"lambda_U={self.objective_cfg.kto_lambda_undesirable:.4g}")

    def _check_scores(self) -> None:
        """Run the objective's data check over EVERY pair's scores once, so bad data fails before step 1."""
        if hasattr(self.dataset, "scores"):  # latent cache
            found = self.dataset.scores()
            if found is None:
                raise ConfigError(f"cache {self.cfg.cache.dir} holds no per-image scores, which objective.name="
                                  f"{self.cfg.objective.name} needs: rebuild it with data.score_column set")
            score_w, score_l, rows = found
        else:
            records = self.dataset.source.records
            score_w = torch.tensor([r.score_w for r in records], dtype=torch.float32)
            score_l = torch.tensor([r.score_l for r in records], dtype=torch.float32)
            rows = [r.row for r in records]
        try:
            self.objective.check_scores(score_w, score_l, rows, self.cfg.objective)
        except ValueError as e:
            raise ConfigError(f"{self.data_source}: {e}") from None

    def _loader(self, start_micro_step: int):
        acc = self.accelerator
        sampler = PairBatchSampler(len(self.dataset), self.cfg.train.batch_size, self.cfg.train.seed,
                                   rank=acc.process_index, world=acc.num_processes, start_micro_step=start_micro_step,
                                   unit="labelled images" if self.data_kind == "unpaired" else "pairs")
        self._sampler = sampler
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate,
                                             num_workers=self.cfg.data.num_workers,
                                             persistent_workers=self.cfg.data.num_workers > 0)
        return iter(loader)

    def _next_batch(self, data_iter, micro_step: int) -> dict:
        """The next non-empty micro-batch; pairs (or labelled images) whose images failed to decode (skip mode) are
        recorded."""
        while True:
            batch = next(data_iter)
            if batch.get("skipped"):
                records = self.dataset.source.records
                requested = {records[i].row for i, _ in self._sampler.micro_batch(micro_step)}
                self.skipped_rows |= requested - set(batch.get("row") or [])
            if "row" in batch:  # an all-failed micro-batch carries no rows: it is replaced by the next one
                return batch
            micro_step += 1

    # ------------------------------------------------------------------ one micro-step
    def _drop_prompts_text(self, text: dict[str, torch.Tensor], n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Cached conditioning with prompt dropout: each row is the empty prompt's with probability p (one draw
        of ``n`` uniforms from ``gen``; none when p = 0)."""
        p = self.cfg.data.prompt_dropout
        if p <= 0:
            return text
        dev = self.accelerator.device
        drop = torch.rand(n, generator=gen) < p
        out = {}
        for k, v in text.items():
            mask = drop.to(dev).view((-1,) + (1,) * (v.ndim - 1))
            out[k] = torch.where(mask, self.empty_text[k].expand_as(v), v)
        return out

    def _drop_prompts_captions(self, captions: list[str], gen: torch.Generator) -> list[str]:
        """Captions with prompt dropout ('' with probability p; the same draw as :meth:`_drop_prompts_text`)."""
        p = self.cfg.data.prompt_dropout
        if p <= 0:
            return captions
        drop = torch.rand(len(captions), generator=gen) < p
        return ["" if d else c for c, d in zip(captions, drop.tolist())]

    def model_inputs(self, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict, dict, dict]:
        """(x0_w, x0_l, text [B,...], micro_w, micro_l) on device; prompt dropout applied here for both paths."""
        dev = self.accelerator.device
        if "latents_w" in batch:
            x0_w, x0_l = batch["latents_w"].to(dev), batch["latents_l"].to(dev)
            text = self._drop_prompts_text({k: v.to(dev) for k, v in batch["text"].items()}, x0_w.shape[0], gen)
        else:
            captions = self._drop_prompts_captions(list(batch["caption"]), gen)
            # a pair provider samples the losers itself: do not VAE-encode the data's
            uses_l = self.objective.uses_losers and getattr(self, "pair_provider", None) is None
            pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]]) if uses_l else batch["pixels_w"]
            latents = self.adapter.encode_images(pixels.to(dev))
            n = batch["pixels_w"].shape[0]
            x0_w, x0_l = latents[:n], (latents[n:] if uses_l else latents[:0])
            text = self.adapter.encode_prompts(captions)
        micro_w = {"original_size": batch["original_size_w"].to(dev), "crop_top_left": batch["crop_top_left"].to(dev)}
        micro_l = {"original_size": batch["original_size_l"].to(dev), "crop_top_left": batch["crop_top_left"].to(dev)}
        return x0_w, x0_l, text, micro_w, micro_l

    def sample_inputs(self, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict, dict]:
        """Unpaired data: (x0 [B,...], text [B,...], micro) of B labelled images on device, prompt dropout applied."""
        dev = self.accelerator.device
        if "latents" in batch:
            x0 = batch["latents"].to(dev)
            text = self._drop_prompts_text({k: v.to(dev) for k, v in batch["text"].items()}, x0.shape[0], gen)
        else:
            captions = self._drop_prompts_captions(list(batch["caption"]), gen)
            x0 = self.adapter.encode_images(batch["pixels"].to(dev))
            text = self.adapter.encode_prompts(captions)
        micro = {"original_size": batch["original_size"].to(dev), "crop_top_left": batch["crop_top_left"].to(dev)}
        return x0, text, micro

    def _errors(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, text: dict, micro: dict,
                provider=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-row (policy error [N], reference error [N] or None) at the given (t, ε): one reference forward
        without grad (when the objective needs it; ``provider``'s reference, the frozen copy, or the LoRA network
        with adapters disabled) and one policy forward over the same N rows."""
        adapter = self.adapter
        x_t = adapter.add_noise(x0, eps, t)
        target = adapter.target(x0, eps, t)
        ref_err = None
        if self.objective.needs_reference:
            with torch.no_grad():
                if self.reference is not None:
                    ref_pred = adapter.predict(self.reference, x_t, t, text, micro)
                else:
                    unwrapped = self.accelerator.unwrap_model(self.model)
                    # the provider's reference (a LoRA snapshot) or the base model (adapters disabled)
                    with provider.reference(unwrapped) if provider is not None else adapters_disabled(unwrapped):
                        ref_pred = adapter.predict(unwrapped, x_t, t, text, micro)
                ref_err = per_sample_mse(ref_pred, target)
        pred = adapter.predict(self.model, x_t, t, text, micro)
        return per_sample_mse(pred, target), ref_err

    def compute_loss(self, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, metrics) of one micro-batch: pairs -> objective(PairErrors); unpaired labelled images ->
        objective.sample_fn(SampleErrors)."""
        if "desirable" in batch:
            return self.compute_sample_loss(batch, gen)
        adapter, dev = self.adapter, self.accelerator.device
        x0_w, x0_l, text, micro_w, micro_l = self.model_inputs(batch, gen)
        provider, provided = getattr(self, "pair_provider", None), {}
        if provider is not None:  # sampled latents replace the data's loser (SePPO) or both images (online pairs)
            captions = list(batch["caption"]) if "caption" in batch else None
            x0_w, x0_l, provided = provider.pairs(self, x0_w, text, captions, gen)
        b = x0_w.shape[0]
        t = adapter.sample_timesteps(b, gen)
        eps = torch.randn(x0_w.shape, generator=gen).to(dev)
        t = t.to(dev)
        if self.objective.uses_losers:  # winners and losers share ε and t; one forward over 2B rows
            x0 = torch.cat([x0_w, x0_l])
            eps, t_all = torch.cat([eps, eps]), torch.cat([t, t])
            text = {k: torch.cat([v, v]) for k, v in text.items()}
            micro = {k: torch.cat([micro_w[k], micro_l[k]]) for k in micro_w}
        else:
            x0, t_all, micro = x0_w, t, micro_w
        err, ref_err = self._errors(x0, eps, t_all, text, micro, provider)
        # rewards are data: [B] float32 per role, oriented with the pair by the data reader / cache
        score_w = batch["score_w"].to(dev) if "score_w" in batch else None
        score_l = batch["score_l"].to(dev) if "score_l" in batch else None
        velocity_scale = adapter.velocity_error_scale(t).to(dev)
        if self.objective.uses_losers:
            errors = PairErrors(policy_w=err[:b], policy_l=err[b:],
                                ref_w=ref_err[:b] if ref_err is not None else None,
                                ref_l=ref_err[b:] if ref_err is not None else None,
                                t=adapter.unit_time(t), score_w=score_w, score_l=score_l, velocity_scale=velocity_scale)
        else:
            errors = PairErrors(policy_w=err, policy_l=None, ref_w=ref_err, ref_l=None, t=adapter.unit_time(t),
                                score_w=score_w, score_l=score_l, velocity_scale=velocity_scale)
        loss, metrics = self.objective(errors, self.objective_cfg)
        return loss, {**metrics, **provided}

    def compute_sample_loss(self, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Unpaired data: B labelled images, each with its OWN (t, ε) (no pairs to share them), one reference and
        one policy forward over the B rows -> objective.sample_fn(SampleErrors)."""
        if self.objective.sample_fn is None:  # refused at construction; a hand-built batch could still get here
            raise ConfigError(f"objective.name={self.cfg.objective.name} needs preference pairs, not labelled images")
        adapter, dev = self.adapter, self.accelerator.device
        x0, text, micro = self.sample_inputs(batch, gen)
        t = adapter.sample_timesteps(x0.shape[0], gen)
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        t = t.to(dev)
        err, ref_err = self._errors(x0, eps, t, text, micro)
        samples = SampleErrors(policy=err, ref=ref_err, desirable=batch["desirable"].to(dev).bool(),
                               t=adapter.unit_time(t))
        return self.objective.sample_fn(samples, self.objective_cfg)

    # ------------------------------------------------------------------ checkpoints
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        unwrapped = self.accelerator.unwrap_model(self.model)
        named = dict(unwrapped.named_parameters())
        return {n: named[n].detach() for n in self.trainable_names}

    def save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            scaler = acc.scaler.state_dict() if getattr(acc, "scaler", None) is not None else None

            def write_extra(folder: Path) -> None:
                if self.cfg.lora.enabled:
                    with self._ema_weights():
                        self.adapter.save_lora(acc.unwrap_model(self.model), str(folder / "lora"))
                provider = getattr(self, "pair_provider", None)
                if provider is not None:  # SePPO's snapshot pool / the online reference, read back on resume
                    provider.save_state(folder)

            path = ckpt.save_checkpoint(
                self.out, self.step, trainable=self._trainable_state(), optimizer_state=self.optimizer.state_dict(),
                scheduler_state=self.lr_scheduler.state_dict(), ema_state=self.ema.state_dict() if self.ema else None,
                scaler_state=scaler, keep=self.cfg.train.keep_checkpoints, extra_writer=write_extra,
                state={"nonfinite_steps": self.nonfinite_steps, "run": self.cfg.name},
            )
        acc.wait_for_everyone()
        return path

    def _maybe_resume(self) -> Path | None:
        resume = self.cfg.train.resume
        if resume == "none":
            return None
        path = ckpt.latest_checkpoint(self.out) if resume == "auto" else Path(resume)
        if path is None:
            return None
        data = ckpt.load_checkpoint(path)
        unwrapped = self.accelerator.unwrap_model(self.model)
        named = dict(unwrapped.named_parameters())
        missing = set(self.trainable_names) - set(data["trainable"])
        unexpected = set(data["trainable"]) - set(self.trainable_names)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path} does not fit this model (missing {sorted(missing)[:3]}, unexpected "
                               f"{sorted(unexpected)[:3]}): was it written with another lora/model config? "
                               "Use train.resume=none or another train.output_dir.")
        with torch.no_grad():
            for n, v in data["trainable"].items():
                named[n].copy_(v.to(named[n].device, named[n].dtype))
        self.optimizer.load_state_dict(data["optimizer"])
        self.lr_scheduler.load_state_dict(data["scheduler"])
        if self.ema is not None and data["ema"] is not None:
            self.ema.load_state_dict(data["ema"])
        if data["scaler"] is not None and getattr(self.accelerator, "scaler", None) is not None:
            self.accelerator.scaler.load_state_dict(data["scaler"])
        self.step = int(data["state"]["step"])
        self._resumed_nonfinite = int(data["state"].get("nonfinite_steps", 0))
        return path

    @contextlib.contextmanager
    def _ema_weights(self):
        """Temporarily swap the EMA weights in (export), then restore the live ones."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.trainable)
        self.ema.copy_to(self.trainable)
        try:
            yield
        finally:
            self.ema.restore(self.trainable)

    def export(self) -> Path:
        """LoRA: <out>/lora (diffusers format, pipe.load_lora_weights). Full: <out>/model (pipeline folder)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        target = self.out / ("lora" if self.cfg.lora.enabled else "model")
        if acc.is_main_process:
            with self._ema_weights():
                if self.cfg.lora.enabled:
                    self.adapter.save_lora(acc.unwrap_model(self.model), str(target))
                else:
                    self.adapter.pipe.save_pretrained(str(target))
        acc.wait_for_everyone()
        return target

    # ------------------------------------------------------------------ the loop
    def _all_finite(self, value: torch.Tensor) -> bool:
        """True only if the value is finite on EVERY rank, so all ranks skip or step together."""
        flag = torch.isfinite(value.detach()).all().float().reshape(1).to(self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() == self.accelerator.num_processes)

    def train(self, callback=None) -> TrainResult:
        """Run to train.max_steps. ``callback(trainer)``, if given, runs after every optimizer step on every
        rank (e.g. periodic reward evaluation: a falling loss alone does not show alignment)."""
        from tqdm.auto import tqdm

        if not hasattr(self, "adapter"):
            self.setup()
        cfg, acc = self.cfg, self.accelerator
        accum = cfg.train.gradient_accumulation_steps
        self.nonfinite_steps = getattr(self, "_resumed_nonfinite", 0)
        consecutive_nonfinite = 0
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_config(cfg))
        if acc.trackers == [] and cfg.train.log_with != "none":
            acc.init_trackers(cfg.name, config=_flat_config(cfg))
        data_iter = self._loader(self.step * accum)
        history: list[dict[str, float]] = []
        window: dict[str, list[float]] = {}
        start_time = time.time()
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc=f"{cfg.objective.name} {cfg.model.family}",
                   unit="step", disable=not (self.show_progress and acc.is_local_main_process), dynamic_ncols=True)
        metrics_file = self.out / "metrics.jsonl"
        if self.step == 0 and acc.is_main_process and metrics_file.exists():
            metrics_file.unlink()

        while self.step < cfg.train.max_steps:
            step_metrics: dict[str, float] = {}
            poisoned = False
            for micro in range(accum):
                micro_step = self.step * accum + micro
                batch = self._next_batch(data_iter, micro_step)
                torch.manual_seed(mix_seed(cfg.train.seed, micro_step, acc.process_index, 3))  # e.g. LoRA dropout
                gen = step_generator(cfg.train.seed, micro_step, acc.process_index)
                sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(self.model)
                with sync, acc.autocast():
                    loss, metrics = self.compute_loss(batch, gen)
                if not self._all_finite(loss):
                    poisoned = True
                    continue
                acc.backward(loss / accum)
                for k, v in metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + v / accum

            grad_norm = float("nan")
            if not poisoned:
                max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else float("inf")
                grad_norm_t = acc.clip_grad_norm_(self.trainable, max_norm)
                grad_norm = float(grad_norm_t) if grad_norm_t is not None else float("nan")
                poisoned = not math.isfinite(grad_norm) and acc.scaler is None  # fp16: the scaler skips by itself
            if poisoned:
                self.optimizer.zero_grad(set_to_none=True)
                self.nonfinite_steps += 1
                consecutive_nonfinite += 1
                acc.print(f"[diffalign] step {self.step + 1}: non-finite loss or gradient; step skipped "
                          f"({self.nonfinite_steps} so far). Lower optim.lr or objective.beta if this repeats.")
                if cfg.train.nan_policy == "stop" or consecutive_nonfinite >= cfg.train.max_consecutive_nan:
                    raise FloatingPointError(
                        f"stopping at step {self.step + 1}: {consecutive_nonfinite} consecutive non-finite steps "
                        f"(train.nan_policy={cfg.train.nan_policy}). The last checkpoint is intact; lower optim.lr "
                        "or objective.beta, or add objective.sft_weight, and resume.")
                continue
            consecutive_nonfinite = 0
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.step(self.trainable)
            self.step += 1
            if self.pair_provider is not None:  # SePPO pool snapshot / online reference refresh
                self.pair_provider.after_step(self.step)

            step_metrics["grad_norm"] = grad_norm
            step_metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
            for k, v in step_metrics.items():
                window.setdefault(k, []).append(v)
            bar.update(1)
            bar.set_postfix(loss=f"{step_metrics['loss']:.4f}",
                            acc=f"{step_metrics.get('implicit_acc', float('nan')):.2f}", refresh=False)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                logged = self._reduce_window(window)
                window = {}
                history.append({"step": self.step, **logged})
                acc.log(logged, step=self.step)
                if acc.is_main_process:
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps({"step": self.step, **logged}) + "\n")
            if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0 and self.step < cfg.train.max_steps:
                self.save_checkpoint()
            if callback is not None:
                callback(self)
        bar.close()

        self.save_checkpoint()
        export_path = self.export()
        if self.ema is not None:  # from here on the live model IS what was exported (callers sample it)
            self.ema.copy_to(self.trainable)
        skipped = torch.tensor([float(len(self.skipped_rows))], device=acc.device)
        counts = dict(self.data_counts)
        counts["skipped"] = int(counts.get("skipped", 0) + acc.reduce(skipped, reduction="sum").item())
        checksums = self._rank_checksums()
        if len(set(checksums)) > 1:
            acc.print(f"[diffalign] WARNING: trainable weights differ between ranks (checksums {checksums})")
        acc.end_training()
        return TrainResult(output_dir=self.out, export_path=export_path, steps=self.step,
                           final_metrics=history[-1] if history else {}, data_counts=counts,
                           nonfinite_steps=self.nonfinite_steps, seconds=time.time() - start_time, history=history,
                           rank_checksums=checksums)

    def _rank_checksums(self) -> list[float]:
        """A position-weighted sum of every trainable weight, gathered from all ranks (DDP desync check)."""
        total = torch.zeros(1, dtype=torch.float64, device=self.accelerator.device)
        for i, p in enumerate(self.trainable):
            total += (p.detach().double().flatten() * (i + 1)).sum()
        return [float(x) for x in self.accelerator.gather(total).tolist()]

    def _reduce_window(self, window: dict[str, list[float]]) -> dict[str, float]:
        """Average a logging window over steps and over ranks (every rank calls this at the same step)."""
        keys = sorted(window)
        local = torch.tensor([sum(window[k]) / len(window[k]) for k in keys], device=self.accelerator.device)
        mean = self.accelerator.reduce(local, reduction="mean")
        return {k: float(v) for k, v in zip(keys, mean.tolist())}


def train(cfg: RunConfig, show_progress: bool = True) -> TrainResult:
    """Train ``cfg`` end to end (setup, loop, final checkpoint and export) and return a TrainResult."""
    trainer = Trainer(cfg, show_progress=show_progress)
    trainer.setup()
    return trainer.train()
