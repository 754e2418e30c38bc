"""The bounded, direct-mapped TTL cache used for item features (fixed-size values in numpy arrays)."""

from __future__ import annotations

import numpy as np
import pytest

from feature_store.cache import ItemCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rec(i: int) -> bytes:
    return np.array([i, i + 1], dtype="<u4").tobytes()  # 8 bytes, like codecs.ITEM_RECORD


def test_hits_misses_and_order() -> None:
    cache = ItemCache(1024, 5.0, 8, clock=FakeClock())
    values, missing = cache.get_many([1, 2, 3])
    assert values == [None, None, None] and missing == [0, 1, 2]
    cache.put_many([(1, rec(1)), (3, None)])  # None: a cached "known absent"
    values, missing = cache.get_many([3, 2, 1, 1])
    assert values == [None, None, rec(1), rec(1)] and missing == [1]
    assert cache.get(3) == (True, None) and cache.get(2) == (False, None)
    assert cache.hits == 4 and cache.misses == 5
    assert len(cache) == 2


def test_ttl_expiry() -> None:
    clock = FakeClock()
    cache = ItemCache(16, 5.0, 8, clock=clock)
    cache.put(7, rec(7))
    clock.now += 4.9
    assert cache.get(7) == (True, rec(7))
    clock.now += 0.2
    assert cache.get(7) == (False, None) and len(cache) == 0
    cache.put(7, rec(8))  # a put renews the entry and its TTL
    clock.now += 4.0
    assert cache.get(7) == (True, rec(8))


def test_bounded_and_collisions_replace() -> None:
    cache = ItemCache(1000, 60.0, 8, clock=FakeClock())  # 1024 slots
    ids = list(range(0, 50_000, 7))
    cache.put_many((i, rec(i)) for i in ids)
    assert len(cache) <= 1024 and cache.evictions >= len(ids) - 1024
    values, missing = cache.get_many(ids)
    hits = [i for i, v in zip(ids, values, strict=True) if v is not None]
    assert len(hits) == len(ids) - len(missing) > 500  # the hash spreads ids over most slots
    assert all(v == rec(i) for i, v in zip(ids, values, strict=True) if v is not None)  # never a wrong value
    cache.put_many((i, rec(i)) for i in (3, 5))
    assert cache.get_many([3, 5])[1] == []  # the newest put of a slot wins


def test_huge_and_extreme_ids() -> None:
    cache = ItemCache(64, 60.0, 8, clock=FakeClock())
    big = [(1 << 63) - 1, (1 << 62) + 12345, 0]
    cache.put_many((i, rec(n)) for n, i in enumerate(big))
    values, _ = cache.get_many(big)
    assert [v for v in values if v is not None] == [rec(n) for n, v in enumerate(values) if v is not None]


def test_wrong_sized_values_are_not_cached() -> None:
    cache = ItemCache(16, 60.0, 8, clock=FakeClock())
    cache.put_many([(1, b"short"), (2, rec(2))])
    assert cache.get(1) == (False, None) and cache.get(2) == (True, rec(2))


def test_disabled_cache_and_bad_arguments() -> None:
    cache = ItemCache(0, 1.0, 8)
    cache.put(1, rec(1))
    assert not cache.enabled and len(cache) == 0 and cache.get(1) == (False, None)
    single = ItemCache(1, 1.0, 8)
    single.put(5, rec(5))
    assert single.get(5) == (True, rec(5))
    for args in ((-1, 1.0, 8), (1, 0.0, 8), (1, 1.0, 0)):
        with pytest.raises(ValueError):
            ItemCache(*args)


def test_clear() -> None:
    cache = ItemCache(5, 1.0, 8)
    cache.put(1, rec(1))
    cache.clear()
    assert len(cache) == 0 and cache.get(1) == (False, None)


