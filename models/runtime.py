"""Process-level tuning for training and evaluation."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("rankserve.runtime")

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


# mallopt refuses an mmap threshold above 4 * 1024 * 1024 * sizeof(long) = 32 MiB on 64-bit glibc
MAX_MMAP_THRESHOLD = 32 << 20


def tune_malloc(threshold_bytes: int = MAX_MMAP_THRESHOLD, trim_bytes: int = 1 << 30) -> bool:
    """Keep large tensors on the heap instead of fresh mmaps.

    A training step allocates and frees tensors of tens of MB. Above glibc's mmap threshold
    each one is a new mapping whose pages fault in again on every step, which made Tmall steps an
    order of magnitude slower (docs/PERFORMANCE.md). A no-op (returns False) where glibc is not the allocator.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, min(threshold_bytes, MAX_MMAP_THRESHOLD))) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes)
        )
    except (OSError, AttributeError):
        return False
    log.debug("malloc thresholds raised", extra={"bytes": threshold_bytes, "ok": ok})
    return ok
