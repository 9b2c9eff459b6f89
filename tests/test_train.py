"""The shared loop on tiny saved models: learning, reference semantics, resume, export, guards, cache."""
import dataclasses
import json
import math

import pytest
import torch

from diffalign.train.loop import Trainer, adapters_disabled


def run(cfg):
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    return trainer, trainer.train()


OVERFIT = {  # family: overrides that overfit 4 pairs within a CPU-second budget
    "sd15": ["lora.enabled=false", "train.reference_dtype=float32", "optim.lr=3e-4", "train.max_steps=80"],
    "sdxl": ["lora.enabled=false", "train.reference_dtype=float32", "optim.lr=3e-4", "train.max_steps=80"],
    "sd3": ["lora.rank=8", "optim.lr=1e-3", "train.max_steps=40"],
    "flux": ["lora.rank=8", "optim.lr=1e-3", "train.max_steps=40"],
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(OVERFIT))
def test_overfit_a_handful_of_pairs_drives_implicit_accuracy_to_one(family, make_cfg):
    cfg = make_cfg(family, "data.path=toy:pairs?n=4", "train.log_every=1", *OVERFIT[family])
    _, result = run(cfg)
    first, last10 = result.history[0], result.history[-10:]
    # step 1 runs before any update, policy == reference (up to fp32 kernel rounding, amplified by beta 5000)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)
    acc = sum(h["implicit_acc"] for h in last10) / 10
    median_loss = sorted(h["loss"] for h in last10)[5]  # one high-noise t can spike a single step
    assert acc >= 0.9 and median_loss < 0.3, [(h["step"], round(h["loss"], 3), h["implicit_acc"]) for h in result.history]


@pytest.mark.parametrize("family,prediction_type", [("sd15", "epsilon"), ("sd15", "v_prediction"), ("sdxl", "epsilon"),
                                                     ("sd3", "epsilon"), ("flux", "epsilon")])
def test_step_zero_policy_equals_reference_ln2(family, prediction_type, make_cfg):
    trainer = Trainer(make_cfg(family, "train.max_steps=1", prediction_type=prediction_type), show_progress=False)
    trainer.setup()
    batch = next(trainer._loader(0))
    from diffalign.train.randomness import step_generator

    loss, metrics = trainer.compute_loss(batch, step_generator(0, 0, 0))
    if family == "sd15":
        assert trainer.adapter.prediction_type == prediction_type
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # LoRA B starts at zero
    assert metrics["implicit_acc"] == 0.5
    assert metrics["err_policy_w"] == pytest.approx(metrics["err_ref_w"])


def test_loop_hands_the_objective_each_pairs_velocity_scale(make_cfg):
    """time_weighting=velocity reads PairErrors.velocity_scale: the loop fills it with 1/ᾱ_t of each pair's own t."""
    from diffalign.train.randomness import step_generator

    trainer = Trainer(make_cfg("sd15", "train.max_steps=1", "objective.time_weighting=velocity"), show_progress=False)
    trainer.setup()
    seen, objective_fn = [], trainer.objective.fn
    trainer.objective = dataclasses.replace(trainer.objective, fn=lambda e, c: (seen.append(e), objective_fn(e, c))[1])
    loss, metrics = trainer.compute_loss(next(trainer._loader(0)), step_generator(0, 0, 0))
    errors = seen[0]
    t = (errors.t * trainer.adapter.num_train_timesteps).round().long().cpu()
    torch.testing.assert_close(errors.velocity_scale.cpu(), 1 / trainer.adapter.alphas_cumprod[t])
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and metrics["implicit_acc"] == 0.5


def test_reference_is_the_base_model_and_only_lora_trains(make_cfg):
    trainer = Trainer(make_cfg("sd15", "train.max_steps=3", "optim.lr=1e-2"), show_progress=False)
    trainer.setup()
    model = trainer.accelerator.unwrap_model(trainer.model)
    base_params = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" not in n}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([10, 500])
    text = trainer.adapter.encode_prompts(["a red square on a blue background", "x"])
    with torch.no_grad(), adapters_disabled(model):
        ref_before = trainer.adapter.predict(model, x, t, text)
    # one manual step: only LoRA parameters receive gradients
    batch = next(trainer._loader(0))
    from diffalign.train.randomness import step_generator

    loss, _ = trainer.compute_loss(batch, step_generator(0, 5, 0))
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all("lora" in n for n in with_grad)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.train()
    with torch.no_grad():
        with adapters_disabled(model):
            ref_after = trainer.adapter.predict(model, x, t, text)
        policy_after = trainer.adapter.predict(model, x, t, text)
    torch.testing.assert_close(ref_after, ref_before, rtol=0, atol=0)
    assert (policy_after - ref_after).abs().max() > 1e-6
    for n, p in model.named_parameters():
        if n in base_params:
            assert torch.equal(p.detach(), base_params[n]), n


