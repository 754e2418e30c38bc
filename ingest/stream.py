"""`rankserve consume`: stream behaviour events from the event log into the lifelong sequences.

    rankserve consume --redis-url redis://redis:6379/0 --shards 8 --metrics-port 9108

Reads the shard streams of `feature_store.events` in one consumer group and appends each
user's events to the user's sequence in the ACTIVE feature-set version, in one round trip per
batch, applied while the next batch is read and decoded (`OnlineStore.append_events_once`: the capped
atomic append, plus the hashes of each user's newest applied event ids, so a redelivered entry
or a producer's retry is not appended twice).
Serving reads sequences from Redis on every request (no history cache), so an appended event
is in the history the next rank of that user searches. The user-item cross features the model
reads are computed from that history at request time, so they follow without a write of
their own. Item indices and categories come from the version's item rows (an item the store
does not hold gets index 0, as ingest gives items outside the vocabulary).

`twin_v2` clusters (`--cluster-bundle`, the bundle the clustering was made with): each appended
event of a user whose history is clustered gets the id of its nearest centroid (its GSU key and
bias against the centroids stored with the clustering; no clustering on this path). The ids
are written in the same script as the events, and only while the clustering read is still the
stored one and covers every earlier event, so ids never misalign. Events of users without such
a clustering (too short, made with other tables, or an old value without centroids), and all
events when the option is not given, carry no id until `rankserve recluster` clusters the
history again: the retriever searches them for every candidate, so recall is kept and only the
cost of searching them grows. A periodic `rankserve recluster --all` refreshes clusterings that
nearest-centroid assignment has grown.

Ordering and ownership: a shard is owned by one consumer at a time (a lease key, renewed every
third of `--lease-ms`), so each user's events, all in one shard, are applied in stream order.
Consumers heartbeat into a sorted set and each takes its fair share, ceil(shards / live
consumers), so replicas of a Deployment spread the shards among themselves. A consumer that
acquires a shard first claims its pending entries (XAUTOCLAIM): those a dead owner read and
never acknowledged are applied again (the event ids make that harmless), then it reads new
entries. A failed batch is not acknowledged and is claimed again on the next step.

Malformed events (missing fields, unknown action, a bad id or time) go to the dead-letter
stream `rs:ev:dead` with the reason, the shard, the entry id and the event (the entry's fields,
or for one event of a packed entry its index and JSON); the rest of a packed entry is applied,
and the entry is acknowledged. The consumer carries on. SIGTERM / SIGINT: finish the batch in
flight, acknowledge it, release the leases, exit 0.

Metrics (Prometheus, `--metrics-port`): rankserve_consumer_events_total{outcome} (appended,
duplicate, dead_letter), rankserve_consumer_batch_seconds, rankserve_consumer_lag{stream}
(entries not yet delivered to the group, from XINFO GROUPS), rankserve_consumer_pending{stream},
rankserve_consumer_shards_owned, rankserve_consumer_failed_batches_total,
rankserve_consumer_cluster_ids_total{outcome} (with `--cluster-bundle`: assigned, no_clustering,
stale, changed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import logging
import math
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from feature_store import events as ev
from feature_store import keys
from feature_store.clusters import UserClusterer, nearest_centroid
from feature_store.codecs import (
    CLUSTER_HEADER_SIZE,
    SEQ_RECORD_SIZE,
    ClusterHeader,
    CodecError,
    cluster_stamp,
    decode_centroids,
    decode_cluster_header,
    decode_item_values,
    decode_sequence,
    encode_sequence,
)
from feature_store.errors import FeatureStoreError, UserError
from feature_store.logs import RateLimitedLog
from feature_store.redis_store import APPEND_CALLS_IN_FLIGHT, EncodedAppends, RedisOnlineStore, create_store
from feature_store.schema import SchemaError, SchemaSpec
from feature_store.store import AppendCounts, FeatureStoreConfig, UserAppend

log = logging.getLogger(__name__)
T = TypeVar("T")

# Taken when free, or already ours: a SET NX whose reply was lost, and repeated, would otherwise
# find the consumer's own lease and leave the shard unread until it expired.
_ACQUIRE = ("if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end "
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end "
            "return 0")
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_ITEM_CACHE_MAX = 2_000_000  # resolved items kept per version (index and category); cleared when full
_INLINE_EVENTS = 128  # a batch this small is decoded and encoded on the event loop, not in a thread
_CATEGORY_BITS = 24  # a category index is below 2^24 (`codecs.MAX_CATEGORY_INDEX`)


@dataclass(frozen=True)
class ConsumerConfig:
    """How one consumer reads the event log (see the module doc)."""

    shards: int = ev.DEFAULT_SHARDS
    batch: int = 1000  # events read per shard and step, about (see `StreamConsumer._read`)
    poll_interval_s: float = 0.005  # pause after a step that found nothing (when it could not block)
    block_ms: int = 100  # an idle consumer's read waits this long for new entries (single node; 0: poll)
    lease_ms: int = 10_000  # a dead consumer's shards are taken over after this long
    id_window: int = 1024  # applied event ids kept per user
    id_ttl_s: int = 86_400  # ... for this long after the user's last append
    dead_letter_maxlen: int = ev.DEFAULT_DEAD_LETTER_MAXLEN
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")

    def __post_init__(self) -> None:
        ev.check_shards(self.shards)
        if self.batch < 1 or self.lease_ms < 100 or self.poll_interval_s < 0 or self.block_ms < 0:
            raise ValueError("batch must be >= 1, lease_ms >= 100, poll_interval_s >= 0 and block_ms >= 0")


class ConsumerMetrics:
    """The consumer's Prometheus metrics, on a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter("rankserve_consumer_events", "events handled, by outcome", ["outcome"], registry=r)
        self.batch_seconds = Histogram(
            "rankserve_consumer_batch_seconds", "one step: read, decode, append, acknowledge", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.lag = Gauge("rankserve_consumer_lag", "entries of a shard not yet delivered to the group", ["stream"],
                         registry=r)
        self.pending = Gauge("rankserve_consumer_pending", "entries delivered and not acknowledged", ["stream"],
                             registry=r)
        self.shards_owned = Gauge("rankserve_consumer_shards_owned", "shards this consumer holds", registry=r)
        self.failed_batches = Counter("rankserve_consumer_failed_batches", "steps that failed and will be retried",
                                      registry=r)
        self.cluster_ids = Counter(
            "rankserve_consumer_cluster_ids", "appended events by twin_v2 cluster id outcome: assigned, no_clustering "
            "(none stored, or without centroids), stale (other GSU tables), changed (reclustered or not covering "
            "the history when applied)", ["outcome"], registry=r)


@dataclass
class StepResult:
    """What one step did."""

    read: int = 0  # events read (an entry that is not a JSON array of events counts as one)
    appended: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    waited: bool = False  # its read was a blocking one: it returned when entries were there or after `block_ms`


@dataclass
class _VersionState:
    version: str
    decoder: ev.EntryDecoder
    cap: int
    items: dict[int, int] = field(default_factory=dict)  # item key -> index << 24 | category


@dataclass
class _Prepared:
    """A batch read and decoded, to be applied by the next step."""

    appends: EncodedAppends | None  # the batch's script calls (`RedisOnlineStore.encode_appends`)
    dead: list[tuple[Any, ...]]
    acks: list[tuple[Any, ...]]
    read_at: float
    events: int  # events read: decoded and dead-lettered
    behind: bool  # read from a backlog (see `StreamConsumer._read`): its script calls go several at a time
    cluster_outcomes: list[str] | None = None  # per append, with a clusterer: see `_assign_clusters`


class StreamConsumer:
    """One member of the consumer group (see the module doc). `step()` does one batch; `run()` loops."""

    def __init__(self, store: RedisOnlineStore, config: ConsumerConfig | None = None,
                 metrics: ConsumerMetrics | None = None, clusterer: UserClusterer | None = None) -> None:
        self.store = store
        self.config = config or ConsumerConfig()
        self.metrics = metrics or ConsumerMetrics()
        self.clusterer = clusterer  # gives appended events their nearest centroid's id
        self._centroids = CentroidCache()
        self.name = self.config.name.encode()
        self.owned: set[int] = set()
        self._to_claim: dict[int, bytes] = {}  # shard -> XAUTOCLAIM cursor still to walk
        self._acks: list[tuple[Any, ...]] = []  # XACKs of applied entries, sent with the next read
        self._pending: _Prepared | None = None  # read and decoded, applied by the next step
        self._events_per_entry = 1.0  # in the last batch: how many entries a read of `batch` events takes
        self._rebalanced = 0.0
        self._lag_checked = 0.0
        self._groups_made: set[int] = set()
        self._state: _VersionState | None = None
        self._errors = RateLimitedLog(log, 10.0)
        # An idle consumer waits in one XREADGROUP BLOCK over its shards instead of polling, which
        # costs the consumer and Redis CPU beside the servers. One command reads one node, so a
        # Cluster (shards on several nodes) polls; the wait stays well inside a call's deadline
        # and between lease renewals.
        self._block_ms = (0 if store.mode == "cluster" else
                          min(self.config.block_ms, int(store.call_deadline_s * 1000 / 4), self.config.lease_ms // 4))

    # -- ownership -----------------------------------------------------------------------------

    async def rebalance(self, *, force: bool = False) -> None:
        """Heartbeat, renew the leases held, then take or give shards towards the fair share
        (first applying a batch still pending, so none outlives the lease it was read under)."""
        if not force and not self._rebalance_due():
            return
        await self._commit_pending()
        self._rebalanced = time.monotonic()
        lease_ms = self.config.lease_ms
        wall_ms = int(time.time() * 1000)
        replies = await self.store.execute("consumer heartbeat", [
            ("ZADD", ev.CONSUMERS_KEY, wall_ms + lease_ms, self.name),
            ("ZREMRANGEBYSCORE", ev.CONSUMERS_KEY, "-inf", wall_ms),
            ("ZCARD", ev.CONSUMERS_KEY),
        ])
        fair = math.ceil(self.config.shards / max(1, int(replies[2])))
        held = sorted(self.owned)
        if held:
            renewed = await self.store.execute(
                "renew shard leases", [("EVAL", _RENEW, 1, ev.lease_key(s), self.name, lease_ms) for s in held])
            for shard, ok in zip(held, renewed, strict=True):
                if not ok:
                    log.warning("lost the lease of shard %d", shard, extra={"shard": shard})
                    self._drop(shard)
        extra = sorted(self.owned)[fair:]
        if extra:
            await self._release(extra)
        if len(self.owned) < fair:
            await self._acquire(fair - len(self.owned))
        self.metrics.shards_owned.set(len(self.owned))

    async def _acquire(self, wanted: int) -> None:
        start = ev.shard_of(self.name, self.config.shards)  # consumers start looking at different shards
        order = [(start + k) % self.config.shards for k in range(self.config.shards)]
        candidates = [s for s in order if s not in self.owned]
        holders = await self.store.execute("read shard leases", [("GET", ev.lease_key(s)) for s in candidates])
        free = [s for s, holder in zip(candidates, holders, strict=True) if holder in (None, self.name)][:wanted]
        replies = await self.store.execute("acquire shard leases", [
            ("EVAL", _ACQUIRE, 1, ev.lease_key(s), self.name, self.config.lease_ms) for s in free
        ])
        taken = [s for s, ok in zip(free, replies, strict=True) if ok]
        if taken:
            await self._ensure_groups(taken)
        for shard in taken:
            self.owned.add(shard)
            self._to_claim[shard] = b"0-0"
            log.info("took shard %d", shard, extra={"shard": shard, "consumer": self.config.name})

    async def _release(self, shards: Iterable[int]) -> None:
        shards = list(shards)
        await self.flush_acks()  # what was applied is not handed to the next owner
        for shard in shards:
            self._drop(shard)
        await self.store.execute("release shard leases",
                                 [("EVAL", _RELEASE, 1, ev.lease_key(s), self.name) for s in shards])
        for shard in shards:
            log.info("released shard %d", shard, extra={"shard": shard, "consumer": self.config.name})

    def _drop(self, shard: int) -> None:
        self.owned.discard(shard)
        self._to_claim.pop(shard, None)
        label = ev.stream_key(shard).decode()
        for gauge in (self.metrics.lag, self.metrics.pending):  # the next owner reports this shard now
            with contextlib.suppress(KeyError):
                gauge.remove(label)

    async def _ensure_groups(self, shards: Iterable[int]) -> None:
        todo = [s for s in shards if s not in self._groups_made]
        if not todo:
            return
        # From 0: a group made after events were produced still applies them.
        commands: list[tuple[Any, ...]] = [("XGROUP", "CREATE", ev.stream_key(s), ev.GROUP, "0", "MKSTREAM")
                                           for s in todo]
        for shard, command in zip(todo, commands, strict=True):
            try:
                await self.store.execute("create consumer group", [command])
            except FeatureStoreError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._groups_made.add(shard)

    # -- one step ------------------------------------------------------------------------------

    async def step(self) -> StepResult:
        """Rebalance when due; apply the batch read by the step before while the next batch is
        read and decoded, so the consumer's reads and CPU work overlap the server's script work.
        A step that reads nothing applies the last batch. Batches are applied one after the
        other in read order, so each user's events keep theirs; a batch's acknowledgements ride
        on the first read after its appends succeeded.
        """
        result = StepResult()
        try:
            if self._rebalance_due():
                await self._commit_pending(result)  # no batch is applied under a lease it was not read under
                await self.rebalance()
            if not self.owned and self._pending is None:
                return result
            pending, self._pending = self._pending, None
            commit = asyncio.create_task(self._commit(pending, result)) if pending is not None else None
            try:
                entries, result.waited, behind = await self._read() if self.owned else ([], False, False)
                read_entries = sum(len(batch) for _, batch in entries)
                prepared = await self._prepare(entries, behind) if read_entries else None
                if prepared is not None:
                    result.read = prepared.events
                    self._events_per_entry = max(1.0, prepared.events / read_entries)
            finally:
                if commit is not None:
                    await commit  # its failure is this step's: the batch just read is dropped below
            self._pending = prepared
            if not result.read and self._acks:  # idle: the next read may come late (a caller stepping by hand, a poll)
                await self.flush_acks()
        except (FeatureStoreError, SchemaError, CodecError) as exc:
            self._pending = None  # read, not applied: pending in the group, claimed back below
            self.metrics.failed_batches.inc()
            if "NOGROUP" in str(exc):  # a Redis that lost its groups (restarted without persistence)
                self._groups_made.clear()
                await self._ensure_groups(self.owned)
            self._errors.warning("batch failed; its entries will be read again", error=str(exc),
                                 error_type=type(exc).__name__)
            # What was read and not acknowledged is pending: claim it back from the start of each
            # shard's pending list. A claim walk under way starts over too: its cursor is past the
            # batch that just failed, which would otherwise stay pending, unapplied, while newer
            # events of its users were appended.
            for shard in self.owned:
                self._to_claim[shard] = b"0-0"
            await self._update_lag()  # the lag keeps telling while batches fail
            return StepResult()
        await self._update_lag()
        return result

    def _rebalance_due(self) -> bool:
        return time.monotonic() - self._rebalanced >= self.config.lease_ms / 3000

    async def _commit_pending(self, result: StepResult | None = None) -> None:
        """Apply the batch read by the last step, if any (before a rebalance, and on close)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await self._commit(pending, result if result is not None else StepResult())

    async def _read(self) -> tuple[list[tuple[int, list[tuple[bytes, dict[bytes, bytes]]]]], bool, bool]:
        """(shard, entries) of this step: pending entries being claimed first, else new ones;
        whether the read could block (new entries, on a single node); and whether the consumer is
        behind: pending entries were claimed, or a shard had more new entries than the read took.
        A read takes the entries that held `batch` events in the last batch: entries hold 1 to 128
        events, and a count of entries alone would let a batch of packed entries grow 128 times."""
        count = max(1, round(self.config.batch / self._events_per_entry))
        if self._to_claim:
            shards = sorted(self._to_claim)
            commands: list[tuple[Any, ...]] = [
                ("XAUTOCLAIM", ev.stream_key(s), ev.GROUP, self.name, 0, self._to_claim[s], "COUNT", count)
                for s in shards
            ]
            replies = await self._send_with_acks("claim pending entries", commands)
            out = []
            for shard, reply in zip(shards, replies, strict=True):
                cursor, claimed = reply[0], reply[1]
                if cursor in (b"0-0", "0-0"):
                    self._to_claim.pop(shard, None)
                else:
                    self._to_claim[shard] = cursor
                entries = [(eid, fields) for eid, fields in claimed if fields is not None]
                out.append((shard, entries))
            return out, False, True
        shards = sorted(self.owned)
        if self._block_ms:
            # One XREADGROUP BLOCK over all shards: it returns at once when entries are there, and
            # otherwise waits for them, so a consumer that keeps up with its producers costs one
            # read per burst instead of a read that finds nothing before each wait.
            keys = [ev.stream_key(s) for s in shards]
            (reply,) = await self._send_with_acks("read events", [self._read_new(keys, count, self._block_ms)],
                                                  retry=False)
            by_key = {bytes(key): list(batch) for key, batch in reply or []}
            behind = any(len(batch) >= count for batch in by_key.values())
            if count > 1 and sum(len(batch) for batch in by_key.values()) == 1:
                # Woken by the first entry of a burst: Redis serves a blocked reader after the
                # first command of a producer's pipeline of XADDs, so the rest is there by now and
                # joins this batch instead of costing a step of its own.
                (reply,) = await self._send_with_acks("read events", [self._read_new(keys, count - 1)],
                                                      retry=False)
                for key, batch in reply or []:
                    behind = behind or len(batch) >= count - 1  # all this read asked of that shard
                    by_key.setdefault(bytes(key), []).extend(batch)
            return [(s, by_key.get(k, [])) for s, k in zip(shards, keys, strict=True)], True, behind
        commands = [self._read_new([ev.stream_key(s)], count) for s in shards]
        # Not repeated after a failure the command may have reached Redis through (retry=False):
        # a repeated XREADGROUP ">" would read the entries after those the lost reply delivered,
        # leaving those pending, unapplied, behind newer ones. The failed step claims them instead.
        replies = await self._send_with_acks("read events", commands, retry=False)
        out = []
        for shard, reply in zip(shards, replies, strict=True):
            out.append((shard, list(reply[0][1]) if reply else []))
        return out, False, any(len(batch) >= count for _, batch in out)

    def _read_new(self, streams: list[bytes], count: int, block_ms: int = 0) -> tuple[Any, ...]:
        """XREADGROUP of up to `count` new entries per stream, waiting up to `block_ms` if any."""
        wait = ("BLOCK", block_ms) if block_ms else ()
        return ("XREADGROUP", "GROUP", ev.GROUP, self.name, "COUNT", count, *wait, "STREAMS", *streams,
                *([">"] * len(streams)))

    async def _send_with_acks(self, what: str, commands: list[tuple[Any, ...]], retry: bool = True) -> list[Any]:
        """`commands` after the XACKs owed (one round trip); their replies. XACK is safe to repeat."""
        acks, self._acks = self._acks, []
        try:
            replies = await self.store.execute(what, acks + commands, retry=retry)
        except FeatureStoreError:
            self._acks = acks + self._acks
            raise
        return replies[len(acks):]

    async def flush_acks(self) -> None:
        """Send the XACKs owed now."""
        await self._send_with_acks("acknowledge events", [])

    async def _prepare(self, entries: list[tuple[int, list[tuple[bytes, dict[bytes, bytes]]]]], behind: bool,
                       ) -> _Prepared:
        """A batch decoded into the store's appends (the script calls built), its dead letters and
        its acknowledgements. The CPU work of a large batch runs in a worker thread, so the event
        loop meanwhile sends the previous batch's appends and waits for them; a small batch's runs
        inline, where it costs less than the hops to a thread and back."""
        state = await self._version_state()
        # events per entry as in the last batch: a few packed entries can be a large batch
        small = sum(len(batch) for _, batch in entries) * self._events_per_entry <= _INLINE_EVENTS
        decoded, dead = await _cpu(small, self._decode, state, entries)
        encoded = None
        outcomes: list[str] | None = None
        if decoded:
            items = await self._resolve_items(state, {e[2] for e in decoded})
            if self.clusterer is None:
                encoded = await _cpu(small, lambda: self._encode(state, user_appends(decoded, items)))
            else:
                appends = await _cpu(small, user_appends, decoded, items)
                appends, outcomes = await self._assign_clusters(state, self.clusterer, appends)
                encoded = await _cpu(small, self._encode, state, appends)
        acks = [("XACK", ev.stream_key(shard), ev.GROUP, *(eid for eid, _ in batch)) for shard, batch in entries
                if batch]
        return _Prepared(encoded, dead, acks, time.perf_counter(), len(decoded) + len(dead), behind, outcomes)

    def _encode(self, state: _VersionState, appends: list[UserAppend]) -> EncodedAppends | None:
        if not appends:
            return None
        return self.store.encode_appends(appends, state.version, cap=state.cap, id_window=self.config.id_window,
                                         id_ttl_s=self.config.id_ttl_s)

    def _decode(self, state: _VersionState, entries: list[tuple[int, list[tuple[bytes, dict[bytes, bytes]]]]],
                ) -> tuple[list[ev.DecodedEvent], list[tuple[Any, ...]]]:
        decoded: list[ev.DecodedEvent] = []
        dead: list[tuple[Any, ...]] = []
        decode_into = state.decoder.decode_into
        for shard, batch in entries:
            for entry_id, fields in batch:
                start = len(decoded)
                try:
                    errors = decode_into(fields, decoded)
                except Exception as exc:  # a decoder failing on an odd entry must not stop the shard
                    # Raised here, the entry would fail every batch of every owner after this one:
                    # it goes to the dead letters whole instead (none of its events applied).
                    log.exception("could not read entry %s of shard %d; it goes to the dead letters", entry_id, shard)
                    del decoded[start:]
                    errors = [ev.EventError(f"the entry could not be read: {type(exc).__name__}: {str(exc)[:200]}")]
                for error in errors:
                    dead.append(self._dead_letter(shard, entry_id, fields, error))
        return decoded, dead

    async def _commit(self, batch: _Prepared, result: StepResult) -> None:
        """Apply a prepared batch. Its acknowledgements ride on the next read (or `close()`): only
        after the appends succeeded, so a failure leaves the entries pending."""
        if batch.appends is not None:
            # Caught up, the calls go one at a time: a serving fetch then waits for one short call
            # at most, and the batch is applied long before the next arrives. Behind, several go
            # at once, so the server always has the next one (twice the events/s).
            in_flight = APPEND_CALLS_IN_FLIGHT if batch.behind else 1
            counts = await self.store.apply_appends(batch.appends, in_flight=in_flight)
            result.appended += sum(c.appended for c in counts)
            result.duplicates += sum(c.duplicates for c in counts)
            if batch.cluster_outcomes is not None:
                self._count_cluster_ids(counts, batch.cluster_outcomes)
        if batch.dead:
            # Not safe to repeat blindly, but a repeat only duplicates a dead letter, never an event.
            await self.store.execute("write dead letters", batch.dead)
            result.dead_letters += len(batch.dead)
            self._errors.warning("malformed events sent to the dead-letter stream", count=len(batch.dead),
                                 reason=batch.dead[0][-1].decode(errors="replace"))
        self._acks += batch.acks
        self.metrics.batch_seconds.observe(time.perf_counter() - batch.read_at)
        self.metrics.events.labels("appended").inc(result.appended)
        self.metrics.events.labels("duplicate").inc(result.duplicates)
        self.metrics.events.labels("dead_letter").inc(result.dead_letters)

    def _dead_letter(self, shard: int, entry_id: bytes, fields: dict[bytes, bytes], error: ev.EventError,
                     ) -> tuple[Any, ...]:
        """The dead letter of an event: the entry's fields (`f.<name>`), or for one event of a
        packed entry its place (`index`) and JSON (`f.e`); and the reason."""
        if error.index is None:
            flat = [part for k, v in fields.items() for part in (b"f." + k, v)]
        else:
            flat = [b"index", str(error.index).encode(), b"f." + ev.FIELD_EVENTS, error.event or b""]
        return ("XADD", ev.DEAD_LETTER_KEY, "MAXLEN", "~", self.config.dead_letter_maxlen, "*",
                b"shard", str(shard).encode(), b"entry", entry_id, *flat, b"reason", str(error).encode())

    async def _version_state(self) -> _VersionState:
        version = await self.store.active_version()
        if version is None:
            raise FeatureStoreError("no active feature-set version to append to: run `rankserve ingest --activate`")
        if self._state is None or self._state.version != version:
            stored = await self.store.get_schema(version)
            if stored is None:
                raise FeatureStoreError(f"version {version!r} has no recorded schema: re-ingest it")
            schema = SchemaSpec.from_dict(stored.spec)
            self._state = _VersionState(version, ev.EntryDecoder(schema.actions, schema.id_types),
                                        schema.max_sequence_length)
            log.info("appending streamed events to version %s", version, extra={"version": version})
        return self._state

    async def _assign_clusters(self, state: _VersionState, clusterer: UserClusterer, appends: list[UserAppend],
                               ) -> tuple[list[UserAppend], list[str]]:
        """The appends with the nearest-centroid cluster id of each event, for users whose stored
        clustering has centroids and was made with `clusterer`'s tables; and per append what
        happened ("offered", "no_clustering", "stale", "changed"). One round trip reads every
        user's clustering header; a second reads the centroids the cache does not hold."""
        version = state.version
        headers = await self.store.read_prefixes(
            "read cluster headers", [keys.clusters_key(version, a.user_id) for a in appends], CLUSTER_HEADER_SIZE)
        outcomes = ["offered"] * len(appends)
        centroids: dict[int, Centroids] = {}  # append index -> its user's centroids, for this batch
        to_read: list[tuple[int, bytes, ClusterHeader]] = []
        for k, raw in enumerate(headers):
            try:
                header = decode_cluster_header(raw)
            except CodecError:
                header = None
            if header is None or header.width == 0:  # none stored, or the old format without centroids
                outcomes[k] = "no_clustering"
            elif header.fingerprint != clusterer.fingerprint:
                outcomes[k] = "stale"
            else:
                found = self._centroids.get(appends[k].user_id, raw)
                if found is None:
                    to_read.append((k, raw, header))
                else:
                    centroids[k] = found
        if to_read:
            blocks = await self.store.execute("read cluster centroids", [
                ("GETRANGE", keys.clusters_key(version, appends[k].user_id), CLUSTER_HEADER_SIZE, h.ids_offset - 1)
                for k, _, h in to_read])
            for (k, raw, header), block in zip(to_read, blocks, strict=True):
                try:
                    means = decode_centroids(header, block)
                except CodecError:
                    means = None
                if means is None or cluster_stamp(means) != header.stamp:
                    outcomes[k] = "changed"  # reclustered between the two reads
                else:
                    centroids[k] = self._centroids.put(appends[k].user_id, raw, means)
        if not centroids:
            return appends, outcomes
        return await asyncio.to_thread(_with_cluster_ids, clusterer, appends, headers, centroids), outcomes

    def _count_cluster_ids(self, counts: list[AppendCounts], outcomes: list[str]) -> None:
        tally = dict.fromkeys(("assigned", "no_clustering", "stale", "changed"), 0)
        for done, outcome in zip(counts, outcomes, strict=True):
            if outcome == "offered":  # the script stores the ids only while the clustering read is in place
                tally["assigned"] += done.clustered
                tally["changed"] += done.appended - done.clustered
            else:
                tally[outcome] += done.appended
        for outcome, n in tally.items():
            self.metrics.cluster_ids.labels(outcome).inc(n)

    async def _resolve_items(self, state: _VersionState, wanted: set[int]) -> Mapping[int, int]:
        """The version's item cache, once it holds every item of `wanted` the store has: item key
        -> its stored index and category, packed (`index << 24 | category`: plain ints, so a
        million cached items are not a million objects for the garbage collector to walk). An
        item the store lacks is not in it. Only this method changes the cache, one batch at a
        time, so a worker thread may read it while the batch is encoded."""
        cache = state.items
        missing = [k for k in wanted if k not in cache]
        if missing:
            if len(cache) + len(missing) > _ITEM_CACHE_MAX:
                # full: start over, with every item of this batch read (not only the missing
                # ones: those cached so far go with the clear)
                cache.clear()
                missing = list(wanted)
            values = await self.store.read_items(state.version, missing)
            index, category, found, _ = decode_item_values(values, missing)
            packed = ((index << _CATEGORY_BITS) | category).tolist()
            known = found.tolist()  # not cached when unknown: a catalogue upsert may add it
            cache.update(zip(itertools.compress(missing, known), itertools.compress(packed, known), strict=True))
        return cache

    async def _update_lag(self) -> None:
        now = time.monotonic()
        if now - self._lag_checked < 5.0 or not self.owned:
            return
        self._lag_checked = now
        shards = sorted(self.owned)
        try:
            replies = await self.store.execute(
                "read group lag", [("XINFO", "GROUPS", ev.stream_key(s)) for s in shards])
        except FeatureStoreError as exc:
            self._errors.warning("could not read the consumer lag", error=str(exc))
            return
        for shard, groups in zip(shards, replies, strict=True):
            for group in groups:
                info = {(k.decode() if isinstance(k, bytes) else k): v for k, v in _pairs(group)}
                if info.get("name") in (ev.GROUP, ev.GROUP.decode()):
                    label = ev.stream_key(shard).decode()
                    if info.get("lag") is not None:
                        self.metrics.lag.labels(label).set(int(info["lag"]))
                    self.metrics.pending.labels(label).set(int(info.get("pending", 0)))

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Step until `stop` is set, then release the leases (the batch in flight completes first)."""
        await self.rebalance(force=True)
        try:
            while not stop.is_set():
                pause = self.config.poll_interval_s
                try:
                    result = await self.step()
                except FeatureStoreError as exc:  # Redis away (restart, failover): keep trying, never exit
                    self.metrics.failed_batches.inc()
                    self._errors.warning("event log unreachable; retrying", error=str(exc))
                    result, pause = StepResult(), max(pause, 0.5)
                if result.read == 0 and not result.waited:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), pause)
        finally:
            await self.close()

    async def close(self) -> None:
        """Give the shards back and leave the group's live set (best effort: leases expire anyway)."""
        try:
            await self._commit_pending()
            await self.flush_acks()  # also when no shard is held any more
            if self.owned:
                await self._release(sorted(self.owned))
            await self.store.execute("leave", [("ZREM", ev.CONSUMERS_KEY, self.name)])
        except FeatureStoreError as exc:
            log.warning("could not release the shards; they pass on when the leases expire: %s", exc)
        self.metrics.shards_owned.set(0)


async def _cpu(inline: bool, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` here, or in a worker thread (off the event loop)."""
    return fn(*args) if inline else await asyncio.to_thread(fn, *args)


def _pairs(group: Any) -> Iterable[tuple[Any, Any]]:
    if isinstance(group, dict):
        return group.items()
    return zip(group[::2], group[1::2], strict=True)


def tune_gc() -> None:
    """Garbage-collector settings for a consumer process.

    Each batch allocates tens of thousands of short-lived objects (entries, their fields, one
    append per user), nearly all freed by reference counting. With the default thresholds they
    still trigger collections that walk every long-lived object of the process (in a bench
    process holding the standard workload, a third of the consumer's throughput). So: freeze what
    exists after start-up (never collected: modules, the store, the caches' containers), and
    collect the youngest generation every 50,000 allocations instead of every 700.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _with_cluster_ids(clusterer: UserClusterer, appends: list[UserAppend], headers: list[bytes],
                      centroids: dict[int, Centroids]) -> list[UserAppend]:
    """`appends` with each event's nearest-centroid id for the appends in `centroids`."""
    # The events' augmented keys in one pass for the whole batch; then per user, its centroids.
    taken = sorted(centroids)
    events = decode_sequence(b"".join(appends[k].records for k in taken))
    vectors = clusterer.event_vectors(events.item, events.category, events.action)
    out = list(appends)
    start = 0
    for k in taken:
        append = appends[k]
        n = len(append.event_ids)
        ids = nearest_centroid(centroids[k].means, vectors[start : start + n], centroids[k].norms)
        start += n
        out[k] = append._replace(cluster_header=headers[k], cluster_ids=ids.astype("<u2").tobytes())
    return out


class Centroids(NamedTuple):
    """A clustering's centroids in float64 and their squared norms (`nearest_centroid`'s inputs)."""

    means: npt.NDArray[np.float64]
    norms: npt.NDArray[np.float64]


class CentroidCache:
    """Centroids of recently seen users' clusterings, keyed by user and checked against the
    stored header (whose stamp names the centroids), within a byte budget (cleared when full)."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._entries: dict[int, tuple[bytes, Centroids]] = {}
        self._bytes = 0

    def get(self, user: int, header: bytes) -> Centroids | None:
        """The user's centroids when cached for this very clustering (same header)."""
        entry = self._entries.get(user)
        return entry[1] if entry is not None and entry[0] == header else None

    def put(self, user: int, header: bytes, means: npt.NDArray[np.float32]) -> Centroids:
        m = means.astype(np.float64)
        if self._bytes + m.nbytes > self.max_bytes:
            self._entries.clear()
            self._bytes = 0
        old = self._entries.pop(user, None)
        if old is not None:
            self._bytes -= old[1].means.nbytes
        entry = Centroids(m, (m * m).sum(axis=1))
        self._entries[user] = (header, entry)
        self._bytes += m.nbytes
        return entry


def user_appends(decoded: list[ev.DecodedEvent], items: Mapping[int, int]) -> list[UserAppend]:
    """The batch's events per user, each user's in entry order, encoded as sequence records at once
    (one numpy pass for the whole batch, not one per user). `items`: item key -> index << 24 |
    category; an item not in it gets index and category 0 (the unknown item's)."""
    event_ids, users, item_keys, actions, times = zip(*decoded, strict=True)
    n = len(decoded)
    user = np.fromiter(users, dtype=np.int64, count=n)
    order = np.argsort(user, kind="stable")
    packed = np.fromiter(map(items.get, item_keys, itertools.repeat(0)), dtype=np.int64, count=n)[order]
    records = encode_sequence(packed >> _CATEGORY_BITS, packed & ((1 << _CATEGORY_BITS) - 1),
                              np.asarray(actions, dtype=np.int64)[order], np.asarray(times, dtype=np.int64)[order])
    sorted_users = user[order]
    bounds = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1], True]).tolist()
    ids = [event_ids[k] for k in order.tolist()]
    firsts = sorted_users[bounds[:-1]].tolist()
    size = SEQ_RECORD_SIZE
    return [UserAppend(u, records[a * size : b * size], ids[a:b])
            for u, (a, b) in zip(firsts, itertools.pairwise(bounds), strict=True)]


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=None, help="redis:// URL (default $REDIS_URL; else the embedded Valkey)")
    parser.add_argument("--cluster-nodes", default=None, help="host:port,... of a Redis Cluster "
                        "(default $REDIS_CLUSTER_NODES)")
    # a string default goes through `type` at parse time: a bad value is argparse's one-line error
    parser.add_argument("--shards", type=int, default=os.environ.get("RANKSERVE_EVENT_SHARDS", str(ev.DEFAULT_SHARDS)),
                        help="shard streams of the event log; the producers' count ($RANKSERVE_EVENT_SHARDS)")
    parser.add_argument("--batch", type=int, default=1000, help="events read per shard and step (about)")
    parser.add_argument("--lease-ms", type=int, default=10_000,
                        help="shard lease: a dead consumer's shards pass on after this long")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per Redis call, retries included")
    parser.add_argument("--name", default=None, help="consumer name (default host-pid-random)")
    parser.add_argument("--nice", type=int, default=0,
                        help="lower the consumer's CPU priority by this much (0-19) so that a server sharing its "
                        "cores comes first (in Kubernetes the pods' CPU requests do this)")
    parser.add_argument("--cluster-bundle", default=None, metavar="BUNDLE",
                        help="give appended events the twin_v2 cluster id of their nearest centroid, with this "
                        "bundle's GSU tables (the bundle the histories were clustered with)")


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.nice <= 19:
        raise UserError(f"--nice must be 0-19 (a lower CPU priority), got {args.nice}")
    if args.nice:
        # before any thread starts: Linux keeps a priority per thread, and new threads inherit it
        os.nice(args.nice)
    try:
        config = ConsumerConfig(shards=args.shards, batch=args.batch, lease_ms=args.lease_ms,
                                **({"name": args.name} if args.name else {}))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    store_config = FeatureStoreConfig.from_env(
        url=args.redis_url, cluster_nodes=args.cluster_nodes, read_timeout_s=args.timeout,
        request_timeout_s=args.timeout, connect_timeout_s=min(args.timeout, 5.0), item_cache_size=0)
    clusterer = None
    if args.cluster_bundle:
        from ingest.bulk import clusterer_from_bundle

        try:
            clusterer = clusterer_from_bundle(args.cluster_bundle)
        except (OSError, ValueError) as exc:
            raise UserError(f"--cluster-bundle {args.cluster_bundle}: {exc}") from None
        log.info("assigning twin_v2 cluster ids with %s (tables %s)", args.cluster_bundle,
                 clusterer.fingerprint.hex())
    metrics = ConsumerMetrics()
    if args.metrics_port is not None:
        start_http_server(args.metrics_port, registry=metrics.registry)
    return asyncio.run(_consume(store_config, config, metrics, clusterer))


async def _consume(store_config: FeatureStoreConfig, config: ConsumerConfig, metrics: ConsumerMetrics,
                   clusterer: UserClusterer | None = None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    store = create_store(store_config)
    if not isinstance(store, RedisOnlineStore):
        raise UserError("rankserve consume needs the Redis feature store")
    async with store:
        consumer = StreamConsumer(store, config, metrics, clusterer)
        tune_gc()
        log.info("consuming %d event shards as %s", config.shards, config.name,
                 extra={"shards": config.shards, "consumer": config.name})
        await consumer.run(stop)
    log.info("consumer stopped", extra={"consumer": config.name})
    return 0

