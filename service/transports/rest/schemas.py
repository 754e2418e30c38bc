"""REST request and response schemas (pydantic), with OpenAPI examples.

Requests are strict: `"5"` or `5.0` for an integer field is an error that names the field,
never a silent coercion, and unknown fields are rejected (a typo like `topN` would otherwise be
ignored). Ids are the exception by design: `user_id` and each candidate may be a JSON integer or
a string, and the serving model's schema says how it becomes the store's int64 key
(`feature_store.spec.resolve_id`: integer text for `int` ids, hashed for `string` ids); the
response echoes each id as sent. `context` holds the request's context features, checked against
the model's schema by the core (unknown names, wrong types: 422 naming `context.<name>`).

The rank response is documented here but encoded by `rank_response_body` straight to a dict for
orjson: validating a model per response would cost several times more on the hot path
(docs/PERFORMANCE.md).
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from feature_store.spec import MAX_CONTEXT_STRING
from service import types as core
from service.types import INT64_MAX

# An id: an integer in int64's non-negative range, or a non-empty string. The user id is checked
# here; candidates are only typed here (a plain int | str union: per-element constraints would
# double pydantic's cost for 1,000 ids) and range-checked by the core, which resolves them anyway
# (`service.ids`), with the same documented schema. `_fold_id_unions` (errors.py) folds a union's
# two branch errors into one.
ID_SCHEMA: dict[str, Any] = {"anyOf": [
    {"type": "integer", "minimum": 0, "maximum": INT64_MAX},
    {"type": "string", "minLength": 1, "maxLength": MAX_CONTEXT_STRING},
]}
RestId = (
    Annotated[int, Field(ge=0, le=INT64_MAX)] | Annotated[str, Field(min_length=1, max_length=MAX_CONTEXT_STRING)]
)
CandidateId = Annotated[int | str, WithJsonSchema(ID_SCHEMA)]
CONTEXT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": {
        "anyOf": [{"type": "string", "maxLength": MAX_CONTEXT_STRING}, {"type": "number"}, {"type": "null"}],
    },
}

# `make demo` serves integer ids: RANK_EXAMPLE works against either of its models; RANK_EXAMPLE_CONTEXT against its
# generated fallback, whose spec has the context features `device` (categorical) and `hour` (numeric); the Tmall
# model has none and refuses any context name. RANK_EXAMPLE_STRINGS is for a model trained with string ids.
RANK_EXAMPLE: dict[str, Any] = {"user_id": 1000, "candidates": [11, 12, 13], "top_n": 2}
RANK_EXAMPLE_STRINGS: dict[str, Any] = {"user_id": "u-1000", "candidates": ["sku-11", "sku-12", "sku-13"], "top_n": 2}
RANK_EXAMPLE_CONTEXT: dict[str, Any] = {
    "user_id": 1000, "candidates": [11, 12, 13], "top_n": 2, "context": {"device": "ios", "hour": 13},
}


class RankRequest(BaseModel):
    """One user and the candidate items to rank for them."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={"examples": [RANK_EXAMPLE, RANK_EXAMPLE_STRINGS, RANK_EXAMPLE_CONTEXT]},
    )

    user_id: RestId = Field(
        description="raw user id, an integer (0..2^63-1) or a string; unknown users are ranked cold-start",
    )
    candidates: list[CandidateId] = Field(
        description="raw item ids to rank, integers or strings (at most the server's max_candidates, default "
        "1000); unknown ids allowed",
    )
    top_n: int | None = Field(
        default=None, ge=1, description="items to return (at most max_top_n); default: the server's default_top_n"
    )
    request_time: int | None = Field(
        default=None, ge=0, description="unix seconds of the request; later behaviours are ignored (default: now)"
    )
    debug: bool = Field(default=False, description="add per-stage timings_ms and retrieval details to the response")
    context: Annotated[dict[str, Any], WithJsonSchema(CONTEXT_SCHEMA)] | None = Field(
        default=None,
        description="request context features declared by the model's feature spec (e.g. device, hour): strings "
        f"(at most {MAX_CONTEXT_STRING} characters) for categorical ones, numbers for numeric ones; missing names "
        "(or null) take the spec's defaults, unknown names are refused",
    )

    def to_core(
        self, request_id: str, arm: str | None = None, trace_headers: dict[str, str] | None = None
    ) -> core.RankRequest:
        return core.RankRequest(
            user_id=self.user_id,
            candidates=self.candidates,
            top_n=self.top_n,
            request_time=self.request_time,
            debug=self.debug,
            request_id=request_id,
            arm=arm,
            trace_headers=trace_headers,
            context=self.context,
        )


