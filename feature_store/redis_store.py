"""Redis implementation of `OnlineStore`: single node (incl. the embedded Valkey) and Cluster.

Reads: one pipeline per fetch. On a single node that is GET profile, GETRANGE of the sequence's
newest `n*12` bytes (a negative start: the server clamps it to 0 for shorter sequences), with
`read_clusters` a STRLEN of the sequence and a GET of its behaviour clusters (`twin_v2`; the
length aligns the stored cluster ids with the newest events read), and one MGET of the item keys
the in-process cache does not hold. In Cluster mode the user's keys share a slot (hash tag);
all commands, items as one GET per key, are grouped by node with the slot map and sent as one
plain pipeline per node, concurrently: one round trip per node. On a single node the fetch's
pipeline goes over the store's own hiredis-parsed connections (`connections.LeanReads`). When
the cached active pointer is due for a refresh, its GET rides in the same pipeline, so no
request pays an extra round trip for it.

Failures: redis-py's own retries are switched off; `_run` retries connection and timeout errors
only, with exponential backoff and full jitter, bounded by `retry_attempts` and by the
`request_timeout_s` deadline of the whole call, and raises typed `FeatureStoreError`s.

This module is one class, the store's read, write and version paths, kept together because they
share its retry, deadline and cluster-routing state; the clients it builds are in `connections`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from collections.abc import Sequence as SequenceABC
from functools import partial
from typing import Any, NamedTuple, TypeVar, cast

import numpy as np
import numpy.typing as npt
from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from feature_store import keys
from feature_store.cache import ItemCache
from feature_store.codecs import (
    CLUSTER_ENTRY_SIZE,
    CLUSTER_HEADER_SIZE,
    CLUSTER_HEADER_SIZE_V1,
    CLUSTER_MAGIC,
    SEQ_RECORD_SIZE,
    CodecError,
    ItemValues,
    Sequence,
    align_clusters,
    decode_item_rows,
    decode_item_values,
    decode_profile_value,
    decode_sequence,
    encode_sequence,
)
from feature_store.connections import cluster_client, lean_reads_for, node_client, single_client
from feature_store.embedded import EmbeddedValkey
from feature_store.errors import (
    FeatureStoreConfigError,
    FeatureStoreDataError,
    FeatureStoreError,
    FeatureStoreTimeout,
    FeatureStoreUnavailable,
    VersionConflict,
    VersionNotFound,
)
from feature_store.logs import RateLimitedLog
from feature_store.store import (
    STATUS_COMPLETE,
    STATUS_DROPPING,
    AppendCounts,
    FeatureStoreConfig,
    FetchCounts,
    FetchResult,
    OnlineStore,
    RetryPolicy,
    StoredSchema,
    StoreHealth,
    UserAppend,
    VersionMeta,
    trim_slack,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
AnyClient = Redis | RedisCluster

# APPEND the new records; once the value is past the cap by its slack (`store.trim_slack`), keep only
# the newest cap_bytes (whole 12-byte records, because every value is a multiple of 12 and
# cap_bytes is too). Trimming copies the whole value (GETRANGE + SET, each a fresh allocation of
# ~120 KB at 10,000 events): done on every append it held Valkey ~60 us per user at the cap, so
# a user at the cap pays it once per slack events instead. A Lua script runs atomically, so
# concurrent appends never interleave between the APPEND and the trim. `clu`, the user's
# behaviour clusters (same hash tag, so legal in Cluster), covers the oldest events: when the
# trim drops n records, the script drops their n cluster ids too, so the ids stay aligned.
# ARGV of both scripts starts (`_append_trim_args`): cap bytes, slack bytes, ttl, old-format
# cluster header size, record size, cluster entry size. `ids_offset` reads where a clustering's
# ids start from its header (`codecs.decode_cluster_header`, whose magic and header size fill the
# placeholders): after the header and C x D float32 centroids.
_APPEND_TRIM_LUA = """
local cap, slack, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local header_v1, size, entry = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local function ids_offset(h)
  if string.sub(h, 1, 4) == '$MAGIC' then
    local c = string.byte(h, 13) + 256 * string.byte(h, 14)
    local d = string.byte(h, 15) + 256 * string.byte(h, 16)
    return $HEADER + 4 * c * d
  end
  return header_v1
end
local function append_trim(seq, clu_key, payload)
  local len = redis.call('APPEND', seq, payload)
  if len > cap + slack then
    local tail = redis.call('GETRANGE', seq, len - cap, -1)
    redis.call('SET', seq, tail, 'KEEPTTL')
    local clu = redis.call('GET', clu_key)
    if clu then
      local dropped = (len - cap) / size * entry
      local start = ids_offset(clu)
      redis.call('SET', clu_key, string.sub(clu, 1, start) .. string.sub(clu, start + dropped + 1), 'KEEPTTL')
    end
    len = cap
  end
  if ttl > 0 then
    redis.call('EXPIRE', seq, ttl)
    if redis.call('EXISTS', clu_key) == 1 then redis.call('EXPIRE', clu_key, ttl) end
  end
  return len
end
""".replace("$MAGIC", CLUSTER_MAGIC.decode()).replace("$HEADER", str(CLUSTER_HEADER_SIZE))
# KEYS: sequence, clusters; ARGV 7: the records.
# `update_meta`: replace the meta key only while it exists and its status is not ARGV[2] (dropping);
# one key, so one slot in a Cluster. A meta that is not JSON is replaced, as `put_meta` would.
_UPDATE_META_LUA = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local ok, doc = pcall(cjson.decode, current)
if ok and type(doc) == 'table' and doc['status'] == ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""
APPEND_SCRIPT = _APPEND_TRIM_LUA + "return append_trim(KEYS[1], KEYS[2], ARGV[7])\n"


def _append_trim_args(cap: int, ttl_seconds: int | None) -> tuple[int, ...]:
    """The ARGV both append scripts start with, for a sequence capped at `cap` events."""
    return (cap * SEQ_RECORD_SIZE, trim_slack(cap) * SEQ_RECORD_SIZE, int(ttl_seconds or 0), CLUSTER_HEADER_SIZE_V1,
            SEQ_RECORD_SIZE, CLUSTER_ENTRY_SIZE)

# The streaming consumer's append, for one or more users in one call (one user per call in a
# Cluster, whose scripts may touch one slot only). Each record comes with the 8-byte hash of its
# event id (`event_id_hash`), and the user's third key (same hash tag) holds the hashes of the
# user's newest applied ids, concatenated: a record whose hash is there already (a redelivered
# entry, a producer's retry, a repeat inside the batch) is skipped, so an at-least-once stream
# appends each event once. A plain string, not a sorted set: one GET and one SET a user instead
# of five set commands and their allocations. Optionally each record also comes with a cluster
# id (the nearest centroid of the clustering whose 20-byte header is given): the fresh records'
# ids are appended to the clustering when it is still that clustering (same header) and covers
# every event before the append, so ids and events stay aligned; otherwise the new events stay
# without an id. KEYS: sequence, clusters, id hashes, per user. ARGV 7: hashes kept per user, 8:
# their TTL in seconds, 9: "1" when cluster ids follow, else "0"; then the call's users' data
# packed in a few strings, in KEYS order (thousands of small arguments cost the server more to
# parse than the script's own work): 10: each user's event count n (u16 little-endian), 11: the
# records, 12: the event id hashes, and with ids 13: each user's cluster header (all zero bytes:
# none) and 14: one u16 id per event (ignored for a user without a header). Returns, flat, per
# user {appended, duplicates} and with ids also the number of events stored with an id.
APPEND_ONCE_SCRIPT = _APPEND_TRIM_LUA + """
local window, id_ttl = tonumber(ARGV[7]) * 8, tonumber(ARGV[8])
local with_ids = ARGV[9] == '1'
local counts, records_all, hashes_all = ARGV[10], ARGV[11], ARGV[12]
local headers, ids_all, header_size = '', '', $HEADER
if with_ids then headers, ids_all = ARGV[13], ARGV[14] end
local no_header = string.rep('\\0', header_size)
local function seen_in(hashes, h)
  local from = 1
  while true do
    local at = string.find(hashes, h, from, true)
    if not at then return false end
    if (at - 1) % 8 == 0 then return true end
    from = at + 1
  end