def test_two_ids_of_one_set_both_stay_and_the_older_makes_room() -> None:
    clock = FakeClock()
    cache = ItemCache(8, 60.0, 8, clock=clock)  # 8 slots, 4 sets of 2
    sets = cache._sets(np.arange(10_000, dtype=np.int64))
    a, b, c = (int(i) for i in np.flatnonzero(sets == sets[0])[:3])  # three ids of one set
    cache.put(a, rec(a))
    clock.now += 1
    cache.put(b, rec(b))
    assert cache.get(a) == (True, rec(a)) and cache.get(b) == (True, rec(b))  # both ways used
    clock.now += 1
    cache.put(c, rec(c))  # the set is full: a, written longer ago, makes room
    assert cache.get(a) == (False, None) and cache.get(b) == (True, rec(b)) and cache.get(c) == (True, rec(c))
    assert cache.evictions == 1


def test_value_size_from_the_first_value() -> None:
    """The store's caches do not know a version's side-tail width: the first value fixes the size."""
    cache = ItemCache(64, 5.0, None, clock=FakeClock())
    cache.put_many([(1, None)])  # "known absent" before any value: cached, size still open
    assert cache.value_size == 0 and cache.get(1) == (True, None)
    wide = rec(2) + bytes(range(12))  # an item record with a 12-byte side tail
    cache.put_many([(2, wide), (3, rec(3))])  # the 8-byte value is of another size: not cached
    assert cache.value_size == 20
    assert cache.get(2) == (True, wide) and cache.get(3) == (False, None)
    cache.put(4, b"")  # an empty value never fixes nor enters the cache
    assert cache.get(4) == (False, None)


def test_invalidate_drops_only_the_given_ids() -> None:
    clock = FakeClock()
    cache = ItemCache(1024, 60.0, 8, clock=clock)
    cache.put_many([(1, rec(1)), (2, rec(2)), (3, None)])
    assert cache.invalidate([2, 3, 99]) == 2  # 99 is not held: ignored
    assert cache.get(1) == (True, rec(1))
    assert cache.get(2) == (False, None) and cache.get(3) == (False, None)
    assert len(cache) == 1
    cache.put(2, rec(20))  # the freed slot takes the new value
    assert cache.get(2) == (True, rec(20))
    clock.now += 61.0  # an expired entry is not held: nothing to drop
    assert cache.invalidate(np.array([1, 2], dtype=np.int64)) == 0


def test_values_read_before_an_invalidation_are_not_cached() -> None:
    """A value read from Redis just before an upsert must not be put back after the upsert's
    invalidation (of an id held or not: the read in flight was about to put it)."""
    cache = ItemCache(1024, 60.0, 8, clock=FakeClock())
    read_at = cache.generation
    assert cache.invalidate([7]) == 0  # not held
    cache.put_many([(7, rec(7))], as_of=read_at)
    assert cache.get(7) == (False, None)
    read_at = cache.generation
    cache.clear()
    cache.put_many([(7, rec(7))], as_of=read_at)
    assert cache.get(7) == (False, None)
    cache.put_many([(7, rec(7))], as_of=cache.generation)  # read after both: cached
    assert cache.get(7) == (True, rec(7))


def test_invalidate_on_a_disabled_cache_does_nothing() -> None:
    cache = ItemCache(0, 60.0, 8)
    assert cache.invalidate([1, 2]) == 0


def test_get_rows_matches_get_many() -> None:
    cache = ItemCache(1024, 60.0, None)
    rows, held, missing = cache.get_rows([1, 2])
    assert rows is None and held.tolist() == [False, False] and missing == [0, 1]
    cache.put_many([(1, rec(1)), (3, None)])  # the first value fixes the size
    keys = [3, 2, 1, 1, 7]
    values, want_missing = cache.get_many(keys)
    rows, held, missing = cache.get_rows(keys)
    assert rows is not None and missing == want_missing == [1, 4]
    assert held.tolist() == [v is not None for v in values]
    assert [bytes(r) if h else None for r, h in zip(rows, held, strict=True)] == values
    assert not rows[~held].any()  # nothing but zeros where no value is held
    rows[2] = 0  # a copy: the caller cannot change the cache
    assert cache.get(1) == (True, rec(1))
