"""The online feature store: configuration, the backend-neutral interface, and the factory.

One interface (`OnlineStore`) with one implementation per backend, chosen by a typed config
field (`FeatureStoreConfig.backend`, then `mode`), as Feast's online stores are. The service
depends only on this module; the Redis implementation lives in `redis_store.py` and is
imported when a store is created.

    config = FeatureStoreConfig.from_env()          # or embedded in the service's Settings
    async with create_store(config) as store:
        result = await store.fetch(user_id=42, item_ids=[7, 8, 9])
"""

from __future__ import annotations

import abc
import json
import os
import random
import time
from collections.abc import Mapping
from collections.abc import Sequence as SequenceABC
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from feature_store.codecs import Sequence
from feature_store.schema import SchemaError, SchemaSpec

StoreMode = Literal["auto", "embedded", "single", "cluster"]
Persistence = Literal["none", "rdb", "aof"]

# Version status values kept in the meta key.
STATUS_INGESTING = "ingesting"
STATUS_COMPLETE = "complete"
STATUS_DROPPING = "dropping"


class EmbeddedConfig(BaseModel):
    """The embedded Valkey started when no Redis URL or cluster nodes are configured."""

    model_config = ConfigDict(extra="forbid")

    data_dir: str | None = Field(
        default="data-cache/valkey",
        description="directory of the RDB/AOF files and log (None: a temporary one); one server per directory",
    )
    persistence: Persistence = Field(
        default="rdb", description="none: in-memory only; rdb: snapshot on shutdown and periodically; aof: append-only"
    )
    port: int | None = Field(default=None, ge=1, le=65535, description="loopback port; None picks a free one")
    maxmemory: str | None = Field(default=None, description="Valkey maxmemory, e.g. '4gb' (None: unlimited)")
    start_timeout_s: float = Field(default=120.0, gt=0, description="wait this long for the server (RDB load)")
    stop_timeout_s: float = Field(default=120.0, gt=0, description="wait this long for the shutdown save")


