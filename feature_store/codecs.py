"""Binary codecs of the values the feature store keeps.

Lifelong behaviour sequence: 12-byte little-endian records, oldest first, so an online append
is a plain APPEND and the newest events are the tail:

    offset 0  u32  item index      (dense, 0 = unknown item)
    offset 4  u32  timestamp       (unix seconds, UTC)
    offset 8  u32  category index << 8 | action code

A 10,000-event sequence is 120,000 bytes and decodes with one zero-copy `np.frombuffer`.

User profile: u32 user index (dense, 0 = unknown), then the user's side tail. Item features: u32
item index, u32 category index, then the item's side tail. All little-endian, fixed width per
version, so a decode is a `frombuffer` and never a parse.

Side tail (`encode_side` / `decode_side`): the side features of the user group (profile) or the
item group (item value) of the schema, `C` int32 per-feature codes (categorical features, spec
order) then `N` float32 normalized values (numeric features, spec order): 4*(C+N) bytes, empty
when the group has none. The store does not know C and N (it is schema-agnostic); the service
decodes the tails with the schema's widths. Every item of one version has the same tail length.

Behaviour clusters (`twin_v2`, optional): a header, the clusters' centroids, then one u16 cluster
id per event of the sequence, oldest first, for the oldest N events (events appended without an
id have none):

    offset 0   4 bytes   magic b"RSC2"
    offset 4   8 bytes   fingerprint of the GSU key and bias tables the clustering was computed with
    offset 12  u16       number of clusters C (ids are 0..C-1)
    offset 14  u16       centroid width D (the GSU key width plus the bias column)
    offset 16  u32       stamp: the first 4 bytes of blake2b(centroids), names this clustering
    offset 20  f32[C*D]  centroid of each cluster (mean augmented key at the clustering time)
    then       u16[N]    cluster id of event 0..N-1

The streaming consumer gives new events the id of their nearest centroid by appending to the
ids. The older format b"RSC1" (a 16-byte header: magic, fingerprint, C, u16 0; then the ids) has
no centroids; it is still read, and its appended events stay without an id until reclustered.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from itertools import repeat
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

SEQ_RECORD = np.dtype([("item", "<u4"), ("ts", "<u4"), ("cat_action", "<u4")])
SEQ_RECORD_SIZE = SEQ_RECORD.itemsize  # 12
PROFILE_RECORD = np.dtype([("user", "<u4")])
ITEM_RECORD = np.dtype([("item", "<u4"), ("category", "<u4")])
MAX_CATEGORY_INDEX = (1 << 24) - 1
CLUSTER_MAGIC = b"RSC2"
CLUSTER_MAGIC_V1 = b"RSC1"  # no centroids
CLUSTER_HEADER_SIZE = 20
CLUSTER_HEADER_SIZE_V1 = 16
CLUSTER_ENTRY_SIZE = 2
MAX_CLUSTERS = 0xFFFF
FINGERPRINT_SIZE = 8
SIDE_ENTRY_SIZE = 4  # one int32 code or one float32 value of a side tail
_INT32_MAX = (1 << 31) - 1


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


def encode_side(ids: npt.ArrayLike, values: npt.ArrayLike) -> list[bytes]:
    """Side tails of `n` rows: codes [n, C] (int, 0..2^31-1) as int32, then values [n, N] as float32.

    One `bytes` of 4*(C+N) bytes per row (b"" when C + N == 0), little-endian.
    """
    ids_a = np.asarray(ids, dtype=np.int64)
    values_a = np.asarray(values, dtype=np.float64)
    if ids_a.ndim != 2 or values_a.ndim != 2 or ids_a.shape[0] != values_a.shape[0]:
        raise CodecError(f"side ids {ids_a.shape} and values {values_a.shape} must be [n, C] and [n, N]")
    n, c = ids_a.shape
    width = SIDE_ENTRY_SIZE * (c + values_a.shape[1])
    if width == 0:
        return [b""] * n
    if ids_a.size and (ids_a.min() < 0 or ids_a.max() > _INT32_MAX):
        raise CodecError(f"side feature code out of range 0..{_INT32_MAX}")
    rows = np.empty((n, c + values_a.shape[1]), dtype="<i4")
    rows[:, :c] = ids_a
    rows[:, c:] = values_a.astype("<f4").view("<i4")
    raw = rows.tobytes()
    return [raw[k * width : (k + 1) * width] for k in range(n)]


def decode_side(
    tail: bytes | bytearray | memoryview | npt.NDArray[np.uint8], n_ids: int, n_values: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """(codes int64 [n, C], values float32 [n, N]) of side tails: one tail (bytes: n = 1) or rows
    uint8 [n, W]. Raises CodecError unless W == 4*(n_ids + n_values)."""
    if isinstance(tail, np.ndarray):
        rows = tail if tail.ndim == 2 else tail.reshape(1, -1)
    else:
        rows = np.frombuffer(tail, dtype=np.uint8).reshape(1, -1)
    width = SIDE_ENTRY_SIZE * (n_ids + n_values)
    if rows.shape[1] != width:
        raise CodecError(
            f"side tail has {rows.shape[1]} bytes, the schema's {n_ids} codes and {n_values} values need {width}"
        )
    if width == 0:
        return np.zeros((rows.shape[0], 0), dtype=np.int64), np.zeros((rows.shape[0], 0), dtype=np.float32)
    words = np.ascontiguousarray(rows, dtype=np.uint8).view("<i4")
    return words[:, :n_ids].astype(np.int64), words[:, n_ids:].view("<f4").astype(np.float32)


def _check_tail(tail: bytes, what: str) -> None:
    if len(tail) % SIDE_ENTRY_SIZE:
        raise CodecError(f"{what} side tail of {len(tail)} bytes is not whole {SIDE_ENTRY_SIZE}-byte entries")


def encode_profile(user_index: int, side: bytes = b"") -> bytes:
    """The profile value: u32 user index, then the user's side tail (`encode_side`)."""
    _check_tail(side, "profile")
    return np.array([(user_index,)], dtype=PROFILE_RECORD).tobytes() + side


