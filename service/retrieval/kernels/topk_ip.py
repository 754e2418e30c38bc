"""Fused exact top-k by inner product (numba): scores are computed block by block and filtered
against a per-query threshold, so the [B, L] score matrix is never materialized.

Layout and loop order (see docs/RETRIEVAL.md for the measurements behind each choice):

* keys are packed as blocks of ``BLOCK`` keys, each block transposed to ``[d, BLOCK]``, so the
  innermost loop runs over keys with unit stride and vectorizes; one block (16 KB at d = 16)
  stays in L1 while a tile of ``QTILE`` queries is scored against it;
* the query components are hoisted into scalars in chunks of 16/8/4 dims, so each pass over a
  block does several FMAs per load/store of the score buffer;
* per query, a threshold is seeded from a strided sample of the keys (the r-th best sample
  score, with r chosen so that the threshold is below the true k-th best with high
  probability); only scores above it are appended to a small candidate buffer, which is
  compacted (quickselect) if it ever fills. If fewer than k candidates were collected the seed
  was too high and the query is rescanned with no threshold, so the result is always exact.

Order: descending score, ties broken by ascending key index (fully deterministic, independent
of blocking and thread count).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np
from numba import prange

log = logging.getLogger("rankserve.kernels")

BLOCK = 256  # keys per block; a compile-time constant so the row offsets in a block are constants
QTILE = 8  # queries scored against one L1-resident key block before moving to the next block

F = TypeVar("F", bound=Callable[..., Any])

# FMA contraction only, no reassociation: the arithmetic is what the source says, so the scores
# (and the order of tied keys) are the same on every run and for every thread count
_FASTMATH = {"contract"}
_cache_ok = True


def _jit(**options: Any) -> Callable[[F], F]:
    """numba.njit with the on-disk cache; without a writable cache dir, compile in memory instead.

    numba raises at decoration time when it finds no writable cache location (a read-only root
    filesystem and no NUMBA_CACHE_DIR); serving must still start, just with a slower first call.
    """

    def deco(fn: F) -> F:
        global _cache_ok
        opts = {"nogil": True, "fastmath": _FASTMATH, "error_model": "numpy", **options}
        if _cache_ok:
            try:
                return cast(F, numba.njit(cache=True, **opts)(fn))
            except RuntimeError as exc:  # "cannot cache function ...: no locator available"
                _cache_ok = False
                log.warning("numba on-disk cache unavailable (%s); set NUMBA_CACHE_DIR to a writable dir", exc)
        return cast(F, numba.njit(cache=False, **opts)(fn))

    return deco


def cache_enabled() -> bool:
    """Whether the kernels use numba's on-disk cache (False: every process compiles on first call)."""
    return _cache_ok


# Candidates are kept as one uint64 per key: the score's bits mapped to an unsigned integer with
# the same order, in the high half, and 0xFFFFFFFF - index in the low half. One integer compare
# then implements "higher score first, then lower index", selection moves one word instead of a
# (score, index) pair, and the score comes back bit-exact.
_U31 = np.uint64(31)
_U32 = np.uint64(32)
_LOW = np.uint64(0xFFFFFFFF)
_SIGN = np.uint64(0x80000000)
_ONE = np.uint64(1)
_ZERO = np.uint64(0)
_U56 = np.uint64(56)
# (1 << 8j) * _BYTE_OF_BIT has j in its top byte: the index of the lowest set byte of a flag word
_BYTE_OF_BIT = np.uint64(0x0001020304050607)


@_jit(inline="always")
def _encode(bits: Any, i: int, index: int) -> Any:
    u = np.uint64(bits[i])
    mask = ((_ZERO - (u >> _U31)) & _LOW) | _SIGN  # negative: flip all bits; positive: flip the sign
    return ((u ^ mask) << _U32) | (_LOW - np.uint64(index))


@_jit(inline="always")
def _decode(key: Any, score_bits: Any, j: int) -> Any:
    """Write the score of `key` into score_bits[j] (a uint32 view of float32) and return its index."""
    u = key >> _U32
    mask = (((u >> _U31) - _ONE) & _LOW) | _SIGN
    score_bits[j] = np.uint32(u ^ mask)
    return np.int64(_LOW - (key & _LOW))


@_jit(inline="always")
def _swap(a: Any, i: int, j: int) -> None:
    t = a[i]
    a[i] = a[j]
    a[j] = t


