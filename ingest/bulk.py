"""`rankserve ingest`: bulk-load an EventLog into a new feature-set version of the online store.

    rankserve ingest --data tmall --schema bundles/rank/1/schema --version v20240601 --activate

What is written, per user (in batches of `--batch-users`, one pipeline each): the profile (user
index) and the newest `schema.spec.max_sequence_length` events as one sequence value; per item
of the catalogue: item index and category index. Every write is a SET of a whole value, so a
re-run gives the same state, and a crash loses at most the batch in flight: the version's meta
key holds a checkpoint (`next_user`) written after each batch, and `--resume` continues there.
`--activate` switches the active pointer once the version is complete.

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
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from export.bundle import open_bundle
from feature_store import keys
from feature_store.clusters import ClusterParams, UserClusterer
from feature_store.codecs import SEQ_RECORD_SIZE, CodecError, encode_items, encode_profile, encode_sequence
from feature_store.errors import FeatureStoreError, VersionConflict
from feature_store.redis_store import create_store
from feature_store.schema import SCHEMA_FILE, FeatureSchema, SchemaError, SchemaSpec, Vocabulary
from feature_store.store import (
    STATUS_COMPLETE,
    STATUS_INGESTING,
    EmbeddedConfig,
    FeatureStoreConfig,
    OnlineStore,
    VersionMeta,
)
from models.data.events import EventLog
from models.data.readers import add_dataset_arguments, dataset_from_args

log = logging.getLogger(__name__)

DEFAULT_BATCH_USERS = 256
ITEM_BATCH = 5_000


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


def source_fingerprint(events: EventLog, user_ids: npt.NDArray[np.int64], offsets: npt.NDArray[np.int64]) -> str:
    """Identifies the user order and sizes a checkpoint refers to; `--resume` requires a match."""
    h = hashlib.sha256()
    h.update(np.int64(len(events)).tobytes())
    h.update(np.ascontiguousarray(user_ids, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(offsets, dtype="<i8").tobytes())
    return h.hexdigest()


def item_table(
    events: EventLog, schema: FeatureSchema, catalogue: tuple[npt.ArrayLike, npt.ArrayLike] | None = None
) -> tuple[npt.NDArray[np.int64], list[bytes]]:
    """(raw item ids, encoded values). A catalogue (raw item ids, raw category ids) is
    authoritative: it lists every servable item, those without events too. Without one, the
    log's items are written, each with the category of its latest event."""
    if catalogue is not None:
        item_ids = np.asarray(catalogue[0], dtype=np.int64)
        category_ids = np.asarray(catalogue[1], dtype=np.int64)
    else:
        item_ids, category_ids = events.item_catalogue()
    values = encode_items(schema.items.lookup(item_ids), schema.categories.lookup(category_ids))
    return item_ids, values


