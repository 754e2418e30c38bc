"""What every retrieval strategy shares: the one protocol, its input checks, padding, de-duplication.

A strategy subclasses `BaseRetriever` and implements `_search` on validated, non-empty inputs;
`BaseRetriever.search` checks shapes, dtypes and k once, answers the empty case, and hands the
request's `RetrievalContext` on. `_distinct_search` searches the bit-distinct keys of a long
history and expands the result to every copy, the exact answer for less work.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from feature_store.codecs import SequenceClusters

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

# below this many keys the duplicate scan costs more than it saves
DEDUP_MIN_KEYS = 1024


class RetrievalInputError(ValueError):
    """Queries, keys or k are not what a retriever accepts; the message says what to fix."""


class RetrieverUnavailable(RuntimeError):
    """The strategy cannot run here (e.g. faiss_gpu without a GPU build or a visible GPU)."""


@dataclass(frozen=True)
class RetrievalContext:
    """What a strategy may need beyond queries and keys; strategies that need none ignore it.

    key_category [L] / query_category [B]: category index of each behaviour / candidate
    (`sim_hard`); user_index: the user's vocabulary index (for per-user state); clusters: the
    behaviours' stored clusters, aligned with the keys (`twin_v2`, a
    `feature_store.codecs.SequenceClusters`); key_fingerprint: fingerprint of the serving bundle's
    key tables (`feature_store.clusters.key_fingerprint`), to recognise a stale clustering.
    """

    key_category: I64 | None = None
    query_category: I64 | None = None
    user_index: int | None = None
    clusters: SequenceClusters | None = None
    key_fingerprint: bytes | None = None


@runtime_checkable
class Retriever(Protocol):
    """Top-k keys by inner product for each query.

    `uses_context` says whether the strategy reads a `RetrievalContext`; callers build one only
    then, so strategies that need none cost nothing extra.
    """

    name: str
    uses_context: bool

    def search(
        self, queries: F32, keys: F32, k: int, context: RetrievalContext | None = None
    ) -> tuple[F32, I64]:
        """Scores [B, k] float32 (descending) and indices [B, k] int64 into keys; -inf / -1 padding."""
        ...

    def search_distinct(self, queries: F32, distinct: DistinctKeys, k: int) -> tuple[F32, I64]:
        """`search` over `distinct.expanded()`, without a context, given the keys' distinct rows."""
        ...


def _matrix(name: str, arr: object, shape: str) -> npt.NDArray[Any]:
    if not isinstance(arr, np.ndarray):
        raise RetrievalInputError(f"{name} must be a numpy array {shape}, got {type(arr).__name__}")
    if arr.ndim != 2:
        raise RetrievalInputError(f"{name} must be 2-D {shape}, got shape {arr.shape}")
    if arr.dtype != np.float32:
        raise RetrievalInputError(f"{name} must be float32, got {arr.dtype}; convert with .astype(np.float32)")
    # C-contiguous, aligned and writeable (read-only arrays, e.g. memory-mapped, are copied): the
    # numba kernels then see one array type and never compile a second specialization mid-request
    return np.require(arr, dtype=np.float32, requirements=("C", "A", "W"))


def validate(queries: object, keys: object, k: object) -> tuple[F32, F32, int]:
    """Check shapes, dtypes and k; return C-contiguous float32 arrays (no copy when already so)."""
    q = _matrix("queries", queries, "[B, d]")
    kk = _matrix("keys", keys, "[L, d]")
    if q.shape[1] != kk.shape[1]:
        raise RetrievalInputError(
            f"queries and keys must have the same dimension d, got {q.shape[1]} and {kk.shape[1]}"
        )
    if q.shape[1] == 0:
        raise RetrievalInputError("the dimension d must be at least 1, got 0")
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise RetrievalInputError(f"k must be an integer, got {type(k).__name__}")
    if k <= 0:
        raise RetrievalInputError(f"k must be positive, got {k}")
    return q, kk, int(k)


def padded(n_queries: int, k: int) -> tuple[F32, I64]:
    """All-padding result: scores -inf, indices -1."""
    return np.full((n_queries, k), -np.inf, dtype=np.float32), np.full((n_queries, k), -1, dtype=np.int64)


def pad_to_k(scores: npt.NDArray[Any], indices: npt.NDArray[Any], k: int) -> tuple[F32, I64]:
    """Widen [B, k'] results to [B, k] with padding, and make any -1 slot score -inf."""
    out_s, out_i = padded(scores.shape[0], k)
    kk = scores.shape[1]
    out_s[:, :kk] = scores
    out_i[:, :kk] = indices
    out_s[out_i < 0] = -np.inf  # faiss marks empty slots with -FLT_MAX
    return out_s, out_i


# numba's "workqueue" threading layer (used when neither TBB nor OpenMP is installed) must not be
# entered from two threads at once; one parallel kernel already uses every core, so serialize.
launch_lock = threading.Lock()


def kernels_busy() -> bool:
    """Whether another thread is in a parallel kernel now (a call would wait for it to finish)."""
    return launch_lock.locked()


@contextmanager
def numba_threads(requested: int | None) -> Iterator[None]:
    """Cap numba's threads for the calling thread (numba keeps the setting per thread), then restore."""
    if requested is None:
        yield
        return
    import numba  # lazily: the brute-force strategies run without loading numba

    limit: int = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # read from the env at import
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(requested, limit)))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def grouped_kernels() -> Any:
    """The grouped-row numba kernels, loaded (or compiled) on first use, not at import."""
    from service.retrieval.kernels import grouped

    return grouped


