"""Offline metrics (models.metrics) against hand-computed values: AUC with ties, recall@K with and
without tied scores, WR@K."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.metrics import auc, gauc, recall_at_k, weighted_recall_at_k


def test_auc_counts_ties_as_half() -> None:
    assert auc([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2]) == 1.0
    assert auc([1, 0], [0.5, 0.5]) == 0.5
    assert auc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(0.875)  # 3 wins + 1 tie of 4 pairs
    assert math.isnan(auc([1, 1], [0.2, 0.3]))  # one class: undefined


def test_gauc_weights_each_query_by_its_samples_and_skips_one_class_queries() -> None:
    labels, scores, groups = [1, 0, 1, 0, 0, 1], [0.9, 0.1, 0.2, 0.8, 0.3, 0.5], [0, 0, 1, 1, 1, 2]
    assert gauc(labels, scores, groups) == pytest.approx((1.0 * 2 + 0.0 * 3) / 5)


def test_recall_at_k_without_ties() -> None:
    positives = [1, 0, 0, 1, 0, 1]
    scores = [0.9, 0.8, 0.1, 0.2, 0.7, 0.6]
    queries = [0, 0, 0, 1, 1, 1]
    # query 0: the positive ranks 1st; query 1: positives rank 3rd (0.2) and 2nd (0.6)
    assert recall_at_k(positives, scores, queries, 1) == pytest.approx(1 / 3)
    assert recall_at_k(positives, scores, queries, 2) == pytest.approx(2 / 3)
    assert recall_at_k(positives, scores, queries, 3) == 1.0


@pytest.mark.parametrize("positive_at", range(4))
def test_recall_at_k_shares_tied_slots_whatever_the_order(positive_at: int) -> None:
    positives = np.zeros(4)
    positives[positive_at] = 1
    tied = [0.3] * 4
    assert recall_at_k(positives, tied, [0] * 4, 1) == pytest.approx(0.25)  # one slot for four tied
    assert recall_at_k(positives, tied, [0] * 4, 3) == pytest.approx(0.75)
    # a tie below a better candidate shares what the better one left
    scores = [0.3] * 4
    other = (positive_at + 1) % 4
    scores[other] = 0.9
    assert recall_at_k(positives, scores, [0] * 4, 2) == pytest.approx(1 / 3)


def test_weighted_recall_is_the_weighted_sum_of_the_tasks_recalls() -> None:
    labels = {"click": [1, 0, 1, 0], "buy": [0, 0, 1, 0]}
    scores, queries = [0.9, 0.8, 0.1, 0.2], [0, 0, 0, 0]
    out = weighted_recall_at_k(labels, scores, queries, 2, {"click": 0.4, "buy": 0.6})
    assert out["R_click@2"] == 0.5 and out["R_buy@2"] == 0.0
    assert out["WR@2"] == pytest.approx(0.2)