def encode_user_batch(
    events: EventLog, schema: FeatureSchema, offsets: npt.NDArray[np.int64], u0: int, u1: int, cap: int
) -> tuple[list[bytes], list[bytes], int]:
    """Profiles and sequences (newest `cap` events, oldest first) of users u0..u1-1; and the events kept."""
    lo, hi = int(offsets[u0]), int(offsets[u1])
    starts = np.maximum(offsets[u0:u1], offsets[u0 + 1 : u1 + 1] - cap)
    ends = offsets[u0 + 1 : u1 + 1]
    # Encode the whole batch once (vectorized), then cut each user's tail out of the bytes.
    raw = encode_sequence(
        schema.items.lookup(events.item_id[lo:hi]),
        schema.categories.lookup(events.category_id[lo:hi]),
        events.action[lo:hi],
        events.timestamp[lo:hi],
    )
    view = memoryview(raw)
    sequences = [
        bytes(view[(s - lo) * SEQ_RECORD_SIZE : (e - lo) * SEQ_RECORD_SIZE])
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
    ]
    user_index = schema.users.lookup(events.user_id[offsets[u0:u1]])
    profiles = [encode_profile(int(u)) for u in user_index.tolist()]
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
) -> IngestStats:
    """Write `events` through `schema` into `version` (see the module doc); returns what was written.

    With a `clusterer`, each user's behaviour clusters are written too (histories shorter than
    its `min_events` get none)."""
    keys.validate_version(version)
    if batch_users < 1:
        raise ValueError("batch_users must be >= 1")
    started = time.perf_counter()
    cap = schema.spec.max_sequence_length
    if schema.categories.size - 1 > (1 << 24) - 1:
        raise CodecError("more than 2^24 categories cannot be encoded in a sequence record")
    user_ids, offsets = events.user_offsets()
    fingerprint = source_fingerprint(events, user_ids, offsets)
    meta = await _open_version(store, version, schema, fingerprint, resume, source, batch_users, ttl_seconds)
    stats = IngestStats(version=version)
    next_user = int(meta.checkpoint.get("next_user", 0))
    stats.resumed_from_user = next_user
    if clusterer is not None:
        meta.info["clusters"] = {"fingerprint": clusterer.fingerprint.hex(), **asdict(clusterer.params)}

    if not meta.checkpoint.get("items_done"):
        item_ids, values = item_table(events, schema, catalogue)
        for k in range(0, len(values), ITEM_BATCH):
            await store.write_items(version, item_ids[k : k + ITEM_BATCH].tolist(), values[k : k + ITEM_BATCH])
        stats.items = len(values)
        stats.bytes += sum(map(len, values))
        meta.counts["items"] = len(values)
        meta.checkpoint["items_done"] = True
        await store.put_meta(meta)

    n_users = len(user_ids)
    with tqdm(
        total=n_users,
        initial=next_user,
        unit="user",
        file=sys.stderr,
        disable=not progress,
        desc=f"ingest {version}",
        mininterval=1.0,
    ) as bar:
        for u0 in range(next_user, n_users, batch_users):
            u1 = min(u0 + batch_users, n_users)
            profiles, sequences, kept = encode_user_batch(events, schema, offsets, u0, u1, cap)
            clusters = None
            if clusterer is not None:
                clusters = cluster_user_batch(events, schema, offsets, u0, u1, cap, clusterer)
                stats.clustered += sum(c is not None for c in clusters)
                stats.bytes += sum(len(c) for c in clusters if c is not None)
            await store.write_users(version, user_ids[u0:u1].tolist(), profiles, sequences, ttl_seconds,
                                    clusters=clusters)
            stats.users += u1 - u0
            stats.events += kept
            stats.bytes += sum(map(len, sequences)) + sum(map(len, profiles))
            stats.batches += 1
            meta.checkpoint["next_user"] = u1
            meta.counts["users"] = u1
            meta.counts["events"] = int(meta.counts.get("events", 0)) + kept
            await store.put_meta(meta)
            bar.update(u1 - u0)

    meta.status = STATUS_COMPLETE
    meta.counts["bytes"] = int(meta.counts.get("bytes", 0)) + stats.bytes
    await store.put_meta(meta)
    if activate:
        await store.activate(version)
        stats.activated = True
    stats.seconds = time.perf_counter() - started
    log.info(
        "ingested %d users, %d events, %d items, %.1f MB into %s in %.1f s",
        stats.users,
        stats.events,
        stats.items,
        stats.bytes / 1e6,
        version,
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
        },
    )
    return stats


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
    """The version's meta to continue from: its checkpoint on `resume`, a fresh one otherwise."""
    existing = await store.get_meta(version)
    if existing is not None and existing.schema_hash != schema.hash:
        raise VersionConflict(
            f"version {version!r} holds schema {existing.schema_hash[:12]}, not {schema.hash[:12]}: use a new --version"
        )
    info = {"source": source, "fingerprint": fingerprint, "batch_users": batch_users, "ttl_seconds": ttl_seconds}
    if resume and existing is not None:
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
    """The most recently created version still being ingested with this schema (for `--resume`)."""
    best: VersionMeta | None = None
    for name in await store.list_versions():
        meta = await store.get_meta(name)
        if (
            meta
            and meta.status == STATUS_INGESTING
            and meta.schema_hash == schema_hash
            and (best is None or meta.created > best.created)
        ):
            best = meta
    return best.version if best else None