def decode_profile_value(raw: bytes | None) -> tuple[int | None, bytes]:
    """(user index, side tail) of a profile value; (None, b"") for a missing profile."""
    if raw is None:
        return None, b""
    size = PROFILE_RECORD.itemsize
    if len(raw) < size or (len(raw) - size) % SIDE_ENTRY_SIZE:
        raise CodecError(
            f"profile value has {len(raw)} bytes, expected {size} plus whole {SIDE_ENTRY_SIZE}-byte side entries"
        )
    return int.from_bytes(raw[:size], "little"), bytes(raw[size:])  # u32 LE; a tenth of a frombuffer's cost


def decode_profile(raw: bytes | None) -> int | None:
    """The user index, or None for a missing profile (a side tail is ignored)."""
    return decode_profile_value(raw)[0]


def encode_items(
    item_index: npt.ArrayLike, category_index: npt.ArrayLike, side: SequenceABC[bytes] | None = None
) -> list[bytes]:
    """One value per item: item index, category index, then the item's side tail (all equally long)."""
    rec = np.empty(np.asarray(item_index).shape[0], dtype=ITEM_RECORD)
    rec["item"] = np.asarray(item_index, dtype=np.int64)
    rec["category"] = np.asarray(category_index, dtype=np.int64)
    raw = rec.tobytes()
    size = ITEM_RECORD.itemsize
    heads = [raw[k * size : (k + 1) * size] for k in range(rec.shape[0])]
    if side is None:
        return heads
    if len(side) != len(heads):
        raise CodecError(f"{len(side)} side tails for {len(heads)} items")
    widths = set(map(len, side))
    if len(widths) > 1:
        raise CodecError(f"item side tails must be equally long, got lengths {sorted(widths)[:5]}")
    if widths:
        _check_tail(side[0], "item")
    return [h + t for h, t in zip(heads, side, strict=True)]


class ItemValues(NamedTuple):
    """Decoded item values, in input order; misses are zeros (index 0, an all-zero side row)."""

    item: npt.NDArray[np.int64]
    category: npt.NDArray[np.int64]
    found: npt.NDArray[np.bool_]
    side: npt.NDArray[np.uint8]  # [n, W]: each item's side tail (W = 0: no tails)


def _name(k: int, ids: SequenceABC[int] | None) -> str:
    return f"item {ids[k]}" if ids is not None and k < len(ids) else f"item value {k}"


