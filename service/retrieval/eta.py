"""``eta``: ETA's SimHash codes with a Hamming-distance shortlist, then an exact re-rank."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from service.retrieval.base import F32, I64, BaseRetriever, RetrievalContext, launch_lock, numba_threads


def simhash_planes(dim: int, bits: int, seed: int) -> F32:
    """Random Gaussian hyperplanes [dim, bits] of SimHash (fixed per seed)."""
    return np.random.default_rng([seed, dim, bits]).standard_normal((dim, bits), dtype=np.float32)


def simhash(x: F32, planes: F32) -> npt.NDArray[np.uint64]:
    """Sign bits of x @ planes packed into uint64 words [n, bits / 64] (bit i of a word = plane i)."""
    signs = (x @ planes) > 0
    packed = np.packbits(signs, axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view(np.uint64)


class EtaRetriever(BaseRetriever):
    """ETA: SimHash codes of keys and queries, a Hamming-distance shortlist, then an exact re-rank.

    Inner-product search is reduced to angular search first (the keys get one more coordinate
    sqrt(M² - |k|²), M the largest key norm of the request, and queries a 0), so the angle, which
    SimHash estimates, is monotone in the inner product. For each query the `shortlist` keys
    closest in Hamming distance (`bits`-bit codes, a multiple of 64) are re-scored exactly and the
    top-k of those returned, with their exact scores. Histories are first reduced to their distinct
    keys (`dedup`, as `exact` does), so a repeated behaviour costs nothing. `hamming_topk` in
    `service.retrieval.kernels.hamming` is the kernel.
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

    def _search(self, q: F32, keys: F32, k: int, context: RetrievalContext | None) -> tuple[F32, I64]:
        return self._distinct_search(self._shortlist_search, q, keys, k)

    def _shortlist_search(self, q: F32, keys: F32, k: int) -> tuple[F32, I64]:
        """Hamming shortlist and exact re-rank of [B, k] over `keys` (no de-duplication)."""
        from service.retrieval.kernels import hamming  # loads (or compiles) the kernel on first use

        q_codes, k_codes = self._codes(q, keys)
        out_s = np.empty((q.shape[0], k), dtype=np.float32)
        out_i = np.empty((q.shape[0], k), dtype=np.int64)
        with launch_lock, numba_threads(self.num_threads):
            hamming.hamming_topk(q_codes, k_codes, q, keys, max(self.shortlist, k), k, out_s, out_i)
        return out_s, out_i
