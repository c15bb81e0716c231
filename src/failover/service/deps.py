"""The lifespan helper and FastAPI dependencies that give an app its ``Databases``.

An existing FastAPI app adds failover with a lifespan and a router::

    app = FastAPI(lifespan=failover_lifespan())
    app.include_router(health_router)

The lifespan builds (or takes) one :class:`~failover.Databases`, starts it before
the first request and closes it after the last; the dependencies below hand
out its stores. They look the object up on ``request.app.state`` so routers
can be included in any app that uses the lifespan.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from psycopg import AsyncConnection

from ..core.endpoint import Role
from ..databases import Databases
from ..settings import Settings
from .metrics import FailoverMetrics

__all__ = [
    "Extension",
    "FailoverDatabases",
    "MongoDatabase",
    "PostgresConnection",
    "RedisClient",
    "SQLAlchemySession",
    "SQLAlchemySessions",
    "failover_lifespan",
    "get_databases",
    "get_metrics",
    "mongo_database",
    "postgres_connection",
    "redis_client",
    "sqlalchemy_session",
    "sqlalchemy_sessionmaker",
]

logger = logging.getLogger("failover.service")

STATE_DATABASES = "failover_databases"
STATE_METRICS = "failover_metrics"
STATE_SQLALCHEMY = "failover_sqlalchemy_sessionmaker"

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[Any]]
Extension = Callable[[Databases], AbstractAsyncContextManager[Any]]
"""Runs while the app serves: entered after ``Databases.start()``, exited before ``close()``."""


def failover_lifespan(
    databases: Databases | Settings | None = None,
    *,
    lifespan: Lifespan | None = None,
    extensions: Sequence[Extension] = (),
) -> Lifespan:
    """A FastAPI lifespan that starts failover with the app and closes it after.

    Args:
        databases: a :class:`Databases` to use, :class:`Settings` to build one
            from, or None to read the environment and ``.env`` when the app starts.
        lifespan: the app's own lifespan, entered inside ours (its code can use
            the stores) and exited before failover closes.
        extensions: context managers run with the started ``Databases``
            (the service uses one to create its example schema).

    Starting never fails because a server is down: a store whose primary does
    not answer starts on its fallback, and the log says so.
    """

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[Any]:
        if isinstance(databases, Databases):
            dbs = databases
        else:
            dbs = Databases(databases if isinstance(databases, Settings) else Settings.from_env())
        metrics = getattr(app.state, STATE_METRICS, None)
        if metrics is None:
            metrics = FailoverMetrics()
            setattr(app.state, STATE_METRICS, metrics)
        metrics.attach(dbs)  # before start(): the first probes count too
        setattr(app.state, STATE_DATABASES, dbs)
        try:
            await dbs.start()
            log_startup(dbs)
            async with contextlib.AsyncExitStack() as stack:
                for extension in extensions:
                    await stack.enter_async_context(extension(dbs))
                if lifespan is not None:
                    state = await stack.enter_async_context(lifespan(app))
                    yield state
                else:
                    yield None
        finally:
            await _dispose_sqlalchemy(app)
            await dbs.close()
            metrics.detach()
            logger.info("failover closed")

    return run


def log_startup(dbs: Databases) -> None:
    """Say, per store, where it serves from and why when it is not its primary."""
    for name, store in dbs.stores.items():
        snap = store.snapshot()
        active = snap.active_endpoint
        if active is None:
            logger.warning(
                "%s has no usable endpoint at startup (%s); requests will fail until one answers", name, snap.why_unavailable()
            )
        elif not snap.on_preferred:
            primary = snap.endpoints.get(Role.PRIMARY)
            why = primary.reason if primary is not None else "no primary configured"
            logger.warning("%s started on its fallback %s because the primary is down: %s", name, active.name, why)
        else:
            logger.info("%s serving from %s (%s)", name, active.name, snap.active_role)


def get_databases(request: Request) -> Databases:
    """Dependency: the app's started :class:`Databases`."""
    dbs = getattr(request.app.state, STATE_DATABASES, None)
    if dbs is None:
        raise RuntimeError(
            "failover is not set up for this app: create it with FastAPI(lifespan=failover_lifespan()) "
            "or failover.service.create_app()"
        )
    return dbs  # type: ignore[no-any-return]


