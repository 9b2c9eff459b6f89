"""GAPO, Flow-RWR, Diffusion-KTO and MaPO: hand-computed values, their traps, the data path that carries
per-image scores (reader -> cache -> loop -> objective), and short training runs through the real Trainer."""
import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.objectives import OBJECTIVES, Objective, PairErrors, get_objective
from diffalign.objectives.dpo import dpo_loss
from diffalign.objectives.gapo import gapo_loss, gapo_weights
from diffalign.objectives.kto import kto_loss, kto_reference_point, kto_sample_loss
from diffalign.objectives.mapo import mapo_loss, mapo_score
from diffalign.objectives.rwr import effective_sample_size, rwr_loss, rwr_weights
from diffalign.objectives.samples import SampleErrors, pairs_as_samples


def t64(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def pairs(pw, pl, rw=None, rl=None, sw=None, sl=None, t=0.5):
    n = len(pw)
    opt = (lambda x: None if x is None else t64(*x))  # noqa: E731
    return PairErrors(t64(*pw), t64(*pl), opt(rw), opt(rl), torch.full((n,), t, dtype=torch.float64),
                      score_w=opt(sw), score_l=opt(sl))


def log1pexp(x: float) -> float:  # -log σ(-x)... i.e. -log σ(inside) = log(1 + e^{-inside}) with x = -inside
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------- GAPO

def test_gapo_weights_each_pair_before_the_mean_and_matches_the_hand_value():
    # pair 1: Δw = 0.1-0.2, Δl = 0.3-0.25 -> inside = -(10/2)(-0.15) = 0.75;  S = (1, 0) -> weight 2 - 1 = 1
    # pair 2: Δw = 0.5-0.2, Δl = 0.1-0.2  -> inside = -(10/2)(0.4) = -2.0;     S = (0.6, 0.2)
    e = pairs([0.1, 0.5], [0.3, 0.1], [0.2, 0.2], [0.25, 0.2], sw=[1.0, 0.6], sl=[0.0, 0.2])
    w2 = 2 ** 0.6 - 2 ** 0.2
    l1, l2 = log1pexp(-0.75), log1pexp(2.0)
    loss, m = gapo_loss(e, beta=10)
    assert loss.item() == pytest.approx((1.0 * l1 + w2 * l2) / 2, rel=1e-12)
    # the official code's mean(weights) * mean(losses) is a different number when the weights differ
    batch_first = ((1.0 + w2) / 2) * ((l1 + l2) / 2)
    assert abs(loss.item() - batch_first) > 0.05
    assert m["gapo_weight"] == pytest.approx((1.0 + w2) / 2) and m["implicit_acc"] == 0.5
    # at batch size 1 the two agree, and with every weight 1 GAPO is exactly DPO
    one = pairs([0.5], [0.1], [0.2], [0.2], sw=[0.6], sl=[0.2])
    assert gapo_loss(one, 10)[0].item() == pytest.approx(w2 * l2, rel=1e-12)
    full = pairs([0.1, 0.5], [0.3, 0.1], [0.2, 0.2], [0.25, 0.2], sw=[1.0, 1.0], sl=[0.0, 0.0])
    assert gapo_loss(full, 10)[0].item() == pytest.approx(dpo_loss(full, 10)[0].item(), rel=1e-12)


def test_gapo_near_tie_pairs_get_no_gradient_and_score_scaling():
    policy_w = torch.tensor([0.1, 0.5], dtype=torch.float64, requires_grad=True)
    e = PairErrors(policy_w, t64(0.3, 0.1), t64(0.2, 0.2), t64(0.25, 0.2), t64(0.5, 0.5),
                   score_w=t64(7.0, 4.0), score_l=t64(2.0, 4.0))  # raw scores on a 2..7 scale, pair 2 a tie
    loss, m = gapo_loss(e, beta=10, score_min=2.0, score_max=7.0)
    loss.backward()
    assert policy_w.grad[1].item() == 0.0 and policy_w.grad[0].item() != 0.0
    assert gapo_weights(t64(1.0), t64(0.0)).item() == 1.0
    assert m["score_w"] == pytest.approx((1.0 + 0.4) / 2) and m["score_l"] == pytest.approx(0.2)


def test_gapo_refuses_scores_outside_unit_range_or_contradicting_the_label():
    base = dict(pw=[0.1], pl=[0.3], rw=[0.2], rl=[0.2])
    with pytest.raises(ValueError, match=r"scaled to \[0, 1\].*score_min"):
        gapo_loss(pairs(**base, sw=[21.5], sl=[20.0]), beta=10)
    with pytest.raises(ValueError, match="below the loser's"):
        gapo_loss(pairs(**base, sw=[0.2], sl=[0.7]), beta=10)
    with pytest.raises(ValueError, match="data.score_column"):
        gapo_loss(pairs(**base), beta=10)


# --------------------------------------------------------------------------- Flow-RWR

def test_rwr_weights_sum_to_batch_size_and_match_the_hand_value():
    w = rwr_weights(t64(0.0, 1.0), tau=1.0)
    e = math.e
    assert w.tolist() == pytest.approx([2 / (1 + e), 2 * e / (1 + e)], rel=1e-12)
    g = torch.Generator().manual_seed(0)
    r = torch.rand(16, generator=g, dtype=torch.float64)
    for tau in (0.01, 0.1, 1.0):
        w = rwr_weights(r, tau)
        assert w.sum().item() == pytest.approx(16.0, rel=1e-9)
        assert torch.equal(torch.argsort(w), torch.argsort(r))  # a monotone transform of the reward
    assert torch.isfinite(rwr_weights(r * 1e4, tau=1e-4)).all()  # log-space: no overflow


def test_rwr_clipped_weights_sum_to_batch_size_and_respect_the_cap():
    # unclipped [4e^3/(e^3+3), 4/(e^3+3) x3] = [3.48, 0.17, ...]; capped at 2 the other three share 2 equally
    w = rwr_weights(t64(3.0, 0.0, 0.0, 0.0), tau=1.0, weight_clip=2.0)
    assert w.tolist() == pytest.approx([2.0, 2 / 3, 2 / 3, 2 / 3], rel=1e-12)
    g = torch.Generator().manual_seed(1)
    r = torch.randn(32, generator=g, dtype=torch.float64)
    plain = rwr_weights(r, tau=0.2)
    for cap in (1.0, 1.5, 3.0, 8.0):
        w = rwr_weights(r, tau=0.2, weight_clip=cap)
        assert w.sum().item() == pytest.approx(32.0, rel=1e-9) and w.max().item() <= cap + 1e-9
        free = w < cap - 1e-9  # unclipped samples keep the ratios of exp(S/τ) (cap 1: none is free)
        ratio = (w[free] / plain[free])
        assert bool(free.any()) == (cap > 1.0) and torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-9)
        assert effective_sample_size(w).item() >= 32 / cap - 1e-9
    assert torch.allclose(rwr_weights(r, 0.2, weight_clip=1.0), torch.ones(32, dtype=torch.float64))
    assert torch.allclose(rwr_weights(r, 0.2, weight_clip=1e6), plain, rtol=1e-12)  # a cap above every weight: no-op
    assert effective_sample_size(plain).item() < 32 / 8  # why clipping is the default: one image dominates
    with pytest.raises(ValueError, match=">= 1"):
        rwr_weights(r, 0.2, weight_clip=0.5)


