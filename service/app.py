"""The REST transport (FastAPI): decode, call the ranking core, encode.

`create_app(settings)` builds the app. Alone (`uvicorn --factory service.app:create_app`, tests),
its lifespan owns a `ServingCore`; under `rankserve serve` the server passes in the core it
shares with gRPC and owns it itself. Errors are mapped once, in the handlers at the bottom:
every error body is `{"error": {"code", "message", "request_id"}}`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, cast

import orjson
from fastapi import APIRouter, Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import ARM_HEADER, admin_secret, authorize_arm_override, token_matches
from service.errors import NotFound, PayloadTooLarge, RankServeError, Unauthorized
from service.lifecycle import REQUEST_ID_HEADER, ServingCore, new_request_id, request_id_from
from service.logging_setup import request_id_var
from service.schemas import (
    RANK_EXAMPLE,
    ErrorResponse,
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
from service.settings import Settings
from service.tracing import trace_carrier

log = logging.getLogger("rankserve.rest")

RANK_PATH = "/v1/rank"


class OrjsonResponse(JSONResponse):
    """JSON via orjson (FastAPI's ORJSONResponse is deprecated in favour of response models,
    which validate every response: far slower for a hot path returning hundreds of items)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


# -- middleware (pure ASGI: no per-request task or body copy, unlike BaseHTTPMiddleware) ------------


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


class RequestIdMiddleware:
    """Take `X-Request-ID` (or make one), bind it for logs, echo it in the response header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = _header(scope, REQUEST_ID_HEADER.encode())
        rid = request_id_from(raw.decode("latin-1") if raw else None)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != REQUEST_ID_HEADER.encode()]
                message["headers"] = [*headers, (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        token = request_id_var.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class BodySizeLimitMiddleware:
    """Answer 413 for bodies over `max_bytes`: at once from Content-Length, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body exceeds {self.max_bytes} bytes (max_body_bytes); send fewer candidates per request"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                await _send_error(scope, send, self._too_large())
                return
            # the server enforces Content-Length framing: the body cannot be longer than declared
            await self.app(scope, receive, send)
            return
        # chunked: buffer up to the limit (the route reads the whole body anyway), then replay
        messages: list[Message] = []
        total = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                await _send_error(scope, send, self._too_large())
                return
            if not message.get("more_body", False):
                break
        queued = iter(messages)

        async def replay() -> Message:
            return next(queued, None) or await receive()

        await self.app(scope, replay, send)


async def _send_error(scope: Scope, send: Send, exc: RankServeError) -> None:
    rid = scope.get("state", {}).get("request_id")
    response = OrjsonResponse(error_body(exc.code, exc.message, rid), status_code=exc.http_status)
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def error_body(code: str, message: str, request_id: str | None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id}}


# -- dependencies ----------------------------------------------------------------------------------


def get_core(request: Request) -> ServingCore:
    core: ServingCore = request.app.state.core
    return core


def get_request_id(request: Request) -> str:
    rid: str | None = getattr(request.state, "request_id", None)
    return rid or new_request_id()


_bearer = HTTPBearer(auto_error=False, description="RANKSERVE_ADMIN_TOKEN")


