"""Prometheus metrics: one histogram per pipeline stage, request outcomes, degraded answers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 0.5 ms to 2.5 s: the budget is tens of milliseconds, the tail matters.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25,
                   0.5, 1.0, 2.5)


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
