"""The event log in front of the store: behaviour events in Redis Streams, sharded by user.

Producers (`POST /v1/events`, the gRPC `PushEvents` method, `EventProducer` below, or any
system that can XADD) add one stream entry per event to the shard stream of its user;
`rankserve consume` (`ingest.stream`) reads the shards in a consumer group and appends the
events to the users' lifelong sequences. Layout, in the same Redis / Valkey / Cluster as the
features:

    rs:ev:{s<shard>}          one stream per shard (hash tag: a Cluster spreads the shards)
    rs:ev:{s<shard>}:lease    the consumer that owns the shard now (SET NX PX, renewed)
    rs:ev:consumers           live consumers (sorted set, score = heartbeat expiry in ms)
    rs:ev:dead                dead letters: entries that could not be applied, with the reason

An entry's fields, all text: `id` (the event id, 1-128 characters, unique per event: the
consumer appends an id at most once per user), `u` (user id), `i` (item id), `a` (action name,
one of the schema's behaviour actions), `t` (unix seconds). Integer ids are decimal text;
string ids are the string itself (hashed by the consumer with the schema's id types, as
requests are). The shard of a user is `crc32(user id text) % shards`: every producer of one
deployment must use the same shard count (`RANKSERVE_EVENT_SHARDS`), because ordering per user
holds within a shard.

This module is pure (no I/O) apart from `EventProducer`, the blocking Python helper.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Mapping
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any

from feature_store.spec import MAX_CONTEXT_STRING, IdType, resolve_id

STREAM_PREFIX = "rs:ev"
CONSUMERS_KEY = b"rs:ev:consumers"
DEAD_LETTER_KEY = b"rs:ev:dead"
GROUP = b"rankserve"
DEFAULT_SHARDS = 8
MAX_SHARDS = 1024
MAX_EVENT_ID = 128
MAX_TIMESTAMP = (1 << 32) - 1  # sequence records hold u32 seconds
DEFAULT_STREAM_MAXLEN = 1_000_000  # per shard, approximate (XADD MAXLEN ~)
DEFAULT_DEAD_LETTER_MAXLEN = 100_000

FIELD_ID = b"id"
FIELD_USER = b"u"
FIELD_ITEM = b"i"
FIELD_ACTION = b"a"
FIELD_TIME = b"t"


def stream_key(shard: int) -> bytes:
    """`rs:ev:{s<shard>}`"""
    return f"{STREAM_PREFIX}:{{s{int(shard)}}}".encode()


def lease_key(shard: int) -> bytes:
    """`rs:ev:{s<shard>}:lease`: same hash tag as its stream, so the same Cluster node."""
    return stream_key(shard) + b":lease"


def check_shards(shards: int) -> int:
    """`shards` when it is a legal shard count (1..1024), else ValueError."""
    if not 1 <= int(shards) <= MAX_SHARDS:
        raise ValueError(f"the event shard count must be in 1..{MAX_SHARDS}, got {shards}")
    return int(shards)


def shard_of(user_text: str | bytes, shards: int) -> int:
    """The shard of a user id (its entry text): crc32 of the UTF-8 bytes, mod `shards`."""
    raw = user_text.encode() if isinstance(user_text, str) else user_text
    return zlib.crc32(raw) % shards


@dataclass(frozen=True)
class StreamEvent:
    """One behaviour event as a producer sends it (ids as the request API takes them)."""

    event_id: str
    user_id: int | str
    item_id: int | str
    action: str
    timestamp: int

    def fields(self) -> dict[bytes, bytes]:
        """The entry's fields (see the module doc)."""
        return {
            FIELD_ID: self.event_id.encode(),
            FIELD_USER: str(self.user_id).encode(),
            FIELD_ITEM: str(self.item_id).encode(),
            FIELD_ACTION: self.action.encode(),
            FIELD_TIME: str(int(self.timestamp)).encode(),
        }


class EventError(ValueError):
    """An event that cannot be applied; the message says which field and why (the dead-letter reason)."""


def check_event(event: StreamEvent, actions: SequenceABC[str], id_types: tuple[IdType, IdType]) -> None:
    """Refuse an event the consumer could not apply, naming the field (the producers' validation)."""
    if not isinstance(event.event_id, str) or not 0 < len(event.event_id) <= MAX_EVENT_ID:
        raise EventError(f"event_id must be a string of 1-{MAX_EVENT_ID} characters")
    if event.action not in actions:
        raise EventError(f"action {event.action!r} is not a behaviour action of the schema (one of {list(actions)})")
    if type(event.timestamp) is not int or not 0 <= event.timestamp <= MAX_TIMESTAMP:
        raise EventError(f"timestamp must be unix seconds in 0..{MAX_TIMESTAMP}, got {event.timestamp!r}")
    for name, value, id_type in (("user_id", event.user_id, id_types[0]), ("item_id", event.item_id, id_types[1])):
        try:
            resolve_id(value, id_type, name)
        except ValueError as exc:
            raise EventError(str(exc)) from None


