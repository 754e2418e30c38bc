"""Ranking agreement between a primary and a shadow model on the same request (pure numpy).

Every function takes the two models' scores for the *same* candidates in the same order.
Orders are "best first, ties by input position", exactly as `service.core.top_n` ranks, so a
model compared with itself agrees perfectly on every measure.

* `kendall_tau` - Kendall's tau-b (ties in either ranking handled as scipy.stats.kendalltau).
  O(n^2) over candidate pairs, done in row blocks: n is at most `max_candidates` (1000 by
  default), i.e. 500k pairs, a few milliseconds of vectorized work off the critical path.
* `spearman` - Pearson correlation of average ranks (scipy.stats.spearmanr).
* `overlap_at` - |top-k(primary) ∩ top-k(shadow)| / min(k, n).
* `ndcg_at` - NDCG@k of the shadow's order, with the primary's scores as graded relevance.
* `score_mae` - per task, the mean absolute difference of the two models' probabilities.

Undefined values (fewer than two candidates, a constant ranking) are NaN, as in scipy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_BLOCK = 256  # rows per block of the pairwise sign matrix (256 x n float64: 2 MB at n = 1000)


def _vector(name: str, x: npt.ArrayLike) -> F64:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _pair(x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[F64, F64]:
    a, b = _vector("x", x), _vector("y", y)
    if a.shape != b.shape:
        raise ValueError(f"x and y must have the same length, got {a.shape[0]} and {b.shape[0]}")
    return a, b


def order_desc(scores: npt.ArrayLike) -> I64:
    """Indices best first; ties keep input order (the service's ranking order)."""
    s = _vector("scores", scores)
    return np.argsort(-s, kind="stable").astype(np.int64)


def rankdata(x: npt.ArrayLike) -> F64:
    """1-based ranks, ties get the average of the ranks they span (scipy's method="average")."""
    a = _vector("x", x)
    n = a.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], n]  # exclusive
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def kendall_tau(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt(untied pairs in x * untied pairs in y)."""
    a, b = _pair(x, y)
    n = a.shape[0]
    if n < 2:
        return math.nan
    s = 0.0
    untied_a = 0
    untied_b = 0
    for lo in range(0, n, _BLOCK):
        hi = min(lo + _BLOCK, n)
        sa = np.sign(a[lo:hi, None] - a[None, :])
        sb = np.sign(b[lo:hi, None] - b[None, :])
        # every unordered pair appears twice (i, j) and (j, i): the factor 2 cancels in the ratio
        s += float(np.sum(sa * sb))
        untied_a += int(np.count_nonzero(sa))
        untied_b += int(np.count_nonzero(sb))
    if untied_a == 0 or untied_b == 0:
        return math.nan
    return float(np.clip(s / math.sqrt(float(untied_a) * float(untied_b)), -1.0, 1.0))


def spearman(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks."""
    a, b = _pair(x, y)
    if a.shape[0] < 2:
        return math.nan
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    if denom == 0.0:
        return math.nan
    return float(np.clip(float(ra @ rb) / denom, -1.0, 1.0))


def overlap_at(x: npt.ArrayLike, y: npt.ArrayLike, k: int) -> float:
    """Share of the top-k by x that is also in the top-k by y (k capped at the candidate count)."""
    a, b = _pair(x, y)
    kk = min(k, int(a.shape[0]))
    if kk <= 0:
        return math.nan
    common = np.intersect1d(order_desc(a)[:kk], order_desc(b)[:kk], assume_unique=True)
    return float(common.shape[0] / kk)


def ndcg_at(relevance: npt.ArrayLike, shadow_scores: npt.ArrayLike, k: int) -> float:
    """NDCG@k of the order by `shadow_scores`, with `relevance` (the primary's scores) as gains.

    Gains must be non-negative, so relevance is shifted by its minimum when any value is
    negative (e.g. log-transformed fusion). The ideal order is the relevance's own order, so
    NDCG is 1 exactly when the shadow's top k is the primary's top k in the same order (or a
    reordering among equal gains). Linear gains, discount 1 / log2(position + 1).
    """
    rel, s = _pair(relevance, shadow_scores)
    kk = min(k, int(rel.shape[0]))
    if kk <= 0:
        return math.nan
    if rel.min() < 0:
        rel = rel - rel.min()
    discount = 1.0 / np.log2(np.arange(2, kk + 2, dtype=np.float64))
    ideal = float(rel[order_desc(rel)[:kk]] @ discount)
    if ideal == 0.0:  # every gain is zero: any order is ideal
        return 1.0
    return float(rel[order_desc(s)[:kk]] @ discount) / ideal


def score_mae(
    primary: npt.ArrayLike, shadow: npt.ArrayLike, primary_tasks: Sequence[str], shadow_tasks: Sequence[str]
) -> dict[str, float]:
    """Mean |p_primary - p_shadow| per task, for the tasks both models predict ([n, T] arrays)."""
    p, q = np.asarray(primary, dtype=np.float64), np.asarray(shadow, dtype=np.float64)
    if p.ndim != 2 or q.ndim != 2 or p.shape[0] != q.shape[0]:
        raise ValueError(f"task scores must be [n, T] arrays with the same n, got {p.shape} and {q.shape}")
    out: dict[str, float] = {}
    for j, task in enumerate(primary_tasks):
        if task in shadow_tasks and p.shape[0]:
            out[task] = float(np.mean(np.abs(p[:, j] - q[:, list(shadow_tasks).index(task)])))
    return out


@dataclass(frozen=True)
class Agreement:
    """Every agreement measure for one request; NaN where undefined."""

    candidates: int
    top_n: int
    kendall_tau: float
    spearman: float
    overlap_at_10: float
    overlap_at_n: float
    ndcg_at_n: float
    score_mae: Mapping[str, float]

    RANK_MEASURES = ("kendall_tau", "spearman", "overlap_at_10", "overlap_at_n", "ndcg_at_n")

    def measures(self) -> dict[str, float]:
        """The rank measures by name (what the per-shadow histograms observe)."""
        return {name: float(getattr(self, name)) for name in self.RANK_MEASURES}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN becomes None."""

        def clean(v: float) -> float | None:
            return None if math.isnan(v) else round(v, 6)

        return {
            "candidates": self.candidates,
            "top_n": self.top_n,
            **{name: clean(v) for name, v in self.measures().items()},
            "score_mae": {t: clean(v) for t, v in self.score_mae.items()},
        }


def compare(
    primary_fused: npt.ArrayLike,
    shadow_fused: npt.ArrayLike,
    primary_probs: npt.ArrayLike,
    shadow_probs: npt.ArrayLike,
    primary_tasks: Sequence[str],
    shadow_tasks: Sequence[str],
    top_n: int,
) -> Agreement:
    """All measures of the shadow against the primary for one request's candidates."""
    p, s = _pair(primary_fused, shadow_fused)
    return Agreement(
        candidates=int(p.shape[0]),
        top_n=top_n,
        kendall_tau=kendall_tau(p, s),
        spearman=spearman(p, s),
        overlap_at_10=overlap_at(p, s, 10),
        overlap_at_n=overlap_at(p, s, top_n),
        ndcg_at_n=ndcg_at(p, s, top_n),
        score_mae=score_mae(primary_probs, shadow_probs, primary_tasks, shadow_tasks),
    )