EVENTS_EXAMPLE: dict[str, Any] = {"events": [
    {"event_id": "e-1000-1", "user_id": 1000, "item_id": 12, "action": "click", "timestamp": 1700000000},
    {"event_id": "e-1000-2", "user_id": 1000, "item_id": 12, "action": "buy", "timestamp": 1700000060},
]}


class EventIn(BaseModel):
    """One behaviour event: who did what to which item, when."""

    model_config = ConfigDict(strict=True, extra="forbid")

    event_id: str = Field(min_length=1, max_length=128, description="unique per event: a repeat is appended once")
    user_id: RestId = Field(description="raw user id, as in rank requests")
    item_id: RestId = Field(description="raw item id, as in rank requests")
    action: str = Field(min_length=1, description="one of the model's behaviour actions (GET /v1/models)")
    timestamp: int = Field(ge=0, le=(1 << 32) - 1, description="unix seconds of the event")


class EventsRequest(BaseModel):
    """A batch of behaviour events for the event log."""

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"examples": [EVENTS_EXAMPLE]})

    events: list[EventIn] = Field(min_length=1, description="at most the server's max_events_per_request (1000)")


class EventsResponse(BaseModel):
    accepted: int = Field(description="events written to the event log (the whole batch)")


class RankedItem(BaseModel):
    item_id: int | str = Field(description="raw item id, as sent (an integer stays an integer, a string a string)")
    score: float = Field(description="fused score Σ w_t·p_t, the ranking key")
    scores: dict[str, float] = Field(description="probability per task, each in [0, 1]")


class RankResponse(BaseModel):
    """The candidates ordered by fused score, best first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {"item_id": 12, "score": 0.91, "scores": {"click": 0.41, "cart": 0.05, "buy": 0.02}},
                        {"item_id": 11, "score": 0.52, "scores": {"click": 0.3, "cart": 0.02, "buy": 0.0}},
                    ],
                    "model": "tmall/3",
                    "arm": "default",
                    "degraded": False,
                    "request_id": "7f0c1d2e9a4b4c55",
                }
            ]
        }
    )

    items: list[RankedItem]
    model: str = Field(description='serving model, "<name>/<version>"')
    arm: str = Field(description="experiment arm that ranked the request")
    degraded: bool = Field(description="true when the feature store was down or slow: ranked without user features")
    request_id: str
    timings_ms: dict[str, float] | None = Field(default=None, description="per-stage wall times (debug only)")
    debug: dict[str, Any] | None = Field(default=None, description="retrieval and fusion details (debug only)")


def rank_response_body(resp: core.RankResponse, request_id: str) -> dict[str, Any]:
    """The JSON body of `RankResponse` from the core's response (no per-response validation)."""
    body: dict[str, Any] = {
        "items": [{"item_id": it.item_id, "score": it.score, "scores": it.task_scores} for it in resp.items],
        "model": resp.model,
        "arm": resp.arm,
        "degraded": resp.degraded,
        "request_id": resp.request_id or request_id,
    }
    if resp.timings_ms:
        body["timings_ms"] = resp.timings_ms
    if resp.debug:
        body["debug"] = resp.debug
    return body


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. invalid_request, model_unavailable")
    message: str = Field(description="what went wrong and what to fix")
    request_id: str | None = None