# One entry read back: (event id, user's store key, item's store key, action index, unix seconds).
DecodedEvent = tuple[bytes, int, int, int, int]


class EntryDecoder:
    """Turns entries into `DecodedEvent` tuples for one schema (action names, id types).

    `decode` raises `EventError` with the reason a malformed entry goes to the dead letters.
    Ids are resolved exactly as requests resolve them (`resolve_id`: `string` ids hashed).
    """

    def __init__(self, actions: SequenceABC[str], id_types: tuple[IdType, IdType]) -> None:
        self._action_index = {name.encode(): k for k, name in enumerate(actions)}
        self._actions = list(actions)
        self._id_types = id_types
        self._int_ids = id_types == ("int", "int")

    def decode(self, fields: Mapping[bytes, bytes]) -> DecodedEvent:
        try:
            event_id, user, item, action, ts = (
                fields[FIELD_ID], fields[FIELD_USER], fields[FIELD_ITEM], fields[FIELD_ACTION], fields[FIELD_TIME]
            )
        except KeyError as exc:
            raise EventError(f"field {exc.args[0].decode(errors='replace')!r} is missing") from None
        if not 0 < len(event_id) <= MAX_EVENT_ID:
            raise EventError(f"id must have 1-{MAX_EVENT_ID} bytes, got {len(event_id)}")
        index = self._action_index.get(action)
        if index is None:
            raise EventError(f"action {action.decode(errors='replace')!r} is not one of {self._actions}")
        try:
            timestamp = int(ts)
        except ValueError:
            raise EventError(f"t must be integer unix seconds, got {ts[:32]!r}") from None
        if not 0 <= timestamp <= MAX_TIMESTAMP:
            raise EventError(f"t must be in 0..{MAX_TIMESTAMP}, got {timestamp}")
        return event_id, self._key(user, 0, "u"), self._key(item, 1, "i"), index, timestamp

    def _key(self, raw: bytes, side: int, name: str) -> int:
        if self._int_ids and raw.isdigit() and len(raw) <= 19:  # the common case, without a detour
            value = int(raw)
            if value <= (1 << 63) - 1:
                return value
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise EventError(f"{name} is not UTF-8 text") from None
        if not 0 < len(text) <= MAX_CONTEXT_STRING:
            raise EventError(f"{name} must have 1-{MAX_CONTEXT_STRING} characters, got {len(text)}")
        try:
            return resolve_id(text, self._id_types[side], name)
        except ValueError as exc:
            raise EventError(str(exc)) from None


class EventProducer:
    """Blocking Python producer: `send` XADDs a batch of events to their shard streams.

    `client` is a redis-py (sync) `Redis` or `RedisCluster`; its timeouts apply. No validation
    against a schema here (the consumer dead-letters what it cannot apply, with the reason);
    `POST /v1/events` validates before it writes. A send that fails may have written part of the
    batch: sending it again is safe, because the consumer appends each event id once per user.

        producer = EventProducer(redis.Redis.from_url(url, socket_timeout=1.0), shards=8)
        producer.send([StreamEvent("e-1", 42, 7, "click", int(time.time()))])
    """

    def __init__(self, client: Any, shards: int = DEFAULT_SHARDS, maxlen: int = DEFAULT_STREAM_MAXLEN) -> None:
        self.client = client
        self.shards = check_shards(shards)
        self.maxlen = maxlen

    def send(self, events: SequenceABC[StreamEvent]) -> list[bytes]:
        """XADD every event (pipelined); returns the entry ids, in input order."""
        if not events:
            return []
        pipe = self.client.pipeline(transaction=False)
        for event in events:
            pipe.execute_command(*self.xadd_command(event))
        return [bytes(r) if not isinstance(r, str) else r.encode() for r in pipe.execute()]

    def xadd_command(self, event: StreamEvent) -> tuple[Any, ...]:
        """The XADD that logs `event`: to its user's shard stream, trimmed to about `maxlen`."""
        fields = event.fields()
        return ("XADD", stream_key(shard_of(fields[FIELD_USER], self.shards)), "MAXLEN", "~", self.maxlen, "*",
                *itertools.chain.from_iterable(fields.items()))

