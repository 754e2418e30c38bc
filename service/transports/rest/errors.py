"""Error mapping of the REST transport: the only place errors become HTTP responses.

Every error body is `{"error": {"code", "message", "request_id"}}`, with 4xx for bad input and a
message that says what to fix; anything unexpected is a logged 500 naming the request id.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, cast

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Scope, Send

from service.errors import Overloaded, RankServeError, Unauthorized
from service.transports.request_ids import REQUEST_ID_HEADER

log = logging.getLogger("rankserve.rest")

RANK_PATH = "/v1/rank"
RETRY_AFTER_S = "1"  # seconds a client should back off after a 503 for overload


class OrjsonResponse(JSONResponse):
    """JSON via orjson (FastAPI's ORJSONResponse is deprecated in favour of response models,
    which validate every response: far slower for a hot path returning hundreds of items)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


async def send_error(scope: Scope, send: Send, exc: RankServeError) -> None:
    rid = scope.get("state", {}).get("request_id")
    response = OrjsonResponse(error_body(exc.code, exc.message, rid), status_code=exc.http_status)
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def error_body(code: str, message: str, request_id: str | None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _count_rank_error(request: Request, code: str) -> None:
    if request.url.path == RANK_PATH:
        request.app.state.core.metrics.requests.labels("rest", code).inc()


# the branches of an id's union (schemas.RestId, schemas.CandidateId) in an error's location
UNION_BRANCHES = {"constrained-int": int, "constrained-str": str, "int": int, "str": str}


def _fold_id_unions(errors: Sequence[Any]) -> list[Any]:
    """One error per id that is neither a valid integer nor a valid string, not one per union branch.

    An integer keeps its integer branch's error (e.g. out of range), a string its string branch's
    (e.g. too long); anything else (a float, a boolean, null) says what an id may be.
    """
    out: list[Any] = []
    for err in errors:
        loc = tuple(err.get("loc", ()))
        branch = UNION_BRANCHES.get(str(loc[-1])) if loc else None
        if branch is None:
            out.append(err)
            continue
        value = err.get("input")
        kind = int if type(value) is int else str if type(value) is str else None
        if kind is branch:
            out.append({**err, "loc": loc[:-1]})
        elif kind is None and branch is int:  # once, for the int branch
            out.append({**err, "loc": loc[:-1], "type": "id_type",
                        "msg": f"ids are integers in 0..{(1 << 63) - 1} or strings"})
    return out


def _describe_validation(request: Request, exc: RequestValidationError) -> str:
    parts: list[str] = []
    for err in _fold_id_unions(exc.errors()):
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


async def rankserve_error(request: Request, error: Exception) -> Response:
    exc = cast(RankServeError, error)
    _count_rank_error(request, exc.code)
    headers = None
    if isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, Overloaded):
        headers = {"Retry-After": RETRY_AFTER_S}  # the load is shed in about a request's time
    return OrjsonResponse(error_body(exc.code, exc.message, _request_id(request)), exc.http_status, headers=headers)


async def validation_error(request: Request, error: Exception) -> Response:
    exc = cast(RequestValidationError, error)
    _count_rank_error(request, "invalid_request")
    return OrjsonResponse(error_body("invalid_request", _describe_validation(request, exc), _request_id(request)), 422)


async def http_error(request: Request, error: Exception) -> Response:
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


async def unexpected_error(request: Request, exc: Exception) -> Response:
    rid = _request_id(request)
    log.error("unhandled error", exc_info=exc, extra={"request_id": rid, "path": request.url.path})
    _count_rank_error(request, "internal")
    headers = {REQUEST_ID_HEADER: rid} if rid else None
    return OrjsonResponse(
        error_body("internal", "internal server error; the logs hold the details under this request id", rid),
        500,
        headers=headers,
    )
