"""Transport-free request and response types of the ranking core.

REST and gRPC adapters decode into `RankRequest`, call `RankingService.rank`, and encode the
`RankResponse`; nothing HTTP- or gRPC-specific crosses into the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from feature_store.codecs import Sequence

INT64_MAX = (1 << 63) - 1  # ids are int64 on every path: REST, gRPC, the store's keys


@dataclass(frozen=True)
class RankRequest:
    user_id: int
    candidates: list[int]  # raw item ids
    top_n: int | None = None  # default: the service's default_top_n
    request_time: int | None = None  # unix seconds; history is cut strictly before it (default: now)
    debug: bool = False  # include per-stage timings and retrieval details
    request_id: str | None = None
    arm: str | None = None  # forced experiment arm (admin override); None = hash assignment
    trace_headers: dict[str, str] | None = None  # W3C traceparent / tracestate of the caller, if any


@dataclass(frozen=True)
class RankedItem:
    item_id: int
    score: float  # fused score
    task_scores: dict[str, float]  # per-task probability


@dataclass(frozen=True)
class RankResponse:
    items: list[RankedItem]
    model: str  # "<name>/<version>"
    arm: str
    degraded: bool  # true when features were missing because the store was down or slow
    request_id: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)  # filled when debug
    debug: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Features:
    """What the fetch stage produced for one request."""

    user_index: int
    history: Sequence
    item_index: npt.NDArray[np.int64]
    category_index: npt.NDArray[np.int64]
    degraded_reason: str | None
