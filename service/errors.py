"""One error hierarchy for the service. Each error knows its HTTP status and gRPC status code;
the REST and gRPC adapters map them once, at their edge."""

from __future__ import annotations

import grpc


class RankServeError(Exception):
    """Base class. `message` is safe to show to the caller; it says what to fix."""

    http_status: int = 500
    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(RankServeError):
    """The request is malformed or out of limits (HTTP 422 / INVALID_ARGUMENT)."""

    http_status = 422
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    code = "invalid_request"


class PayloadTooLarge(RankServeError):
    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    code = "payload_too_large"


class Unauthorized(RankServeError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    code = "unauthorized"


class Forbidden(RankServeError):
    """Authenticated or not, the caller may not do this (e.g. an arm override without the admin token)."""

    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    code = "forbidden"


class NotFound(RankServeError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    code = "not_found"


class ModelUnavailable(RankServeError):
    """No model is loaded (yet), or the requested one is not (HTTP 503 / UNAVAILABLE)."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    code = "model_unavailable"


class StoreUnavailable(RankServeError):
    """The feature store (or the event log in it) did not answer; the call may be repeated (503 / UNAVAILABLE)."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    code = "store_unavailable"


class Overloaded(RankServeError):
    http_status = 503
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    code = "overloaded"


class DeadlineExceeded(RankServeError):
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    code = "deadline_exceeded"


class BundleRejected(RankServeError):
    """A bundle failed verification (hash, schema, warm-up); the current model keeps serving."""

    http_status = 409
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    code = "bundle_rejected"


class ExperimentsRejected(RankServeError):
    """An experiments config failed validation (shares, bundles, tasks); the previous one keeps serving."""

    http_status = 409
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    code = "experiments_rejected"
