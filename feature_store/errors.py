"""Typed errors of the online feature store.

Every error carries `retriable` (may the *caller* try again later, e.g. in degraded mode) and the
HTTP status and gRPC status code name a transport should answer with, so the service maps them
once per transport. Backend exceptions (redis-py, OSError) never escape the store: they are
wrapped here, with the original as `__cause__`.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave is wrong (a file, a flag, a bundle, a run directory).

    The command line prints its message, which says what to fix, as one line instead of a traceback.
    """


class FeatureStoreError(Exception):
    """Base class of all feature-store errors."""

    retriable: bool = False
    http_status: int = 500
    grpc_code: str = "INTERNAL"

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class FeatureStoreUnavailable(FeatureStoreError):
    """The backend cannot be reached or did not answer in time (connection refused/reset,
    socket timeout, request deadline, cluster down). Transient: the service degrades."""

    retriable = True
    http_status = 503
    grpc_code = "UNAVAILABLE"


class FeatureStoreTimeout(FeatureStoreUnavailable):
    """The request deadline (`request_timeout_s`, retries included) ran out."""

    grpc_code = "DEADLINE_EXCEEDED"


class FeatureStoreDataError(FeatureStoreError):
    """A stored value cannot be decoded (wrong size, corrupt): a bug or a foreign writer."""


class FeatureStoreConfigError(FeatureStoreError):
    """The store configuration is invalid or inconsistent (bad URL, mode, embedded dir in use)."""


class VersionNotFound(FeatureStoreError):
    """No active feature-set version, or the named version has no meta key."""

    http_status = 503
    grpc_code = "FAILED_PRECONDITION"


class VersionConflict(FeatureStoreError):
    """A version operation that would break an invariant: dropping the active version, activating
    an incomplete one, or resuming an ingest with a different schema or source."""

    http_status = 409
    grpc_code = "FAILED_PRECONDITION"