@_jit()
def _select(a: Any, n: int, k: int) -> None:
    """Quickselect: move the k largest of a[:n] (distinct keys) into a[:k], unordered.

    The partition is branch-free (always swap, advance by the comparison): on candidates the
    comparison is a coin flip, so a branchy partition mispredicts about half the time.
    """
    lo = 0
    hi = n
    while lo < k < hi:
        mid = (lo + hi) >> 1
        last = hi - 1
        # median of three into a[last], so sorted or reversed input stays linear
        if a[mid] > a[last]:
            _swap(a, mid, last)
        if a[lo] > a[last]:
            _swap(a, lo, last)
        if a[mid] > a[lo]:
            _swap(a, mid, lo)
        _swap(a, lo, last)
        pivot = a[last]
        store = lo
        for i in range(lo, last):
            v = a[i]
            a[i] = a[store]
            a[store] = v
            store += v > pivot
        _swap(a, store, last)
        if store == k or store + 1 == k:
            return
        if store > k:
            hi = store
        else:
            lo = store + 1


@_jit()
def _sort(a: Any, n: int, tmp: Any) -> None:
    """Sort a[:n] descending (keys are distinct); tmp holds at least n keys.

    For small n (k = 64 is the common case) each key's position is the number of keys above it:
    n^2 compares, but they vectorize and never mispredict, unlike an insertion sort's.
    """
    if n <= 128:
        for i in range(n):
            v = a[i]
            above = 0
            for j in range(n):
                above += a[j] > v
            tmp[above] = v
        a[:n] = tmp[:n]
    else:
        a[:n] = np.sort(a[:n])[::-1]



@_jit(inline="always")
def _segment_scores(queries: Any, q: int, keys_t: Any, s0: int, n: int, scores: Any) -> None:
    """scores[:n] = keys_t[:, s0:s0+n].T @ queries[q]: column by column, contiguous in the keys."""
    scores[:n] = 0.0
    for c in range(keys_t.shape[0]):
        a = queries[q, c]
        col = keys_t[c, s0 : s0 + n]
        for j in range(n):
            scores[j] += a * col[j]


@_jit(inline="always")
def _emit_topk(buf: Any, m: int, k: int, sort_tmp: Any, tmp: Any, tmp_bits: Any, out_s: Any, out_i: Any,
               q: int) -> None:
    """Row q of the output from the m encoded candidates in buf: the k best, sorted, padded with -inf / -1.

    `tmp_bits` is the uint32 view of `tmp` (float32 [k]): `_decode` leaves each score's bits there.
    """
    if m > k:
        _select(buf, m, k)
        m = k
    _sort(buf, m, sort_tmp)
    for a in range(m):
        out_i[q, a] = _decode(buf[a], tmp_bits, a)
        out_s[q, a] = tmp[a]
    for a in range(m, k):
        out_s[q, a] = -np.inf
        out_i[q, a] = -1

