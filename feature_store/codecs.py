"""Binary codecs of the values the feature store keeps.

Lifelong behaviour sequence: 12-byte little-endian records, oldest first, so an online append
is a plain APPEND and the newest events are the tail:

    offset 0  u32  item index      (dense, 0 = unknown item)
    offset 4  u32  timestamp       (unix seconds, UTC)
    offset 8  u32  category index << 8 | action code

A 10,000-event sequence is 120,000 bytes and decodes with one zero-copy `np.frombuffer`.

User profile: u32 user index (dense, 0 = unknown). Item features: u32 item index, u32 category
index. All little-endian, fixed width, so a decode is a `frombuffer` and never a parse.
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


class CodecError(ValueError):
    """Stored bytes that cannot be decoded, or values that cannot be encoded."""


@dataclass(frozen=True, eq=False)
class Sequence:
    """A decoded behaviour sequence (chronological), as dense indices."""

    item: npt.NDArray[np.int64]
    category: npt.NDArray[np.int64]
    action: npt.NDArray[np.int64]
    timestamp: npt.NDArray[np.int64]

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
        return Sequence(self.item[:cut], self.category[:cut], self.action[:cut], self.timestamp[:cut])

    def last(self, n: int) -> Sequence:
        if len(self) <= n:
            return self
        return Sequence(self.item[-n:], self.category[-n:], self.action[-n:], self.timestamp[-n:])


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
