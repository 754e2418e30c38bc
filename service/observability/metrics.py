"""Prometheus metrics: one histogram per pipeline stage, request outcomes, degraded answers,
per-arm requests and scores, and shadow agreement."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from service.retrieval import fallback_counts

# Latency buckets from 0.5 ms to 2.5 s: the budget is tens of milliseconds, the tail matters.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25,
                   0.5, 1.0, 2.5)
# Agreement measures live in [-1, 1] and matter most near 1: fine buckets there.
AGREEMENT_BUCKETS = (-0.5, 0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)
SCORE_DIFF_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class Metrics:
    """The service's metrics, on their own registry (so tests and several apps do not collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
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
        self.model_info = Gauge("rankserve_model_info", "Serving model (value 1)", ["name", "version"], registry=r)
        self.model_swaps = Counter("rankserve_model_swaps_total", "Model versions swapped in", registry=r)
        self.bundles_refused = Counter("rankserve_bundles_refused_total", "Bundles refused at load", registry=r)
        self.fused_score = Histogram("rankserve_fused_score", "Top fused score per request", ["arm"],
                                     buckets=(0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10), registry=r)

        # experiments: per arm (arms and shadows are few, bounded by the config)
        self.arm_requests = Counter("rankserve_arm_requests_total", "Rank requests per experiment arm and outcome "
                                    "(ok, degraded, or the error code)", ["arm", "outcome"], registry=r)
        self.arm_share = Gauge("rankserve_arm_share_percent", "Traffic share of each arm (pinned bundle)",
                               ["arm", "bundle"], registry=r)
        self.experiments_reloads = Counter("rankserve_experiments_reloads_total",
                                           "Experiment config reloads by outcome (loaded, unchanged, rejected)",
                                           ["outcome"], registry=r)
        # shadow traffic
        self.shadow_jobs = Counter(
            "rankserve_shadow_jobs_total", "Shadow jobs by outcome (ok, error, timeout, starved, dropped)",
            ["arm", "shadow", "outcome"], registry=r,
        )
        self.shadow_queue = Gauge("rankserve_shadow_queue_depth", "Shadow jobs waiting", ["arm", "shadow"], registry=r)
        self.shadow_inflight = Gauge("rankserve_shadow_inflight", "Shadow jobs running", ["arm", "shadow"], registry=r)
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
        # retrieval strategies that fell back to exact (twin_v2 without a valid clustering), by reason
        r.register(RetrievalFallbacks())


class RetrievalFallbacks(Collector):
    """rankserve_retrieval_fallback_total{strategy, reason}: the process's `service.retrieval.fallback_counts()`."""

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "rankserve_retrieval_fallback", "Searches an approximate strategy answered with exact instead, by reason "
            "(twin_v2: missing, stale, misaligned clustering; short history)", labels=["strategy", "reason"],
        )
        for (strategy, reason), count in sorted(fallback_counts().items()):
            family.add_metric([strategy, reason], count)
        yield family
