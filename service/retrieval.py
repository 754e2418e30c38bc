"""GSU retrieval strategies: for each query (candidate), the top-k keys (behaviours) by inner product.

Every strategy implements `Retriever.search(queries [B, d] float32, keys [L, d] float32, k)` and
returns `(scores [B, k] float32, indices [B, k] int64)`, best first. When L < k the rows are
padded with index -1 and score -inf; an empty history gives all padding. Strategies are built by
name from a registry, so new ones (`twin_v2` clusters, `sim_hard` category search, `eta` SimHash
over faiss binary indexes) are one `register_retriever` call away.

* ``exact`` - the fused numba kernel of `service.kernels.topk_ip` (the fastest exact CPU method
  measured, docs/RETRIEVAL.md); ties are broken by lower index. ``device="auto"`` or ``"gpu"``
  sends it to faiss GPU instead.
* ``faiss_knn`` - `faiss.knn` with METRIC_INNER_PRODUCT, the reference.
* ``numpy`` - matmul, argpartition, sort.
* ``faiss_gpu`` - `faiss.knn_gpu` brute force; only constructible with a GPU build and a GPU.
* ``sim_hard``, ``eta``, ``twin_v2`` - approximate: category search, SimHash shortlist, and the
  search of the best behaviour clusters stored at ingest (see each class).

This module knows nothing about requests or transports; bad input raises `RetrievalInputError`
(a ValueError) with a message that says what to fix.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from feature_store.codecs import SequenceClusters

log = logging.getLogger("rankserve.retrieval")

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
Device = Literal["cpu", "gpu", "auto"]

_MAX_KEYS = 2**32 - 1  # the exact kernel packs a key index into 32 bits
_GPU_MAX_K = 2048  # faiss GPU's largest supported k (GPU_MAX_SELECTION_K)


class RetrievalInputError(ValueError):
    """Queries, keys or k are not what a retriever accepts; the message says what to fix."""


class RetrieverUnavailable(RuntimeError):
    """The strategy cannot run here (e.g. faiss_gpu without a GPU build or a visible GPU)."""


@runtime_checkable
class Retriever(Protocol):
    """Top-k keys by inner product for each query."""

    name: str

    def search(self, queries: F32, keys: F32, k: int) -> tuple[F32, I64]:
        """Scores [B, k] float32 (descending) and indices [B, k] int64 into keys; -inf / -1 padding."""
        ...


# ---------------------------------------------------------------------------------------------
# shared helpers


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


def _pad_to_k(scores: npt.NDArray[Any], indices: npt.NDArray[Any], k: int) -> tuple[F32, I64]:
    """Widen [B, k'] results to [B, k] with padding, and make any -1 slot score -inf."""
    out_s, out_i = padded(scores.shape[0], k)
    kk = scores.shape[1]
    out_s[:, :kk] = scores
    out_i[:, :kk] = indices
    out_s[out_i < 0] = -np.inf  # faiss marks empty slots with -FLT_MAX
    return out_s, out_i


_faiss_default_threads: int | None = None


def _faiss() -> Any:
    global _faiss_default_threads
    import faiss  # imported lazily: only the faiss strategies need it

    if _faiss_default_threads is None:  # before anyone changes it: OpenMP's default, all cores
        _faiss_default_threads = int(faiss.omp_get_max_threads())
    return faiss


def gpu_available() -> bool:
    """Whether faiss has GPU support and sees at least one GPU."""
    try:
        faiss = _faiss()
    except ImportError:
        return False
    return hasattr(faiss, "knn_gpu") and int(faiss.get_num_gpus()) > 0


# ---------------------------------------------------------------------------------------------
# strategies


class NumpyRetriever:
    """Materialize the [B, L] scores with one matmul, then argpartition and sort (the naive baseline)."""

    name = "numpy"

    def search(self, queries: F32, keys: F32, k: int) -> tuple[F32, I64]:
        q, keys, k = validate(queries, keys, k)
        n_queries, n_keys = q.shape[0], keys.shape[0]
        if n_queries == 0 or n_keys == 0:
            return padded(n_queries, k)
        scores = q @ keys.T
        kk = min(k, n_keys)
        if kk < n_keys:
            idx = np.argpartition(scores, n_keys - kk, axis=1)[:, n_keys - kk :]
        else:
            idx = np.broadcast_to(np.arange(n_keys), (n_queries, n_keys))
        top = np.take_along_axis(scores, idx, axis=1)
        order = np.lexsort((idx, -top), axis=1)  # score descending, then index ascending
        return _pad_to_k(np.take_along_axis(top, order, 1), np.take_along_axis(idx, order, 1), k)


class FaissKnnRetriever:
    """`faiss.knn` brute force with METRIC_INNER_PRODUCT (the reference)."""

    name = "faiss_knn"

    def __init__(self, num_threads: int | None = None) -> None:
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self._faiss = _faiss()
        self.num_threads = num_threads

    def search(self, queries: F32, keys: F32, k: int) -> tuple[F32, I64]:
        q, keys, k = validate(queries, keys, k)
        n_queries, n_keys = q.shape[0], keys.shape[0]
        if n_queries == 0 or n_keys == 0:
            return padded(n_queries, k)
        # an OpenMP setting of the calling thread that outlives the call: set it every time, so
        # another retriever's setting (e.g. a one-thread one) does not leak into this one
        self._faiss.omp_set_num_threads(self.num_threads or _faiss_default_threads)
        scores, idx = self._faiss.knn(q, keys, min(k, n_keys), metric=self._faiss.METRIC_INNER_PRODUCT)
        return _pad_to_k(scores, idx, k)


class FaissGpuRetriever:
    """`faiss.knn_gpu` brute force with METRIC_INNER_PRODUCT on one GPU."""

    name = "faiss_gpu"

    def __init__(self, gpu: int = 0) -> None:
        if not gpu_available():
            raise RetrieverUnavailable(
                "faiss_gpu needs a GPU build of faiss (the 'gpu' extra, faiss-gpu-cu12) and a visible GPU; "
                "this process has none (faiss.get_num_gpus() == 0). Use 'exact' or 'faiss_knn' on CPU."
            )
        self._faiss = _faiss()
        n_gpus = int(self._faiss.get_num_gpus())
        if not 0 <= gpu < n_gpus:
            raise ValueError(f"gpu must be in [0, {n_gpus}), got {gpu}")
        self.gpu = gpu
        self._res = self._faiss.StandardGpuResources()
        self._lock = threading.Lock()  # StandardGpuResources is not safe for concurrent use

    def search(self, queries: F32, keys: F32, k: int) -> tuple[F32, I64]:
        q, keys, k = validate(queries, keys, k)
        n_queries, n_keys = q.shape[0], keys.shape[0]
        if n_queries == 0 or n_keys == 0:
            return padded(n_queries, k)
        kk = min(k, n_keys)
        if kk > _GPU_MAX_K:
            raise RetrievalInputError(f"faiss_gpu supports k <= {_GPU_MAX_K}, got {k}")
        with self._lock:
            scores, idx = self._faiss.knn_gpu(
                self._res, q, keys, kk, metric=self._faiss.METRIC_INNER_PRODUCT, device=self.gpu
            )
        return _pad_to_k(scores, idx, k)


def _seed_plan(n_keys: int, k: int, block: int) -> tuple[int, int]:
    """Sample size (in key blocks) and rank for the exact kernel's threshold seed; (0, 0) = no seed.

    The seed is the rank-th best score among ~5% of the keys (strided). The number of sample keys
    that beat the true k-th best is ~Poisson(mu), mu = n_sample * k / L, so rank = mu + 2 sqrt(mu)
    + 2 keeps the seed below the true k-th best for all but ~1% of queries (those are rescanned
    without a threshold, so exactness never depends on it) while letting only ~rank * L /
    n_sample candidates through.
    """
    n_blocks = min(8, max(1, round(n_keys / (20 * block))))
    n_sample = n_blocks * block
    if 2 * n_sample > n_keys:
        return 0, 0
    mu = n_sample * k / n_keys
    rank = math.ceil(mu + 2.0 * math.sqrt(mu)) + 2
    if 2 * rank > n_sample:
        return 0, 0
    return n_blocks, rank


# numba's "workqueue" threading layer (used when neither TBB nor OpenMP is installed) must not be
# entered from two threads at once; one parallel kernel already uses every core, so serialize.
_launch_lock = threading.Lock()


@contextmanager
def _numba_threads(requested: int | None) -> Iterator[None]:
    """Cap numba's threads for the calling thread (numba keeps the setting per thread), then restore."""
    if requested is None:
        yield
        return
    import numba

    limit: int = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # read from the env at import
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(requested, limit)))
    try:
        yield
    finally:
        numba.set_num_threads(before)


