"""A bounded in-process LRU cache with a per-entry TTL.

Every ranking request reads a few hundred item-feature values that change only with a new
feature-set version, so the store keeps them here (keyed by version and item) and sends only the
misses to Redis. Pure and synchronous: the asyncio store calls it from one thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """LRU with at most `max_entries` entries, each valid for `ttl_seconds` after it was put.

    `max_entries == 0` disables the cache (every lookup misses, puts are dropped). Expired
    entries are removed when looked up, or evicted in LRU order when the cache is full.
    """

    __slots__ = ("_clock", "_data", "evictions", "hits", "max_entries", "misses", "ttl_seconds")

    def __init__(self, max_entries: int, ttl_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be > 0")
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def get_many(self, keys: Iterable[K]) -> tuple[list[V | None], list[int]]:
        """(values in key order, positions of the misses). A miss's value slot is None."""
        values: list[V | None] = []
        missing: list[int] = []
        data = self._data
        if not data:
            values = list(_none_iter(keys))
            missing = list(range(len(values)))
            self.misses += len(missing)
            return values, missing
        now = self._clock()
        for pos, key in enumerate(keys):
            entry = data.get(key)
            if entry is None:
                values.append(None)
                missing.append(pos)
            elif entry[0] <= now:
                del data[key]
                values.append(None)
                missing.append(pos)
            else:
                data.move_to_end(key)
                values.append(entry[1])
        self.misses += len(missing)
        self.hits += len(values) - len(missing)
        return values, missing

    def get(self, key: K) -> tuple[bool, V | None]:
        """(found, value)."""
        values, missing = self.get_many((key,))
        return (not missing), values[0]

    def put_many(self, items: Iterable[tuple[K, V]]) -> None:
        if not self.max_entries:
            return
        data = self._data
        expires = self._clock() + self.ttl_seconds
        for key, value in items:
            data[key] = (expires, value)
            data.move_to_end(key)
        overflow = len(data) - self.max_entries
        for _ in range(max(overflow, 0)):
            data.popitem(last=False)
        if overflow > 0:
            self.evictions += overflow

    def put(self, key: K, value: V) -> None:
        self.put_many(((key, value),))

    def clear(self) -> None:
        self._data.clear()


def _none_iter(keys: Iterable[object]) -> Iterable[None]:
    for _ in keys:
        yield None
