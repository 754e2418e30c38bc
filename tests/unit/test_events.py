"""The event log's pure parts: entry decoding, shards, event checks, and the batch encoding per user."""

from __future__ import annotations

import json
import re

import numpy as np
import orjson
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


def packed(*rows: object) -> dict[bytes, bytes]:
    return {ev.FIELD_EVENTS: orjson.dumps(list(rows))}


def test_a_packed_entry_decodes_as_its_events_one_by_one() -> None:
    ints = ev.EntryDecoder(ACTIONS, ("int", "int"))
    out: list[ev.DecodedEvent] = []
    assert ints.decode_into(packed(["e1", 42, 7, "buy", 1_700_000_000], ["e2", "43", "8", "click", 5]), out) == []
    # each as its one-event entry reads: JSON integers and integer text alike
    assert out == [ints.decode(entry()), ints.decode(entry(id="e2", u="43", i="8", a="click", t="5"))]
    strings = ev.EntryDecoder(ACTIONS, ("string", "string"))
    out = []
    assert strings.decode_into(packed(["e1", "alice", 42, "buy", 1]), out) == []
    assert out[0][1:3] == tuple(int(x) for x in stable_id_hash(["alice", "42"]))
    # a one-event entry through the same door
    out = []
    assert ints.decode_into(entry(), out) == [] and out == [ints.decode(entry())]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (["e", 1, 2, "click"], "an event must be [id, user, item, action, t]"),
        ({"id": "e"}, "an event must be [id, user, item, action, t]"),
        ([7, 1, 2, "click", 5], "id must be a string"),
        (["x" * 129, 1, 2, "click", 5], "id must have 1-128 bytes"),
        (["", 1, 2, "click", 5], "id must have 1-128 bytes"),
        (["e", 1, 2, "teleport", 5], "action 'teleport' is not one of"),
        (["e", 1, 2, None, 5], "action None is not one of"),
        (["e", 1, 2, "click", "soon"], "t must be integer unix seconds"),
        (["e", 1, 2, "click", 1.5], "t must be integer unix seconds"),
        (["e", 1, 2, "click", 1 << 32], "t must be in 0.."),
        (["e", "alice", 2, "click", 5], "not an integer"),
        (["e", -3, 2, "click", 5], "outside 0..2^63-1"),
        (["e", 1, 1 << 63, "click", 5], "outside 0..2^63-1"),
        (["e", 1, 1 << 70, "click", 5], "i must be an integer in 0..2^63-1 or a string"),
        (["e", 1.5, 2, "click", 5], "u must be an integer in 0..2^63-1 or a string, got 1.5"),
        (["e", True, 2, "click", 5], "u must be an integer in 0..2^63-1 or a string, got True"),
        (["e", 1, 2, "click", float("nan")], "t must be integer unix seconds"),
    ],
)
def test_a_packed_entrys_bad_event_is_named_and_the_others_decode(row: object, reason: str) -> None:
    good = ["ok", 1, 2, "click", 5]
    fields = {ev.FIELD_EVENTS: json.dumps([good, row, good]).encode()}  # the standard encoder: 1 << 70 too
    out: list[ev.DecodedEvent] = []
    errors = ev.EntryDecoder(ACTIONS, ("int", "int")).decode_into(fields, out)
    assert len(out) == 2 and [e.index for e in errors] == [1]
    assert reason in str(errors[0]), str(errors[0])
    kept = json.loads(errors[0].event or b"")  # the dead letter keeps the event
    if row in (["e", 1, 2, "teleport", 5], ["x" * 129, 1, 2, "click", 5], {"id": "e"}):
        assert kept == row  # as sent


@pytest.mark.parametrize(
    ("raw", "reason"),
    [(b"[[", "e is not a JSON array of events"), (b"\xff", "e is not a JSON array of events"),
     (b"{}", "e must be a JSON array of 1-128 events"), (b"[]", "e must be a JSON array of 1-128 events"),
     (orjson.dumps([["e", 1, 2, "click", 5]] * 129), "e must be a JSON array of 1-128 events"),
     (b"[" * 1100 + b"]" * 1100, "e is nested too deeply")],  # past both parsers' depth limits
)
def test_an_entry_that_is_not_an_array_of_events_is_one_dead_letter(raw: bytes, reason: str) -> None:
    out: list[ev.DecodedEvent] = []
    errors = ev.EntryDecoder(ACTIONS, ("int", "int")).decode_into({ev.FIELD_EVENTS: raw}, out)
    assert out == [] and len(errors) == 1 and errors[0].index is None
    assert reason in str(errors[0])


DEEP = b"[" * 1000 + b"]" * 1000  # within orjson's depth limit; past what repr and the standard encoder take


@pytest.mark.parametrize("slot", range(5))
def test_an_event_nested_too_deeply_is_a_dead_letter_not_a_crash(slot: int) -> None:
    parts = [b'"e"', b"1", b"2", b'"click"', b"5"]
    parts[slot] = DEEP
    fields = {ev.FIELD_EVENTS: b'[["ok",1,2,"click",5],[' + b",".join(parts) + b"]]"}
    out: list[ev.DecodedEvent] = []
    errors = ev.EntryDecoder(ACTIONS, ("int", "int")).decode_into(fields, out)
    assert len(out) == 1 and [e.index for e in errors] == [1]
    # the reason names the field when it can (an id is refused by its type alone); the event's
    # JSON is left out of the dead letter, which names the entry holding it
    assert ("id must be a string" if slot == 0 else "nested too deeply") in str(errors[0])
    assert errors[0].event is None


def test_xadd_commands_pack_each_shards_events_in_order() -> None:
    events = [ev.StreamEvent(f"e{k}", k % 5, k, "click", k) for k in range(300)]
    commands, command_of = ev.xadd_commands(events, 3, maxlen=5000)
    unpacked: dict[bytes, list[list[object]]] = {}
    for command in commands:
        assert command[:7] == ("XADD", command[1], "MAXLEN", "~", 5000, "*", ev.FIELD_EVENTS)
        rows = orjson.loads(command[7])
        assert 0 < len(rows) <= ev.MAX_EVENTS_PER_ENTRY
        unpacked.setdefault(command[1], []).extend(rows)
    assert sum(len(rows) for rows in unpacked.values()) == len(events)
    for key, rows in unpacked.items():
        # every event in its user's shard, in input order
        assert {ev.stream_key(ev.shard_of(str(row[1]), 3)) for row in rows} == {key}
        assert [row[0] for row in rows] == sorted((row[0] for row in rows), key=lambda e: int(str(e)[1:]))
    for k, event in enumerate(events):
        assert event.row() in orjson.loads(commands[command_of[k]][7])
    # the standard encoder where orjson refuses: the consumer dead-letters the event, the send goes through
    (big,), _ = ev.xadd_commands([ev.StreamEvent("b", 1 << 70, 2, "click", 5)], 3, maxlen=5000)
    assert json.loads(big[7])[0][1] == 1 << 70


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
