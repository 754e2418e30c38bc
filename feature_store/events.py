"""The event log in front of the store: behaviour events in Redis Streams, sharded by user.

Producers (`POST /v1/events`, the gRPC `PushEvents` method, `EventProducer` below, or any
system that can XADD) add events to the shard stream of their user; `rankserve consume`
(`ingest.stream`) reads the shards in a consumer group and appends the events to the users'
lifelong sequences. Layout, in the same Redis / Valkey / Cluster as the features:

    rs:ev:{s<shard>}          one stream per shard (hash tag: a Cluster spreads the shards)
    rs:ev:{s<shard>}:lease    the consumer that owns the shard now (SET NX PX, renewed)
    rs:ev:consumers           live consumers (sorted set, score = heartbeat expiry in ms)
    rs:ev:dead                dead letters: events that could not be applied, with the reason

An entry holds one event or several:

* one event: the fields, all text, `id` (the event id, 1-128 bytes, unique per event: the
  consumer appends an id at most once per user), `u` (user id), `i` (item id), `a` (action name,
  one of the schema's behaviour actions), `t` (unix seconds). Integer ids are decimal text;
  string ids are the string itself (hashed by the consumer with the schema's id types, as
  requests are).
* several events of one shard (what rankserve's producers write): one field `e`, a JSON array
  of up to 128 events `[id, user, item, action, t]` in order, ids as JSON integers or strings,
  `t` a JSON integer. Stream commands (XADD, XREADGROUP, XACK, the pending list) cost Redis
  about as much per entry as per event, so packing cuts their share of Redis CPU per event
  several times over; each event is still checked, deduplicated and dead-lettered on its own.

The shard of a user is `crc32(user id text) % shards`: every producer of one deployment must
use the same shard count (`RANKSERVE_EVENT_SHARDS`), because ordering per user holds within a
shard.

This module is pure (no I/O) apart from `EventProducer`, the blocking Python helper.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any

import orjson

from feature_store.spec import INT64_MAX, MAX_CONTEXT_STRING, IdType, resolve_id

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
FIELD_EVENTS = b"e"  # a packed entry's JSON array of events
MAX_EVENTS_PER_ENTRY = 128


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

    def row(self) -> list[int | str]:
        """The event in a packed entry: `[id, user, item, action, t]` (see the module doc)."""
        return [self.event_id, self.user_id, self.item_id, self.action, int(self.timestamp)]


def xadd_commands(
    events: SequenceABC[StreamEvent], shards: int, maxlen: int
) -> tuple[list[tuple[Any, ...]], list[int]]:
    """The XADDs that log `events` as packed entries, one per shard and up to
    `MAX_EVENTS_PER_ENTRY` events, each user's events in input order; and for each event the
    index of its command. A user's shard is that of its id text as `StreamEvent.fields` writes it.
    """
    by_shard: dict[int, list[int]] = {}
    for k, event in enumerate(events):
        by_shard.setdefault(shard_of(str(event.user_id), shards), []).append(k)
    commands: list[tuple[Any, ...]] = []
    command_of = [0] * len(events)
    for shard, indexes in by_shard.items():
        key = stream_key(shard)
        for start in range(0, len(indexes), MAX_EVENTS_PER_ENTRY):
            chunk = indexes[start : start + MAX_EVENTS_PER_ENTRY]
            packed = _dumps([events[k].row() for k in chunk])
            for k in chunk:
                command_of[k] = len(commands)
            commands.append(("XADD", key, "MAXLEN", "~", maxlen, "*", FIELD_EVENTS, packed))
    return commands, command_of


def _dumps(value: Any) -> bytes:
    """Compact JSON; integers past 64 bits (which orjson refuses) through the standard encoder."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _event_json(row: Any) -> bytes | None:
    """A refused event's JSON for its dead letter; None when it is nested too deeply to write
    (the dead letter still names the entry, which holds it)."""
    try:
        return _dumps(row)
    except RecursionError:
        return None