def test_rwr_loss_reads_winners_and_losers_as_samples_without_gradient_through_weights():
    policy = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64, requires_grad=True)
    e = PairErrors(policy[:2], policy[2:], None, None, t64(0.5, 0.5), score_w=t64(0.9, 0.5), score_l=t64(0.1, 0.3))
    loss, m = rwr_loss(e, tau=0.5, weight_clip=None)
    w = rwr_weights(t64(0.9, 0.5, 0.1, 0.3), tau=0.5)  # order: winners then losers
    assert loss.item() == pytest.approx((w * policy.detach()).mean().item(), rel=1e-12)
    loss.backward()
    assert policy.grad.tolist() == pytest.approx((w / 4).tolist(), rel=1e-12)  # d loss / d err_i = w_i / N
    assert m["weight_max"] == pytest.approx(w.max().item()) and m["err_policy"] == pytest.approx(0.5)
    assert OBJECTIVES["rwr"].needs_reference is False and OBJECTIVES["rwr"].needs_scores is True
    from diffalign.config import ObjectiveConfig

    assert ObjectiveConfig().weight_clip == 4.0  # the documented default is the clipped variant


# --------------------------------------------------------------------------- Diffusion-KTO

def test_kto_hand_value_and_lambdas():
    # winner: g = 0.2 - 0.1 = 0.1 (desirable); loser: g = 0.2 - 0.3 = -0.1 (undesirable); mean g = 0 -> z0 = 0
    e = pairs([0.1], [0.3], [0.2], [0.2])
    loss, m = kto_loss(e, beta=10)
    assert loss.item() == pytest.approx(1 - sigmoid(1.0), rel=1e-12)  # both samples: 1 - σ(10 * 0.1)
    assert m["kto_z0"] == pytest.approx(0.0, abs=1e-15) and m["implicit_acc"] == 1.0
    assert m["reward_desirable"] == pytest.approx(0.1) and m["reward_undesirable"] == pytest.approx(-0.1)
    loss, _ = kto_loss(e, beta=10, lambda_desirable=2.0, lambda_undesirable=0.5)
    assert loss.item() == pytest.approx((2.0 + 0.5) / 2 * (1 - sigmoid(1.0)), rel=1e-12)
    # policy == reference: g = 0, z0 = 0, loss = λ/2 and accuracy 0.5 (ties count half)
    same = pairs([0.3, 0.4], [0.5, 0.6], [0.3, 0.4], [0.5, 0.6])
    loss, m = kto_loss(same, beta=1000)
    assert loss.item() == pytest.approx(0.5) and m["implicit_acc"] == 0.5


