"""The gRPC transport (grpcio aio): `rankserve.v1.Ranker/Rank`, standard health, reflection.

The servicer only decodes, calls the ranking core and encodes. One interceptor does what every
Ranker call shares: it binds the request id (`x-request-id` metadata, echoed back in the
initial metadata), decodes the request itself so a malformed message is INVALID_ARGUMENT rather
than grpcio's INTERNAL, maps `RankServeError.grpc_code` once, and turns anything unexpected
into a logged INTERNAL.

Health (`grpc.health.v1.Health`) follows the core's readiness: SERVING only once a model is
loaded and warmed up and the feature store answers; NOT_SERVING again while shutting down.
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import orjson
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from feature_store.events import StreamEvent
from service import types as core_types
from service.errors import InvalidRequest, RankServeError
from service.lifecycle import ServingCore
from service.observability.logging_setup import request_id_var
from service.observability.metrics import Metrics
from service.observability.tracing import trace_carrier
from service.transports.auth import ARM_HEADER, AUTHORIZATION, authorize_arm_override, authorize_events, bearer_token
from service.transports.grpc.proto import codegen
from service.transports.request_ids import REQUEST_ID_HEADER, request_id_from

log = logging.getLogger("rankserve.grpc")

SERVICE_NAME = "rankserve.v1.Ranker"
_PROTO_DIR = Path(__file__).resolve().parent / "proto"


def load_stubs() -> tuple[ModuleType, ModuleType]:
    """The generated `ranker_pb2` and `ranker_pb2_grpc`, generating them first if missing.

    The Dockerfile and `make proto` generate them at build time; this fallback serves a fresh
    checkout (grpcio-tools is a dev dependency). A file lock keeps concurrent processes from
    importing a half-written module.
    """
    try:
        return (importlib.import_module("service.transports.grpc.proto.ranker_pb2"),
                importlib.import_module("service.transports.grpc.proto.ranker_pb2_grpc"))
    except ImportError:
        pass
    with open(Path(tempfile.gettempdir()) / "rankserve-codegen.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (_PROTO_DIR / "ranker_pb2_grpc.py").exists():
            log.warning("gRPC stubs missing; generating them from %s", _PROTO_DIR / "ranker.proto")
            codegen.generate()
        importlib.invalidate_caches()
        return (importlib.import_module("service.transports.grpc.proto.ranker_pb2"),
                importlib.import_module("service.transports.grpc.proto.ranker_pb2_grpc"))


pb2, pb2_grpc = load_stubs()


class RankerServicer:
    """`rankserve.v1.Ranker`: adapts protobuf messages to the core's types and back."""

    def __init__(self, core: ServingCore) -> None:
        self.core = core

    async def Rank(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = dict(context.invocation_metadata() or ())
        arm = metadata.get(ARM_HEADER)
        if isinstance(arm, str):  # admin only: PERMISSION_DENIED without the admin bearer token
            auth = metadata.get(AUTHORIZATION)
            token = bearer_token(auth if isinstance(auth, str) else None)
            arm = authorize_arm_override(self.core.settings, arm, token)
        user_id, candidates, keyed = request_ids(request)
        req = core_types.RankRequest(
            user_id=user_id,
            candidates=candidates,
            top_n=request.top_n if request.HasField("top_n") else None,
            request_time=request.request_time if request.HasField("request_time") else None,
            debug=request.debug,
            request_id=request_id_var.get(),
            arm=arm if isinstance(arm, str) else None,
            trace_headers=trace_carrier(metadata.get),
            context=request_context(request),
        )
        resp = await self.core.service.rank(req)
        items = (
            [pb2.RankedItem(item_key=it.item_id, score=it.score, scores=it.task_scores) for it in resp.items]
            if keyed
            else [pb2.RankedItem(item_id=it.item_id, score=it.score, scores=it.task_scores) for it in resp.items]
        )
        out = pb2.RankResponse(
            items=items,
            model=resp.model,
            arm=resp.arm,
            degraded=resp.degraded,
            request_id=resp.request_id or "",
            timings_ms=resp.timings_ms,
        )
        if resp.debug:
            # through JSON: Struct takes only plain dict/list/str/number/bool/None
            out.debug.update(orjson.loads(orjson.dumps(resp.debug, default=str, option=orjson.OPT_SERIALIZE_NUMPY)))
        return out

    async def PushEvents(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        auth = dict(context.invocation_metadata() or ()).get(AUTHORIZATION)
        authorize_events(self.core.settings, bearer_token(auth if isinstance(auth, str) else None))
        events = [event_of(k, e) for k, e in enumerate(request.events)]
        return pb2.PushEventsResponse(accepted=await self.core.events.push(events))


def event_of(k: int, event: Any) -> StreamEvent:
    """An `Event` message as the intake's event; INVALID_ARGUMENT when both forms of an id are set."""
    ids: list[core_types.RawId] = []
    for name, number, key in (("user", event.user_id, event.user_key), ("item", event.item_id, event.item_key)):
        if key and number:
            raise InvalidRequest(f"events[{k}]: send {name}_id or {name}_key, not both")
        ids.append(key or number)
    return StreamEvent(event.event_id, ids[0], ids[1], event.action, event.timestamp)


def request_ids(request: Any) -> tuple[core_types.RawId, list[core_types.RawId], bool]:
    """(user id, candidates, whether the candidates came as string keys) of a `RankRequest`.

    Integer fields and string keys are alternatives: sending both for the user, or both kinds of
    candidates, is INVALID_ARGUMENT (proto3 cannot tell an unset int64 from 0, so 0 counts as unset).
    """
    user: core_types.RawId = request.user_id
    if request.user_key:
        if request.user_id:
            raise InvalidRequest("send user_id or user_key, not both")
        user = request.user_key
    if request.candidate_keys:
        if request.candidates:
            raise InvalidRequest("send candidates or candidate_keys, not both")
        return user, list(request.candidate_keys), True
    return user, list(request.candidates), False


def request_context(request: Any) -> dict[str, Any] | None:
    """The `context` Struct as a plain dict (numbers are doubles; nested values stay messages, and are refused)."""
    if not request.HasField("context"):
        return None
    return {name: _struct_value(value) for name, value in request.context.fields.items()}


def _struct_value(value: Any) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {}  # an object: encode_context refuses it by type (it names the field)
    if kind == "list_value":
        return []
    return None  # null: the spec's default


Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class RankerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Request id, request decoding and the one error mapping for every `rankserve.v1` method."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(method, handler.unary_unary, handler.request_deserializer),
            request_deserializer=None,  # raw bytes: decoded in _wrap, where a bad message is the caller's error
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, method: str, behavior: Behavior, deserialize: Callable[[bytes], Any]) -> Behavior:
        # rankserve_requests_total counts rank requests (as REST does): event pushes have their own metrics
        counted = method == f"/{SERVICE_NAME}/Rank"
        requests = self.metrics.requests

        def count(outcome: str) -> None:
            if counted:
                requests.labels("grpc", outcome).inc()

        async def wrapped(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            given = dict(context.invocation_metadata() or ()).get(REQUEST_ID_HEADER)
            rid = request_id_from(given if isinstance(given, str) else None)
            token = request_id_var.set(rid)
            try:
                await context.send_initial_metadata(((REQUEST_ID_HEADER, rid),))
                try:
                    request = deserialize(raw)
                except DecodeError as exc:
                    count("invalid_request")
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot decode the request message: {exc}")
                try:
                    response = await behavior(request, context)
                except RankServeError as exc:
                    count(exc.code)
                    await context.abort(exc.grpc_code, exc.message)
                except Exception:
                    log.exception("unhandled error", extra={"method": method})
                    count("internal")
                    message = f"internal server error; the logs hold the details under request id {rid}"
                    await context.abort(grpc.StatusCode.INTERNAL, message)
                count("ok")
                return response
            finally:
                request_id_var.reset(token)

        return wrapped


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcServer:
    """A started gRPC server whose health status follows the core's readiness."""

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, port: int) -> None:
        self.server = server
        self.health = health_servicer
        self.port = port

    async def set_serving(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting RPCs at once; let in-flight ones finish within `grace_s`."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        log.info("gRPC server stopped")


async def start_grpc_server(core: ServingCore, host: str, port: int, *, reuse_port: bool = False) -> GrpcServer:
    """Start Ranker + health + reflection on host:port (port 0 picks a free one).

    `reuse_port` lets several worker processes bind the same port (the kernel spreads
    connections); off otherwise, so a port already in use is an error rather than shared.
    """
    settings = core.settings
    server = grpc.aio.server(
        interceptors=[RankerInterceptor(core.metrics)],
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", settings.max_body_bytes),
        ],
    )
    pb2_grpc.add_RankerServicer_to_server(RankerServicer(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = bind_address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot bind gRPC to {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    grpc_server = GrpcServer(server, health_servicer, bound)
    await grpc_server.set_serving(False)
    core.on_readiness_change(grpc_server.set_serving)
    await server.start()
    log.info("gRPC server listening", extra={"address": bind_address(host, bound)})
    return grpc_server