class FeatureStoreConfig(BaseModel):
    """Typed settings of the online store; the service's Settings embeds this model.

    Mode `auto` picks `cluster` when `cluster_nodes` is set, `single` when `url` is set, else
    `embedded`. Passwords and TLS go in the URL: `redis://user:pass@host:6379/0`, `rediss://...`;
    in cluster mode the URL (if any) supplies username/password/TLS for every node.
    """

    # The URL may carry a password: validation errors must not echo it (they end up in logs).
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    backend: Literal["redis"] = Field(default="redis", description="implementation to use (one per backend)")
    mode: StoreMode = "auto"
    url: str | None = Field(default=None, repr=False, description="redis:// or rediss:// URL of a single node")
    cluster_nodes: list[str] = Field(default_factory=list, description="host:port of cluster startup nodes")
    embedded: EmbeddedConfig = Field(default_factory=EmbeddedConfig)

    connect_timeout_s: float = Field(default=0.25, gt=0, description="socket connect timeout per attempt")
    read_timeout_s: float = Field(default=0.5, gt=0, description="socket read/write timeout per attempt")
    request_timeout_s: float = Field(default=1.0, gt=0, description="deadline of one store call, retries included")
    retry_attempts: int = Field(default=3, ge=1, le=10, description="attempts per call (1 = no retry)")
    retry_backoff_base_s: float = Field(default=0.01, ge=0, description="first backoff; doubles per attempt")
    retry_backoff_max_s: float = Field(default=0.2, ge=0, description="cap of one backoff sleep")
    pool_size: int = Field(default=64, ge=1, description="max connections (per node in cluster mode)")

    item_cache_size: int = Field(default=200_000, ge=0, description="item-feature cache entries (0 disables)")
    item_cache_ttl_s: float = Field(default=60.0, gt=0, description="item-feature cache TTL")
    item_changes_poll_s: float = Field(
        default=0.25, ge=0,
        description="read the item change log this often and drop the items upserts rewrote from the item cache "
        "(0: off; the TTL alone then bounds how long an upserted item is served stale)",
    )
    max_sequence_length: int = Field(default=10_000, ge=0, description="newest events read per fetch")
    read_clusters: bool = Field(
        default=True,
        description="also read the behaviour clusters (twin_v2) in the fetch's round trip: 2 bytes per event when "
        "an ingest stored them, a nil reply otherwise",
    )
    lean_reads: bool = Field(
        default=True,
        description="single node, TCP or unix socket: send the fetch's pipeline on the store's own connections "
        "and parse its replies with hiredis as they arrive (false: through redis-py, as every other call)",
    )
    active_refresh_interval_s: float = Field(default=5.0, gt=0, description="re-read the active pointer this often")
    version: str | None = Field(default=None, description="pin this feature-set version instead of the active one")

    @field_validator("cluster_nodes", mode="before")
    @classmethod
    def _split_nodes(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("cluster_nodes")
    @classmethod
    def _check_nodes(cls, value: list[str]) -> list[str]:
        for node in value:
            host, sep, port = node.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"cluster node {node!r} is not host:port")
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("url must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _check_mode(self) -> Self:
        if self.mode == "single" and not self.url:
            raise ValueError("mode 'single' needs url")
        if self.mode == "cluster" and not (self.cluster_nodes or self.url):
            raise ValueError("mode 'cluster' needs cluster_nodes (or a url of one node)")
        return self

    def resolved_mode(self) -> Literal["embedded", "single", "cluster"]:
        if self.mode != "auto":
            return self.mode
        if self.cluster_nodes:
            return "cluster"
        return "single" if self.url else "embedded"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> FeatureStoreConfig:
        """Read REDIS_URL, REDIS_CLUSTER_NODES and REDIS_MODE (for the CLI; the service uses Settings)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if env.get("REDIS_URL"):
            values["url"] = env["REDIS_URL"]
        if env.get("REDIS_CLUSTER_NODES"):
            values["cluster_nodes"] = env["REDIS_CLUSTER_NODES"]
        if env.get("REDIS_MODE"):
            values["mode"] = env["REDIS_MODE"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded in attempts and in total time."""

    attempts: int
    base_s: float
    max_s: float
    deadline_s: float

    @classmethod
    def from_config(cls, config: FeatureStoreConfig) -> RetryPolicy:
        return cls(
            config.retry_attempts, config.retry_backoff_base_s, config.retry_backoff_max_s, config.request_timeout_s
        )

    def backoff(self, failed_attempts: int, rng: random.Random | None = None) -> float:
        """Sleep before the next attempt after `failed_attempts` failures (>= 1): U(0, min(max, base*2^(n-1)))."""
        ceiling = min(self.max_s, self.base_s * (2 ** (failed_attempts - 1)))
        return (rng or random).uniform(0.0, ceiling)


def _no_side() -> npt.NDArray[np.uint8]:
    return np.zeros((0, 0), dtype=np.uint8)


@dataclass(frozen=True, eq=False)
class FetchResult:
    """One user's features and the candidates' item features, in input order.

    `user_index` is None when the user has no profile. `sequence` holds the newest events
    (chronological, empty on a miss). `item_index`/`category_index` are 0 where `found` is False.
    `user_side` is the profile's side tail (b"" without a profile or without user side features);
    `item_side` [n, W] uint8 holds each found item's side tail (all-zero rows for misses, W = 0
    when the version's items have none). Decode both with `codecs.decode_side` and the schema's widths.
    """

    version: str
    user_index: int | None
    sequence: Sequence
    item_index: npt.NDArray[np.int64]
    category_index: npt.NDArray[np.int64]
    found: npt.NDArray[np.bool_]
    user_side: bytes = b""
    item_side: npt.NDArray[np.uint8] = field(default_factory=_no_side)

    def __post_init__(self) -> None:
        n = self.found.shape[0]
        if self.item_side.shape[0] != n:
            if self.item_side.size:
                raise ValueError(f"item_side has {self.item_side.shape[0]} rows for {n} items")
            object.__setattr__(self, "item_side", np.zeros((n, 0), dtype=np.uint8))

    @property
    def user_found(self) -> bool:
        return self.user_index is not None


TRIM_SLACK_DIVISOR = 16  # a capped sequence may run past its cap by cap / 16 records before it is trimmed


def trim_slack(cap: int) -> int:
    """Records a sequence capped at `cap` may hold past the cap before an append trims it back to
    `cap` (at least one). Trimming copies the whole value, so the store does it once per slack
    appended events rather than on every append; readers take the newest events they need (a
    served model searches the newest `max_sequence_length` events of its schema)."""
    return max(1, cap // TRIM_SLACK_DIVISOR)


class UserAppend(NamedTuple):
    """Streamed events of one user, oldest first: their sequence records (`codecs.encode_sequence`,
    12 bytes each) and one event id per record. (A tuple: a consumer builds thousands per batch.)

    Optionally a `twin_v2` cluster id per record (u16 little-endian, `cluster_ids`) under the
    header of the clustering they were computed from (`cluster_header`, the stored value's first
    `codecs.CLUSTER_HEADER_SIZE` bytes): they are stored only while that clustering is in place
    and covers every earlier event."""

    user_id: int
    records: bytes
    event_ids: SequenceABC[bytes]
    cluster_header: bytes = b""
    cluster_ids: bytes = b""


class AppendCounts(NamedTuple):
    """What `append_events_once` did for one user: events appended, duplicates skipped, and
    appended events that got a cluster id."""

    appended: int
    duplicates: int
    clustered: int = 0


@dataclass
class FetchCounts:
    """Running totals of what the fetches of one store found, in plain ints (the service turns
    them into metrics; this package stays free of any metrics library)."""

    unknown_users: int = 0  # fetches of a user without a profile
    unknown_items: int = 0  # candidates without item features
    item_cache_hits: int = 0
    item_cache_misses: int = 0  # lookups the item cache sent on to Redis (0 both while it is off)
    item_cache_invalidations: int = 0  # cached items dropped because an upsert announced them
    item_cache_resets: int = 0  # item caches emptied because their change log went unread for half its retention


@dataclass
class VersionMeta:
    """What the meta key of a feature-set version holds (JSON)."""

    version: str
    schema_hash: str
    status: str = STATUS_INGESTING
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    counts: dict[str, int] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> VersionMeta:
        doc = json.loads(raw)
        known = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc}
        return cls(**known)


@dataclass(frozen=True)
class StoredSchema:
    """The schema a version was ingested with, as recorded beside its meta (`put_schema`):
    its hash and its spec (`SchemaSpec.to_dict()`: actions, tasks, id types, fitted side features),
    so that a bundle refused for another schema can be told what differs."""

    schema_hash: str
    spec: dict[str, Any]

    def difference(self, spec: SchemaSpec) -> str:
        """Where `spec` differs from this recorded spec, as a clause for an error message:
        " (they differ in: tasks, side.item)"; "" when the recorded spec cannot be read."""
        try:
            fields = spec.differences(SchemaSpec.from_dict(self.spec))
        except SchemaError:
            return ""
        if not fields:
            return " (same spec and side features: the vocabularies differ)"
        return f" (they differ in: {', '.join(fields)})"


@dataclass(frozen=True)
class StoreHealth:
    """Readiness report: `ok` means reachable and an active version with a meta key exists."""

    ok: bool
    mode: str
    nodes: int
    latency_ms: float | None
    active_version: str | None
    schema_hash: str | None
    error: str | None = None
    version_updated: float | None = None  # unix time of the active version's last meta write (ingest end)


class OnlineStore(abc.ABC):
    """The online store interface. Every call has a deadline and raises only `FeatureStoreError`s."""

    config: FeatureStoreConfig

    # -- reads ---------------------------------------------------------------------------------

    @abc.abstractmethod
    async def fetch(
        self,
        user_id: int,
        item_ids: SequenceABC[int] | npt.NDArray[np.integer],
        max_sequence_length: int | None = None,
        *,
        version: str | None = None,
    ) -> FetchResult:
        """Profile, newest `max_sequence_length` events (default from config) and item features.

        One pipelined round trip per node. Reads the active version (cached, refreshed every
        `active_refresh_interval_s`) unless `version` or `config.version` pins one.
        """

    def fetch_counts(self) -> FetchCounts:
        """Totals since the store was created (a copy; zeros where an implementation does not count)."""
        return FetchCounts()

    @abc.abstractmethod
    async def ping(self) -> float:
        """Round-trip seconds of a PING to every node; raises FeatureStoreUnavailable."""

    @abc.abstractmethod
    async def health(self) -> StoreHealth:
        """Readiness check that never raises."""

    @abc.abstractmethod
    async def active_version(self, refresh: bool = False) -> str | None:
        """The active version name (cached; `refresh` forces a read)."""

    @abc.abstractmethod
    async def active_schema_hash(self) -> str | None:
        """Schema hash of the active version (None when there is none), for bundle compatibility."""

    async def active_schema(self) -> StoredSchema | None:
        """The schema recorded for the active (or pinned) version; None when none was recorded."""
        version = self.config.version or await self.active_version()
        return await self.get_schema(version) if version is not None else None

    # -- versions ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def get_meta(self, version: str) -> VersionMeta | None: ...

    @abc.abstractmethod
    async def put_schema(self, version: str, schema: StoredSchema) -> None:
        """Record the schema a version is ingested with (a key of its own beside the meta key:
        the fitted side features can be large, and the meta is read on every health check)."""

    @abc.abstractmethod
    async def get_schema(self, version: str) -> StoredSchema | None:
        """The recorded schema of a version (None: none recorded, e.g. an ingest before this field)."""

    @abc.abstractmethod
    async def put_meta(self, meta: VersionMeta) -> None:
        """Create or replace a version's meta key and register the version."""

    @abc.abstractmethod
    async def update_meta(self, meta: VersionMeta) -> bool:
        """Replace a version's meta only while it exists and is not being dropped, atomically; False
        (nothing written) otherwise. A load's checkpoint uses it, so a drop that begins between the
        load's last check and its write is never undone (the meta back to "ingesting", then "complete")."""

    @abc.abstractmethod
    async def list_versions(self) -> list[str]: ...

    @abc.abstractmethod
    async def activate(self, version: str) -> None:
        """Switch the active pointer (one SET: atomic for every reader). The version must be complete."""

    @abc.abstractmethod
    async def drop_version(self, version: str, *, batch: int = 1000) -> int:
        """Delete every key of a non-active version (SCAN + UNLINK on each primary); returns keys removed."""

    # -- writes --------------------------------------------------------------------------------

    @abc.abstractmethod
    async def write_users(
        self,
        version: str,
        user_ids: SequenceABC[int],
        profiles: SequenceABC[bytes],
        sequences: SequenceABC[bytes],
        ttl_seconds: int | None = None,
        clusters: SequenceABC[bytes | None] | None = None,
    ) -> None:
        """SET the profile and sequence of each user (whole values: idempotent), pipelined; with
        `clusters`, also each user's behaviour clusters. A user without a clustering (`clusters`
        None, or its entry None) has any stored one deleted: it described an earlier sequence."""

    @abc.abstractmethod
    async def write_items(
        self, version: str, item_ids: SequenceABC[int], values: SequenceABC[bytes], *, announce: bool = False
    ) -> None:
        """SET each item's feature value, pipelined; with `announce`, then add the ids to the
        version's item change log, so running servers drop them from their item caches (the
        upsert path: a bulk load writes items no server has cached)."""

    @abc.abstractmethod
    async def write_profiles(
        self, version: str, user_ids: SequenceABC[int], profiles: SequenceABC[bytes], ttl_seconds: int | None = None
    ) -> None:
        """SET each user's profile alone (the sequence untouched), keeping a profile's TTL unless
        `ttl_seconds` sets a new one; pipelined. The upsert path."""

    @abc.abstractmethod
    async def read_profiles(self, version: str, user_ids: SequenceABC[int]) -> list[bytes | None]:
        """The stored profile values (None: no profile), in input order; pipelined. Not cached."""

    @abc.abstractmethod
    async def read_items(self, version: str, item_ids: SequenceABC[int]) -> list[bytes | None]:
        """The stored item values (None: no such item), in input order; pipelined. Not cached."""

    @abc.abstractmethod
    async def append_events(
        self,
        user_id: int,
        events: Sequence,
        *,
        cap: int | None = None,
        version: str | None = None,
        ttl_seconds: int | None = None,
    ) -> int:
        """Append events (dense indices, oldest first) to a user's sequence atomically; a sequence
        past `cap + trim_slack(cap)` records (cap default `max_sequence_length`) is trimmed to its
        newest `cap`. Returns the stored length."""

    @abc.abstractmethod
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
        """`append_events` for many users in one round trip, each event id at most once per user.

        The store keeps each user's newest `id_window` applied ids (for `id_ttl_s` after the
        user's last append); an event whose id is among them is skipped. Safe to repeat after
        any failure. Returns what was done per user, in input order.
        """

    async def follow_item_changes(self) -> int:
        """Read the item change logs of the versions this store caches items of, and drop the
        items announced since the last call from the caches; the number of cached items dropped.
        A store without an item cache has nothing to do."""
        return 0

    # -- lifecycle -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close connections (and stop an embedded server this store started)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