def decode_items(values: SequenceABC[bytes | None], ids: SequenceABC[int] | None = None) -> ItemValues:
    """Item values (`encode_items`) in input order, checked one by one; errors name the item
    (`ids[k]` when given). The reference decoder; the serving path uses `decode_item_values`."""
    n = len(values)
    head = ITEM_RECORD.itemsize
    size: int | None = None
    for k, v in enumerate(values):
        if v is None:
            continue
        if len(v) < head or (len(v) - head) % SIDE_ENTRY_SIZE:
            raise CodecError(
                f"{_name(k, ids)}: value has {len(v)} bytes, expected {head} plus whole "
                f"{SIDE_ENTRY_SIZE}-byte side entries"
            )
        if size is None:
            size = len(v)
        elif len(v) != size:
            raise CodecError(
                f"{_name(k, ids)}: value has {len(v)} bytes, other items of this version have {size} "
                "(side tails of one version must be equally long)"
            )
    size = size or head
    found = np.fromiter((v is not None for v in values), dtype=bool, count=n)
    buf = bytearray(n * size)
    for k, v in enumerate(values):
        if v is not None:
            buf[k * size : (k + 1) * size] = v
    rows = np.frombuffer(bytes(buf), dtype=np.uint8).reshape(n, size)
    rec = np.ascontiguousarray(rows[:, :head]).view(ITEM_RECORD).reshape(n)
    return ItemValues(rec["item"].astype(np.int64), rec["category"].astype(np.int64), found, rows[:, head:].copy())


def decode_item_values(values: SequenceABC[bytes | None], ids: SequenceABC[int] | None = None) -> ItemValues:
    """Same result as `decode_items`, with one join and one `frombuffer` instead of a per-item copy.

    The serving path decodes a few hundred item values per request; this keeps that to a few
    microseconds. Falls back to `decode_items` (which names the bad item) when a size is wrong.
    """
    n = len(values)
    head = ITEM_RECORD.itemsize
    if n == 0:
        z = np.zeros(0, dtype=np.int64)
        return ItemValues(z, z, np.zeros(0, dtype=bool), np.zeros((0, 0), dtype=np.uint8))
    found = np.fromiter(map(operator.is_not, values, repeat(None)), dtype=bool, count=n)
    # The set of lengths catches mixed sizes, the total (below) catches empty values.
    sizes = set(map(len, filter(None, values)))
    size = next(iter(sizes)) if sizes else head  # nothing found: records alone, no side tails
    if len(sizes) > 1 or size < head or (size - head) % SIDE_ENTRY_SIZE:
        return decode_items(values, ids)
    miss = bytes(size)
    joined = b"".join([miss if v is None else v for v in values])
    if len(joined) != n * size:
        return decode_items(values, ids)
    return decode_item_rows(np.frombuffer(joined, dtype=np.uint8).reshape(n, size), found)


def decode_item_rows(rows: npt.NDArray[np.uint8], found: npt.NDArray[np.bool_]) -> ItemValues:
    """`decode_item_values` of values laid out as rows [n, 8 + side width] (all-zero rows where not
    `found`, which the result keeps as its own), as the item cache holds them: no Python object
    per item."""
    width = rows.shape[1] - ITEM_RECORD.itemsize
    if width < 0 or width % SIDE_ENTRY_SIZE:
        raise CodecError(f"item rows of {rows.shape[1]} bytes: expected 8 plus whole 4-byte side entries")
    rec = np.ascontiguousarray(rows).view(_item_dtype(width)).reshape(rows.shape[0])
    return ItemValues(rec["item"].astype(np.int64), rec["category"].astype(np.int64), found, rec["side"].copy())


_ITEM_DTYPES: dict[int, np.dtype[np.void]] = {}


def _item_dtype(width: int) -> np.dtype[np.void]:
    """The record of an item value with a `width`-byte side tail (cached per width)."""
    dt = _ITEM_DTYPES.get(width)
    if dt is None:
        dt = np.dtype([("item", "<u4"), ("category", "<u4"), ("side", "u1", (width,))])
        _ITEM_DTYPES[width] = dt
    return dt


class ClusterHeader(NamedTuple):
    """The fixed part of a stored clustering: what the ids are about, and where they start."""

    fingerprint: bytes
    n_clusters: int
    width: int  # centroid width D; 0 for the old format, which stores no centroids
    stamp: bytes  # names the centroids (b"" for the old format)
    ids_offset: int  # bytes before the first cluster id