class ExactRetriever:
    """Exact top-k with the fused numba kernel (CPU), or faiss GPU when `device` says so.

    Options: ``device`` "cpu" (default), "gpu" (faiss GPU, error without one) or "auto" (GPU when
    available); ``num_threads`` caps numba's threads for this retriever (default: numba's, i.e. all
    cores); ``cap_factor`` sizes the per-query candidate buffer (cap_factor * k).
    """

    name = "exact"

    def __init__(
        self, device: Device = "cpu", num_threads: int | None = None, cap_factor: int = 3, dedup: bool = True,
        dedup_ratio: float = 0.75,
    ) -> None:
        if device not in ("cpu", "gpu", "auto"):
            raise ValueError(f"device must be 'cpu', 'gpu' or 'auto', got {device!r}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if cap_factor < 2:
            raise ValueError(f"cap_factor must be >= 2, got {cap_factor}")
        if not 0.0 < dedup_ratio <= 1.0:
            raise ValueError(f"dedup_ratio must be in (0, 1], got {dedup_ratio}")
        self._gpu: FaissGpuRetriever | None = None
        if device == "gpu" or (device == "auto" and gpu_available()):
            self._gpu = FaissGpuRetriever()
        self.device: Literal["cpu", "gpu"] = "gpu" if self._gpu is not None else "cpu"
        self.num_threads = num_threads
        self.cap_factor = cap_factor
        self.dedup = dedup
        self.dedup_ratio = dedup_ratio

    def search(self, queries: F32, keys: F32, k: int) -> tuple[F32, I64]:
        if self._gpu is not None:
            return self._gpu.search(queries, keys, k)
        q, keys, k = validate(queries, keys, k)
        n_queries, n_keys = q.shape[0], keys.shape[0]
        if n_queries == 0 or n_keys == 0:
            return padded(n_queries, k)
        if n_keys > _MAX_KEYS:
            raise RetrievalInputError(f"exact supports at most {_MAX_KEYS} keys, got {n_keys}")
        if self.dedup and n_keys >= _DEDUP_MIN_KEYS:
            distinct = DistinctKeys.of(keys)
            if distinct.n_groups <= self.dedup_ratio * n_keys:
                u_scores, u_idx = self.search_unchecked(q, distinct.keys, min(k, distinct.n_groups))
                return distinct.expand(u_scores, u_idx, k)
        return self.search_unchecked(q, keys, k)

    def search_unchecked(self, q: F32, keys: F32, k: int) -> tuple[F32, I64]:
        """The kernel on validated, non-empty inputs (no dedup): [B, k] scores and indices."""
        n_queries, n_keys = q.shape[0], keys.shape[0]
        kern = _kernels()
        block = kern.BLOCK
        d = q.shape[1]
        n_sample_blocks, rank = _seed_plan(n_keys, k, block)
        packed = np.empty(-(-n_keys // block) * d * block, dtype=np.float32)
        sample = np.empty(n_sample_blocks * d * block, dtype=np.float32)
        out_s = np.empty((n_queries, k), dtype=np.float32)
        out_i = np.empty((n_queries, k), dtype=np.int64)
        kern.pack_keys(keys, packed, n_sample_blocks, sample)
        with _launch_lock, _numba_threads(self.num_threads):
            kern.topk_ip(q, packed, n_keys, sample, rank, k, self.cap_factor * k, out_s, out_i)
        return out_s, out_i


def _kernels() -> Any:
    from service.kernels import topk_ip  # first import loads (or compiles) the numba kernels

    return topk_ip


def _grouped() -> Any:
    from service.kernels import grouped

    return grouped


# below this many keys the duplicate scan is not worth its fixed cost (~20 ns a key)
_DEDUP_MIN_KEYS = 1024


class DistinctKeys:
    """The bit-distinct rows of a key matrix and, per distinct row, its rows in ascending order.

    Lifelong histories repeat behaviours (same item, action and time-gap bucket: identical GSU
    keys), so searching the distinct rows and expanding them gives the exact result for a
    fraction of the work (`expand`).
    """

    def __init__(self, keys: F32, group: I64, first: I64, n_groups: int) -> None:
        self.source = keys
        self.group = group
        self.first = first[:n_groups]
        self.n_groups = n_groups
        self.keys: F32 = np.ascontiguousarray(keys[self.first])
        self._offsets: I64 | None = None
        self._members: I64 | None = None

    @classmethod
    def of(cls, keys: F32) -> DistinctKeys:
        n = keys.shape[0]
        group = np.empty(n, dtype=np.int64)
        first = np.empty(n, dtype=np.int64)
        n_groups = int(_grouped().unique_rows(keys.view(np.uint32), group, first))
        return cls(keys, group, first, n_groups)

    def members(self) -> tuple[I64, I64]:
        """CSR (offsets [G + 1], rows [L]) of each group's rows, ascending."""
        if self._offsets is None or self._members is None:
            self._offsets = np.empty(self.n_groups + 1, dtype=np.int64)
            self._members = np.empty(self.group.shape[0], dtype=np.int64)
            _grouped().group_members(self.group, self.n_groups, self._offsets, self._members)
        return self._offsets, self._members

    def expand(self, u_scores: F32, u_idx: I64, k: int) -> tuple[F32, I64]:
        """Top-k rows from the exact top-k' (k' = min(k, G)) over the distinct rows; see `grouped.expand_topk`."""
        offsets, members = self.members()
        out_s = np.empty((u_idx.shape[0], k), dtype=np.float32)
        out_i = np.empty((u_idx.shape[0], k), dtype=np.int64)
        # a serial kernel: no launch lock (the lock guards numba's parallel layer only)
        _grouped().expand_topk(
            np.ascontiguousarray(u_scores), np.ascontiguousarray(u_idx), offsets, members, k, out_s, out_i
        )
        return out_s, out_i


# ---------------------------------------------------------------------------------------------
# approximate strategies (SIM hard search, ETA) and the context some strategies need


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
class ContextRetriever(Protocol):
    """A retriever that also takes a `RetrievalContext` (`service.assemble` passes one when it can)."""

    name: str

    def search(self, queries: F32, keys: F32, k: int) -> tuple[F32, I64]: ...

    def search_context(self, queries: F32, keys: F32, k: int, context: RetrievalContext) -> tuple[F32, I64]: ...


class SimHardRetriever:
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

    def search(self, queries: F32, keys: F32, k: int) -> tuple[F32, I64]:
        return self._exact.search(queries, keys, k)

    def search_context(self, queries: F32, keys: F32, k: int, context: RetrievalContext) -> tuple[F32, I64]:
        if context.key_category is None or context.query_category is None:
            return self._exact.search(queries, keys, k)
        q, keys, k = validate(queries, keys, k)
        n_queries, n_keys = q.shape[0], keys.shape[0]
        key_cat = np.asarray(context.key_category, dtype=np.int64)
        query_cat = np.asarray(context.query_category, dtype=np.int64)
        if key_cat.shape != (n_keys,) or query_cat.shape != (n_queries,):
            raise RetrievalInputError(
                f"categories must have shapes ({n_keys},) and ({n_queries},), got {key_cat.shape} and {query_cat.shape}"
            )
        if n_queries == 0 or n_keys == 0:
            return padded(n_queries, k)
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
            with _launch_lock, _numba_threads(self.num_threads):
                _grouped().segment_topk(q, np.ascontiguousarray(sorted_keys.T), order, seg_start, lens, k, out_s,
                                        out_i)
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


def simhash_planes(dim: int, bits: int, seed: int) -> F32:
    """Random Gaussian hyperplanes [dim, bits] of SimHash (fixed per seed)."""
    return np.random.default_rng([seed, dim, bits]).standard_normal((dim, bits), dtype=np.float32)


def simhash(x: F32, planes: F32) -> npt.NDArray[np.uint64]:
    """Sign bits of x @ planes packed into uint64 words [n, bits / 64] (bit i of a word = plane i)."""
    signs = (x @ planes) > 0
    packed = np.packbits(signs, axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view(np.uint64)


class EtaRetriever:
    """ETA: SimHash codes of keys and queries, a Hamming-distance shortlist, then an exact re-rank.

    Inner-product search is reduced to angular search first (the keys get one more coordinate
    sqrt(M² - |k|²), M the largest key norm of the request, and queries a 0), so the angle, which
    SimHash estimates, is monotone in the inner product. For each query the `shortlist` keys
    closest in Hamming distance (`bits`-bit codes, a multiple of 64) are re-scored exactly and the
    top-k of those returned, with their exact scores. Histories are first reduced to their distinct
    keys (`dedup`, as `exact` does), so a repeated behaviour costs nothing. `hamming_topk` in
    `service.kernels.hamming` is the kernel.
    """

    name = "eta"

    def __init__(self, bits: int = 64, shortlist: int = 256, dedup: bool = True, seed: int = 0,
                 mips: bool = True, num_threads: int | None = None) -> None:
        if bits < 64 or bits % 64:
            raise ValueError(f"bits must be a positive multiple of 64, got {bits}")
        if shortlist < 1:
            raise ValueError(f"shortlist must be >= 1, got {shortlist}")
        self.bits = bits
        self.shortlist = shortlist
        self.dedup = dedup
        self.seed = seed
        self.mips = mips
        self.num_threads = num_threads
        self._planes: dict[int, F32] = {}

    def _codes(self, queries: F32, keys: F32) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
        """Query codes [B, W] and key codes transposed [W, L]."""
        d = keys.shape[1]
        if self.mips:
            norms2 = np.einsum("ij,ij->i", keys, keys)
            keys = np.concatenate([keys, np.sqrt(np.maximum(norms2.max() - norms2, 0.0))[:, None]], axis=1)
            queries = np.concatenate([queries, np.zeros((queries.shape[0], 1), dtype=np.float32)], axis=1)
            d += 1
        planes = self._planes.get(d)
        if planes is None:
            planes = self._planes.setdefault(d, simhash_planes(d, self.bits, self.seed))
        return simhash(queries, planes), np.ascontiguousarray(simhash(keys.astype(np.float32, copy=False), planes).T)

    def search(self, queries: F32, keys: F32, k: int) -> tuple[F32, I64]:
        q, keys, k = validate(queries, keys, k)
        n_queries, n_keys = q.shape[0], keys.shape[0]
        if n_queries == 0 or n_keys == 0:
            return padded(n_queries, k)
        distinct = DistinctKeys.of(keys) if self.dedup and n_keys >= _DEDUP_MIN_KEYS else None
        base = distinct.keys if distinct is not None else keys
        kk = min(k, base.shape[0]) if distinct is not None else k
        q_codes, k_codes = self._codes(q, base)
        out_s = np.empty((n_queries, kk), dtype=np.float32)
        out_i = np.empty((n_queries, kk), dtype=np.int64)
        from service.kernels import hamming

        with _launch_lock, _numba_threads(self.num_threads):
            hamming.hamming_topk(q_codes, k_codes, q, base, max(self.shortlist, kk), kk, out_s, out_i)
        if distinct is None:
            return out_s, out_i
        return distinct.expand(out_s, out_i, k)


# strategies that fall back to exact count it here, by (strategy, reason); `service.metrics`
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


class TwinV2Retriever:
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

    def search(self, queries: F32, keys: F32, k: int) -> tuple[F32, I64]:
        return self._fallback("missing", queries, keys, k)

    def search_context(self, queries: F32, keys: F32, k: int, context: RetrievalContext) -> tuple[F32, I64]:
        q, keys, k = validate(queries, keys, k)
        n_queries, n_keys = q.shape[0], keys.shape[0]
        if n_queries == 0 or n_keys == 0:
            return padded(n_queries, k)
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
        distinct = DistinctKeys.of(keys) if self.dedup and n_keys >= _DEDUP_MIN_KEYS else None
        if distinct is not None:
            gkeys = distinct.keys
            g_cl = cl[distinct.first]
            g_mult = np.bincount(distinct.group, minlength=distinct.n_groups)
        else:
            gkeys, g_cl, g_mult = keys, cl, np.ones(n_keys, dtype=np.int64)
        n_groups = gkeys.shape[0]
        from service.kernels import clusters as kernels

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
        with _launch_lock, _numba_threads(self.num_threads):
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


def warm_up() -> float:
    """Load the exact kernel from numba's on-disk cache, compiling it if absent; return seconds taken.

    Call before serving (readiness waits on it): a cold compile takes ~20 s on 2 cores, a cache
    hit well under one. The cache lives in `service/kernels/__pycache__`, or in NUMBA_CACHE_DIR when set
    (needed on a read-only root filesystem).
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    retriever = ExactRetriever()
    for n_keys in (3000, 300, 5):  # seeded scan, unseeded scan, L < k: one compile covers all
        retriever.search(
            rng.standard_normal((9, 17), dtype=np.float32), rng.standard_normal((n_keys, 17), dtype=np.float32), 64
        )
    elapsed = time.perf_counter() - t0
    log.info("retrieval kernels ready", extra={"seconds": round(elapsed, 3), "cache": _kernels().cache_enabled()})
    return elapsed


# ---------------------------------------------------------------------------------------------
# verification (tests, benchmarks, new strategies' parity checks)


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

RetrieverFactory = Callable[..., Retriever]

_REGISTRY: dict[str, RetrieverFactory] = {
    "exact": ExactRetriever,
    "faiss_knn": FaissKnnRetriever,
    "numpy": NumpyRetriever,
    "faiss_gpu": FaissGpuRetriever,
    "sim_hard": SimHardRetriever,
    "eta": EtaRetriever,
    "twin_v2": TwinV2Retriever,
}


def register_retriever(name: str, factory: RetrieverFactory) -> None:
    """Add a strategy under `name` (e.g. "twin_v2"); names are unique."""
    if name in _REGISTRY:
        raise ValueError(f"retriever {name!r} is already registered")
    _REGISTRY[name] = factory


def available_retrievers() -> list[str]:
    """Names accepted by `make_retriever` (faiss_gpu is listed even where it cannot be built)."""
    return sorted(_REGISTRY)


def parse_strategy(spec: str) -> tuple[str, dict[str, Any]]:
    """"eta:bits=128,shortlist=512" -> ("eta", {"bits": 128, "shortlist": 512}).

    Values are read as int, float, true/false or none when they look like one, else kept as
    strings; this is how a setting such as RANKSERVE_RETRIEVAL_STRATEGY carries options.
    """
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad retriever option {part!r} in {spec!r}: use name:key=value,key=value")
        options[key.strip()] = _literal(raw.strip())
    return name.strip(), options


def _literal(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def make_retriever(name: str, **options: Any) -> Retriever:
    """Build the strategy `name` with its options, e.g. make_retriever("exact", device="auto").

    `name` may carry options itself ("eta:bits=128,shortlist=512", see `parse_strategy`); keyword
    options win over those.
    """
    if ":" in name:
        name, parsed = parse_strategy(name)
        options = {**parsed, **options}
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown retriever {name!r}; available: {', '.join(_REGISTRY)}") from None
    try:
        return factory(**options)
    except TypeError as exc:  # unexpected keyword
        raise ValueError(f"bad options for retriever {name!r}: {exc}") from exc
