"""FiFA-style data selection as pure functions: margins, prompt quality, kNN diversity, scores, top-K.

FiFA (Yang et al., "Automated filtering of human feedback data for aligning text-to-image diffusion
models", ICLR 2025) keeps a small subset of a preference dataset by giving every pair i an importance
score and keeping the highest:

    s_i = margin_i + alpha * q(c_i) + gamma * log rho_k(c_i)

* ``margin_i``: how clearly a proxy reward separates the two images, |r(x_0, c) - r(x_1, c)|
  (:func:`pair_margins`; ``signed=True`` gives r(winner) - r(loser) instead).
* ``q(c)``: prompt quality. The paper asks an LLM for a harmfulness/quality score; offline we have no
  LLM, so :func:`word_count_quality` is a weight-free proxy that only penalises prompts that are very
  short or very long (see there). It is NOT the paper's score; a column with a real score can replace it.
* ``rho_k(c)``: cosine distance from the prompt's embedding to its k-th nearest OTHER prompt
  (:func:`knn_log_distance`); ``log rho_k`` is the per-point term of the Kozachenko-Leonenko kNN entropy
  estimator, so a larger value means a prompt in a sparser region of prompt space (more diversity).

Everything here is numpy in, numpy out (float64), deterministic, with no I/O and no model code;
``diffalign.data.filter_cli`` reads datasets, runs rewards and text encoders, and writes the subset.
Shapes: N = number of pairs (or of distinct prompts for the kNN term), D = embedding width.
"""
from __future__ import annotations

import math
import re
import zlib
from typing import Sequence

import numpy as np

__all__ = ["pair_margins", "word_count_quality", "hashed_bag_of_words", "knn_log_distance", "fifa_scores",
           "top_count", "select_top", "distinct", "quantiles"]