def get_metrics(request: Request) -> FailoverMetrics:
    """Dependency: the app's :class:`FailoverMetrics`."""
    metrics = getattr(request.app.state, STATE_METRICS, None)
    if metrics is None:
        raise RuntimeError("failover metrics are not set up: use failover_lifespan() or create_app()")
    return metrics  # type: ignore[no-any-return]


async def postgres_connection(request: Request) -> AsyncIterator[AsyncConnection[Any]]:
    """Dependency: a psycopg connection on the active PostgreSQL endpoint, in a transaction
    committed when the handler returns (rolled back if it raises)."""
    async with get_databases(request).postgres.connection() as conn:
        yield conn


def mongo_database(request: Request) -> Any:
    """Dependency: the routed MongoDB database (``MONGODB_ATLAS_DATABASE`` / ``MONGODB_DATABASE``)."""
    return get_databases(request).mongodb.database


def redis_client(request: Request) -> Any:
    """Dependency: the routed Redis client (the ``redis.asyncio`` command API)."""
    return get_databases(request).redis


def sqlalchemy_sessionmaker(request: Request) -> Any:
    """Dependency: the app's SQLAlchemy ``async_sessionmaker`` (``expire_on_commit=False``)
    bound to ``dbs.postgres.sqlalchemy_engine()``, made on first use and disposed when the
    app stops. Hand it to ``dbs.postgres.run_session_transaction``. Needs ``failover[sqlalchemy]``.

    To use engine settings of your own, put your sessionmaker on
    ``app.state.failover_sqlalchemy_sessionmaker`` in your lifespan.
    """
    maker = getattr(request.app.state, STATE_SQLALCHEMY, None)
    if maker is None:
        from sqlalchemy.ext.asyncio import async_sessionmaker

        engine = get_databases(request).postgres.sqlalchemy_engine()
        maker = async_sessionmaker(engine, expire_on_commit=False)
        setattr(request.app.state, STATE_SQLALCHEMY, maker)
    return maker


async def sqlalchemy_session(request: Request) -> AsyncIterator[Any]:
    """Dependency: an SQLAlchemy ``AsyncSession`` on the active PostgreSQL endpoint, closed
    (uncommitted work rolled back) after the handler. Commit it yourself, or use
    ``async with session.begin():``."""
    async with sqlalchemy_sessionmaker(request)() as session:
        yield session


async def _dispose_sqlalchemy(app: FastAPI) -> None:
    maker = getattr(app.state, STATE_SQLALCHEMY, None)
    engine = getattr(maker, "kw", {}).get("bind") if maker is not None else None
    if engine is not None:
        with contextlib.suppress(Exception):
            await engine.dispose()


def _function_scoped(dependency: Callable[..., Any]) -> Any:
    """``Depends`` that exits before the response is sent (FastAPI >= 0.121), so a
    transaction is committed, or its failure reported, before the client hears "200"."""
    try:
        return Depends(dependency, scope="function")  # type: ignore[call-arg]
    except TypeError:  # an older FastAPI: its dependencies exit before the response anyway
        return Depends(dependency)


FailoverDatabases = Annotated[Databases, Depends(get_databases)]
"""Handler parameter type: the app's :class:`Databases`."""

PostgresConnection = Annotated[AsyncConnection[Any], _function_scoped(postgres_connection)]
"""Handler parameter type: a psycopg connection on the active endpoint, committed when the handler returns."""

MongoDatabase = Annotated[Any, Depends(mongo_database)]
"""Handler parameter type: the routed MongoDB database (``db["collection"].insert_one(...)``)."""

RedisClient = Annotated[Any, Depends(redis_client)]
"""Handler parameter type: the routed Redis client (``await redis.incr("k")``)."""

SQLAlchemySession = Annotated[Any, _function_scoped(sqlalchemy_session)]
"""Handler parameter type: an SQLAlchemy ``AsyncSession`` on the active PostgreSQL endpoint
(closed before the response is sent)."""

SQLAlchemySessions = Annotated[Any, Depends(sqlalchemy_sessionmaker)]
"""Handler parameter type: the app's ``async_sessionmaker``, for
``dbs.postgres.run_session_transaction(sessions, fn)``."""