def test_kto_reference_point_is_the_clamped_detached_batch_mean():
    assert kto_reference_point(t64(0.3, 0.1, -0.2, 0.2)).item() == pytest.approx(0.1)  # mean over ALL samples
    assert kto_reference_point(t64(-0.3, 0.1)).item() == 0.0  # clamped at 0
    # g = ref - policy = [0.3, 0.1] -> z0 = 0.2 > 0 is subtracted: both samples sit at |g - z0| = 0.1
    e = pairs([0.0], [0.1], [0.3], [0.2])
    loss, m = kto_loss(e, beta=10)
    assert m["kto_z0"] == pytest.approx(0.2)
    assert loss.item() == pytest.approx(((1 - sigmoid(1.0)) + (1 - sigmoid(1.0))) / 2, rel=1e-12)
    # detached: the gradient is that of λ(1 - σ(s β (g_i - z0))) with z0 a constant
    policy = torch.tensor([0.05, 0.4, 0.1, 0.3], dtype=torch.float64, requires_grad=True)
    ref = t64(0.3, 0.2, 0.35, 0.1)
    desirable = torch.tensor([True, True, False, False])
    s = SampleErrors(policy, ref, desirable, t64(0.5, 0.5, 0.5, 0.5))
    beta = 7.0
    loss, m = kto_sample_loss(s, beta)
    loss.backward()
    g = (ref - policy).detach()
    z0 = max(0.0, g.mean().item())
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    x = sign * beta * (g - z0)
    expected = torch.sigmoid(x) * (1 - torch.sigmoid(x)) * sign * beta / 4  # d/dpolicy of (1 - σ(x)), dg/dp = -1
    assert m["kto_z0"] == pytest.approx(z0) and z0 > 0
    torch.testing.assert_close(policy.grad, expected, rtol=1e-10, atol=1e-14)


def test_pairs_as_samples_orders_winners_then_losers():
    s = pairs_as_samples(pairs([1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], sw=[0.9, 0.8], sl=[0.1, 0.2]))
    assert s.policy.tolist() == [1.0, 2.0, 3.0, 4.0] and s.ref.tolist() == [5.0, 6.0, 7.0, 8.0]
    assert s.desirable.tolist() == [True, True, False, False] and s.score.tolist() == [0.9, 0.8, 0.1, 0.2]


# --------------------------------------------------------------------------- MaPO

def test_mapo_score_is_decreasing_with_limit_one_and_finite_gradient_at_zero():
    assert mapo_score(t64(2.0), 0.5).item() == pytest.approx(1 / (math.e - 1), rel=1e-12)
    err = torch.tensor([0.0, 1e-9, 0.1, 1.0, 5.0], dtype=torch.float64, requires_grad=True)
    s = mapo_score(err, 0.5)
    assert s[0].item() == 1.0 and (s[1:] < s[:-1]).all()
    s.sum().backward()
    assert torch.isfinite(err.grad).all() and (err.grad < 0).all()
    assert err.grad[0].item() == pytest.approx(-0.25)  # d/dl [1 - γl/2] at 0


