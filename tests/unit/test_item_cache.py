"""The bounded TTL + LRU cache used for item features."""

from __future__ import annotations

import pytest

from feature_store.cache import TTLCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hits_misses_and_order() -> None:
    cache: TTLCache[int, bytes | None] = TTLCache(10, 5.0, clock=FakeClock())
    values, missing = cache.get_many([1, 2, 3])
    assert values == [None, None, None] and missing == [0, 1, 2]
    cache.put_many([(1, b"a"), (3, None)])  # None: a cached "known missing"
    values, missing = cache.get_many([3, 2, 1, 1])
    assert values == [None, None, b"a", b"a"] and missing == [1]
    assert cache.get(3) == (True, None) and cache.get(2) == (False, None)
    assert cache.hits == 4 and cache.misses == 5


def test_ttl_expiry() -> None:
    clock = FakeClock()
    cache: TTLCache[str, int] = TTLCache(10, 5.0, clock=clock)
    cache.put("a", 1)
    clock.now += 4.9
    assert cache.get("a") == (True, 1)
    clock.now += 0.2
    assert cache.get("a") == (False, None)
    assert len(cache) == 0  # expired entries are removed on lookup
    cache.put("a", 2)  # a put renews the TTL
    clock.now += 4.0
    assert cache.get("a") == (True, 2)


def test_lru_eviction_bound() -> None:
    cache: TTLCache[int, int] = TTLCache(3, 60.0, clock=FakeClock())
    cache.put_many([(1, 1), (2, 2), (3, 3)])
    assert cache.get(1) == (True, 1)  # 1 is now the most recently used
    cache.put(4, 4)  # evicts 2, the least recently used
    assert len(cache) == 3 and cache.evictions == 1
    assert cache.get(2) == (False, None)
    assert [cache.get(k)[0] for k in (1, 3, 4)] == [True, True, True]
    cache.put_many((k, k) for k in range(100, 110))
    assert len(cache) == 3 and cache.evictions == 11
    assert cache.get_many([107, 108, 109])[1] == []


def test_disabled_cache_and_bad_arguments() -> None:
    cache: TTLCache[int, int] = TTLCache(0, 1.0)
    cache.put(1, 1)
    assert not cache.enabled and len(cache) == 0 and cache.get(1) == (False, None)
    with pytest.raises(ValueError):
        TTLCache(-1, 1.0)
    with pytest.raises(ValueError):
        TTLCache(1, 0.0)


def test_clear() -> None:
    cache: TTLCache[int, int] = TTLCache(5, 1.0)
    cache.put(1, 1)
    cache.clear()
    assert len(cache) == 0
