"""The serving core shared by REST and gRPC: store + model registry + ranking service.

One place builds it (`ServingCore.create`), starts its background work (`start`: the initial
model load, the registry poller, the readiness monitor) and tears it down (`aclose`). The
FastAPI lifespan uses it when the app runs alone; `rankserve serve` builds one per process and
hands it to both transports.

Readiness (KServe's data plane): ready only once a bundle is loaded *and warmed up* and the
feature store answers with a complete active version. Transports listen before the model is
loaded, so liveness answers during a long load; readiness stays false until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from datetime import datetime

from export.bundle import Bundle
from feature_store.errors import FeatureStoreError
from feature_store.logs import RateLimitedLog
from feature_store.redis_store import create_store
from feature_store.store import FetchCounts, OnlineStore, StoredSchema, StoreHealth
from service.background import run_every
from service.control import CONTROL_INTERVAL_S, KINDS, ControlDir, ReloadKind
from service.core import RankingService
from service.errors import BundleRejected, ExperimentsRejected, ModelUnavailable
from service.events import EventIntake
from service.experiments.manager import ExperimentManager, Experiments, ReloadResult, build_retriever
from service.experiments.shadow import ShadowRunner
from service.observability.metrics import Metrics
from service.observability.tracing import Tracing
from service.registry import LoadedModel, MakeRetriever, ModelRegistry
from service.retrieval import Retriever
from service.settings import Settings

log = logging.getLogger("rankserve.lifecycle")

READINESS_INTERVAL_S = 1.0  # how often the monitor re-checks readiness (gRPC health follows it)
SCHEMA_HASH_TTL_S = 2.0  # a bundle load re-reads the store's schema hash when older than this

ReadinessListener = Callable[[bool], Awaitable[None]]

@dataclass(frozen=True)
class Readiness:
    """Whether this process should receive traffic, and why not."""

    ready: bool
    reason: str | None
    model: str | None
    store: StoreHealth | None


class StoreSchemaHash:
    """The feature store's active schema hash as the sync callable `ModelRegistry` wants.

    Bundle loads run in worker threads; when the cached value is stale, the thread asks the
    event loop for a fresh one (the store client lives on the loop). On the loop thread itself,
    or when the store does not answer, the last known value is returned.
    """

    def __init__(self, store: OnlineStore, loop: asyncio.AbstractEventLoop, ttl_s: float = SCHEMA_HASH_TTL_S) -> None:
        self._store = store
        self._loop = loop
        self._ttl_s = ttl_s
        self._value: str | None = None
        self._read_at = float("-inf")
        self.schema: StoredSchema | None = None  # the active version's recorded schema: a refusal names what differs

    async def refresh(self) -> str | None:
        try:
            self._value = await self._store.active_schema_hash()
            self._read_at = time.monotonic()
        except FeatureStoreError as exc:
            log.warning("cannot read the feature store's schema hash; using the last known one: %s", exc)
            return self._value
        if self._value is not None and (self.schema is None or self.schema.schema_hash != self._value):
            try:  # read once per schema hash (an ingest from before the record has none: read again)
                self.schema = await self._store.active_schema()
            except FeatureStoreError as exc:
                log.debug("cannot read the feature store's recorded schema: %s", exc)
        return self._value

    def __call__(self) -> str | None:
        if time.monotonic() - self._read_at < self._ttl_s or self._on_loop_thread():
            return self._value
        try:
            future = asyncio.run_coroutine_threadsafe(self.refresh(), self._loop)
        except RuntimeError:  # the loop is closing (a load still running at shutdown)
            return self._value
        try:
            return future.result(timeout=self._store.config.request_timeout_s * 3)
        except TimeoutError:
            future.cancel()
            return self._value

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False


def _retriever_factory(settings: Settings) -> MakeRetriever:
    def make() -> Retriever:
        # the exact strategy takes the device setting (faiss GPU when present and allowed)
        return build_retriever(settings, settings.retrieval_strategy)

    return make


class ServingCore:
    """Everything both transports share in one process."""

    def __init__(
        self, settings: Settings, store: OnlineStore, registry: ModelRegistry, schema_hash: StoreSchemaHash,
        metrics: Metrics, tracing: Tracing | None = None, control: ControlDir | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.schema_hash = schema_hash
        self.metrics = metrics
        self.shadows = ShadowRunner(settings, metrics)
        self.experiments = ExperimentManager(settings, registry, metrics, on_change=self._experiments_changed)
        self.tracing = tracing
        self.service = RankingService(settings, registry, store, metrics, self.experiments, self.shadows, tracing)
        self.events = EventIntake(settings, registry, store)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listeners: list[ReadinessListener] = []
        self._load_lock = asyncio.Lock()
        self._last_ready: bool | None = None
        # set once the first model load was tried (loaded or not): workers sharing ports wait for it
        self.first_load_attempted = asyncio.Event()
        self._draining = False
        self._synced_swaps = 0
        self._synced_refused = 0
        self._synced_counts = FetchCounts()
        self._change_log_errors = RateLimitedLog(log, 30.0)  # polled 4 times a second: one line per 30 s
        self._feature_set_updated: float | None = None  # the active version's ingest end, from the health check
        self.control = control  # workers of one pod: admin reloads reach all of them through it
        self._seen_reloads: dict[ReloadKind, str] = {}
        self._closed = False

    @classmethod
    async def create(
        cls, settings: Settings, metrics: Metrics | None = None, control: ControlDir | None = None
    ) -> ServingCore:
        """Connect the store (starting the embedded Valkey if configured) and build the registry.

        `control`: the directory the workers of one pod share admin reloads through (service/control.py).

        Raises ValueError for an unknown retrieval strategy and TracingUnavailable for tracing
        configured without its packages (before anything is started).
        """
        _retriever_factory(settings)()  # fail fast on a bad RANKSERVE_RETRIEVAL_STRATEGY, not at first load
        tracing = Tracing.from_settings(settings)
        try:
            # create_store may start and wait for an embedded server: keep the loop free meanwhile
            store = await asyncio.to_thread(create_store, settings.feature_store)
        except BaseException:
            if tracing is not None:
                tracing.shutdown()  # its export thread would otherwise outlive the failed start
            raise
        schema_hash = StoreSchemaHash(store, asyncio.get_running_loop())
        registry = ModelRegistry(settings, _retriever_factory(settings), schema_hash=schema_hash)
        log.info(
            "serving core built",
            extra={"model_dir": str(settings.model_dir), "store_mode": settings.feature_store.resolved_mode()},
        )
        return cls(settings, store, registry, schema_hash, metrics or Metrics(), tracing, control)

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background work: initial load, then the poller; the readiness monitor."""
        self._tasks.append(asyncio.create_task(self._load_then_poll(), name="model-loader"))
        self._tasks.append(asyncio.create_task(self._monitor_readiness(), name="readiness-monitor"))
        follower = run_every("item-change-follower", self.settings.feature_store.item_changes_poll_s,
                             self.follow_item_changes, self._stop)
        self._tasks.append(asyncio.create_task(follower, name="item-change-follower"))

    async def _load_then_poll(self) -> None:
        try:
            await self.schema_hash.refresh()
            try:
                async with self._load_lock:
                    model = await asyncio.to_thread(self.registry.load_version)
                log.info("initial model loaded and warmed up", extra={"model": model.key})
            except (ModelUnavailable, BundleRejected) as exc:
                log.error("no model loaded at startup; watching %s for one", self.settings.model_dir,
                          extra={"reason": exc.message})
            if self.experiments.configured:
                with contextlib.suppress(ExperimentsRejected):  # logged; not ready until a valid file is in place
                    await self.experiments.reload()
                self._tasks.append(asyncio.create_task(self.experiments.poll(self._stop), name="experiments-poller"))
            if self.control is not None:
                follower = run_every("reload-follower", CONTROL_INTERVAL_S, self.follow_reloads, self._stop)
                self._tasks.append(asyncio.create_task(follower, name="reload-follower"))
            await self.check_readiness()
        finally:  # a worker waiting for this to take traffic must not wait forever on an unexpected error
            self.first_load_attempted.set()
        await self.registry.poll(self._stop)

    def _experiments_changed(self, experiments: Experiments) -> None:
        self.shadows.configure(experiments.shadows())

    async def _monitor_readiness(self) -> None:
        await run_every("readiness-monitor", READINESS_INTERVAL_S, self.check_readiness, self._stop,
                        first_at_once=True)

    async def follow_item_changes(self) -> None:
        """Drop the items upserts rewrote from the store's item caches (one read of the change logs)."""
        try:
            await self.store.follow_item_changes()
        except FeatureStoreError as exc:  # Redis away: the next tick reads on from the same entry
            self._change_log_errors.warning("could not read the item change log; cached items stay until their TTL",
                                            error=str(exc))

    def begin_drain(self) -> None:
        """Shutting down: report not ready from now on (load balancers stop sending traffic)."""
        self._draining = True

    async def aclose(self) -> None:
        """Stop background tasks, the micro-batching pool and the store (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._draining = True
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.shadows.aclose()
            await asyncio.to_thread(self.service.close)
            await self.store.aclose()
        finally:
            if self.tracing is not None:
                await asyncio.to_thread(self.tracing.shutdown)  # flush the last spans
        log.info("serving core closed")

    # -- readiness ------------------------------------------------------------------------------------

    def on_readiness_change(self, listener: ReadinessListener) -> None:
        """Call `listener(ready)` whenever readiness flips (and once with the current state)."""
        self._listeners.append(listener)
        self._last_ready = None  # make the next check notify everyone, the new listener included

    async def readiness(self) -> Readiness:
        model = self.registry.current
        key = model.key if model else None
        if self._draining:
            return Readiness(False, "shutting down", key, None)
        try:
            async with asyncio.timeout(self.settings.feature_store.request_timeout_s * 3):
                health = await self.store.health()
        except TimeoutError:
            health = StoreHealth(False, "unknown", 0, None, None, None, "feature store health check timed out")
        if model is None:
            return Readiness(False, f"no model loaded from {self.settings.model_dir} yet", None, health)
        if self.experiments.configured and self.experiments.current is None:
            reason = self.experiments.last_error or "loading"
            return Readiness(False, f"experiments file not loaded: {reason}", key, health)
        if not health.ok:
            return Readiness(False, f"feature store not ready: {health.error}", key, health)
        return Readiness(True, None, key, health)

    async def check_readiness(self) -> Readiness:
        """Evaluate readiness, keep metrics in sync, and notify listeners on a change."""
        state = await self.readiness()
        if state.store is not None and state.store.version_updated is not None:
            self._feature_set_updated = state.store.version_updated
        self.sync_metrics()
        if state.ready != self._last_ready:
            if self._last_ready is not None or not state.ready:
                log.info("readiness changed", extra={"ready": state.ready, "reason": state.reason})
            self._last_ready = state.ready
            for listener in self._listeners:
                await listener(state.ready)
        return state

    # -- models ---------------------------------------------------------------------------------------

    async def reload(
        self, version: int | None = None, *, tell_peers: bool = True
    ) -> tuple[LoadedModel, LoadedModel | None]:
        """Load `version` (default: the newest loadable) now; returns (serving, previous).

        Once loaded here, the other workers of the pod are told to do the same (`tell_peers`).
        """
        await self.schema_hash.refresh()
        previous = self.registry.current
        async with self._load_lock:
            model = await asyncio.to_thread(self.registry.load_version, version)
        if tell_peers:
            self._tell_peers("model", version)
        await self.check_readiness()
        return model, previous

    async def reload_experiments(self, *, tell_peers: bool = True) -> ReloadResult:
        """Re-read the experiments file now (admin); raises ExperimentsRejected, the old config serving.

        Once read here, the other workers of the pod are told to do the same (`tell_peers`).
        """
        await self.schema_hash.refresh()
        try:
            result = await self.experiments.reload()
            if tell_peers:
                self._tell_peers("experiments")
            return result
        finally:
            await self.check_readiness()

    def _tell_peers(self, kind: ReloadKind, version: int | None = None) -> None:
        if self.control is None:
            return
        try:
            self._seen_reloads[kind] = self.control.publish(kind, version).id
        except OSError as exc:  # this worker did reload; say loudly that the others may not have
            log.error("cannot tell the other workers to reload", extra={"kind": kind, "error": str(exc)})

    async def follow_reloads(self) -> None:
        """Repeat the admin reloads another worker of the pod recorded since the last call."""
        if self.control is None:
            return
        for kind in KINDS:
            request = self.control.read(kind)
            if request is None or self._seen_reloads.get(kind) == request.id:
                continue
            self._seen_reloads[kind] = request.id
            current = self.registry.current
            if request.origin_pid == os.getpid() or (
                kind == "model" and current is not None and request.version == current.bundle.version
            ):
                continue  # its own request, or the version asked for already serves here (no second load)
            log.info("following another worker's reload", extra={"kind": kind, "version": request.version,
                                                                  "origin_pid": request.origin_pid})
            try:
                if kind == "model":
                    await self.reload(request.version, tell_peers=False)
                else:
                    await self.reload_experiments(tell_peers=False)
            except (BundleRejected, ModelUnavailable, ExperimentsRejected) as exc:  # the old state keeps serving
                log.error("reload another worker did failed here", extra={"kind": kind, "reason": exc.message})

    def sync_metrics(self) -> None:
        """Mirror the registry's state into the metrics (the registry itself stays metrics-free)."""
        m, reg = self.metrics, self.registry
        if reg.swaps > self._synced_swaps:
            m.model_swaps.inc(reg.swaps - self._synced_swaps)
            self._synced_swaps = reg.swaps
        refused = len(reg.refused())
        if refused > self._synced_refused:
            m.bundles_refused.inc(refused - self._synced_refused)
        self._synced_refused = refused
        current = reg.current
        m.set_series(m.model_info, {(current.bundle.name, str(current.bundle.version)): 1} if current else {})
        m.model_loaded.set(1 if current is not None else 0)
        now = time.time()
        created = _bundle_created(current.bundle) if current is not None else None
        m.bundle_age.set(now - created if created is not None else 0)
        if self._feature_set_updated is not None:
            m.feature_set_age.set(now - self._feature_set_updated)
        m.cpu_queue.set(self.service.cpu_queue_depth)
        counts = self.store.fetch_counts()
        last, self._synced_counts = self._synced_counts, counts
        delta = {f.name: getattr(counts, f.name) - getattr(last, f.name) for f in fields(FetchCounts)}
        m.item_cache.labels("hit").inc(max(0, delta["item_cache_hits"]))
        m.item_cache.labels("miss").inc(max(0, delta["item_cache_misses"]))
        m.item_cache_dropped.labels("changed").inc(max(0, delta["item_cache_invalidations"]))
        m.item_cache_resets.inc(max(0, delta["item_cache_resets"]))
        m.unknown_users.inc(max(0, delta["unknown_users"]))
        m.unknown_items.inc(max(0, delta["unknown_items"]))
        m.sync_retrieval_fallbacks()


def _bundle_created(bundle: Bundle) -> float | None:
    """Unix time of the bundle's manifest `created` (ISO 8601), None when absent or unreadable."""
    created = bundle.manifest.get("created")
    if not isinstance(created, str):
        return None
    try:
        return datetime.fromisoformat(created).timestamp()
    except ValueError:
        return None
