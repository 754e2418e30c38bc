"""``exact``: exact top-k with the fused numba kernel (`kernels.topk_ip`), the fastest exact CPU method.

Ties are broken by lower index. ``device="auto"`` or ``"gpu"`` sends the search to faiss GPU.
`warm_up` loads (or compiles) the kernel before a process serves.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

import numpy as np

from service.retrieval.base import (
    F32,
    I64,
    BaseRetriever,
    DistinctKeys,
    RetrievalContext,
    RetrievalInputError,
    launch_lock,
    numba_threads,
    padded,
    search_expanded,
    validate,
)
from service.retrieval.brute_force import FaissGpuRetriever, gpu_available

log = logging.getLogger("rankserve.retrieval")

Device = Literal["cpu", "gpu", "auto"]

MAX_KEYS = 2**32 - 1  # the exact kernel packs a key index into 32 bits


def exact_kernels() -> Any:
    """The exact kernel module; its first import loads (or compiles) the numba kernels."""
    from service.retrieval.kernels import topk_ip

    return topk_ip


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



class ExactRetriever(BaseRetriever):
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

    def _search(self, q: F32, keys: F32, k: int, context: RetrievalContext | None) -> tuple[F32, I64]:
        if self._gpu is not None:
            return self._gpu._search(q, keys, k, context)
        if keys.shape[0] > MAX_KEYS:
            raise RetrievalInputError(f"exact supports at most {MAX_KEYS} keys, got {keys.shape[0]}")
        return self._distinct_search(self.search_unchecked, q, keys, k, max_ratio=self.dedup_ratio)

    def search_distinct(self, queries: F32, distinct: DistinctKeys, k: int) -> tuple[F32, I64]:
        """The kernel over the caller's distinct rows, expanded (`dedup_ratio` and the GPU as in `search`)."""
        if self._gpu is not None or not self.dedup or distinct.n_groups > self.dedup_ratio * distinct.n_rows:
            return super().search_distinct(queries, distinct, k)
        q, keys, k = validate(queries, distinct.keys, k)
        if q.shape[0] == 0 or keys.shape[0] == 0:
            return padded(q.shape[0], k)
        return search_expanded(self.search_unchecked, q, DistinctKeys(keys, distinct.group, distinct.first), k)

    def search_unchecked(self, q: F32, keys: F32, k: int) -> tuple[F32, I64]:
        """The kernel on validated, non-empty inputs (no dedup): [B, k] scores and indices."""
        n_queries, n_keys = q.shape[0], keys.shape[0]
        kern = exact_kernels()
        block = kern.BLOCK
        d = q.shape[1]
        n_sample_blocks, rank = _seed_plan(n_keys, k, block)
        n_blocks = -(-n_keys // block)
        if n_blocks <= 2:  # nothing to skip: ordering the keys would cost more than it saves
            order, share = np.arange(n_keys, dtype=np.int64), 0.0
        else:
            order = np.empty(n_keys, dtype=np.int64)
            share = kern.key_order(q, keys, order)
        if share > kern.ORDER_SHARE:
            # keys ordered along a dominant column (a bias): block bounds skip most blocks and the
            # first block's scores give the threshold, so the seed would cost more than it saves
            n_sample_blocks, rank = 0, 0
            bounds = np.empty((2, d, n_blocks), dtype=np.float32)
        else:
            bounds = np.empty((2, d, 0), dtype=np.float32)  # blocks span every score: no bounds
        packed = np.empty(n_blocks * d * block, dtype=np.float32)
        sample = np.empty(n_sample_blocks * d * block, dtype=np.float32)
        out_s = np.empty((n_queries, k), dtype=np.float32)
        out_i = np.empty((n_queries, k), dtype=np.int64)
        kern.pack_keys(keys, order, packed, bounds, n_sample_blocks, sample)
        with launch_lock, numba_threads(self.num_threads):
            kern.topk_ip(q, packed, n_keys, order, bounds, sample, rank, k, self.cap_factor * k, out_s, out_i)
        return out_s, out_i


def warm_up() -> float:
    """Load the exact kernel from numba's on-disk cache, compiling it if absent; return seconds taken.

    Call before serving (readiness waits on it): a cold compile takes seconds, a cache hit far
    less (docs/PERFORMANCE.md). The cache lives in `service/retrieval/kernels/__pycache__`, or in
    NUMBA_CACHE_DIR when set (needed on a read-only root filesystem).
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    retriever = ExactRetriever()
    for n_keys in (3000, 300, 5):  # seeded scan, unseeded scan, L < k: one compile covers all
        retriever.search(
            rng.standard_normal((9, 17), dtype=np.float32), rng.standard_normal((n_keys, 17), dtype=np.float32), 64
        )
    keys = rng.standard_normal((3000, 17), dtype=np.float32) * np.float32(0.1)
    keys[:, -1] *= 100  # a dominant (bias) column: ordered keys and block bounds, the same compiled code
    retriever.search(rng.standard_normal((9, 17), dtype=np.float32), keys, 64)
    # a history that repeats its behaviours: the distinct-key search and its expansion
    retriever.search(rng.standard_normal((9, 17), dtype=np.float32), np.tile(keys[:600], (5, 1)), 64)
    elapsed = time.perf_counter() - t0
    log.info("retrieval kernels ready", extra={"seconds": round(elapsed, 3), "cache": exact_kernels().cache_enabled()})
    return elapsed

