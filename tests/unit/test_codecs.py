"""Value codecs: exact byte layouts and round trips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feature_store.codecs import (
    SEQ_RECORD_SIZE,
    CodecError,
    Sequence,
    decode_item_rows,
    decode_item_values,
    decode_items,
    decode_profile,
    decode_profile_value,
    decode_sequence,
    decode_side,
    encode_items,
    encode_profile,
    encode_sequence,
    encode_side,
)


def test_sequence_record_layout_exact_bytes() -> None:
    raw = encode_sequence([7, 0x01020304], [5, 0xFFFFFF], [3, 0], [1_700_000_000, 1])
    assert SEQ_RECORD_SIZE == 12 and len(raw) == 24
    assert raw[:12] == (7).to_bytes(4, "little") + (1_700_000_000).to_bytes(4, "little") + ((5 << 8) | 3).to_bytes(
        4, "little"
    )
    assert raw[12:] == bytes.fromhex("04030201") + (1).to_bytes(4, "little") + bytes.fromhex("00ffffff")


def test_sequence_roundtrip_tail_and_filters() -> None:
    rng = np.random.default_rng(0)
    n = 1000
    item, cat, act = rng.integers(0, 2**32, n), rng.integers(0, 2**24, n), rng.integers(0, 4, n)
    ts = np.sort(rng.integers(0, 2**32, n))
    raw = encode_sequence(item, cat, act, ts)
    seq = decode_sequence(raw)
    for got, want in zip((seq.item, seq.category, seq.action, seq.timestamp), (item, cat, act, ts), strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int64
    # The newest k records are the byte tail: what GETRANGE -k*12 -1 returns.
    tail = decode_sequence(raw[-30 * SEQ_RECORD_SIZE :])
    np.testing.assert_array_equal(tail.item, seq.last(30).item)
    assert len(seq.before(int(ts[500]))) == int(np.searchsorted(ts, ts[500]))
    assert len(decode_sequence(b"")) == 0 and len(decode_sequence(None)) == 0
    appended = decode_sequence(raw + encode_sequence([1], [2], [3], [2**32 - 1]))  # APPEND = concatenation
    assert len(appended) == n + 1 and appended.item[-1] == 1 and appended.category[-1] == 2


@pytest.mark.parametrize(
    ("cols", "msg"),
    [
        (([-1], [0], [0], [0]), "item"),
        (([0], [2**24], [0], [0]), "category"),
        (([0], [0], [256], [0]), "action"),
        (([0], [0], [0], [2**32]), "timestamp"),
        (([0, 1], [0], [0], [0]), "equal length"),
    ],
)
def test_sequence_encode_rejects_out_of_range(cols: tuple[list[int], ...], msg: str) -> None:
    with pytest.raises(CodecError, match=msg):
        encode_sequence(*cols)


def test_sequence_decode_rejects_torn_records() -> None:
    with pytest.raises(CodecError, match="multiple of 12"):
        decode_sequence(b"\x00" * 13)


def test_profile_exact_bytes() -> None:
    assert encode_profile(0x01020304) == bytes.fromhex("04030201")
    assert decode_profile(encode_profile(77)) == 77
    assert decode_profile(None) is None
    with pytest.raises(CodecError):
        decode_profile(b"\x00" * 3)


def test_items_exact_bytes_and_both_decoders_agree() -> None:
    values = encode_items([1, 0x0A0B0C0D], [2, 3])
    assert values == [bytes.fromhex("01000000 02000000"), bytes.fromhex("0d0c0b0a 03000000")]
    mixed: list[bytes | None] = [values[1], None, values[0], None]
    for decode in (decode_items, decode_item_values):
        item, cat, found, side = decode(mixed)
        np.testing.assert_array_equal(item, [0x0A0B0C0D, 0, 1, 0])
        np.testing.assert_array_equal(cat, [3, 0, 2, 0])
        np.testing.assert_array_equal(found, [True, False, True, False])
        assert item.dtype == np.int64 and found.dtype == np.bool_
        assert side.shape == (4, 0) and side.dtype == np.uint8  # no tails: an empty side row per item
    for decode in (decode_items, decode_item_values):
        empty = decode([])
        assert all(a.shape[0] == 0 for a in empty)


@pytest.mark.parametrize(
    "bad",
    [
        [b"\x00" * 7, b"\x00" * 9],  # too short; not whole 4-byte side entries
        [b"\x00" * 8, b""],  # an empty value
        [b"\x00" * 10],  # a torn side entry
        [b"\x00" * 8, b"\x00" * 12],  # a tail on one item only
        [b"\x00" * 16, None, b"\x00" * 20],  # tails of two lengths in one version
    ],
)
def test_item_decoders_reject_wrong_sizes(bad: list[bytes | None]) -> None:
    for decode in (decode_items, decode_item_values):
        with pytest.raises(CodecError):
            decode(bad)


def test_item_tail_mismatch_names_the_item() -> None:
    tails = encode_side(np.array([[1, 2], [3, 4]]), np.zeros((2, 1)))
    values: list[bytes | None] = [*encode_items([1, 2], [1, 1], tails), encode_items([3], [1])[0]]
    for decode in (decode_items, decode_item_values):
        with pytest.raises(CodecError, match="item 777"):
            decode(values, [5, 6, 777])


def test_side_exact_bytes() -> None:
    (tail,) = encode_side(np.array([[1, 0x01020304]]), np.array([[1.5]]))
    assert tail == bytes.fromhex("01000000 04030201") + np.float32(1.5).astype("<f4").tobytes()
    ids, values = decode_side(tail, 2, 1)
    assert ids.tolist() == [[1, 0x01020304]] and values.tolist() == [[1.5]]
    assert ids.dtype == np.int64 and values.dtype == np.float32
    assert encode_side(np.zeros((3, 0)), np.zeros((3, 0))) == [b"", b"", b""]
    empty_ids, empty_values = decode_side(b"", 0, 0)
    assert empty_ids.shape == (1, 0) and empty_values.shape == (1, 0)


def test_side_wrong_width_and_range_raise() -> None:
    (tail,) = encode_side(np.array([[1, 2]]), np.array([[0.5]]))
    with pytest.raises(CodecError, match="12 bytes"):
        decode_side(tail, 2, 2)
    with pytest.raises(CodecError):
        decode_side(np.zeros((4, 8), dtype=np.uint8), 1, 0)
    with pytest.raises(CodecError, match="out of range"):
        encode_side(np.array([[-1]]), np.zeros((1, 0)))
    with pytest.raises(CodecError, match="out of range"):
        encode_side(np.array([[2**31]]), np.zeros((1, 0)))
    with pytest.raises(CodecError):
        encode_side(np.zeros((2, 1)), np.zeros((3, 1)))


def test_profile_with_tail() -> None:
    (tail,) = encode_side(np.array([[7, 8]]), np.array([[-0.25, 3.0]]))
    raw = encode_profile(0x01020304, tail)
    assert raw == bytes.fromhex("04030201") + tail
    assert decode_profile_value(raw) == (0x01020304, tail)
    assert decode_profile(raw) == 0x01020304
    assert decode_profile_value(None) == (None, b"")
    assert decode_profile_value(encode_profile(5)) == (5, b"")
    with pytest.raises(CodecError):
        decode_profile_value(raw + b"\x00")  # a torn side entry
    with pytest.raises(CodecError):
        encode_profile(1, b"\x00" * 3)


SIDE_CODES = st.integers(min_value=0, max_value=2**31 - 1)
SIDE_VALUES = st.floats(width=32, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=6),
    c=st.integers(min_value=0, max_value=4),
    m=st.integers(min_value=0, max_value=3),
    data=st.data(),
)
def test_side_roundtrip_property(n: int, c: int, m: int, data: st.DataObject) -> None:
    ids = np.asarray(data.draw(st.lists(st.lists(SIDE_CODES, min_size=c, max_size=c), min_size=n, max_size=n)),
                     dtype=np.int64).reshape(n, c)
    values = np.asarray(data.draw(st.lists(st.lists(SIDE_VALUES, min_size=m, max_size=m), min_size=n, max_size=n)),
                        dtype=np.float32).reshape(n, m)
    tails = encode_side(ids, values)
    assert len(tails) == n and all(len(t) == 4 * (c + m) for t in tails)
    rows = np.frombuffer(b"".join(tails), dtype=np.uint8).reshape(n, 4 * (c + m))
    got_ids, got_values = decode_side(rows, c, m)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_values, values)
    for k in range(n):  # one tail at a time, as a profile's
        one_ids, one_values = decode_side(tails[k], c, m)
        np.testing.assert_array_equal(one_ids[0], ids[k])
        np.testing.assert_array_equal(one_values[0], values[k])
    # Item values with and without the tails, found and missing mixed: both decoders agree.
    item = np.arange(n, dtype=np.int64) * 7 + 1
    cat = np.arange(n, dtype=np.int64) % 3
    miss = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    for with_tails in (False, True):
        encoded = encode_items(item, cat, tails if with_tails else None)
        stored: list[bytes | None] = [None if gone else v for v, gone in zip(encoded, miss, strict=True)]
        found = ~np.asarray(miss, dtype=bool).reshape(n)
        for decode in (decode_items, decode_item_values):
            got = decode(stored)
            np.testing.assert_array_equal(got.found, found)
            np.testing.assert_array_equal(got.item, np.where(found, item, 0))
            np.testing.assert_array_equal(got.category, np.where(found, cat, 0))
            if with_tails and c + m and found.any():
                assert got.side.shape == (n, 4 * (c + m))
                np.testing.assert_array_equal(got.side[found], rows[found])
                assert not got.side[~found].any()  # misses: all-zero rows
                side_ids, side_values = decode_side(got.side[found], c, m)
                np.testing.assert_array_equal(side_ids, ids[found])
                np.testing.assert_array_equal(side_values, values[found])
            else:
                assert got.side.shape == (n, 0)


def test_sequence_empty_and_last() -> None:
    s = Sequence.empty()
    assert len(s) == 0 and len(s.last(5)) == 0


def test_item_rows_decode_as_the_values_do_and_merge_with_fetched_ones() -> None:
    from feature_store.redis_store import _merge_items

    tails = encode_side(np.array([[1, 2], [3, 4], [5, 6]]), np.array([[0.5], [1.5], [2.5]]))
    values: list[bytes | None] = list(encode_items([10, 20, 30], [1, 2, 3], tails))
    width = len(values[0] or b"")
    rows = np.zeros((4, width), dtype=np.uint8)
    held = np.array([True, False, True, False])
    rows[0], rows[2] = np.frombuffer(values[0] or b"", np.uint8), np.frombuffer(values[2] or b"", np.uint8)
    want = decode_item_values([values[0], None, values[2], None])
    for got, expected in zip(decode_item_rows(rows, held), want, strict=True):
        np.testing.assert_array_equal(got, expected)

    # positions 1 and 3 missed the cache: one fetched value, one absent in the store
    merged = _merge_items([5, 6, 7, 8], rows, held, [1, 3], [values[1], None])
    for got, expected in zip(merged, decode_item_values([values[0], values[1], values[2], None]), strict=True):
        np.testing.assert_array_equal(got, expected)
    untailed = encode_items([40], [4])[0]  # another size than the cached rows: named, as by the decoders
    with pytest.raises(CodecError, match="item 8"):
        _merge_items([5, 6, 7, 8], rows, held, [3], [untailed])
