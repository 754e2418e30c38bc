"""Float64 brute-force references for tests, benchmarks and new strategies' parity checks."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from service.retrieval.base import F32, I64


def check_against_reference(
    queries: F32, keys: F32, k: int, scores: F32, indices: I64, rtol: float = 1e-5
) -> list[str]:
    """Compare a result with a float64 brute force; return the problems found (empty: it matches).

    A match has the padding convention, scores sorted descending and within tol of the exact
    scores of the returned keys, and the exact top-k set, except that keys whose exact score is
    within tol of the k-th best may be swapped (float32 rounding can reorder near-ties);
    tol = rtol * max(1, max |exact score| of the row).
    """
    n_queries, n_keys = queries.shape[0], keys.shape[0]
    if scores.shape != (n_queries, k) or indices.shape != (n_queries, k):
        return [f"shapes {scores.shape} / {indices.shape}, expected {(n_queries, k)}"]
    if scores.dtype != np.float32 or indices.dtype != np.int64:
        return [f"dtypes {scores.dtype} / {indices.dtype}, expected float32 / int64"]
    n_valid = min(k, n_keys)
    problems: list[str] = []
    k64 = keys.astype(np.float64)
    for start in range(0, n_queries, 64):  # bounded memory for large L
        exact = queries[start : start + 64].astype(np.float64) @ k64.T
        for row, ref in enumerate(exact, start):
            s, idx = scores[row], indices[row]
            if np.any(idx[n_valid:] != -1) or np.any(s[n_valid:] != -np.inf):
                problems.append(f"row {row}: slots past {n_valid} are not padding (-1, -inf)")
            got = idx[:n_valid]
            if np.any(got < 0) or np.any(got >= n_keys) or len(set(got.tolist())) != n_valid:
                problems.append(f"row {row}: indices not {n_valid} distinct keys: {got.tolist()}")
                continue
            if n_valid == 0:
                continue
            if np.any(np.diff(s[:n_valid].astype(np.float64)) > 0):
                problems.append(f"row {row}: scores not sorted descending")
            tol = rtol * max(1.0, float(np.abs(ref).max()))
            if np.any(np.abs(s[:n_valid] - ref[got]) > tol):
                problems.append(f"row {row}: returned scores differ from the exact scores by more than {tol:.3g}")
            kth = np.partition(ref, n_keys - n_valid)[n_keys - n_valid]
            if np.any(ref[got] < kth - tol):
                problems.append(f"row {row}: returned a key scoring below the k-th best ({kth:.6g})")
            missing = np.setdiff1d(np.flatnonzero(ref > kth + tol), got)
            if missing.size:
                problems.append(f"row {row}: missing keys {missing[:5].tolist()} that beat the k-th best")
    return problems


def recall_at_k(queries: F32, keys: F32, k: int, indices: I64, rtol: float = 1e-5) -> float:
    """Mean recall@k of `indices` [B, k] against the exact top-k (float64 brute force).

    A returned key counts as a hit when its exact score is at least the k-th best exact score
    (minus rtol * max(1, max |score|) of the row), so ties at the cut and duplicate keys never
    count against a strategy; the denominator is min(k, L) per query.
    """
    n_queries, n_keys = queries.shape[0], keys.shape[0]
    n_valid = min(k, n_keys)
    if n_queries == 0 or n_valid == 0:
        return 1.0
    hits = 0
    k64 = keys.astype(np.float64)
    for start in range(0, n_queries, 64):
        exact: npt.NDArray[np.float64] = queries[start : start + 64].astype(np.float64) @ k64.T
        kth = np.partition(exact, n_keys - n_valid, axis=1)[:, n_keys - n_valid]
        tol = rtol * np.maximum(1.0, np.abs(exact).max(axis=1))
        idx = indices[start : start + 64, :n_valid]
        got = np.take_along_axis(exact, np.maximum(idx, 0), axis=1)
        hits += int(((idx >= 0) & (got >= (kth - tol)[:, None])).sum())
    return float(hits / (n_queries * n_valid))


# ---------------------------------------------------------------------------------------------
# registry
