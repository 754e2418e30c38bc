"""Request ids: taken from the caller when plain, else made; carried in logs, headers and gRPC metadata."""

from __future__ import annotations

import re
import uuid

REQUEST_ID_HEADER = "x-request-id"  # HTTP header and gRPC metadata key
# Client-supplied ids end up in logs and headers: accept only short, plain tokens.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(given: str | None) -> str:
    """The caller's request id when it is a plain token, else a fresh one."""
    return given if given and _REQUEST_ID_RE.fullmatch(given) else new_request_id()