@_jit(inline="always")
def _block_scores(q: Any, kb: Any, out: Any, flags: Any, tt: float) -> None:
    """out[:BLOCK] = q · kb and flags[:BLOCK] = out > tt, where kb is one packed key block [d, BLOCK].

    The components of q are hoisted into scalars 16/8/4 at a time (numba cannot say that `out`
    and `kb` do not alias, so loads of q inside the loop would not be hoisted), and each chunk is
    one vectorized pass over the block: chains of 4 FMAs, summed pairwise (fewer instructions
    than a balanced tree, shorter dependency chains than one long FMA chain). Every pass also
    writes the flags: only the last pass's survive, and fusing the compare saves a pass.
    """
    d = q.shape[0]
    c = 0
    first = True
    while c + 16 <= d:
        a0, a1, a2, a3 = q[c], q[c + 1], q[c + 2], q[c + 3]
        a4, a5, a6, a7 = q[c + 4], q[c + 5], q[c + 6], q[c + 7]
        a8, a9, a10, a11 = q[c + 8], q[c + 9], q[c + 10], q[c + 11]
        a12, a13, a14, a15 = q[c + 12], q[c + 13], q[c + 14], q[c + 15]
        kc = kb[c * BLOCK : (c + 16) * BLOCK]
        for i in range(BLOCK):
            p0 = a0 * kc[i] + a1 * kc[BLOCK + i] + a2 * kc[2 * BLOCK + i] + a3 * kc[3 * BLOCK + i]
            p1 = a4 * kc[4 * BLOCK + i] + a5 * kc[5 * BLOCK + i] + a6 * kc[6 * BLOCK + i] + a7 * kc[7 * BLOCK + i]
            p2 = a8 * kc[8 * BLOCK + i] + a9 * kc[9 * BLOCK + i] + a10 * kc[10 * BLOCK + i] + a11 * kc[11 * BLOCK + i]
            p3 = (
                a12 * kc[12 * BLOCK + i]
                + a13 * kc[13 * BLOCK + i]
                + a14 * kc[14 * BLOCK + i]
                + a15 * kc[15 * BLOCK + i]
            )
            v = (p0 + p1) + (p2 + p3)
            s = v if first else out[i] + v
            out[i] = s
            flags[i] = s > tt
        first = False
        c += 16
    while c + 8 <= d:
        a0, a1, a2, a3 = q[c], q[c + 1], q[c + 2], q[c + 3]
        a4, a5, a6, a7 = q[c + 4], q[c + 5], q[c + 6], q[c + 7]
        kc = kb[c * BLOCK : (c + 8) * BLOCK]
        for i in range(BLOCK):
            p0 = a0 * kc[i] + a1 * kc[BLOCK + i] + a2 * kc[2 * BLOCK + i] + a3 * kc[3 * BLOCK + i]
            p1 = a4 * kc[4 * BLOCK + i] + a5 * kc[5 * BLOCK + i] + a6 * kc[6 * BLOCK + i] + a7 * kc[7 * BLOCK + i]
            v = p0 + p1
            s = v if first else out[i] + v
            out[i] = s
            flags[i] = s > tt
        first = False
        c += 8
    while c + 4 <= d:
        a0, a1, a2, a3 = q[c], q[c + 1], q[c + 2], q[c + 3]
        kc = kb[c * BLOCK : (c + 4) * BLOCK]
        for i in range(BLOCK):
            v = a0 * kc[i] + a1 * kc[BLOCK + i] + a2 * kc[2 * BLOCK + i] + a3 * kc[3 * BLOCK + i]
            s = v if first else out[i] + v
            out[i] = s
            flags[i] = s > tt
        first = False
        c += 4
    if first:
        for i in range(BLOCK):
            out[i] = 0.0
    while c < d:
        a0 = q[c]
        kc = kb[c * BLOCK : (c + 1) * BLOCK]
        for i in range(BLOCK):
            s = out[i] + a0 * kc[i]
            out[i] = s
            flags[i] = s > tt
        c += 1


@_jit()
def pack_keys(keys: Any, kb: Any, n_sample_blocks: int, ks: Any) -> None:
    """Pack keys [L, d] into kb (flat [ceil(L/BLOCK), d, BLOCK], zero tail) and a strided sample
    of n_sample_blocks * BLOCK keys into ks (same layout)."""
    n_keys, d = keys.shape
    n_blocks = (n_keys + BLOCK - 1) // BLOCK
    for b in range(n_blocks):
        base = b * d * BLOCK
        j0 = b * BLOCK
        n = min(BLOCK, n_keys - j0)
        for i in range(n):
            for c in range(d):
                kb[base + c * BLOCK + i] = keys[j0 + i, c]
        for i in range(n, BLOCK):
            for c in range(d):
                kb[base + c * BLOCK + i] = 0.0
    n_sample = n_sample_blocks * BLOCK
    for s in range(n_sample):
        j = (s * n_keys) // n_sample
        b = s // BLOCK
        i = s - b * BLOCK
        for c in range(d):
            ks[b * d * BLOCK + c * BLOCK + i] = keys[j, c]


@_jit(inline="always")
def _insert(top: Any, s: float) -> None:
    """Insert s into top (sorted descending, fixed length), dropping the last element."""
    j = top.shape[0] - 1
    while j > 0 and top[j - 1] < s:
        top[j] = top[j - 1]
        j -= 1
    top[j] = s