def require_admin(
    core: Annotated[ServingCore, Depends(get_core)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Admin endpoints: 404 when no token is configured (disabled), 401 without the right one."""
    if admin_secret(core.settings) is None:
        raise NotFound("admin endpoints are disabled; set RANKSERVE_ADMIN_TOKEN to enable them")
    # constant-time comparison: response timing must not reveal how much of a guess was right
    if not token_matches(core.settings, credentials.credentials if credentials is not None else None):
        raise Unauthorized("missing or wrong admin token; send 'Authorization: Bearer <RANKSERVE_ADMIN_TOKEN>'")


def arm_override(
    request: Request,
    core: Annotated[ServingCore, Depends(get_core)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    """The `X-Rankserve-Arm` override: admin only (403 without the admin token), None when absent."""
    arm = request.headers.get(ARM_HEADER)
    if arm is None:
        return None
    return authorize_arm_override(core.settings, arm, credentials.credentials if credentials is not None else None)


CoreDep = Annotated[ServingCore, Depends(get_core)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
AdminDep = Annotated[None, Depends(require_admin)]
ArmOverrideDep = Annotated[str | None, Depends(arm_override)]

# -- routes ----------------------------------------------------------------------------------------

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        413: "request body larger than max_body_bytes",
        422: "invalid request: wrong types, missing fields, limits exceeded",
        503: "no model loaded yet, or overloaded",
        504: "ranking deadline exceeded",
    }.items()
}

router = APIRouter()


@router.post(
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
    return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)


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


# -- error mapping (the only place errors become HTTP responses) -----------------------------------


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _count_rank_error(request: Request, code: str) -> None:
    if request.url.path == RANK_PATH:
        get_core(request).metrics.requests.labels("rest", code).inc()


def _describe_validation(request: Request, exc: RequestValidationError) -> str:
    parts: list[str] = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        kind = err.get("type", "")
        if kind == "json_invalid":
            detail = err.get("ctx", {}).get("error", "")
            position = loc[1] if len(loc) > 1 else "?"
            parts.append(f"request body is not valid JSON: {detail} at character {position}")
            continue
        if loc == ["body"] and kind == "missing":
            parts.append('the request body is empty; send a JSON object like {"user_id": 1, "candidates": [11, 12]}')
            continue
        if loc == ["body"] and kind in ("model_attributes_type", "dict_type", "model_type"):
            content_type = request.headers.get("content-type", "")
            if "json" not in content_type:
                parts.append("send the body as a JSON object with 'Content-Type: application/json'")
                continue
        text = f"{'.'.join(loc)}: {err.get('msg', 'invalid')}"
        if "input" in err and kind not in ("missing", "extra_forbidden"):
            shown = repr(err["input"])
            text += f" (got {shown if len(shown) <= 40 else shown[:37] + '...'})"
        parts.append(text)
    return "; ".join(parts) or "invalid request"


# Starlette types every handler as (Request, Exception); each is registered for one class only.


async def _rankserve_error(request: Request, error: Exception) -> Response:
    exc = cast(RankServeError, error)
    _count_rank_error(request, exc.code)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return OrjsonResponse(error_body(exc.code, exc.message, _request_id(request)), exc.http_status, headers=headers)


async def _validation_error(request: Request, error: Exception) -> Response:
    exc = cast(RequestValidationError, error)
    _count_rank_error(request, "invalid_request")
    return OrjsonResponse(error_body("invalid_request", _describe_validation(request, exc), _request_id(request)), 422)


async def _http_error(request: Request, error: Exception) -> Response:
    exc = cast(StarletteHTTPException, error)
    if exc.status_code == 400:  # FastAPI could not parse the body at all: malformed, as bad JSON is (422)
        cause = exc.__cause__
        why = ("it is not UTF-8 text" if isinstance(cause, UnicodeDecodeError)
               else "a number has too many digits (ids are 64-bit integers)" if isinstance(cause, ValueError)
               else "it is nested too deeply" if isinstance(cause, RecursionError) else str(exc.detail))
        _count_rank_error(request, "invalid_request")
        return OrjsonResponse(error_body("invalid_request", f"request body is not valid JSON: {why}",
                                         _request_id(request)), 422)
    code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "http_error")
    return OrjsonResponse(
        error_body(code, str(exc.detail), _request_id(request)), exc.status_code, headers=exc.headers
    )


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    rid = _request_id(request)
    log.error("unhandled error", exc_info=exc, extra={"request_id": rid, "path": request.url.path})
    _count_rank_error(request, "internal")
    headers = {REQUEST_ID_HEADER: rid} if rid else None
    return OrjsonResponse(
        error_body("internal", "internal server error; the logs hold the details under this request id", rid),
        500,
        headers=headers,
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
    app.include_router(router)
    app.add_exception_handler(RankServeError, _rankserve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    # added last = outermost: the request id is bound before anything else runs, 413s included
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app
