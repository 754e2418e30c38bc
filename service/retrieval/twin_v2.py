"""``twin_v2``: TWIN-V2 style search of the best behaviour clusters stored at ingest."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from service.retrieval.base import (
    F32,
    I64,
    BaseRetriever,
    RetrievalContext,
    count_fallback,
    launch_lock,
    numba_threads,
)
from service.retrieval.exact import ExactRetriever


class TwinV2Retriever(BaseRetriever):
    """TWIN-V2 style cluster search over behaviours clustered at ingest (`feature_store.clusters`).

    Each behaviour carries the id of its cluster (stored beside the sequence, passed in
    `RetrievalContext.clusters`; the ingest makes every cluster homogeneous in GSU bias at the
    clustering time). Per request, with `split_bias` (default), each cluster is first split by
    the current value of the keys' last column, the per-behaviour bias `service.assemble` folds
    in: time-gap buckets drift as events age, and this keeps every searched cluster homogeneous
    in bias (skipped when it would more than quadruple the clusters: a last column that is not
    such a bias). The centroids are the means of the members' keys (the same augmented keys the
    exact search scores, bias column included) and each cluster's size is its number of
    behaviours. Each query scores every cluster by centroid·query + `size_bias` * ln(size) (0 by
    default: ln(size) is ~4.6 against scores ~0.05 and drowns the ranking), searches the members
    of the best ones, at least `n_probe` clusters holding at least max(k, `min_keys`)
    behaviours (`n_probe` >= the stored clusters: all of them, split parts included), and
    returns the exact top-k over those members (exact scores). Behaviours appended after the
    clustering (id -1) are searched by every query. Histories are reduced to distinct keys
    first, as `exact` does.

    Falls back to `exact` (counted in `fallback_counts()`, reason in brackets) when the history
    is shorter than `exact_below` ("short"), no clustering is stored ("missing"), it was made for
    other key tables ("stale") or does not match the history ("misaligned"); never fails.
    """

    name = "twin_v2"
    uses_context = True

    def __init__(self, n_probe: int = 8, min_keys: int = 0, size_bias: float = 0.0, exact_below: int = 1024,
                 dedup: bool = True, split_bias: bool = True, num_threads: int | None = None) -> None:
        if n_probe < 1:
            raise ValueError(f"n_probe must be >= 1, got {n_probe}")
        if min_keys < 0:
            raise ValueError(f"min_keys must be >= 0, got {min_keys}")
        if exact_below < 0:
            raise ValueError(f"exact_below must be >= 0, got {exact_below}")
        self.n_probe = n_probe
        self.min_keys = min_keys
        self.size_bias = size_bias
        self.exact_below = exact_below
        self.dedup = dedup
        self.split_bias = split_bias
        self.num_threads = num_threads
        self._exact = ExactRetriever(num_threads=num_threads)
        _warm_twin_v2()

    def _fallback(self, reason: str, queries: F32, keys: F32, k: int) -> tuple[F32, I64]:
        count_fallback(self.name, reason)
        return self._exact.search(queries, keys, k)

    def _search(self, q: F32, keys: F32, k: int, context: RetrievalContext | None) -> tuple[F32, I64]:
        if context is None:
            return self._fallback("missing", q, keys, k)
        n_keys = keys.shape[0]
        if n_keys < self.exact_below:
            return self._fallback("short", q, keys, k)
        clusters = context.clusters
        if clusters is None:
            return self._fallback("missing", q, keys, k)
        if context.key_fingerprint is not None and clusters.fingerprint != context.key_fingerprint:
            return self._fallback("stale", q, keys, k)
        assign = np.asarray(clusters.assignment)
        n_clusters = int(clusters.n_clusters)
        if assign.shape != (n_keys,) or n_clusters < 1:
            return self._fallback("misaligned", q, keys, k)
        if not (assign >= 0).any():  # every behaviour came after the clustering
            return self._fallback("missing", q, keys, k)
        return self.search_clusters(q, keys, k, assign, n_clusters)

    def search_clusters(self, q: F32, keys: F32, k: int, assign: npt.NDArray[np.integer[Any]],
                        n_clusters: int) -> tuple[F32, I64]:
        """The cluster search on validated, non-empty inputs; assign [L] in 0..n_clusters-1 or -1."""
        n_keys, d = keys.shape
        cl = np.where((assign >= 0) & (assign < n_clusters), assign, n_clusters).astype(np.int64)  # C = unclustered
        distinct = self.distinct_keys(keys)
        if distinct is not None:
            gkeys = distinct.keys
            g_cl = cl[distinct.first]
            g_mult = np.bincount(distinct.group, minlength=distinct.n_groups)
        else:
            gkeys, g_cl, g_mult = keys, cl, np.ones(n_keys, dtype=np.int64)
        n_groups = gkeys.shape[0]
        from service.retrieval.kernels import clusters as kernels  # loads (or compiles) on first use

        n_probe = self.n_probe
        if self.split_bias:
            split = np.empty(n_groups, dtype=np.int64)
            n_split = kernels.split_by_last_column(gkeys, g_cl, n_clusters, 4 * n_clusters + 64, split)
            if n_split > 0:
                if n_probe >= n_clusters:  # every stored cluster: every part of them
                    n_probe = int(n_split)
                g_cl, n_clusters = split, int(n_split)
        order = np.empty(n_groups, dtype=np.int64)
        offsets = np.empty(n_clusters + 2, dtype=np.int64)
        cover = np.empty(n_clusters + 1, dtype=np.int64)  # behaviours per cluster (last: not clustered)
        centroids = np.empty((n_clusters, d), dtype=np.float32)
        kernels.group_by_cluster(gkeys, g_cl, g_mult, n_clusters, order, offsets, cover, centroids)
        size = cover[:n_clusters]
        bias = np.full(n_clusters, -np.inf, dtype=np.float32)  # an empty cluster is never probed
        np.multiply(self.size_bias, np.log(size, where=size > 0, out=np.zeros(n_clusters)), out=bias,
                    where=size > 0, casting="unsafe")
        keys_t = np.ascontiguousarray(gkeys[order].T)
        kk = min(k, n_groups) if distinct is not None else k
        out_s = np.empty((q.shape[0], kk), dtype=np.float32)
        out_i = np.empty((q.shape[0], kk), dtype=np.int64)
        with launch_lock, numba_threads(self.num_threads):
            kernels.probe_topk(q, keys_t, order, offsets, np.ascontiguousarray(centroids.T), bias, cover, n_probe,
                               max(k, self.min_keys), kk, out_s, out_i)
        if distinct is None:
            return out_s, out_i
        return distinct.expand(out_s, out_i, k)


_twin_v2_warm = False


def _warm_twin_v2() -> None:
    """Load (or compile) the cluster kernel once per process, at construction, not on a request."""
    global _twin_v2_warm
    if _twin_v2_warm:
        return
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1100, 17), dtype=np.float32)
    keys[550:] = keys[:550]  # repeats: the distinct-key path
    retriever = TwinV2Retriever.__new__(TwinV2Retriever)
    retriever.n_probe, retriever.min_keys, retriever.size_bias, retriever.dedup = 2, 0, 1.0, True
    retriever.split_bias, retriever.num_threads = True, None
    keys[:, -1] = np.round(keys[:, -1])  # a few distinct last-column values: the split path
    retriever.search_clusters(rng.standard_normal((9, 17), dtype=np.float32), keys, 64,
                              np.arange(1100) % 7 - 1, 6)
    _twin_v2_warm = True
