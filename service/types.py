"""Transport-free request and response types of the ranking core.

REST and gRPC adapters decode into `RankRequest`, call `RankingService.rank`, and encode the
`RankResponse`; nothing HTTP- or gRPC-specific crosses into the core.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from feature_store.codecs import Sequence

INT64_MAX = (1 << 63) - 1  # ids are int64 on every path: REST, gRPC, the store's keys

# An id as the caller sent it: an integer, or a string (a model's `id_types` say how it becomes
# the int64 the store keys on: `feature_store.spec.resolve_id`). Responses echo it unchanged.
RawId = int | str


@dataclass(frozen=True)
class RankRequest:
    user_id: RawId  # as sent; resolved per serving model (its schema's id types)
    candidates: list[RawId]  # raw item ids, as sent
    top_n: int | None = None  # default: the service's default_top_n
    request_time: int | None = None  # unix seconds; history is cut strictly before it (default: now)
    debug: bool = False  # include per-stage timings and retrieval details
    request_id: str | None = None
    arm: str | None = None  # forced experiment arm (admin override); None = hash assignment
    trace_headers: dict[str, str] | None = None  # W3C traceparent / tracestate of the caller, if any
    context: Mapping[str, Any] | None = None  # request context features (validated per model's schema)


@dataclass(frozen=True)
class RankedItem:
    item_id: RawId  # as the caller sent it
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
    """What the fetch stage produced for one request.

    `user_side` / `item_side` are the store's side-feature bytes (the user's profile tail, one row
    per candidate), decoded per model by `service.assemble`; empty or None: the defaults.
    """

    user_index: int
    history: Sequence
    item_index: npt.NDArray[np.int64]
    category_index: npt.NDArray[np.int64]
    degraded_reason: str | None
    user_side: bytes = b""
    item_side: npt.NDArray[np.uint8] | None = None  # [n, W]
    item_found: npt.NDArray[np.bool_] | None = None  # [n]: False rows of item_side are not data
    context: Mapping[str, Any] | None = None  # the request's raw context (shadows encode it with their schema)