def _vector(name: str, x: Sequence[float] | np.ndarray, n: int | None = None) -> np.ndarray:
    """float64 [N] copy of ``x``; ValueError naming ``name`` and the first bad index otherwise."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one value per pair, shape [N]; got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} values but there are {n} pairs")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name}[{int(bad[0])}] is {float(arr[bad[0]])}; every value must be finite "
                         f"({bad.size} non-finite value(s))")
    return arr


def pair_margins(reward_w: Sequence[float] | np.ndarray, reward_l: Sequence[float] | np.ndarray,
                 signed: bool = False) -> np.ndarray:
    """Preference margin per pair, float64 [N], from proxy rewards of the winner and loser images [N].

    ``signed=False`` (FiFA): |r_w - r_l|, symmetric, so which image is "w" does not matter.
    ``signed=True``: r_w - r_l; pairs whose human label the proxy reward disagrees with get a
    negative margin and rank below every pair it agrees with (a label-noise filter on top of FiFA).
    """
    w = _vector("reward_w", reward_w)
    l = _vector("reward_l", reward_l, w.shape[0])
    diff = w - l
    return diff if signed else np.abs(diff)


def word_count_quality(captions: Sequence[str], min_words: int = 3, max_words: int = 60) -> np.ndarray:
    """Weight-free prompt-quality PROXY q(c) in [-1, 0], float64 [N]; not the paper's LLM score.

    With n = number of whitespace-separated words:

        q = 0                                   if min_words <= n <= max_words
        q = -(min_words - n) / min_words        if n < min_words  (the empty prompt gets -1)
        q = -min(1, (n - max_words) / max_words) if n > max_words

    Why these two ends: one- or two-word prompts ("cat") say little about what the winner did better,
    and CLIP text encoders keep only 77 tokens (roughly 60 words), so the tail of a very long prompt
    never reaches the model. It knows nothing about harmfulness, spelling or meaning.
    """
    if min_words < 1 or max_words < min_words:
        raise ValueError(f"need 1 <= min_words <= max_words; got min_words={min_words}, max_words={max_words}")
    out = np.zeros(len(captions), dtype=np.float64)
    for i, caption in enumerate(captions):
        n = len(str(caption).split())
        if n < min_words:
            out[i] = -(min_words - n) / min_words
        elif n > max_words:
            out[i] = -min(1.0, (n - max_words) / max_words)
    return out


_WORD = re.compile(r"\w+", re.UNICODE)


def hashed_bag_of_words(captions: Sequence[str], dim: int = 1024) -> np.ndarray:
    """Weight-free prompt embedding, float64 [N, dim]: word counts hashed into ``dim`` buckets.

    Words are lower-cased ``\\w+`` runs; bucket = crc32(word) mod dim (crc32, not Python's salted
    ``hash``, so the embedding is the same in every process). A prompt without any word counts as the
    single word "<empty>", so no row is all zeros (cosine distance needs a direction). Lexical only:
    "a dog" and "a puppy" are as far apart as "a dog" and "a car".
    """
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    out = np.zeros((len(captions), dim), dtype=np.float64)
    for i, caption in enumerate(captions):
        words = _WORD.findall(str(caption).lower()) or ["<empty>"]
        for word in words:
            out[i, zlib.crc32(word.encode("utf-8")) % dim] += 1.0
    return out


def knn_log_distance(embeddings: np.ndarray, k: int = 5, eps: float = 1e-6, chunk: int = 2048) -> np.ndarray:
    """log of the cosine distance to the k-th nearest other row, float64 [N], from embeddings [N, D].

    d(i, j) = 1 - <e_i, e_j> / (|e_i| |e_j|) in [0, 2]; rho_k(i) = the k-th smallest d(i, j) over j != i
    (the row itself never counts, even when another row is identical); result = log(max(rho_k, eps)).
    ``eps`` keeps identical embeddings finite (log 0 = -inf would swamp every other term). Computed in
    float64, ``chunk`` rows at a time (memory chunk x N). Needs N > k rows and no all-zero row.
    """
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be [N, D]; got shape {e.shape}")
    n = e.shape[0]
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if n <= k:
        raise ValueError(f"the k-th nearest neighbour needs more than k={k} distinct prompts; got {n}. "
                         "Lower k or filter more data")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not np.isfinite(e).all():
        raise ValueError(f"embedding row {int(np.flatnonzero(~np.isfinite(e).all(axis=1))[0])} is not finite")
    norms = np.linalg.norm(e, axis=1)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(f"embedding row {int(zero[0])} is all zeros; cosine distance is undefined for it")
    unit = e / norms[:, None]
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        dist = 1.0 - unit[start:stop] @ unit.T  # [c, N]
        np.clip(dist, 0.0, 2.0, out=dist)  # rounding can give -1e-16 for identical directions
        dist[np.arange(stop - start), np.arange(start, stop)] = np.inf  # never your own neighbour
        # k-th smallest = index k-1 after a partial sort; equal values make the choice of j irrelevant
        out[start:stop] = np.partition(dist, k - 1, axis=1)[:, k - 1]
    return np.log(np.maximum(out, eps))


def fifa_scores(margin: Sequence[float] | np.ndarray, quality: Sequence[float] | np.ndarray | None = None,
                log_knn: Sequence[float] | np.ndarray | None = None, *, alpha: float = 1.0,
                gamma: float = 0.1) -> np.ndarray:
    """s = margin + alpha * quality + gamma * log_knn, float64 [N]; all inputs [N].

    A term whose weight is 0 may be None (it is not computed then); a None term with a non-zero
    weight is an error rather than a silent 0.
    """
    s = _vector("margin", margin).copy()
    n = s.shape[0]
    for name, weight, term in (("quality", alpha, quality), ("log_knn", gamma, log_knn)):
        if not math.isfinite(weight):
            raise ValueError(f"the weight of {name} must be finite, got {weight}")
        if term is None:
            if weight != 0:
                raise ValueError(f"{name} is missing but its weight is {weight}")
            continue
        if weight != 0:
            s += weight * _vector(name, term, n)
    return s


def top_count(n: int, top_k: int | None = None, top_fraction: float | None = None) -> int:
    """How many of ``n`` pairs to keep: ``top_k`` capped at n, or ceil(top_fraction * n) (>= 1 when
    the fraction is > 0, so a small fraction of a small dataset still keeps a pair). Exactly one of the
    two must be given."""
    if (top_k is None) == (top_fraction is None):
        raise ValueError("give exactly one of top_k and top_fraction")
    if top_k is not None:
        if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        return min(int(top_k), n)
    assert top_fraction is not None
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    # the small tolerance keeps 0.3 * 10 = 3.0000000000000004 from becoming 4
    return min(n, max(1, math.ceil(top_fraction * n - 1e-9)))


def select_top(scores: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores in rank order, int64 [k]; equal scores go to the lower index.

    The order is a total order on (-score, index), so the result never depends on the sort algorithm.
    """
    s = _vector("scores", scores)
    if isinstance(k, bool) or int(k) != k or not 0 <= k <= s.shape[0]:
        raise ValueError(f"k must be an integer in [0, {s.shape[0]}], got {k!r}")
    order = np.lexsort((np.arange(s.shape[0]), -s))  # last key is primary: score descending, then index
    return order[: int(k)].astype(np.int64)


def distinct(captions: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(distinct captions in first-appearance order, inverse int64 [N]) with captions[i] == out[inverse[i]].

    The kNN term is computed over distinct prompts: Pick-a-Pic has many pairs per prompt, and a
    prompt's copies would otherwise be each other's nearest neighbours at distance 0.
    """
    index: dict[str, int] = {}
    inverse = np.empty(len(captions), dtype=np.int64)
    for i, caption in enumerate(captions):
        inverse[i] = index.setdefault(caption, len(index))
    return list(index), inverse


QUANTILES: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def quantiles(x: Sequence[float] | np.ndarray, qs: Sequence[float] = QUANTILES) -> dict[str, float]:
    """{"q0": min, "q10": ..., "q100": max} of ``x`` (numpy's default linear interpolation); {} if empty."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.size == 0:
        return {}
    values = np.quantile(arr, list(qs))
    return {f"q{round(q * 100):d}": float(v) for q, v in zip(qs, values)}
