"""Offline ranking metrics (pure numpy): AUC, GAUC, logloss, Weighted Recall@K, information abundance."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


def _rank_average(x: npt.NDArray[np.floating]) -> FloatArray:
    """1-based ranks with ties averaged (as scipy.stats.rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    boundaries = np.r_[True, xs[1:] != xs[:-1], True]
    idx = np.flatnonzero(boundaries)
    ranks_sorted = np.empty(xs.shape[0], dtype=np.float64)
    for lo, hi in itertools.pairwise(idx):
        ranks_sorted[lo:hi] = (lo + hi + 1) / 2.0
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half). NaN if one class is absent."""
    y = np.asarray(labels, dtype=np.float64) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _rank_average(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(labels: npt.ArrayLike, scores: npt.ArrayLike, groups: npt.ArrayLike) -> float:
    """Group AUC: per-user AUC weighted by the user's sample count, over users with both classes."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    g = np.asarray(groups)
    order = np.argsort(g, kind="mergesort")
    y, s, g = y[order], s[order], g[order]
    bounds = np.flatnonzero(np.r_[True, g[1:] != g[:-1], True])
    total = 0.0
    weight = 0.0
    for lo, hi in itertools.pairwise(bounds):
        a = auc(y[lo:hi], s[lo:hi])
        if not np.isnan(a):
            total += a * (hi - lo)
            weight += hi - lo
    return total / weight if weight else float("nan")


def logloss(labels: npt.ArrayLike, probs: npt.ArrayLike, eps: float = 1e-7) -> float:
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def recall_at_k(positives: npt.ArrayLike, scores: npt.ArrayLike, queries: npt.ArrayLike, k: int) -> float:
    """R_e@K = Σ_q |TopK_q ∩ P_q| / Σ_q |P_q|, ranking each query's candidates by `scores`.

    Candidates with equal scores share the top-K slots left at their rank: each counts as the
    expected hit under a random order of the tie (no order of the input favours a positive)."""
    pos = np.asarray(positives, dtype=np.float64) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    q = np.asarray(queries)
    # order by query, then score descending; the rank inside a query is the position minus its start
    order = np.lexsort((-s, q))
    qs, ss = q[order], s[order]
    n = qs.shape[0]
    new_query = np.r_[True, qs[1:] != qs[:-1]]
    starts = np.flatnonzero(new_query)
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    # runs of equal scores inside a query: a run of m from rank r holds clip(k - r, 0, m) top-K slots
    tie_starts = np.flatnonzero(new_query | np.r_[True, ss[1:] != ss[:-1]])
    tie_sizes = np.diff(np.r_[tie_starts, n])
    size = np.repeat(tie_sizes, tie_sizes)
    credit = np.clip(k - np.repeat(rank[tie_starts], tie_sizes), 0, size) / size
    hits = float((credit * pos[order]).sum())
    total = pos.sum()
    return float(hits / total) if total else float("nan")


def weighted_recall_at_k(
    labels: Mapping[str, npt.ArrayLike],
    scores: npt.ArrayLike,
    queries: npt.ArrayLike,
    k: int,
    weights: Mapping[str, float],
) -> dict[str, float]:
    """Per-event R_e@K and WR@K = Σ_e λ_e R_e@K (ResFlow's offline metric)."""
    out = {f"R_{e}@{k}": recall_at_k(labels[e], scores, queries, k) for e in weights}
    out[f"WR@{k}"] = float(sum(weights[e] * out[f"R_{e}@{k}"] for e in weights if not np.isnan(out[f"R_{e}@{k}"])))
    return out


def singular_values(table: npt.ArrayLike) -> FloatArray:
    return np.linalg.svd(np.asarray(table, dtype=np.float64), compute_uv=False)


def information_abundance(table: npt.ArrayLike) -> float:
    """IA(E) = Σσ / max σ: near the width for a healthy table, much smaller when collapsed."""
    sv = singular_values(table)
    return float(sv.sum() / sv.max()) if sv.size and sv.max() > 0 else 0.0
