"""The REST transport (FastAPI): decode, call the ranking core, encode.

`create_app(settings)` builds the app. Alone (`uvicorn --factory service.transports.rest.app:create_app`, tests),
its lifespan owns a `ServingCore`; under `rankserve serve` the server passes in the core it
shares with gRPC and owns it itself. Errors are mapped once, in the handlers at the bottom:
every error body is `{"error": {"code", "message", "request_id"}}`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from feature_store.events import StreamEvent
from service.errors import NotFound, RankServeError, Unauthorized
from service.lifecycle import ServingCore
from service.observability.tracing import trace_carrier
from service.settings import Settings
from service.transports.auth import ARM_HEADER, admin_secret, authorize_arm_override, authorize_events, token_matches
from service.transports.request_ids import new_request_id
from service.transports.rest.errors import (
    RANK_PATH,
    OrjsonResponse,
    http_error,
    rankserve_error,
    unexpected_error,
    validation_error,
)
from service.transports.rest.lean_route import LeanJsonRoute
from service.transports.rest.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from service.transports.rest.schemas import (
    EVENTS_EXAMPLE,
    RANK_EXAMPLE,
    RANK_EXAMPLE_CONTEXT,
    RANK_EXAMPLE_STRINGS,
    ErrorResponse,
    EventsRequest,
    EventsResponse,
    ExperimentsReloadResponse,
    ExperimentsResponse,
    LivenessResponse,
    ModelInfo,
    ModelsResponse,
    RankRequest,
    RankResponse,
    ReadinessResponse,
    RefusedBundle,
    ReloadRequest,
    ReloadResponse,
    StoreStatus,
    rank_response_body,
)

log = logging.getLogger("rankserve.rest")


# -- dependencies ----------------------------------------------------------------------------------
# All async: FastAPI runs a plain `def` dependency in a worker thread, a thread hop per dependency
# and request (~0.3 ms of server CPU per rank request for its three, docs/PERFORMANCE.md).


async def get_core(request: Request) -> ServingCore:
    core: ServingCore = request.app.state.core
    return core


async def get_request_id(request: Request) -> str:
    rid: str | None = getattr(request.state, "request_id", None)
    return rid or new_request_id()


_bearer = HTTPBearer(auto_error=False, description="RANKSERVE_ADMIN_TOKEN")


async def require_admin(
    core: Annotated[ServingCore, Depends(get_core)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Admin endpoints: 404 when no token is configured (disabled), 401 without the right one."""
    if admin_secret(core.settings) is None:
        raise NotFound("admin endpoints are disabled; set RANKSERVE_ADMIN_TOKEN to enable them")
    # constant-time comparison: response timing must not reveal how much of a guess was right
    if not token_matches(core.settings, credentials.credentials if credentials is not None else None):
        raise Unauthorized("missing or wrong admin token; send 'Authorization: Bearer <RANKSERVE_ADMIN_TOKEN>'")


