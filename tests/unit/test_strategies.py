"""Retrieval strategies beside plain exact: exact with duplicate keys removed, sim_hard, eta.

Random data with a fresh seed per run (printed in failures; RETRIEVAL_TEST_SEED replays one).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from service import retrieval
from service.retrieval import (
    DistinctKeys,
    RetrievalContext,
    RetrievalInputError,
    check_against_reference,
    make_retriever,
    parse_strategy,
    recall_at_k,
)

SEED = int(os.environ.get("RETRIEVAL_TEST_SEED", int(np.random.SeedSequence().entropy) % 2**32))


def history(case: int, n_queries: int, n_keys: int, n_distinct: int, dim: int = 17) -> tuple[np.ndarray, np.ndarray]:
    """Queries and keys drawn (with repeats) from n_distinct rows, as a lifelong history repeats behaviours."""
    rng = np.random.default_rng([SEED, case])
    pool = rng.standard_normal((n_distinct, dim), dtype=np.float32)
    keys = pool[rng.integers(0, n_distinct, n_keys)]
    return rng.standard_normal((n_queries, dim), dtype=np.float32), np.ascontiguousarray(keys)


# -- exact with duplicate removal ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_queries", "n_keys", "n_distinct", "k"),
    [(200, 10_000, 2_500, 64), (50, 3_000, 40, 64), (20, 5_000, 1, 64), (30, 2_000, 700, 300), (9, 1_500, 3, 1)],
)
@pytest.mark.parametrize("threads", [None, 1])
def test_dedup_is_identical_to_a_full_search(n_queries: int, n_keys: int, n_distinct: int, k: int,
                                            threads: int | None) -> None:
    queries, keys = history(1, n_queries, n_keys, n_distinct)
    plain = make_retriever("exact", dedup=False, num_threads=threads).search(queries, keys, k)
    dedup = make_retriever("exact", num_threads=threads).search(queries, keys, k)
    assert np.array_equal(plain[0], dedup[0]), f"seed {SEED}"
    assert np.array_equal(plain[1], dedup[1]), f"seed {SEED}"
    assert not check_against_reference(queries, keys, k, *dedup), f"seed {SEED}"


def test_dedup_interleaves_tied_groups_by_index() -> None:
    """Distinct keys with the same score: their rows must interleave by index, as a full search orders them."""
    rng = np.random.default_rng([SEED, 2])
    a = np.zeros(17, dtype=np.float32)
    a[0] = 1.0
    b = a.copy()
    b[5] = 3.0  # differs only where the query is zero: same score as a, a different key
    keys = np.tile(rng.standard_normal(17, dtype=np.float32) * np.float32(0.01), (4_000, 1))
    keys[rng.choice(4_000, 40, replace=False)] = a
    keys[rng.choice(4_000, 40, replace=False)] = b
    queries = np.zeros((3, 17), dtype=np.float32)
    queries[:, 0] = 1.0
    plain = make_retriever("exact", dedup=False).search(queries, keys, 64)
    dedup = make_retriever("exact").search(queries, keys, 64)
    assert np.array_equal(plain[1], dedup[1]) and np.array_equal(plain[0], dedup[0])
    tied = np.flatnonzero((keys == a).all(axis=1) | (keys == b).all(axis=1))  # ascending: a and b rows mixed
    assert dedup[1][0].tolist() == tied[:64].tolist()


def test_distinct_keys_groups() -> None:
    keys = np.array([[1, 2], [3, 4], [1, 2], [1, 2], [3, 4], [5, 6]], dtype=np.float32)
    d = DistinctKeys.of(keys)
    assert d.n_groups == 3
    assert d.first.tolist() == [0, 1, 5]
    assert d.group.tolist() == [0, 1, 0, 0, 1, 2]
    offsets, members = d.members()
    assert offsets.tolist() == [0, 3, 5, 6]
    assert members.tolist() == [0, 2, 3, 1, 4, 5]
    # -0.0 and 0.0 are different bits: kept apart (still exact, just less sharing)
    z = np.array([[0.0, 1.0], [-0.0, 1.0]], dtype=np.float32)
    assert DistinctKeys.of(z).n_groups == 2


def test_dedup_short_history_is_padded() -> None:
    queries, keys = history(3, 4, 1_200, 10)
    scores, idx = make_retriever("exact").search(queries, keys[:30], 64)  # L < k: below the dedup size too
    assert np.all(idx[:, 30:] == -1) and np.all(scores[:, 30:] == -np.inf)
    s2, i2 = make_retriever("exact", dedup_ratio=1.0).search(queries, keys, 2_000)  # k > L with duplicates
    assert np.all(i2[:, 1_200:] == -1)
    assert not check_against_reference(queries, keys, 2_000, s2, i2)


# -- sim_hard ---------------------------------------------------------------------------------------


def categories(case: int, n_keys: int, n_queries: int, n_cats: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([SEED, case])
    sizes = rng.zipf(1.5, n_cats).astype(np.float64)
    key_cat = rng.choice(n_cats, n_keys, p=sizes / sizes.sum())
    return key_cat.astype(np.int64), rng.integers(0, n_cats + 3, n_queries).astype(np.int64)  # some unseen


@pytest.mark.parametrize("fallback", ["exact", "pad"])
@pytest.mark.parametrize("big_segment", [2048, 100])
def test_sim_hard_retrieves_within_the_category(fallback: str, big_segment: int) -> None:
    queries, keys = history(4, 120, 6_000, 3_000)
    key_cat, query_cat = categories(4, 6_000, 120, 40)
    k = 32
    sim = make_retriever("sim_hard", fallback=fallback, big_segment=big_segment)
    scores, idx = sim.search(queries, keys, k, RetrievalContext(key_cat, query_cat))  # type: ignore[attr-defined]
    exact = make_retriever("exact").search(queries, keys, k)
    for q in range(queries.shape[0]):
        members = np.flatnonzero(key_cat == query_cat[q])
        if members.shape[0] >= k:  # its own category: the exact top-k of that subset
            assert set(idx[q].tolist()) <= set(members.tolist())
            sub_s, sub_i = scores[q : q + 1], np.searchsorted(members, idx[q : q + 1])
            problems = check_against_reference(queries[q : q + 1], keys[members], k, sub_s, sub_i)
            assert not problems, f"seed {SEED}, query {q}: {problems}"
        elif fallback == "exact":  # too few: the exact search over the whole history
            assert np.array_equal(idx[q], exact[1][q]), f"seed {SEED}, query {q}"
        else:  # too few: those, then padding
            n = members.shape[0]
            assert set(idx[q, :n].tolist()) == set(members.tolist())
            assert np.all(idx[q, n:] == -1) and np.all(scores[q, n:] == -np.inf)


def test_sim_hard_without_categories_is_exact() -> None:
    queries, keys = history(5, 30, 2_000, 800)
    sim = make_retriever("sim_hard")
    a = sim.search(queries, keys, 16)
    b = sim.search(queries, keys, 16, RetrievalContext())  # type: ignore[attr-defined]
    c = make_retriever("exact").search(queries, keys, 16)
    assert np.array_equal(a[1], c[1]) and np.array_equal(b[1], c[1])


def test_sim_hard_checks_category_shapes() -> None:
    queries, keys = history(6, 3, 100, 50)
    with pytest.raises(RetrievalInputError, match="categories must have shapes"):
        make_retriever("sim_hard").search(  # type: ignore[attr-defined]
            queries, keys, 8, RetrievalContext(np.zeros(99, dtype=np.int64), np.zeros(3, dtype=np.int64))
        )
    with pytest.raises(ValueError, match="fallback"):
        make_retriever("sim_hard", fallback="nope")


def test_sim_hard_empty_history() -> None:
    queries, _ = history(7, 3, 10, 5)
    empty = np.zeros((0, 17), dtype=np.float32)
    s, i = make_retriever("sim_hard").search(  # type: ignore[attr-defined]
        queries, empty, 8, RetrievalContext(np.zeros(0, dtype=np.int64), np.zeros(3, dtype=np.int64))
    )
    assert np.all(i == -1) and np.all(s == -np.inf)


# -- eta --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [64, 128])
@pytest.mark.parametrize("dedup", [True, False])
def test_eta_recall_and_exact_scores(bits: int, dedup: bool) -> None:
    queries, keys = history(8, 100, 8_000, 6_000)
    eta = make_retriever("eta", bits=bits, shortlist=1_000, dedup=dedup)
    scores, idx = eta.search(queries, keys, 64)
    assert recall_at_k(queries, keys, 64, idx) >= 0.8, f"seed {SEED}"
    exact_scores = np.einsum("bkd,bd->bk", keys[idx].astype(np.float64), queries.astype(np.float64))
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-4, atol=1e-4)  # re-ranked: the exact scores
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_eta_with_a_shortlist_of_everything_is_exact() -> None:
    queries, keys = history(9, 40, 3_000, 1_000)
    eta = make_retriever("eta", shortlist=3_000)
    assert not check_against_reference(queries, keys, 64, *eta.search(queries, keys, 64)), f"seed {SEED}"


def test_eta_pads_and_handles_empty_inputs() -> None:
    queries, keys = history(10, 5, 40, 40)
    s, i = make_retriever("eta").search(queries, keys, 64)
    assert np.all(i[:, 40:] == -1) and np.all(s[:, 40:] == -np.inf)
    assert sorted(i[0, :40].tolist()) == list(range(40))
    s, i = make_retriever("eta").search(queries, keys[:0], 8)
    assert np.all(i == -1)
    with pytest.raises(ValueError, match="multiple of 64"):
        make_retriever("eta", bits=100)


def test_simhash_codes() -> None:
    x = np.array([[1.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    planes = retrieval.simhash_planes(2, 64, 0)
    codes = retrieval.simhash(x, planes)
    assert codes.shape == (2, 1) and codes.dtype == np.uint64
    assert int(codes[0, 0]) ^ int(codes[1, 0]) == (1 << 64) - 1  # opposite vectors: every bit differs


# -- shared ------------------------------------------------------------------------------------------


def test_recall_at_k() -> None:
    queries, keys = history(11, 20, 500, 500)
    _, idx = make_retriever("exact").search(queries, keys, 10)
    assert recall_at_k(queries, keys, 10, idx) == 1.0
    worst = np.argsort(queries @ keys.T, axis=1)[:, :10]
    assert recall_at_k(queries, keys, 10, worst) == 0.0
    half = idx.copy()
    half[:, 5:] = worst[:, :5]
    assert recall_at_k(queries, keys, 10, half) == 0.5


def test_strategy_specs() -> None:
    assert parse_strategy("eta:bits=128,shortlist=512") == ("eta", {"bits": 128, "shortlist": 512})
    assert parse_strategy("exact") == ("exact", {})
    assert parse_strategy("sim_hard:fallback=pad, min_group=8") == ("sim_hard", {"fallback": "pad", "min_group": 8})
    assert parse_strategy("exact:dedup=false,dedup_ratio=0.5") == ("exact", {"dedup": False, "dedup_ratio": 0.5})
    eta = make_retriever("eta:bits=128", shortlist=64)
    assert (eta.bits, eta.shortlist) == (128, 64)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="bad retriever option"):
        parse_strategy("eta:bits")
    assert {"sim_hard", "eta"} <= set(retrieval.available_retrievers())
    assert make_retriever("sim_hard").uses_context
    assert not make_retriever("eta").uses_context


def test_assemble_passes_categories_to_context_strategies() -> None:
    """service.assemble passes a context-reading strategy the history's and the candidates' categories."""
    from service.assemble import _retrieve

    seen: list[RetrievalContext] = []

    class Recorder:
        name = "recorder"
        uses_context = True

        def search(self, queries: np.ndarray, keys: np.ndarray, k: int,
                   context: RetrievalContext | None = None) -> tuple[np.ndarray, np.ndarray]:
            assert context is not None, "a strategy that reads the context must get one"
            seen.append(context)
            return retrieval.padded(queries.shape[0], k)

    queries, keys = history(12, 3, 10, 10)
    _retrieve(Recorder(), queries, retrieval.DistinctKeys.of(keys), 4, np.arange(10), np.array([1, 2, 3]), 7)
    assert seen[0].key_category.tolist() == list(range(10))  # type: ignore[union-attr]
    assert seen[0].query_category.tolist() == [1, 2, 3]  # type: ignore[union-attr]
    assert seen[0].user_index == 7


@pytest.mark.parametrize("strategy", ["exact", "numpy"])
def test_ties_keep_the_lowest_indices_whatever_the_strategy(strategy: str) -> None:
    """Equal scores are ordered by ascending key index, also at the cut of the top k."""
    retriever = make_retriever(strategy)
    for n_keys, k in ((10, 3), (1000, 5)):
        keys = np.ones((n_keys, 4), dtype=np.float32)
        _, idx = retriever.search(np.ones((2, 4), dtype=np.float32), keys, k)
        assert idx.tolist() == [list(range(k))] * 2


@pytest.mark.parametrize("strategy", ["exact", "numpy"])
def test_zero_scores_tie_whatever_their_sign(strategy: str) -> None:
    """Products that sum to -0.0 and to +0.0 are the same score: ties go to the lower index."""
    keys = np.array([[-1.0] * 4, [1.0] * 4, [-1.0] * 4, [1.0] * 4], dtype=np.float32)
    _, idx = make_retriever(strategy).search(np.zeros((1, 4), dtype=np.float32), keys, 2)
    assert idx.tolist() == [[0, 1]]
