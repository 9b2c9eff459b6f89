"""SePPO (loss, flipper, reference pool, tiny runs) and online best-vs-worst pairs (selection, tiny run)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffalign.objectives import PairErrors, get_objective
from diffalign.objectives.seppo import seppo_flip, seppo_inside, seppo_loss
from diffalign.train.loop import Trainer
from diffalign.train.online import SnapshotPool, best_worst, capture, loaded, select_pairs


def softplus_neg(x: float) -> float:
    """-log sigma(x) = log(1 + e^-x), computed by hand."""
    return math.log1p(math.exp(-x))


# two pairs, beta = 2 so that beta/2 = 1 and inside = -(Δw - s Δs):
#   pair 0: err_θ(w)=0.1 < err_ref(w)=0.3 -> the policy fits the winner better -> s = +1 (sign and indicator)
#           Δw = -0.2, Δs = 0.5 - 0.2 = 0.3
#   pair 1: err_θ(w)=0.4 > err_ref(w)=0.2 -> s = -1 (sign) / 0 (indicator)
#           Δw = 0.2,  Δs = 0.1 - 0.4 = -0.3
ERRORS = PairErrors(policy_w=torch.tensor([0.1, 0.4]), policy_l=torch.tensor([0.5, 0.1]),
                    ref_w=torch.tensor([0.3, 0.2]), ref_l=torch.tensor([0.2, 0.4]), t=torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("flipper,inside", [
    ("sign", [-(-0.2 - 0.3), -(0.2 - (-1) * (-0.3))]),       # [0.5, 0.1]
    ("indicator", [-(-0.2 - 0.3), -(0.2 - 0 * (-0.3))]),     # [0.5, -0.2]
    ("none", [-(-0.2 - 0.3), -(0.2 - 1 * (-0.3))]),          # [0.5, -0.5]
])
def test_seppo_loss_matches_hand_computed_values(flipper, inside):
    got, _ = seppo_inside(ERRORS, beta=2.0, flipper=flipper)
    assert got.tolist() == pytest.approx(inside, abs=1e-6)
    loss, metrics = seppo_loss(ERRORS, beta=2.0, flipper=flipper)
    assert loss.item() == pytest.approx((softplus_neg(inside[0]) + softplus_neg(inside[1])) / 2, abs=1e-6)
    assert metrics["flip_pos"] == (1.0 if flipper == "none" else 0.5)
    assert metrics["flip_neg"] == (0.5 if flipper == "sign" else 0.0)
    assert metrics["implicit_acc"] == pytest.approx(sum(i > 0 for i in inside) / 2)


def test_seppo_beta_scales_the_logit_and_equal_errors_give_ln2():
    inside2, _ = seppo_inside(ERRORS, 2.0)
    inside10, _ = seppo_inside(ERRORS, 10.0)
    assert torch.allclose(inside10, 5 * inside2)
    same = PairErrors(policy_w=torch.tensor([0.3]), policy_l=torch.tensor([0.7]), ref_w=torch.tensor([0.3]),
                      ref_l=torch.tensor([0.7]), t=torch.tensor([0.1]))
    for flipper in ("sign", "indicator", "none"):
        assert seppo_loss(same, 5000.0, flipper)[0].item() == pytest.approx(math.log(2))


def test_flipper_decision_on_hand_made_errors():
    policy_w = torch.tensor([0.1, 0.5, 0.3, 0.2])
    ref_w = torch.tensor([0.2, 0.4, 0.3, 0.9])  # better, worse, exact tie (not better), better
    assert seppo_flip(policy_w, ref_w, "sign").tolist() == [1.0, -1.0, -1.0, 1.0]
    assert seppo_flip(policy_w, ref_w, "indicator").tolist() == [1.0, 0.0, 0.0, 1.0]
    assert seppo_flip(policy_w, ref_w, "none").tolist() == [1.0, 1.0, 1.0, 1.0]
    assert seppo_flip(policy_w, ref_w, "reversed").tolist() == [-1.0, 1.0, 1.0, -1.0]
    with pytest.raises(ValueError, match="flipper"):
        seppo_flip(policy_w, ref_w, "flop")


def test_flipper_direction_of_the_sample_gradient():
    """s = +1 pushes err_θ(ref_sample) UP (a loser); s = -1 pulls it DOWN (SFT-like); s = 0 leaves it alone."""
    grads = {}
    for flipper in ("sign", "indicator"):
        policy_l = ERRORS.policy_l.clone().requires_grad_(True)
        e = PairErrors(policy_w=ERRORS.policy_w, policy_l=policy_l, ref_w=ERRORS.ref_w, ref_l=ERRORS.ref_l, t=ERRORS.t)
        seppo_loss(e, 2.0, flipper)[0].backward()
        grads[flipper] = policy_l.grad
    # gradient DESCENT moves err by -grad: pair 0 (s=+1) err up, pair 1 (s=-1) err down
    assert grads["sign"][0] < 0 and grads["sign"][1] > 0
    assert grads["indicator"][0] < 0 and grads["indicator"][1] == 0
    # the flipper is a decision, not a path for gradients: err_θ(w)'s gradient is the plain DPO one
    policy_w = ERRORS.policy_w.clone().requires_grad_(True)
    e = PairErrors(policy_w=policy_w, policy_l=ERRORS.policy_l, ref_w=ERRORS.ref_w, ref_l=ERRORS.ref_l, t=ERRORS.t)
    seppo_loss(e, 2.0, "sign")[0].backward()
    assert (policy_w.grad > 0).all()  # lowering err_θ(w) lowers the loss in every pair


def test_seppo_is_registered_as_a_generated_loser_objective():
    obj = get_objective("seppo")
    assert obj.uses_losers and obj.needs_reference and obj.generates_losers
    assert not get_objective("dpo").generates_losers


# ----------------------------------------------------------------------------------------------- the pool
def test_pool_snapshots_every_n_and_keeps_the_last_k():
    weight = nn.Parameter(torch.zeros(3))
    pool = SnapshotPool(size=3, every=2)
    for step in range(0, 11):
        with torch.no_grad():
            weight.fill_(float(step))  # the "training" changes the weights every step
        took = pool.maybe_add(step, {"w": weight})
        assert took == (step % 2 == 0)
    assert pool.steps == [6, 8, 10]
    assert [pool[i]["w"][0].item() for i in range(3)] == [6.0, 8.0, 10.0]
    with torch.no_grad():
        weight.fill_(-1.0)
    assert pool[2]["w"][0].item() == 10.0  # a snapshot is a copy, not a view of the live weights


def test_pool_draw_is_uniform_and_deterministic_per_seed():
    pool = SnapshotPool(size=4, every=1)
    for step in range(4):
        pool.maybe_add(step, {"w": torch.full((1,), float(step))})
    draws = lambda seed: [pool.draw(g) for g in [torch.Generator().manual_seed(seed)] for _ in range(4000)]
    a, b = draws(7), draws(7)
    assert a == b and a != draws(8)
    freq = torch.bincount(torch.tensor(a), minlength=4).float() / len(a)
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.03), freq
    with pytest.raises(RuntimeError, match="empty"):
        SnapshotPool(2, 1).draw(torch.Generator())


def test_loaded_swaps_weights_in_and_restores_them_even_on_error():
    layer = nn.Linear(2, 2)
    params = dict(layer.named_parameters())
    live = capture(params)
    snap = {n: torch.randn_like(p) for n, p in params.items()}
    x = torch.randn(5, 2)
    with loaded(params, snap):
        assert all(torch.equal(params[n], snap[n]) for n in params)
        expected = x @ snap["weight"].T + snap["bias"]
        assert torch.allclose(layer(x), expected)
    assert all(torch.equal(params[n], live[n]) for n in params)
    with pytest.raises(KeyError):
        with loaded(params, snap):
            raise KeyError("boom")
    assert all(torch.equal(params[n], live[n]) for n in params)


# ----------------------------------------------------------------------------------------------- SePPO runs
def _lora(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.pair_provider.params.items()}


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_seppo_trains_through_the_real_trainer(family, make_cfg):
    cfg = make_cfg(family, "objective.name=seppo", "objective.seppo_pool_size=2", "objective.seppo_snapshot_every=1",
                   "online.steps=2", "train.max_steps=2", "train.batch_size=2")
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    assert trainer.pair_provider.pool.steps == [0]
    result = trainer.train()
    first = result.history[0]
    # step 1: the pool holds only the initial weights == the policy (LoRA B = 0), so Δ = 0 and loss = ln 2;
    # the tie err_θ(w) == err_ref(w) is "not better" -> every pair flipped
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["flip_neg"] == 1.0 and first["pool_size"] == 1.0
    assert all(math.isfinite(h["loss"]) for h in result.history) and result.nonfinite_steps == 0
    provider = trainer.pair_provider
    assert provider.pool.steps == [1, 2]  # snapshot after every update, the last 2 kept
    assert result.history[1]["pool_size"] == 2.0

    # the drawn snapshot is really what the reference runs, and sampling leaves the policy weights alone
    live = _lora(trainer)
    assert not all(torch.equal(live[n], provider.pool[0][n]) for n in live)  # training moved the LoRA
    batch = next(trainer._loader(0))
    from diffalign.train.randomness import step_generator

    x0_w, _, text, _, _ = trainer.model_inputs(batch, step_generator(0, 5, 0))
    x_w, x_l, info = provider.pairs(trainer, x0_w, text, None, step_generator(0, 5, 0))
    assert torch.equal(x_w, x0_w) and x_l.shape == x0_w.shape and torch.isfinite(x_l).all()
    assert not torch.allclose(x_l, x0_w)
    assert all(torch.equal(live[n], p) for n, p in provider.params.items())  # restored after sampling
    drawn = provider.pool[provider.current]
    with provider.reference(provider.model):
        assert all(torch.equal(p, drawn[n]) for n, p in provider.params.items())
    assert all(torch.equal(live[n], p) for n, p in provider.params.items())
    # the same seeded generator draws the same snapshot and the same sample
    _, x_l2, _ = provider.pairs(trainer, x0_w, text, None, step_generator(0, 5, 0))
    assert torch.equal(x_l, x_l2)


def test_seppo_needs_lora(make_cfg):
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="lora.enabled"):
        make_cfg("sd15", "objective.name=seppo", "lora.enabled=false")


# ----------------------------------------------------------------------------------------------- online pairs
def test_best_worst_selection_on_hand_made_rewards():
    k = 3
    latents = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 2, 2, 2).contiguous()  # row i = i
    rewards = torch.tensor([0.2, 0.9, 0.1,     # prompt 0: best row 1, worst row 2
                            0.5, 0.5, 0.7])    # prompt 1: best row 5, worst row 3 (tie: first occurrence)
    x_w, x_l, r_w, r_l = select_pairs(latents, rewards, k)
    assert x_w[:, 0, 0, 0].tolist() == [1.0, 5.0] and x_l[:, 0, 0, 0].tolist() == [2.0, 3.0]
    assert r_w.tolist() == pytest.approx([0.9, 0.7]) and r_l.tolist() == pytest.approx([0.1, 0.5])
    best, worst = best_worst(torch.tensor([[1.0, 1.0]]))
    assert best.item() == worst.item() == 0  # all tied: the same sample (Δw = Δl, zero gradient)
    with pytest.raises(ValueError):
        select_pairs(latents, rewards, 4)


def test_online_pairs_short_run_with_a_weight_free_reward(make_cfg):
    cfg = make_cfg("sd15", "online.enabled=true", "online.reward=brightness", "online.num_samples=3", "online.steps=2",
                   "online.refresh_every=1", "train.max_steps=2", "train.batch_size=2")
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    provider = trainer.pair_provider
    assert provider.snapshot is None and provider.weights == {"brightness": 1.0}

    seen = []
    result = trainer.train(callback=lambda t: seen.append(capture(t.pair_provider.snapshot)))
    first = result.history[0]
    # step 1: reference = base = policy, so ln 2; the pairs really are best vs worst by the reward
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for h in result.history:
        assert h["online_reward_best"] >= h["online_reward_mean"] >= h["online_reward_worst"]
        assert h["online_reward_best"] > h["online_reward_worst"]  # 3 random samples do not tie in brightness
    # refresh_every=1: after each update the reference is the just-trained LoRA
    assert len(seen) == 2 and not all(torch.equal(seen[0][n], seen[1][n]) for n in seen[0])
    live = _lora(trainer)
    assert all(torch.equal(live[n], provider.snapshot[n]) for n in live)

    # the winners are the reward-best: re-score what pairs() returns
    batch = next(trainer._loader(0))
    from diffalign.train.randomness import step_generator

    x0_w, _, text, _, _ = trainer.model_inputs(batch, step_generator(0, 9, 0))
    x_w, x_l, info = provider.pairs(trainer, x0_w, text, list(batch["caption"]), step_generator(0, 9, 0))
    r_w, r_l = provider.scalar_reward(x_w, None), provider.scalar_reward(x_l, None)
    assert (r_w >= r_l).all()
    assert r_w.mean().item() == pytest.approx(info["online_reward_best"], abs=1e-5)


def test_online_pairs_config_is_checked(make_cfg):
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="num_samples"):
        make_cfg("sd15", "online.enabled=true", "online.num_samples=1")
    with pytest.raises(ConfigError, match="objective.name=dpo"):
        make_cfg("sd15", "online.enabled=true", "objective.name=kto")


def test_online_pairs_from_a_cache_score_against_the_cached_captions(make_cfg, tmp_path):
    """Cached batches carry their captions, so a reward that needs prompts (the world oracle, CLIP scores) works
    with a latent cache; a batch without captions gets an error naming the cache and the fix."""
    from diffalign.config import ConfigError
    from diffalign.data.cache import build_cache
    from diffalign.models import load_adapter
    from diffalign.rewards.base import Reward
    from diffalign.train.randomness import step_generator

    class PromptAware(Reward):
        name, dimensions, input_kind, needs_prompt = "prompt_aware", ("score",), "image", True

        def __init__(self):
            self.seen: list[str] = []

        def score(self, inputs, prompts=None, **kw):
            self.seen.extend(prompts)
            return {"score": inputs.float().mean(dim=(1, 2, 3)) + torch.tensor([len(p) for p in prompts]).float()}

    cfg = make_cfg("sd15", "online.enabled=true", "online.reward=brightness", "online.num_samples=2", "online.steps=2",
                   "train.max_steps=1", "train.batch_size=2", f"cache.dir={tmp_path / 'cache'}")
    build_cache(cfg, load_adapter(cfg.model), show_progress=False)
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    reward = PromptAware()
    trainer.pair_provider.reward, trainer.pair_provider.weights = reward, {"score": 1.0}
    batch = next(trainer._loader(0))
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 2
    loss, _ = trainer.compute_loss(batch, step_generator(0, 0, 0))
    assert torch.isfinite(loss)
    assert reward.seen == [c for c in batch["caption"] for _ in range(2)]  # prompt-major, k samples per prompt
    del batch["caption"]
    with pytest.raises(ConfigError, match="carry no captions.*Rebuild it"):
        trainer.compute_loss(batch, step_generator(0, 0, 0))


# ----------------------------------------------------------------------------------------------- resume
def test_pool_save_load_round_trip_keeps_steps_names_and_tensors(tmp_path):
    from diffalign.train.online import SnapshotPool

    params = {"down.0.attn.to_q.lora_A.default.weight": nn.Parameter(torch.zeros(2, 3)),
              "up.lora_B.weight": nn.Parameter(torch.zeros(3, dtype=torch.float64))}
    pool = SnapshotPool(size=3, every=2)
    for step in range(0, 9, 2):  # 5 snapshots into a pool of 3: steps 4, 6, 8 stay
        with torch.no_grad():
            for p in params.values():
                p.copy_(torch.randn(p.shape, dtype=p.dtype))
        pool.add(step, params)
    pool.save(tmp_path / "pool.safetensors")
    restored = SnapshotPool(size=3, every=2)
    restored.add(0, params)  # whatever was there is replaced
    restored.load(tmp_path / "pool.safetensors", params)
    assert restored.steps == pool.steps == [4, 6, 8]
    for i in range(3):
        assert set(restored[i]) == set(params)
        for n in params:
            assert restored[i][n].dtype == params[n].dtype and torch.equal(restored[i][n], pool[i][n])
    smaller = SnapshotPool(size=2, every=2)  # a smaller pool size on resume keeps the newest snapshots
    smaller.load(tmp_path / "pool.safetensors", params)
    assert smaller.steps == [6, 8] and torch.equal(smaller[1]["up.lora_B.weight"], pool[2]["up.lora_B.weight"])
    with pytest.raises(RuntimeError, match="does not fit"):
        restored.load(tmp_path / "pool.safetensors", {"other.weight": nn.Parameter(torch.zeros(1))})


def _pool_copy(pool) -> tuple[list[int], list[dict[str, torch.Tensor]]]:
    return list(pool.steps), [capture(pool[i]) for i in range(len(pool))]


def test_seppo_resume_restores_the_pool_and_matches_an_uninterrupted_run(make_cfg, tmp_path):
    """The pool is saved with every checkpoint; resuming from the step-2 checkpoint gives back exactly the pool the
    uninterrupted run had at step 2, and the resumed steps 3-4 then match the uninterrupted ones."""
    import shutil

    from diffalign.train.checkpoint import list_checkpoints, load_checkpoint
    from diffalign.train.online import POOL_FILE

    common = ["objective.name=seppo", "objective.seppo_pool_size=2", "objective.seppo_snapshot_every=1",
              "online.steps=2", "train.batch_size=2", "train.max_steps=4", "train.checkpoint_every=2"]
    pools = {}
    straight = Trainer(make_cfg("sd15", *common, out=tmp_path / "a"), show_progress=False)
    straight.setup()
    result_a = straight.train(callback=lambda t: pools.setdefault(t.step, _pool_copy(t.pair_provider.pool)))
    ckpt2 = tmp_path / "a" / "checkpoints" / "checkpoint-2"
    assert (ckpt2 / POOL_FILE).is_file()

    resumed = Trainer(make_cfg("sd15", *common, f"train.resume={ckpt2}", out=tmp_path / "b"), show_progress=False)
    resumed.setup()
    assert resumed.step == 2
    steps, snaps = _pool_copy(resumed.pair_provider.pool)
    assert steps == pools[2][0] == [1, 2]
    for got, want in zip(snaps, pools[2][1]):
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    # the snapshot at step 2 is the checkpoint's own weights; the one at step 1 is NOT recoverable from them
    trainable2 = load_checkpoint(ckpt2)["trainable"]
    assert all(torch.equal(snaps[1][n].cpu(), trainable2[n]) for n in snaps[1])
    assert not all(torch.equal(snaps[0][n].cpu(), trainable2[n]) for n in snaps[0])

    result_b = resumed.train()
    assert [h["step"] for h in result_b.history] == [3, 4]
    for a, b in zip(result_a.history[2:], result_b.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7) and b["ref_age"] == a["ref_age"]
    final_a = load_checkpoint(list_checkpoints(tmp_path / "a")[-1])
    final_b = load_checkpoint(list_checkpoints(tmp_path / "b")[-1])
    assert final_a["state"]["step"] == final_b["state"]["step"] == 4
    for k in final_a["trainable"]:
        torch.testing.assert_close(final_b["trainable"][k], final_a["trainable"][k], rtol=1e-5, atol=1e-7)
    assert resumed.pair_provider.pool.steps == straight.pair_provider.pool.steps == [3, 4]

    # a checkpoint without the pool file (an older diffalign) still resumes, with a fresh pool of its weights
    old = tmp_path / "old"
    shutil.copytree(ckpt2, old)
    (old / POOL_FILE).unlink()
    fresh = Trainer(make_cfg("sd15", *common, f"train.resume={old}", out=tmp_path / "c"), show_progress=False)
    fresh.setup()
    assert fresh.pair_provider.pool.steps == [2]


def test_online_pairs_resume_restores_the_refreshed_reference(make_cfg, tmp_path):
    from diffalign.train.online import ONLINE_REFERENCE_FILE

    common = ["online.enabled=true", "online.reward=brightness", "online.num_samples=2", "online.steps=2",
              "online.refresh_every=2", "train.batch_size=2", "train.checkpoint_every=0"]
    first = Trainer(make_cfg("sd15", *common, "train.max_steps=3", out=tmp_path / "o"), show_progress=False)
    first.setup()
    first.train()
    # the final checkpoint (step 3) holds the reference refreshed at step 2, which differs from the step-3 weights
    ckpt = tmp_path / "o" / "checkpoints" / "checkpoint-3"
    assert (ckpt / ONLINE_REFERENCE_FILE).is_file()
    again = Trainer(make_cfg("sd15", *common, "train.max_steps=4", out=tmp_path / "o"), show_progress=False)
    again.setup()
    assert again.step == 3
    want, got = first.pair_provider.snapshot, again.pair_provider.snapshot
    assert got is not None and all(torch.equal(got[n], want[n]) for n in want)
    live = _lora(again)
    assert not all(torch.equal(live[n], got[n]) for n in live)