def test_full_finetune_reference_is_a_frozen_copy(make_cfg):
    trainer, result = run(make_cfg("sd15", "lora.enabled=false", "train.max_steps=2", "optim.lr=1e-3",
                                   "train.reference_dtype=float32"))
    ref, policy = trainer.reference, trainer.accelerator.unwrap_model(trainer.model)
    assert not any(p.requires_grad for p in ref.parameters())
    diffs = [(a - b).abs().max().item() for a, b in zip(ref.parameters(), policy.parameters())]
    assert max(diffs) > 0  # the policy moved, the reference did not
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(result.export_path)
    torch.testing.assert_close(dict(loaded.unet.named_parameters())["conv_in.weight"], policy.conv_in.weight.detach())


def test_resume_matches_uninterrupted_run(make_cfg, tmp_path):
    common = ["train.checkpoint_every=2", "optim.lr=1e-3", "data.random_flip=true", "data.center_crop=false",
              "data.prompt_dropout=0.3", "train.gradient_accumulation_steps=2", "train.batch_size=2", "train.ema=true"]
    _, straight = run(make_cfg("flux", "train.max_steps=4", *common, out=tmp_path / "a"))
    run(make_cfg("flux", "train.max_steps=2", *common, out=tmp_path / "b"))
    trainer_b = Trainer(make_cfg("flux", "train.max_steps=4", *common, out=tmp_path / "b"), show_progress=False)
    trainer_b.setup()
    assert trainer_b.resumed_from is not None and trainer_b.step == 2
    trainer_b.train()
    from diffalign.train.checkpoint import list_checkpoints, load_checkpoint

    a = load_checkpoint(list_checkpoints(tmp_path / "a")[-1])
    b = load_checkpoint(list_checkpoints(tmp_path / "b")[-1])
    assert a["state"]["step"] == b["state"]["step"] == 4
    for k in a["trainable"]:
        torch.testing.assert_close(a["trainable"][k], b["trainable"][k], rtol=1e-5, atol=1e-7)
    assert any(a["trainable"][k].abs().sum() > 0 for k in a["trainable"] if "lora_B" in k)
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_ema_run_leaves_the_exported_ema_weights_in_the_model(make_cfg, tmp_path):
    """With train.ema the export is the EMA; afterwards the live model must hold those weights too (scripts such as
    the demo sample the trainer's pipeline after train()), not the last raw step's, which the checkpoint keeps."""
    from diffalign.train.checkpoint import list_checkpoints, load_checkpoint

    trainer, _ = run(make_cfg("flux", "train.max_steps=3", "train.ema=true", "train.ema_decay=0.5", "optim.lr=1e-2",
                              out=tmp_path / "e"))
    for live, shadow in zip(trainer.trainable, trainer.ema.shadow_params):
        torch.testing.assert_close(live.detach(), shadow)
    raw = load_checkpoint(list_checkpoints(tmp_path / "e")[-1])["trainable"]
    moved = [k for k in raw if "lora_B" in k]
    live = dict(zip(trainer.trainable_names, trainer.trainable))
    assert moved and any(not torch.allclose(raw[k], live[k].detach()) for k in moved)