def cluster_stamp(centroids: npt.NDArray[np.float32]) -> bytes:
    """4 bytes naming a clustering's centroids: equal stamps, equal centroids (up to 2^-32)."""
    return hashlib.blake2b(np.ascontiguousarray(centroids, dtype="<f4").tobytes(), digest_size=4).digest()


def encode_clusters(assignment: npt.ArrayLike, n_clusters: int, fingerprint: bytes,
                    centroids: npt.ArrayLike | None = None) -> bytes:
    """The stored value of a user's behaviour clusters (see the module doc): ids of the oldest events,
    after the `centroids` [n_clusters, D] (the old centroid-less format when None)."""
    a = np.asarray(assignment, dtype=np.int64)
    if a.ndim != 1:
        raise CodecError("cluster assignment must be 1-D")
    if not 0 < n_clusters <= MAX_CLUSTERS:
        raise CodecError(f"number of clusters must be in 1..{MAX_CLUSTERS}, got {n_clusters}")
    if a.size and (a.min() < 0 or a.max() >= n_clusters):
        raise CodecError(f"cluster ids must be in 0..{n_clusters - 1}")
    if len(fingerprint) != FINGERPRINT_SIZE:
        raise CodecError(f"fingerprint must have {FINGERPRINT_SIZE} bytes, got {len(fingerprint)}")
    count = int(n_clusters).to_bytes(2, "little")
    ids = a.astype("<u2").tobytes()
    if centroids is None:
        return CLUSTER_MAGIC_V1 + fingerprint + count + bytes(2) + ids
    c = np.ascontiguousarray(centroids, dtype="<f4")
    if c.ndim != 2 or c.shape[0] != n_clusters or not 0 < c.shape[1] <= 0xFFFF:
        raise CodecError(f"centroids must be [{n_clusters}, D] with 0 < D <= 65535, got {list(c.shape)}")
    width = int(c.shape[1]).to_bytes(2, "little")
    return CLUSTER_MAGIC + fingerprint + count + width + cluster_stamp(c) + c.tobytes() + ids


def decode_cluster_header(raw: bytes | bytearray | memoryview) -> ClusterHeader:
    """The header of a stored clustering; `raw` needs only its first CLUSTER_HEADER_SIZE bytes."""
    magic = bytes(raw[:4])
    if magic == CLUSTER_MAGIC and len(raw) >= CLUSTER_HEADER_SIZE:
        n_clusters = int.from_bytes(raw[12:14], "little")
        width = int.from_bytes(raw[14:16], "little")
        return ClusterHeader(bytes(raw[4:12]), n_clusters, width, bytes(raw[16:20]),
                             CLUSTER_HEADER_SIZE + 4 * n_clusters * width)
    if magic == CLUSTER_MAGIC_V1 and len(raw) >= CLUSTER_HEADER_SIZE_V1:
        return ClusterHeader(bytes(raw[4:12]), int.from_bytes(raw[12:14], "little"), 0, b"", CLUSTER_HEADER_SIZE_V1)
    raise CodecError("cluster value has no RSC2 or RSC1 header")


def decode_centroids(header: ClusterHeader, block: bytes | bytearray | memoryview) -> npt.NDArray[np.float32]:
    """The centroids [C, D] from the bytes after the header (at least C * D * 4 of them)."""
    size = 4 * header.n_clusters * header.width
    if header.width == 0 or len(block) < size:
        raise CodecError(f"cluster value holds no centroids of {size} bytes")
    return np.frombuffer(block, dtype="<f4", count=header.n_clusters * header.width).reshape(
        header.n_clusters, header.width)


def decode_clusters(raw: bytes | bytearray | memoryview) -> tuple[npt.NDArray[np.int32], int, bytes]:
    """(cluster id per covered event, number of clusters, fingerprint) of a stored value."""
    header = decode_cluster_header(raw)
    if len(raw) < header.ids_offset or (len(raw) - header.ids_offset) % CLUSTER_ENTRY_SIZE:
        raise CodecError(f"cluster value of {len(raw)} bytes is not a header and centroids plus u16 entries")
    ids = np.frombuffer(raw, dtype="<u2", offset=header.ids_offset).astype(np.int32)
    return ids, header.n_clusters, header.fingerprint


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