class DistinctKeys:
    """The bit-distinct rows of a key matrix and, per distinct row, its rows in ascending order.

    Lifelong histories repeat behaviours (same item, action and time-gap bucket: identical GSU
    keys), so searching the distinct rows and expanding them gives the exact result for a
    fraction of the work (`expand`). `keys` [G, d] are the distinct rows, `group` [L] the distinct
    row of every original row and `first` [G] each distinct row's lowest original row (groups
    numbered in order of first appearance). A caller that already knows which behaviours repeat
    builds one directly, without the original [L, d] matrix (`service.assemble`); `of` finds them.
    """

    def __init__(self, keys: F32, group: I64, first: I64) -> None:
        self.keys = keys
        self.group = group
        self.first = first
        self.n_groups = int(first.shape[0])
        self._offsets: I64 | None = None
        self._members: I64 | None = None

    @classmethod
    def of(cls, keys: F32) -> DistinctKeys:
        n = keys.shape[0]
        group = np.empty(n, dtype=np.int64)
        first = np.empty(n, dtype=np.int64)
        n_groups = int(grouped_kernels().unique_rows(keys.view(np.uint32), group, first))
        first = first[:n_groups]
        return cls(np.ascontiguousarray(keys[first]), group, first)

    @property
    def n_rows(self) -> int:
        """Rows of the original matrix."""
        return int(self.group.shape[0])

    def expanded(self) -> F32:
        """The original [L, d] matrix."""
        return np.take(self.keys, self.group, axis=0)

    def members(self) -> tuple[I64, I64]:
        """CSR (offsets [G + 1], rows [L]) of each group's rows, ascending."""
        if self._offsets is None or self._members is None:
            self._offsets = np.empty(self.n_groups + 1, dtype=np.int64)
            self._members = np.empty(self.group.shape[0], dtype=np.int64)
            grouped_kernels().group_members(self.group, self.n_groups, self._offsets, self._members)
        return self._offsets, self._members

    def expand(self, u_scores: F32, u_idx: I64, k: int) -> tuple[F32, I64]:
        """Top-k rows from the exact top-k' (k' = min(k, G)) over the distinct rows; see `grouped.expand_topk`."""
        offsets, members = self.members()
        out_s = np.empty((u_idx.shape[0], k), dtype=np.float32)
        out_i = np.empty((u_idx.shape[0], k), dtype=np.int64)
        # a serial kernel: no launch lock (the lock guards numba's parallel layer only)
        grouped_kernels().expand_topk(
            np.ascontiguousarray(u_scores), np.ascontiguousarray(u_idx), offsets, members, k, out_s, out_i
        )
        return out_s, out_i


Search = Callable[[F32, F32, int], tuple[F32, I64]]


class BaseRetriever(ABC):
    """A strategy: validation, the empty case and the context hand-over done once, here.

    Subclasses set `name` (and `uses_context` when they read a `RetrievalContext`) and implement
    `_search` on validated inputs with at least one query and one key.
    """

    name: str
    uses_context: bool = False
    dedup: bool = False

    def search(
        self, queries: F32, keys: F32, k: int, context: RetrievalContext | None = None
    ) -> tuple[F32, I64]:
        """Scores [B, k] float32 (descending) and indices [B, k] int64 into keys; -inf / -1 padding."""
        q, kk, k = validate(queries, keys, k)
        if q.shape[0] == 0 or kk.shape[0] == 0:
            return padded(q.shape[0], k)
        return self._search(q, kk, k, context)

    @abstractmethod
    def _search(self, q: F32, keys: F32, k: int, context: RetrievalContext | None) -> tuple[F32, I64]:
        """The strategy on validated, non-empty inputs."""

    def search_distinct(self, queries: F32, distinct: DistinctKeys, k: int) -> tuple[F32, I64]:
        """`search` over `distinct.expanded()` (a strategy without a context), given its distinct rows.

        This default expands them; strategies that de-duplicate search the distinct rows directly.
        """
        return self.search(queries, distinct.expanded(), k)

    def distinct_keys(self, keys: F32) -> DistinctKeys | None:
        """The distinct rows of `keys` when this strategy de-duplicates and the history is long enough."""
        if not self.dedup or keys.shape[0] < DEDUP_MIN_KEYS:
            return None
        return DistinctKeys.of(keys)

    def _distinct_search(self, search: Search, q: F32, keys: F32, k: int, max_ratio: float = 1.0) -> tuple[F32, I64]:
        """`search` over the distinct keys, expanded to every copy, when at most `max_ratio` of them are distinct."""
        distinct = self.distinct_keys(keys)
        if distinct is None or distinct.n_groups > max_ratio * keys.shape[0]:
            return search(q, keys, k)
        return search_expanded(search, q, distinct, k)


def search_expanded(search: Search, q: F32, distinct: DistinctKeys, k: int) -> tuple[F32, I64]:
    """`search` over the distinct rows, each result expanded to every copy: the exact top-k of all rows."""
    u_scores, u_idx = search(q, distinct.keys, min(k, distinct.n_groups))
    return distinct.expand(u_scores, u_idx, k)


# strategies that fall back to exact count it here, by (strategy, reason); the metrics module
# exports the counts as rankserve_retrieval_fallback_total
_fallbacks: dict[tuple[str, str], int] = {}
_fallback_lock = threading.Lock()


def count_fallback(strategy: str, reason: str) -> None:
    with _fallback_lock:
        _fallbacks[(strategy, reason)] = _fallbacks.get((strategy, reason), 0) + 1


def fallback_counts() -> dict[tuple[str, str], int]:
    """Searches that fell back to exact since the process started, by (strategy, reason)."""
    with _fallback_lock:
        return dict(_fallbacks)
