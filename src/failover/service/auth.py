"""Bearer-token protection of health details, the dashboard and metrics.

Why a token at all: the status document names every endpoint, its redacted URL
and the last errors seen, which tells an attacker a lot about the deployment.
When ``FAILOVER_HEALTH_TOKEN`` is set, every route that shows such details asks
for ``Authorization: Bearer <token>``; ``/livez`` (and the detail-free
``/readyz``) stay open for orchestrators. Tokens are compared in constant time
and never echoed: a 401 says only that a token is missing or wrong.
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, status

from ..settings import Settings

__all__ = ["check_token", "require_token"]

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="failover"'}


def check_token(settings: Settings, presented: str | None) -> bool:
    """Whether *presented* opens the protected routes under *settings*.

    Always true when no token is configured.
    """
    expected = settings.health_token.get_secret_value() if settings.health_token is not None else ""
    if not expected:
        return True
    if not presented:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def _settings_of(request: Request) -> Settings:
    from .deps import get_databases  # a late import keeps auth free of the lifespan machinery

    return get_databases(request).settings


def _deny(presented: str | None) -> HTTPException:
    detail = "a bearer token is required" if presented is None else "the bearer token is not valid"
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers=_CHALLENGE)


def require_token(request: Request) -> None:
    """FastAPI dependency: 401 unless the request carries the configured bearer token."""
    presented = _bearer(request)
    if not check_token(_settings_of(request), presented):
        raise _deny(presented)