end
local out = {}
local at_record, at_hash, at_id = 0, 0, 0
for u = 1, #KEYS / 3 do
  local seq, clu, evid = KEYS[3 * u - 2], KEYS[3 * u - 1], KEYS[3 * u]
  local n = string.byte(counts, 2 * u - 1) + 256 * string.byte(counts, 2 * u)
  local payload = string.sub(records_all, at_record + 1, at_record + n * size)
  local given = string.sub(hashes_all, at_hash + 1, at_hash + n * 8)
  at_record, at_hash = at_record + n * size, at_hash + n * 8
  local clu_header, ids = '', ''
  if with_ids then
    clu_header = string.sub(headers, (u - 1) * header_size + 1, u * header_size)
    if clu_header == no_header then clu_header = ''
    else ids = string.sub(ids_all, at_id + 1, at_id + n * entry) end
    at_id = at_id + n * entry
  end
  local hashes = redis.call('GET', evid) or ''
  local fresh = 0
  local records, added = payload, given
  if n == 1 then  -- most users of a batch: no tables to build
    if not seen_in(hashes, given) then fresh = 1 end
  else
    local parts, new, taken, kept = {}, {}, {}, {}
    for k = 1, n do
      local h = string.sub(given, k * 8 - 7, k * 8)
      if not taken[h] and not seen_in(hashes, h) then
        taken[h] = true
        fresh = fresh + 1
        parts[fresh] = string.sub(payload, (k - 1) * size + 1, k * size)
        new[fresh] = h
        if ids ~= '' then kept[fresh] = string.sub(ids, (k - 1) * entry + 1, k * entry) end
      end
    end
    if fresh < n then
      records, added = table.concat(parts), table.concat(new)
      if ids ~= '' then ids = table.concat(kept) end
    end
  end
  local clustered = 0
  if fresh > 0 then
    if ids ~= '' and redis.call('GETRANGE', clu, 0, header_size - 1) == clu_header then
      local covered = (redis.call('STRLEN', clu) - ids_offset(clu_header)) / entry
      if covered * size == redis.call('STRLEN', seq) then
        redis.call('APPEND', clu, ids)
        clustered = fresh
      end
    end
    append_trim(seq, clu, records)
    hashes = hashes .. added
    if #hashes > window then hashes = string.sub(hashes, -window) end
    redis.call('SET', evid, hashes, 'EX', id_ttl)
  end
  if with_ids then
    out[3 * u - 2], out[3 * u - 1], out[3 * u] = fresh, n - fresh, clustered
  else
    out[2 * u - 1], out[2 * u] = fresh, n - fresh
  end
end
return out
""".replace("$HEADER", str(CLUSTER_HEADER_SIZE))


# The first ARGV[1] bytes of each key's value: `RedisOnlineStore.read_prefixes` on a single node.
_READ_PREFIXES = """
local out, n = {}, tonumber(ARGV[1]) - 1
for i = 1, #KEYS do out[i] = redis.call('GETRANGE', KEYS[i], 0, n) end
return out
"""
_PREFIX_READS_PER_CALL = 4096  # keys per script call: bounds the time one call holds the server


def event_id_hash(event_id: bytes) -> bytes:
    """The 8 bytes the append script keeps of an event id (blake2b: a false repeat once in 2^64)."""
    return hashlib.blake2b(event_id, digest_size=8).digest()


# What one append script call holds on a single node, so that it holds the server a quarter of a
# millisecond at most: Redis runs a script to its end while every other client waits, and a
# serving fetch that arrives during a consumer's call waits for all of it. A call costs about
# 16 us per user entry (the applied-id window's GET and SET, the APPEND) and 1 us per event.
APPEND_ONCE_CHUNK = 256  # events per user entry, and per call
APPEND_ONCE_USERS = 16  # user entries per call
# calls sent before the first one's answer, each on its own connection: the server always has the
# next one to run (one at a time halved the consumer's throughput), and a fetch waits for at most
# this many calls (1 ms) where one pipelined batch of 1,000 events held it for about 16 ms. A
# consumer that keeps up sends one at a time (`apply_appends(in_flight=1)`): it has the time.
APPEND_CALLS_IN_FLIGHT = 4


class EncodedAppends(NamedTuple):
    """`RedisOnlineStore.encode_appends`' script calls: the commands, per call the index of the
    append each user entry came from (a user with more than APPEND_ONCE_CHUNK events spans
    entries), the number of appends, whether cluster ids were sent, and per call its user ids."""

    commands: list[tuple[Any, ...]]
    owners: list[list[int]]
    users: int
    with_ids: bool
    call_users: list[frozenset[int]]


_NO_CLUSTER_HEADER = bytes(CLUSTER_HEADER_SIZE)  # a user entry sent without cluster ids

# Item caches are per version; more than a couple are alive only around a version switch.
_MAX_ITEM_CACHES = 4

# The item change log (`keys.item_changes_key`): each upsert batch adds entries of up to
# ITEM_CHANGES_IDS_PER_ENTRY int64 ids (little-endian, field `ids`), and each XADD trims the
# entries older than ITEM_CHANGES_RETENTION_S (MINID, by the stream ids' millisecond clock). A
# store that has not read a log for half that time no longer trusts it to hold everything it
# missed and empties that version's item cache instead.
ITEM_CHANGES_IDS_PER_ENTRY = 4096
ITEM_CHANGES_RETENTION_S = 600.0
_ITEM_CHANGES_PER_READ = 64  # entries per XREAD; a read that returns this many is followed by another
_ITEM_CHANGES_MAX_READS = 16  # reads per version and call: the rest waits for the next call


def _merge_items(ids: list[int], rows: npt.NDArray[np.uint8] | None, held: npt.NDArray[np.bool_],
                 missing: list[int], fetched: list[bytes | None]) -> ItemValues:
    """The decoded values of `ids`: the item cache's `rows` (`ItemCache.get_rows`), with the
    values fetched for the `missing` positions decoded into them."""
    if rows is not None and len(missing) < len(ids):
        out = decode_item_rows(rows, held)
        if not missing:  # all cached: the common case of a warm cache
            return out
        got = decode_item_values(fetched, [ids[p] for p in missing])
        if not got.found.any() or got.side.shape[1] == out.side.shape[1]:
            at = np.asarray(missing, dtype=np.intp)
            out.item[at], out.category[at], out.found[at] = got.item, got.category, got.found
            if got.found.any():
                out.side[at] = got.side
            return out
    # nothing cached, or fetched values of another size than the cached ones: every value through
    # the bytes decoder, which names an item whose value does not fit
    values: list[bytes | None] = [None] * len(ids)
    if rows is not None:
        values = [bytes(row) if h else None for row, h in zip(rows, held.tolist(), strict=True)]
    for p, value in zip(missing, fetched, strict=True):
        values[p] = value
    return decode_item_values(values, ids)


def item_change_commands(version: str, item_ids: SequenceABC[int]) -> list[tuple[Any, ...]]:
    """The XADDs that announce `item_ids` as rewritten on `version`'s item change log."""
    ids = np.asarray(item_ids, dtype="<i8")
    key = keys.item_changes_key(version)
    oldest_kept = int((time.time() - ITEM_CHANGES_RETENTION_S) * 1000)
    return [("XADD", key, "MINID", "~", oldest_kept, "*", b"ids", ids[k : k + ITEM_CHANGES_IDS_PER_ENTRY].tobytes())
            for k in range(0, ids.shape[0], ITEM_CHANGES_IDS_PER_ENTRY)]