def test_mapo_hand_value_signs_and_official_form():
    e = pairs([0.2, 0.5], [0.4, 0.3])  # no reference errors at all
    loss, m = mapo_loss(e, gamma=0.5, weight=0.1, scale=10.0)
    s = lambda l: 0.5 * l / math.expm1(0.5 * l)  # noqa: E731
    ratio = [math.log(sigmoid(10 * (s(0.2) - s(0.4)))), math.log(sigmoid(10 * (s(0.5) - s(0.3))))]
    assert loss.item() == pytest.approx((0.2 + 0.5) / 2 - 0.1 * sum(ratio) / 2, rel=1e-12)
    assert m["implicit_acc"] == 0.5 and m["mapo_ratio_loss"] == pytest.approx(-sum(ratio) / 2)
    # the official compute_loss (mapo-t2i utils.py), retyped: snr_value 0.5, beta_mapo 0.1, T = 1000
    w, l = t64(0.2, 0.5), t64(0.4, 0.3)
    log_odds = (0.5 * w) / (torch.exp(0.5 * w) - 1) - (0.5 * l) / (torch.exp(0.5 * l) - 1)
    official = w.mean() - (0.1 * F.logsigmoid(log_odds * 1000)).mean()
    assert mapo_loss(e)[0].item() == pytest.approx(official.item(), rel=1e-12)
    # gradient directions: lower err(w), raise err(l)
    pw = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    pl = torch.tensor([0.25], dtype=torch.float64, requires_grad=True)
    mapo_loss(PairErrors(pw, pl, None, None, t64(0.5)), scale=10.0)[0].backward()
    assert pw.grad.item() > 0 and pl.grad.item() < 0
    assert OBJECTIVES["mapo"].needs_reference is False and OBJECTIVES["mapo"].uses_losers is True


# --------------------------------------------------------------------------- data: scores through reader and cache

def test_scores_are_read_oriented_with_the_pair_and_validated(tmp_path):
    import pyarrow.parquet as pq

    from diffalign.data.preference import DataError, load_preference_source
    from diffalign.data.toy import write_toy_pairs

    path = write_toy_pairs(tmp_path / "s.parquet", n_pairs=8, size=16, seed=2, scores=True)
    table = pq.read_table(path).to_pydict()
    src = load_preference_source(str(path), score_columns=("score_0", "score_1"))
    for rec in src.records:
        slot_w = 0 if table["label_0"][rec.row] == 1.0 else 1
        assert rec.score_w == table[f"score_{slot_w}"][rec.row] and rec.score_l == table[f"score_{1 - slot_w}"][rec.row]
        assert rec.score_w > rec.score_l
    assert sorted(set(table["label_0"])) == [0.0, 1.0]  # both orientations occur
    plain = load_preference_source(str(path))  # not asked for: no scores, same fingerprint as before scores existed
    assert plain.records[0].score_w is None and plain.fingerprint != src.fingerprint
    with pytest.raises(DataError, match="missing score column.*reward_0"):
        load_preference_source(str(path), score_columns=("reward_0", "reward_1"))
    # jsonl with a user-named column pair; a bad score names the row
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    lines = ['{"image_0": "a.png", "image_1": "b.png", "label_0": 0, "caption": "x", "ra": 0.1, "rb": 0.7}',
             '{"image_0": "a.png", "image_1": "b.png", "label_0": 1, "caption": "y", "ra": "high", "rb": 0.2}']
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="row 1: score column 'ra' must hold a finite number"):
        load_preference_source(str(tmp_path / "p.jsonl"), score_columns=("ra", "rb"))
    ok = load_preference_source(str(tmp_path / "p.jsonl"), score_columns=("ra", "rb"), on_error="skip")
    assert (ok.records[0].score_w, ok.records[0].score_l) == (0.7, 0.1) and ok.counts.skipped[0][0] == 1


