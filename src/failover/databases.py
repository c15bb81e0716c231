"""``Databases``: the object an application holds, one attribute per store."""

from __future__ import annotations

import asyncio
import importlib
import logging
from typing import TYPE_CHECKING, Any

from .core.clock import Clock, SystemClock
from .core.endpoint import Endpoint, Role, display_name_for
from .core.events import EventBus, Listener
from .core.store import FailoverStore, StoreOptions
from .errors import ClosedError, StoreNotConfigured
from .settings import STORES, Settings

if TYPE_CHECKING:
    from .stores.mongodb import MongoStore
    from .stores.postgres import PostgresStore
    from .stores.redis import RedisStore

__all__ = ["Databases", "endpoints_for"]

logger = logging.getLogger("failover")

_VARIABLES = {
    "postgres": "SUPABASE_DB_URL and/or POSTGRES_URL",
    "mongodb": "MONGODB_ATLAS_URL and/or MONGODB_URL",
    "redis": "UPSTASH_REDIS_URL and/or REDIS_URL",
}


def endpoints_for(settings: Settings, store: str) -> list[Endpoint]:
    """The configured endpoints of *store*, primary first, with their display names."""
    endpoints = []
    for role, url in zip((Role.PRIMARY, Role.FALLBACK), settings.urls(store)):
        if not url:
            continue
        name = settings.display_name(store, str(role)) or display_name_for(store, role, url)
        options: tuple[tuple[str, str], ...] = ()
        if store == "mongodb":
            database = settings.mongodb_atlas_database if role is Role.PRIMARY else settings.mongodb_database
            options = (("database", database or "app"),)
        endpoints.append(Endpoint(store=store, role=role, name=name, url=url, options=options))
    return endpoints


class Databases:
    """Primary/fallback failover for every configured store.

    >>> dbs = Databases.from_env()
    >>> async with dbs:
    ...     async with dbs.postgres.connection() as conn:
    ...         await conn.execute("select 1")

    A store with no URL is absent: using it raises :class:`StoreNotConfigured`.
    """

    def __init__(self, settings: Settings | None = None, *, clock: Clock | None = None) -> None:
        self.settings = settings if settings is not None else Settings()
        self.clock = clock or SystemClock()
        self.events = EventBus()
        self._facades: dict[str, Any] = {}
        self._started = False
        self._closed = False
        options = StoreOptions.from_settings(self.settings)
        for store in self.settings.configured_stores():
            endpoints = endpoints_for(self.settings, store)
            self._facades[store] = _build(store, self.settings, endpoints, options, self.events, self.clock)

    @classmethod
    def from_env(cls, env_file: str | None = ".env") -> Databases:
        """Build from the environment and *env_file* (see :class:`Settings`)."""
        return cls(Settings.from_env(env_file))

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Probe every endpoint, pick where each store starts, open pools, start monitors."""
        if self._closed:
            raise ClosedError("these Databases are closed; create a new instance")
        if self._started:
            return
        await asyncio.gather(*(f.failover.start() for f in self._facades.values()))
        self._started = True
        for name, facade in self._facades.items():
            snap = facade.failover.snapshot()
            active = snap.active_endpoint
            logger.info("%s serving from %s (%s)", name, active.name if active else None, snap.state)

    async def close(self) -> None:
        """Stop monitors and close every pool and client."""
        self._closed = True
        await asyncio.gather(*(f.failover.close() for f in self._facades.values()), return_exceptions=True)
        for facade in self._facades.values():
            closer = getattr(facade, "aclose", None)
            if closer is not None:
                await closer()

    async def __aenter__(self) -> Databases:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- stores ---------------------------------------------------------------------------

    def _facade(self, store: str) -> Any:
        try:
            return self._facades[store]
        except KeyError:
            raise StoreNotConfigured(store, _VARIABLES[store]) from None

    @property
    def postgres(self) -> PostgresStore:
        """PostgreSQL (``SUPABASE_DB_URL`` / ``POSTGRES_URL``)."""
        return self._facade("postgres")  # type: ignore[no-any-return]

    @property
    def mongodb(self) -> MongoStore:
        """MongoDB (``MONGODB_ATLAS_URL`` / ``MONGODB_URL``)."""
        return self._facade("mongodb")  # type: ignore[no-any-return]

    @property
    def redis(self) -> RedisStore:
        """Redis (``UPSTASH_REDIS_URL`` / ``REDIS_URL``)."""
        return self._facade("redis")  # type: ignore[no-any-return]

    @property
    def stores(self) -> dict[str, FailoverStore[Any]]:
        """The failover machinery of each configured store, by name."""
        return {name: f.failover for name, f in self._facades.items()}

    def store(self, name: str) -> FailoverStore[Any]:
        return self._facade(name).failover  # type: ignore[no-any-return]

    def subscribe(self, listener: Listener) -> Any:
        """Call *listener* with every event of every store; returns an unsubscribe function."""
        return self.events.subscribe(listener)

    def pin(self, store: str, role: Role | str | None) -> None:
        """Force *store* onto ``primary`` or ``fallback``; ``None`` returns it to automatic mode."""
        self.store(store).pin(Role(role) if role is not None else None)

    async def conflicts(self, store: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Recorded reconcile conflicts, newest first, of *store* (or of every store).

        Each is a dict: ``store``, ``key``, ``resolution`` (``fallback_kept`` |
        ``primary_kept``), ``at`` (epoch seconds), ``primary`` and ``fallback`` (summaries
        of both versions, secrets masked and long values cut; None where the key was
        absent) and ``detail``. The log lives on each store's fallback; a store whose
        fallback cannot be read is skipped with a warning.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        names = [store] if store is not None else list(self._facades)
        found: list[dict[str, Any]] = []
        for name in names:
            failover = self.store(name)
            reconciler = failover.reconciler
            if reconciler is None:
                continue
            fallback = failover.endpoints[Role.FALLBACK]
            try:
                async with asyncio.timeout(failover.options.operation_timeout):
                    found.extend(await reconciler.capture.conflicts(fallback, limit))
            except Exception as exc:
                logger.warning("reading the %s conflict log failed: %s", name, failover.describe(fallback, exc))
        found.sort(key=lambda c: c.get("at") or 0, reverse=True)
        return found[:limit]

    # --- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The document of ``GET /api/v1/health/databases``.

        ``overall_status`` is ``healthy`` when every store runs where it should
        (its primary, or its only endpoint), ``degraded`` when some store runs on
        its fallback or is reconciling, ``unhealthy`` when some store has no
        usable endpoint.
        """
        doc: dict[str, Any] = {}
        overall = "healthy"
        for name in STORES:
            facade = self._facades.get(name)
            if facade is None:
                continue
            snap = facade.failover.snapshot()
            doc[name] = snap.to_status()
            if not snap.available:
                overall = "unhealthy"
            elif not snap.on_preferred and overall == "healthy":
                overall = "degraded"
        doc["overall_status"] = overall
        return doc


def _build(
    store: str, settings: Settings, endpoints: list[Endpoint], options: StoreOptions, bus: EventBus, clock: Clock
) -> Any:
    # Imported on demand: an application that uses only Redis never imports psycopg or PyMongo.
    if store not in STORES:
        raise ValueError(f"unknown store {store!r}")
    module = importlib.import_module(f".stores.{store}", __package__)
    return module.create(settings, endpoints, options, bus, clock)
