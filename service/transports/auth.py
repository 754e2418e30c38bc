"""The admin and events bearer tokens, checked the same way by REST and gRPC.

Admin features are off when `RANKSERVE_ADMIN_TOKEN` is unset, the event endpoints when
`RANKSERVE_EVENTS_TOKEN` is (a producer holds that token, never the admin one). Tokens are compared in constant
time, so response timing does not reveal how much of a guess was right.
"""

from __future__ import annotations

import hmac

from pydantic import SecretStr

from service.errors import Forbidden, NotFound, Unauthorized
from service.settings import Settings

ARM_HEADER = "x-rankserve-arm"  # HTTP header and gRPC metadata key of the arm override
AUTHORIZATION = "authorization"


def _secret(token: SecretStr | None) -> str | None:
    secret = token.get_secret_value() if token is not None else ""
    return secret or None


def admin_secret(settings: Settings) -> str | None:
    """The configured admin token, or None when admin features are disabled."""
    return _secret(settings.admin_token)


def events_secret(settings: Settings) -> str | None:
    """The configured token of the event endpoints, or None when they are disabled."""
    return _secret(settings.events_token)


def _matches(secret: str | None, given: str | None) -> bool:
    if secret is None:
        return False
    return hmac.compare_digest((given or "").encode(), secret.encode())


def token_matches(settings: Settings, given: str | None) -> bool:
    """True only when admin is enabled and `given` is the token (constant-time comparison)."""
    return _matches(admin_secret(settings), given)


def authorize_events(settings: Settings, given: str | None) -> None:
    """Event producers: NotFound when the endpoints are off, Unauthorized without the events token."""
    secret = events_secret(settings)
    if secret is None:
        raise NotFound("the event endpoints are disabled; set RANKSERVE_EVENTS_TOKEN to enable them")
    if not _matches(secret, given):
        raise Unauthorized("missing or wrong events token; send 'Authorization: Bearer <RANKSERVE_EVENTS_TOKEN>'")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def authorize_arm_override(settings: Settings, arm: str, token: str | None) -> str:
    """The forced arm when the caller holds the admin token; Forbidden (403) otherwise.

    Refused rather than ignored: a test client that believes it forced an arm must not silently
    get the hash-assigned one.
    """
    if admin_secret(settings) is None:
        raise Forbidden(
            f"the {ARM_HEADER} override is an admin feature and admin is disabled on this server "
            "(RANKSERVE_ADMIN_TOKEN unset); drop the header"
        )
    if not token_matches(settings, token):
        raise Forbidden(f"the {ARM_HEADER} override needs 'Authorization: Bearer <RANKSERVE_ADMIN_TOKEN>'")
    return arm
