"""The assembly's numba kernels equal their numpy definitions bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from feature_store.schema import cross_features
from service.assemble import _cross_features


@pytest.mark.parametrize("seed", range(6))
def test_cross_features_kernel_is_the_numpy_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_actions = int(rng.integers(1, 6))
    length = int(rng.choice([1, 5, 300, 10_000]))
    # few distinct items, so candidates hit repeated ones; item 0 (unknown) in history and candidates
    hist_item = rng.integers(0, max(2, length // 4), length).astype(np.int64)
    hist_item[-1] = 1 + int(rng.integers(0, max(2, length // 4)))  # at least one known item
    hist_action = rng.integers(0, n_actions, length).astype(np.uint8)
    hist_ts = np.sort(rng.integers(1_600_000_000, 1_700_000_000, length)).astype(np.int64)
    hist_ts[rng.random(length) < 0.2] = 1_650_000_000  # equal timestamps on different events
    cand = np.unique(rng.integers(0, max(4, length // 2), 500)).astype(np.int64)
    cand = np.unique(np.concatenate([cand, hist_item[-1:]]))
    cand = np.concatenate([[0], cand[cand != 0]])
    request_ts = int(hist_ts.max()) + int(rng.integers(-7200, 86_400 * 30))  # some events after it: gap 0
    want = cross_features(hist_item, hist_action, hist_ts, cand, request_ts, n_actions)
    got = _cross_features(hist_item, hist_action, hist_ts, cand, request_ts, n_actions)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert got[1:, n_actions].any(), "the case must have candidates that match the history"
    assert not got[0].any(), "item 0 never matches"


def test_cross_features_kernel_empty_history_and_no_candidates() -> None:
    empty = np.zeros(0, dtype=np.int64)
    cand = np.array([3, 0, 9], dtype=np.int64)
    assert not _cross_features(empty, empty, empty, cand, 10, 4).any()
    assert _cross_features(np.array([3]), np.array([1]), np.array([5]), empty, 10, 4).shape == (0, 6)


@pytest.mark.parametrize(("slots", "r_dim"), [(24, 32), (64, 20), (1, 8)])  # whole and partial vector chunks
@pytest.mark.parametrize("shared", [False, True])
def test_attention_pool_kernel_is_the_model_pooling(shared: bool, slots: int, r_dim: int) -> None:
    """The service's pooling over rows read in place equals `models.model.attention_pool` on gathered rows."""
    torch = pytest.importorskip("torch")
    from models.model import attention_pool
    from service.assemble import HistoryRows, _attention_pool

    rng = np.random.default_rng(3)
    n_rows, n_cand, a_dim, n_heads = 300, 40, 16, 2
    key = rng.standard_normal((n_rows, a_dim + n_heads), dtype=np.float32) * 2
    rep = rng.standard_normal((n_rows, r_dim), dtype=np.float32)
    query = rng.standard_normal((n_cand, a_dim), dtype=np.float32)
    picked = rng.integers(0, n_rows, (1 if shared else n_cand, slots))
    picked[0, : min(5, slots - 1)] = -1  # padding slots
    if not shared:
        picked[1] = -1  # a candidate with nothing to attend
    identity = np.arange(n_rows)
    none = np.zeros(0, dtype=np.int64)
    rows = HistoryRows(key, rep, identity, identity, np.zeros((0, a_dim + 1), np.float32), none, none)
    got_pooled, got_attended = _attention_pool(rows, picked, query)

    full = np.broadcast_to(picked, (n_cand, slots))
    mask = torch.from_numpy((full >= 0).astype(np.float32))
    safe = np.where(full >= 0, full, 0)
    want_pooled, want_attended = attention_pool(torch.from_numpy(key[safe]), torch.from_numpy(rep[safe]), mask,
                                                torch.from_numpy(query), n_heads)
    np.testing.assert_allclose(got_pooled, want_pooled.numpy(), rtol=0, atol=2e-6)
    assert np.array_equal(got_attended, want_attended.numpy())
    if not shared:
        assert not got_pooled[1].any() and got_attended[1, 0] == 0


def test_candidate_rows_kernel_is_the_numpy_gathers() -> None:
    from service.assemble import Tables, _candidate_rows

    rng = np.random.default_rng(5)
    shapes = {"item_query": (50, 16), "category_query": (7, 16), "item_repr": (50, 32), "category_repr": (7, 32)}
    tables = Tables(**{name: rng.standard_normal(shapes.get(name, (3, 4)), dtype=np.float32)
                       for name in Tables.__dataclass_fields__})
    item, category = tables.clamp_rows(rng.integers(-2, 60, 500), rng.integers(-1, 9, 500))
    query, rep = _candidate_rows(tables, item, category)
    want_query = tables.item_query[item] + tables.category_query[category]
    want_rep = tables.item_repr[item] + tables.category_repr[category]
    assert np.array_equal(query.view(np.uint32), want_query.view(np.uint32))
    assert np.array_equal(rep.view(np.uint32), want_rep.view(np.uint32))


def test_gap_bucket_kernel_is_the_numpy_definition() -> None:
    """The integer bucket in the history kernel equals `time_gap_bucket`'s float log2, on and around every
    boundary, for every gap two u32 timestamps can have."""
    from feature_store.schema import time_gap_bucket
    from service.retrieval.kernels.history import _gap_bucket

    for n_buckets in (1, 2, 7, 16, 40):
        boundaries = [3600 * ((1 << b) - 1) for b in range(n_buckets + 2)]
        gaps = sorted({min(max(g + d, 0), 2**32 - 1) for g in boundaries for d in (-1, 0, 1)} | {1, 3599, 10**9})
        want = time_gap_bucket(np.array(gaps), n_buckets)
        got = [_gap_bucket(g, n_buckets) for g in gaps]
        assert got == want.tolist(), n_buckets
