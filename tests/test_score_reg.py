"""Score-regularised objective (Diff-Instruct*-style): pseudo-Huber, score conversions, the 1-D Gaussian toy
where the optimum is known in closed form, and a 2-step run of the trainer on tiny models."""
from __future__ import annotations

import math

import pytest
import torch

from diffalign.objectives.score_reg import (cfg_combine, eps_from_prediction, fake_score_dsm_loss, kl_generator_loss,
                                            pseudo_huber, pseudo_huber_grad, score_from_prediction,
                                            score_reg_generator_loss, x0_from_prediction)


# ------------------------------------------------------------------------------------ pseudo-Huber

def test_pseudo_huber_value_and_derivative_by_hand():
    y = torch.tensor([[3.0, 4.0], [0.0, 0.0]])      # |y| = 5 and 0
    d = pseudo_huber(y, c=12.0)
    assert torch.allclose(d, torch.tensor([1.0, 0.0]))  # sqrt(25 + 144) - 12 = 1
    g = pseudo_huber_grad(y, c=12.0)
    assert torch.allclose(g, torch.tensor([[3 / 13, 4 / 13], [0.0, 0.0]]))
    # |y| runs over ALL non-batch dims: a [1, 2, 2] tensor with entries 1 has |y| = 2
    assert torch.allclose(pseudo_huber(torch.ones(1, 2, 2), c=math.sqrt(5.0)), torch.tensor([3 - math.sqrt(5.0)]))
    # d' is the gradient of d (per sample)
    yy = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    pseudo_huber(yy, 0.7).sum().backward()
    assert torch.allclose(yy.grad, pseudo_huber_grad(yy.detach(), 0.7))
    with pytest.raises(ValueError, match="c must be > 0"):
        pseudo_huber(y, 0.0)


def test_pseudo_huber_derivative_limits():
    direction = torch.tensor([[0.6, 0.8]], dtype=torch.float64)  # unit vector
    small = 1e-5 * direction
    assert torch.allclose(pseudo_huber_grad(small, c=2.0), small / 2.0, rtol=1e-9)  # -> y / c
    large = 1e6 * direction
    assert torch.allclose(pseudo_huber_grad(large, c=2.0), direction, rtol=1e-9)  # -> y / |y|
    assert float(pseudo_huber_grad(torch.randn(4, 10) * 100, 1.0).flatten(1).norm(dim=1).max()) < 1.0


# ------------------------------------------------------------------------------------ conversions

def test_score_conversions_eps_and_flow_by_hand():
    # eps model: s = -ε̂ / σ
    x_t, eps = torch.tensor([[0.3]]), torch.tensor([[1.5]])
    assert torch.allclose(score_from_prediction(eps, x_t, torch.tensor([0.8]), torch.tensor([0.6]), "epsilon"),
                          torch.tensor([[-2.5]]))
    # flow, t = 0.25, x0 = 2, ε = -1: x_t = 0.75*2 + 0.25*(-1) = 1.25, v = ε - x0 = -3,
    # ε̂ = x_t + (1-t) v = 1.25 - 2.25 = -1, s = -ε̂ / t = 4, x̂0 = x_t - t v = 2
    t = torch.tensor([0.25])
    alpha, sigma = 1 - t, t
    x_t, v = torch.tensor([[1.25]]), torch.tensor([[-3.0]])
    assert torch.allclose(eps_from_prediction(v, x_t, alpha, sigma, "flow_velocity"), torch.tensor([[-1.0]]))
    assert torch.allclose(score_from_prediction(v, x_t, alpha, sigma, "flow_velocity"), torch.tensor([[4.0]]))
    assert torch.allclose(x0_from_prediction(v, x_t, alpha, sigma, "flow_velocity"), torch.tensor([[2.0]]))
    with pytest.raises(ValueError, match="prediction_type"):
        eps_from_prediction(v, x_t, alpha, sigma, "sample")