class EventError(ValueError):
    """An event that cannot be applied; the message says which field and why (the dead-letter reason).

    For an event of a packed entry, `index` is its place in the entry and `event` its JSON.
    """

    def __init__(self, reason: str, index: int | None = None, event: bytes | None = None) -> None:
        super().__init__(reason)
        self.index = index
        self.event = event


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

    `decode` reads a one-event entry and raises `EventError` with the reason a malformed entry
    goes to the dead letters; `decode_into` reads either kind of entry. Ids are resolved exactly
    as requests resolve them (`resolve_id`: `string` ids hashed).
    """

    def __init__(self, actions: SequenceABC[str], id_types: tuple[IdType, IdType]) -> None:
        self._action_index = {name.encode(): k for k, name in enumerate(actions)}
        self._action_names = {name: k for k, name in enumerate(actions)}
        self._actions = list(actions)
        self._id_types = id_types
        self._int_ids = id_types == ("int", "int")

    def decode_into(self, fields: Mapping[bytes, bytes], out: list[DecodedEvent]) -> list[EventError]:
        """Append the entry's events to `out`, in order; the reasons of those that cannot be
        applied (each with its `index` and JSON in a packed entry) are returned instead."""
        packed = fields.get(FIELD_EVENTS)
        if packed is None:
            try:
                out.append(self.decode(fields))
            except EventError as exc:
                return [exc]
            return []
        try:
            rows = orjson.loads(packed)
        except orjson.JSONDecodeError:
            try:  # what only the standard parser reads (NaN, Infinity): dead-lettered event by event below
                rows = json.loads(packed)
            except (ValueError, UnicodeDecodeError):
                return [EventError("e is not a JSON array of events")]
            except RecursionError:  # past orjson's depth limit, and then the standard parser's
                return [EventError("e is nested too deeply: it must be a JSON array of events")]
        if type(rows) is not list or not 0 < len(rows) <= MAX_EVENTS_PER_ENTRY:
            return [EventError(f"e must be a JSON array of 1-{MAX_EVENTS_PER_ENTRY} events")]
        errors: list[EventError] = []
        decode_row = self._decode_row
        for index, row in enumerate(rows):
            try:
                out.append(decode_row(row))
            except EventError as exc:
                errors.append(EventError(str(exc), index, _event_json(row)))
            except RecursionError:  # a field nested too deeply to print in the reason
                errors.append(EventError("an event must be [id, user, item, action, t]: this one is nested too "
                                         "deeply", index, None))
        return errors

    def decode(self, fields: Mapping[bytes, bytes]) -> DecodedEvent:
        """A one-event entry's event; `EventError` names what is wrong."""
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

    def _decode_row(self, row: Any) -> DecodedEvent:
        """One event of a packed entry, `[id, user, item, action, t]`, checked as `decode` checks."""
        if type(row) is not list or len(row) != 5:
            raise EventError("an event must be [id, user, item, action, t]")
        event_id, user, item, action, timestamp = row
        if type(event_id) is not str:
            raise EventError("id must be a string")
        raw_id = event_id.encode()
        if not 0 < len(raw_id) <= MAX_EVENT_ID:
            raise EventError(f"id must have 1-{MAX_EVENT_ID} bytes, got {len(raw_id)}")
        index = self._action_names.get(action) if type(action) is str else None
        if index is None:
            raise EventError(f"action {action!r} is not one of {self._actions}")
        if type(timestamp) is not int:
            raise EventError(f"t must be integer unix seconds, got {str(timestamp)[:32]!r}")
        if not 0 <= timestamp <= MAX_TIMESTAMP:
            raise EventError(f"t must be in 0..{MAX_TIMESTAMP}, got {timestamp}")
        return raw_id, self._json_key(user, 0, "u"), self._json_key(item, 1, "i"), index, timestamp

    def _json_key(self, value: Any, side: int, name: str) -> int:
        if type(value) is int:
            if self._id_types[side] == "int" and 0 <= value <= INT64_MAX:  # the common case, without a detour
                return value
            return self._key(str(value).encode(), side, name)
        if type(value) is not str:  # orjson reads an integer past 64 bits as a float
            raise EventError(f"{name} must be an integer in 0..2^63-1 or a string, got {str(value)[:40]}")
        return self._key(value.encode(), side, name)

    def _key(self, raw: bytes, side: int, name: str) -> int:
        if self._int_ids and raw.isdigit() and len(raw) <= 19:  # the common case, without a detour
            value = int(raw)
            if value <= INT64_MAX:
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
        """XADD the events as packed entries (pipelined); returns, in input order, the id of the
        entry that holds each event."""
        if not events:
            return []
        commands, command_of = self.xadd_commands(events)
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        entry_ids = [bytes(r) if not isinstance(r, str) else r.encode() for r in pipe.execute()]
        return [entry_ids[c] for c in command_of]

    def xadd_commands(self, events: SequenceABC[StreamEvent]) -> tuple[list[tuple[Any, ...]], list[int]]:
        """The XADDs that log `events` (`xadd_commands` of this module), trimmed to about `maxlen`."""
        return xadd_commands(events, self.shards, self.maxlen)
