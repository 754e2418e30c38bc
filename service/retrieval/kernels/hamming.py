"""ETA kernel: Hamming-distance shortlist over SimHash codes, then an exact re-rank (numba).

For each query: the Hamming distance of its code to every key code (XOR + popcount, W 64-bit
words per code), a shortlist of the `n_short` closest keys (a histogram over the distances
0..64W gives the cut; at the cut, lower key indices first), then the exact inner product of the
query with each shortlisted key and the top-k of those by (score, lower index), sorted; the
selection helpers are the exact kernel's (`service.retrieval.kernels.topk_ip`). numba's on-disk cache does
not notice changes in another module: after editing those helpers, clear `__pycache__` here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import prange

from service.retrieval.kernels.topk_ip import _emit_topk, _encode, _jit

_TILE = 8  # queries per parallel work item (scratch buffers are allocated once per tile)
_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)
_U1 = np.uint64(1)
_U2 = np.uint64(2)
_U4 = np.uint64(4)
_U56 = np.uint64(56)


@_jit(inline="always")
def _popcount(x: Any) -> Any:
    """Bits set in a uint64 (the SWAR idiom, which LLVM turns into one popcnt instruction)."""
    x = x - ((x >> _U1) & _M1)
    x = (x & _M2) + ((x >> _U2) & _M2)
    x = (x + (x >> _U4)) & _M4
    return (x * _H01) >> _U56


@_jit(parallel=True)
def hamming_topk(q_codes: Any, k_codes_t: Any, queries: Any, keys: Any, n_short: int, k: int, out_s: Any,
                 out_i: Any) -> None:
    """Top-k by exact inner product among the n_short keys closest in Hamming distance, per query.

    q_codes [B, W] and k_codes_t [W, L] (the key codes transposed: each word is one contiguous
    row, so the distance loops run with unit stride and vectorize) uint64; queries [B, d], keys
    [L, d] float32; out_s [B, k] float32 and out_i [B, k] int64 (padding -inf / -1 when fewer
    than k keys).
    """
    n_queries, n_words = q_codes.shape
    n_keys, d = keys.shape
    n_bins = 64 * n_words + 1
    short = min(n_short, n_keys)
    n_tiles = (n_queries + _TILE - 1) // _TILE
    for tile in prange(n_tiles):
        dist = np.empty(n_keys, np.int32)
        hist = np.empty(n_bins, np.int32)
        rows = np.empty(max(short, 1), np.int64)
        scores = np.empty(max(short, 1), np.float32)
        sbits = scores.view(np.uint32)
        buf = np.empty(max(short, 1), np.uint64)
        tmp = np.empty(k, np.float32)
        tmp_bits = tmp.view(np.uint32)
        sort_tmp = np.empty(min(k, 128), np.uint64)
        for q in range(tile * _TILE, min(n_queries, (tile + 1) * _TILE)):
            c0 = q_codes[q, 0]
            row0 = k_codes_t[0]
            for j in range(n_keys):  # XOR + popcount, vectorized
                dist[j] = np.int32(_popcount(c0 ^ row0[j]))
            for w in range(1, n_words):
                cw = q_codes[q, w]
                roww = k_codes_t[w]
                for j in range(n_keys):
                    dist[j] += np.int32(_popcount(cw ^ roww[j]))
            # the cut: the smallest distance t with at least `short` keys at or below it
            hist[:] = 0
            for j in range(n_keys):
                hist[dist[j]] += 1
            cut = 0
            below = 0  # keys strictly closer than the cut
            while below + hist[cut] < short:
                below += hist[cut]
                cut += 1
            take_at_cut = short - below
            m = 0
            for j in range(n_keys):
                dj = dist[j]
                if dj <= cut:  # rare: a predictable branch
                    if dj < cut:
                        rows[m] = j
                        m += 1
                    elif take_at_cut > 0:
                        rows[m] = j
                        m += 1
                        take_at_cut -= 1
            # exact re-rank of the shortlist
            qv = queries[q]
            for a in range(m):
                j = rows[a]
                acc = np.float32(0.0)
                for c in range(d):
                    acc += qv[c] * keys[j, c]
                scores[a] = acc
            for a in range(m):
                buf[a] = _encode(sbits, a, rows[a])
            _emit_topk(buf, m, k, sort_tmp, tmp, tmp_bits, out_s, out_i, q)
