"""Bradley-Terry with ties (Rao-Kupper), per dimension: the loss reward models are trained with.

Conventions (shapes: N pairs, D dimensions):

* ``r_a``, ``r_b``: float [N, D], the model's scores of item A and item B on each dimension.
  Delta = r_A - r_B.
* ``labels``: int [N, D] in {+1, -1, 0}: +1 = A preferred, -1 = B preferred, 0 = tie ("same").
* ``mask``: bool [N, D]: True where the label exists. A masked entry is dropped from the numerator AND
  the denominator of every mean (so a pair labelled only on VQ trains and scores only VQ); its label
  and score values are never read (NaN there is harmless).
* Rao-Kupper with theta > 1 (VideoReward: theta = 5), pi = exp(r):
      P(A > B)  = pi_A / (pi_A + theta pi_B)            = sigma(Delta - ln theta)
      P(B > A)  = pi_B / (pi_B + theta pi_A)            = sigma(-Delta - ln theta)
      P(tie)    = (theta^2 - 1) pi_A pi_B / ((pi_A + theta pi_B)(theta pi_A + pi_B))
                = (theta^2 - 1) sigma(Delta - ln theta) sigma(-Delta - ln theta)
  and the three sum to 1. NLLs: win -log sigma(Delta - ln theta); tie -log sigma(Delta - ln theta)
  - log sigma(-Delta - ln theta) - ln(theta^2 - 1).
* Accuracy WITHOUT ties (VideoReward's "w/o ties"): over entries whose label is not a tie, the fraction
  where sign(Delta) agrees with the label; Delta == 0 exactly counts 1/2 (the project-wide convention:
  an indifferent model scores 0.5, not 0 or 1).
* Accuracy WITH ties (VideoReward's "w/ ties", tie calibration of Deutsch et al. 2023, the algorithm of
  VideoAlign's calc_accuracy.py): the model predicts a tie when |Delta| <= epsilon; epsilon is chosen
  to maximise accuracy over all labelled entries (ties included). It is therefore an optimistic,
  calibrated figure; ``epsilon`` is reported beside it.

Everything here is a pure function of tensors: no model code, no I/O.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

DEFAULT_THETA = 5.0


def _check_theta(theta: float) -> None:
    if not theta > 1.0:
        raise ValueError(f"Rao-Kupper theta must be > 1 (ties need theta^2 - 1 > 0), got {theta}")


def btt_probabilities(delta: torch.Tensor, theta: float = DEFAULT_THETA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P(A wins), P(B wins), P(tie)) for score differences ``delta`` (any shape), Rao-Kupper theta."""
    _check_theta(theta)
    log_theta = math.log(theta)
    p_a = torch.sigmoid(delta - log_theta)
    p_b = torch.sigmoid(-delta - log_theta)
    return p_a, p_b, (theta * theta - 1.0) * p_a * p_b


def btt_nll(delta: torch.Tensor, labels: torch.Tensor, theta: float = DEFAULT_THETA) -> torch.Tensor:
    """Per-entry negative log-likelihood, same shape as ``delta``; labels +1 (A), -1 (B), 0 (tie).

    Computed with logsigmoid, so it stays finite for any finite delta.
    """
    _check_theta(theta)
    log_theta = math.log(theta)
    nll_a = -F.logsigmoid(delta - log_theta)    # A preferred
    nll_b = -F.logsigmoid(-delta - log_theta)   # B preferred
    nll_tie = nll_a + nll_b - math.log(theta * theta - 1.0)
    return torch.where(labels > 0, nll_a, torch.where(labels < 0, nll_b, nll_tie))


