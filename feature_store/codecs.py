"""Binary codecs of the values the feature store keeps.

Lifelong behaviour sequence: 12-byte little-endian records, oldest first, so an online append
is a plain APPEND and the newest events are the tail:

    offset 0  u32  item index      (dense, 0 = unknown item)
    offset 4  u32  timestamp       (unix seconds, UTC)
    offset 8  u32  category index << 8 | action code

A 10,000-event sequence is 120,000 bytes and decodes with one zero-copy `np.frombuffer`.

User profile: u32 user index (dense, 0 = unknown). Item features: u32 item index, u32 category
index. All little-endian, fixed width, so a decode is a `frombuffer` and never a parse.

Behaviour clusters (`twin_v2`, optional): a 16-byte header, then one u16 cluster id per event of
the sequence, oldest first, for the oldest N events (events appended later have none):

    offset 0   4 bytes  magic b"RSC1"
    offset 4   8 bytes  fingerprint of the GSU key and bias tables the clustering was computed with
    offset 12  u16      number of clusters C (ids are 0..C-1)
    offset 14  u16      reserved (0)
    offset 16  u16[N]   cluster id of event 0..N-1
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import numpy.typing as npt

SEQ_RECORD = np.dtype([("item", "<u4"), ("ts", "<u4"), ("cat_action", "<u4")])
SEQ_RECORD_SIZE = SEQ_RECORD.itemsize  # 12
PROFILE_RECORD = np.dtype([("user", "<u4")])
ITEM_RECORD = np.dtype([("item", "<u4"), ("category", "<u4")])
MAX_CATEGORY_INDEX = (1 << 24) - 1
CLUSTER_MAGIC = b"RSC1"
CLUSTER_HEADER_SIZE = 16
CLUSTER_ENTRY_SIZE = 2
MAX_CLUSTERS = 0xFFFF
FINGERPRINT_SIZE = 8


class CodecError(ValueError):
    """Stored bytes that cannot be decoded, or values that cannot be encoded."""


@dataclass(frozen=True, eq=False)
class SequenceClusters:
    """Each event's behaviour cluster (`twin_v2`), aligned with a `Sequence`'s events.

    assignment[j] is the cluster id (0..n_clusters-1) of event j, or -1 for an event the
    clustering does not cover (appended after it). `fingerprint` identifies the GSU tables the
    clustering was computed with (`feature_store.clusters.key_fingerprint`), so a clustering made
    for other tables is recognised as stale.
    """

    assignment: npt.NDArray[np.int32]
    n_clusters: int
    fingerprint: bytes

    def head(self, n: int) -> SequenceClusters:
        return SequenceClusters(self.assignment[:n], self.n_clusters, self.fingerprint)

    def tail(self, n: int) -> SequenceClusters:
        return SequenceClusters(self.assignment[-n:] if n else self.assignment[:0], self.n_clusters, self.fingerprint)


@dataclass(frozen=True, eq=False)
class Sequence:
    """A decoded behaviour sequence (chronological), as dense indices; `clusters` when stored."""

    item: npt.NDArray[np.int64]
    category: npt.NDArray[np.int64]
    action: npt.NDArray[np.int64]
    timestamp: npt.NDArray[np.int64]
    clusters: SequenceClusters | None = None

    def __len__(self) -> int:
        return int(self.item.shape[0])

    @classmethod
    def empty(cls) -> Sequence:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z, z)

    def before(self, ts: int) -> Sequence:
        """Events strictly before `ts` (the sequence is chronological)."""
        cut = int(np.searchsorted(self.timestamp, ts, side="left"))
        if cut == len(self):
            return self
        clusters = self.clusters.head(cut) if self.clusters is not None else None
        return Sequence(self.item[:cut], self.category[:cut], self.action[:cut], self.timestamp[:cut], clusters)

    def last(self, n: int) -> Sequence:
        if len(self) <= n:
            return self
        clusters = self.clusters.tail(n) if self.clusters is not None else None
        return Sequence(self.item[-n:], self.category[-n:], self.action[-n:], self.timestamp[-n:], clusters)

    def with_clusters(self, clusters: SequenceClusters | None) -> Sequence:
        """The same events with `clusters` (whose assignment must have one entry per event)."""
        if clusters is not None and clusters.assignment.shape != (len(self),):
            raise CodecError(f"clusters cover {clusters.assignment.shape[0]} events, the sequence has {len(self)}")
        return Sequence(self.item, self.category, self.action, self.timestamp, clusters)


def encode_sequence(
    item: npt.ArrayLike, category: npt.ArrayLike, action: npt.ArrayLike, timestamp: npt.ArrayLike
) -> bytes:
    item_a = np.asarray(item, dtype=np.int64)
    cat_a = np.asarray(category, dtype=np.int64)
    act_a = np.asarray(action, dtype=np.int64)
    ts_a = np.asarray(timestamp, dtype=np.int64)
    if not (item_a.shape == cat_a.shape == act_a.shape == ts_a.shape) or item_a.ndim != 1:
        raise CodecError("sequence columns must be 1-D and of equal length")
    if item_a.size:
        if item_a.min() < 0 or item_a.max() > 0xFFFFFFFF:
            raise CodecError("item index out of u32 range")
        if cat_a.min() < 0 or cat_a.max() > MAX_CATEGORY_INDEX:
            raise CodecError(f"category index out of range 0..{MAX_CATEGORY_INDEX}")
        if act_a.min() < 0 or act_a.max() > 0xFF:
            raise CodecError("action code out of range 0..255")
        if ts_a.min() < 0 or ts_a.max() > 0xFFFFFFFF:
            raise CodecError("timestamp out of u32 range")
    rec = np.empty(item_a.shape[0], dtype=SEQ_RECORD)
    rec["item"] = item_a
    rec["ts"] = ts_a
    rec["cat_action"] = (cat_a << 8) | act_a
    return rec.tobytes()


def decode_sequence(raw: bytes | bytearray | memoryview | None) -> Sequence:
    if not raw:
        return Sequence.empty()
    if len(raw) % SEQ_RECORD_SIZE:
        raise CodecError(f"sequence value of {len(raw)} bytes is not a multiple of {SEQ_RECORD_SIZE}")
    rec = np.frombuffer(raw, dtype=SEQ_RECORD)
    cat_action = rec["cat_action"].astype(np.int64)
    return Sequence(
        item=rec["item"].astype(np.int64),
        category=cat_action >> 8,
        action=cat_action & 0xFF,
        timestamp=rec["ts"].astype(np.int64),
    )


def encode_profile(user_index: int) -> bytes:
    return np.array([(user_index,)], dtype=PROFILE_RECORD).tobytes()


def decode_profile(raw: bytes | None) -> int | None:
    """The user index, or None for a missing profile."""
    if raw is None:
        return None
    if len(raw) != PROFILE_RECORD.itemsize:
        raise CodecError(f"profile value has {len(raw)} bytes, expected {PROFILE_RECORD.itemsize}")
    return int.from_bytes(raw, "little")  # u32 LE; a tenth of the cost of a frombuffer


def encode_items(item_index: npt.ArrayLike, category_index: npt.ArrayLike) -> list[bytes]:
    """One value per item."""
    rec = np.empty(np.asarray(item_index).shape[0], dtype=ITEM_RECORD)
    rec["item"] = np.asarray(item_index, dtype=np.int64)
    rec["category"] = np.asarray(category_index, dtype=np.int64)
    raw = rec.tobytes()
    size = ITEM_RECORD.itemsize
    return [raw[k * size : (k + 1) * size] for k in range(rec.shape[0])]


def decode_items(
    values: list[bytes | None],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """(item index, category index, found) in input order; misses decode to index 0."""
    n = len(values)
    size = ITEM_RECORD.itemsize
    found = np.fromiter((v is not None for v in values), dtype=bool, count=n)
    buf = bytearray(n * size)
    for k, v in enumerate(values):
        if v is not None:
            if len(v) != size:
                raise CodecError(f"item value has {len(v)} bytes, expected {size}")
            buf[k * size : (k + 1) * size] = v
    rec = np.frombuffer(bytes(buf), dtype=ITEM_RECORD)
    return rec["item"].astype(np.int64), rec["category"].astype(np.int64), found


_ITEM_MISS = bytes(ITEM_RECORD.itemsize)


def decode_item_values(
    values: list[bytes | None],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Same result as `decode_items`, with one join and one `frombuffer` instead of a per-item copy.

    The serving path decodes a few hundred item values per request; this keeps that to a few
    microseconds. Falls back to `decode_items` (which names the bad value) when a size is wrong.
    """
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    found = np.fromiter(map(operator.is_not, values, repeat(None)), dtype=bool, count=n)
    joined = b"".join([_ITEM_MISS if v is None else v for v in values])
    # The total catches empty values, the set of lengths catches a short value offset by a long one.
    if len(joined) != n * ITEM_RECORD.itemsize or not set(map(len, filter(None, values))) <= {ITEM_RECORD.itemsize}:
        return decode_items(values)
    rec = np.frombuffer(joined, dtype=ITEM_RECORD)
    return rec["item"].astype(np.int64), rec["category"].astype(np.int64), found


