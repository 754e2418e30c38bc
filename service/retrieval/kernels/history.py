"""Per-request history kernels of the scorer's input assembly (numba).

`cross_features` is `feature_store.schema.cross_features` (the numpy definition the offline
sample builder uses) computed with one hash pass over the history instead of a sort: the same
float64 arithmetic, rounded to float32 at the same point, so the values are bit-identical
(tests/unit/test_assembly_kernels.py checks them against the numpy definition).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from service.retrieval.kernels.topk_ip import _jit

_EMPTY = np.int64(-1)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_U29 = np.uint64(29)


@_jit(inline="always")
def _slot(item: int, mask: Any) -> Any:
    h = np.uint64(item) * _GOLDEN
    return (h ^ (h >> _U29)) & mask


@_jit()
def cross_features(hist_item: Any, hist_action: Any, hist_ts: Any, cand_item: Any, request_ts: int,
                   n_actions: int, out: Any) -> None:
    """out [B, n_actions + 2] float32 (zeroed here): each candidate's counts per action on its exact item
    (log1p), 1 if any, and log1p(hours since the latest event on it) / 10; item 0 (unknown) never matches.

    A table of the history's distinct items (open addressing) holds each item's counts and newest
    timestamp; candidates then look themselves up. Actions outside [0, n_actions) count for the
    "any" and newest-event columns only, as in the numpy definition.
    """
    n_hist = hist_item.shape[0]
    out[:, :] = 0.0
    if n_hist == 0:
        return
    size = 1
    while size < 2 * n_hist:
        size *= 2
    mask = np.uint64(size - 1)
    slot_item = np.full(size, _EMPTY, np.int64)
    counts = np.zeros((size, n_actions), np.int64)
    newest = np.empty(size, np.int64)
    for j in range(n_hist):
        item = hist_item[j]
        s = _slot(item, mask)
        while slot_item[s] != item and slot_item[s] != _EMPTY:
            s = (s + np.uint64(1)) & mask
        if slot_item[s] == _EMPTY:
            slot_item[s] = item
            newest[s] = hist_ts[j]
        elif hist_ts[j] > newest[s]:
            newest[s] = hist_ts[j]
        a = hist_action[j]
        if 0 <= a < n_actions:
            counts[s, a] += 1
    for b in range(cand_item.shape[0]):
        item = cand_item[b]
        if item == 0:
            continue
        s = _slot(item, mask)
        while slot_item[s] != item and slot_item[s] != _EMPTY:
            s = (s + np.uint64(1)) & mask
        if slot_item[s] == _EMPTY:
            continue
        for a in range(n_actions):
            c = counts[s, a]
            if c:
                out[b, a] = math.log1p(float(c))
        out[b, n_actions] = 1.0
        hours = max(request_ts - newest[s], 0) / 3600.0
        out[b, n_actions + 1] = math.log1p(hours) / 10.0
