"""A bounded in-process cache of item-feature values, with a per-entry TTL, held in numpy arrays.

Every ranking request reads a few hundred item-feature values that change only with a new
feature-set version, so the store keeps them here (keyed by version and item) and sends only the
misses to Redis. The values of one version are fixed-size records (`codecs.ITEM_RECORD`, then
the item's side tail, equally long for every item of the version), so the cache holds them in
preallocated arrays rather than as Python objects: 17 bytes a slot plus the value size (25
without side features), zero pages until written, a fraction of what an LRU of dict entries takes
in every worker process (docs/PERFORMANCE.md). The value size is given, or taken from the first
value put (the store's caches: it does not know the schema's side-feature widths).

Staleness: an entry serves for `ttl_seconds` after it was put. A value rewritten in Redis by
`rankserve ingest --upsert-items` is also announced on the version's item change log, and the
store drops the announced ids (`invalidate`) when it reads the log (`item_changes_poll_s`); the
TTL (`item_cache_ttl_s`, default 60 s) is the bound when the log cannot be read.

It is 2-way set-associative: an id hashes (multiplicatively) to a set of two slots; a put takes
the id's own slot, else a free or expired one, else the one written longer ago. On a Zipf stream
over 1M items it hits as often as an LRU of the same size (0.83 both); a uniformly used hot set
fills it less evenly: 100k / 150k / 200k hot items hit 0.93 / 0.87 / 0.80 (LRU 1.0 / 1.0 /
0.997), so size it at about twice such a hot set. Pure and synchronous: the asyncio store calls
it from one thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads consecutive ids over the slots


class ItemCache:
    """Values of `value_size` bytes (or None: "known absent") for non-negative int ids.

    `max_entries` slots (rounded up to a power of two), each entry valid for `ttl_seconds` after
    it was put. `max_entries == 0` disables the cache (every lookup misses, puts are
    dropped). `value_size` None: the size of the first value put. A value of another size is not
    cached (the decoder reports it).
    """

    __slots__ = ("_absent", "_clock", "_expires", "_keys", "_shift", "_values", "_void", "_ways", "evictions",
                 "generation", "hits", "max_entries", "misses", "ttl_seconds", "value_size")

    def __init__(
        self,
        max_entries: int,
        ttl_seconds: float,
        value_size: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be > 0")
        if value_size is not None and value_size <= 0:
            raise ValueError("value_size must be > 0")
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self.value_size = value_size or 0  # 0: not known yet
        self._clock = clock
        bits = (max_entries - 1).bit_length() if max_entries > 1 else int(max_entries)
        capacity = (1 << bits) if max_entries else 0
        self._ways = 2 if capacity >= 2 else 1  # two slots per set: colliding hot ids can both stay
        self._shift = np.uint64(64 - (bits - (self._ways - 1)))
        # all zeros: the pages are the kernel's zero pages until written, so an unused cache costs
        # nothing; a slot is live while its expiry is ahead (never-written slots expire at 0)
        self._keys = np.zeros(capacity, dtype=np.int64)
        self._expires = np.zeros(capacity, dtype=np.float64)
        self._absent = np.zeros(capacity, dtype=bool)
        self._values = np.zeros((capacity, self.value_size), dtype=np.uint8)
        self._void = np.dtype((np.void, max(self.value_size, 1)))
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        # counts `invalidate` and `clear` calls: values read from Redis before one of them may be
        # older than what it dropped, so `put_many(..., as_of=)` does not cache them
        self.generation = 0

    def __len__(self) -> int:
        """Entries stored and not yet expired."""
        return int(np.count_nonzero(self._expires > self._clock()))

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def _sets(self, ids: np.ndarray) -> np.ndarray:
        """The first slot of each id's set (its ways are that slot and the next)."""
        if self._keys.shape[0] <= self._ways:  # a single set
            return np.zeros(ids.shape[0], dtype=np.intp)
        return ((ids.astype(np.uint64) * _GOLDEN) >> self._shift).astype(np.intp) * self._ways

    def _lookup(self, ids: np.ndarray, now: float) -> tuple[np.ndarray, np.ndarray]:
        """(slot of each id, whether it holds the id and is live)."""
        base = self._sets(ids)
        hit = (self._keys[base] == ids) & (self._expires[base] > now)
        if self._ways == 1:
            return base, hit
        other = base + 1
        hit_other = (self._keys[other] == ids) & (self._expires[other] > now)
        return np.where(hit, base, other), hit | hit_other

    def _victims(self, ids: np.ndarray, now: float) -> np.ndarray:
        """Where each id goes: its own slot if held, else a dead way, else the way written longer ago."""
        base = self._sets(ids)
        if self._ways == 1:
            return base
        other = base + 1
        k0, k1 = self._keys[base], self._keys[other]
        e0, e1 = self._expires[base], self._expires[other]
        conditions = [k0 == ids, k1 == ids, e0 <= now, e1 <= now, e1 < e0]
        return np.select(conditions, [base, other, base, other, other], default=base)

    def get_many(self, keys: Sequence[int]) -> tuple[list[bytes | None], list[int]]:
        """(values in key order, positions of the misses). A miss's value slot is None."""
        rows, held, missing = self.get_rows(keys)
        out = np.full(len(keys), None, dtype=object)
        if rows is not None and held.any():
            # a void view turns each record row into one bytes object in C, no Python loop per entry
            out[held] = rows[held].view(self._void).ravel().tolist()
        values: list[bytes | None] = out.tolist()
        return values, missing

    def get_rows(self, keys: Sequence[int]) -> tuple[np.ndarray | None, np.ndarray, list[int]]:
        """`get_many` as arrays, with no Python object per entry: (the held values' rows [n,
        value_size] uint8, zeros where no value is held, or None while the size is unknown;
        whether each key has a value held; the positions of the misses)."""
        n = len(keys)
        if not self.enabled or n == 0:
            self.misses += n
            return None, np.zeros(n, dtype=bool), list(range(n))
        ids = np.asarray(keys, dtype=np.int64)
        slots, hit = self._lookup(ids, self._clock())
        present = hit & ~self._absent[slots]
        missing = np.flatnonzero(~hit).tolist()
        self.misses += len(missing)
        self.hits += n - len(missing)
        if not self.value_size:
            return None, present, missing
        rows = self._values[slots]  # a copy: the cache's own rows may be rewritten by the next put
        rows[~present] = 0
        return rows, present, missing

    def put_many(self, items: Iterable[tuple[int, bytes | None]], *, as_of: int | None = None) -> None:
        """Cache `items`. `as_of`: the `generation` when the values were read; if an invalidation
        came since, nothing is cached (a value read just before an upsert would otherwise be put
        back after the upsert's invalidation, and served stale until its TTL)."""
        if not self.enabled or (as_of is not None and as_of != self.generation):
            return
        entries = list(items)
        if not self.value_size:
            self._size_from(entries)
        size = self.value_size  # 0 until a non-empty value fixed it: values are not cached then
        pairs = [(k, v) for k, v in entries if v is None or (size and len(v) == size)]
        if not pairs:
            return
        ids = np.fromiter((k for k, _ in pairs), dtype=np.int64, count=len(pairs))
        now = self._clock()
        slots = self._victims(ids, now)
        uniq, first = np.unique(slots, return_index=True)
        held = self._keys[uniq]
        occupied = (held != ids[first]) & (self._expires[uniq] > now)
        # live entries replaced, plus the batch's own ids that share a slot (the last put wins)
        self.evictions += int(np.count_nonzero(occupied)) + slots.shape[0] - uniq.shape[0]
        self._keys[slots] = ids  # with repeated slots numpy keeps the last write, in every array alike
        self._expires[slots] = now + self.ttl_seconds
        absent = np.fromiter((v is None for _, v in pairs), dtype=bool, count=len(pairs))
        self._absent[slots] = absent
        present = np.flatnonzero(~absent)
        if present.size:
            blob = b"".join(v for _, v in pairs if v is not None)
            self._values[slots[present]] = np.frombuffer(blob, dtype=np.uint8).reshape(-1, self.value_size)

    def _size_from(self, items: list[tuple[int, bytes | None]]) -> None:
        """Fix the value size to that of the first value in `items` (the value array's pages are
        the kernel's zero pages until written, as at construction)."""
        size = next((len(v) for _, v in items if v), 0)
        if size:
            self.value_size = size
            self._values = np.zeros((self._keys.shape[0], size), dtype=np.uint8)
            self._void = np.dtype((np.void, size))

    def invalidate(self, keys: Sequence[int] | np.ndarray) -> int:
        """Drop the entries of `keys` (ids not held are ignored); the number of live entries dropped."""
        if not self.enabled or len(keys) == 0:
            return 0
        self.generation += 1  # also when nothing is held: a read in flight may be about to put it
        ids = np.asarray(keys, dtype=np.int64)
        now = self._clock()
        slots, hit = self._lookup(ids, now)
        held = np.unique(slots[hit])
        self._expires[held] = 0.0  # never-written slots expire at 0 too: the slot is free again
        return int(held.shape[0])

    def get(self, key: int) -> tuple[bool, bytes | None]:
        """(found, value)."""
        values, missing = self.get_many((key,))
        return (not missing), values[0]

    def put(self, key: int, value: bytes | None) -> None:
        self.put_many(((key, value),))

    def clear(self) -> None:
        self.generation += 1
        self._expires.fill(0.0)
