"""Fused exact top-k by inner product (numba): scores are computed block by block and filtered
against a per-query threshold, so the [B, L] score matrix is never materialized.

Layout and loop order (see docs/RETRIEVAL.md for the measurements behind each choice):

* keys are packed as blocks of ``BLOCK`` keys, each block transposed to ``[d, BLOCK]``, so the
  innermost loop runs over keys with unit stride and vectorizes; one block (16 KB at d = 16)
  stays in L1 while a tile of ``QTILE`` queries is scored against it;
* the query components are hoisted into scalars in chunks of 16/8/4 dims, so each pass over a
  block does several FMAs per load/store of the score buffer; d = 17 (16 + a bias column) is
  one pass, with the 17th product added last as a separate pass would;
* when one key column dominates the score variance (the GSU's bias column), `key_order` orders
  the keys along it and `pack_keys` records each block's per-column min and max: a block whose
  upper bound is below a query's threshold is skipped. The first block a query scans sets the
  threshold (bisection on its scores for a value with k to 3k/2 keys at or above it), so with
  a bias column most queries score one block of the ~12 at L ~ 3,000;
* otherwise (no dominant column: blocks would span every score) the keys keep their order and,
  per query, a threshold is seeded from a strided sample of the keys (the r-th best sample
  score, with r chosen so that the threshold is below the true k-th best with high
  probability). If fewer than k candidates were collected the seed was too high and the query
  is rescanned with no threshold, so the result is always exact;
* only scores above the threshold are appended to a small candidate buffer, which is
  compacted (quickselect) if it ever fills, raising the threshold to just below the k-th best
  so far (a later key with the same score may still win on a lower index).

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
# `key_order` orders the keys along their dominant column when it carries more than this share of
# the score variance (a bias column); `exact` then runs without the threshold seed
ORDER_SHARE = 0.5

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
_BELOW_ZERO = np.float32(-1.4e-45)  # the largest float32 below zero (a subnormal)


_NEG_ZERO = np.uint64(0x80000000)  # the bits of -0.0


@_jit(inline="always")
def _encode(bits: Any, i: int, index: int) -> Any:
    u = np.uint64(bits[i])
    if u == _NEG_ZERO:  # -0.0 == +0.0: one key for both, so zero scores tie by index as equal ones do
        u = _ZERO
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
def _scores_17(q: Any, c: int, kc: Any, out: Any, flags: Any, tt: float, first: bool) -> None:
    """One pass of `_block_scores` over 17 columns (q[c:c+17] against kc, [17, BLOCK])."""
    a0, a1, a2, a3 = q[c], q[c + 1], q[c + 2], q[c + 3]
    a4, a5, a6, a7 = q[c + 4], q[c + 5], q[c + 6], q[c + 7]
    a8, a9, a10, a11 = q[c + 8], q[c + 9], q[c + 10], q[c + 11]
    a12, a13, a14, a15 = q[c + 12], q[c + 13], q[c + 14], q[c + 15]
    a16 = q[c + 16]
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
        # the 17th column last, in one rounding: the same arithmetic as a separate pass for it
        s = s + a16 * kc[16 * BLOCK + i]
        out[i] = s
        flags[i] = s > tt


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
        if d - c == 17:
            # 16 + 1 (the bias column) in one pass: no separate read-modify-write pass for one column
            _scores_17(q, c, kb[c * BLOCK : (c + 17) * BLOCK], out, flags, tt, first)
            first = False
            c += 17
            continue
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
def key_order(queries: Any, keys: Any, order: Any) -> float:
    """Fill order[:L] with the packing order of the keys; return the dominant column's share.

    The dominant column is the one with the largest variance of its score term (variance of the
    key column times the mean square of the query column, estimated on strided samples of at
    most 1,024 keys and 256 queries): a bias column, when there is one. When it carries more than
    `ORDER_SHARE` of the score variance, the keys are ordered by descending value of it (a stable
    counting sort on buckets of its range: O(L), and blocks tight enough for their bounds to skip
    most of them); otherwise they keep their own order.
    """
    n_keys, d = keys.shape
    n_queries = queries.shape[0]
    n_blocks = (n_keys + BLOCK - 1) // BLOCK
    s1 = np.zeros(d, np.float64)
    s2 = np.zeros(d, np.float64)
    qq = np.zeros(d, np.float64)
    nk = min(n_keys, 1024)
    for s in range(nk):
        j = (s * n_keys) // nk
        for c in range(d):
            x = np.float64(keys[j, c])
            s1[c] += x
            s2[c] += x * x
    nq = min(n_queries, 256)
    for s in range(nq):
        j = (s * n_queries) // nq
        for c in range(d):
            x = np.float64(queries[j, c])
            qq[c] += x * x
    col = 0
    best = 0.0
    total = 0.0
    for c in range(d):
        w = (s2[c] - s1[c] * s1[c] / nk) * qq[c]
        if w > 0.0:  # NaN never counts
            total += w
            if w > best:
                best = w
                col = c
    share = best / total if total > 0.0 else 0.0
    if not share > ORDER_SHARE:
        for j in range(n_keys):
            order[j] = j
        return share
    # counting sort by descending bucket of keys[:, col]
    n_buckets = min(4096, 16 * n_blocks)
    lo = np.inf
    hi = -np.inf
    for j in range(n_keys):
        x = keys[j, col]
        lo = min(lo, x)
        hi = max(hi, x)
    span = hi - lo
    scale = (n_buckets - 1) / span if 0.0 < span < np.inf else 0.0
    bucket = np.empty(n_keys, np.int64)
    start = np.zeros(n_buckets + 1, np.int64)
    for j in range(n_keys):
        t = (hi - keys[j, col]) * scale
        u = int(t) if 0.0 <= t <= n_buckets - 1 else (n_buckets - 1 if t > 0.0 else 0)
        bucket[j] = u
        start[u + 1] += 1
    for u in range(n_buckets):
        start[u + 1] += start[u]
    for j in range(n_keys):
        u = bucket[j]
        order[start[u]] = j
        start[u] += 1
    return share


@_jit()
def pack_keys(keys: Any, order: Any, kb: Any, bounds: Any, n_sample_blocks: int, ks: Any) -> None:
    """Pack keys [L, d] in `order` into kb (flat [ceil(L/BLOCK), d, BLOCK], zero tail), each
    block's per-column min and max into bounds ([2, d, n_blocks], padding excluded; skipped when
    bounds has no blocks), and a strided sample of n_sample_blocks * BLOCK keys in their own order
    into ks (same layout as kb)."""
    n_keys, d = keys.shape
    n_blocks = (n_keys + BLOCK - 1) // BLOCK
    bounded = bounds.shape[2] > 0
    for b in range(n_blocks):
        base = b * d * BLOCK
        j0 = b * BLOCK
        n = min(BLOCK, n_keys - j0)
        for i in range(n):
            j = order[j0 + i]
            for c in range(d):
                kb[base + c * BLOCK + i] = keys[j, c]
        for i in range(n, BLOCK):
            for c in range(d):
                kb[base + c * BLOCK + i] = 0.0
        if bounded:
            for c in range(d):
                col = kb[base + c * BLOCK : base + c * BLOCK + n]
                lo = col[0]
                hi = col[0]
                for i in range(1, n):
                    lo = min(lo, col[i])
                    hi = max(hi, col[i])
                bounds[0, c, b] = lo
                bounds[1, c, b] = hi
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


_NO_ORDER = np.zeros(0, np.int64)


@_jit(inline="always")
def _count_at_least(scores: Any, n: int, x: Any) -> int:
    c = 0
    for i in range(n):
        c += scores[i] >= x
    return c


@_jit(inline="always")
def _first_threshold(scores: Any, n: int, k: int) -> Any:
    """A score x of one scored block (n >= k keys) with k <= #{scores >= x} <= 3k/2 where it can
    (bisection on the score range, each step one vectorized count): the k-th best is >= x."""
    lo = np.float32(np.inf)
    hi = np.float32(-np.inf)
    for i in range(n):
        lo = min(lo, scores[i])
        hi = max(hi, scores[i])
    if not lo < hi:  # one value (or a NaN): no split
        return lo
    if _count_at_least(scores, n, hi) >= k:
        return hi
    target = k + (k >> 1)
    for _ in range(24):
        mid = np.float32(0.5) * lo + np.float32(0.5) * hi
        if not lo < mid < hi:
            break
        c = _count_at_least(scores, n, mid)
        if c >= k:
            lo = mid
            if c <= target:
                break
        else:
            hi = mid
    return lo


@_jit(inline="always")
def _below(x: Any, tmp: Any, tmp_bits: Any) -> Any:
    """The largest float32 below x (x finite or +inf; tmp_bits views tmp): s > _below(x) is s >= x."""
    if x == 0.0:
        return _BELOW_ZERO
    tmp[0] = x
    tmp_bits[0] = tmp_bits[0] - np.uint32(1) if x > 0.0 else tmp_bits[0] + np.uint32(1)
    return tmp[0]


@_jit(inline="always")
def _block_bounds(q: Any, bounds: Any, colmax: Any, bnd: Any) -> None:
    """bnd[b] >= every score `_block_scores` can return for a key of block b (rounding included).

    colmax[c] = max |key[c]| over all keys.
    """
    d = q.shape[0]
    n_blocks = bnd.shape[0]
    bnd[:] = 0.0
    size = 0.0  # sum_c |q_c| max |k_c|: bounds both the rounding error of a score and of bnd
    for c in range(d):
        a = q[c]
        edge = bounds[1, c] if a >= 0.0 else bounds[0, c]  # the max of a * key[c] over a block
        for b in range(n_blocks):
            bnd[b] += a * edge[b]
        size += abs(a) * colmax[c]
    # each of the two sums is off by at most ~d ulps of `size`; 8x that, and never negative
    margin = np.float32(size * (d + 8) * 2.0**-21)
    for b in range(n_blocks):
        bnd[b] += margin


@_jit()
def _scan(
    queries: Any, q0: int, nq: int, kb: Any, n_keys: int, order: Any, bounds: Any, k: int, cap: int,
    thr: Any, buf: Any, cnt: Any, scores: Any, flags: Any, tmp: Any, bnd: Any,
) -> None:  # fmt: skip
    """Append every key scoring above thr[t] to query t's buffer buf[t]; compact when it fills.

    With bounds (bounds.shape[2] = n_blocks), a block whose bound is below the threshold is
    skipped. Without a threshold (thr[t] = -inf), the first block scanned sets one
    (`_first_threshold`), or the buffer is compacted as soon as it holds k keys.
    """
    d = queries.shape[1]
    n_blocks = (n_keys + BLOCK - 1) // BLOCK
    words = flags.view(np.uint64)
    bits = scores.view(np.uint32)
    tmp_bits = tmp.view(np.uint32)
    bounded = bounds.shape[2] > 0
    if bounded:
        colmax = np.zeros(d, np.float32)
        for c in range(d):
            for b in range(n_blocks):
                colmax[c] = max(colmax[c], abs(bounds[0, c, b]), abs(bounds[1, c, b]))
        for t in range(nq):
            _block_bounds(queries[q0 + t], bounds, colmax, bnd[t])
    for b in range(n_blocks):
        block = kb[b * d * BLOCK : (b + 1) * d * BLOCK]
        j0 = b * BLOCK
        n = min(BLOCK, n_keys - j0)
        for t in range(nq):
            tt = thr[t]
            if bounded and bnd[t, b] < tt:
                continue  # no key of this block can reach the k-th best so far
            # one flag byte per key from the vectorized compare; the scalar loop below then skips
            # 8 keys per zero word, and almost every word is zero once tt is near the k-th best
            _block_scores(queries[q0 + t], block, scores, flags, tt)
            for i in range(n, BLOCK):  # padding keys of the last block
                flags[i] = 0
            m = cnt[t]
            row = buf[t]
            if tt == -np.inf and m == 0 and n >= k:
                # no threshold yet and this block alone holds k keys: its k-th best is at least x,
                # and only the keys scoring >= x come through (k to 3k/2 of them, as a rule)
                x = _first_threshold(scores, n, k)
                if x > -np.inf:  # else (a NaN or -inf score) the block goes through unfiltered
                    tt = _below(x, tmp, tmp_bits)
                    thr[t] = tt
                    for i in range(BLOCK):
                        flags[i] = scores[i] > tt
                    for i in range(n, BLOCK):
                        flags[i] = 0
            if tt == -np.inf:
                # no threshold yet: (almost) every flag is set, append branch-free
                for i in range(n):
                    row[m] = _encode(bits, i, order[j0 + i])
                    m += flags[i]
            else:
                ix = order[j0:] if bounded else _NO_ORDER  # unordered keys: the index is the position
                for w in range(BLOCK // 8):
                    word = words[w]
                    while word != _ZERO:  # visit only the set flag bytes, lowest first
                        low = word & (_ZERO - word)
                        i = 8 * w + int((low * _BYTE_OF_BIT) >> _U56)
                        row[m] = _encode(bits, i, ix[i] if bounded else j0 + i)
                        m += 1
                        word ^= low
            if m > cap or (m >= k and thr[t] == -np.inf):
                _select(row, m, k)
                worst = row[0]
                for a in range(1, k):
                    worst = min(worst, row[a])
                # keys come in the packed order, not by index: a later key that ties the k-th best
                # can still win on index, so the new threshold is the float just below it
                _decode(worst, tmp_bits, 0)
                thr[t] = _below(tmp[0], tmp, tmp_bits)
                m = k
            cnt[t] = m


@_jit(parallel=True)
def topk_ip(
    queries: Any, kb: Any, n_keys: int, order: Any, bounds: Any, ks: Any, rank: int, k: int, cap: int,
    out_s: Any, out_i: Any,
) -> None:  # fmt: skip
    """Exact top-k by inner product of each query against the packed keys; see the module doc.

    queries [B, d] float32 C-contiguous; order from `key_order`; kb, bounds, ks from `pack_keys`
    (bounds with no blocks: none, and then order must be the identity, as `key_order` leaves it);
    rank = 0 disables the seed; cap >= k is the candidate buffer size; out_s [B, k] float32,
    out_i [B, k] int64.
    """
    n_queries = queries.shape[0]
    n_blocks = (n_keys + BLOCK - 1) // BLOCK
    n_tiles = (n_queries + QTILE - 1) // QTILE
    for tile in prange(n_tiles):
        q0 = tile * QTILE
        nq = min(QTILE, n_queries - q0)
        scores = np.empty(BLOCK, np.float32)
        flags = np.zeros(BLOCK, np.uint8)
        buf = np.empty((QTILE, cap + BLOCK), np.uint64)
        cnt = np.zeros(QTILE, np.int64)
        thr = np.full(QTILE, -np.inf, np.float32)
        bnd = np.empty((QTILE, n_blocks if bounds.shape[2] > 0 else 0), np.float32)
        tmp = np.empty(k, np.float32)
        tmp_bits = tmp.view(np.uint32)
        sort_tmp = np.empty(min(k, 128), np.uint64)
        if rank > 0:
            _seed(queries, q0, nq, ks, rank, thr, scores, flags)
        _scan(queries, q0, nq, kb, n_keys, order, bounds, k, cap, thr, buf, cnt, scores, flags, tmp, bnd)
        for t in range(nq):
            m = cnt[t]
            if m < k and m < n_keys:
                # the seed was above the true k-th best (rare by construction): rescan unfiltered
                thr1 = np.full(1, -np.inf, np.float32)
                cnt1 = np.zeros(1, np.int64)
                _scan(queries, q0 + t, 1, kb, n_keys, order, bounds, k, cap, thr1, buf[t : t + 1], cnt1, scores,
                      flags, tmp, bnd)
                m = cnt1[0]
            _emit_topk(buf[t], m, k, sort_tmp, tmp, tmp_bits, out_s, out_i, q0 + t)
