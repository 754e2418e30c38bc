"""Prometheus metrics: one histogram per pipeline stage, request outcomes, degraded answers,
per-arm requests and scores, shadow agreement, and the state operators alert on (model loaded,
feature-set and bundle age, item-cache hits, CPU queue).

One process (`rankserve serve`): the metrics live on this object's registry, with the standard
process and Python collectors. Several workers (`--workers N`): the supervisor sets
PROMETHEUS_MULTIPROC_DIR before it starts them, prometheus_client then keeps every value in
memory-mapped files there, and `exposition()` merges all workers' files, so any worker answers
/metrics with the pod's totals. Gauges say how they merge (`multiprocess_mode`); a label set that
goes away is set to 0 there, as prometheus_client cannot delete a series from the files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from service.retrieval import fallback_counts

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The directory of multiprocess mode, None in a single process (prometheus_client's own test)."""
    return os.environ.get(MULTIPROC_ENV) or None


# Latency buckets from 0.5 ms to 2.5 s: the budget is tens of milliseconds, the tail matters.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25,
                   0.5, 1.0, 2.5)
# Agreement measures live in [-1, 1] and matter most near 1: fine buckets there.
AGREEMENT_BUCKETS = (-0.5, 0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)
SCORE_DIFF_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class Metrics:
    """The service's metrics, on their own registry (so tests and several apps do not collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir()
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if registry is None and self.multiprocess_dir is None:
            # what the default registry would carry; in multiprocess mode they would describe only
            # the worker that answers, so they are left out there
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                r.register(collector)
        self._series: dict[int, set[tuple[str, ...]]] = {}  # id(gauge): label sets set
        self._fallbacks_synced: dict[tuple[str, str], int] = {}
        self.stage_seconds = Histogram(
            "rankserve_stage_seconds", "Time per ranking stage", ["stage"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.request_seconds = Histogram(
            "rankserve_request_seconds", "End-to-end rank latency in the core", ["arm"], buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter("rankserve_requests_total", "Rank requests by transport and outcome",
                                ["transport", "code"], registry=r)
        self.degraded = Counter("rankserve_degraded_total", "Answers ranked without store features", ["reason"],
                                registry=r)
        self.candidates = Histogram("rankserve_candidates", "Candidates per request",
                                    buckets=(1, 10, 50, 100, 200, 500, 1000, 2000), registry=r)
        self.history_length = Histogram("rankserve_history_length", "Behaviours searched per request",
                                        buckets=(0, 10, 100, 1000, 5000, 10000, 50000), registry=r)
        # a version any live worker serves is 1 (a rollout in progress shows two)
        self.model_info = Gauge("rankserve_model_info", "Serving model (value 1)", ["name", "version"], registry=r,
                                multiprocess_mode="livemax")
        # 0 as soon as one live worker has no model
        self.model_loaded = Gauge("rankserve_model_loaded", "1 when a model is serving (0 if any worker has none)",
                                  registry=r, multiprocess_mode="livemin")
        self.bundle_age = Gauge("rankserve_bundle_age_seconds", "Seconds since the serving bundle was exported "
                                "(its manifest's created; the oldest across workers)", registry=r,
                                multiprocess_mode="livemax")
        self.feature_set_age = Gauge("rankserve_feature_set_age_seconds", "Seconds since the active feature-set "
                                     "version's ingest finished (its meta's updated)", registry=r,
                                     multiprocess_mode="livemax")
        self.cpu_queue = Gauge("rankserve_cpu_queue_depth",
                               "Requests in progress: waiting for a turn, fetching or ranking", registry=r,
                               multiprocess_mode="livesum")
        # cross-request micro-batching of the scorer (RANKSERVE_SCORER_BATCH_WAIT_MS > 0): one observation per call
        self.scorer_batch_requests = Histogram(
            "rankserve_scorer_batch_requests", "Requests scored together in one batched scorer call",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r,
        )
        self.scorer_batch_candidates = Histogram(
            "rankserve_scorer_batch_candidates", "Candidates of one batched scorer call",
            buckets=(1, 50, 100, 200, 500, 1000, 2000, 4000, 8000, 16000), registry=r,
        )
        self.item_cache = Counter("rankserve_item_cache_lookups_total", "Item-feature cache lookups by result "
                                  "(hit, miss)", ["result"], registry=r)
        self.item_cache_dropped = Counter("rankserve_item_cache_dropped_total", "Cached items dropped before their "
                                          "TTL, by reason (changed: an upsert announced them)", ["reason"], registry=r)
        self.item_cache_resets = Counter("rankserve_item_cache_resets_total", "Item caches emptied because their "
                                         "change log had not been read for half its retention", registry=r)
        self.unknown_users = Counter("rankserve_unknown_users_total", "Fetches of a user without a profile in the "
                                     "feature store", registry=r)
        self.unknown_items = Counter("rankserve_unknown_items_total", "Candidates without item features in the "
                                     "feature store", registry=r)
        self.model_swaps = Counter("rankserve_model_swaps_total", "Model versions swapped in", registry=r)
        self.bundles_refused = Counter("rankserve_bundles_refused_total", "Bundles refused at load", registry=r)
        self.fused_score = Histogram("rankserve_fused_score", "Top fused score per request", ["arm"],
                                     buckets=(0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10), registry=r)

        # experiments: per arm (arms and shadows are few, bounded by the config)
        self.arm_requests = Counter("rankserve_arm_requests_total", "Rank requests per experiment arm and outcome "
                                    "(ok, degraded, or the error code)", ["arm", "outcome"], registry=r)
        self.arm_share = Gauge("rankserve_arm_share_percent", "Traffic share of each arm (pinned bundle)",
                               ["arm", "bundle"], registry=r, multiprocess_mode="livemax")
        self.experiments_reloads = Counter("rankserve_experiments_reloads_total",
                                           "Experiment config reloads by outcome (loaded, unchanged, rejected)",
                                           ["outcome"], registry=r)
        # shadow traffic
        self.shadow_jobs = Counter(
            "rankserve_shadow_jobs_total", "Shadow jobs by outcome (ok, error, timeout, starved, dropped)",
            ["arm", "shadow", "outcome"], registry=r,
        )
        self.shadow_queue = Gauge("rankserve_shadow_queue_depth", "Shadow jobs waiting", ["arm", "shadow"], registry=r,
                                  multiprocess_mode="livesum")
        self.shadow_inflight = Gauge("rankserve_shadow_inflight", "Shadow jobs running", ["arm", "shadow"], registry=r,
                                     multiprocess_mode="livesum")
        self.shadow_seconds = Histogram("rankserve_shadow_seconds", "Shadow scoring time (same features)",
                                        ["arm", "shadow"], buckets=LATENCY_BUCKETS, registry=r)
        self.shadow_agreement = Histogram(
            "rankserve_shadow_agreement", "Shadow vs primary agreement per request: kendall_tau, spearman, "
            "overlap_at_10, overlap_at_n, ndcg_at_n", ["arm", "shadow", "measure"], buckets=AGREEMENT_BUCKETS,
            registry=r,
        )
        self.shadow_score_diff = Histogram(
            "rankserve_shadow_score_abs_diff", "Mean |p_primary - p_shadow| per request and task",
            ["arm", "shadow", "task"], buckets=SCORE_DIFF_BUCKETS, registry=r,
        )
        self.shadow_sink_errors = Counter(
            "rankserve_shadow_sink_errors_total", "Shadow records the sink failed to write", registry=r
        )
        # retrieval strategies that fell back to exact (twin_v2 without a valid clustering), by reason;
        # the retrieval package counts in plain ints, mirrored here by `sync_retrieval_fallbacks`
        self.retrieval_fallbacks = Counter(
            "rankserve_retrieval_fallback", "Searches an approximate strategy answered with exact instead, by reason "
            "(twin_v2: missing, stale, misaligned clustering; short history)", ["strategy", "reason"], registry=r,
        )

    def observe_scorer_batch(self, requests: int, candidates: int) -> None:
        """One batched scorer call (the batcher's `on_batch` hook; called from its thread)."""
        self.scorer_batch_requests.observe(requests)
        self.scorer_batch_candidates.observe(candidates)

    def sync_retrieval_fallbacks(self) -> None:
        """Add the fallbacks counted since the last call to the counter."""
        for key, count in fallback_counts().items():
            delta = count - self._fallbacks_synced.get(key, 0)
            if delta > 0:
                self.retrieval_fallbacks.labels(*key).inc(delta)
                self._fallbacks_synced[key] = count

    def set_series(self, gauge: Gauge, values: Mapping[tuple[str, ...], float]) -> None:
        """Make the labelled `gauge` hold exactly `values`; label sets not in it go away (`drop_series`)."""
        previous = self._series.get(id(gauge), set())
        for labels in previous - set(values):
            self.drop_series(gauge, labels)
        for labels, value in values.items():
            gauge.labels(*labels).set(value)
        self._series[id(gauge)] = set(values)

    def drop_series(self, gauge: Gauge, labels: tuple[str, ...]) -> None:
        """Remove one series; in multiprocess mode set it to 0 (the workers' files cannot forget it)."""
        if self.multiprocess_dir is not None:
            gauge.labels(*labels).set(0)
        else:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)

    def exposition(self) -> bytes:
        """The text format for /metrics: this registry, or every worker's files merged."""
        self.sync_retrieval_fallbacks()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, self.multiprocess_dir)  # type: ignore[no-untyped-call]  # untyped upstream
        return generate_latest(merged)