def test_checkpoints_keep_last_k_and_are_complete(make_cfg, tmp_path):
    from diffalign.train.checkpoint import list_checkpoints

    run(make_cfg("flux", "train.max_steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=2", out=tmp_path / "k"))
    ckpts = list_checkpoints(tmp_path / "k")
    assert [p.name for p in ckpts] == ["checkpoint-4", "checkpoint-5"]
    assert not list((tmp_path / "k" / "checkpoints").glob(".tmp-*"))
    assert (ckpts[-1] / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("family,pipeline_class", [("sd15", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline"),
                                                   ("sd3", "StableDiffusion3Pipeline"), ("flux", "FluxPipeline")])
def test_saved_lora_loads_into_plain_diffusers_and_changes_output(family, pipeline_class, make_cfg, tiny_model):
    import diffusers

    # SD3/FLUX: also the context-stream projections, whose mixed key formats once made diffusers drop to_q/k/v/out
    targets = (["lora.target_modules=[to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj]"]
               if family in ("sd3", "flux") else [])
    trainer, result = run(make_cfg(family, "train.max_steps=3", "optim.lr=5e-2", *targets))
    assert (result.export_path / "pytorch_lora_weights.safetensors").is_file()
    cls = getattr(diffusers, pipeline_class)
    pipe = cls.from_pretrained(tiny_model(family))
    r = 32 if family in ("sd15", "sdxl") else 16
    kw = dict(prompt="a red square on a blue background", num_inference_steps=2, height=r, width=r, output_type="np")
    if family in ("sd3", "flux"):
        kw["max_sequence_length"] = 16
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(result.export_path))
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(before - after).max() > 1e-4
    # EVERY trained LoRA layer arrives with its trained values (not just enough of them to change the output)
    trained = _lora_b_weights(trainer.accelerator.unwrap_model(trainer.model))
    loaded = _lora_b_weights(getattr(pipe, trainer.adapter.denoiser_attr))
    assert trained and set(loaded) == set(trained), sorted(set(trained) ^ set(loaded))[:6]
    for name, w in trained.items():
        assert torch.allclose(loaded[name], w, atol=1e-6), name


def _lora_b_weights(model) -> dict:
    """{module path: lora_B weight} over the model's LoRA layers (any adapter name, peft wrapper prefixes off)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.lora_B:
            key = name.removeprefix("base_model.model.")
            out[key] = next(iter(module.lora_B.values())).weight.detach().float().cpu()
    return out


def test_nonfinite_loss_is_skipped_and_counted(make_cfg, monkeypatch):
    trainer = Trainer(make_cfg("flux", "train.max_steps=3"), show_progress=False)
    trainer.setup()
    real = trainer.compute_loss
    calls = {"n": 0}

    def sometimes_nan(batch, gen):
        calls["n"] += 1
        loss, m = real(batch, gen)
        return (loss * float("nan"), m) if calls["n"] == 2 else (loss, m)

    monkeypatch.setattr(trainer, "compute_loss", sometimes_nan)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert result.steps == 3 and result.nonfinite_steps == 1
    after = dict(trainer.model.named_parameters())
    assert all(torch.isfinite(after[n]).all() for n in before)


def test_nan_policy_stop_raises(make_cfg, monkeypatch):
    trainer = Trainer(make_cfg("flux", "train.max_steps=3", "train.nan_policy=stop"), show_progress=False)
    trainer.setup()
    monkeypatch.setattr(trainer, "compute_loss", lambda b, g: (torch.tensor(float("inf"), requires_grad=True), {}))
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.train()


def test_sft_objective_trains_on_winners_without_reference(make_cfg):
    trainer, result = run(make_cfg("sd3", "objective.name=sft", "train.max_steps=2"))
    assert result.steps == 2 and "implicit_acc" not in result.final_metrics
    assert trainer.reference is None


def test_cache_round_trip_matches_on_the_fly(make_cfg, tmp_path):
    from diffalign.data.cache import build_cache, check_manifest
    from diffalign.train.randomness import step_generator

    cfg = make_cfg("sdxl", f"cache.dir={tmp_path / 'cache'}", "cache.shard_size=3", "data.path=toy:pairs?n=8&ties=2")
    from diffalign.models import load_adapter

    manifest = build_cache(cfg, load_adapter(cfg.model), show_progress=False)
    assert manifest["counts"]["pairs"] == 8 and manifest["counts"]["ties_dropped"] == 2
    assert len(manifest["shards"]) == 3
    check_manifest(cfg.cache.dir, cfg)
    cached = Trainer(cfg, show_progress=False)
    cached.setup()
    cfg_fly = make_cfg("sdxl", "data.path=toy:pairs?n=8&ties=2")
    fly = Trainer(cfg_fly, show_progress=False)
    fly.setup()
    b_cached, b_fly = next(cached._loader(0)), next(fly._loader(0))
    assert b_cached["row"] == b_fly["row"]
    assert b_cached["caption"] == list(b_fly["caption"])  # online pair providers score against them
    loss_c, _ = cached.compute_loss(b_cached, step_generator(0, 0, 0))
    loss_f, _ = fly.compute_loss(b_fly, step_generator(0, 0, 0))
    assert loss_c.item() == pytest.approx(loss_f.item(), rel=1e-4)
    result = cached.train()
    assert result.data_counts["ties_dropped"] == 2 and result.steps == 2


def test_mismatched_cache_is_refused_with_the_differences(make_cfg, tmp_path):
    from diffalign.data.cache import CacheMismatchError, build_cache
    from diffalign.models import load_adapter

    cfg = make_cfg("sd15", f"cache.dir={tmp_path / 'c'}")
    build_cache(cfg, load_adapter(cfg.model), show_progress=False)
    other = make_cfg("sd15", f"cache.dir={tmp_path / 'c'}", "data.resolution=16", "data.path=toy:pairs?n=9")
    with pytest.raises(CacheMismatchError) as e:
        Trainer(other, show_progress=False).setup()
    msg = str(e.value)
    assert "data.resolution: cache has 32, config wants 16" in msg and "data.path" in msg and "data.identity" in msg
    with pytest.raises(CacheMismatchError, match="no manifest.json"):
        Trainer(make_cfg("sd15", f"cache.dir={tmp_path / 'missing'}"), show_progress=False).setup()


def test_bad_rows_skipped_are_counted_in_the_run(make_cfg, tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def jpg(color):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), color).save(buf, "JPEG")
        return buf.getvalue()

    rows = {"jpg_0": [jpg("red")] * 6 + [b"not a jpeg"], "jpg_1": [jpg("blue")] * 7,
            "label_0": [1.0, 0.0, 1.0, 0.5, 1.0, 0.0, 1.0], "caption": ["a red square"] * 7}
    rows["label_0"][4] = 3.0  # outside {0, 0.5, 1}
    pq.write_table(pa.table(rows), tmp_path / "pairs.parquet")
    cfg = make_cfg("sd15", f"data.path={tmp_path / 'pairs.parquet'}", "data.on_error=skip", "train.batch_size=2",
                   "train.max_steps=3")
    _, result = run(cfg)
    assert result.data_counts["ties_dropped"] == 1
    assert result.data_counts["skipped"] == 2  # the bad label at load time + the corrupt JPEG at decode time
    from diffalign.data.preference import DataError

    with pytest.raises(DataError, match="row 4"):
        Trainer(make_cfg("sd15", f"data.path={tmp_path / 'pairs.parquet'}"), show_progress=False).setup()


def test_bf16_mixed_precision_keeps_lora_in_fp32(make_cfg):
    trainer, result = run(make_cfg("sd15", "train.mixed_precision=bf16", "train.max_steps=2"))
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.conv_in.weight.dtype == torch.bfloat16  # frozen base in the weight dtype
    assert all(p.dtype == torch.float32 for p in trainer.trainable)
    assert result.steps == 2 and math.isfinite(result.final_metrics["loss"])


def test_gradient_checkpointing_gives_the_same_loss(make_cfg, tmp_path):
    from diffalign.train.randomness import step_generator

    losses = []
    for gc in ("false", "true"):
        trainer = Trainer(make_cfg("sd3", f"model.gradient_checkpointing={gc}", out=tmp_path / gc), show_progress=False)
        trainer.setup()
        loss, _ = trainer.compute_loss(next(trainer._loader(0)), step_generator(0, 0, 0))
        loss.backward()
        grads = [p.grad.clone() for p in trainer.trainable]
        losses.append((loss.item(), grads))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    for a, b in zip(losses[0][1], losses[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_optional_backends_fail_clearly_when_missing(make_cfg):
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(RuntimeError, match="xformers is not installed"):
            Trainer(make_cfg("sd15", "model.attention=xformers"), show_progress=False).setup()
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(RuntimeError, match="adamw8bit needs bitsandbytes"):
            Trainer(make_cfg("sd15", "optim.optimizer=adamw8bit"), show_progress=False).setup()
