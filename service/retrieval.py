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
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

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

    def __init__(self, device: Device = "cpu", num_threads: int | None = None, cap_factor: int = 3) -> None:
        if device not in ("cpu", "gpu", "auto"):
            raise ValueError(f"device must be 'cpu', 'gpu' or 'auto', got {device!r}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if cap_factor < 2:
            raise ValueError(f"cap_factor must be >= 2, got {cap_factor}")
        self._gpu: FaissGpuRetriever | None = None
        if device == "gpu" or (device == "auto" and gpu_available()):
            self._gpu = FaissGpuRetriever()
        self.device: Literal["cpu", "gpu"] = "gpu" if self._gpu is not None else "cpu"
        self.num_threads = num_threads
        self.cap_factor = cap_factor

    def search(self, queries: F32, keys: F32, k: int) -> tuple[F32, I64]:
        if self._gpu is not None:
            return self._gpu.search(queries, keys, k)
        q, keys, k = validate(queries, keys, k)
        n_queries, n_keys = q.shape[0], keys.shape[0]
        if n_queries == 0 or n_keys == 0:
            return padded(n_queries, k)
        if n_keys > _MAX_KEYS:
            raise RetrievalInputError(f"exact supports at most {_MAX_KEYS} keys, got {n_keys}")
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


# ---------------------------------------------------------------------------------------------
# registry

RetrieverFactory = Callable[..., Retriever]

_REGISTRY: dict[str, RetrieverFactory] = {
    "exact": ExactRetriever,
    "faiss_knn": FaissKnnRetriever,
    "numpy": NumpyRetriever,
    "faiss_gpu": FaissGpuRetriever,
}


def register_retriever(name: str, factory: RetrieverFactory) -> None:
    """Add a strategy under `name` (e.g. "twin_v2"); names are unique."""
    if name in _REGISTRY:
        raise ValueError(f"retriever {name!r} is already registered")
    _REGISTRY[name] = factory


def available_retrievers() -> list[str]:
    """Names accepted by `make_retriever` (faiss_gpu is listed even where it cannot be built)."""
    return sorted(_REGISTRY)


def make_retriever(name: str, **options: Any) -> Retriever:
    """Build the strategy `name` with its options, e.g. make_retriever("exact", device="auto")."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown retriever {name!r}; available: {', '.join(available_retrievers())}") from None
    try:
        return factory(**options)
    except TypeError as exc:  # unexpected keyword
        raise ValueError(f"bad options for retriever {name!r}: {exc}") from exc