def test_score_objectives_need_a_score_column_and_a_cache_with_scores(make_cfg, tmp_path):
    from diffalign.config import ConfigError
    from diffalign.data.cache import CacheMismatchError, build_cache
    from diffalign.models import load_adapter
    from diffalign.train.loop import Trainer

    with pytest.raises(ConfigError, match="objective.name=gapo needs a reward score per image: set data.score_column"):
        Trainer(make_cfg("sd15", "objective.name=gapo", "data.path=toy:pairs?n=8&scores=1"), show_progress=False).setup()
    # a cache built without scores is refused for GAPO, saying why and what to do
    plain = make_cfg("sd15", f"cache.dir={tmp_path / 'c'}", "data.path=toy:pairs?n=8&scores=1")
    build_cache(plain, load_adapter(plain.model), show_progress=False)
    gapo = make_cfg("sd15", f"cache.dir={tmp_path / 'c'}", "data.path=toy:pairs?n=8&scores=1",
                    "objective.name=gapo", "data.score_column=score")
    with pytest.raises(CacheMismatchError, match=r"(?s)data.score_column: cache has None.*without per-image scores.*rebuild"):
        Trainer(gapo, show_progress=False).setup()
    # rebuilt with scores: they reach the batch oriented like the latents, and the DPO cache path is unchanged
    manifest = build_cache(gapo, load_adapter(gapo.model), show_progress=False)
    assert manifest["scores"] == {"columns": ["score_0", "score_1"], "dtype": "float32"}
    trainer = Trainer(gapo, show_progress=False)
    trainer.setup()
    batch = next(trainer._loader(0))
    by_row = {r.row: r for r in _toy_records("toy:pairs?n=8&scores=1")}
    assert batch["score_w"].dtype == torch.float32 and batch["score_w"].shape == (4,)
    for i, row in enumerate(batch["row"]):
        assert batch["score_w"][i].item() == pytest.approx(by_row[row].score_w)
        assert batch["score_l"][i].item() == pytest.approx(by_row[row].score_l)
    # scores that contradict the labels are refused before step 1, naming a row
    swapped = make_cfg("sd15", "objective.name=gapo", "data.path=toy:pairs?n=8&scores=1", "data.score_column=score_1,score_0")
    with pytest.raises(ConfigError, match=r"row \d+: the winner's score"):
        Trainer(swapped, show_progress=False).setup()


def _toy_records(spec):
    from diffalign.data.loading import resolve_data_path
    from diffalign.data.preference import load_preference_source

    return load_preference_source(resolve_data_path(spec), score_columns=("score_0", "score_1")).records


# --------------------------------------------------------------------------- the loop

def _count_predicts(trainer):
    calls = {"n": 0}
    real = trainer.adapter.predict

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    trainer.adapter.predict = counting
    return calls


@pytest.mark.parametrize("name,forwards", [("mapo", 1), ("rwr", 1), ("kto", 2), ("gapo", 2)])
def test_reference_free_objectives_run_no_reference_forward(name, forwards, make_cfg):
    from diffalign.train.loop import Trainer
    from diffalign.train.randomness import step_generator

    cfg = make_cfg("sd3", f"objective.name={name}", "data.path=toy:pairs?n=8&scores=1", "data.score_column=score",
                   "lora.enabled=false", "train.reference_dtype=float32")
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    assert (trainer.reference is None) == (not OBJECTIVES[name].needs_reference)  # no frozen copy either
    calls = _count_predicts(trainer)
    loss, metrics = trainer.compute_loss(next(trainer._loader(0)), step_generator(0, 0, 0))
    assert calls["n"] == forwards and torch.isfinite(loss)
    if name == "kto":  # step 0: policy == reference, so g = 0 and the loss is λ/2
        assert loss.item() == pytest.approx(0.5, abs=1e-6) and metrics["kto_z0"] == 0.0


def _probe(trainer, draws: int = 6) -> tuple[float, float]:
    """Mean and fraction-negative of Δ(w) - Δ(l), Δ = err_θ - err_ref, over fixed (t, ε) draws of the first batch:
    < 0 means the policy moved towards the winners (high-reward images) relative to the losers."""
    from diffalign.train.randomness import step_generator

    got = []
    real, trainer.objective = trainer.objective, Objective(
        "probe", uses_losers=True, needs_reference=True, fn=lambda e, c: (e.policy_w.sum() * 0, got.append(e) or {}))
    try:
        batch = next(trainer._loader(0))
        with torch.no_grad():
            for d in range(draws):
                trainer.compute_loss(batch, step_generator(1234, d, 0))
    finally:
        trainer.objective = real
    diff = torch.cat([(e.policy_w - e.ref_w) - (e.policy_l - e.ref_l) for e in got])
    return diff.mean().item(), (diff < 0).float().mean().item()


