"""Value codecs: exact byte layouts and round trips."""

from __future__ import annotations

import numpy as np
import pytest

from feature_store.codecs import (
    SEQ_RECORD_SIZE,
    CodecError,
    Sequence,
    decode_item_values,
    decode_items,
    decode_profile,
    decode_sequence,
    encode_items,
    encode_profile,
    encode_sequence,
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
        item, cat, found = decode(mixed)
        np.testing.assert_array_equal(item, [0x0A0B0C0D, 0, 1, 0])
        np.testing.assert_array_equal(cat, [3, 0, 2, 0])
        np.testing.assert_array_equal(found, [True, False, True, False])
        assert item.dtype == np.int64 and found.dtype == np.bool_
    for decode in (decode_items, decode_item_values):
        empty = decode([])
        assert all(a.shape == (0,) for a in empty)


@pytest.mark.parametrize("bad", [[b"\x00" * 7, b"\x00" * 9], [b"\x00" * 8, b""], [b"\x00" * 16]])
def test_item_decoders_reject_wrong_sizes(bad: list[bytes | None]) -> None:
    for decode in (decode_items, decode_item_values):
        with pytest.raises(CodecError):
            decode(bad)


def test_sequence_empty_and_last() -> None:
    s = Sequence.empty()
    assert len(s) == 0 and len(s.last(5)) == 0