class ErrorResponse(BaseModel):
    """Every error has this shape, whatever its status."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "invalid_request",
                        "message": "context.hour: expected a finite number, got str 'one'",
                        "request_id": "7f0c1d2e9a4b4c55",
                    }
                }
            ]
        }
    )

    error: ErrorDetail


class LivenessResponse(BaseModel):
    status: str = "alive"


class StoreStatus(BaseModel):
    ok: bool
    mode: str
    latency_ms: float | None = None
    active_version: str | None = None
    error: str | None = None


class ReadinessResponse(BaseModel):
    ready: bool
    reason: str | None = Field(default=None, description="why not ready")
    model: str | None = None
    store: StoreStatus | None = None


class ModelInfo(BaseModel):
    key: str = Field(description='"<name>/<version>"')
    name: str
    version: int
    created: str | None = None
    schema_hash: str
    tasks: list[str]
    actions: list[str] = Field(description="the behaviour actions an event may carry (POST /v1/events)")
    id_types: dict[str, str] = Field(description='"int" or "string" ids, for "user" and "item"')
    features: dict[str, dict[str, list[str]]] = Field(
        description="side features by group (user, item, context) and kind (categorical, numeric); a request's "
        "`context` may set the context ones"
    )
    fusion: dict[str, Any]
    retrieval: dict[str, Any]
    scorer_runtime: str | None = Field(default=None, description="the scorer runtime the bundle asks for")
    runtime: str = Field(description="the scorer runtime it runs: onnx or torchscript")
    scorer_quantization: str | None = Field(
        default=None, description='"int8" when the scorer it runs is quantized, null for a float scorer'
    )
    provider: str
    loaded_at: float = Field(description="unix seconds")

    @classmethod
    def from_describe(cls, key: str, info: dict[str, Any]) -> ModelInfo:
        return cls(key=key, **{k: v for k, v in info.items() if k in cls.model_fields})


class RefusedBundle(BaseModel):
    path: str
    reason: str


class ModelsResponse(BaseModel):
    """What the registry holds: the serving model, every loaded version, and refused bundles."""

    current: ModelInfo | None
    loaded: list[ModelInfo]
    refused: list[RefusedBundle]
    model_dir: str
    pid: int = Field(default_factory=os.getpid, description="the worker process that answered (`--workers N`)")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"examples": [{"version": 3}, {}]})

    version: int | None = Field(default=None, ge=1, description="version to load; default: the newest loadable")


class ReloadResponse(BaseModel):
    model: str = Field(description="the model serving now")
    previous: str | None = Field(description="the model serving before")


# -- experiments (admin) ---------------------------------------------------------------------------


class ShadowInfo(BaseModel):
    name: str
    bundle: str = Field(description='"<name>/<version>"')
    sample_rate: float
    fusion: dict[str, Any]
    retrieval: dict[str, Any]


class ArmInfo(BaseModel):
    name: str
    share: float = Field(description="percent of users")
    buckets: list[int] = Field(description="first and last of the arm's buckets (of 10,000); empty for share 0")
    bundle: str = Field(description='pinned "<name>/<version>"')
    fusion: dict[str, Any]
    retrieval: dict[str, Any]
    shadows: list[ShadowInfo]


class ExperimentsResponse(BaseModel):
    """The experiments serving now (or the implicit "default" arm when none are configured)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "source": "experiments.yaml",
                    "digest": "9f2c...",
                    "salt": "2024-06-home",
                    "buckets": 10000,
                    "loaded_at": 1717236000.0,
                    "arms": [
                        {"name": "control", "share": 50.0, "buckets": [0, 4999], "bundle": "tmall/1",
                         "fusion": {"weights": {"click": 1.0}, "transforms": {"click": "identity"}},
                         "retrieval": {"strategy": "exact", "k": 64}, "shadows": []},
                    ],
                    "last_error": None,
                }
            ]
        }
    )

    source: str | None = Field(description="the experiments file; null when none is configured")
    digest: str | None = Field(description="sha256 of the file content serving now")
    salt: str | None
    buckets: int
    loaded_at: float | None = Field(description="unix seconds")
    arms: list[ArmInfo]
    last_error: str | None = Field(description="why the last reload was refused (the previous config kept serving)")


class ExperimentsReloadResponse(BaseModel):
    status: Literal["loaded", "unchanged"] = Field(description="unchanged: the file's content is what serves already")
    digest: str
    arms: list[ArmInfo]
