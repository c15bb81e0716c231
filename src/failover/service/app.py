"""``create_app``: the failover service as a FastAPI application.

It assembles the pieces an existing app could also take one by one
(:func:`failover_lifespan`, :data:`health_router`, :data:`metrics_router`,
:data:`conflicts_router`) and
adds the dashboard and the example ``items`` resource.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from ..databases import Databases
from ..settings import Settings
from .conflicts import STATE_RECENT, RecentConflicts, conflicts_router
from .dashboard import STATE_LOCAL, STATIC_DIR, dashboard_router
from .deps import STATE_METRICS, Lifespan, failover_lifespan
from .health import health_router
from .items import DEFAULT_ITEM_TTL, items_router, schema_extension
from .local_control import LocalControl
from .metrics import FailoverMetrics
from .metrics_api import metrics_router

__all__ = ["create_app"]

logger = logging.getLogger("failover.service")


def create_app(
    databases: Databases | Settings | None = None,
    *,
    local: LocalControl | None = None,
    item_ttl: int = DEFAULT_ITEM_TTL,
    lifespan: Lifespan | None = None,
) -> FastAPI:
    """The failover service.

    Args:
        databases: the :class:`Databases` to serve, :class:`Settings` to build
            it from, or None to read the environment and ``.env`` now
            (``uvicorn --factory failover.service:create_app`` works).
        local: control of the embedded servers for the dashboard buttons; by
            default one is made from ``FAILOVER_LOCAL_DIR`` when
            ``FAILOVER_LOCAL_MODE`` is on.
        item_ttl: seconds an item stays cached in Redis.
        lifespan: the caller's own lifespan, run inside failover's.

    Routes: ``/`` (dashboard), ``/api/v1/health/databases``, ``/livez``,
    ``/readyz``, ``/metrics``, ``/api/v1/conflicts``, ``/api/v1/items``, ``/api/v1/dashboard/state``
    and, in local mode, ``/api/v1/local/{store}/{role}/{kill|stop|start}``.
    """
    if databases is None:
        databases = Settings.from_env()  # read now: a bad setting fails here, and local mode is known
    settings = databases.settings if isinstance(databases, Databases) else databases
    recent = RecentConflicts()
    app = FastAPI(
        title="failover",
        summary="Primary/fallback failover for PostgreSQL, MongoDB and Redis",
        lifespan=failover_lifespan(databases, lifespan=lifespan, extensions=[schema_extension, recent.running]),
    )
    setattr(app.state, STATE_METRICS, FailoverMetrics())
    setattr(app.state, STATE_RECENT, recent)
    app.state.failover_item_ttl = item_ttl
    if local is None and settings.local_mode:
        if settings.local_dir and Path(settings.local_dir, "stack.json").exists():
            local = LocalControl(settings.local_dir)
        else:
            logger.warning("FAILOVER_LOCAL_MODE is on but FAILOVER_LOCAL_DIR has no local stack: the dashboard has no buttons")
    setattr(app.state, STATE_LOCAL, local)
    app.include_router(health_router)
    app.include_router(metrics_router)
    app.include_router(conflicts_router)
    app.include_router(dashboard_router)
    app.include_router(items_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="failover-static")
    return app