def encode_clusters(assignment: npt.ArrayLike, n_clusters: int, fingerprint: bytes) -> bytes:
    """The stored value of a user's behaviour clusters (see the module doc): ids of the oldest events."""
    a = np.asarray(assignment, dtype=np.int64)
    if a.ndim != 1:
        raise CodecError("cluster assignment must be 1-D")
    if not 0 < n_clusters <= MAX_CLUSTERS:
        raise CodecError(f"number of clusters must be in 1..{MAX_CLUSTERS}, got {n_clusters}")
    if a.size and (a.min() < 0 or a.max() >= n_clusters):
        raise CodecError(f"cluster ids must be in 0..{n_clusters - 1}")
    if len(fingerprint) != FINGERPRINT_SIZE:
        raise CodecError(f"fingerprint must have {FINGERPRINT_SIZE} bytes, got {len(fingerprint)}")
    header = CLUSTER_MAGIC + fingerprint + int(n_clusters).to_bytes(2, "little") + bytes(2)
    return header + a.astype("<u2").tobytes()


def decode_clusters(raw: bytes | bytearray | memoryview) -> tuple[npt.NDArray[np.int32], int, bytes]:
    """(cluster id per covered event, number of clusters, fingerprint) of a stored value."""
    if len(raw) < CLUSTER_HEADER_SIZE or bytes(raw[:4]) != CLUSTER_MAGIC:
        raise CodecError("cluster value has no RSC1 header")
    if (len(raw) - CLUSTER_HEADER_SIZE) % CLUSTER_ENTRY_SIZE:
        raise CodecError(f"cluster value of {len(raw)} bytes is not a header plus u16 entries")
    fingerprint = bytes(raw[4:12])
    n_clusters = int.from_bytes(raw[12:14], "little")
    ids = np.frombuffer(raw, dtype="<u2", offset=CLUSTER_HEADER_SIZE).astype(np.int32)
    return ids, n_clusters, fingerprint


def align_clusters(raw: bytes | None, stored_events: int, fetched_events: int) -> SequenceClusters | None:
    """The clusters of the newest `fetched_events` of a sequence that stores `stored_events`.

    The stored ids cover the oldest N events of the stored sequence (the append script trims them
    in step with the sequence); events past N get -1. None when nothing is stored, or when the
    value covers more events than the sequence holds (it does not belong to this sequence).
    """
    if raw is None:
        return None
    ids, n_clusters, fingerprint = decode_clusters(raw)
    if ids.shape[0] > stored_events or fetched_events > stored_events or n_clusters == 0:
        return None
    first = stored_events - fetched_events  # stored position of the first fetched event
    out = np.full(fetched_events, -1, dtype=np.int32)
    covered = max(0, min(ids.shape[0] - first, fetched_events))
    if covered:
        out[:covered] = ids[first : first + covered]
    return SequenceClusters(out, n_clusters, fingerprint)
