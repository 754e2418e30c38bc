"""The item change log's entries: what an upsert announces and what a server reads back (pure)."""

from __future__ import annotations

import time

import numpy as np

from feature_store import redis_store
from feature_store.redis_store import decode_item_change, item_change_commands, routing_key


def test_announced_ids_round_trip_in_entries_of_bounded_size() -> None:
    ids = list(range(-3, redis_store.ITEM_CHANGES_IDS_PER_ENTRY + 7))  # raw int64 ids: negatives too
    before_ms = int((time.time() - redis_store.ITEM_CHANGES_RETENTION_S) * 1000)
    commands = item_change_commands("v1", ids)
    assert len(commands) == 2
    read: list[int] = []
    for command in commands:
        name, key, trim, approx, oldest_kept, new_id, field, payload = command
        assert (name, key, trim, approx, new_id, field) == ("XADD", b"rs:v1:item-changes", "MINID", "~", "*", b"ids")
        assert routing_key(command) == b"rs:v1:item-changes"
        # entries older than the retention are trimmed, by the stream ids' millisecond clock
        assert before_ms <= oldest_kept <= int((time.time() - redis_store.ITEM_CHANGES_RETENTION_S) * 1000)
        read += decode_item_change({b"ids": payload}).tolist()
    assert read == ids
    assert item_change_commands("v1", []) == []


def test_an_entry_not_written_by_an_upsert_names_no_items() -> None:
    assert decode_item_change({}).shape == (0,)
    assert decode_item_change({b"ids": b"\x01\x02\x03"}).shape == (0,)  # not whole int64s
    assert decode_item_change({b"ids": np.array([5], dtype="<i8").tobytes()}).tolist() == [5]


def test_xread_is_routed_by_its_stream() -> None:
    assert routing_key(("XREAD", "COUNT", 64, "STREAMS", b"rs:v1:item-changes", b"0-0")) == b"rs:v1:item-changes"