@pytest.mark.parametrize("name", ["gapo", "rwr", "kto", "mapo"])
def test_short_training_moves_the_policy_towards_the_winners(name, make_cfg):
    """40 LoRA steps on 4 toy pairs (winners score U(0.6, 1), losers U(0, 0.4)): every objective must lower the
    policy's error on the winners (the high-reward images) relative to the losers, measured against the
    adapter-disabled reference on fixed noise draws. For RWR this is 'raises the relative fit of high-reward
    samples'; for MaPO the reference is only used by this probe, never in training."""
    from diffalign.train.loop import Trainer

    cfg = make_cfg("flux", f"objective.name={name}", "data.path=toy:pairs?n=4&scores=1", "data.score_column=score",
                   "lora.rank=8", "optim.lr=1e-3", "train.max_steps=40", "train.log_every=40",
                   *(["objective.beta=1000"] if name in ("gapo", "kto") else []))
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    assert _probe(trainer)[0] == 0.0  # LoRA B starts at zero: policy == reference
    result = trainer.train()
    mean, frac = _probe(trainer)
    assert result.steps == 40 and result.nonfinite_steps == 0
    assert mean < 0 and frac >= 0.75, (mean, frac, result.final_metrics)


# --------------------------------------------------------------------------- recipes and banner

NEW_RECIPES = ["tiny-sd15-gapo", "tiny-sd3-flow-rwr", "tiny-sd15-kto", "tiny-sdxl-mapo"]


@pytest.mark.parametrize("recipe", NEW_RECIPES)
def test_tiny_recipes_run(recipe, tmp_path):
    from diffalign.config import load_config
    from diffalign.train.loop import Trainer

    path = load_config(recipe).data.path  # toy:pairs or toy:pairs?scores=1 -> the same with 4 pairs
    small = path.replace("toy:pairs", "toy:pairs?n=4", 1).replace("?n=4?", "?n=4&")
    cfg = load_config(recipe, ["train.max_steps=2", "train.checkpoint_every=0", f"train.output_dir={tmp_path}",
                               f"data.path={small}"])
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    result = trainer.train()
    assert result.steps == 2 and math.isfinite(result.final_metrics["loss"])


def test_every_objective_is_registered_listed_and_has_a_banner():
    from diffalign.cli import _convention_banner
    from diffalign.config import CHOICES, load_config, recipe_names

    names = recipe_names()
    for recipe in NEW_RECIPES + ["world-unet-gapo", "world-flow-rwr", "world-unet-kto", "world-unet-mapo",
                                 "sd15-diffusion-kto", "sdxl-mapo", "sd3-flow-rwr"]:
        assert recipe in names
    expected = {"gapo": "(2^S_w - 2^S_l)", "rwr": "softmax(S/tau)", "kto": "z0 = max(0, batch mean g) detached",
                "mapo": "no reference forward"}
    for name, phrase in expected.items():
        assert name in CHOICES["objective.name"] and get_objective(name).name == name
        banner = _convention_banner(load_config(None, [f"objective.name={name}", "data.score_column=score"]))
        assert phrase in banner, banner
    assert "clipped at 4" in _convention_banner(load_config("world-flow-rwr"))
    assert "beta=1000" in _convention_banner(load_config("sd15-diffusion-kto"))
    assert "beta*min(1/alpha_bar_t, 30)" in _convention_banner(
        load_config(None, ["objective.time_weighting=velocity", "objective.velocity_weight_cap=30"]))
    # the real recipes carry the official settings
    kto, mapo = load_config("sd15-diffusion-kto"), load_config("sdxl-mapo")
    assert (kto.objective.beta, kto.optim.lr, kto.optim.warmup_steps, kto.lora.enabled) == (1000, 1e-7, 200, False)
    o = mapo.objective
    assert (o.mapo_gamma, o.mapo_weight, o.mapo_scale, mapo.optim.lr, mapo.model.vae) == (
        0.5, 0.1, 1000, 1e-5, "madebyollin/sdxl-vae-fp16-fix")
    assert load_config("world-unet-gapo").data.score_column == "score"


def test_dpo_only_options_are_refused_for_other_objectives():
    from diffalign.config import ConfigError, load_config

    for key in ("objective.loss_type=hinge", "objective.sft_weight=0.5", "objective.time_weighting=one_minus_t_sq",
                "objective.time_weighting=velocity", "objective.velocity_weight_cap=30"):
        with pytest.raises(ConfigError, match="applies to objective.name=dpo or gapo only"):
            load_config(None, ["objective.name=kto", key])
        load_config(None, ["objective.name=gapo", key])  # GAPO reuses the DPO logit: allowed
    with pytest.raises(ConfigError, match="weight_clip must be >= 1"):
        load_config(None, ["objective.name=rwr", "objective.weight_clip=0.5"])
    with pytest.raises(ConfigError, match="velocity_weight_cap must be >= 1"):
        load_config(None, ["objective.time_weighting=velocity", "objective.velocity_weight_cap=0.5"])