def test_conversions_invert_the_noising_for_every_prediction_type():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.rand(5, generator=g) * 0.9 + 0.05
    b = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    flow = (1 - t, t)
    ab = torch.rand(5, generator=g) * 0.9 + 0.05
    ddpm = (ab.sqrt(), (1 - ab).sqrt())
    cases = {"flow_velocity": (flow, eps - x0), "epsilon": (ddpm, eps),
             "v_prediction": (ddpm, b(ddpm[0]) * eps - b(ddpm[1]) * x0)}
    for ptype, ((a, s), pred) in cases.items():
        x_t = b(a) * x0 + b(s) * eps
        assert torch.allclose(eps_from_prediction(pred, x_t, a, s, ptype), eps, atol=1e-5), ptype
        assert torch.allclose(x0_from_prediction(pred, x_t, a, s, ptype), x0, atol=1e-4), ptype
        assert torch.allclose(score_from_prediction(pred, x_t, a, s, ptype), -eps / b(s), atol=1e-4), ptype
    # CFG is the same on predictions and on scores (affine with weights summing to one)
    (a, s), (pu, pc) = flow, (torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g))
    x_t = b(a) * x0 + b(s) * eps
    via_pred = score_from_prediction(cfg_combine(pu, pc, 7.5), x_t, a, s, "flow_velocity")
    via_score = cfg_combine(score_from_prediction(pu, x_t, a, s, "flow_velocity"),
                            score_from_prediction(pc, x_t, a, s, "flow_velocity"), 7.5)
    assert torch.allclose(via_pred, via_score, atol=1e-4)


def test_fake_score_dsm_loss_is_the_mean_per_sample_mse():
    pred, target = torch.zeros(2, 2), torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    loss, m = fake_score_dsm_loss(pred, target)
    assert float(loss) == pytest.approx((1.0 + 2.0) / 2) and m["loss_fake"] == pytest.approx(1.5)


# ------------------------------------------------------------------------------------ the 1-D Gaussian toy
# Reference N(mu, s²); generator x0 = θ + s z. At a fixed noise level (a, σ) both diffused distributions are
# Gaussians with variance V = a² s² + σ², so the exact scores are s_ref(x) = -(x - a mu)/V and (fake score =
# the generator's own) s_ψ(x) = -(x - a θ)/V. Then y = a(θ - mu)/V is constant in x and
#   score_reg: dL/dθ = d'(y) a / V        KL: dL/dθ = a² (θ - mu) / V.
# With reward r = A x0 the reward gradient is -alpha_rev A, so the optima are
#   KL:        θ* = mu + alpha_rev A V / a²
#   score_reg: d'(y*) = k := alpha_rev A V / a  ->  y* = k c / sqrt(1 - k²),  θ* = mu + V y* / a   (needs |k| < 1).

A_T, SIG_T, S_GEN, MU = 0.8, 0.6, 0.5, -1.0
V = A_T**2 * S_GEN**2 + SIG_T**2


def _toy_loss(theta: torch.Tensor, kind: str, c: float = 1.0, alpha_rev: float = 0.0, A: float = 0.0,
              n: int = 256, seed: int = 0, detach_dprime: bool = True):
    g = torch.Generator().manual_seed(seed)
    z, eps = torch.randn(n, 1, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)
    x0 = theta + S_GEN * z
    x_t = A_T * x0 + SIG_T * eps
    s_fake = -(x_t - A_T * theta.detach()) / V   # ψ tracks the generator but is not differentiated in θ
    s_ref = -(x_t - A_T * MU) / V
    reward = A * x0.squeeze(1) if alpha_rev else None
    sigma = torch.full((n,), SIG_T, dtype=torch.float64)
    if kind == "kl":
        return kl_generator_loss(s_fake, s_ref, x_t, reward=reward, alpha_rev=alpha_rev)[0]
    return score_reg_generator_loss(s_fake, s_ref, eps, sigma, c, detach_dprime=detach_dprime, reward=reward,
                                    alpha_rev=alpha_rev)[0]