def load_schema(path: str | Path) -> FeatureSchema:
    """A saved FeatureSchema directory, or a bundle directory holding one under `schema/`."""
    p = Path(path)
    if not (p / SCHEMA_FILE).exists() and (p / "schema" / SCHEMA_FILE).exists():
        p = p / "schema"
    return FeatureSchema.load(p)


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


def _synthetic_catalogue(spec: str, data_root: Path | None) -> tuple[npt.NDArray[Any], npt.NDArray[Any]] | None:
    """A synthetic set ships its whole catalogue, items without events included."""
    kind, _, arg = spec.partition(":")
    if kind != "synthetic" or not arg:
        return None
    d = Path(arg)
    if not d.exists() and data_root is not None:
        d = data_root / arg
    try:
        return np.load(d / "catalogue_item.npy"), np.load(d / "catalogue_category.npy")
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    parser.add_argument(
        "--schema",
        type=Path,
        default=None,
        help="saved FeatureSchema dir, or a bundle dir (uses its schema/); default: from the data",
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
    parser.add_argument("--version", default=None, help="feature-set version name (default v<UTC timestamp>)")
    parser.add_argument("--ttl-seconds", type=int, default=None, help="expire user keys after this (default: never)")
    parser.add_argument("--batch-users", type=int, default=DEFAULT_BATCH_USERS, help="users per pipeline")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted ingest from its checkpoint (default: the newest incomplete)",
    )
    parser.add_argument("--activate", action="store_true", help="switch the active pointer to this version at the end")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of one batch write, seconds")
    parser.add_argument("--list-versions", action="store_true", help="list versions and their status, then exit")
    parser.add_argument(
        "--drop-version", default=None, metavar="VERSION", help="delete a non-active version, then exit"
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
    except (FeatureStoreError, SchemaError, CodecError, ValueError, OSError) as exc:
        log.error("ingest failed: %s", exc, extra={"error_type": type(exc).__name__})
        return 1


async def _main(args: argparse.Namespace) -> int:
    config = store_config_from_args(args)
    store = create_store(config)
    async with store:
        if args.list_versions:
            active = await store.active_version(refresh=True)
            for name in await store.list_versions():
                meta = await store.get_meta(name)
                log.info(
                    "version %s%s",
                    name,
                    " (active)" if name == active else "",
                    extra={
                        "status": meta.status if meta else None,
                        "counts": meta.counts if meta else None,
                        "schema_hash": meta.schema_hash if meta else None,
                    },
                )
            return 0
        if args.drop_version:
            removed = await store.drop_version(args.drop_version)
            log.info("dropped %s: %d keys", args.drop_version, removed)
            return 0

        t0 = time.perf_counter()
        events = dataset_from_args(args)
        log.info("loaded %s: %d events in %.1f s", args.data, len(events), time.perf_counter() - t0)
        catalogue = _synthetic_catalogue(args.data, args.data_root)
        schema = load_schema(args.schema) if args.schema else schema_from_log(events, catalogue=catalogue)
        if args.save_schema:
            schema.save(args.save_schema)
        version = args.version
        if version is None and args.resume:
            version = await latest_incomplete_version(store, schema.hash)
        if version is None:
            version = time.strftime("v%Y%m%d%H%M%S", time.gmtime())
        log.info("ingesting into version %s (schema %s)", version, schema.hash[:12])
        clusterer = None
        if args.cluster_bundle is not None:
            params = ClusterParams(target_size=args.cluster_size, seed=args.cluster_seed)
            clusterer = clusterer_from_bundle(args.cluster_bundle, params)
            log.info("clustering behaviours with %s (key fingerprint %s)", args.cluster_bundle,
                     clusterer.fingerprint.hex())
        await ingest_log(
            store,
            events,
            schema,
            version,
            batch_users=args.batch_users,
            ttl_seconds=args.ttl_seconds,
            resume=args.resume,
            activate=args.activate,
            catalogue=catalogue,
            source=args.data,
            progress=not args.no_progress,
            clusterer=clusterer,
        )
    return 0
