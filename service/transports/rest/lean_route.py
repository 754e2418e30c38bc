"""A lean FastAPI route for the hot JSON endpoint (`POST /v1/rank`).

FastAPI's own request handler solves the endpoint's dependency graph anew on every request,
parses the content type with `email.message` and decodes the body with the stdlib `json`: about
0.12 ms of server CPU per rank request on the development machine, as much as uvicorn, the
socket and orjson together (docs/PERFORMANCE.md, `python -m loadtest.bench_http`). A
`LeanJsonRoute` keeps all that FastAPI derives from the endpoint's signature (the OpenAPI
operation, the body field and its pydantic validator) and the app around it (routing, middleware,
exception handlers), and replaces only that handler. It does what FastAPI's does, in the same order, with the same
results:

1. read the body: empty is a missing body; with a content type other than JSON the raw bytes are
   validated (and refused with a message saying to send JSON); JSON is parsed by pydantic-core's
   parser, and whatever that parser refuses is parsed again as FastAPI parses it (stdlib `json`),
   so every input gets FastAPI's value or FastAPI's error (a `json_invalid` validation error, or
   an HTTP 400 for bodies that are not text or too deep);
2. resolve the other parameters with `resolve(request)`: the endpoint's dependencies, called
   directly in FastAPI's order (an exception there, e.g. a refused arm override, wins over an
   invalid body, as it does with FastAPI);
3. validate the body with the route's own body field (`loc` starting with "body", as FastAPI
   reports it) and raise `RequestValidationError` with FastAPI's error list;
4. call the endpoint, which must return a `Response` (no response-model serialization here).

`dependency_overrides` and FastAPI's native OpenTelemetry spans do not apply to such a route.
"""

from __future__ import annotations

import contextlib
import email.message
import inspect
import json
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import ValidationError
from pydantic_core import PydanticUndefined, from_json

JSON_CONTENT_TYPE = "application/json"


def is_json_content_type(content_type: str | None) -> bool:
    """FastAPI's test of a JSON body: `application/json` or `application/*+json`, parameters ignored."""
    if content_type == JSON_CONTENT_TYPE:
        return True
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


async def read_json_body(request: Request) -> Any:
    """The body as FastAPI reads a JSON body parameter: `PydanticUndefined` when empty, the raw bytes
    unless the content type is JSON, else the parsed JSON; FastAPI's exceptions for bad JSON."""
    try:
        raw = await request.body()
        if not raw:
            return PydanticUndefined
        if not is_json_content_type(request.headers.get("content-type")):
            return raw
        # pydantic-core's parser gives stdlib `json`'s values for everything it accepts (integers
        # of any length included, unlike orjson) and refuses more (lone surrogates, BOMs, UTF-16,
        # nesting past 200): those bodies take FastAPI's path below, value or error
        with contextlib.suppress(Exception):
            return from_json(raw)
        value = json.loads(raw)
        _refuse_lone_surrogates(value, raw)
        return value
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "input": {},
              "ctx": {"error": exc.msg}}],
            body=exc.doc,
        ) from exc
    except (HTTPException, RequestValidationError):
        raise
    except Exception as exc:  # not UTF-8, too deep, too many digits: FastAPI's 400, mapped by the app
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from exc


def _refuse_lone_surrogates(value: Any, raw: bytes) -> None:
    """A string with a lone UTF-16 surrogate ("\\ud800") is valid JSON but not Unicode: no id,
    name or message can be encoded from it, so the body is refused as invalid JSON here."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error", "input": {},
              "ctx": {"error": "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff): send valid Unicode"}}],
            body=raw,
        ) from exc


def missing_body_error() -> dict[str, Any]:
    """FastAPI's error for a required body that was not sent."""
    error = dict(ValidationError.from_exception_data(
        "Field required", [{"type": "missing", "loc": ("body",), "input": {}}]
    ).errors(include_url=False)[0])
    error["input"] = None
    return error


class LeanJsonRoute(APIRoute):
    """An `APIRoute` for an endpoint with one JSON body parameter that returns a `Response`.

    Subclasses define `resolve` (the other parameters, by name, from the request) and `params`
    (their names, checked against the endpoint's signature when the route is built).
    """

    params: ClassVar[tuple[str, ...]] = ()

    async def resolve(self, request: Request) -> dict[str, Any]:
        """The endpoint's parameters other than the body, by name."""
        raise NotImplementedError

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        body_field = self.body_field
        if body_field is None:
            raise TypeError(f"{self.path}: a LeanJsonRoute needs a JSON body parameter")
        endpoint = self.endpoint
        declared = set(inspect.signature(endpoint).parameters)
        if declared != {body_field.name, *self.params}:
            raise TypeError(f"{self.path}: the endpoint takes {sorted(declared)}, the route resolves "
                            f"{sorted({body_field.name, *self.params})}")
        name = body_field.name
        resolve = self.resolve

        async def handler(request: Request) -> Response:
            value = await read_json_body(request)
            kwargs = await resolve(request)
            if value is PydanticUndefined:
                raise RequestValidationError([missing_body_error()], body=None)
            body, errors = body_field.validate(value, {}, loc=("body",))
            if errors:
                raise RequestValidationError(errors, body=value)
            response = await endpoint(**{name: body}, **kwargs)
            if not isinstance(response, Response):
                raise TypeError(f"{self.path}: the endpoint of a LeanJsonRoute must return a Response")
            return response

        return handler