def decode_item_change(fields: dict[bytes, bytes]) -> npt.NDArray[np.int64]:
    """The item ids of one item change log entry (none from an entry not written by `item_change_commands`)."""
    raw = fields.get(b"ids", b"")
    if len(raw) % 8:
        return np.zeros(0, dtype=np.int64)
    return np.frombuffer(raw, dtype="<i8").astype(np.int64)


def never_sent(exc: BaseException) -> bool:
    """Whether a redis-py error says the connection could not be made, so no command was sent.

    redis-py raises its ConnectionError / TimeoutError for a failed connect as for a failed read;
    only the message tells them apart ("Error 111 connecting to ...", "Timeout connecting to
    server"). On a loaded machine a connect can miss its timeout; an append must not fail for it.
    """
    return isinstance(exc, rex.ConnectionError | rex.TimeoutError) and "connecting to" in str(exc)


def routing_key(command: tuple[Any, ...]) -> Any:
    """The key a single-slot command is routed by: its first key (EVAL's after the key count,
    XREAD's and XREADGROUP's after STREAMS, XGROUP's and XINFO's after the subcommand), else its first argument."""
    name = command[0].upper() if isinstance(command[0], str) else command[0].decode().upper()
    if name in ("EVALSHA", "EVAL"):
        return command[3]
    if name in ("XGROUP", "XINFO"):
        return command[2]
    if name in ("XREADGROUP", "XREAD"):
        return command[[str(part).upper() for part in command].index("STREAMS") + 1]
    return command[1]