def accuracy_without_ties(delta: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(accuracy, count) over masked-in, non-tie entries of 1-D or flattened tensors; NaN if count is 0."""
    keep = mask.bool() & (labels != 0)
    n = int(keep.sum())
    if n == 0:
        return float("nan"), 0
    d, y = delta[keep].float(), labels[keep].float()
    correct = (torch.sign(d) == torch.sign(y)).float() + 0.5 * (d == 0).float()
    return float(correct.sum() / n), n


def accuracy_with_ties(delta: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, int]:
    """(accuracy, epsilon, count): tie-calibrated accuracy over every masked-in entry (ties included).

    The model says "tie" when |delta| <= epsilon, else sign(delta). Candidates for epsilon are "never a
    tie" (-inf) and every |delta|; the best one is kept (the first, i.e. smallest, on equal accuracy).
    O(n log n) via cumulative counts over entries sorted by |delta|.
    """
    keep = mask.bool()
    n = int(keep.sum())
    if n == 0:
        return float("nan"), float("nan"), 0
    d, y = delta[keep].double(), labels[keep]
    a = d.abs()
    order = torch.argsort(a)
    a, d, y = a[order], d[order], y[order]
    is_tie = (y == 0).double()
    agrees = ((torch.sign(d) == torch.sign(y.double())) & (y != 0)).double()
    # epsilon = a[i] predicts ties for entries 0..i (plus any later entry with the same |delta|):
    # correct = ties among them + agreeing non-ties after them.
    ties_upto = torch.cumsum(is_tie, 0)
    agree_after = agrees.sum() - torch.cumsum(agrees, 0)
    # entries sharing an |delta| value must switch together: use the last index of each run
    last_of_run = torch.ones_like(a, dtype=torch.bool)
    last_of_run[:-1] = a[1:] != a[:-1]
    correct = torch.where(last_of_run, ties_upto + agree_after, torch.full_like(a, -1.0))
    never_tie = float(agrees.sum())
    best = int(torch.argmax(correct))
    if float(correct[best]) > never_tie:
        return float(correct[best]) / n, float(a[best]), n
    return never_tie / n, float("-inf"), n


def btt_loss(r_a: torch.Tensor, r_b: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, *,
             theta: float = DEFAULT_THETA, dimensions: Sequence[str] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Rao-Kupper BTT loss over all labelled (pair, dimension) entries and per-dimension metrics.

    r_a, r_b: float [N, D]; labels: int [N, D] in {+1, -1, 0}; mask: bool [N, D] (None = all labelled).
    Returns ``(loss, metrics)``: loss is the mean NLL over masked-in entries (a scalar with grad; 0 when
    nothing is labelled, still connected to the graph); metrics is a flat dict of floats with ``loss``,
    ``acc`` (w/o ties, pooled over dimensions), ``acc_ties`` (tie-calibrated, mean over dimensions that
    have labels) and per dimension ``loss/<d>``, ``acc/<d>``, ``acc_ties/<d>``, ``n/<d>``, ``n_ties/<d>``.
    """
    if r_a.shape != r_b.shape or r_a.ndim != 2:
        raise ValueError(f"r_a and r_b must both be [N, D]; got {tuple(r_a.shape)} and {tuple(r_b.shape)}")
    if labels.shape != r_a.shape:
        raise ValueError(f"labels must be [N, D] = {tuple(r_a.shape)}; got {tuple(labels.shape)}")
    mask = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
    if mask.shape != r_a.shape:
        raise ValueError(f"mask must be [N, D] = {tuple(r_a.shape)}; got {tuple(mask.shape)}")
    dims = list(dimensions) if dimensions is not None else [str(i) for i in range(r_a.shape[1])]
    if len(dims) != r_a.shape[1]:
        raise ValueError(f"{len(dims)} dimension names for {r_a.shape[1]} score columns")
    labels = labels.to(r_a.device)
    mask = mask.to(r_a.device)
    delta = r_a - r_b
    # masked entries may hold anything (NaN scores, junk labels): zero them BEFORE the NLL so that
    # 0 * NaN never reaches the sum or its gradient
    safe_delta = torch.where(mask, delta, torch.zeros_like(delta))
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    nll = btt_nll(safe_delta, safe_labels, theta) * mask
    count = mask.sum()
    loss = nll.sum() / count.clamp(min=1)
    metrics: dict[str, float] = {"loss": float(loss.detach())}
    with torch.no_grad():
        d_det = delta.detach()
        acc, n_acc = accuracy_without_ties(d_det, labels, mask)
        metrics["acc"] = acc
        tie_accs = []
        for j, name in enumerate(dims):
            m = mask[:, j]
            n_j = int(m.sum())
            metrics[f"n/{name}"] = float(n_j)
            metrics[f"n_ties/{name}"] = float((m & (labels[:, j] == 0)).sum())
            metrics[f"loss/{name}"] = float(nll[:, j].sum() / max(n_j, 1)) if n_j else float("nan")
            metrics[f"acc/{name}"] = accuracy_without_ties(d_det[:, j], labels[:, j], m)[0]
            acc_t = accuracy_with_ties(d_det[:, j], labels[:, j], m)[0]
            metrics[f"acc_ties/{name}"] = acc_t
            if n_j:
                tie_accs.append(acc_t)
        metrics["acc_ties"] = float(sum(tie_accs) / len(tie_accs)) if tie_accs else float("nan")
    return loss, metrics
