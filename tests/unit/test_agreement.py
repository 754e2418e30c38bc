"""Agreement measures against hand-computed values and definition-level reference implementations
(scipy too, when it is installed)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from service.experiments.agreement import (
    compare,
    kendall_tau,
    ndcg_at,
    order_desc,
    overlap_at,
    rankdata,
    score_mae,
    spearman,
)


def ref_kendall_tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b straight from its definition, pair by pair."""
    conc = disc = ties_x = ties_y = pairs = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        pairs += 1
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0:
            ties_x += 1
        if dy == 0:
            ties_y += 1
        if dx * dy > 0:
            conc += 1
        elif dx * dy < 0:
            disc += 1
    return (conc - disc) / math.sqrt((pairs - ties_x) * (pairs - ties_y))


def ref_avg_ranks(x: list[float]) -> list[float]:
    return [sum(1 for v in x if v < xi) + (sum(1 for v in x if v == xi) + 1) / 2 for xi in x]


def ref_spearman(x: list[float], y: list[float]) -> float:
    rx, ry = ref_avg_ranks(x), ref_avg_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


# -- hand-computed -------------------------------------------------------------------------------------


def test_one_swapped_pair() -> None:
    # pairs: 5 concordant, 1 discordant -> (5 - 1) / 6; d = [0, 1, 1, 0] -> 1 - 6*2 / (4*15) = 0.8
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)


def test_ties_use_tau_b_and_average_ranks() -> None:
    x, y = [1, 2, 2, 3], [1, 2, 3, 3]
    # 4 concordant, 0 discordant, one tie in each: 4 / sqrt(5 * 5)
    assert kendall_tau(x, y) == pytest.approx(0.8)
    # ranks [1, 2.5, 2.5, 4] and [1, 2, 3.5, 3.5]: cov 3.75, variances 4.5 each
    assert rankdata(x).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert spearman(x, y) == pytest.approx(3.75 / 4.5)


def test_identical_reversed_and_undefined() -> None:
    s = np.array([0.3, 0.9, 0.1, 0.5, 0.7])
    assert kendall_tau(s, s) == 1.0 and spearman(s, s) == 1.0
    assert kendall_tau(s, -s) == -1.0 and spearman(s, -s) == -1.0
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))  # a constant ranking: undefined, as scipy
    assert math.isnan(spearman([1.0], [2.0]))
    assert math.isnan(overlap_at([], [], 10))


def test_overlap() -> None:
    x, y = [5, 4, 3, 2, 1], [1, 2, 3, 4, 5]
    assert overlap_at(x, y, 2) == 0.0
    assert overlap_at(x, y, 3) == pytest.approx(1 / 3)  # {0,1,2} vs {4,3,2}
    assert overlap_at(x, y, 10) == 1.0  # k capped at n: every candidate is in both
    assert overlap_at(x, x, 2) == 1.0


def test_ndcg_hand_computed() -> None:
    rel = [3.0, 2.0, 1.0, 0.0]
    shadow = [2.0, 3.0, 1.0, 0.0]  # shadow order: 1, 0, 2, 3
    dcg = 2 / math.log2(2) + 3 / math.log2(3)
    idcg = 3 / math.log2(2) + 2 / math.log2(3)
    assert ndcg_at(rel, shadow, 2) == pytest.approx(dcg / idcg)
    assert ndcg_at(rel, rel, 4) == 1.0
    # negative scores (log fusion) are shifted to non-negative gains: [2, 1, 0] after the shift
    neg = [-1.0, -2.0, -3.0]
    assert ndcg_at(neg, [0.0, 1.0, 2.0], 1) == pytest.approx(0 / 2)
    assert ndcg_at([0.0, 0.0], [1.0, 2.0], 2) == 1.0  # all gains zero: any order is ideal


def test_score_mae_per_common_task() -> None:
    p = np.array([[0.1, 0.5], [0.3, 0.5]])
    q = np.array([[0.3, 0.4], [0.3, 0.6]])  # the shadow's columns are (buy, click)
    assert score_mae(p, q, ["click", "buy"], ["buy", "click"]) == pytest.approx({"click": 0.3, "buy": 0.2})
    assert score_mae(p, q[:, :1], ["click", "buy"], ["cart"]) == {}


def test_order_breaks_ties_by_input_position() -> None:
    assert order_desc([1.0, 3.0, 3.0, 2.0]).tolist() == [1, 2, 3, 0]


# -- against references -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_matches_definitions_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    x = rng.integers(0, 8, n).astype(float)  # few distinct values: many ties
    y = x + rng.integers(-3, 4, n)
    assert kendall_tau(x, y) == pytest.approx(ref_kendall_tau_b(x.tolist(), y.tolist()), abs=1e-12)
    assert spearman(x, y) == pytest.approx(ref_spearman(x.tolist(), y.tolist()), abs=1e-12)
    assert rankdata(x).tolist() == pytest.approx(ref_avg_ranks(x.tolist()))


def test_blocked_kendall_equals_reference_beyond_one_block() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=600)  # > the 256-row block
    y = x + rng.normal(scale=0.5, size=600)
    assert kendall_tau(x, y) == pytest.approx(ref_kendall_tau_b(x.tolist(), y.tolist()), abs=1e-12)


def test_matches_scipy_when_installed() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x = rng.integers(0, 20, 300).astype(float)
    y = x + rng.normal(size=300)
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


# -- compare ----------------------------------------------------------------------------------------


def test_compare_self_is_perfect_agreement() -> None:
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=(200, 3)).astype(np.float32)
    fused = probs.astype(np.float64) @ np.array([1.0, 3.0, 10.0])
    a = compare(fused, fused.copy(), probs, probs.copy(), ["click", "cart", "buy"], ["click", "cart", "buy"], 50)
    assert a.measures() == {"kendall_tau": 1.0, "spearman": 1.0, "overlap_at_10": 1.0, "overlap_at_n": 1.0,
                            "ndcg_at_n": 1.0}
    assert a.score_mae == {"click": 0.0, "cart": 0.0, "buy": 0.0}
    doc = a.as_dict()
    assert doc["candidates"] == 200 and doc["top_n"] == 50


def test_compare_different_model_is_below_one() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(size=(100, 2)).astype(np.float32)
    q = np.clip(p + rng.normal(scale=0.2, size=p.shape), 0, 1).astype(np.float32)
    a = compare(p.sum(1), q.sum(1), p, q, ["click", "buy"], ["click", "buy"], 20)
    assert 0 < a.kendall_tau < 1 and 0 < a.spearman < 1
    assert a.overlap_at_10 < 1 or a.overlap_at_n < 1
    assert 0 < a.ndcg_at_n < 1
    assert all(0 < v < 0.3 for v in a.score_mae.values())


def test_compare_nan_becomes_null() -> None:
    a = compare([1.0], [1.0], [[0.5]], [[0.5]], ["click"], ["click"], 10)
    doc = a.as_dict()
    assert doc["kendall_tau"] is None and doc["spearman"] is None and doc["overlap_at_10"] == 1.0
