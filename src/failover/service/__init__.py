"""The failover service: the seed's health endpoint, a dashboard, metrics, and FastAPI drop-ins.

Run it whole with :func:`create_app` (``failover serve``), or add failover to an
existing FastAPI app::

    from fastapi import FastAPI
    from failover.service import PostgresConnection, conflicts_router, failover_lifespan, health_router

    app = FastAPI(lifespan=failover_lifespan())
    app.include_router(health_router)
    app.include_router(conflicts_router)  # GET /api/v1/conflicts, reconcile's conflict log

    @app.get("/now")
    async def now(pg: PostgresConnection) -> dict:
        cur = await pg.execute("select now()")
        return {"now": (await cur.fetchone())[0]}
"""

from .app import create_app
from .auth import check_token, require_token
from .conflicts import conflicts_router
from .dashboard import dashboard_router
from .deps import (
    FailoverDatabases,
    MongoDatabase,
    PostgresConnection,
    RedisClient,
    SQLAlchemySession,
    SQLAlchemySessions,
    failover_lifespan,
    get_databases,
    get_metrics,
    mongo_database,
    postgres_connection,
    redis_client,
    sqlalchemy_session,
    sqlalchemy_sessionmaker,
)
from .health import health_router
from .items import items_router
from .local_control import LocalControl
from .metrics import FailoverMetrics
from .metrics_api import metrics_router

__all__ = [
    "FailoverDatabases",
    "MongoDatabase",
    "PostgresConnection",
    "RedisClient",
    "SQLAlchemySession",
    "SQLAlchemySessions",
    "FailoverMetrics",
    "LocalControl",
    "check_token",
    "conflicts_router",
    "create_app",
    "dashboard_router",
    "failover_lifespan",
    "get_databases",
    "get_metrics",
    "health_router",
    "items_router",
    "metrics_router",
    "mongo_database",
    "postgres_connection",
    "redis_client",
    "require_token",
    "sqlalchemy_session",
    "sqlalchemy_sessionmaker",
]
