"""Event intake: `POST /v1/events` and gRPC `PushEvents` validate a batch of behaviour events
against the serving model's schema and add them to the event log (`feature_store.events`),
from which `rankserve consume` appends them to the users' sequences.

Validation is the rank request's (ids resolved with the model's id types) plus the event's
own fields: an action of the schema's behaviours, unix seconds in u32, an event id of 1-128
characters. One bad event refuses the whole batch (422 / INVALID_ARGUMENT naming
`events[k].<field>`), so a producer never has to find out which half was taken. Ids are written
in canonical form (an `int` id as decimal text), so every producer puts one user in one shard.
A write that fails after part of the batch went in is answered 503; sending the batch again
is safe, because the consumer appends each event id once per user.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from feature_store import events as ev
from feature_store.errors import FeatureStoreError
from feature_store.redis_store import RedisOnlineStore
from feature_store.store import OnlineStore
from service.errors import InvalidRequest, ModelUnavailable, NotFound, StoreUnavailable
from service.registry import ModelRegistry
from service.settings import Settings


class EventIntake:
    """Validates event batches and writes them to the shard streams as packed entries, one round
    trip per node."""

    def __init__(self, settings: Settings, registry: ModelRegistry, store: OnlineStore) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.shards = ev.check_shards(settings.event_shards)

    def _commands(self, events: Sequence[ev.StreamEvent]) -> list[tuple[Any, ...]]:
        model = self.registry.current
        if model is None:
            raise ModelUnavailable("no model loaded yet: events are checked against its schema")
        spec = model.spec
        limit = self.settings.max_events_per_request
        if not 0 < len(events) <= limit:
            raise InvalidRequest(f"events must hold 1..{limit} events, got {len(events)}")
        canonical: list[ev.StreamEvent] = []
        for k, event in enumerate(events):
            try:
                ev.check_event(event, spec.actions, spec.id_types)
            except ev.EventError as exc:
                raise InvalidRequest(f"events[{k}]: {exc}") from None
            canonical.append(ev.StreamEvent(event.event_id, _canonical(event.user_id, spec.id_types[0]),
                                            _canonical(event.item_id, spec.id_types[1]), event.action,
                                            event.timestamp))
        commands, _ = ev.xadd_commands(canonical, self.shards, self.settings.event_stream_maxlen)
        return commands

    async def push(self, events: Sequence[ev.StreamEvent]) -> int:
        """Validate and write `events`; returns how many were written (all of them)."""
        if not isinstance(self.store, RedisOnlineStore):
            raise NotFound("the event log needs the Redis feature store")
        commands = self._commands(events)
        try:
            # A retry may write an entry twice; the consumer skips the repeated event ids.
            await self.store.execute(f"write {len(events)} events in {len(commands)} entries", commands)
        except FeatureStoreError as exc:
            raise StoreUnavailable(f"the event log did not take the batch ({exc}); send it again") from exc
        return len(events)


def _canonical(value: int | str, id_type: str) -> int | str:
    """An `int` id as an int (integer text parsed), a `string` id as text: one shard per user."""
    if id_type == "int" and isinstance(value, str):
        return int(value.strip())
    return value
