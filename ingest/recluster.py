"""`rankserve recluster`: cluster the stored histories of a feature-set version again, in place.

    rankserve recluster --bundle bundles/rank/3 --redis-url redis://redis:6379/0
    rankserve recluster --bundle bundles/rank/3 --all --version v20240601

The `twin_v2` retrieval strategy searches the clusters `rankserve ingest --cluster-bundle`
stores beside each sequence. Events that `rankserve consume --cluster-bundle` appends get the id
of their nearest stored centroid; others (a consumer without the option, appends through the
Python API, users whose clustering has no centroids) carry none, and the retriever searches
them for every candidate (recall kept, cost growing with their number). This command, run
periodically (a CronJob, off the serving path), reads each user's stored sequence and clusters
and clusters again, with the bundle's GSU tables exactly as ingest does, every user whose
clustering no longer covers the whole sequence, was made with other tables or has no centroids
(`--all`: every user, which also re-partitions clusters that nearest-centroid ids have grown).
Histories too short to cluster lose a stale clustering.

Safe beside a running consumer: the write is a script that checks the sequence is the one the
clustering was computed from (same length, same first record: an append changes the length, a
trim the first record) and otherwise leaves it; such users are counted and taken by the next
run. The clusters key gets the sequence's TTL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from feature_store import keys
from feature_store.clusters import ClusterParams, UserClusterer
from feature_store.codecs import SEQ_RECORD_SIZE, CodecError, decode_cluster_header, decode_clusters, decode_sequence
from feature_store.errors import FeatureStoreError, UserError, VersionNotFound
from feature_store.redis_store import RedisOnlineStore, create_store
from feature_store.store import FeatureStoreConfig

log = logging.getLogger(__name__)

# KEYS: sequence, clusters. ARGV: the sequence's length and first record when it was read, the
# new clusters value ("" deletes a stale one).
_WRITE_IF_UNCHANGED = """
if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[1]) then return 0 end
if redis.call('GETRANGE', KEYS[1], 0, 11) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[2])
else
  redis.call('SET', KEYS[2], ARGV[3])
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
return 1
"""


@dataclass
class ReclusterStats:
    """What one run did: users seen, clustered again, left as they were, changed while clustering,
    and histories that could not be read (left as they are, logged)."""

    version: str
    users: int = 0
    reclustered: int = 0
    unclustered: int = 0  # stale clusterings removed from histories too short to cluster
    fresh: int = 0
    changed: int = 0
    unreadable: int = 0
    seconds: float = 0.0


def user_of(sequence_key: bytes) -> int:
    """The user id in `rs:<ver>:{u<user>}:seq`."""
    start = sequence_key.index(b"{u") + 2
    return int(sequence_key[start : sequence_key.index(b"}", start)])


def needs_clustering(raw_clusters: bytes | None, stored_events: int, fingerprint: bytes) -> bool:
    """Whether a stored clustering misses events of its sequence, was made with other tables, or
    has no centroids (the old format, whose new events the consumer cannot give ids)."""
    if raw_clusters is None:
        return True
    try:
        ids, _, stored_fingerprint = decode_clusters(raw_clusters)
        width = decode_cluster_header(raw_clusters).width
    except CodecError:
        return True
    return stored_fingerprint != fingerprint or ids.shape[0] != stored_events or width == 0


async def recluster(store: RedisOnlineStore, clusterer: UserClusterer, version: str, *, batch_users: int = 64,
                    all_users: bool = False) -> ReclusterStats:
    """Cluster the histories of `version` again (see the module doc); returns what was done."""
    keys.validate_version(version)
    started = time.perf_counter()
    stats = ReclusterStats(version)
    pattern = keys.sequence_key(version, 0).replace(b"{u0}", b"{u*}")
    async for page in store.scan_keys(pattern, batch=max(batch_users, 100)):
        for k in range(0, len(page), batch_users):
            await _batch(store, clusterer, version, [user_of(key) for key in page[k : k + batch_users]], all_users,
                         stats)
    stats.seconds = time.perf_counter() - started
    log.info("reclustered %d of %d users of %s in %.1f s", stats.reclustered, stats.users, version, stats.seconds,
             extra=asdict(stats))
    return stats


async def _batch(store: RedisOnlineStore, clusterer: UserClusterer, version: str, users: list[int],
                 all_users: bool, stats: ReclusterStats) -> None:
    reads: list[tuple[Any, ...]] = []
    for user in users:
        reads += [("GET", keys.sequence_key(version, user)), ("GET", keys.clusters_key(version, user))]
    replies = await store.execute(f"read {len(users)} histories", reads)
    writes: list[tuple[Any, ...]] = []
    for n, user in enumerate(users):
        raw, raw_clusters = replies[2 * n], replies[2 * n + 1]
        stats.users += 1
        if not raw:
            continue  # appended-to or dropped since the scan
        stored = len(raw) // SEQ_RECORD_SIZE
        if not all_users and not needs_clustering(raw_clusters, stored, clusterer.fingerprint):
            stats.fresh += 1
            continue
        try:
            seq = decode_sequence(raw)
        except CodecError as exc:  # one damaged value costs its own user, not the run
            stats.unreadable += 1
            log.warning("cannot read the history of user %d; left as it is: %s", user, exc, extra={"user": user})
            continue
        value = clusterer.encode(seq.item, seq.category, seq.action, seq.timestamp)
        if value is None and raw_clusters is None:
            stats.fresh += 1  # too short to cluster, and nothing stale to remove
            continue
        writes.append(("EVAL", _WRITE_IF_UNCHANGED, 2, keys.sequence_key(version, user),
                       keys.clusters_key(version, user), len(raw), raw[:SEQ_RECORD_SIZE], value or b""))
        if value is None:
            stats.unclustered += 1
    if not writes:
        return
    done = await store.execute(f"write {len(writes)} clusterings", writes)  # whole values: safe to repeat
    for command, ok in zip(writes, done, strict=True):
        if not ok:
            stats.changed += 1
            if not command[-1]:
                stats.unclustered -= 1
        elif command[-1]:
            stats.reclustered += 1


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="the bundle whose GSU tables the clusters are made for")
    parser.add_argument("--version", default=None, help="feature-set version (default: the active one)")
    parser.add_argument("--all", action="store_true", help="every user, not only those with unclustered events")
    parser.add_argument("--redis-url", default=None, help="redis:// URL (default $REDIS_URL; else the embedded Valkey)")
    parser.add_argument("--cluster-nodes", default=None, help="host:port,... of a Redis Cluster "
                        "(default $REDIS_CLUSTER_NODES)")
    parser.add_argument("--batch-users", type=int, default=64, help="users read and written per round trip")
    parser.add_argument("--cluster-size", type=int, default=None,
                        help="target events per cluster (default sqrt(history length)), as ingest's")
    parser.add_argument("--cluster-seed", type=int, default=0, help="k-means seed of the clustering, as ingest's")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per Redis call, retries included")


def run(args: argparse.Namespace) -> int:
    if args.batch_users < 1:
        raise UserError("--batch-users must be >= 1")
    if args.version is not None:
        try:
            keys.validate_version(args.version)
        except ValueError as exc:
            raise UserError(f"--version: {exc}") from None
    from ingest.bulk import clusterer_from_bundle

    try:
        clusterer = clusterer_from_bundle(args.bundle, ClusterParams(target_size=args.cluster_size,
                                                                     seed=args.cluster_seed))
    except (OSError, ValueError) as exc:
        raise UserError(f"--bundle {args.bundle}: {exc}") from None
    config = FeatureStoreConfig.from_env(
        url=args.redis_url, cluster_nodes=args.cluster_nodes, read_timeout_s=args.timeout,
        request_timeout_s=args.timeout, connect_timeout_s=min(args.timeout, 5.0), item_cache_size=0)
    try:
        stats = asyncio.run(_main(config, clusterer, args.version, args.batch_users, args.all))
    except FeatureStoreError as exc:
        log.error("recluster failed: %s", exc, extra={"error_type": type(exc).__name__})
        return 1
    sys.stdout.write(f"{stats}\n")
    return 0


async def _main(config: FeatureStoreConfig, clusterer: UserClusterer, version: str | None, batch_users: int,
                all_users: bool) -> ReclusterStats:
    store = create_store(config)
    if not isinstance(store, RedisOnlineStore):
        raise UserError("rankserve recluster needs the Redis feature store")
    async with store:
        version = version or await store.active_version(refresh=True)
        if version is None:
            raise VersionNotFound("no active feature-set version: name one with --version")
        return await recluster(store, clusterer, version, batch_users=batch_users, all_users=all_users)
