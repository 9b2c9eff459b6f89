"""diffalign.samplers: the sampling loop against the diffusers pipelines, guidance math and order, RLG
identities, reward-guidance sign/weights/clamp, video latents, media + sidecar reproducibility, CLI errors.

Tiny models ('tiny:<family>', built offline and loaded back through from_pretrained) on the CPU."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from diffalign.cli import main
from diffalign.config import LoraConfig, ModelConfig
from diffalign.models import load_adapter
from diffalign.rewards import Reward, RewardError
from diffalign.samplers import (CFG, RLG, CleanRewardGuidance, GuidanceStack, NoisyRewardGuidance, SampleConfig,
                                Sampler, StepState)
from diffalign.samplers.guidance import max_ratio, rescale_cfg, score_to_prediction_scale, x0_from_prediction
from diffalign.samplers.loop import build_stepper

# diffusers' multistep schedulers trip a numpy-2 DeprecationWarning inside diffusers itself
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FAMILY_KW = {"sd15": {}, "sd15-v": {}, "sdxl": {}, "sd3": {"max_sequence_length": 16},
             "flux": {"max_sequence_length": 16, "height": 16, "width": 16}}
PROMPTS = ["a red square on a blue background", "a green circle"]


def _config(name: str, **kw) -> SampleConfig:
    base = dict(model=f"tiny:{name}", prompts=PROMPTS, steps=4, guidance_scale=4.0, batch_size=2, progress=False,
                device="cpu", **FAMILY_KW[name])
    base.update(kw)
    return SampleConfig(**base)


_ADAPTERS: dict[str, object] = {}


def _adapter(name: str):
    """A LoRA-free adapter per tiny model, loaded once per test session (read-only use only)."""
    if name not in _ADAPTERS:
        family = name.partition("-")[0]
        _ADAPTERS[name] = load_adapter(ModelConfig(family=family, pretrained=f"tiny:{name}", max_sequence_length=16))
    return _ADAPTERS[name]


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    """A LoRA with random NONZERO weights per family, saved in the diffusers format (what `diffalign train` writes)."""
    dirs = {}
    for family in ("sd15", "sd3"):
        adapter = load_adapter(ModelConfig(family=family, pretrained=f"tiny:{family}", max_sequence_length=16))
        adapter.add_lora(LoraConfig(rank=4))
        gen = torch.Generator().manual_seed(1)
        for name, p in adapter.denoiser.named_parameters():
            if "lora_B" in name:  # B is zero-initialised: without this the LoRA would be a no-op
                p.data = 0.3 * torch.randn(p.shape, generator=gen)
        dirs[family] = tmp_path_factory.mktemp(f"lora-{family}")
        adapter.save_lora(adapter.denoiser, str(dirs[family]))
    return dirs


class DecodedBrightness(Reward):
    """A latent reward preferring brighter images: mean RGB of the VAE-decoded latent on the 0-255 scale
    (unclamped, differentiable). The tiny random VAE is nearly flat (grad ~1e-2 per latent element), hence the
    large guidance scales in the tests."""

    name = "decoded_brightness"
    dimensions = ("brightness",)
    input_kind = "latent"
    differentiable = True

    def __init__(self, adapter):
        self.adapter = adapter

    def score(self, inputs, prompts=None, *, fps=None, t=None):
        return {"brightness": 255 * self.adapter.decode_latents(inputs, clamp=False).flatten(1).mean(1)}


class ImageBrightness(Reward):
    name = "image_brightness"
    dimensions = ("brightness",)
    input_kind = "image"
    differentiable = True

    def score(self, inputs, prompts=None, *, fps=None, t=None):
        return {"brightness": 255 * inputs.flatten(1).mean(1)}  # 0-255 scale, like DecodedBrightness


class LinearLatentReward(Reward):
    """r_k(x) = sum(d_k * x): grad_x r_k = d_k exactly, so guidance terms can be checked by hand."""

    name = "linear"
    input_kind = "latent"
    differentiable = True

    def __init__(self, directions: dict[str, torch.Tensor]):
        self.directions = directions
        self.dimensions = tuple(directions)

    def score(self, inputs, prompts=None, *, fps=None, t=None):
        assert t is not None and t.shape == (inputs.shape[0],)  # unit time, one per sample
        return {k: (inputs * d).flatten(1).sum(1) for k, d in self.directions.items()}


def _brightness(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64).mean(1)


# ----------------------------------------------------------------------------------------------- the loop
@pytest.mark.parametrize("name", ["sd15", "sd15-v", "sdxl", "sd3", "flux"])
def test_cfg_sampling_reproduces_the_diffusers_pipeline(name):
    """Same seeds, same scheduler (DDIM.from_config for UNets; the pipeline's FlowMatchEuler for flows), CFG
    only: the loop's latents equal the pipeline's output_type='latent' and the decoded images match."""
    from diffusers import DDIMScheduler

    cfg = _config(name, guidance_scale=1.0 if name == "flux" else 4.0)  # FLUX: guidance embedding, no true CFG
    sampler = Sampler(cfg, adapter=_adapter(name))
    result = sampler.sample()
    pipe = sampler.adapter.pipe
    saved = pipe.scheduler
    if not sampler.adapter.is_flow:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    kw = {"max_sequence_length": 16} if name in ("sd3", "flux") else {}
    kw["guidance_scale"] = 3.5 if name == "flux" else 4.0  # FLUX: the guidance-embedding value (ModelConfig default)
    kw.update({"height": 16, "width": 16} if name == "flux" else {})
    try:
        pipe.set_progress_bar_config(disable=True)
        gens = lambda: [torch.Generator().manual_seed(s) for s in result.seeds]  # noqa: E731
        latents = pipe(prompt=result.prompts, num_inference_steps=4, generator=gens(), output_type="latent", **kw).images
        images = pipe(prompt=result.prompts, num_inference_steps=4, generator=gens(), output_type="np", **kw).images
    finally:
        pipe.scheduler = saved
    if name == "flux":  # FluxPipeline returns packed latents
        latents = pipe._unpack_latents(latents, 16, 16, pipe.vae_scale_factor)
    assert result.seeds == [0, 1] and result.latents.shape == latents.shape
    torch.testing.assert_close(result.latents, latents.float(), atol=1e-5, rtol=1e-5)
    expected = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    assert np.abs(result.images.astype(int) - expected.astype(int)).max() <= 1
    assert result.latents.abs().max() > 0.1  # not a degenerate all-zero comparison


def test_each_sample_depends_only_on_its_own_seed():
    """Batched with other prompts/seeds or alone: the same (prompt, seed) gives the same sample, also with a
    stochastic sampler (flow SDE) whose per-step noise must come from the sample's own generator."""
    for name, kw in [("sd15", {}), ("sd3", {"sde_noise": 0.7})]:
        sampler = Sampler(_config(name, **kw), adapter=_adapter(name))
        both = sampler.sample(prompts=PROMPTS, seeds=[5, 9])
        alone = sampler.sample(prompts=PROMPTS[1:], seeds=[9])
        torch.testing.assert_close(both.latents[1:], alone.latents, atol=1e-5, rtol=1e-5)
        other_seed = sampler.sample(prompts=PROMPTS[1:], seeds=[10])
        assert (other_seed.latents - alone.latents).abs().max() > 1e-2
    sde = Sampler(_config("sd3", sde_noise=0.7), adapter=_adapter("sd3")).sample()
    ode = Sampler(_config("sd3"), adapter=_adapter("sd3")).sample()
    assert (sde.latents - ode.latents).abs().max() > 1e-2  # the SDE really injects noise


def test_negative_prompt_changes_the_unconditional_branch():
    plain = Sampler(_config("sd15"), adapter=_adapter("sd15")).sample()
    neg = Sampler(_config("sd15", negative_prompt="blurry"), adapter=_adapter("sd15")).sample()
    assert (plain.latents - neg.latents).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------- RLG
@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_rlg_w0_is_the_base_model_and_w1_the_aligned_model(family, lora_dirs):
    lora = str(lora_dirs[family])
    base = Sampler(_config(family), adapter=_adapter(family)).sample()  # a model that never saw the LoRA
    aligned = Sampler(_config(family, lora=lora)).sample()               # LoRA on, no RLG
    rlg = Sampler(_config(family, lora=lora, rlg=0.0))
    assert rlg.guidance.networks == ("base", "aligned")
    w0 = rlg.sample()
    rlg.guidance.combine.scale = 1.0
    w1 = rlg.sample()
    rlg.guidance.combine.scale = 2.0
    w2 = rlg.sample()
    assert (aligned.latents - base.latents).abs().max() > 1e-2  # the LoRA matters, so the identities are not vacuous
    torch.testing.assert_close(w0.latents, base.latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1.latents, aligned.latents, atol=1e-5, rtol=1e-5)
    assert (w2.latents - aligned.latents).abs().max() > 1e-2  # w > 1 extrapolates beyond the aligned model


def test_load_lora_reads_every_layer_of_a_legacy_mixed_format_file(tmp_path):
    """LoRAs written before the save fix: with SD3 context projections among the targets, to_q/k/v/out were
    saved as old lora.down/up keys beside peft lora_A/B ones, and diffusers alone drops the old-style layers of
    such a file (measured on a world:flow LoRA: 15 of 31 layers). load_lora must bring every layer in."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file, save_file

    from diffalign.config import LoraConfig
    from diffalign.samplers.api import _unmixed_lora, load_lora

    adapter = load_adapter(ModelConfig(family="sd3", pretrained="tiny:sd3", max_sequence_length=16))
    adapter.add_lora(LoraConfig(rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                        "add_k_proj", "add_v_proj"]))
    gen = torch.Generator().manual_seed(2)
    for name, p in adapter.denoiser.named_parameters():
        if "lora_B" in name:
            p.data = 0.3 * torch.randn(p.shape, generator=gen)
    adapter.save_lora(adapter.denoiser, str(tmp_path / "clean"))
    src = load_file(str(tmp_path / "clean" / "pytorch_lora_weights.safetensors"))
    assert _unmixed_lora(tmp_path / "clean" / "pytorch_lora_weights.safetensors") is None  # current files are clean
    legacy = {(k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
               if any(f".attn.{m}." in k for m in ("to_q", "to_k", "to_v", "to_out.0")) else k): v
              for k, v in src.items()}
    (tmp_path / "legacy").mkdir()
    save_file(legacy, str(tmp_path / "legacy" / "pytorch_lora_weights.safetensors"))
    fresh = load_adapter(ModelConfig(family="sd3", pretrained="tiny:sd3", max_sequence_length=16))
    load_lora(fresh, str(tmp_path / "legacy"))
    loaded = {n: next(iter(m.lora_B.values())).weight for n, m in fresh.denoiser.named_modules()
              if isinstance(m, LoraLayer) and m.lora_B}
    want = {k.removeprefix("transformer.").removesuffix(".lora_B.weight"): v for k, v in src.items() if ".lora_B." in k}
    assert set(loaded) == set(want), sorted(set(want) - set(loaded))[:4]
    for name, w in want.items():
        torch.testing.assert_close(loaded[name].detach(), w)


def test_rlg_with_two_models_base_model_and_aligned_full_finetune(tmp_path):
    """RLG across two separate networks (a full fine-tune): w=0 is the base folder's samples, w=1 the aligned's."""
    from diffalign.models import load_pipeline

    pipe = load_pipeline(ModelConfig(family="sd15", pretrained="tiny:sd15"))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in pipe.unet.parameters():  # a "fine-tuned" copy: every weight nudged
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    pipe.save_pretrained(tmp_path / "aligned")
    aligned_only = Sampler(_config("sd15", model=str(tmp_path / "aligned"))).sample()
    base_only = Sampler(_config("sd15"), adapter=_adapter("sd15")).sample()
    rlg = Sampler(_config("sd15", model=str(tmp_path / "aligned"), base_model="tiny:sd15", rlg=0.0))
    w0 = rlg.sample()
    rlg.guidance.combine.scale = 1.0
    w1 = rlg.sample()
    assert (aligned_only.latents - base_only.latents).abs().max() > 1e-2
    torch.testing.assert_close(w0.latents, base_only.latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1.latents, aligned_only.latents, atol=1e-5, rtol=1e-5)


def test_rlg_schedule_and_lerp_endpoints():
    ramp = RLG(2.0, end_scale=0.0)
    assert [ramp.weight(i, 5) for i in range(5)] == [2.0, 1.5, 1.0, 0.5, 0.0]
    assert RLG(lambda i, n: i / n).weight(3, 4) == 0.75
    base, aligned = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    state = SimpleNamespace(step=0, num_steps=1)
    assert torch.equal(RLG(0.0)({"base": base, "aligned": aligned}, state), base)      # bit-exact endpoints
    assert torch.equal(RLG(1.0)({"base": base, "aligned": aligned}, state), aligned)
    torch.testing.assert_close(RLG(2.5)({"base": base, "aligned": aligned}, state), base + 2.5 * (aligned - base))


# ----------------------------------------------------------------------------------------------- guidance order
def _state(x, t, prediction_type="flow_velocity"):
    t = torch.full((x.shape[0],), t)
    alpha, sigma = (1 - t, t) if prediction_type == "flow_velocity" else ((1 - t) ** 0.5, t ** 0.5)
    return StepState(adapter=SimpleNamespace(prediction_type=prediction_type), x=x, t=t, t_unit=t, alpha=alpha,
                     sigma=sigma, step=0, num_steps=1, prompts=["p"] * x.shape[0])


def test_guidance_composes_cfg_then_rlg_then_reward_whatever_the_given_order():
    """Distinct outputs for every (network, branch); a non-linear CFG (rescale) and a reward with a known
    gradient. The composed prediction must equal the documented formula, which differs from RLG-before-CFG,
    reward-before-CFG (on the conditional branch) and reward-before-RLG (on the aligned network)."""
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 3, 3)
    out = {(net, br): torch.randn(shape, generator=g) * (1 + i) for i, (net, br) in
           enumerate([(n, b) for n in ("base", "aligned") for b in ("cond", "uncond")])}
    direction = torch.randn(shape[1:], generator=g)
    x = torch.randn(shape, generator=g)
    s, rescale, w, k, t = 3.0, 0.7, 1.7, 0.4, 0.6
    calls = []

    def evaluate(name, with_uncond):
        calls.append((name, with_uncond))
        return out[(name, "cond")], out[(name, "uncond")]

    nrg = NoisyRewardGuidance(LinearLatentReward({"r": direction}), scale=k)
    stack = GuidanceStack([nrg, RLG(w), CFG(s, rescale)])  # scrambled on purpose: the stack fixes the order
    assert [type(term).__name__ for term in stack.terms] == ["CFG", "RLG", "NoisyRewardGuidance"]
    got = stack(evaluate, _state(x, t))
    assert calls == [("base", True), ("aligned", True)]

    def cfg(cond, uncond):
        return rescale_cfg(uncond + s * (cond - uncond), cond, rescale)

    base_cfg = cfg(out[("base", "cond")], out[("base", "uncond")])
    aligned_cfg = cfg(out[("aligned", "cond")], out[("aligned", "uncond")])
    reward_term = k * (t / (1 - t)) * direction  # flow: v - scale * t/(1-t) * grad r
    expected = base_cfg + w * (aligned_cfg - base_cfg) - reward_term
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # the wrong orders give different numbers, so the check above discriminates
    rlg_first = cfg(torch.lerp(out[("base", "cond")], out[("aligned", "cond")], w),
                    torch.lerp(out[("base", "uncond")], out[("aligned", "uncond")], w)) - reward_term
    reward_before_cfg = torch.lerp(cfg(out[("base", "cond")] - reward_term, out[("base", "uncond")]),  # on the
                                   cfg(out[("aligned", "cond")] - reward_term, out[("aligned", "uncond")]), w)  # cond branch
    reward_before_rlg = base_cfg + w * (aligned_cfg - reward_term - base_cfg)
    for wrong in (rlg_first, reward_before_cfg, reward_before_rlg):
        assert (wrong - got).abs().max() > 1e-2


def test_guidance_stack_rejects_two_terms_of_a_single_slot():
    with pytest.raises(ValueError, match="at most one 'cfg'"):
        GuidanceStack([CFG(2.0), CFG(3.0)])
    with pytest.raises(ValueError, match="at most one 'combine'"):
        GuidanceStack([RLG(1.0), RLG(2.0)])
    assert GuidanceStack([]).networks == ("model",) and not GuidanceStack([]).cfg.needs_uncond


# ----------------------------------------------------------------------------------------------- reward math
def test_score_relation_coefficients_and_the_t_over_one_minus_t_clamp():
    t = torch.tensor([0.0, 0.5, 0.9, 0.99, 1.0])
    cap = max_ratio(0.95)
    assert cap == pytest.approx(19.0)
    flow = score_to_prediction_scale("flow_velocity", 1 - t, t, cap)
    torch.testing.assert_close(flow, torch.tensor([0.0, 1.0, 9.0, 19.0, 19.0]))  # t/(1-t), capped; finite at t=1
    assert torch.isinf(score_to_prediction_scale("flow_velocity", 1 - t, t)[-1])  # why the clamp exists
    assert score_to_prediction_scale("flow_velocity", 1 - t, t, max_ratio(0.5))[2] == pytest.approx(1.0)
    abar = torch.tensor([0.9, 0.5, 1e-3])
    a, s = abar.sqrt(), (1 - abar).sqrt()
    torch.testing.assert_close(score_to_prediction_scale("epsilon", a, s), s)  # eps' = eps - sigma * Delta
    torch.testing.assert_close(score_to_prediction_scale("v_prediction", a, s), s / a)
    eps_capped = score_to_prediction_scale("epsilon", a, s, cap)  # sigma/alpha = 31.6 > 19 at abar=1e-3
    torch.testing.assert_close(eps_capped, torch.stack([s[0], s[1], a[2] * 19]))


def test_eps_v_and_flow_reward_guidance_agree_through_the_score():
    """A VP model rewritten in flow coordinates (x_f = x/(a+s), t_f = s/(a+s)): flow-NRG on the velocity gives
    the same eps' = eps - sigma w grad r as the eps form, and the v form gives the same x0/eps as well."""
    g = torch.Generator().manual_seed(0)
    x, eps, grad = (torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    abar = torch.tensor([0.8, 0.3, 0.05], dtype=torch.float64)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    b = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    w = 0.7
    eps_guided = eps - b(score_to_prediction_scale("epsilon", a, s)).double() * w * grad
    # flow coordinates: x_f = x / (a + s), t_f = s / (a + s); r(x) = r((a+s) x_f) -> grad_f = (a + s) grad
    x_f, t_f, grad_f = x / b(a + s), s / (a + s), b(a + s) * grad
    x0 = (x - b(s) * eps) / b(a)
    v_f = eps - x0
    v_f_guided = v_f - b(score_to_prediction_scale("flow_velocity", 1 - t_f, t_f)).double() * w * grad_f
    eps_from_flow = x_f + b(1 - t_f) * v_f_guided
    torch.testing.assert_close(eps_from_flow, eps_guided)
    # v-prediction: v = a eps - s x0; guided v maps back to the same guided eps (eps = a v + s x)
    v = b(a) * eps - b(s) * x0
    v_guided = v - b(score_to_prediction_scale("v_prediction", a, s)).double() * w * grad
    torch.testing.assert_close(b(a) * v_guided + b(s) * x, eps_guided)
    torch.testing.assert_close(x0_from_prediction("v_prediction", x, v, a, s), x0)
    torch.testing.assert_close(x0_from_prediction("epsilon", x, eps, a, s), x0)


def test_nrg_per_dimension_weights_select_dimensions():
    g = torch.Generator().manual_seed(0)
    d_a, d_b = torch.randn(4, 3, 3, generator=g), torch.randn(4, 3, 3, generator=g)
    reward = LinearLatentReward({"VQ": d_a, "TA": d_b})
    x, pred, t = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g), 0.5  # t/(1-t) = 1
    state = _state(x, t)
    only_a = NoisyRewardGuidance(reward, {"VQ": 1.0}, scale=2.0)(pred, state)
    only_b = NoisyRewardGuidance(reward, {"TA": 1.0}, scale=2.0)(pred, state)
    mixed = NoisyRewardGuidance(reward, {"VQ": 0.5, "TA": -3.0}, scale=2.0)(pred, state)
    default = NoisyRewardGuidance(reward, None, scale=2.0)(pred, state)  # every dimension at weight 1
    torch.testing.assert_close(only_a, pred - 2.0 * d_a)
    torch.testing.assert_close(only_b, pred - 2.0 * d_b)
    torch.testing.assert_close(mixed, pred - 2.0 * (0.5 * d_a - 3.0 * d_b))
    torch.testing.assert_close(default, pred - 2.0 * (d_a + d_b))
    with pytest.raises(RewardError, match="unknown dimension"):
        NoisyRewardGuidance(reward, {"MQ": 1.0})
    with pytest.raises(RewardError, match="noise-aware latent reward"):
        NoisyRewardGuidance(ImageBrightness())
    # the eps form uses sigma (not t/(1-t)): at abar = 0.5 that is sqrt(0.5)
    eps_state = _state(x, 0.5, "epsilon")
    torch.testing.assert_close(NoisyRewardGuidance(reward, {"VQ": 1.0})(pred, eps_state), pred - 0.5 ** 0.5 * d_a)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_nrg_with_a_brightness_reward_brightens_and_a_negative_weight_darkens(family):
    adapter = _adapter(family)
    reward = DecodedBrightness(adapter)
    runs = {}
    for scale in (-20.0, 0.0, 20.0):
        sampler = Sampler(_config(family, steps=6, nrg_scale=scale, seeds=[3, 4]), adapter=adapter, nrg_reward=reward)
        runs[scale] = _brightness(sampler.sample().images)
    assert "NRG(decoded_brightness" in sampler.guidance.describe()
    assert (runs[20.0] > runs[0.0] + 1).all(), runs    # every sample brighter (0-255 scale)
    assert (runs[-20.0] < runs[0.0] - 1).all(), runs   # and darker with a negative weight


def test_clean_reward_guidance_through_x0_brightens():
    adapter = _adapter("sd3")
    dark = Sampler(_config("sd3", steps=6, clean_scale=-2.0), adapter=adapter, clean_reward=ImageBrightness()).sample()
    plain = Sampler(_config("sd3", steps=6), adapter=adapter).sample()
    bright = Sampler(_config("sd3", steps=6, clean_scale=2.0), adapter=adapter, clean_reward=ImageBrightness()).sample()
    assert (_brightness(bright.images) > _brightness(plain.images) + 1).all()
    assert (_brightness(dark.images) < _brightness(plain.images) - 1).all()
    with pytest.raises(RewardError, match="decoded pixels"):
        CleanRewardGuidance(DecodedBrightness(adapter))


# ----------------------------------------------------------------------------------------------- video (5-D)
class ToyVideoAdapter:
    """A flow 'video family' on [N, C, F, h, w] latents (a Conv3d denoiser, identity 'VAE' on 3 channels): enough
    adapter surface to drive the loop, NRG and the video writers without a real video model."""

    family, is_flow, prediction_type, denoiser_attr, default_cfg_scale = "toy-video", True, "flow_velocity", "net", 2.0

    def __init__(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        torch.manual_seed(0)
        self.denoiser = nn.Conv3d(4, 4, 3, padding=1)
        self.pipe = SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
        self.device = torch.device("cpu")

    def encode_prompts(self, captions):
        return {"prompt_embeds": torch.tensor([[len(c) / 10.0] for c in captions])}

    def encode_negative_prompts(self, negatives, n):
        return self.encode_prompts(negatives if negatives is not None else [""] * n)

    def predict(self, model, x_t, t, text, micro=None):
        return model(x_t) + text["prompt_embeds"].view(-1, 1, 1, 1, 1) * t.view(-1, 1, 1, 1, 1)

    def unit_time(self, t):
        return t.float()

    def noise_coefficients(self, t):
        return 1 - t.float(), t.float()

    def default_resolution(self):
        return 8, 8

    def latent_shape(self, height, width, num_frames=None):
        return (4, num_frames or 5, height, width)

    def timestep_kwargs(self, num_steps, latent_shape):
        return {}

    def decode_latents(self, latents, clamp=True):
        frames = torch.sigmoid(latents[:, :3].transpose(1, 2))  # [N, F, 3, h, w]
        return frames.clamp(0, 1) if clamp else frames


class MeanLatent(Reward):
    name, dimensions, input_kind, differentiable = "mean_latent", ("m",), "latent", True

    def score(self, inputs, prompts=None, *, fps=None, t=None):
        return {"m": inputs[:, :3].flatten(1).mean(1)}


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
def test_video_latents_are_five_dimensional_end_to_end(tmp_path, fmt):
    import imageio.v3 as iio

    adapter = ToyVideoAdapter()
    cfg = SampleConfig(model="toy", prompts=["a ball", "rain"], steps=3, num_frames=6, fps=10.0, video_format=fmt,
                       progress=False, nrg_scale=0.5, out=str(tmp_path))
    result = Sampler(cfg, adapter=adapter, nrg_reward=MeanLatent()).sample()
    assert result.latents.shape == (2, 4, 6, 8, 8) and result.images.shape == (2, 6, 8, 8, 3)
    assert [f.suffix for f in result.files] == [f".{fmt}"] * 2
    frames = iio.imread(result.files[0])
    assert frames.shape[:3] == (6, 8, 8)
    assert Image.open(result.grid).size == (8 + 2 * 2, 2 * 8 + 3 * 2)  # 2 samples stacked (1 per prompt), 2 px pad
    unguided = Sampler(SampleConfig(**{**cfg.__dict__, "nrg_scale": 0.0, "out": None}), adapter=adapter,
                       nrg_reward=MeanLatent()).sample()
    assert result.latents[:, :3].mean() > unguided.latents[:, :3].mean()  # NRG acted on the 5-D latents


# ----------------------------------------------------------------------------------------------- outputs + CLI
def test_sidecar_records_every_setting_and_seed_and_reproduces_the_images(tmp_path, capsys):
    out = tmp_path / "first"
    code = main(["sample", "--model", "tiny:sd15", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num-per-prompt",
                 "2", "--seed", "11", "--steps", "3", "--guidance-scale", "3", "--negative-prompt", "ugly",
                 "--batch-size", "3", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "== diffalign sample: summary ==" in printed and str(out / "samples.json") in printed
    side = json.loads((out / "samples.json").read_text())
    import dataclasses

    assert set(side["config"]) == {f.name for f in dataclasses.fields(SampleConfig)}
    c = side["config"]
    assert (c["model"], c["family"], c["steps"], c["guidance_scale"], c["negative_prompt"], c["scheduler"],
            c["height"], c["dtype"]) == ("tiny:sd15", "sd15", 3, 3.0, "ugly", "ddim", 32, "float32")
    assert [s["seed"] for s in side["samples"]] == [11, 12, 13, 14]
    assert [s["prompt"] for s in side["samples"]] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert all((out / s["file"]).is_file() for s in side["samples"]) and (out / side["grid"]).is_file()
    assert side["guidance"] == "CFG(scale=3)" and side["software"]["torch"] == torch.__version__

    again = tmp_path / "again"
    assert main(["sample", "--from-sidecar", str(out / "samples.json"), "--out", str(again), "--no-progress"]) == 0
    for s in side["samples"]:
        assert np.array_equal(np.asarray(Image.open(out / s["file"])), np.asarray(Image.open(again / s["file"])))
    # the same through the Python API
    api = Sampler(SampleConfig.from_sidecar(out)).sample()
    assert np.array_equal(api.images[3], np.asarray(Image.open(out / side["samples"][3]["file"])))


@pytest.mark.parametrize("extra,needle", [
    (["--model", "{tmp}/no-such-model"], "no-such-model"),
    (["--model", "{tmp}"], "no model_index.json"),
    (["--model", "tiny:sd15", "--lora", "{tmp}/missing-lora"], "--lora"),
    (["--model", "tiny:sd15", "--nrg-reward", "{tmp}/missing-reward"], "--nrg-reward"),
    (["--model", "tiny:sd15", "--nrg", "VQ=1"], "--nrg needs --nrg-reward"),
    (["--model", "tiny:sd15", "--rlg", "1.5"], "--rlg needs"),
    (["--model", "tiny:sd15", "--rlg", "1.5", "--base-model", "{tmp}/no-base"], "--base-model"),
    (["--model", "tiny:sd15", "--scheduler", "heun"], "unknown scheduler 'heun'"),
])
def test_cli_errors_are_clear_and_exit_2(extra, needle, tmp_path, capsys):
    args = ["sample", "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "o"), "--no-progress"]
    code = main(args + [a.replace("{tmp}", str(tmp_path)) for a in extra])
    assert code == 2
    assert needle in capsys.readouterr().err


def test_cli_lora_folder_without_weights_and_missing_prompts_file(tmp_path, capsys):
    (tmp_path / "empty-lora").mkdir()
    assert main(["sample", "--model", "tiny:sd15", "--lora", str(tmp_path / "empty-lora"), "--prompt", "x",
                 "--out", str(tmp_path / "o")]) == 2
    assert "no .safetensors" in capsys.readouterr().err
    assert main(["sample", "--model", "tiny:sd15", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path)]) == 2
    assert "p.txt" in capsys.readouterr().err


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "euler", "euler_a", "dpm++", "pndm", "unipc", "pipeline"])
def test_every_eps_scheduler_samples_with_per_sample_seeds(scheduler):
    """Stochastic schedulers (ddpm, euler_a) draw per-step noise from each sample's own generator too."""
    sampler = Sampler(_config("sd15", scheduler=scheduler, steps=5), adapter=_adapter("sd15"))
    both = sampler.sample(prompts=PROMPTS, seeds=[5, 9])
    alone = sampler.sample(prompts=PROMPTS[1:], seeds=[9])
    assert torch.isfinite(both.latents).all()
    torch.testing.assert_close(both.latents[1:], alone.latents, atol=1e-4, rtol=1e-4)


def test_stepper_choices():
    sd15, sd3 = _adapter("sd15"), _adapter("sd3")
    assert type(build_stepper(sd15, "auto", 5, (4, 16, 16)).scheduler).__name__ == "DDIMScheduler"
    assert type(build_stepper(sd15, "dpm++", 5, (4, 16, 16)).scheduler).__name__ == "DPMSolverMultistepScheduler"
    flow = build_stepper(sd3, "auto", 4, (4, 16, 16))
    assert flow.sigmas[0] == 1.0 and flow.sigmas[-1] == 0.0 and len(flow.timesteps) == 4
    shifted = build_stepper(sd3, "auto", 4, (4, 16, 16), flow_shift=1.0)  # tiny sd3 config has shift 3
    assert shifted.sigmas[1] < flow.sigmas[1]
    with pytest.raises(ValueError, match="flow models sample with"):
        build_stepper(sd3, "ddim", 4, (4, 16, 16))
    with pytest.raises(ValueError, match="sde_noise applies to flow"):
        build_stepper(sd15, "auto", 4, (4, 16, 16), sde_noise=0.5)