@_jit()
def _seed(queries: Any, q0: int, nq: int, ks: Any, rank: int, thr: Any, scores: Any, flags: Any) -> None:
    """thr[t] = the rank-th best sample score of query q0 + t."""
    d = queries.shape[1]
    n_blocks = ks.shape[0] // (d * BLOCK)
    words = flags.view(np.uint64)
    top = np.empty(rank, np.float32)
    for t in range(nq):
        q = queries[q0 + t]
        top[:] = -np.inf
        _block_scores(q, ks[: d * BLOCK], scores, flags, np.inf)
        for i in range(BLOCK):
            if scores[i] > top[rank - 1]:  # rare after the first few
                _insert(top, scores[i])
        for b in range(1, n_blocks):
            # later blocks: only keys above the current rank-th best are looked at
            _block_scores(q, ks[b * d * BLOCK : (b + 1) * d * BLOCK], scores, flags, top[rank - 1])
            for w in range(BLOCK // 8):
                word = words[w]
                while word != _ZERO:
                    low = word & (_ZERO - word)
                    i = 8 * w + int((low * _BYTE_OF_BIT) >> _U56)
                    if scores[i] > top[rank - 1]:
                        _insert(top, scores[i])
                    word ^= low
        thr[t] = top[rank - 1]


@_jit()
def _scan(
    queries: Any, q0: int, nq: int, kb: Any, n_keys: int, k: int, cap: int,
    thr: Any, buf: Any, cnt: Any, scores: Any, flags: Any, tmp: Any,
) -> None:  # fmt: skip
    """Append every key scoring above thr[t] to query t's buffer buf[t]; compact when it fills."""
    d = queries.shape[1]
    n_blocks = (n_keys + BLOCK - 1) // BLOCK
    words = flags.view(np.uint64)
    bits = scores.view(np.uint32)
    tmp_bits = tmp.view(np.uint32)
    for b in range(n_blocks):
        block = kb[b * d * BLOCK : (b + 1) * d * BLOCK]
        j0 = b * BLOCK
        n = min(BLOCK, n_keys - j0)
        for t in range(nq):
            tt = thr[t]
            # one flag byte per key from the vectorized compare; the scalar loop below then skips
            # 8 keys per zero word, and almost every word is zero once tt is near the k-th best
            _block_scores(queries[q0 + t], block, scores, flags, tt)
            for i in range(n, BLOCK):  # padding keys of the last block
                flags[i] = 0
            m = cnt[t]
            row = buf[t]
            for w in range(BLOCK // 8):
                word = words[w]
                while word != _ZERO:  # visit only the set flag bytes, lowest first
                    low = word & (_ZERO - word)
                    i = 8 * w + int((low * _BYTE_OF_BIT) >> _U56)
                    row[m] = _encode(bits, i, j0 + i)
                    m += 1
                    word ^= low
            if m > cap:
                _select(row, m, k)
                worst = row[0]
                for a in range(1, k):
                    worst = min(worst, row[a])
                _decode(worst, tmp_bits, 0)
                thr[t] = tmp[0]  # later keys that tie the k-th best lose on index: strict > is exact
                m = k
            cnt[t] = m


@_jit(parallel=True)
def topk_ip(queries: Any, kb: Any, n_keys: int, ks: Any, rank: int, k: int, cap: int, out_s: Any, out_i: Any) -> None:
    """Exact top-k by inner product of each query against the packed keys; see the module doc.

    queries [B, d] float32 C-contiguous; kb, ks from `pack_keys`; rank = 0 disables the seed;
    cap >= k is the candidate buffer size; out_s [B, k] float32, out_i [B, k] int64.
    """
    n_queries = queries.shape[0]
    n_tiles = (n_queries + QTILE - 1) // QTILE
    for tile in prange(n_tiles):
        q0 = tile * QTILE
        nq = min(QTILE, n_queries - q0)
        scores = np.empty(BLOCK, np.float32)
        flags = np.zeros(BLOCK, np.uint8)
        buf = np.empty((QTILE, cap + BLOCK), np.uint64)
        cnt = np.zeros(QTILE, np.int64)
        thr = np.full(QTILE, -np.inf, np.float32)
        tmp = np.empty(k, np.float32)
        tmp_bits = tmp.view(np.uint32)
        sort_tmp = np.empty(min(k, 128), np.uint64)
        if rank > 0:
            _seed(queries, q0, nq, ks, rank, thr, scores, flags)
        _scan(queries, q0, nq, kb, n_keys, k, cap, thr, buf, cnt, scores, flags, tmp)
        for t in range(nq):
            m = cnt[t]
            if m < k and m < n_keys:
                # the seed was above the true k-th best (rare by construction): rescan unfiltered
                thr1 = np.full(1, -np.inf, np.float32)
                cnt1 = np.zeros(1, np.int64)
                _scan(queries, q0 + t, 1, kb, n_keys, k, cap, thr1, buf[t : t + 1], cnt1, scores, flags, tmp)
                m = cnt1[0]
            _emit_topk(buf[t], m, k, sort_tmp, tmp, tmp_bits, out_s, out_i, q0 + t)
