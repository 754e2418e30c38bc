"""The event log's pure parts: entry decoding, shards, event checks, and the batch encoding per user."""

from __future__ import annotations

import re

import numpy as np
import pytest

from feature_store import events as ev
from feature_store.codecs import decode_sequence
from feature_store.spec import stable_id_hash
from ingest.stream import user_appends

ACTIONS = ("click", "cart", "fav", "buy")


def entry(**fields: str) -> dict[bytes, bytes]:
    base = {"id": "e1", "u": "42", "i": "7", "a": "buy", "t": "1700000000"}
    base.update(fields)
    return {k.encode(): v.encode() for k, v in base.items() if v is not None}


def test_decode_reads_an_entry_as_requests_read_ids() -> None:
    assert ev.EntryDecoder(ACTIONS, ("int", "int")).decode(entry()) == (b"e1", 42, 7, 3, 1_700_000_000)
    strings = ev.EntryDecoder(ACTIONS, ("string", "string")).decode(entry(u="alice", i="sku-1"))
    assert strings[1:3] == tuple(int(x) for x in stable_id_hash(["alice", "sku-1"]))
    # an integer id of a string-id model is its decimal text, as in rank requests
    assert ev.EntryDecoder(ACTIONS, ("string", "int")).decode(entry(u="42"))[1] == int(stable_id_hash(["42"])[0])


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"id": None}, "'id' is missing"),
        ({"a": "teleport"}, "action 'teleport' is not one of"),
        ({"t": "soon"}, "t must be integer unix seconds"),
        ({"t": str(1 << 32)}, "t must be in 0.."),
        ({"u": "alice"}, "not an integer"),
        ({"u": "-3"}, "outside 0..2^63-1"),
        ({"i": str(1 << 63)}, "outside 0..2^63-1"),
        ({"id": "x" * 129}, "id must have 1-128 bytes"),
        ({"u": "x" * 300}, "u must have 1-256 characters"),
    ],
)
def test_decode_names_what_is_wrong(fields: dict[str, str], reason: str) -> None:
    with pytest.raises(ev.EventError, match=re.escape(reason)):
        ev.EntryDecoder(ACTIONS, ("int", "int")).decode(entry(**fields))


def test_check_event_is_the_producers_validation() -> None:
    good = ev.StreamEvent("e", 1, 2, "click", 5)
    ev.check_event(good, ACTIONS, ("int", "int"))
    for bad, needle in [
        (ev.StreamEvent("", 1, 2, "click", 5), "event_id"),
        (ev.StreamEvent("e", 1, 2, "impression", 5), "action 'impression'"),
        (ev.StreamEvent("e", 1, 2, "click", -1), "timestamp"),
        (ev.StreamEvent("e", "u", 2, "click", 5), "user_id"),
    ]:
        with pytest.raises(ev.EventError, match=needle):
            ev.check_event(bad, ACTIONS, ("int", "int"))


def test_shards_are_stable_and_spread() -> None:
    assert ev.shard_of("42", 8) == ev.shard_of(b"42", 8)
    counts = np.bincount([ev.shard_of(str(u), 8) for u in range(8000)], minlength=8)
    assert counts.min() > 800  # about 1,000 each
    assert ev.stream_key(3) == b"rs:ev:{s3}" and ev.lease_key(3) == b"rs:ev:{s3}:lease"
    with pytest.raises(ValueError, match=re.escape("1..1024")):
        ev.check_shards(0)


def test_user_appends_group_per_user_in_entry_order() -> None:
    decoded = [(b"a", 5, 10, 0, 100), (b"b", 3, 11, 1, 101), (b"c", 5, 12, 3, 102), (b"d", 3, 10, 2, 103)]
    items = {10: 1 << 24 | 7, 11: 2 << 24 | 8, 12: 0}  # index << 24 | category
    appends = user_appends(decoded, items)
    assert [a.user_id for a in appends] == [3, 5]
    assert [list(a.event_ids) for a in appends] == [[b"b", b"d"], [b"a", b"c"]]
    seq = decode_sequence(appends[1].records)
    np.testing.assert_array_equal(seq.item, [1, 0])
    np.testing.assert_array_equal(seq.category, [7, 0])
    np.testing.assert_array_equal(seq.action, [0, 3])
    np.testing.assert_array_equal(seq.timestamp, [100, 102])
