"""Bradley-Terry with ties (Rao-Kupper): probabilities, NLL, masking and accuracies against hand values."""
import math

import pytest
import torch

from diffalign.rewards.btt import (accuracy_with_ties, accuracy_without_ties, btt_loss, btt_nll, btt_probabilities)

THETA = 5.0


def rao_kupper(r_a: float, r_b: float, theta: float = THETA) -> tuple[float, float, float]:
    """The textbook Rao-Kupper probabilities with strengths pi = exp(r)."""
    pa, pb = math.exp(r_a), math.exp(r_b)
    win_a = pa / (pa + theta * pb)
    win_b = pb / (pb + theta * pa)
    tie = (theta ** 2 - 1) * pa * pb / ((pa + theta * pb) * (theta * pa + pb))
    return win_a, win_b, tie


def test_probabilities_match_rao_kupper_and_sum_to_one():
    # hand values at theta = 5: delta = 0 -> (1/6, 1/6, 2/3); delta = ln 5 -> (1/2, 1/26, 12/26)
    p_a, p_b, p_t = btt_probabilities(torch.tensor([0.0, math.log(5.0)], dtype=torch.float64), THETA)
    assert p_a.tolist() == pytest.approx([1 / 6, 1 / 2], abs=1e-12)
    assert p_b.tolist() == pytest.approx([1 / 6, 1 / 26], abs=1e-12)
    assert p_t.tolist() == pytest.approx([2 / 3, 12 / 26], abs=1e-12)
    for r_a, r_b in [(0.3, -1.2), (2.0, 2.0), (-0.7, 1.9), (4.0, -3.0)]:
        got = btt_probabilities(torch.tensor(r_a - r_b, dtype=torch.float64), THETA)
        want = rao_kupper(r_a, r_b)
        assert [float(g) for g in got] == pytest.approx(want, abs=1e-12)
        assert sum(want) == pytest.approx(1.0, abs=1e-12)


def test_nll_is_minus_log_of_the_labelled_outcome():
    delta = torch.tensor([0.8, 0.8, 0.8, -2.5, 0.0], dtype=torch.float64)
    labels = torch.tensor([1, -1, 0, 0, 0])
    nll = btt_nll(delta, labels, THETA)
    for d, y, v in zip(delta.tolist(), labels.tolist(), nll.tolist()):
        win_a, win_b, tie = rao_kupper(d, 0.0)
        assert v == pytest.approx(-math.log({1: win_a, -1: win_b, 0: tie}[y]), abs=1e-12)
    # the formula as ALGORITHMS.md writes it, for the tie: -log s(D - ln th) - log s(-D - ln th) - ln(th^2 - 1)
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    d = 0.8
    assert float(nll[2]) == pytest.approx(-math.log(s(d - math.log(5))) - math.log(s(-d - math.log(5))) - math.log(24))
    # a tie is most likely (lowest NLL) at delta = 0; a win's NLL falls as delta grows
    grid = torch.linspace(-3, 3, 61, dtype=torch.float64)
    assert float(grid[torch.argmin(btt_nll(grid, torch.zeros(61, dtype=torch.long)))]) == pytest.approx(0.0)
    assert torch.all(torch.diff(btt_nll(grid, torch.ones(61, dtype=torch.long))) < 0)
    with pytest.raises(ValueError, match="theta"):
        btt_nll(delta, labels, theta=1.0)


def test_loss_is_the_mean_over_labelled_entries_with_per_dimension_metrics():
    r_a = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64, requires_grad=True)
    r_b = torch.tensor([[0.0, 0.0], [1.0, 0.5]], dtype=torch.float64)
    labels = torch.tensor([[1, 0], [1, -1]])
    loss, m = btt_loss(r_a, r_b, labels, theta=THETA, dimensions=["VQ", "TA"])
    hand = [-math.log(rao_kupper(1.0, 0.0)[0]), -math.log(rao_kupper(0.0, 0.0)[2]),
            -math.log(rao_kupper(-1.0, 0.0)[0]), -math.log(rao_kupper(1.5, 0.0)[1])]
    assert float(loss.detach()) == pytest.approx(sum(hand) / 4, abs=1e-12)
    assert m["loss/VQ"] == pytest.approx((hand[0] + hand[2]) / 2, abs=1e-12)
    assert m["loss/TA"] == pytest.approx((hand[1] + hand[3]) / 2, abs=1e-12)
    # VQ: pair 0 right (delta 1 > 0, A), pair 1 wrong (delta -1, A); TA: the non-tie pair 1 wrong
    assert m["acc/VQ"] == 0.5 and m["acc/TA"] == 0.0 and m["acc"] == pytest.approx(1 / 3)
    assert m["n/VQ"] == 2 and m["n_ties/TA"] == 1
    loss.backward()
    assert torch.isfinite(r_a.grad).all() and r_a.grad[0, 0] < 0  # raising a winner's score lowers the loss


