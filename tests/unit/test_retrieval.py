"""Retrieval strategies against a float64 brute force, the padding convention and input validation.

Data is random with a fresh seed per run (printed on failure; set RETRIEVAL_TEST_SEED to replay).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service import retrieval
from service.retrieval import (
    RetrievalInputError,
    RetrieverUnavailable,
    check_against_reference,
    make_retriever,
    strategies,
)
from service.retrieval import exact as exact_strategy
from service.retrieval.kernels import topk_ip

SEED = int(os.environ.get("RETRIEVAL_TEST_SEED", int(np.random.SeedSequence().entropy) % 2**32))

STRATEGIES = ["exact", "exact_1t", "faiss_knn", "numpy"] + (["faiss_gpu"] if retrieval.gpu_available() else [])


def build(name: str) -> retrieval.Retriever:
    if name == "exact_1t":
        return make_retriever("exact", num_threads=1)
    return make_retriever(name)


def data(case: int, n_queries: int, n_keys: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([SEED, case])
    return rng.standard_normal((n_queries, dim), dtype=np.float32), rng.standard_normal((n_keys, dim), dtype=np.float32)


def assert_matches(queries: np.ndarray, keys: np.ndarray, k: int, result: tuple[np.ndarray, np.ndarray]) -> None:
    problems = check_against_reference(queries, keys, k, *result)
    assert not problems, f"seed {SEED}: {problems[:5]}"


SHAPES = [
    # (B, L, d, k)
    (500, 10_000, 16, 64),  # the standard workload
    (37, 10_000, 17, 64),  # a bias column appended
    (1, 5_000, 16, 64),  # one candidate
    (13, 777, 16, 64),  # L not a multiple of the kernel's block
    (9, 3 * 256 + 1, 16, 8),  # one key in the last block
    (8, 50, 16, 64),  # L < k: everything, then padding
    (8, 64, 16, 64),  # L == k
    (4, 3_000, 64, 32),  # the widest dimension we expect
    (6, 2_000, 3, 5),  # d < 4
    (6, 2_000, 5, 5),  # d = 4 + 1
    (6, 2_000, 28, 7),  # d = 16 + 8 + 4
    (3, 20_000, 16, 300),  # large k
    (2, 3_000, 16, 1),  # k = 1
]


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize(("n_queries", "n_keys", "dim", "k"), SHAPES)
def test_matches_brute_force(name: str, n_queries: int, n_keys: int, dim: int, k: int) -> None:
    queries, keys = data(n_keys * 131 + dim, n_queries, n_keys, dim)
    result = build(name).search(queries, keys, k)
    assert_matches(queries, keys, k, result)


@pytest.mark.parametrize("name", STRATEGIES)
def test_short_history_is_padded(name: str) -> None:
    queries, keys = data(1, 4, 10, 16)
    scores, idx = build(name).search(queries, keys, 16)
    assert scores.shape == idx.shape == (4, 16)
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    assert np.all(idx[:, 10:] == -1) and np.all(scores[:, 10:] == -np.inf)
    assert np.array_equal(np.sort(idx[:, :10], axis=1), np.tile(np.arange(10), (4, 1)))
    assert np.all(np.diff(scores[:, :10], axis=1) <= 0)


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize(("n_queries", "n_keys"), [(5, 0), (0, 100), (0, 0)])
def test_empty_inputs(name: str, n_queries: int, n_keys: int) -> None:
    queries, keys = data(2, n_queries, n_keys, 16)
    scores, idx = build(name).search(queries, keys, 8)
    assert scores.shape == idx.shape == (n_queries, 8)
    assert np.all(idx == -1) and np.all(scores == -np.inf)


def test_exact_breaks_ties_by_lower_index() -> None:
    rng = np.random.default_rng([SEED, 3])
    row = rng.standard_normal(16, dtype=np.float32)
    keys = np.tile(row, (3_000, 1))  # every key scores the same
    keys[2_500] *= 2  # ...except one, if the query points along row
    queries = row[None, :].copy()
    scores, idx = make_retriever("exact").search(queries, keys, 10)
    assert idx[0].tolist() == [2_500, *range(9)]
    assert np.all(scores[0, 1:] == scores[0, 1])


def test_exact_is_deterministic_across_thread_counts() -> None:
    queries, keys = data(4, 64, 10_000, 17)
    a = make_retriever("exact").search(queries, keys, 64)
    b = make_retriever("exact", num_threads=1).search(queries, keys, 64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize(("n_keys", "ascending"), [(300, False), (20_000, True)])
def test_exact_compacts_the_candidate_buffer(n_keys: int, ascending: bool) -> None:
    """More candidates than the buffer holds: 300 keys get no threshold seed at all, and keys sorted
    by score put every late key above the running threshold."""
    queries, keys = data(5, 3, n_keys, 16)
    if ascending:
        keys = np.ascontiguousarray(keys[np.argsort(keys @ queries[0])])
    exact = make_retriever("exact", cap_factor=2)
    assert_matches(queries, keys, 64, exact.search(queries, keys, 64))


def test_exact_rescans_when_the_seed_is_too_high() -> None:
    """Put the best keys exactly where the threshold sample looks: the seed then lets fewer than
    k keys through and the kernel must fall back to an unfiltered scan."""
    n_keys, k = 6_000, 64
    n_blocks, rank = exact_strategy._seed_plan(n_keys, k, topk_ip.BLOCK)
    assert rank > 0
    n_sample = n_blocks * topk_ip.BLOCK
    rng = np.random.default_rng([SEED, 6])
    keys = rng.standard_normal((n_keys, 16), dtype=np.float32) * np.float32(0.01)
    sampled = (np.arange(n_sample) * n_keys) // n_sample
    keys[sampled, 0] = 100 + np.arange(n_sample, dtype=np.float32)
    queries = np.zeros((2, 16), dtype=np.float32)
    queries[:, 0] = 1
    assert_matches(queries, keys, k, make_retriever("exact").search(queries, keys, k))


@pytest.mark.parametrize("name", STRATEGIES)
def test_layouts_and_read_only_inputs(name: str) -> None:
    queries, keys = data(7, 20, 4_000, 16)
    keys_f = np.asfortranarray(keys)
    keys_strided = np.repeat(keys, 2, axis=0)[::2]
    queries.flags.writeable = False
    for variant in (keys_f, keys_strided):
        assert_matches(queries, keys, 32, build(name).search(queries, variant, 32))


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize(
    ("queries", "keys", "k", "message"),
    [
        (np.zeros(16, np.float32), np.zeros((5, 16), np.float32), 3, "queries must be 2-D"),
        (np.zeros((2, 16), np.float32), np.zeros((2, 5, 16), np.float32), 3, "keys must be 2-D"),
        (np.zeros((2, 16), np.float64), np.zeros((5, 16), np.float32), 3, "queries must be float32"),
        (np.zeros((2, 16), np.float32), np.zeros((5, 16), np.int64), 3, "keys must be float32"),
        ([[0.0] * 16], np.zeros((5, 16), np.float32), 3, "queries must be a numpy array"),
        (np.zeros((2, 16), np.float32), np.zeros((5, 17), np.float32), 3, "same dimension d"),
        (np.zeros((2, 0), np.float32), np.zeros((5, 0), np.float32), 3, "at least 1"),
        (np.zeros((2, 16), np.float32), np.zeros((5, 16), np.float32), 0, "k must be positive"),
        (np.zeros((2, 16), np.float32), np.zeros((5, 16), np.float32), -4, "k must be positive"),
        (np.zeros((2, 16), np.float32), np.zeros((5, 16), np.float32), 2.5, "k must be an integer"),
        (np.zeros((2, 16), np.float32), np.zeros((5, 16), np.float32), True, "k must be an integer"),
    ],
)
def test_invalid_inputs(name: str, queries: object, keys: object, k: object, message: str) -> None:
    with pytest.raises(RetrievalInputError, match=message) as info:
        build(name).search(queries, keys, k)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_thread_settings_do_not_leak_between_retrievers() -> None:
    import faiss

    queries, keys = data(12, 4, 500, 16)
    default = faiss.omp_get_max_threads()
    make_retriever("faiss_knn", num_threads=1).search(queries, keys, 5)
    make_retriever("faiss_knn").search(queries, keys, 5)
    assert faiss.omp_get_max_threads() == default
    import numba

    before = numba.get_num_threads()
    make_retriever("exact", num_threads=1).search(queries, keys, 5)
    assert numba.get_num_threads() == before


def test_numpy_integer_k_is_accepted() -> None:
    queries, keys = data(8, 3, 100, 16)
    scores, _ = make_retriever("exact").search(queries, keys, np.int64(5))  # type: ignore[arg-type]
    assert scores.shape == (3, 5)


def test_registry() -> None:
    assert {"exact", "faiss_knn", "numpy", "faiss_gpu"} <= set(retrieval.available_retrievers())
    for name in ("exact", "faiss_knn", "numpy"):
        retriever = make_retriever(name)
        assert isinstance(retriever, retrieval.Retriever)
        assert retriever.name == name
    with pytest.raises(ValueError, match="unknown retriever 'nope'; available: exact"):
        make_retriever("nope")
    with pytest.raises(ValueError, match="bad options for retriever 'exact'"):
        make_retriever("exact", colour="blue")
    with pytest.raises(ValueError, match="device must be"):
        make_retriever("exact", device="tpu")


@pytest.fixture
def scratch_registry() -> Iterator[None]:
    saved = dict(strategies._REGISTRY)
    yield
    strategies._REGISTRY.clear()
    strategies._REGISTRY.update(saved)


@pytest.mark.usefixtures("scratch_registry")
def test_register_a_new_strategy() -> None:
    retrieval.register_retriever("custom_numpy", retrieval.NumpyRetriever)
    assert make_retriever("custom_numpy").search(*data(9, 2, 30, 16), 4)[0].shape == (2, 4)
    with pytest.raises(ValueError, match="already registered"):
        retrieval.register_retriever("exact", retrieval.NumpyRetriever)


@pytest.mark.skipif(retrieval.gpu_available(), reason="a GPU is visible")
def test_gpu_strategies_without_a_gpu() -> None:
    with pytest.raises(RetrieverUnavailable, match=r"faiss.get_num_gpus\(\) == 0"):
        make_retriever("faiss_gpu")
    with pytest.raises(RetrieverUnavailable):
        make_retriever("exact", device="gpu")
    assert make_retriever("exact", device="auto").device == "cpu"  # type: ignore[attr-defined]


@pytest.mark.skipif(not retrieval.gpu_available(), reason="no GPU")
def test_exact_auto_uses_the_gpu() -> None:
    exact = make_retriever("exact", device="auto")
    assert exact.device == "gpu"  # type: ignore[attr-defined]
    queries, keys = data(10, 100, 10_000, 17)
    assert_matches(queries, keys, 64, exact.search(queries, keys, 64))


def test_reference_check_catches_wrong_results() -> None:
    queries, keys = data(11, 4, 1_000, 16)
    scores, idx = make_retriever("numpy").search(queries, keys, 10)
    assert not check_against_reference(queries, keys, 10, scores, idx)
    worst = np.argsort(keys @ queries[0])[0]
    bad_idx = idx.copy()
    bad_idx[0, 3] = worst
    assert any("missing" in p or "below" in p for p in check_against_reference(queries, keys, 10, scores, bad_idx))
    unsorted = scores.copy()
    unsorted[1] = unsorted[1, ::-1]
    assert any("sorted" in p for p in check_against_reference(queries, keys, 10, unsorted, idx[:, :]))
    assert check_against_reference(queries, keys, 11, scores, idx)  # wrong shape


def test_warm_up_returns_seconds() -> None:
    assert retrieval.warm_up() >= 0.0


def _plus_one(x: int) -> int:
    return x + 1


def test_kernels_compile_without_a_writable_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """No writable cache location (read-only root fs, NUMBA_CACHE_DIR unset): compile in memory."""
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # renamed across numba versions
    monkeypatch.setattr(impl, "_locator_classes", [])
    monkeypatch.setattr(topk_ip, "_cache_ok", True)
    compiled = topk_ip._jit()(_plus_one)
    assert compiled(1) == 2
    assert not topk_ip.cache_enabled()


@pytest.mark.slow  # compiles the kernels from scratch in a subprocess
def test_numba_cache_dir_is_honoured(tmp_path: Path) -> None:
    """NUMBA_CACHE_DIR (the deployment's writable dir) receives the compiled kernels."""
    script = textwrap.dedent(
        """
        import numpy as np
        from service.retrieval.kernels import topk_ip
        from service.retrieval import make_retriever
        make_retriever("exact").search(np.ones((1, 4), np.float32), np.ones((3, 4), np.float32), 2)
        assert topk_ip.cache_enabled()
        """
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=os.getcwd(), timeout=280)
    cached = [p.name for p in tmp_path.rglob("*.nbi")]
    assert any("topk_ip" in name for name in cached), cached