def _descend(kind: str, theta0: float = 3.0, steps: int = 300, lr: float = 0.2, **kw) -> float:
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    for i in range(steps):
        loss = _toy_loss(theta, kind, seed=i, **kw)
        (grad,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= lr * grad
    return float(theta.detach())


@pytest.mark.parametrize("detach_dprime", [True, False])
def test_toy_gradients_match_the_closed_form(detach_dprime: bool):
    c = 0.7
    for theta0 in (2.0, -1.5, 0.0):
        theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(_toy_loss(theta, "score_reg", c=c, detach_dprime=detach_dprime), theta)
        y = A_T * (theta0 - MU) / V
        assert float(g) == pytest.approx(y / math.sqrt(y * y + c * c) * A_T / V, rel=1e-9)
        (g,) = torch.autograd.grad(_toy_loss(theta, "kl"), theta)
        assert float(g) == pytest.approx(A_T**2 * (theta0 - MU) / V, rel=1e-9)


@pytest.mark.parametrize("kind", ["score_reg", "kl"])
def test_toy_without_reward_moves_the_generator_to_the_reference(kind: str):
    assert _descend(kind, theta0=3.0) == pytest.approx(MU, abs=1e-3)
    assert _descend(kind, theta0=-4.0) == pytest.approx(MU, abs=1e-3)


def test_toy_linear_reward_shifts_the_optimum_by_the_derived_amount():
    alpha_rev = 1.0
    for A in (0.5, -0.5):
        kl = _descend("kl", alpha_rev=alpha_rev, A=A)
        assert kl == pytest.approx(MU + alpha_rev * A * V / A_T**2, abs=1e-3)  # +-0.406
        c = 1.0
        k = alpha_rev * A * V / A_T
        y_star = k * c / math.sqrt(1 - k * k)
        sr = _descend("score_reg", alpha_rev=alpha_rev, A=A, c=c)
        assert sr == pytest.approx(MU + V * y_star / A_T, abs=1e-3)          # +-0.223
        assert math.copysign(1.0, sr - MU) == math.copysign(1.0, A)          # the optimum moves along a


def test_toy_pseudo_huber_regulariser_is_bounded_so_a_large_reward_wins():
    """|dL_div/dθ| < a/V for every θ: a reward with alpha_rev A V / a >= 1 cannot be balanced (θ runs away),
    unlike KL whose pull grows linearly. This is why alpha_rev and c must be chosen together."""
    alpha_rev, A = 2.0, 1.0  # k = 2 * 0.52 / 0.8 = 1.3 > 1
    sr = _descend("score_reg", alpha_rev=alpha_rev, A=A, steps=200)
    kl = _descend("kl", alpha_rev=alpha_rev, A=A, steps=200)
    assert kl == pytest.approx(MU + alpha_rev * A * V / A_T**2, abs=1e-3)
    assert sr > 3.0 + 10.0  # kept climbing from θ0 = 3


def _learned_toy(steps: int, fake_updates: int, detach_dprime: bool, c: float, seed: int = 0,
                 lr_gen: float = 0.05, lr_fake: float = 0.05) -> tuple[float, float]:
    """Generator x0 = θ + φ z (mean AND scale), fake ε̂_ψ(x_t) = p1 x_t + p0 learned by DSM, random t per sample,
    alternating fake_updates ψ steps and one θ step. Reference N(MU, S_GEN²). Returns (θ, φ)."""
    torch.manual_seed(seed)
    gen = torch.tensor([2.0, 1.5], requires_grad=True)   # θ, φ
    fake = torch.tensor([1.0, 0.0], requires_grad=True)  # ψ = (sqrt v, m): s_ψ is the exact score of N(m, v)
    opt_g, opt_f = torch.optim.Adam([gen], lr=lr_gen), torch.optim.Adam([fake], lr=lr_fake)
    n = 256

    def noised(x0):
        u = torch.rand(n, 1) * 0.9 + 0.05
        a, s = (1 - u**2).sqrt(), u          # VP, α² + σ² = 1
        eps = torch.randn(n, 1)
        return a, s, eps, a * x0 + s * eps

    for _ in range(steps):
        for _ in range(fake_updates):
            x0 = (gen[0] + gen[1] * torch.randn(n, 1)).detach()  # sg(generator samples)
            a, s, eps, x_t = noised(x0)
            # the posterior-mean noise estimate of N(m, v) diffused: ε̂ = σ (x_t - a m) / (a² v + σ²)
            eps_hat = s * (x_t - a * fake[1]) / (a**2 * fake[0] ** 2 + s**2)
            loss, _ = fake_score_dsm_loss(eps_hat, eps)
            opt_f.zero_grad()
            loss.backward()
            opt_f.step()
        x0 = gen[0] + gen[1] * torch.randn(n, 1)
        a, s, eps, x_t = noised(x0)
        p = fake.detach()
        s_fake = -(x_t - a * p[1]) / (a**2 * p[0] ** 2 + s**2)
        s_ref = -(x_t - a * MU) / (a**2 * S_GEN**2 + s**2)
        loss, _ = score_reg_generator_loss(s_fake, s_ref, eps, s.squeeze(1), c, weight=s.squeeze(1) ** 2,
                                           detach_dprime=detach_dprime)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
    return float(gen[0].detach()), abs(float(gen[1].detach()))


def test_toy_with_a_learned_fake_score_recovers_mean_and_scale():
    theta, phi = _learned_toy(steps=400, fake_updates=2, detach_dprime=True, c=1.0)
    assert theta == pytest.approx(MU, abs=0.1)
    assert phi == pytest.approx(S_GEN, abs=0.1)


# ------------------------------------------------------------------------------------ trainer on tiny models

def _trainer(tmp_path, overrides):
    from diffalign.train.score_reg import ScoreRegTrainer, load_score_reg_config

    cfg = load_score_reg_config("tiny-sd3-score-reg", [f"train.output_dir={tmp_path}", *overrides])
    tr = ScoreRegTrainer(cfg)
    tr.setup()
    return tr


@pytest.mark.parametrize("overrides", [
    [],  # sd3 flow, one step, score_reg, brightness reward
    ["model.family=sd15", "model.pretrained=tiny:sd15", "model.max_sequence_length=null", "objective.name=kl",
     "objective.generator_times=[1.0,0.5]", "objective.fake_updates=2"],  # eps UNet, two steps, KL
])
def test_trainer_two_steps_change_the_generator_and_stay_finite(tmp_path, overrides):
    from diffalign.train.loop import adapters_disabled

    tr = _trainer(tmp_path, ["train.max_steps=2", "optim.max_grad_norm=null", *overrides])
    gen0 = [p.detach().clone() for p in tr.gen_params]
    fake0 = [p.detach().clone() for p in tr.fake_params]
    base0 = {n: p.detach().clone() for n, p in tr.gen_net.named_parameters() if not p.requires_grad}
    # at step 0 the fake score equals the reference (zero-initialised LoRA B)
    x = torch.randn(2, *tr.latent_shape)
    text = tr._text(torch.tensor([0, 1]))
    t = torch.full((2,), 0.5) if tr.adapter.is_flow else torch.full((2,), 500, dtype=torch.long)
    with torch.no_grad(), adapters_disabled(tr.gen_net):
        ref = tr.adapter.predict(tr.gen_net, x, t, text)
    with torch.no_grad():
        assert torch.allclose(tr.adapter.predict(tr.fake_net, x, t, text), ref, atol=1e-5)

    summary = tr.train(show_progress=False)
    assert summary["steps"] == 2 and summary["nonfinite_steps"] == 0
    m = summary["final_metrics"]
    assert all(math.isfinite(v) for v in m.values()), m
    assert "loss_fake" in m and "grad_norm" in m
    assert any(not torch.equal(a, b) for a, b in zip(gen0, tr.gen_params)), "generator LoRA did not move"
    assert any(not torch.equal(a, b) for a, b in zip(fake0, tr.fake_params)), "fake-score LoRA did not move"
    assert all(torch.isfinite(p).all() for p in tr.gen_params + tr.fake_params)
    # the frozen base (= the reference) is untouched
    for n, p in tr.gen_net.named_parameters():
        if n in base0:
            assert torch.equal(p, base0[n]), n
    assert (tmp_path / "generator_lora").is_dir() and (tmp_path / "summary.json").is_file()
    images = tr.sample(["a red circle"], seed=0)
    assert images.shape[:2] == (1, 3) and torch.isfinite(images).all()


def test_score_reg_recipes_load_and_refuse_the_dpo_loop():
    from diffalign.config import ConfigError, load_config, recipe_names
    from diffalign.train.score_reg import load_score_reg_config

    for name in ("tiny-sd3-score-reg", "world-flow-score-reg"):
        cfg = load_score_reg_config(name)
        assert cfg.task == "score-reg" and cfg.objective.name == "score_reg"
        assert name in recipe_names() and name not in recipe_names(task="train")
        with pytest.raises(ConfigError, match="diffalign score-reg"):
            load_config(name)
    with pytest.raises(ConfigError, match="objective.huber_c"):
        load_score_reg_config("tiny-sd3-score-reg", ["objective.huber_c=0"])
    with pytest.raises(ConfigError, match="generator_times"):
        load_score_reg_config("tiny-sd3-score-reg", ["objective.generator_times=[0.5,1.0]"])
    with pytest.raises(ConfigError, match="Did you mean"):
        load_score_reg_config("tiny-sd3-score-reg", ["objective.alpha_rew=3"])
