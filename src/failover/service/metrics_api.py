"""``GET /metrics``: the Prometheus exposition of the app's own registry."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from .auth import require_token
from .deps import get_metrics
from .metrics import CONTENT_TYPE

__all__ = ["metrics_router"]

metrics_router = APIRouter(tags=["metrics"])
"""``GET /metrics`` (token-protected when a token is set)."""


@metrics_router.get("/metrics", dependencies=[Depends(require_token)])
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(get_metrics(request).render(), media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})