async def arm_override(
    request: Request,
    core: Annotated[ServingCore, Depends(get_core)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    """The `X-Rankserve-Arm` override: admin only (403 without the admin token), None when absent."""
    arm = request.headers.get(ARM_HEADER)
    if arm is None:
        return None
    return authorize_arm_override(core.settings, arm, credentials.credentials if credentials is not None else None)


async def require_events_token(
    core: Annotated[ServingCore, Depends(get_core)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Event endpoints: 404 when no events token is configured, 401 without it (before the body is read)."""
    authorize_events(core.settings, credentials.credentials if credentials is not None else None)


CoreDep = Annotated[ServingCore, Depends(get_core)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
AdminDep = Annotated[None, Depends(require_admin)]
ArmOverrideDep = Annotated[str | None, Depends(arm_override)]

# -- routes ----------------------------------------------------------------------------------------

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        413: "request body larger than max_body_bytes",
        422: "invalid request: wrong types, missing fields, limits exceeded, ids or context the model cannot read",
        503: "no model loaded yet, or overloaded",
        504: "ranking deadline exceeded",
    }.items()
}

router = APIRouter()


class RankRoute(LeanJsonRoute):
    """/v1/rank without FastAPI's per-request dependency solving and body parsing (lean_route.py)."""

    params = ("request", "core", "request_id", "arm")

    async def resolve(self, request: Request) -> dict[str, Any]:
        """`rank`'s dependencies, called as FastAPI calls them (the same functions, the same order)."""
        core = await get_core(request)
        return {"request": request, "core": core, "request_id": await get_request_id(request),
                "arm": await arm_override(request, core, await _bearer(request))}


rank_router = APIRouter(route_class=RankRoute)


@rank_router.post(
    RANK_PATH,
    response_model=RankResponse,
    responses=ERRORS,
    summary="Rank candidate items for one user",
    tags=["ranking"],
    # Bearer auth is optional here (needed only with the X-Rankserve-Arm override); FastAPI lists the
    # shared HTTPBearer dependency as required, and appending `{}` (no requirement) makes it optional.
    openapi_extra={"security": [{}]},
)
async def rank(
    body: Annotated[
        RankRequest,
        Body(
            openapi_examples={
                "basic": {"summary": "three candidates, top 2", "value": RANK_EXAMPLE},
                "string_ids": {
                    "summary": "string ids (echoed as strings)",
                    "description": "Ids may be integers or strings; a model with integer ids reads integer text.",
                    "value": RANK_EXAMPLE_STRINGS,
                },
                "context": {
                    "summary": "with request context",
                    "description": "Context features are those of the model's feature spec (here: device, hour); "
                    "a model without them refuses any context name.",
                    "value": RANK_EXAMPLE_CONTEXT,
                },
                "debug": {
                    "summary": "with per-stage timings",
                    "value": {"user_id": 1000, "candidates": [11, 12, 13], "debug": True},
                },
            }
        ),
    ],
    request: Request,
    core: CoreDep,
    request_id: RequestIdDep,
    arm: ArmOverrideDep,
) -> Response:
    result = await core.service.rank(body.to_core(request_id, arm, trace_carrier(request.headers.get)))
    core.metrics.requests.labels("rest", "ok").inc()
    return OrjsonResponse(rank_response_body(result, request_id))


@router.post(
    "/v1/events",
    response_model=EventsResponse,
    status_code=202,
    responses={
        401: {"model": ErrorResponse, "description": "missing or wrong events token"},
        404: {"model": ErrorResponse, "description": "event endpoints disabled (no RANKSERVE_EVENTS_TOKEN)"},
        413: ERRORS[413],
        422: {"model": ErrorResponse, "description": "a bad event; the message names events[k].<field>"},
        503: {"model": ErrorResponse, "description": "no model loaded yet, or the event log did not answer: resend"},
    },
    summary="Add behaviour events to the event log (appended to the users' sequences by the consumers)",
    tags=["events"],
)
async def push_events(
    body: Annotated[EventsRequest, Body(openapi_examples={"two": {"summary": "a click, then a buy",
                                                                  "value": EVENTS_EXAMPLE}})],
    core: CoreDep,
    _token: Annotated[None, Depends(require_events_token)],
) -> Response:
    accepted = await core.events.push(
        [StreamEvent(e.event_id, e.user_id, e.item_id, e.action, e.timestamp) for e in body.events])
    return OrjsonResponse({"accepted": accepted}, status_code=202)


@router.get("/livez", response_model=LivenessResponse, tags=["health"], summary="The process is alive")
async def livez() -> LivenessResponse:
    return LivenessResponse()


@router.get(
    "/readyz",
    response_model=ReadinessResponse,
    responses={503: {"model": ReadinessResponse, "description": "not ready; `reason` says why"}},
    tags=["health"],
    summary="Ready: a model is loaded and warmed up, and the feature store answers",
)
async def readyz(core: CoreDep) -> Response:
    state = await core.check_readiness()
    store = state.store
    body = ReadinessResponse(
        ready=state.ready,
        reason=state.reason,
        model=state.model,
        store=StoreStatus(
            ok=store.ok, mode=store.mode, latency_ms=store.latency_ms, active_version=store.active_version,
            error=store.error,
        ) if store is not None else None,
    )
    return OrjsonResponse(body.model_dump(), status_code=200 if state.ready else 503)


@router.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
async def metrics(core: CoreDep) -> Response:
    core.sync_metrics()
    return Response(core.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelsResponse, tags=["models"], summary="Loaded and refused bundles")
async def models(core: CoreDep) -> ModelsResponse:
    reg = core.registry
    current = reg.current
    return ModelsResponse(
        current=ModelInfo.from_describe(current.key, current.describe()) if current else None,
        loaded=[ModelInfo.from_describe(m.key, m.describe()) for m in reg.loaded()],
        refused=[RefusedBundle(path=p, reason=r) for p, r in sorted(reg.refused().items())],
        model_dir=str(core.settings.model_dir),
    )


@router.post(
    "/v1/admin/reload",
    response_model=ReloadResponse,
    responses={
        401: {"model": ErrorResponse, "description": "missing or wrong admin token"},
        404: {"model": ErrorResponse, "description": "admin endpoints disabled (no RANKSERVE_ADMIN_TOKEN)"},
        409: {"model": ErrorResponse, "description": "the bundle was refused; the previous model keeps serving"},
    },
    tags=["models"],
    summary="Load the newest (or a given) model version now",
)
async def reload(
    _admin: AdminDep, core: CoreDep, body: Annotated[ReloadRequest | None, Body()] = None
) -> ReloadResponse:
    model, previous = await core.reload(body.version if body else None)
    log.info("admin reload", extra={"model": model.key, "previous": previous.key if previous else None})
    return ReloadResponse(model=model.key, previous=previous.key if previous else None)


ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or wrong admin token"},
    404: {"model": ErrorResponse, "description": "admin endpoints disabled (no RANKSERVE_ADMIN_TOKEN)"},
}


@router.get(
    "/v1/admin/experiments",
    response_model=ExperimentsResponse,
    responses=ADMIN_ERRORS,
    tags=["experiments"],
    summary="Arms serving now: shares, bucket ranges, pinned versions, fusion, retrieval, shadows",
)
async def experiments(_admin: AdminDep, core: CoreDep) -> ExperimentsResponse:
    return ExperimentsResponse.model_validate(core.experiments.describe())


@router.post(
    "/v1/admin/experiments/reload",
    response_model=ExperimentsReloadResponse,
    responses={
        **ADMIN_ERRORS,
        409: {"model": ErrorResponse, "description": "the file was refused; the previous config keeps serving"},
    },
    tags=["experiments"],
    summary="Re-read the experiments file now",
)
async def reload_experiments(_admin: AdminDep, core: CoreDep) -> ExperimentsReloadResponse:
    result = await core.reload_experiments()
    exps = result.experiments
    log.info("admin experiments reload", extra={"status": result.status, "digest": exps.digest[:12]})
    described = core.experiments.describe()
    return ExperimentsReloadResponse.model_validate(
        {"status": result.status, "digest": exps.digest, "arms": described["arms"]}
    )


# -- the factory -----------------------------------------------------------------------------------


def create_app(settings: Settings | None = None, core: ServingCore | None = None) -> FastAPI:
    """The REST app. With `core`, the caller owns it; otherwise the lifespan builds and closes one."""
    settings = core.settings if core is not None else (settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if core is not None:
            app.state.core = core
            yield
            return
        owned = await ServingCore.create(settings)
        app.state.core = owned
        await owned.start()
        try:
            yield
        finally:
            await owned.aclose()

    app = FastAPI(
        title="rankserve",
        summary="Online ranking: lifelong-sequence retrieval, multi-task scoring, additive fusion.",
        version="1",
        lifespan=lifespan,
        default_response_class=OrjsonResponse,
    )
    app.include_router(rank_router)
    app.include_router(router)
    app.add_exception_handler(RankServeError, rankserve_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
    # added last = outermost: the request id is bound before anything else runs, 413s included
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app
