"""OpenTelemetry tracing of ranked requests, when `otel_endpoint` is set (the `otel` extra).

One SERVER span `rankserve.rank` per request, a child span per stage (fetch, retrieve, score,
fuse, encode). The stage spans are emitted when the request ends, from the timestamps the
`StageClock` took anyway: the CPU stages run on a worker thread, and recording them afterwards
needs no context hand-over between threads and costs nothing on the hot path. An incoming W3C
`traceparent` / `tracestate` (HTTP header or gRPC metadata) makes the request part of the
caller's trace; its trace id is bound to the logs of the request (`trace_id`).

Without an endpoint nothing here is imported from opentelemetry and `Tracing.from_settings`
returns None: the core then skips tracing entirely.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from feature_store.logs import RateLimitedLog
from service.errors import RankServeError
from service.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("rankserve.tracing")

# W3C trace context carriers taken from HTTP headers and gRPC metadata
TRACE_HEADERS = ("traceparent", "tracestate")


class TracingUnavailable(ValueError):
    """Tracing is configured but the OpenTelemetry packages are missing."""


def _without_credentials(url: str) -> str:
    """`url` for the logs: any user:password@ part is dropped."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def trace_carrier(get: Any) -> dict[str, str] | None:
    """The trace context headers found by `get(name)` (a headers or metadata lookup), or None."""
    found = {name: value for name in TRACE_HEADERS if isinstance(value := get(name), str) and value}
    return found or None


class RequestSpan:
    """The root span of one request; `finish` adds the stage spans and ends it."""

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self._tracing = tracing
        self.span = span
        ctx = span.get_span_context()
        self.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid and ctx.trace_flags.sampled else None

    def finish(
        self,
        stages: Sequence[tuple[str, int, int]],
        attributes: Mapping[str, str | int | float | bool],
        error: BaseException | None = None,
    ) -> None:
        """Emit one child span per (stage, start ns, end ns), set `attributes`, end the root span.

        Never raises: a tracing failure must not turn an answered request into an error.
        """
        try:
            self._finish(stages, attributes, error)
        except Exception as exc:  # the SDK swallows its own errors; this guards the rest
            self._tracing.warn("finishing a span failed", exc)

    def _finish(
        self,
        stages: Sequence[tuple[str, int, int]],
        attributes: Mapping[str, str | int | float | bool],
        error: BaseException | None,
    ) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        span = self.span
        if span.is_recording():
            parent = trace.set_span_in_context(span)
            for name, start_ns, end_ns in stages:
                self._tracing.tracer.start_span(f"rankserve.{name}", context=parent, start_time=start_ns).end(
                    end_time=end_ns
                )
            span.set_attributes(dict(attributes))
            if error is not None:
                # what the caller was told: a service error's message; for anything else (a bug) only
                # its type, since exception text can hold data and the tracing backend is a third party
                message = getattr(error, "message", None) if isinstance(error, RankServeError) else None
                span.set_status(Status(StatusCode.ERROR, message or f"internal error ({type(error).__name__})"))
        span.end()


class Tracing:
    """A tracer provider exporting over OTLP (gRPC or HTTP) with a batching processor."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("rankserve")
        self._warnings = RateLimitedLog(log, 60.0)

    def warn(self, what: str, exc: BaseException) -> None:
        """Log a tracing failure, at most once a minute per kind of failure."""
        self._warnings.warning(what, error=repr(exc))

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing | None:
        """Build the exporter for `settings.otel_endpoint`; None when tracing is not configured.

        Raises TracingUnavailable when an endpoint is set but the `otel` extra is not installed:
        a silently untraced service is worse than one that refuses to start.
        """
        if not settings.otel_endpoint:
            return None
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

            if settings.otel_protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                    OTLPSpanExporter,
                )
        except ImportError as exc:
            raise TracingUnavailable(
                f"RANKSERVE_OTEL_ENDPOINT is set but OpenTelemetry is not installed ({exc}); "
                "install the extra: pip install 'rankserve[otel]', or unset the endpoint"
            ) from exc
        resource = Resource.create(
            {
                "service.name": settings.otel_service_name,
                "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
            }
        )
        # a caller's sampling decision wins; our own root traces keep otel_sample_ratio of requests
        provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.otel_sample_ratio)))
        exporter = OTLPSpanExporter(endpoint=settings.otel_endpoint, timeout=settings.otel_export_timeout_s)
        timeout_ms = settings.otel_export_timeout_s * 1000
        provider.add_span_processor(BatchSpanProcessor(exporter, export_timeout_millis=timeout_ms))
        log.info(
            "tracing requests over OTLP",
            extra={"endpoint": _without_credentials(settings.otel_endpoint), "protocol": settings.otel_protocol,
                   "sample_ratio": settings.otel_sample_ratio},
        )
        return cls(provider)

    def start(self, carrier: Mapping[str, str] | None, start_ns: int) -> RequestSpan | None:
        """Open the root span of a request, as a child of the caller's trace when `carrier` has one.

        None (the request goes untraced) if that fails: tracing never fails a request.
        """
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind

        try:
            parent = extract(carrier) if carrier else None
            span = self.tracer.start_span("rankserve.rank", context=parent, kind=SpanKind.SERVER, start_time=start_ns)
            return RequestSpan(self, span)
        except Exception as exc:
            self.warn("starting a span failed; the request goes untraced", exc)
            return None

    def shutdown(self) -> None:
        """Flush queued spans (bounded by the export timeout) and stop the exporter."""
        self.provider.shutdown()
