"""The seed's health endpoint plus liveness and readiness.

``GET /api/v1/health/databases`` returns ``Databases.status()``: the seed's keys
per store and ``overall_status``, with details (state, endpoints, transitions,
counters) under extra keys. HTTP 200 means the app can serve (healthy or
degraded), 503 that some store has no usable endpoint.

``/livez`` says only that the process answers; ``/readyz`` says whether every
configured store has a usable endpoint and shows nothing else, so both stay
open when a health token protects the details.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from .auth import require_token
from .deps import get_databases

__all__ = ["health_router"]

health_router = APIRouter(tags=["health"])
"""``GET /api/v1/health/databases`` (token-protected when a token is set), ``/livez`` and ``/readyz``."""


@health_router.get("/api/v1/health/databases", dependencies=[Depends(require_token)])
async def health_databases(request: Request) -> JSONResponse:
    """Where each store serves from and how healthy its endpoints are."""
    status = get_databases(request).status()
    code = 503 if status["overall_status"] == "unhealthy" else 200
    return JSONResponse(status, status_code=code, headers={"Cache-Control": "no-store"})


@health_router.get("/livez")
async def livez() -> dict[str, str]:
    """The process is alive and serving HTTP."""
    return {"status": "alive"}


@health_router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Every configured store has an endpoint to route to."""
    dbs = get_databases(request)
    ready = all(store.snapshot().available for store in dbs.stores.values())
    body: dict[str, Any] = {"status": "ready" if ready else "not ready"}
    return JSONResponse(body, status_code=200 if ready else 503, headers={"Cache-Control": "no-store"})
