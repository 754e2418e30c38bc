"""``sim_hard``: SIM's hard search, each candidate retrieving among the behaviours of its own category."""

from __future__ import annotations

from typing import Literal

import numpy as np

from service.retrieval.base import (
    F32,
    I64,
    BaseRetriever,
    RetrievalContext,
    RetrievalInputError,
    grouped_kernels,
    launch_lock,
    numba_threads,
    padded,
)
from service.retrieval.exact import ExactRetriever


class SimHardRetriever(BaseRetriever):
    """SIM hard search: each candidate retrieves among the behaviours of its own category.

    Per request the history is grouped by category (a stable sort), and each candidate gets the
    exact top-k, by the same GSU metric, of the behaviours in its candidate's category. A candidate
    with fewer than `min_group` (default k) same-category behaviours falls back to `fallback`:
    "exact" (top-k over the whole history, the default) or "pad" (the same-category ones, then
    padding, as in the SIM paper). Small segments are scored by one parallel kernel
    (`grouped.segment_topk`); segments of at least `big_segment` keys go through the exact kernel,
    one call per such category (a user has only a few).

    Without a context (no categories), it is `exact`.
    """

    name = "sim_hard"
    uses_context = True

    def __init__(self, min_group: int | None = None, fallback: Literal["exact", "pad"] = "exact",
                 big_segment: int = 2048, num_threads: int | None = None) -> None:
        if fallback not in ("exact", "pad"):
            raise ValueError(f"fallback must be 'exact' or 'pad', got {fallback!r}")
        if min_group is not None and min_group < 1:
            raise ValueError(f"min_group must be >= 1, got {min_group}")
        self.min_group = min_group
        self.fallback = fallback
        self.big_segment = big_segment
        self.num_threads = num_threads
        self._exact = ExactRetriever(num_threads=num_threads)

    def _search(self, q: F32, keys: F32, k: int, context: RetrievalContext | None) -> tuple[F32, I64]:
        if context is None or context.key_category is None or context.query_category is None:
            return self._exact.search(q, keys, k)
        n_queries, n_keys = q.shape[0], keys.shape[0]
        key_cat = np.asarray(context.key_category, dtype=np.int64)
        query_cat = np.asarray(context.query_category, dtype=np.int64)
        if key_cat.shape != (n_keys,) or query_cat.shape != (n_queries,):
            raise RetrievalInputError(
                f"categories must have shapes ({n_keys},) and ({n_queries},), got {key_cat.shape} and {query_cat.shape}"
            )
        order = np.argsort(key_cat, kind="stable")  # within a category: original (time) order
        cats, starts, counts = np.unique(key_cat[order], return_index=True, return_counts=True)
        pos = np.minimum(np.searchsorted(cats, query_cat), cats.shape[0] - 1)
        found = cats[pos] == query_cat
        seg_start = np.where(found, starts[pos], 0).astype(np.int64)
        seg_len = np.where(found, counts[pos], 0).astype(np.int64)
        min_group = k if self.min_group is None else self.min_group
        out_s, out_i = padded(n_queries, k)
        fallback = seg_len < min_group
        big = ~fallback & (seg_len >= self.big_segment)
        # small segments, and with fallback="pad" the too-small ones, in one kernel launch
        in_kernel = ~big if self.fallback == "pad" else ~fallback & ~big
        sorted_keys = np.ascontiguousarray(keys[order])
        if in_kernel.any():
            lens = np.where(in_kernel, seg_len, -1)  # -1: the kernel leaves the row alone
            with launch_lock, numba_threads(self.num_threads):
                grouped_kernels().segment_topk(
                    q, np.ascontiguousarray(sorted_keys.T), order, seg_start, lens, k, out_s, out_i
                )
        for start in np.unique(seg_start[big]).tolist():  # a user has few categories this large
            rows = np.flatnonzero(big & (seg_start == start))
            n = int(seg_len[rows[0]])
            s, i = self._exact.search(np.ascontiguousarray(q[rows]), sorted_keys[start : start + n], k)
            out_s[rows] = s
            out_i[rows] = np.where(i >= 0, order[start + np.maximum(i, 0)], -1)
        if self.fallback == "exact" and fallback.any():
            rows = np.flatnonzero(fallback)
            out_s[rows], out_i[rows] = self._exact.search(np.ascontiguousarray(q[rows]), keys, k)
        return out_s, out_i
