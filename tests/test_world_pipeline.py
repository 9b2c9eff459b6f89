"""World generators: tokenizer, pretrain -> loadable folder, pairs -> the normal data path, demo report."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.world.generators import build_word_clip_tokenizer, world_words


def test_every_world_word_is_one_bpe_token_and_captions_round_trip():
    from diffalign.world.scenes import all_scenes

    tok = build_word_clip_tokenizer(world_words())
    for word in world_words():
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))
    for scene in all_scenes()[::37]:
        cap = scene.caption()
        ids = tok(cap).input_ids
        assert len(ids) == len(cap.split()) + 2
        assert tok.decode(ids, skip_special_tokens=True).strip() == cap


@pytest.fixture(scope="module")
def pretrained_tiny(tmp_path_factory):
    """Both kinds pretrained for a handful of steps (the path, not the quality)."""
    from diffalign.world.pretrain import PretrainConfig, pretrain

    out = {}
    for kind in ("unet", "flow"):
        folder = tmp_path_factory.mktemp(f"world-{kind}")
        record = pretrain(PretrainConfig(kind=kind, steps=3, vae_steps=3, pool=64, batch_size=8), folder,
                          show_progress=False)
        out[kind] = (folder, record)
    return out


@pytest.mark.parametrize("kind,family", [("unet", "sd15"), ("flow", "sd3")])
def test_pretrain_saves_a_folder_that_loads_through_the_user_path(kind, family, pretrained_tiny):
    from diffalign.config import ModelConfig
    from diffalign.models import load_adapter

    folder, record = pretrained_tiny[kind]
    assert json.loads((folder / "pretrain.json").read_text())["config"]["kind"] == kind
    assert np.isfinite(record["final_loss_mean_last_100"]) and record["vae"]["scaling_factor"] > 0
    adapter = load_adapter(ModelConfig(family=family, pretrained=str(folder), max_sequence_length=1))
    assert adapter.vae.config.scaling_factor == pytest.approx(record["vae"]["scaling_factor"])
    text = adapter.encode_prompts(["a small red circle at the top left on a black background"])
    assert all(torch.isfinite(v).all() for v in text.values())


def test_pretrain_continues_from_a_folder_keeping_its_vae_and_recording_the_chain(pretrained_tiny, tmp_path):
    """--init-from: the denoiser starts from the earlier weights (not from scratch), the VAE is kept
    bit for bit, and the record/model card carry the earlier stage so the chain is reproducible."""
    from safetensors.torch import load_file

    from diffalign.world.pretrain import PretrainConfig, pretrain

    first, first_record = pretrained_tiny["unet"]
    out = tmp_path / "continued"
    record = pretrain(PretrainConfig(kind="unet", steps=2, pool=64, batch_size=8, lr=1e-9, lr_schedule="cosine",
                                     warmup=1, init_from=str(first)), out, show_progress=False)
    assert record["continued_from"]["config"] == first_record["config"]
    assert record["total_denoiser_steps"] == first_record["config"]["steps"] + 2
    assert record["vae"] == first_record["vae"]
    vae_a, vae_b = (load_file(f / "vae" / "diffusion_pytorch_model.safetensors") for f in (first, out))
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)
    # lr 1e-9 for 2 steps: the denoiser is the earlier one up to ~1e-8, far from a fresh initialisation
    unet_a, unet_b = (load_file(f / "unet" / "diffusion_pytorch_model.safetensors") for f in (first, out))
    assert max(float((unet_a[k] - unet_b[k]).abs().max()) for k in unet_a) < 1e-6
    assert "CONTINUED an earlier model" in (out / "README.md").read_text()


def test_world_unet_noise_schedules_by_hand():
    """The UNet's default schedule leaves (almost) nothing of the image at t = T; SD1.5's leaves 6.8%."""
    from diffalign.world.generators import world_ddpm_scheduler

    linear, scaled = world_ddpm_scheduler("linear"), world_ddpm_scheduler("scaled_linear")
    by_hand = {"linear": np.sqrt(np.prod(1 - np.linspace(1e-4, 0.02, 1000))),
               "scaled_linear": np.sqrt(np.prod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2))}
    assert float(linear.alphas_cumprod[-1].sqrt()) == pytest.approx(by_hand["linear"], rel=1e-3)
    assert float(scaled.alphas_cumprod[-1].sqrt()) == pytest.approx(by_hand["scaled_linear"], rel=1e-3)
    assert by_hand["linear"] < 0.007 and by_hand["scaled_linear"] > 0.06
    linear.set_timesteps(15)
    assert int(linear.timesteps[0]) == 999  # trailing: sampling starts where training's noise is purest
    with pytest.raises(ValueError, match="noise_schedule"):
        world_ddpm_scheduler("cosine")


def test_high_noise_weight_is_v_prediction_weighting_capped(tiny_model):
    """min(1/alpha_bar, cap) (pretrain's weights: the adapter's velocity_error_scale, clamped):
    |eps - eps_hat|^2 / alpha_bar = |v - v_hat|^2, by hand on one error."""
    from diffalign.config import ModelConfig
    from diffalign.models import load_adapter
    from diffalign.world.pretrain import PretrainConfig, pretrain

    adapter = load_adapter(ModelConfig(family="sd15", pretrained=str(tiny_model("sd15"))))
    adapter.alphas_cumprod = torch.tensor([0.9, 0.25, 0.02, 1e-4])  # a hand-made schedule, t = 0..3
    adapter.num_train_timesteps = 4

    def _eps_loss_weights(t, cap):
        return adapter.velocity_error_scale(t).clamp(max=cap)

    assert torch.allclose(_eps_loss_weights(torch.arange(4), 100.0), torch.tensor([1 / 0.9, 4.0, 50.0, 100.0]))
    a, s = 0.25 ** 0.5, 0.75 ** 0.5
    x0, eps, eps_hat = torch.tensor([0.3]), torch.tensor([-1.2]), torch.tensor([-0.7])
    x_t = a * x0 + s * eps
    x0_hat = (x_t - s * eps_hat) / a
    v, v_hat = a * eps - s * x0, a * eps_hat - s * x0_hat
    assert float((v - v_hat) ** 2) == pytest.approx(float(_eps_loss_weights(torch.tensor([1]), 1e9) * (eps - eps_hat) ** 2))
    with pytest.raises(ValueError, match="high_noise_weight"):
        pretrain(PretrainConfig(kind="flow", high_noise_weight=10.0), "unused", show_progress=False)


def test_continuing_with_another_noise_schedule_ships_it_and_the_card_says_so(pretrained_tiny, tmp_path):
    from diffusers import DDPMScheduler

    from diffalign.world.pretrain import PretrainConfig, _command, pretrain

    first, first_record = pretrained_tiny["unet"]
    assert DDPMScheduler.from_pretrained(first / "scheduler").config.beta_schedule == "scaled_linear"
    out = tmp_path / "continued"
    pretrain(PretrainConfig(kind="unet", steps=1, pool=64, batch_size=8, init_from=str(first),
                            noise_schedule="linear", high_noise_weight=100.0), out, show_progress=False)
    scheduler = DDPMScheduler.from_pretrained(out / "scheduler").config
    assert (scheduler.beta_schedule, scheduler.timestep_spacing) == ("linear", "trailing")
    card = (out / "README.md").read_text()
    assert "--noise-schedule linear" in card and "--high-noise-weight 100.0" in card and "linear betas" in card
    # records from before the options (the bundled UNet's) are the defaults: no flags, the same command
    legacy = {k: v for k, v in first_record["config"].items() if k not in ("noise_schedule", "high_noise_weight", "unet_levels")}
    assert _command(legacy) == _command(first_record["config"])
    assert "--unet-levels 3" in _command({**first_record["config"], "unet_levels": 3})
    assert "noise-schedule" not in _command(pretrained_tiny["flow"][1]["config"])


def test_unet_levels_build_the_bundled_architecture_or_one_level_deeper():
    from diffalign.world.generators import build_world_pipeline, build_world_vae

    vae = build_world_vae(0)
    two, three = (build_world_pipeline("unet", vae, unet_levels=n).unet for n in (2, 3))
    assert two.config.block_out_channels == [48, 96] or tuple(two.config.block_out_channels) == (48, 96)
    assert tuple(three.config.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    bundled = json.loads((Path(__file__).parents[1] / "diffalign/world/bundled/unet/unet/config.json").read_text())
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        assert list(two.config[key]) == list(bundled[key]), key
    with pytest.raises(ValueError, match="unet_levels"):
        build_world_pipeline("unet", vae, unet_levels=4)


def test_pairs_flow_through_the_normal_data_path(pretrained_tiny, tmp_path):
    from diffalign.config import ModelConfig
    from diffalign.data.preference import load_preference_source, validate_images
    from diffalign.models import load_pipeline
    from diffalign.world.oracle import score
    from diffalign.world.pairs import make_pairs

    pipe = load_pipeline(ModelConfig(family="sd15", pretrained=str(pretrained_tiny["unet"][0])))
    caps = ["a small red circle at the top left on a black background", "a large blue square in the center on a white background"]
    stats = make_pairs(pipe, caps, tmp_path / "pairs.parquet", k=3, steps=2, show_progress=False)
    assert stats["pairs"] == 2 and stats["mean_best"] >= stats["mean_worst"]
    source = validate_images(load_preference_source(str(tmp_path / "pairs.parquet")))
    assert len(source.records) == 2 and {r.caption for r in source.records} == set(caps)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "pairs.parquet").to_pydict()
    for i, rec in enumerate(source.records):  # the winner really is the oracle-better image
        win_slot = 0 if table["label_0"][i] == 1.0 else 1
        assert table[f"score_{win_slot}"][i] >= table[f"score_{1 - win_slot}"][i]
        from PIL import Image
        import io

        img = np.asarray(Image.open(io.BytesIO(rec.image_w)).convert("RGB"))[None]
        assert score(img, [rec.caption])["overall"][0] == pytest.approx(table[f"score_{win_slot}"][i], abs=1e-6)



def test_labels_are_unpaired_kto_data_with_oracle_thresholds(pretrained_tiny, tmp_path):
    """`diffalign world labels`: each image labelled alone by its oracle score; the file reads as unpaired data."""
    from diffalign.config import ModelConfig
    from diffalign.data.unpaired import load_unpaired_source
    from diffalign.models import load_pipeline
    from diffalign.world.pairs import make_labelled

    pipe = load_pipeline(ModelConfig(family="sd15", pretrained=str(pretrained_tiny["unet"][0])))
    caps = ["a small red circle at the top left on a black background", "a large blue square in the center on a white background"]
    out = tmp_path / "labels.parquet"
    import pyarrow.parquet as pq

    threshold = 0.3
    stats = make_labelled(pipe, caps, out, k=3, steps=2, threshold=threshold, show_progress=False)
    table = pq.read_table(out).to_pydict()
    assert stats["images"] == 6 and stats["desirable"] + stats["undesirable"] == 6
    assert table["caption"] == [c for c in caps for _ in range(3)]
    assert table["label"] == ["desirable" if s >= threshold else "undesirable" for s in table["score"]]
    source = load_unpaired_source(str(out))
    assert [r.desirable for r in source.records] == [s >= threshold for s in table["score"]]


def test_permutation_test_and_win_rate():
    from diffalign.world.demo import paired_permutation_p, win_rate

    assert win_rate(np.array([1.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.5])) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    assert paired_permutation_p(rng.normal(0.5, 0.2, 40)) < 0.001
    assert paired_permutation_p(rng.normal(0.0, 0.2, 40)) > 0.01
    assert paired_permutation_p(np.zeros(5)) == 1.0


def test_quick_demo_writes_a_well_formed_report(pretrained_tiny, tmp_path):
    from diffalign.world.demo import run_demo

    folder = pretrained_tiny["unet"][0]
    report = run_demo("unet", tmp_path / "demo", quick=True, overrides=[f"model.pretrained={folder}"], show_progress=False)
    for key in ("objective", "family", "steps", "prompts_heldout", "oracle_before", "oracle_after", "win_rate",
                "per_dimension"):
        assert key in report, key
    assert report["objective"] == "diffusion-dpo" and report["prompts_heldout"] == 8
    # the unet demo runs two DPO rounds; round 2 trains on pairs from round 1's fused model, saved as a folder
    rounds = report["rounds"]
    assert [r["steps"] for r in rounds] == [4, 4] and report["steps"] == 8
    assert rounds[0]["model"] == str(folder)
    start_model = tmp_path / "demo" / "round2" / "start-model"
    assert rounds[1]["model"] == str(start_model) and report["outputs"]["lora_applies_to"] == str(start_model)
    assert (tmp_path / "demo" / "pairs.parquet").exists() and (tmp_path / "demo" / "round2" / "pairs.parquet").exists()
    assert [step for step, _ in report["reward_curve"]][-1] == 8
    assert 0.0 <= report["win_rate"] <= 1.0 and set(report["per_dimension"]) == {"color", "shape", "background", "layout"}
    assert report["base_reproduced_with_adapters_disabled"], "adapters disabled must give the base model's samples"
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["win_rate"] == report["win_rate"]
    from PIL import Image

    grid = Image.open(tmp_path / "demo" / "samples.png")  # labelled figure: one column per sample, two rows
    n = min(12, report["samples_heldout"])
    assert grid.size == (round((1.25 * n + 0.6) * 110), round(3.6 * 110))
    assert Image.open(tmp_path / "demo" / "reward_curve.png").size[0] > 100
    assert len(report["reward_curve"]) >= 1


def test_heldout_samples_and_the_masked_comparison_by_hand():
    from diffalign.world.demo import compare, demo_prompts, heldout_samples, world_spec

    spec = world_spec("unet")
    train, held = demo_prompts(spec, {"train_prompts": 5, "heldout_prompts": 3})
    assert len(train) == 5 and len(held) == 3 and not set(train) & {s.caption() for s in held}
    assert demo_prompts(spec, {"train_prompts": 5, "heldout_prompts": 3}) == (train, held)  # deterministic
    caps, seeds, unseen = heldout_samples(spec, held, 2, seed_stride=2)
    assert caps == [held[0].caption()] * 2 + [held[1].caption()] * 2 + [held[2].caption()] * 2
    assert seeds == [10_000, 10_002, 10_004, 10_006, 10_008, 10_010]
    assert unseen.dtype == bool and unseen.tolist() == [spec.unseen(s) for s in held for _ in range(2)]

    dims = ("color",)
    before = {"overall": np.array([0.1, 0.5, 0.3, 0.9]), "color": np.array([0.2, 0.2, 0.2, 0.2])}
    after = {"overall": np.array([0.4, 0.4, 0.3, 1.0]), "color": np.array([0.3, 0.2, 0.2, 0.6])}
    mask = np.array([True, False, False, True])
    sub = compare(before, after, dims, mask=mask)  # samples 0 and 3: gains +0.3 and +0.1
    assert sub["n"] == 2 and sub["gain"] == pytest.approx(0.2) and sub["win_rate"] == 1.0
    assert sub["per_dimension"]["color"]["gain"] == pytest.approx(0.25)
    assert compare(before, after, dims)["win_rate"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_demo_refuses_zero_rounds(tmp_path):
    from diffalign.world.demo import run_demo

    with pytest.raises(ValueError, match="at least one DPO round"):
        run_demo("flow", tmp_path / "demo", rounds=0)
    assert not (tmp_path / "demo").exists()  # refused before anything is written


def test_grid_spreads_its_samples_and_labels_the_change_against_the_same_seed_base_sample():
    from diffalign.world.demo import score_label, spread_indices

    assert spread_indices(420, 12).tolist() == [0, 38, 76, 114, 152, 190, 229, 267, 305, 343, 381, 419]
    assert spread_indices(5, 12).tolist() == [0, 1, 2, 3, 4] and spread_indices(1, 12).tolist() == [0]

    assert score_label(0.7) == ("0.70", "black")
    assert score_label(0.62, 0.57) == ("0.62 (+0.05)", "tab:green")
    assert score_label(0.50, 0.61) == ("0.50 (-0.11)", "tab:red")
    assert score_label(0.500, 0.502) == ("0.50 (-0.00)", "grey")  # within half a hundredth: no colour claim


def test_fused_round_model_samples_what_the_lora_samples(pretrained_tiny, tmp_path):
    """fuse_lora_into_folder (the demo's round r -> r+1 hand-over) saves a loadable pipeline whose samples equal
    the base + LoRA samples, and which differs from the base (the LoRA is really fused)."""
    import torch
    from diffalign.config import load_config
    from diffalign.models import load_adapter
    from diffalign.samplers.api import load_lora
    from diffalign.world.demo import fuse_lora_into_folder
    from diffalign.world.pairs import generate

    folder = pretrained_tiny["unet"][0]
    cfg = load_config("world-unet-dpo", [f"model.pretrained={folder}"])
    adapter = load_adapter(cfg.model)
    lora_dir = tmp_path / "lora"
    from peft import LoraConfig

    torch.manual_seed(0)
    adapter.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    adapter.save_lora(adapter.denoiser, str(lora_dir))
    caps, seeds = ["a small red circle on a blue background"] * 2, [1, 2]
    base = load_adapter(cfg.model)
    base_images = generate(base.pipe, caps, seeds, steps=4)
    load_lora(base, str(lora_dir))
    lora_images = generate(base.pipe, caps, seeds, steps=4)
    fuse_lora_into_folder(cfg, lora_dir, tmp_path / "fused")
    fused = load_adapter(load_config("world-unet-dpo", [f"model.pretrained={tmp_path / 'fused'}"]).model)
    fused_images = generate(fused.pipe, caps, seeds, steps=4)
    assert np.abs(fused_images.astype(int) - lora_images).max() <= 1
    assert np.abs(base_images.astype(int) - lora_images).max() > 5


@pytest.mark.parametrize("kind,family", [("unet", "sd15"), ("flow", "sd3")])
def test_bundled_generators_load_through_from_pretrained_and_follow_captions(kind, family):
    from diffalign.config import ModelConfig
    from diffalign.models import load_adapter
    from diffalign.world.oracle import score
    from diffalign.world.pairs import generate
    from diffalign.world.scenes import prompt_splits

    adapter = load_adapter(ModelConfig(family=family, pretrained=f"world:{kind}", max_sequence_length=1))
    assert (adapter.pipe.config._name_or_path or "").endswith(f"bundled/{kind}")
    train, _ = prompt_splits(0)
    caps = [s.caption() for s in train[::64]]
    from diffalign.world.generators import build_world_pipeline

    seeds = list(range(len(caps)))
    trained = score(generate(adapter.pipe, caps, seeds, steps=10), caps)["overall"]
    untrained = score(generate(build_world_pipeline(kind, adapter.vae), caps, seeds, steps=10), caps)["overall"]
    # measured 2026-11-22: unet 0.391 vs 0.130 untrained, flow 0.546 vs 0.175
    assert trained.mean() > untrained.mean() + 0.15, (trained, untrained)


@pytest.mark.parametrize("kind,family", [
    pytest.param("unet", "sd15", marks=pytest.mark.xfail(strict=True, reason=(
        "known limitation: the bundled UNet ignores position words (BENCHMARKS, 'The UNet ignores position "
        "words'); a UNet that learns them turns this into XPASS, which fails: then drop this mark"))),
    ("flow", "sd3")])
def test_bundled_generators_place_the_object_where_the_caption_says(kind, family):
    """Position words steer the object to the captioned quadrant (flow). The bundled UNet's objects land
    anywhere whatever the caption says: its per-position mean centroids all sit at the image centre."""
    from diffalign.config import ModelConfig
    from diffalign.models import load_adapter
    from diffalign.world.oracle import measure
    from diffalign.world.pairs import generate
    from diffalign.world.scenes import Scene

    adapter = load_adapter(ModelConfig(family=family, pretrained=f"world:{kind}", max_sequence_length=1))
    corners = {"top left": (-1, -1), "top right": (1, -1), "bottom left": (-1, 1), "bottom right": (1, 1)}
    scenes = [Scene(shape=shape, color=color, size="small", position=pos, background="white")
              for pos in corners for shape, color in [("circle", "red"), ("square", "blue"), ("triangle", "green")]]
    caps = [s.caption() for s in scenes for _ in range(2)]
    centroid = measure(generate(adapter.pipe, caps, list(range(len(caps))), steps=10)).centroid - 0.5  # [N, (x, y)]
    sign = np.array([corners[s.position] for s in scenes for _ in range(2)])
    # the object sits on the captioned side of the centre, on both axes, for most samples
    on_side = (np.sign(centroid) == sign).all(axis=1)
    assert on_side.mean() >= 0.75, (on_side.mean(), centroid.round(2).tolist())