class RedisOnlineStore(OnlineStore):
    """`OnlineStore` on redis-py asyncio (hiredis parser), single node or Cluster."""

    def __init__(self, config: FeatureStoreConfig, client: AnyClient, *, embedded: Any = None) -> None:
        self.config = config
        self._client: AnyClient = client
        self._cluster = isinstance(client, RedisCluster)
        self._embedded = embedded  # EmbeddedValkey this store started, stopped on aclose()
        self._retry = RetryPolicy.from_config(config)
        self._append_script = client.register_script(APPEND_SCRIPT)
        self._append_once_script = client.register_script(APPEND_ONCE_SCRIPT)
        self._item_caches: dict[str, ItemCache] = {}
        # per version: the id of the last item change read, and when the log was last read
        self._change_cursors: dict[str, tuple[bytes, float]] = {}
        self._counts = FetchCounts()
        self._cluster_errors = RateLimitedLog(log, 10.0)  # one line every 10 s, not one per fetch
        self._node_clients: dict[str, Redis] = {}  # cluster mode: plain clients per node, for reads
        # single node: the fetch's own connections (redis-py's reader is most of a fetch's client CPU)
        self._lean = None if self._cluster or not config.lean_reads else lean_reads_for(cast(Redis, client), config)
        self._valid_versions: set[str] = set()
        self._active: str | None = None
        self._active_checked = 0.0
        self._closed = False

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: FeatureStoreConfig) -> RedisOnlineStore:
        mode = config.resolved_mode()
        embedded = None
        url = config.url
        if mode == "embedded":
            embedded = EmbeddedValkey(config.embedded)
            url = embedded.start()
        try:
            client = cluster_client(config) if mode == "cluster" else single_client(config, url)
        except (ValueError, rex.RedisError) as exc:
            if embedded is not None:
                embedded.stop()
            raise FeatureStoreConfigError(f"cannot configure the Redis client: {exc}") from exc
        return cls(config, client, embedded=embedded)

    @property
    def mode(self) -> str:
        if self._cluster:
            return "cluster"
        return "embedded" if self._embedded is not None else "single"

    @property
    def call_deadline_s(self) -> float:
        """Seconds one call may take, retries included (a blocking read must wait less)."""
        return self._retry.deadline_s

    @property
    def embedded(self) -> Any:
        """The EmbeddedValkey this store started (None unless in embedded mode)."""
        return self._embedded

    @property
    def client(self) -> AnyClient:
        """The underlying redis-py client (for tools and tests; not part of the interface)."""
        return self._client

    # -- retries and error mapping -------------------------------------------------------------------

    async def _run(self, what: str, op: Callable[[], Awaitable[T]], *, retry: bool = True) -> T:
        """Run `op` under the call deadline, retrying only connection and timeout errors."""
        policy = self._retry
        start = time.monotonic()
        deadline = start + policy.deadline_s
        attempt = 0
        while True:
            attempt += 1
            timer = asyncio.timeout_at(asyncio.get_running_loop().time() + (deadline - time.monotonic()))
            try:
                async with timer:
                    return await op()
            except (rex.ConnectionError, rex.TimeoutError, ConnectionError, TimeoutError) as exc:
                elapsed = time.monotonic() - start
                if isinstance(exc, TimeoutError) and timer.expired():
                    raise FeatureStoreTimeout(
                        f"{what}: no answer within the {policy.deadline_s:.3f}s deadline (attempt {attempt})"
                    ) from exc
                if (
                    self._cluster
                    and isinstance(exc, rex.ConnectionError)
                    and not isinstance(exc, rex.MaxConnectionsError)
                ):
                    await self._refresh_cluster_topology()
                pause = policy.backoff(attempt)
                # a command that is not safe to repeat is still retried when its connection was
                # never established: nothing reached the server
                retriable = retry or never_sent(exc)
                if not retriable or attempt >= policy.attempts or elapsed + pause >= policy.deadline_s:
                    raise FeatureStoreUnavailable(
                        f"{what}: {type(exc).__name__}: {exc} (attempt {attempt}, {elapsed:.3f}s)"
                    ) from exc
                log.debug("%s: %s, retry %d in %.3fs", what, type(exc).__name__, attempt, pause)
                await asyncio.sleep(pause)
            except (rex.ClusterDownError, rex.TryAgainError, rex.ClusterError, rex.SlotNotCoveredError) as exc:
                raise FeatureStoreUnavailable(f"{what}: cluster unavailable: {exc}") from exc
            except CodecError as exc:
                raise FeatureStoreDataError(f"{what}: {exc}") from exc
            except (rex.RedisError, rex.RedisClusterException) as exc:
                raise FeatureStoreError(f"{what}: {type(exc).__name__}: {exc}") from exc

    async def _refresh_cluster_topology(self) -> None:
        # A node went away (restart, failover): drop connections and the slot map so the next
        # call re-reads CLUSTER SLOTS from a live node; redis-py does the same in its own retries.
        try:
            await self._client.aclose()
        except Exception as exc:  # closing half-dead connections can fail; nothing to do about it
            log.debug("cluster topology refresh: %s", exc)
        await self._close_node_clients()

    # -- versions and the active pointer ---------------------------------------------------------------

    def _checked_version(self, version: str) -> str:
        if version not in self._valid_versions:
            keys.validate_version(version)
            self._valid_versions.add(version)
        return version

    async def active_version(self, refresh: bool = False) -> str | None:
        if not refresh and self._active is not None and not self._refresh_due():
            return self._active
        raw = await self._run("read active version", lambda: self._client.get(keys.ACTIVE_KEY))
        self._set_active(cast(bytes | None, raw))
        return self._active

    def _refresh_due(self) -> bool:
        return time.monotonic() - self._active_checked >= self.config.active_refresh_interval_s

    def _set_active(self, raw: bytes | None) -> None:
        self._active_checked = time.monotonic()
        new = raw.decode() if raw else None
        if new == self._active:
            return
        if new is None:
            # A deleted pointer is an operator mistake; keep serving what we had rather than fail all.
            if self._active is not None:
                log.warning("active version pointer is gone; still serving %s", self._active)
            return
        log.info("active feature-set version: %s -> %s", self._active, new)
        self._active = new

    async def _read_version(self, version: str | None) -> tuple[str, bool]:
        """(version to read, whether to piggyback a GET of the active pointer)."""
        pinned = version or self.config.version
        if pinned:
            return self._checked_version(pinned), False
        if self._active is None:
            await self.active_version(refresh=True)
            if self._active is None:
                raise VersionNotFound("no active feature-set version: run `rankserve ingest --activate`")
            return self._active, False
        return self._active, self._refresh_due()

    async def active_schema_hash(self) -> str | None:
        version = self.config.version or await self.active_version()
        if version is None:
            return None
        meta = await self.get_meta(version)
        return meta.schema_hash if meta else None

    async def get_meta(self, version: str) -> VersionMeta | None:
        key = keys.meta_key(self._checked_version(version))
        raw = await self._run("read version meta", lambda: self._client.get(key))
        if raw is None:
            return None
        try:
            return VersionMeta.from_json(raw)
        except (ValueError, TypeError) as exc:
            raise FeatureStoreDataError(f"meta of version {version!r} is not valid JSON: {exc}") from exc

    async def put_meta(self, meta: VersionMeta) -> None:
        version = self._checked_version(meta.version)
        meta.updated = time.time()
        payload = meta.to_json()

        async def op() -> None:
            pipe = self._client.pipeline(transaction=False)
            pipe.set(keys.meta_key(version), payload)
            pipe.sadd(keys.VERSIONS_KEY, version)
            await pipe.execute()

        await self._run("write version meta", op)

    async def update_meta(self, meta: VersionMeta) -> bool:
        version = self._checked_version(meta.version)
        meta.updated = time.time()
        key, payload = keys.meta_key(version), meta.to_json()
        written = await self._run("update version meta", lambda: self._client.eval(
            _UPDATE_META_LUA, 1, key, payload, STATUS_DROPPING))
        return bool(written)

    async def put_schema(self, version: str, schema: StoredSchema) -> None:
        key = keys.schema_key(self._checked_version(version))
        payload = json.dumps({"hash": schema.schema_hash, "spec": schema.spec}, sort_keys=True).encode()
        await self._run("write version schema", lambda: self._client.set(key, payload))

    async def get_schema(self, version: str) -> StoredSchema | None:
        key = keys.schema_key(self._checked_version(version))
        raw = await self._run("read version schema", lambda: self._client.get(key))
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            return StoredSchema(str(doc["hash"]), dict(doc["spec"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise FeatureStoreDataError(f"recorded schema of version {version!r} is not valid: {exc!r}") from exc

    async def list_versions(self) -> list[str]:
        members = await self._run("list versions", lambda: self._client.smembers(keys.VERSIONS_KEY))
        return sorted(m.decode() for m in cast(set[bytes], members))

    async def activate(self, version: str) -> None:
        meta = await self.get_meta(version)
        if meta is None:
            raise VersionNotFound(f"version {version!r} has no meta key: nothing was ingested under it")
        if meta.status != STATUS_COMPLETE:
            raise VersionConflict(f"version {version!r} is {meta.status!r}, not {STATUS_COMPLETE!r}: finish the ingest")
        await self._run("switch active version", lambda: self._client.set(keys.ACTIVE_KEY, version))
        self._set_active(version.encode())

    async def drop_version(self, version: str, *, batch: int = 1000) -> int:
        version = self._checked_version(version)
        if await self.active_version(refresh=True) == version:
            raise VersionConflict(f"version {version!r} is active: activate another one before dropping it")
        meta = await self.get_meta(version)
        if meta is not None:
            meta.status = STATUS_DROPPING
            await self.put_meta(meta)
        removed = 0
        async for found in self.scan_keys(keys.version_match_pattern(version), batch=batch):
            removed += await self._run("unlink version keys", partial(self._unlink, found))

        async def forget() -> None:
            pipe = self._client.pipeline(transaction=False)
            pipe.delete(keys.meta_key(version))
            pipe.delete(keys.schema_key(version))
            pipe.srem(keys.VERSIONS_KEY, version)
            await pipe.execute()

        await self._run("forget version", forget)
        self._item_caches.pop(version, None)
        self._change_cursors.pop(version, None)
        log.info("dropped feature-set version %s", version, extra={"keys_removed": removed})
        return removed

    async def scan_keys(self, pattern: bytes, *, batch: int = 1000) -> AsyncIterator[list[bytes]]:
        """Pages of the keys matching a SCAN pattern, on every primary (each page under the
        call deadline and retry policy; a key may appear twice, as SCAN promises no more)."""
        for node in self._scan_targets():
            cursor = 0
            while True:
                cursor, found = await self._run("scan keys", partial(self._scan, node, cursor, pattern, batch))
                if found:
                    yield found
                if cursor == 0:
                    break

    def _scan_targets(self) -> list[Any]:
        if isinstance(self._client, RedisCluster):
            return list(self._client.get_primaries()) or [None]
        return [None]

    async def _scan(self, node: Any, cursor: int, pattern: bytes, count: int) -> tuple[int, list[bytes]]:
        if isinstance(self._client, RedisCluster):
            if self._client._initialize:  # get_primaries() needs the slot map
                await self._client.initialize()
            cur, found = await self._client.scan(cursor=cursor, match=pattern, count=count, target_nodes=node)
            if isinstance(cur, dict):  # the cluster client answers per node name
                cur = next(iter(cur.values()), 0)
            return int(cur), [cast(bytes, k) for k in found]
        cur, found = await self._client.scan(cursor=cursor, match=pattern, count=count)
        return int(cur), [cast(bytes, k) for k in found]

    async def _unlink(self, found: list[bytes]) -> int:
        if isinstance(self._client, RedisCluster):
            # One key per UNLINK: keys of one SCAN page lie in many slots.
            pipe = self._client.pipeline(transaction=False)
            for key in found:
                pipe.execute_command("UNLINK", key)
            return int(sum(await pipe.execute()))
        return int(await self._client.unlink(*found))

    # -- reads -----------------------------------------------------------------------------------------

    def _item_cache(self, version: str) -> ItemCache:
        cache = self._item_caches.get(version)
        if cache is None:
            if len(self._item_caches) >= _MAX_ITEM_CACHES:
                self._change_cursors.pop(oldest := next(iter(self._item_caches)), None)
                self._item_caches.pop(oldest)
            # a new cache starts without a change log cursor: the next read of the log finds
            # where it stands (and empties what the cache took meanwhile)
            self._change_cursors.pop(version, None)
            # value size from the first value: item records plus the version's side tails
            cache = ItemCache(self.config.item_cache_size, self.config.item_cache_ttl_s, None)
            self._item_caches[version] = cache
        return cache

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """One pipeline (single node), or one plain pipeline per node, concurrently (Cluster).
        For reads and idempotent writes only: after a redirection the whole list is sent again."""
        if not isinstance(self._client, RedisCluster):
            pipe = self._client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute()
        return await self._cluster_execute(self._client, commands)

    async def _cluster_execute(self, client: RedisCluster, commands: list[tuple[Any, ...]]) -> list[Any]:
        # redis-py's cluster pipeline routes each command through its policy resolver, slot and
        # node lookups for every command, which for 500 item GETs costs more than the round trip
        # (docs/PERFORMANCE.md). Single-key commands only
        # need the slot map: group by node, send each node a plain pipeline. A redirection
        # (resharding, failover) falls back to the cluster pipeline, which follows MOVED/ASK.
        await client.initialize()  # no-op once the slot map is loaded
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        for i, command in enumerate(commands):
            key = routing_key(command)
            node = client.get_node_from_key(key)
            if node is None:
                raise rex.SlotNotCoveredError(f"no node serves key {key!r}")
            group = groups.get(node.name)
            if group is None:
                groups[node.name] = (node, [i])
            else:
                group[1].append(i)

        async def on_node(node: ClusterNode, positions: list[int]) -> list[Any]:
            pipe = self._node_client(node).pipeline(transaction=False)
            for i in positions:
                pipe.execute_command(*commands[i])
            return await pipe.execute(raise_on_error=False)

        answers = await asyncio.gather(*(on_node(node, positions) for node, positions in groups.values()))
        replies: list[Any] = [None] * len(commands)
        for (_, positions), answer in zip(groups.values(), answers, strict=True):
            for i, reply in zip(positions, answer, strict=True):
                if isinstance(reply, Exception):
                    if isinstance(reply, rex.MovedError | rex.AskError | rex.TryAgainError):
                        await self._refresh_cluster_topology()
                        return await self._cluster_pipeline(client, commands)
                    raise reply
                replies[i] = reply
        return replies

    @staticmethod
    async def _cluster_pipeline(client: RedisCluster, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute()

    def _node_client(self, node: ClusterNode) -> Redis:
        """A plain client of one cluster node (same credentials, TLS and timeouts), kept per node."""
        client = self._node_clients.get(node.name)
        if client is None:
            client = node_client(self.config, node.host, int(node.port))
            self._node_clients[node.name] = client
        return client

    async def _close_node_clients(self) -> None:
        clients, self._node_clients = list(self._node_clients.values()), {}
        for client in clients:
            try:
                await client.aclose(close_connection_pool=True)
            except Exception as exc:  # closing half-dead connections can fail; nothing to do about it
                log.debug("closing a cluster node client: %s", exc)

    async def fetch(
        self,
        user_id: int,
        item_ids: SequenceABC[int] | npt.NDArray[np.integer],
        max_sequence_length: int | None = None,
        *,
        version: str | None = None,
    ) -> FetchResult:
        n_seq = self.config.max_sequence_length if max_sequence_length is None else int(max_sequence_length)
        if n_seq < 0:
            raise ValueError("max_sequence_length must be >= 0")
        ids: list[int] = item_ids.tolist() if isinstance(item_ids, np.ndarray) else list(item_ids)
        ver, refresh_active = await self._read_version(version)
        cache = self._item_cache(ver)
        rows: npt.NDArray[np.uint8] | None = None
        generation = cache.generation  # an invalidation during the round trip: the values are not cached
        if cache.enabled and ids:
            rows, held, missing = cache.get_rows(ids)
            self._counts.item_cache_hits += len(ids) - len(missing)
            self._counts.item_cache_misses += len(missing)
            miss_keys = keys.item_keys(ver, [ids[p] for p in missing] if len(missing) < len(ids) else ids)
        else:
            held, missing = np.zeros(len(ids), dtype=bool), list(range(len(ids)))
            miss_keys = keys.item_keys(ver, ids)
        prof_key = keys.profile_key(ver, user_id)
        seq_key = keys.sequence_key(ver, user_id)
        cluster = self._cluster
        with_clusters = bool(n_seq) and self.config.read_clusters

        commands: list[tuple[Any, ...]] = []
        if refresh_active:
            commands.append(("GET", keys.ACTIVE_KEY))
        commands.append(("GET", prof_key))
        if n_seq:
            commands.append(("GETRANGE", seq_key, -n_seq * SEQ_RECORD_SIZE, -1))
        if with_clusters:  # same hash tag: same node, same round trip
            commands.append(("STRLEN", seq_key))
            commands.append(("GET", keys.clusters_key(ver, user_id)))
        if miss_keys:
            if cluster:  # an MGET cannot span slots
                commands.extend(("GET", key) for key in miss_keys)
            else:
                commands.append(("MGET", *miss_keys))
        replies = await self._run("fetch", partial(self._lean.execute if self._lean else self._execute, commands))
        pos = 0
        if refresh_active:
            self._set_active(replies[0])
            pos = 1
        try:
            user_index, user_side = decode_profile_value(replies[pos])
            pos += 1
            sequence = Sequence.empty()
            if n_seq:
                sequence = decode_sequence(replies[pos])
                pos += 1
            if with_clusters:
                stored, raw_clusters = replies[pos], replies[pos + 1]
                pos += 2
                if raw_clusters is not None:
                    sequence = self._with_clusters(sequence, raw_clusters, int(stored), user_id, ver)
            fetched: list[bytes | None] = []
            if miss_keys:
                fetched = replies[pos:] if cluster else replies[pos]
                if cache.enabled:
                    cache.put_many(zip((ids[p] for p in missing), fetched, strict=True), as_of=generation)
            item_index, category_index, found, item_side = _merge_items(ids, rows, held, missing, fetched)
        except CodecError as exc:
            raise FeatureStoreDataError(f"fetch of user {user_id} in version {ver!r}: {exc}") from exc
        if user_index is None:
            self._counts.unknown_users += 1
        self._counts.unknown_items += len(ids) - int(np.count_nonzero(found))
        return FetchResult(ver, user_index, sequence, item_index, category_index, found, user_side, item_side)

    def _with_clusters(self, sequence: Sequence, raw: bytes, stored_bytes: int, user_id: int, ver: str) -> Sequence:
        """The sequence with its behaviour clusters; without them when the value cannot be read.

        Clusters only steer the twin_v2 search, which falls back to exact (and counts it) without
        them: an unreadable value (truncated, or a format a newer ingest wrote) must not cost the
        request its profile, history and items, on every arm.
        """
        try:
            return sequence.with_clusters(align_clusters(raw, stored_bytes // SEQ_RECORD_SIZE, len(sequence)))
        except CodecError as exc:
            self._cluster_errors.warning("behaviour clusters unreadable; searching without them",
                                         user_id=user_id, version=ver, error=str(exc))
            return sequence

    def fetch_counts(self) -> FetchCounts:
        return dataclasses.replace(self._counts)

    async def follow_item_changes(self) -> int:
        dropped = 0
        for version, cache in list(self._item_caches.items()):
            if cache.enabled:
                dropped += await self._follow_item_changes(version, cache)
        self._counts.item_cache_invalidations += dropped
        return dropped

    async def _follow_item_changes(self, version: str, cache: ItemCache) -> int:
        key = keys.item_changes_key(version)
        what = f"read the item change log of version {version!r}"
        cursor, read_at = self._change_cursors.get(version, (b"", 0.0))
        if not cursor or time.monotonic() - read_at > ITEM_CHANGES_RETENTION_S / 2:
            # Where the log stands is unknown (a cache filled before the first read), or entries
            # this store has not read may have been trimmed: start at the newest entry, and drop
            # whatever the cache holds, which may predate announcements never to be read.
            (newest,) = await self._run(what, partial(self._execute, [("XREVRANGE", key, "+", "-", "COUNT", 1)]))
            if cursor:
                self._counts.item_cache_resets += 1
                log.warning("item change log of version %s not read for %.0f s: item cache emptied", version,
                            time.monotonic() - read_at, extra={"version": version})
            self._change_cursors[version] = (newest[0][0] if newest else b"0-0", time.monotonic())
            cache.clear()
            return 0
        dropped = 0
        for _ in range(_ITEM_CHANGES_MAX_READS):
            (read,) = await self._run(what, partial(self._execute, [
                ("XREAD", "COUNT", _ITEM_CHANGES_PER_READ, "STREAMS", key, cursor)]))
            entries = read[0][1] if read else []
            for entry_id, fields in entries:
                dropped += cache.invalidate(decode_item_change(fields))
                cursor = entry_id
            self._change_cursors[version] = (cursor, time.monotonic())
            if len(entries) < _ITEM_CHANGES_PER_READ:
                break
        return dropped

    async def ping(self) -> float:
        start = time.perf_counter()
        if isinstance(self._client, RedisCluster):
            client = self._client
            await self._run("ping", lambda: client.ping(target_nodes=RedisCluster.ALL_NODES))
        else:
            await self._run("ping", self._client.ping)
        return time.perf_counter() - start

    async def health(self) -> StoreHealth:
        nodes = len(self._client.get_nodes()) if isinstance(self._client, RedisCluster) else 1
        try:
            latency = await self.ping()
            version = self.config.version or await self.active_version(refresh=True)
            meta = await self.get_meta(version) if version else None
        except FeatureStoreError as exc:
            return StoreHealth(False, self.mode, nodes, None, self._active, None, str(exc))
        if version is None or meta is None:
            error = "no active feature-set version" if version is None else f"version {version!r} has no meta key"
            return StoreHealth(False, self.mode, nodes, latency * 1e3, version, None, error)
        ok = meta.status == STATUS_COMPLETE
        return StoreHealth(
            ok,
            self.mode,
            nodes,
            latency * 1e3,
            version,
            meta.schema_hash,
            None if ok else f"version {version!r} is {meta.status!r}",
            meta.updated,
        )

    # -- writes ----------------------------------------------------------------------------------------

    async def write_users(
        self,
        version: str,
        user_ids: SequenceABC[int],
        profiles: SequenceABC[bytes],
        sequences: SequenceABC[bytes],
        ttl_seconds: int | None = None,
        clusters: SequenceABC[bytes | None] | None = None,
    ) -> None:
        version = self._checked_version(version)
        if not len(user_ids) == len(profiles) == len(sequences):
            raise ValueError("user_ids, profiles and sequences must have equal length")
        if clusters is not None and len(clusters) != len(user_ids):
            raise ValueError("clusters must have one value (or None) per user")
        expiry: tuple[Any, ...] = ("EX", int(ttl_seconds)) if ttl_seconds and ttl_seconds > 0 else ()
        commands: list[tuple[Any, ...]] = []
        for i, (uid, prof, seq) in enumerate(zip(user_ids, profiles, sequences, strict=True)):
            commands.append(("SET", keys.profile_key(version, uid), prof, *expiry))
            if seq:
                commands.append(("SET", keys.sequence_key(version, uid), seq, *expiry))
            else:  # a user without events (a user-table row): no sequence key, and no stale one
                commands.append(("DEL", keys.sequence_key(version, uid)))
            value = clusters[i] if clusters is not None else None
            if value is None:  # not clustered (short history, or no clusterer): no stale value from an earlier ingest
                commands.append(("DEL", keys.clusters_key(version, uid)))
            else:
                commands.append(("SET", keys.clusters_key(version, uid), value, *expiry))
        # Whole-value SETs are idempotent, so retrying a half-applied batch is safe.
        await self._run(f"write {len(user_ids)} users", partial(self._execute, commands))

    async def write_items(
        self, version: str, item_ids: SequenceABC[int], values: SequenceABC[bytes], *, announce: bool = False
    ) -> None:
        version = self._checked_version(version)
        if len(item_ids) != len(values):
            raise ValueError("item_ids and values must have equal length")
        key_list = keys.item_keys(version, item_ids)
        commands: list[tuple[Any, ...]]
        if self._cluster:  # an MSET cannot span slots
            commands = [("SET", key, value) for key, value in zip(key_list, values, strict=True)]
        else:
            commands = [("MSET", *(part for pair in zip(key_list, values, strict=True) for part in pair))]
        await self._run(f"write {len(item_ids)} items", partial(self._execute, commands))
        if announce and len(item_ids):
            # Only once the values are written (in a Cluster they lie on other nodes than the
            # log): a server that reads the announcement and drops its entry reads the new value.
            # Repeating an XADD after a lost reply announces twice, which is harmless.
            await self._run(f"announce {len(item_ids)} changed items",
                            partial(self._execute, item_change_commands(version, item_ids)))

    async def write_profiles(
        self, version: str, user_ids: SequenceABC[int], profiles: SequenceABC[bytes], ttl_seconds: int | None = None
    ) -> None:
        version = self._checked_version(version)
        if len(user_ids) != len(profiles):
            raise ValueError("user_ids and profiles must have equal length")
        # KEEPTTL: a profile rewritten in place keeps the expiry its ingest gave the user's keys
        expiry: tuple[Any, ...] = ("EX", int(ttl_seconds)) if ttl_seconds and ttl_seconds > 0 else ("KEEPTTL",)
        commands: list[tuple[Any, ...]] = [
            ("SET", keys.profile_key(version, uid), prof, *expiry) for uid, prof in zip(user_ids, profiles, strict=True)
        ]
        await self._run(f"write {len(user_ids)} profiles", partial(self._execute, commands))

    async def read_profiles(self, version: str, user_ids: SequenceABC[int]) -> list[bytes | None]:
        version = self._checked_version(version)
        commands: list[tuple[Any, ...]] = [("GET", keys.profile_key(version, uid)) for uid in user_ids]
        if not commands:
            return []
        return list(await self._run(f"read {len(commands)} profiles", partial(self._execute, commands)))

    async def read_items(self, version: str, item_ids: SequenceABC[int]) -> list[bytes | None]:
        version = self._checked_version(version)
        key_list = keys.item_keys(version, item_ids)
        if not key_list:
            return []
        if self._cluster:  # an MGET cannot span slots
            commands: list[tuple[Any, ...]] = [("GET", key) for key in key_list]
            return list(await self._run(f"read {len(key_list)} items", partial(self._execute, commands)))
        replies = await self._run(f"read {len(key_list)} items", partial(self._execute, [("MGET", *key_list)]))
        return list(replies[0])

    async def append_events(
        self,
        user_id: int,
        events: Sequence,
        *,
        cap: int | None = None,
        version: str | None = None,
        ttl_seconds: int | None = None,
    ) -> int:
        limit = self.config.max_sequence_length if cap is None else int(cap)
        if limit < 1:
            raise ValueError("cap must be >= 1")
        ver, _ = await self._read_version(version)
        key = keys.sequence_key(ver, user_id)
        clusters_key = keys.clusters_key(ver, user_id)
        if len(events) == 0:
            length = await self._run("sequence length", lambda: self._client.strlen(key))
            return int(length) // SEQ_RECORD_SIZE
        try:
            payload = encode_sequence(events.item, events.category, events.action, events.timestamp)
        except CodecError as exc:
            raise FeatureStoreDataError(f"append for user {user_id}: {exc}") from exc
        args: list[bytes | int] = [*_append_trim_args(limit, ttl_seconds), payload]
        # APPEND is not idempotent: a lost reply could mean it was applied, so no retry here.
        # The error is still marked retriable; a caller that retries accepts at-least-once.
        length = await self._run(
            "append events", lambda: self._append_script(keys=[key, clusters_key], args=args), retry=False
        )
        return int(length) // SEQ_RECORD_SIZE

    async def append_events_once(
        self,
        appends: SequenceABC[UserAppend],
        *,
        version: str | None = None,
        cap: int | None = None,
        ttl_seconds: int | None = None,
        id_window: int = 1024,
        id_ttl_s: int = 86_400,
    ) -> list[AppendCounts]:
        if not appends:
            return []
        ver, _ = await self._read_version(version)
        return await self.apply_appends(self.encode_appends(
            appends, ver, cap=cap, ttl_seconds=ttl_seconds, id_window=id_window, id_ttl_s=id_ttl_s))

    def encode_appends(
        self,
        appends: SequenceABC[UserAppend],
        version: str,
        *,
        cap: int | None = None,
        ttl_seconds: int | None = None,
        id_window: int = 1024,
        id_ttl_s: int = 86_400,
    ) -> EncodedAppends:
        """`append_events_once`'s script calls for `appends`, built without I/O, so a caller can
        build the next batch's (in a worker thread) while the last one is being applied."""
        ver = self._checked_version(version)
        limit = self.config.max_sequence_length if cap is None else int(cap)
        if limit < 1 or id_window < 1 or id_ttl_s < 1:
            raise ValueError("cap, id_window and id_ttl_s must be >= 1")
        with_ids = any(a.cluster_ids for a in appends)
        fixed = (*_append_trim_args(limit, ttl_seconds), int(id_window), int(id_ttl_s), b"1" if with_ids else b"0")
        counts = [len(a.event_ids) for a in appends]
        if [len(a.records) for a in appends] != [SEQ_RECORD_SIZE * n for n in counts]:
            bad = next(a for a in appends if len(a.records) != SEQ_RECORD_SIZE * len(a.event_ids))
            raise ValueError(f"user {bad.user_id}: {len(bad.records)} record bytes for {len(bad.event_ids)} event ids")
        for a in appends if with_ids else ():
            if a.cluster_ids and (len(a.cluster_ids) != CLUSTER_ENTRY_SIZE * len(a.event_ids)
                                  or len(a.cluster_header) != CLUSTER_HEADER_SIZE):
                raise ValueError(f"user {a.user_id}: {len(a.cluster_ids)} cluster id bytes for {len(a.event_ids)}"
                                 f" events (or a cluster header not of {CLUSTER_HEADER_SIZE} bytes)")
        # user entries: one per append, except that an append of more than APPEND_ONCE_CHUNK
        # events (rare: a backlog of one user) is cut into entries of that many; none for an append
        # of no events
        entries: SequenceABC[UserAppend] = appends
        owners = list(range(len(appends)))
        if counts and (max(counts) > APPEND_ONCE_CHUNK or min(counts) == 0):
            entries, owners, counts = [], [], []
            for k, a in enumerate(appends):
                for lo in range(0, len(a.event_ids), APPEND_ONCE_CHUNK):
                    hi = min(lo + APPEND_ONCE_CHUNK, len(a.event_ids))
                    entries.append(UserAppend(a.user_id, a.records[lo * SEQ_RECORD_SIZE : hi * SEQ_RECORD_SIZE],
                                              a.event_ids[lo:hi], a.cluster_header,
                                              a.cluster_ids[lo * CLUSTER_ENTRY_SIZE : hi * CLUSTER_ENTRY_SIZE]))
                    owners.append(k)
                    counts.append(hi - lo)
        if not entries:  # nothing to send: no appends, or none with an event
            return EncodedAppends([], [], len(appends), with_ids, [])
        # calls of consecutive entries: on a single node up to APPEND_ONCE_USERS entries and
        # APPEND_ONCE_CHUNK events; in a Cluster one entry each (a script touches one slot)
        bounds = [0]
        held = 0
        for k, n in enumerate(counts):
            if k > bounds[-1] and (self._cluster or k - bounds[-1] >= APPEND_ONCE_USERS
                                   or held + n > APPEND_ONCE_CHUNK):
                bounds.append(k)
                held = 0
            held += n
        bounds.append(len(entries))
        # the packed arguments of all calls at once, each call's sliced out by its events
        user_keys = [key for a in entries for key in keys.append_keys(ver, a.user_id)]
        records = b"".join([a.records for a in entries])
        hashes = b"".join(map(event_id_hash, itertools.chain.from_iterable(a.event_ids for a in entries)))
        if with_ids:
            headers = b"".join([a.cluster_header if a.cluster_ids else _NO_CLUSTER_HEADER for a in entries])
            cluster_ids = b"".join([a.cluster_ids or bytes(CLUSTER_ENTRY_SIZE * n)
                                    for a, n in zip(entries, counts, strict=True)])
        first_event = list(itertools.accumulate(counts, initial=0))
        sha = self._append_once_script.sha
        commands: list[tuple[Any, ...]] = []
        for lo, hi in itertools.pairwise(bounds):
            start, end = first_event[lo], first_event[hi]
            packed = [struct.pack(f"<{hi - lo}H", *counts[lo:hi]),
                      records[start * SEQ_RECORD_SIZE : end * SEQ_RECORD_SIZE], hashes[start * 8 : end * 8]]
            if with_ids:
                packed += [headers[lo * CLUSTER_HEADER_SIZE : hi * CLUSTER_HEADER_SIZE],
                           cluster_ids[start * CLUSTER_ENTRY_SIZE : end * CLUSTER_ENTRY_SIZE]]
            commands.append(("EVALSHA", sha, 3 * (hi - lo), *user_keys[3 * lo : 3 * hi], *fixed, *packed))
        call_owners = [owners[lo:hi] for lo, hi in itertools.pairwise(bounds)]
        return EncodedAppends(commands, call_owners, len(appends), with_ids,
                              [frozenset(a.user_id for a in entries[lo:hi]) for lo, hi in itertools.pairwise(bounds)])

    async def apply_appends(self, encoded: EncodedAppends, *, in_flight: int = APPEND_CALLS_IN_FLIGHT,
                            ) -> list[AppendCounts]:
        """Send the script calls `encode_appends` built; what was done per append.

        On a single node at most `in_flight` calls are in flight (APPEND_CALLS_IN_FLIGHT at most,
        and at most half the pool's connections), each on its own connection: sent as one
        pipeline, the server runs them back to back (every command of a read from a client runs
        before it serves another client), and a serving fetch arriving meanwhile waits for all of
        them; this way it waits for `in_flight` short calls at most, while the server has the
        next call to run. A call holding a user of a call in flight waits for it, so a user's
        events keep their order. In a Cluster, where each call holds one user, they go as one
        pipeline per node.
        """
        if not encoded.commands:  # appends without events: nothing done, and nothing sent
            return [AppendCounts(0, 0, 0)] * encoded.users
        commands = encoded.commands
        # half the pool at most: a consumer's blocking read (and its acknowledgements) hold
        # connections of the same pool while a batch is applied
        depth = max(1, min(in_flight, APPEND_CALLS_IN_FLIGHT, self.config.pool_size // 2))

        async def send() -> list[Any]:
            if self._cluster:
                return await self._execute(commands)
            one = self._lean.execute if self._lean else self._execute
            replies: list[Any] = []
            waiting: collections.deque[tuple[asyncio.Future[list[Any]], frozenset[int]]] = collections.deque()
            try:
                for command, users in zip(commands, encoded.call_users, strict=True):
                    while waiting and (len(waiting) >= depth or any(users & held for _, held in waiting)):
                        replies += await waiting.popleft()[0]
                    waiting.append((asyncio.ensure_future(one([command])), users))
                while waiting:
                    replies += await waiting.popleft()[0]
            finally:
                for left, _ in waiting:  # after a failure: the other calls are cancelled, or their errors read
                    left.cancel()
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await left
            return replies

        async def op() -> list[Any]:
            try:
                return await send()
            except rex.NoScriptError:  # a restarted or new server: load it everywhere, then repeat
                await self._load_script(APPEND_ONCE_SCRIPT)
                return await send()

        # Repeating the whole list after a failure is safe: applied ids are skipped.
        replies = await self._run(f"append events of {encoded.users} users", op)
        n = encoded.users
        appended, duplicates, clustered = [0] * n, [0] * n, [0] * n  # flat: few objects per batch
        width = 3 if encoded.with_ids else 2
        for owners, reply in zip(encoded.owners, replies, strict=True):
            for u, k in enumerate(owners):
                at = width * u
                appended[k] += int(reply[at])
                duplicates[k] += int(reply[at + 1])
                if encoded.with_ids:
                    clustered[k] += int(reply[at + 2])
        return list(map(AppendCounts, appended, duplicates, clustered))

    async def _load_script(self, script: str) -> None:
        if isinstance(self._client, RedisCluster):  # on every primary, through the clients the reads use
            await self._client.initialize()
            for node in self._client.get_primaries():
                await self._node_client(node).script_load(script)
        else:
            await self._client.script_load(script)

    async def execute(self, what: str, commands: list[tuple[Any, ...]], *, retry: bool = True) -> list[Any]:
        """Raw single-key commands, routed to their nodes in one round trip per node, under this
        store's deadline and retry policy (`retry=False` for commands not safe to repeat).
        For Redis-specific tools built on the store's connections (the event stream)."""
        if not commands:
            return []
        return await self._run(what, partial(self._execute, commands), retry=retry)

    async def read_prefixes(self, what: str, keys_: SequenceABC[bytes], length: int) -> list[bytes]:
        """The first `length` bytes of each key's string value (b"" when missing), in one round
        trip. On a single node one script reads many keys (a pipelined GETRANGE per key costs the
        client several times more per key); in a Cluster, whose scripts touch one slot, a GETRANGE
        per key, routed to its node."""
        if not keys_:
            return []
        if self._cluster:
            return list(await self.execute(what, [("GETRANGE", k, 0, length - 1) for k in keys_]))
        step = _PREFIX_READS_PER_CALL
        calls = [("EVAL", _READ_PREFIXES, len(chunk), *chunk, length)
                 for chunk in (keys_[i : i + step] for i in range(0, len(keys_), step))]
        return [value for reply in await self.execute(what, calls) for value in reply]

    # -- lifecycle -------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._lean is not None:
            self._lean.close()
        try:
            if isinstance(self._client, RedisCluster):
                await self._client.aclose()
            else:  # the pool was passed in, so the client does not close it by itself
                await self._client.aclose(close_connection_pool=True)
        except Exception as exc:  # a dead server cannot stop us from closing
            log.debug("closing the redis client: %s", exc)
        await self._close_node_clients()
        if self._embedded is not None:
            # Stopping waits for the shutdown save; keep the event loop free meanwhile.
            await asyncio.to_thread(self._embedded.stop)


def create_store(config: FeatureStoreConfig) -> OnlineStore:
    """Build the store the config names. In embedded mode this starts a Valkey server (blocking,
    at startup), which the store stops on `aclose()`."""
    if config.backend != "redis":
        raise FeatureStoreConfigError(f"unknown feature store backend {config.backend!r}")
    return RedisOnlineStore.from_config(config)