def test_masked_labels_change_nothing():
    torch.manual_seed(0)
    r_a, r_b = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    labels = torch.randint(-1, 2, (6, 3))
    mask = torch.rand(6, 3) > 0.35
    mask[0, 0] = False
    a1, a2 = r_a.clone().requires_grad_(True), r_a.clone()
    loss1, m1 = btt_loss(a1, r_b, labels, mask)
    # junk in the masked entries: other labels, NaN scores
    a2[~mask] = float("nan")
    a2.requires_grad_(True)
    labels2 = labels.clone()
    labels2[~mask] = 7
    loss2, m2 = btt_loss(a2, r_b, labels2, mask)
    assert float(loss1.detach()) == pytest.approx(float(loss2.detach()), abs=1e-15)
    for k in m1:
        assert (math.isnan(m1[k]) and math.isnan(m2[k])) or m1[k] == pytest.approx(m2[k], abs=1e-15), k
    loss1.backward()
    loss2.backward()
    assert torch.equal(a1.grad[mask], a2.grad[mask]) and torch.all(a2.grad[~mask] == 0)
    # and it equals the mean over the unmasked entries alone (masked out of numerator AND denominator)
    nll = btt_nll((r_a - r_b)[mask], labels[mask])
    assert float(loss1.detach()) == pytest.approx(float(nll.mean()), abs=1e-12)
    # nothing labelled: loss 0, still differentiable, accuracies NaN
    none = torch.zeros(6, 3, dtype=torch.bool)
    a3 = r_a.clone().requires_grad_(True)
    loss3, m3 = btt_loss(a3, r_b, labels, none)
    loss3.backward()
    assert float(loss3.detach()) == 0.0 and math.isnan(m3["acc"]) and torch.all(a3.grad == 0)


def test_accuracy_without_ties_skips_tie_labels_and_halves_exact_zeros():
    delta = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    labels = torch.tensor([1, 1, 0, -1, -1])
    acc, n = accuracy_without_ties(delta, labels, torch.ones(5, dtype=torch.bool))
    assert n == 4 and acc == pytest.approx((1 + 0 + 0.5 + 0) / 4)  # the tie-labelled 0.5 is not counted
    acc, n = accuracy_without_ties(delta, labels, torch.tensor([True, False, True, False, False]))
    assert n == 1 and acc == 1.0


def _tie_accuracy_reference(delta: list[float], labels: list[int]) -> float:
    """VideoAlign's calc_accuracy_with_ties, written as the plain search it is: try every epsilon."""
    best = 0.0
    for eps in [-1.0] + [abs(d) for d in delta]:
        correct = sum((y == 0 and abs(d) <= eps) or (y != 0 and abs(d) > eps and d * y > 0) for d, y in zip(delta, labels))
        best = max(best, correct / len(delta))
    return best


def test_accuracy_with_ties_is_tie_calibrated():
    # hand case: predicting a tie for |delta| <= 0.2 gets all four right
    acc, eps, n = accuracy_with_ties(torch.tensor([0.1, -0.2, 2.0, -3.0]), torch.tensor([0, 0, 1, -1]),
                                     torch.ones(4, dtype=torch.bool))
    assert (acc, eps, n) == (1.0, pytest.approx(0.2), 4)
    # no tie labels: the best threshold is "never a tie"
    acc, eps, _ = accuracy_with_ties(torch.tensor([0.1, -0.2, 2.0]), torch.tensor([1, -1, 1]), torch.ones(3, dtype=torch.bool))
    assert acc == 1.0 and eps == float("-inf")
    g = torch.Generator().manual_seed(1)
    for _ in range(20):  # against the brute-force search, including repeated |delta| values
        delta = torch.round(torch.randn(40, generator=g) * 4) / 4
        labels = torch.randint(-1, 2, (40,), generator=g)
        acc, _, _ = accuracy_with_ties(delta, labels, torch.ones(40, dtype=torch.bool))
        assert acc == pytest.approx(_tie_accuracy_reference(delta.tolist(), labels.tolist()), abs=1e-12)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        btt_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="dimension names"):
        btt_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), dimensions=["a"])
