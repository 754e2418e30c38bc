"""`rankserve ingest`: bulk-load a feature spec's data into a new feature-set version of the online store.

    rankserve ingest --bundle models/rank/1 --data-root data/ --version v20240601 --activate
    rankserve ingest --run runs/rank --activate                       # the run's spec and recorded base
    rankserve ingest --spec my_spec.yaml --schema models/rank/1       # an explicit spec
    rankserve ingest --data tmall --schema models/rank/1              # a named data set (preset spec)
    rankserve ingest --bundle models/rank/1 --version v1 --shard 2/4 --resume --activate  # shard 2 of 4
    rankserve ingest --version v1 --finish-shards 4 --activate        # fallback: complete a sharded load

Where the spec comes from: `--spec FILE` or `--data NAME` when given; else the spec.yaml of the
`--schema`/`--bundle`/`--run` directory (a bundle or run trained from a spec carries one; a run
also records the directory its relative paths resolve against); else the `tmall` preset.
`--data-root DIR` overrides that directory (for a bundle it is the only way to say it; default
$RANKSERVE_DATA_ROOT, else ../shared/data). The schema (vocabularies and fitted side features)
comes from that directory; without one, it is built from the data (vocabularies of every id,
side features fitted on the tables). Ids are read as the schema's id types say (`string`: hashed).

What is written, per user (in batches of `--batch-users`, one pipeline each): the profile (user
index, then the user's side-feature tail) and the newest `schema.spec.max_sequence_length`
events as one sequence value; every user with events gets one, and so does every user of the
spec's user table (no events: a profile and no sequence). Per item of the catalogue (every item
of the events, the impressions, the spec's item table and a synthetic set's catalogue, so items
without events are servable): item index (0 outside the schema's vocabulary), category index
(the category of the item's latest event, else the item table's category column, else 0: what
training uses) and the item's side-feature tail. Tails are `codecs.encode_side` of the schema's
fitted encoders on the table row (the encoded defaults for an id the table lacks), the same
encoding training used (`models.data.samples.encode_group`). Every write is a SET of a whole
value, so a re-run gives the same state, and a crash loses at most the batch in flight: the
version's meta key holds a checkpoint (`next_user`) written after each batch, and `--resume`
continues there. `--activate` switches the active pointer once the version is complete. The
schema's hash and spec are recorded beside the meta (`rs:meta:<ver>:schema`), so a bundle refused
for another schema is told which fields differ.

Upserts: `--upsert-items FILE` / `--upsert-users FILE` (the columns of the spec's item / user
table: its key column and every declared feature; a missing column is refused, naming it)
rewrite the side tails of those rows in place in the ACTIVE version (or `--version`), whose
schema hash must be the given schema's. The stored item index and category (profile: user
index) are kept as they are, read back from the store; only the side tail is re-encoded. An id
the version does not hold yet gets a new value: its index from the schema's vocabulary (0 when
unknown), for an item the category from the file's category column if it has one, else 0; a new
user gets a profile and no sequence. Only values that change are written; the command reports
how many rows were read, written, new and unchanged. Running servers see an upserted user
profile on their next request (profiles are not cached). The ids of rewritten items are
announced on the version's item change log once written, and each server drops them from its
item cache when it next reads the log (`item_changes_poll_s`, default 0.25 s); the cache's TTL
(`item_cache_ttl_s`, default 60 s) bounds what a server that cannot read the log serves. The
version's meta is not touched (its `updated` time keeps meaning "ingest end" for the staleness
alert).

Sharded loads: `--shard I/N` (0 <= I < N, `--version` required) writes only the users and the
items whose int64 key `shard_of` puts in shard I (blake2b of the key's 8 little-endian bytes,
modulo N: stable across processes and machines), so N processes or pods (the Indexed Job of
k8s/jobs/ingest) load one data set into one version in parallel without overlap; together they
write exactly the keys and bytes of a one-process load. Items are partitioned like users (each
shard writes its part, no item is written twice); every shard reads the whole data set, since
the item table and the source fingerprint are of all of it. Each shard keeps its progress in a
record of its own, a meta key `<version>.shard-<I>-of-<N>` (`shard_record`), so shards never
write each other's keys; `--resume` continues one shard from its record. The version's meta is
created by whichever shard comes first, with the source fingerprint and N, and holds no
progress; a shard of other data or of another N is refused at the start and before every batch
(`_VersionGuard`), so two data sets never end up in one complete version. A finishing shard
writes its record as done, then reads all N (`finish_shards`): the one that finds all done marks
the version complete (counts summed) and, with `--activate`, activates it; a shard finishing
earlier leaves the version 'ingesting' and logs which shards it waits for. Each shard writes
before it reads, so of two shards finishing at the same moment at least one sees both done
(both may complete it, which is idempotent). `--finish-shards N` does the same check alone, the
fallback for a version whose last shard died between its record and the check. `--drop-version`
drops a version's shard records with it (first, so none outlives the version's data).

With `--cluster-bundle BUNDLE` each user's stored events are also clustered for the `twin_v2`
retrieval strategy (`feature_store.clusters`: events partitioned by their GSU bias at the user's
newest event, then faiss k-means over the bundle's GSU keys within each part, cluster size
capped) and the cluster ids are written beside the sequence (`rs:<ver>:{u<user>}:clu`).

With no `--redis-url`/`REDIS_URL` (or cluster nodes), the embedded Valkey is used, with its data
directory and RDB snapshot on exit, so a later `rankserve serve` on the same machine finds it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import Sequence as SequenceABC
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from export.bundle import SPEC_FILE, open_bundle
from feature_store import keys
from feature_store.clusters import ClusterParams, UserClusterer
from feature_store.codecs import (
    ITEM_RECORD,
    PROFILE_RECORD,
    SEQ_RECORD_SIZE,
    CodecError,
    encode_items,
    encode_profile,
    encode_sequence,
    encode_side,
)
from feature_store.errors import FeatureStoreError, UserError, VersionConflict, VersionNotFound
from feature_store.redis_store import create_store
from feature_store.schema import SCHEMA_FILE, FeatureSchema, SchemaError, SchemaSpec, Vocabulary
from feature_store.spec import FeatureGroup, FeatureSpec, IdsDecl, SpecError
from feature_store.store import (
    STATUS_COMPLETE,
    STATUS_DROPPING,
    STATUS_INGESTING,
    EmbeddedConfig,
    FeatureStoreConfig,
    OnlineStore,
    StoredSchema,
    VersionMeta,
)
from models.data.events import Dataset, EventLog, SideTable
from models.data.readers import (
    add_dataset_arguments,
    load_spec_dataset,
    read_side_table,
    resolve_data_root,
    spec_from_args,
)
from models.data.samples import encode_group, fit_side_features

log = logging.getLogger(__name__)

DEFAULT_BATCH_USERS = 256
ITEM_BATCH = 5_000
UPSERT_BATCH = 2_000

IntArray = npt.NDArray[np.int64]


@dataclass
class IngestStats:
    """What one ingest run wrote (a resumed run counts only its own batches)."""

    version: str
    users: int = 0
    events: int = 0
    items: int = 0
    bytes: int = 0
    batches: int = 0
    seconds: float = 0.0
    resumed_from_user: int = 0
    activated: bool = False
    clustered: int = 0
    table_users: int = 0  # users of the user table without events (a profile, no sequence)
    shard: str | None = None  # "I/N" of a sharded load
    complete: bool = False  # the version is complete at the end of this run (a shard: all shards are done)


@dataclass
class UpsertStats:
    """What one upsert did: rows of the file, values written (new + changed), new ids, unchanged rows."""

    version: str
    kind: str  # "items" or "users"
    rows: int = 0
    written: int = 0
    new: int = 0
    unchanged: int = 0


# ---------------------------------------------------------------------------------------------
# Values


def source_fingerprint(events: EventLog, user_ids: npt.NDArray[np.int64], offsets: npt.NDArray[np.int64]) -> str:
    """Identifies the user order and sizes a checkpoint refers to; `--resume` requires a match."""
    h = hashlib.sha256()
    h.update(np.int64(len(events)).tobytes())
    h.update(np.ascontiguousarray(user_ids, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(offsets, dtype="<i8").tobytes())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class SideTails:
    """Side tails of one feature group for a list of ids (`tails(lo, hi)` encodes a slice).

    The table is encoded once (`encode_group`, training's encoder), with one more row holding the
    group's encoded defaults, which ids outside the table read."""

    codes: IntArray  # [table rows + 1, C]
    values: npt.NDArray[np.float32]  # [table rows + 1, N]
    rows: IntArray  # per id: its table row (the defaults row when the table lacks it)

    @classmethod
    def build(cls, group: FeatureGroup, table: SideTable | None, raw_ids: npt.ArrayLike) -> SideTails:
        ids = np.asarray(raw_ids, dtype=np.int64)
        n = len(table) if table is not None and group.names else 0
        codes, values = encode_group(group, table.columns if table is not None and n else {}, n)
        d_codes, d_values = group.encode_rows({}, 1)
        rows = table.rows_of(ids) if table is not None and n else np.zeros(ids.shape[0], dtype=np.int64)
        return cls(np.vstack([codes, d_codes]), np.vstack([values, d_values]).astype(np.float32), rows)

    @property
    def empty(self) -> bool:
        return bool(self.codes.shape[1] + self.values.shape[1] == 0)

    def tails(self, lo: int = 0, hi: int | None = None) -> list[bytes] | None:
        """Tails of ids lo..hi-1; None when the group has no features (values without a tail)."""
        if self.empty:
            return None
        rows = self.rows[lo:hi]
        return encode_side(self.codes[rows], self.values[rows])


def item_table(
    events: EventLog,
    schema: FeatureSchema,
    catalogue: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    items: SideTable | None = None,
) -> tuple[npt.NDArray[np.int64], list[bytes]]:
    """(raw item ids, encoded values). A catalogue (raw item ids, raw category ids) is
    authoritative: it lists every servable item, those without events too. Without one, the
    log's items are written, each with the category of its latest event. Each value carries the
    item's side tail (from `items`, the item table; the encoded defaults for items it lacks)."""
    if catalogue is not None:
        item_ids = np.asarray(catalogue[0], dtype=np.int64)
        category_ids = np.asarray(catalogue[1], dtype=np.int64)
    else:
        item_ids, category_ids = events.item_catalogue()
    tails = SideTails.build(schema.spec.side.item, items, item_ids).tails()
    values = encode_items(schema.items.lookup(item_ids), schema.categories.lookup(category_ids), tails)
    return item_ids, values


def ingest_users(events: EventLog, users: SideTable | None) -> tuple[IntArray, IntArray]:
    """(user ids, CSR offsets into `events`): the users with events, then the user table's users
    without events (sorted; empty ranges at the end)."""
    user_ids, offsets = events.user_offsets()
    if users is None or len(users) == 0:
        return user_ids, offsets
    extra = np.setdiff1d(users.ids, user_ids)  # sorted, unique
    if extra.shape[0] == 0:
        return user_ids, offsets
    return np.r_[user_ids, extra].astype(np.int64), np.r_[offsets, np.full(extra.shape[0], offsets[-1])].astype(
        np.int64
    )


def encode_user_batch(
    events: EventLog,
    schema: FeatureSchema,
    user_ids: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    u0: int,
    u1: int,
    cap: int,
    tails: list[bytes] | None = None,
) -> tuple[list[bytes], list[bytes], int]:
    """Profiles and sequences (newest `cap` events, oldest first) of users u0..u1-1; and the events kept.

    `tails`: the users' side tails (one per user of the batch), None without user side features.
    A user without events (a user-table row) gets an empty sequence."""
    ends = offsets[u0 + 1 : u1 + 1]
    starts = np.maximum(offsets[u0:u1], ends - cap)
    # Encode the kept events of the whole batch once (vectorized), then cut each user's out of the
    # bytes. Only the kept ones: an event past the cap is not stored, so it is not checked either
    # (as a sharded load, which selects them first, does not).
    rows, bounds = _concatenated_rows(starts, ends)
    raw = encode_sequence(
        schema.items.lookup(events.item_id[rows]),
        schema.categories.lookup(events.category_id[rows]),
        events.action[rows],
        events.timestamp[rows],
    )
    view = memoryview(raw)
    sequences = [
        bytes(view[b * SEQ_RECORD_SIZE : e * SEQ_RECORD_SIZE])
        for b, e in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
    ]
    user_index = schema.users.lookup(user_ids[u0:u1]).tolist()
    if tails is None:
        profiles = [encode_profile(int(u)) for u in user_index]
    else:
        profiles = [encode_profile(int(u), t) for u, t in zip(user_index, tails, strict=True)]
    return profiles, sequences, int((ends - starts).sum())


def clusterer_from_bundle(path: str | Path, params: ClusterParams | None = None) -> UserClusterer:
    """A clusterer over the GSU key tables of the bundle at `path` (the `--cluster-bundle` option)."""
    t = open_bundle(path, verify=False).tables
    return UserClusterer(t["item_key"], t["category_key"], t["gsu_action_bias"], t["gsu_gap_bias"], params)


def cluster_user_batch(
    events: EventLog, schema: FeatureSchema, offsets: npt.NDArray[np.int64], u0: int, u1: int, cap: int,
    clusterer: UserClusterer,
) -> list[bytes | None]:
    """Cluster values (`feature_store.codecs.encode_clusters`) of users u0..u1-1's stored events."""
    out: list[bytes | None] = []
    for u in range(u0, u1):
        s, e = max(int(offsets[u]), int(offsets[u + 1]) - cap), int(offsets[u + 1])
        item = schema.items.lookup(events.item_id[s:e]).astype(np.int64)
        category = schema.categories.lookup(events.category_id[s:e]).astype(np.int64)
        action = np.asarray(events.action[s:e], dtype=np.int64)
        timestamp = np.asarray(events.timestamp[s:e], dtype=np.int64)
        out.append(clusterer.encode(item, category, action, timestamp))  # gap buckets at the newest event
    return out


# ---------------------------------------------------------------------------------------------
# Shards


class ShardArgumentError(UserError):
    """A `--shard` / `--finish-shards` value that cannot be used (the message names the flag)."""


def shard_of(ids: npt.ArrayLike, count: int) -> IntArray:
    """The shard (0..count-1) of each int64 store key: blake2b (8-byte digest) of the key's 8
    little-endian bytes, read as a little-endian unsigned integer, modulo `count`.

    Stable across processes, machines and Python versions (unlike `hash`), so every shard process
    computes the same partition; the same function places users (by user key) and items (by item key)."""
    if count < 1:
        raise ValueError(f"shard count must be >= 1, got {count}")
    raw = np.ascontiguousarray(ids, dtype="<i8")
    if count == 1:
        return np.zeros(raw.shape[0], dtype=np.int64)
    view = memoryview(raw.tobytes())
    blake2b = hashlib.blake2b
    return np.fromiter(
        (int.from_bytes(blake2b(view[k : k + 8], digest_size=8).digest(), "little") % count
         for k in range(0, 8 * raw.shape[0], 8)),
        dtype=np.int64,
        count=raw.shape[0],
    )


_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the users (and items) whose key `shard_of` puts there."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"bad shard {self.index}/{self.count}: need 0 <= index < count")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`I/N` as `--shard` takes it; raises ShardArgumentError naming the flag."""
        m = _SHARD_RE.match(text)
        if m is None:
            raise ShardArgumentError(f"--shard {text!r}: expected I/N, the shard index and count (0 <= I < N)")
        index, count = int(m.group(1)), int(m.group(2))
        if count < 1 or index >= count:
            raise ShardArgumentError(f"--shard {text!r}: the index must be 0..N-1 and N at least 1 (0 <= I < N)")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def record(self, version: str) -> str:
        """The name of this shard's progress record of `version` (a meta key of its own)."""
        return shard_record(version, self.index, self.count)

    def members(self, ids: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Which of `ids` (int64 store keys) belong to this shard."""
        return np.asarray(shard_of(ids, self.count) == self.index)


def shard_record(version: str, index: int, count: int) -> str:
    """`<version>.shard-<I>-of-<N>`: where shard I of a sharded load of `version` keeps its progress
    (a `VersionMeta` of its own: shards never write each other's keys). Raises ValueError when the
    name would not be a legal version name (too long)."""
    name = f"{version}.shard-{index}-of-{count}"
    try:
        return keys.validate_version(name)
    except ValueError:
        room = 64 - (len(name) - len(version))
        raise ValueError(
            f"version name {version!r} is too long for a sharded load: at most {room} characters with {count} shards"
        ) from None


def _shard_record_of(name: str, version: str) -> bool:
    return re.fullmatch(re.escape(version) + r"\.shard-\d+-of-\d+", name) is not None


def _is_shard_record(meta: VersionMeta | None) -> bool:
    return meta is not None and "shard_of" in meta.info


def select_shard(
    events: EventLog, user_ids: IntArray, offsets: IntArray, selected: IntArray, cap: int
) -> tuple[EventLog, IntArray, IntArray]:
    """The users at positions `selected` with only the newest `cap` events each (all a shard
    writes): (events, user ids, CSR offsets), laid out as `ingest_users` lays out all users."""
    ends = offsets[selected + 1]
    rows, new_offsets = _concatenated_rows(np.maximum(offsets[selected], ends - cap), ends)
    return events.select(rows), user_ids[selected].astype(np.int64), new_offsets


def _concatenated_rows(starts: IntArray, ends: IntArray) -> tuple[IntArray, IntArray]:
    """The rows [starts[k], ends[k]) of every user k, concatenated, and each user's CSR bounds in them."""
    lengths = ends - starts
    bounds = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    rows = np.repeat(starts - bounds[:-1], lengths) + np.arange(int(bounds[-1]), dtype=np.int64)
    return rows, bounds


async def _refuse_other_schema(store: OnlineStore, version: str, existing: VersionMeta | None,
                               schema: FeatureSchema) -> None:
    """VersionConflict naming the differing fields when `version` holds another schema."""
    if existing is None or existing.schema_hash == schema.hash:
        return
    recorded = await store.get_schema(version)
    differs = recorded.difference(schema.spec) if recorded is not None else ""
    raise VersionConflict(
        f"version {version!r} holds schema {existing.schema_hash[:12]}, not {schema.hash[:12]}{differs}: "
        "use a new --version"
    )


def _check_sharded_meta(meta: VersionMeta, version: str, fingerprint: str, shard: Shard) -> None:
    """Refuse to load `shard` into a version that another data set, another shard count or a
    one-process ingest owns, or that is being dropped."""
    if meta.status == STATUS_DROPPING:
        raise VersionNotFound(f"version {version!r} is being dropped: shard {shard} stops")
    shards = meta.info.get("shards")
    if shards is None:
        raise VersionConflict(
            f"version {version!r} was ingested without --shard: a sharded load needs a new --version (or drop it first)"
        )
    if shards != shard.count:
        raise VersionConflict(
            f"version {version!r} is loaded in {shards} shards, not {shard.count}: every shard of a version "
            "must name the same count"
        )
    if meta.info.get("fingerprint") != fingerprint:
        raise VersionConflict(
            f"version {version!r} is loaded from different source data: every shard of a version must read the "
            "same data set (use a new --version, or drop it first)"
        )


def _shard_done(record: VersionMeta | None, main: VersionMeta, index: int, count: int) -> bool:
    """Whether a shard record says shard `index` finished loading the data set `main` describes."""
    return (
        record is not None
        and record.status == STATUS_COMPLETE
        and record.schema_hash == main.schema_hash
        and record.info.get("fingerprint") == main.info.get("fingerprint")
        and record.info.get("shard") == index
        and record.info.get("shards") == count
    )


async def finish_shards(store: OnlineStore, version: str, count: int, *, activate: bool = False) -> list[int]:
    """Complete a sharded load once every shard is done: returns the shards not done yet ([]: the
    version is complete, and active with `activate`).

    Every shard calls this after writing its own record as done, so of two shards finishing at
    the same moment at least the later reader sees both records; both may complete the version,
    which writes the same meta and activates the same version (idempotent). `rankserve ingest
    --finish-shards N` calls it too."""
    main = await store.get_meta(version)
    if main is None or _is_shard_record(main):
        raise VersionNotFound(f"version {version!r} has no meta key: nothing was ingested under it")
    _refuse_dropping(main, version)
    if main.info.get("shards") != count:
        loaded = main.info.get("shards")
        how = "without --shard" if loaded is None else f"in {loaded} shards"
        raise VersionConflict(f"version {version!r} was loaded {how}, not in {count}")
    records = await asyncio.gather(*(store.get_meta(shard_record(version, i, count)) for i in range(count)))
    waiting = [i for i, r in enumerate(records) if not _shard_done(r, main, i, count)]
    if waiting:
        return waiting
    done = [r for r in records if r is not None]
    for name in ("users", "events", "items", "table_users", "bytes"):
        main.counts[name] = sum(int(r.counts.get(name, 0)) for r in done)
    clusters = [r.info.get("clusters") for r in done]
    if clusters[0] is not None and all(c == clusters[0] for c in clusters):
        main.info["clusters"] = clusters[0]
    elif any(c is not None for c in clusters):
        log.warning("the shards of %s were clustered differently (or not all): no clustering recorded", version)
        main.info.pop("clusters", None)
    main.checkpoint["shards_done"] = count
    main.status = STATUS_COMPLETE
    if not await store.update_meta(main):  # a drop began since the meta was read: it is not undone
        raise VersionNotFound(f"version {version!r} is being dropped: its shards are not completed")
    log.info("all %d shards of %s are done: version complete", count, version,
             extra={"version": version, "shards": count, "counts": main.counts})
    if activate:
        try:
            await store.activate(version)
        except VersionConflict as exc:  # a shard re-opened it since: its own finish completes and activates it
            log.warning("not activating %s: %s", version, exc)
            return []
        log.info("activated %s", version)
    return []


async def _open_sharded_version(
    store: OnlineStore,
    version: str,
    schema: FeatureSchema,
    fingerprint: str,
    resume: bool,
    shard: Shard,
    info: dict[str, Any],
) -> VersionMeta:
    """The version's meta as a shard joins the load: created by the first shard (any shard), and
    checked to be the same data set, schema and shard count by every one. The meta holds no
    progress: each shard keeps its own in its record (`shard_record`)."""
    existing = await store.get_meta(version)
    await _refuse_other_schema(store, version, existing, schema)
    if existing is not None:
        _check_sharded_meta(existing, version, fingerprint, shard)
    await store.put_schema(version, StoredSchema(schema.hash, schema.spec.to_dict()))
    if existing is None:
        await store.put_meta(VersionMeta(version=version, schema_hash=schema.hash, info=info))
        # Shards starting together may all create it: the last write stands. Read it back, so that
        # a shard of another data set stops here rather than writing into the version.
        current = await store.get_meta(version)
        if current is None:
            raise VersionNotFound(f"version {version!r} was dropped as shard {shard} started")
        if current.schema_hash != schema.hash:
            raise VersionConflict(f"version {version!r} was created with another schema by a concurrent ingest")
        _check_sharded_meta(current, version, fingerprint, shard)
        return current
    if existing.status == STATUS_COMPLETE and not resume:
        if await store.active_version(refresh=True) == version:
            log.warning("re-loading shard %s of the ACTIVE version %s in place", shard, version)
        else:
            # Its values are rewritten: not activatable until this shard is done again.
            existing.status = STATUS_INGESTING
            await store.put_meta(existing)
    return existing


async def _open_shard_record(
    store: OnlineStore, version: str, schema: FeatureSchema, fingerprint: str, resume: bool, shard: Shard,
    info: dict[str, Any],
) -> VersionMeta:
    """This shard's progress record: its checkpoint on `resume` (when it is of the same data set),
    a fresh one otherwise."""
    name = shard.record(version)
    existing = await store.get_meta(name)
    if resume and existing is not None:
        same = (
            existing.schema_hash == schema.hash
            and existing.info.get("fingerprint") == fingerprint
            and existing.info.get("shard") == shard.index
            and existing.info.get("shards") == shard.count
        )
        if same:
            if existing.status == STATUS_COMPLETE:
                log.info("shard %s of %s is already done; nothing to resume", shard, version)
            else:
                log.info("resuming shard %s of %s at user %s of the shard", shard, version,
                         existing.checkpoint.get("next_user", 0))
            existing.info.update(info)
            return existing
        log.info("the checkpoint of shard %s of %s is of other data: starting the shard from the beginning",
                 shard, version)
    elif resume:
        log.info("no checkpoint for shard %s of %s: starting the shard from the beginning", shard, version)
    record = VersionMeta(
        version=name, schema_hash=schema.hash,
        info={**info, "shard_of": version, "shard": shard.index, "shards": shard.count},
    )
    await store.put_meta(record)
    return record


# ---------------------------------------------------------------------------------------------
# Bulk ingest


async def ingest_dataset(
    store: OnlineStore, dataset: Dataset, schema: FeatureSchema, version: str, **kwargs: Any
) -> IngestStats:
    """`ingest_log` of a spec's data set: its events, its whole item catalogue (items without
    events included) and its user and item tables (side tails). The spec must be the schema's."""
    check_spec_matches_schema(dataset.spec, schema.spec)
    return await ingest_log(
        store, dataset.events, schema, version, catalogue=dataset.item_catalogue(), users=dataset.users,
        items=dataset.items, **kwargs,
    )


async def ingest_log(
    store: OnlineStore,
    events: EventLog,
    schema: FeatureSchema,
    version: str,
    *,
    batch_users: int = DEFAULT_BATCH_USERS,
    ttl_seconds: int | None = None,
    resume: bool = False,
    activate: bool = False,
    catalogue: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    source: str = "",
    progress: bool = False,
    clusterer: UserClusterer | None = None,
    users: SideTable | None = None,
    items: SideTable | None = None,
    shard: Shard | tuple[int, int] | None = None,
) -> IngestStats:
    """Write `events` through `schema` into `version` (see the module doc); returns what was written.

    `users` / `items`: the spec's user table and item catalogue; their rows' side features go
    into the profiles' and items' side tails (the defaults for ids they lack), and every user of
    `users` gets a profile. With a `clusterer`, each user's behaviour clusters are written too
    (histories shorter than its `min_events` get none).

    `shard` (index, count): write only the users and items whose key `shard_of` puts in shard
    `index`, keeping this shard's progress in a record of its own; the version is completed (and,
    with `activate`, activated) by whichever shard finds all `count` shards done (`finish_shards`).
    Every shard must be given the same events, tables, schema and count."""
    keys.validate_version(version)
    if batch_users < 1:
        raise ValueError("batch_users must be >= 1")
    if shard is not None and not isinstance(shard, Shard):
        shard = Shard(*shard)
    if shard is not None:
        shard.record(version)  # a version name too long for the records fails before anything is written
    started = time.perf_counter()
    cap = schema.spec.max_sequence_length
    if schema.categories.size - 1 > (1 << 24) - 1:
        raise CodecError("more than 2^24 categories cannot be encoded in a sequence record")
    user_ids, offsets = ingest_users(events, users)
    fingerprint = source_fingerprint(events, user_ids, offsets)
    stats = IngestStats(version=version, shard=None if shard is None else str(shard))
    guard = _VersionGuard(store, version, fingerprint, shard)

    if shard is None:
        meta = await _open_version(store, version, schema, fingerprint, resume, source, batch_users, ttl_seconds)
        progress_meta = meta  # a one-process load keeps its checkpoint in the version's meta
    else:
        info: dict[str, Any] = {"source": source, "fingerprint": fingerprint, "batch_users": batch_users,
                                "ttl_seconds": ttl_seconds, "schema_name": schema.spec.name, "shards": shard.count}
        meta = await _open_sharded_version(store, version, schema, fingerprint, resume, shard, info)
        progress_meta = await _open_shard_record(store, version, schema, fingerprint, resume, shard, info)
    next_user = int(progress_meta.checkpoint.get("next_user", 0))
    stats.resumed_from_user = next_user
    if clusterer is not None:
        progress_meta.info["clusters"] = {"fingerprint": clusterer.fingerprint.hex(), **asdict(clusterer.params)}

    if not progress_meta.checkpoint.get("items_done"):
        item_ids, values = item_table(events, schema, catalogue, items)  # every item of the log: all of it
        if shard is not None:
            keep = np.flatnonzero(shard.members(item_ids))
            item_ids, values = item_ids[keep], [values[k] for k in keep.tolist()]
        for k in range(0, len(values), ITEM_BATCH):
            await guard.check()
            await store.write_items(version, item_ids[k : k + ITEM_BATCH].tolist(), values[k : k + ITEM_BATCH])
        stats.items = len(values)
        stats.bytes += sum(map(len, values))
        progress_meta.counts["items"] = len(values)
        progress_meta.checkpoint["items_done"] = True
        await guard.checkpoint(progress_meta)

    no_events = np.diff(offsets) == 0  # users with events have one at least: these are user-table rows
    if shard is not None:
        selected = np.flatnonzero(shard.members(user_ids))
        no_events = no_events[selected]
        events, user_ids, offsets = select_shard(events, user_ids, offsets, selected, cap)
    n_users = len(user_ids)
    stats.table_users = int(np.count_nonzero(no_events))
    progress_meta.counts["table_users"] = stats.table_users
    user_tails = SideTails.build(schema.spec.side.user, users, user_ids)
    with tqdm(
        total=n_users,
        initial=min(next_user, n_users),
        unit="user",
        file=sys.stderr,
        disable=not progress,
        desc=f"ingest {version}" if shard is None else f"ingest {version} shard {shard}",
        mininterval=1.0,
    ) as bar:
        for u0 in range(next_user, n_users, batch_users):
            u1 = min(u0 + batch_users, n_users)
            profiles, sequences, kept = encode_user_batch(
                events, schema, user_ids, offsets, u0, u1, cap, user_tails.tails(u0, u1)
            )
            clusters = None
            if clusterer is not None:
                clusters = cluster_user_batch(events, schema, offsets, u0, u1, cap, clusterer)
                stats.clustered += sum(c is not None for c in clusters)
                stats.bytes += sum(len(c) for c in clusters if c is not None)
            await guard.check()
            await store.write_users(version, user_ids[u0:u1].tolist(), profiles, sequences, ttl_seconds,
                                    clusters=clusters)
            stats.users += u1 - u0
            stats.events += kept
            stats.bytes += sum(map(len, sequences)) + sum(map(len, profiles))
            stats.batches += 1
            progress_meta.checkpoint["next_user"] = u1
            progress_meta.counts["users"] = u1
            progress_meta.counts["events"] = int(progress_meta.counts.get("events", 0)) + kept
            await guard.checkpoint(progress_meta)
            bar.update(u1 - u0)

    progress_meta.status = STATUS_COMPLETE
    progress_meta.counts["bytes"] = int(progress_meta.counts.get("bytes", 0)) + stats.bytes
    if shard is None:
        await guard.checkpoint(meta)  # not marked complete (and activated) if a drop began during the load
        if activate:
            await store.activate(version)
            stats.activated = True
        stats.complete = True
    else:
        await guard.checkpoint(progress_meta)  # this shard is done: written before the others are read
        waiting = await finish_shards(store, version, shard.count, activate=activate)
        stats.complete = not waiting
        stats.activated = activate and not waiting
        if waiting:
            log.info(
                "shard %s of %s is done; shards %s are still loading: the version stays '%s' until the last of "
                "them finishes%s",
                shard, version, ", ".join(map(str, waiting)), STATUS_INGESTING,
                " and activates it" if activate else "",
                extra={"version": version, "shard": str(shard), "waiting_for": waiting},
            )
    stats.seconds = time.perf_counter() - started
    log.info(
        "ingested %d users, %d events, %d items, %.1f MB into %s%s in %.1f s",
        stats.users,
        stats.events,
        stats.items,
        stats.bytes / 1e6,
        version,
        "" if shard is None else f" (shard {shard})",
        stats.seconds,
        extra={
            "users": stats.users,
            "events": stats.events,
            "items": stats.items,
            "bytes": stats.bytes,
            "seconds": round(stats.seconds, 3),
            "version": version,
            "activated": stats.activated,
            "resumed_from_user": stats.resumed_from_user,
            "clustered_users": stats.clustered,
            "table_users": stats.table_users,
            "shard": stats.shard,
            "complete": stats.complete,
        },
    )
    return stats


class _VersionGuard:
    """Before each write, re-reads the version's meta: a version dropped (or being dropped) stops
    the load before it writes into it again, and so does, for a sharded load, a version taken over
    by another data set (or shard count, or a one-process ingest)."""

    def __init__(self, store: OnlineStore, version: str, fingerprint: str, shard: Shard | None) -> None:
        self.store, self.version, self.fingerprint, self.shard = store, version, fingerprint, shard

    async def check(self) -> None:
        current = await self.store.get_meta(self.version)
        loader = "this ingest" if self.shard is None else f"shard {self.shard}"
        if current is None:
            raise VersionNotFound(f"version {self.version!r} was dropped while {loader} was loading it")
        if self.shard is None:
            if current.status == STATUS_DROPPING:
                raise VersionNotFound(f"version {self.version!r} is being dropped: {loader} stops")
            return
        _check_sharded_meta(current, self.version, self.fingerprint, self.shard)

    async def checkpoint(self, progress: VersionMeta) -> None:
        """Write `progress` (the version's meta, or this shard's record) only if it still exists and
        the version is not being dropped, in one step, so a drop that has begun is never undone. A
        shard first re-reads the version's meta (`check`): it writes its own record, not that meta."""
        if self.shard is not None:
            await self.check()
        if not await self.store.update_meta(progress):
            loader = "this ingest" if self.shard is None else f"shard {self.shard}"
            raise VersionNotFound(f"version {self.version!r} is being dropped: {loader} stops")


def _refuse_dropping(meta: VersionMeta | None, version: str) -> None:
    """A version being dropped, or whose drop failed halfway, has lost keys its checkpoint counts
    as written: it is not loaded into (or completed) until the drop is finished."""
    if meta is not None and meta.status == STATUS_DROPPING:
        raise VersionConflict(f"version {version!r} is being dropped (or its drop failed halfway): finish the drop "
                              f"with --drop-version {version}, then load it again")


async def _open_version(
    store: OnlineStore,
    version: str,
    schema: FeatureSchema,
    fingerprint: str,
    resume: bool,
    source: str,
    batch_users: int,
    ttl_seconds: int | None,
) -> VersionMeta:
    """The version's meta to continue from: its checkpoint on `resume`, a fresh one otherwise.
    Records the schema (hash and spec) beside the meta."""
    existing = await store.get_meta(version)
    _refuse_dropping(existing, version)
    await _refuse_other_schema(store, version, existing, schema)
    await store.put_schema(version, StoredSchema(schema.hash, schema.spec.to_dict()))
    info = {"source": source, "fingerprint": fingerprint, "batch_users": batch_users, "ttl_seconds": ttl_seconds,
            "schema_name": schema.spec.name}
    if resume and existing is not None:
        if existing.info.get("shards") is not None:
            raise VersionConflict(
                f"version {version!r} is loaded in {existing.info['shards']} shards: resume each with --shard "
                f"I/{existing.info['shards']} (or complete it with --finish-shards)"
            )
        if existing.info.get("fingerprint") != fingerprint:
            raise VersionConflict(f"cannot resume {version!r}: it was started from different source data")
        if existing.status == STATUS_COMPLETE:
            log.info("version %s is already complete; nothing to resume", version)
        else:
            log.info("resuming %s at user %s", version, existing.checkpoint.get("next_user", 0))
        existing.info.update(info)
        return existing
    if resume:
        log.info("no checkpoint for %s: starting from the beginning", version)
    status = STATUS_INGESTING
    if existing is not None and await store.active_version(refresh=True) == version:
        # Re-ingesting the serving version: values are rewritten in place; keep it marked servable.
        log.warning("re-ingesting the ACTIVE version %s in place", version)
        status = STATUS_COMPLETE
    meta = VersionMeta(version=version, schema_hash=schema.hash, status=status, info=info)
    if existing is not None:
        meta.created = existing.created
    await store.put_meta(meta)
    return meta


async def latest_incomplete_version(store: OnlineStore, schema_hash: str) -> str | None:
    """The most recently created version still being ingested with this schema by one process
    (for `--resume`; a sharded load names its version)."""
    best: VersionMeta | None = None
    for name in await store.list_versions():
        meta = await store.get_meta(name)
        if (
            meta
            and meta.status == STATUS_INGESTING
            and "shards" not in meta.info
            and not _is_shard_record(meta)
            and meta.schema_hash == schema_hash
            and (best is None or meta.created > best.created)
        ):
            best = meta
    return best.version if best else None


# ---------------------------------------------------------------------------------------------
# Upserts


async def _writable_version(store: OnlineStore, schema: FeatureSchema, version: str | None) -> str:
    """The version an upsert rewrites: `version`, else the active one; its schema must be `schema`'s."""
    target = version or await store.active_version(refresh=True)
    if target is None:
        raise VersionNotFound("no active feature-set version to upsert into: ingest one, or name it with --version")
    meta = await store.get_meta(target)
    if meta is None:
        raise VersionNotFound(f"version {target!r} has no meta key: nothing was ingested under it")
    if meta.schema_hash != schema.hash:
        recorded = await store.get_schema(target)
        differs = recorded.difference(schema.spec) if recorded is not None else ""
        raise VersionConflict(
            f"version {target!r} holds schema {meta.schema_hash[:12]}, not {schema.hash[:12]}{differs}: "
            "upsert with the schema (bundle) the version was ingested with"
        )
    return target


async def upsert_items(
    store: OnlineStore, schema: FeatureSchema, table: SideTable, version: str | None = None
) -> UpsertStats:
    """Rewrite the side tails of the items of `table` (an item table as the spec declares it) in
    `version` (default: the active one); see the module doc for what is kept."""
    target = await _writable_version(store, schema, version)
    stats = UpsertStats(target, "items", rows=len(table))
    head = ITEM_RECORD.itemsize
    tails = SideTails.build(schema.spec.side.item, table, table.ids)
    categories = table.category_id if table.category_id is not None else np.zeros(len(table), dtype=np.int64)
    for k in range(0, len(table), UPSERT_BATCH):
        ids = table.ids[k : k + UPSERT_BATCH]
        stored = await store.read_items(target, ids.tolist())
        fresh = encode_items(
            schema.items.lookup(ids), schema.categories.lookup(categories[k : k + UPSERT_BATCH]),
            tails.tails(k, k + len(ids)),
        )
        await _write_changed(store, target, stats, ids, stored, fresh, head, items=True)
    _report(stats)
    return stats


async def upsert_users(
    store: OnlineStore, schema: FeatureSchema, table: SideTable, version: str | None = None
) -> UpsertStats:
    """Rewrite the side tails of the profiles of the users of `table` (a user table as the spec
    declares it) in `version` (default: the active one); see the module doc for what is kept."""
    target = await _writable_version(store, schema, version)
    stats = UpsertStats(target, "users", rows=len(table))
    head = PROFILE_RECORD.itemsize
    tails = SideTails.build(schema.spec.side.user, table, table.ids)
    for k in range(0, len(table), UPSERT_BATCH):
        ids = table.ids[k : k + UPSERT_BATCH]
        stored = await store.read_profiles(target, ids.tolist())
        batch_tails = tails.tails(k, k + len(ids)) or [b""] * len(ids)
        fresh = [encode_profile(int(u), t) for u, t in zip(schema.users.lookup(ids).tolist(), batch_tails, strict=True)]
        await _write_changed(store, target, stats, ids, stored, fresh, head, items=False)
    _report(stats)
    return stats


async def _write_changed(
    store: OnlineStore,
    version: str,
    stats: UpsertStats,
    ids: IntArray,
    stored: SequenceABC[bytes | None],
    fresh: list[bytes],
    head: int,
    *,
    items: bool,
) -> None:
    """Write each id's stored head (index, category) with its fresh tail, where that changes the value."""
    out_ids: list[int] = []
    out_values: list[bytes] = []
    for uid, old, new in zip(ids.tolist(), stored, fresh, strict=True):
        value = new if old is None else bytes(old[:head]) + new[head:]
        if old is None:
            stats.new += 1
        elif value == old:
            stats.unchanged += 1
            continue
        out_ids.append(uid)
        out_values.append(value)
    if out_ids:
        if items:
            await store.write_items(version, out_ids, out_values, announce=True)
        else:
            await store.write_profiles(version, out_ids, out_values)
    stats.written += len(out_ids)


def _report(stats: UpsertStats) -> None:
    log.info(
        "upserted %s into %s: %d rows read, %d written (%d new), %d unchanged",
        stats.kind, stats.version, stats.rows, stats.written, stats.new, stats.unchanged,
        extra=asdict(stats),
    )
    print(f"{stats.kind}: {stats.written} written ({stats.new} new), {stats.unchanged} unchanged, "
          f"of {stats.rows} rows, version {stats.version}")


def read_upsert_table(path: Path, spec: FeatureSpec, schema: FeatureSchema, kind: str) -> SideTable:
    """An upsert file read as the spec's user or item table: the key column and every declared
    feature must be there (a missing one is refused, naming it); ids follow the schema's id types."""
    group = "user" if kind == "users" else "item"
    decl = spec.user_features if group == "user" else spec.item_features
    if decl is None:
        raise SpecError(f"{path}: the feature spec declares no {group}_features: there is no {group} table to upsert")
    key = decl.key or (spec.events.user if group == "user" else spec.events.item)
    id_type = schema.spec.id_types[0 if group == "user" else 1]
    category = spec.events.category if group == "item" else None
    return read_side_table(path, decl, key, id_type, category)


# ---------------------------------------------------------------------------------------------
# Schemas and specs


def check_spec_matches_schema(spec: FeatureSpec, schema: SchemaSpec) -> None:
    """Refuse a feature spec whose actions or side features are not the schema's: its events
    would get other action codes, or its tables would not give the schema's features."""
    if spec.behaviour_actions != schema.actions:
        raise SchemaError(
            f"the feature spec's actions {list(spec.behaviour_actions)} are not the schema's {list(schema.actions)}: "
            "ingest with the spec the model was trained from"
        )
    for group, fitted in (("user", schema.side.user), ("item", schema.side.item)):
        decl = spec.feature_group(group)
        declared = {d.name for d in decl.categorical} | {d.name for d in decl.numeric} if decl is not None else set()
        missing = [n for n in fitted.names if n not in declared]
        if missing:
            raise SchemaError(
                f"{group}_features: the schema has feature {missing[0]!r}, which the feature spec does not declare"
            )


def load_schema(path: str | Path) -> FeatureSchema:
    """A saved FeatureSchema directory, or a bundle or run directory holding one under `schema/`."""
    p = Path(path)
    if not (p / SCHEMA_FILE).exists() and (p / "schema" / SCHEMA_FILE).exists():
        p = p / "schema"
    return FeatureSchema.load(p)


def spec_of_directory(path: str | Path, data_root: Path | None = None) -> tuple[FeatureSpec, Path] | None:
    """(spec, base) a run or bundle directory carries, None when it has none.

    A run records its spec and base in config.json (`feature_spec`, `spec_base`); a bundle (and
    a run) holds spec.yaml. `data_root` replaces the base; without it, a run's recorded base if it
    still exists, else the default data root."""
    p = Path(path)
    recorded: Path | None = None
    spec: FeatureSpec | None = None
    config_file = p / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise SpecError(f"cannot read {config_file}: {exc}") from None
        if isinstance(config, dict) and "feature_spec" in config:
            spec = FeatureSpec.parse(config["feature_spec"], f"{config_file} feature_spec")
            if config.get("spec_base"):
                recorded = Path(str(config["spec_base"]))
    if spec is None and (p / SPEC_FILE).is_file():
        spec = FeatureSpec.load(p / SPEC_FILE)
    if spec is None:
        return None
    if data_root is not None:
        return spec, Path(data_root)
    if recorded is not None and recorded.exists():
        return spec, recorded
    return spec, resolve_data_root(None)


def schema_from_log(
    events: EventLog, spec: SchemaSpec | None = None, catalogue: tuple[npt.ArrayLike, npt.ArrayLike] | None = None
) -> FeatureSchema:
    """Vocabularies built from the data itself (when no saved schema is given): users from the
    log (already grouped by user, so no sort), items and categories from the catalogue if given,
    else from the log."""
    users, _ = events.user_offsets()
    items = catalogue[0] if catalogue is not None else events.item_id
    categories = catalogue[1] if catalogue is not None else events.category_id
    return FeatureSchema(
        spec or SchemaSpec(), Vocabulary.build(users), Vocabulary.build(items), Vocabulary.build(categories)
    )


def schema_from_dataset(dataset: Dataset) -> FeatureSchema:
    """A schema of a spec's data itself (no trained schema given): vocabularies of every user with
    events and every catalogue item, side features fitted on the tables (context: on every event)."""
    catalogue = dataset.item_catalogue()
    spec = SchemaSpec.from_feature_spec(dataset.spec, fit_side_features(dataset), dataset.id_types)
    return schema_from_log(dataset.events, spec, catalogue)


def ingest_spec(spec: FeatureSpec, schema: FeatureSchema | None) -> FeatureSpec:
    """The spec as ingest reads it under a trained schema: no context columns (the store keeps
    none, the schema has their fitted encoders), and ids the schema declares strings hashed as
    strings (an `int` schema leaves the spec's own setting, as training read it). Without a
    schema, the spec itself (the schema is fitted on its data, context included)."""
    if schema is None:
        return spec
    user_type, item_type = schema.spec.id_types
    ids = IdsDecl(
        user="string" if user_type == "string" else spec.ids.user,
        item="string" if item_type == "string" else spec.ids.item,
    )
    return spec.model_copy(update={"context_features": None, "ids": ids})


@dataclass(frozen=True, eq=False)
class Source:
    """What an ingest reads: the spec, where its paths resolve, the trained schema (None: build one)."""

    spec: FeatureSpec
    base: Path
    schema: FeatureSchema | None
    label: str


def resolve_source(args: argparse.Namespace, upsert: bool = False) -> Source:
    """The spec, base and schema the arguments name (see the module doc for the order)."""
    schema = load_schema(args.schema) if args.schema else None
    explicit = getattr(args, "spec", None) is not None or getattr(args, "data", None) is not None
    carried = spec_of_directory(args.schema, args.data_root) if args.schema and not explicit else None
    if carried is not None:
        spec, base = carried
        label = f"{args.schema} ({spec.name})"
    else:
        if not explicit:
            if upsert:
                raise SpecError(
                    f"{args.schema} carries no feature spec (spec.yaml): name it with --spec FILE, "
                    "which says the upsert file's columns"
                )
            args.data = "tmall"  # the default data set, as before feature specs
        spec, base = spec_from_args(args)
        label = str(args.spec) if getattr(args, "spec", None) is not None else str(args.data)
    return Source(spec, base, schema, label)


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    parser.set_defaults(data=None)  # none given: the spec of --schema/--bundle/--run, else tmall
    parser.add_argument(
        "--schema",
        "--bundle",
        "--run",
        dest="schema",
        type=Path,
        default=None,
        metavar="DIR",
        help="the trained schema: a saved FeatureSchema dir, a bundle dir or a run dir (their schema/; a bundle "
        "or run trained from a feature spec also gives the spec, so no --spec/--data is needed); "
        "default: built from the data",
    )
    parser.add_argument("--save-schema", type=Path, default=None, help="write the schema used to this dir")
    parser.add_argument(
        "--redis-url", default=None, help="redis:// or rediss:// URL (default $REDIS_URL; else the embedded Valkey)"
    )
    parser.add_argument("--cluster-nodes", default=None, help="host:port,... of a Redis Cluster ($REDIS_CLUSTER_NODES)")
    parser.add_argument(
        "--embedded-data-dir", default=None, help="data dir of the embedded Valkey (default data-cache/valkey)"
    )
    parser.add_argument(
        "--persistence", choices=["none", "rdb", "aof"], default=None, help="embedded Valkey persistence (default rdb)"
    )
    parser.add_argument(
        "--version", default=None,
        help="feature-set version name (default v<UTC timestamp>; for an upsert: the active version)",
    )
    parser.add_argument("--ttl-seconds", type=int, default=None, help="expire user keys after this (default: never)")
    parser.add_argument("--batch-users", type=int, default=DEFAULT_BATCH_USERS, help="users per pipeline")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted ingest from its checkpoint (default: the newest incomplete)",
    )
    parser.add_argument("--activate", action="store_true", help="switch the active pointer to this version at the end")
    parser.add_argument(
        "--shard", default=None, metavar="I/N",
        help="load only shard I of N (0 <= I < N): the users and items whose key hashes to I. N processes, "
        "one per shard, load one data set into the same --version in parallel; the last to finish marks the "
        "version complete (and activates it with --activate). Needs --version; --resume continues this shard",
    )
    parser.add_argument(
        "--finish-shards", type=int, default=None, metavar="N",
        help="complete --version, loaded with --shard I/N, once all N shards are done (and activate it with "
        "--activate), then exit; exit 1 naming the shards not done",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of one batch write, seconds")
    parser.add_argument("--list-versions", action="store_true", help="list versions and their status, then exit")
    parser.add_argument(
        "--drop-version", default=None, metavar="VERSION", help="delete a non-active version, then exit"
    )
    parser.add_argument(
        "--upsert-items", type=Path, default=None, metavar="FILE",
        help="rewrite the side features of these items (the spec's item table columns) in the active version "
        "(or --version) in place, then exit",
    )
    parser.add_argument(
        "--upsert-users", type=Path, default=None, metavar="FILE",
        help="rewrite the side features of these users' profiles (the spec's user table columns) in place, then exit",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--cluster-bundle",
        type=Path,
        default=None,
        help="also cluster each user's behaviours with this bundle's GSU keys, for the twin_v2 retrieval strategy",
    )
    parser.add_argument(
        "--cluster-size", type=int, default=None, help="target events per cluster (default sqrt(history length))"
    )
    parser.add_argument("--cluster-seed", type=int, default=0, help="k-means seed of the clustering")


def store_config_from_args(args: argparse.Namespace) -> FeatureStoreConfig:
    embedded = EmbeddedConfig()
    if args.embedded_data_dir:
        embedded = embedded.model_copy(update={"data_dir": args.embedded_data_dir})
    if args.persistence:
        embedded = embedded.model_copy(update={"persistence": args.persistence})
    # Bulk writes move megabytes per pipeline: far longer timeouts than the serving defaults.
    return FeatureStoreConfig.from_env(
        url=args.redis_url,
        cluster_nodes=args.cluster_nodes,
        embedded=embedded,
        read_timeout_s=args.timeout,
        request_timeout_s=args.timeout,
        connect_timeout_s=5.0,
        pool_size=8,
        item_cache_size=0,
    )


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_main(args))
    except UserError as exc:  # a flag, file, spec or schema that is wrong: one line, exit 2
        sys.stderr.write(f"rankserve ingest: error: {exc}\n")
        return 2
    except (FeatureStoreError, CodecError, ValueError, OSError) as exc:
        log.error("ingest failed: %s", exc, extra={"error_type": type(exc).__name__})
        return 1


def shard_from_args(args: argparse.Namespace, upsert: bool) -> Shard | None:
    """The `--shard` of the arguments (None: a one-process load); refuses, naming the flag, a
    malformed one and the combinations that cannot work (checked before anything connects)."""
    if args.finish_shards is not None:
        if args.finish_shards < 1:
            raise ShardArgumentError(f"--finish-shards {args.finish_shards}: the shard count must be at least 1")
        if args.version is None:
            raise ShardArgumentError("--finish-shards needs --version: the version the shards loaded")
        if args.shard is not None:
            raise ShardArgumentError("--finish-shards completes a sharded load: give it without --shard")
    if args.shard is None:
        return None
    shard = Shard.parse(args.shard)
    if upsert or args.list_versions or args.drop_version:
        raise ShardArgumentError("--shard applies to a bulk load, not to upserts, --list-versions or --drop-version")
    if args.version is None:
        raise ShardArgumentError(f"--shard {shard} needs --version: every shard must load the same named version")
    try:
        shard.record(args.version)
    except ValueError as exc:
        raise ShardArgumentError(f"--shard {shard}: {exc}") from None
    return shard


async def _list_versions(store: OnlineStore) -> None:
    active = await store.active_version(refresh=True)
    for name in await store.list_versions():
        meta = await store.get_meta(name)
        if _is_shard_record(meta):
            continue  # a shard's progress record: shown as its version's `shards`
        log.info(
            "version %s%s",
            name,
            " (active)" if name == active else "",
            extra={
                "status": meta.status if meta else None,
                "counts": meta.counts if meta else None,
                "schema_hash": meta.schema_hash if meta else None,
                "shards": meta.info.get("shards") if meta else None,
            },
        )


async def _drop_version(store: OnlineStore, version: str) -> None:
    """Drop a version and the shard records of a sharded load of it. The records go first: a
    record left behind would count its shard as done when the version is loaded again."""
    records = [n for n in await store.list_versions() if _shard_record_of(n, version)]
    if records and await store.active_version(refresh=True) != version:  # the active one: refused below
        meta = await store.get_meta(version)
        if meta is not None and meta.status != STATUS_DROPPING:
            meta.status = STATUS_DROPPING  # shards still loading it stop before their next write
            await store.put_meta(meta)
        for name in records:
            await store.drop_version(name)
    removed = await store.drop_version(version)
    log.info("dropped %s: %d keys%s", version, removed, f" and {len(records)} shard records" if records else "")


async def _main(args: argparse.Namespace) -> int:
    upsert = args.upsert_items is not None or args.upsert_users is not None
    if upsert and args.schema is None:
        raise SchemaError("an upsert needs the schema the version was ingested with: --bundle, --run or --schema")
    shard = shard_from_args(args, upsert)
    config = store_config_from_args(args)
    store = create_store(config)
    async with store:
        if args.list_versions:
            await _list_versions(store)
            return 0
        if args.drop_version:
            await _drop_version(store, args.drop_version)
            return 0
        if args.finish_shards is not None:
            waiting = await finish_shards(store, args.version, args.finish_shards, activate=args.activate)
            if waiting:
                raise VersionConflict(
                    f"shards {', '.join(map(str, waiting))} of {args.finish_shards} have not finished loading "
                    f"{args.version}: run them (with --resume) first"
                )
            return 0

        source = resolve_source(args, upsert)
        if upsert:
            schema = source.schema
            assert schema is not None
            check_spec_matches_schema(source.spec, schema.spec)
            for path, kind in ((args.upsert_items, "items"), (args.upsert_users, "users")):
                if path is None:
                    continue
                table = read_upsert_table(path, source.spec, schema, kind)
                write = upsert_items if kind == "items" else upsert_users
                await write(store, schema, table, args.version)
            return 0

        t0 = time.perf_counter()
        if source.schema is not None:
            check_spec_matches_schema(source.spec, source.schema.spec)
        dataset = load_spec_dataset(ingest_spec(source.spec, source.schema), source.base)
        log.info("loaded %s: %d events in %.1f s", source.label, len(dataset.events), time.perf_counter() - t0)
        schema = source.schema if source.schema is not None else schema_from_dataset(dataset)
        if args.save_schema:
            schema.save(args.save_schema)
        version = args.version
        if version is None and args.resume:
            version = await latest_incomplete_version(store, schema.hash)
        if version is None:
            version = time.strftime("v%Y%m%d%H%M%S", time.gmtime())
        log.info("ingesting into version %s (schema %s)%s", version, schema.hash[:12],
                 "" if shard is None else f", shard {shard}")
        clusterer = None
        if args.cluster_bundle is not None:
            params = ClusterParams(target_size=args.cluster_size, seed=args.cluster_seed)
            clusterer = clusterer_from_bundle(args.cluster_bundle, params)
            log.info("clustering behaviours with %s (key fingerprint %s)", args.cluster_bundle,
                     clusterer.fingerprint.hex())
        await ingest_dataset(
            store,
            dataset,
            schema,
            version,
            batch_users=args.batch_users,
            ttl_seconds=args.ttl_seconds,
            resume=args.resume,
            activate=args.activate,
            source=source.label,
            progress=not args.no_progress,
            clusterer=clusterer,
            shard=shard,
        )
    return 0
