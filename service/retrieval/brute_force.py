"""Brute-force strategies: ``numpy`` (the naive baseline), ``faiss_knn`` (the reference) and ``faiss_gpu``."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from service.retrieval.base import (
    F32,
    I64,
    BaseRetriever,
    RetrievalContext,
    RetrievalInputError,
    RetrieverUnavailable,
    pad_to_k,
)

GPU_MAX_K = 2048  # faiss GPU's largest supported k (GPU_MAX_SELECTION_K)

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


class NumpyRetriever(BaseRetriever):
    """Materialize the [B, L] scores with one matmul, then argpartition and sort (the naive baseline)."""

    name = "numpy"

    def _search(self, q: F32, keys: F32, k: int, context: RetrievalContext | None) -> tuple[F32, I64]:
        n_queries, n_keys = q.shape[0], keys.shape[0]
        scores = q @ keys.T
        kk = min(k, n_keys)
        if kk < n_keys:
            # the k-th score, then every key above it and the lowest-index keys equal to it: which of
            # several keys tied at the cut survive must not be argpartition's choice
            kth = np.partition(scores, n_keys - kk, axis=1)[:, n_keys - kk, None]
            above = scores > kth
            tied = scores == kth
            keep = above | (tied & (np.cumsum(tied, axis=1) <= kk - above.sum(axis=1, keepdims=True)))
            if (keep.sum(axis=1) == kk).all():
                idx = np.nonzero(keep)[1].reshape(n_queries, kk)  # row-major: each row's indices ascending
            else:  # NaN scores compare false: a full sort (NaN last) decides
                idx = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
        else:
            idx = np.broadcast_to(np.arange(n_keys), (n_queries, n_keys))
        top = np.take_along_axis(scores, idx, axis=1)
        order = np.lexsort((idx, -top), axis=1)  # score descending, then index ascending
        return pad_to_k(np.take_along_axis(top, order, 1), np.take_along_axis(idx, order, 1), k)


class FaissKnnRetriever(BaseRetriever):
    """`faiss.knn` brute force with METRIC_INNER_PRODUCT (the reference)."""

    name = "faiss_knn"

    def __init__(self, num_threads: int | None = None) -> None:
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self._faiss = _faiss()
        self.num_threads = num_threads

    def _search(self, q: F32, keys: F32, k: int, context: RetrievalContext | None) -> tuple[F32, I64]:
        n_keys = keys.shape[0]
        # an OpenMP setting of the calling thread that outlives the call: set it every time, so
        # another retriever's setting (e.g. a one-thread one) does not leak into this one
        self._faiss.omp_set_num_threads(self.num_threads or _faiss_default_threads)
        scores, idx = self._faiss.knn(q, keys, min(k, n_keys), metric=self._faiss.METRIC_INNER_PRODUCT)
        return pad_to_k(scores, idx, k)


class FaissGpuRetriever(BaseRetriever):
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

    def _search(self, q: F32, keys: F32, k: int, context: RetrievalContext | None) -> tuple[F32, I64]:
        n_keys = keys.shape[0]
        kk = min(k, n_keys)
        if kk > GPU_MAX_K:
            raise RetrievalInputError(f"faiss_gpu supports k <= {GPU_MAX_K}, got {k}")
        with self._lock:
            scores, idx = self._faiss.knn_gpu(
                self._res, q, keys, kk, metric=self._faiss.METRIC_INNER_PRODUCT, device=self.gpu
            )
        return pad_to_k(scores, idx, k)
