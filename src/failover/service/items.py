"""An example resource that writes to every store, so failover can be watched under real traffic.

``POST /api/v1/items`` stores an item as a row in the Postgres table ``items``, a
document in the Mongo collection ``items`` and, in Redis, a cached copy
``item:{id}`` (with a TTL) plus the counter ``items:count``. ``GET
/api/v1/items/{id}`` reads it back. Both report, per store, which endpoint role
served it, so a drill can see traffic move to the fallback and back.

The schema (table, indexes) is created on *both* endpoints of each store at
startup, directly through each endpoint's URL, and again on any endpoint that
becomes healthy later (one that was down at startup): after a failover the
fallback already has the table. Creation is idempotent (``if not exists``).

Every part of an item written during an outage is reconciled into the
primaries before failback (the row, the document, ``item:{id}`` with its
remaining TTL and ``items:count``), as any other write of each store. Right
after the table is created on a fallback, reconcile's capture is refreshed, so
the new table is protected before its first write even where the fallback's
user may not create event triggers (which otherwise protect it at the next
probe round).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import psycopg
from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse
from psycopg.types.json import Jsonb
from pydantic import BaseModel, Field

from .._urls import redact_text
from ..core.endpoint import Endpoint, Role
from ..core.store import last_served
from ..core.events import Event, ProbeCompleted
from ..databases import Databases
from .auth import require_token
from .deps import get_databases

__all__ = ["items_router", "ItemIn", "ensure_schema", "schema_extension", "DEFAULT_ITEM_TTL"]

logger = logging.getLogger("failover.service.items")

DEFAULT_ITEM_TTL = 300
"""Seconds an ``item:{id}`` copy lives in Redis."""

TABLE_SQL = """
create table if not exists items (
    id text primary key,
    name text not null,
    payload jsonb not null default '{}'::jsonb,
    created_at timestamptz not null default now()
)
"""
INDEX_SQL = "create index if not exists items_created_at_idx on items (created_at)"

# The answers name endpoints and carry driver errors: the same token as the health details.
items_router = APIRouter(prefix="/api/v1/items", tags=["items"], dependencies=[Depends(require_token)])


class ItemIn(BaseModel):
    """The body of ``POST /api/v1/items``."""

    name: str = Field(min_length=1, max_length=200)
    payload: dict[str, Any] = Field(default_factory=dict)


# --- schema ------------------------------------------------------------------------------


async def _postgres_schema(endpoint: Endpoint, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        conn = await psycopg.AsyncConnection.connect(endpoint.url, autocommit=True, connect_timeout=max(2, int(timeout)))
        try:
            await conn.execute(TABLE_SQL)
            await conn.execute(INDEX_SQL)
        finally:
            await conn.close()


async def _mongo_schema(endpoint: Endpoint, timeout: float) -> None:
    from pymongo import AsyncMongoClient

    ms = int(timeout * 1000)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        endpoint.url, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=ms
    )
    try:
        async with asyncio.timeout(timeout):
            collection = client[endpoint.option("database") or "app"]["items"]
            await collection.create_index("created_at", name="items_created_at")
            await collection.create_index("name", name="items_name")
    finally:
        await client.close()


_SCHEMA: dict[str, Callable[[Endpoint, float], Awaitable[None]]] = {
    "postgres": _postgres_schema,
    "mongodb": _mongo_schema,
}


async def ensure_schema(endpoint: Endpoint, timeout: float = 5.0) -> bool:
    """Create the ``items`` schema on *endpoint*; False (and a log line) when it cannot."""
    create = _SCHEMA.get(endpoint.store)
    if create is None:
        return True
    try:
        await create(endpoint, timeout)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        logger.warning(
            "could not create the items schema on %s %s yet: %s",
            endpoint.store,
            endpoint.name,
            redact_text(f"{type(exc).__name__}: {text}", endpoint.secrets)[:300],
        )
        return False
    logger.info("items schema ready on %s %s", endpoint.store, endpoint.name)
    return True


@contextlib.asynccontextmanager
async def schema_extension(dbs: Databases) -> AsyncIterator[None]:
    """Create the schema on every endpoint now, and on each endpoint that answers a probe later.

    Any successful probe of an endpoint without its schema starts (at most one)
    attempt, so an endpoint that came up during start-up, or whose first attempt
    failed, is caught up at the next probe.
    """
    done: set[tuple[str, Role]] = set()
    running: set[tuple[str, Role]] = set()
    tasks: set[asyncio.Task[None]] = set()
    timeout = max(dbs.settings.connect_timeout, dbs.settings.probe_timeout) * 2

    async def one(endpoint: Endpoint) -> None:
        key = (endpoint.store, endpoint.role)
        if key in done or key in running:
            return
        running.add(key)
        try:
            if await ensure_schema(endpoint, timeout):
                done.add(key)
                if endpoint.role is Role.FALLBACK:
                    await _protect(dbs, endpoint.store)
        finally:
            running.discard(key)

    def on_event(event: Event) -> None:
        if not isinstance(event, ProbeCompleted) or not event.usable or event.store not in _SCHEMA:
            return
        if (event.store, event.role) in done or (event.store, event.role) in running:
            return
        endpoint = dbs.store(event.store).endpoints[event.role]
        task = asyncio.get_running_loop().create_task(one(endpoint))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # Subscribe first: an endpoint that turns healthy while the first pass runs is not missed.
    unsubscribe = dbs.subscribe(on_event)
    # Endpoints that are down now get their schema when a probe finds them up (above),
    # so a blackholed primary does not hold up startup for a connect timeout.
    endpoints = [
        store.endpoints[role]
        for store in dbs.stores.values()
        if store.name in _SCHEMA
        for role, endpoint in store.snapshot().endpoints.items()
        if endpoint.healthy
    ]
    try:
        await asyncio.gather(*(one(ep) for ep in endpoints))
        yield
    finally:
        unsubscribe()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _protect(dbs: Databases, store: str) -> None:
    """Refresh change capture on *store*'s fallback, so a table just created there is captured."""
    failover = dbs.store(store)
    reconciler = failover.reconciler
    if reconciler is None or reconciler.running:
        return  # no capture, or a run under way (each probe round refreshes it anyway)
    primary = failover.snapshot().endpoints.get(Role.PRIMARY)
    await reconciler.prepare(bool(primary is not None and primary.available))


# --- the resource ------------------------------------------------------------------------


def _served(dbs: Databases, store: str, role: Role | None) -> dict[str, Any]:
    """Which endpoint served *store*'s last operation in this task (exact, even across a switch)."""
    failover = dbs.store(store)
    if role is None:
        served = last_served()
        role = served.role if served is not None and served.store == store else failover.snapshot().active_role
    endpoint = failover.endpoints.get(role) if role is not None else None
    return {"served_by": str(role) if role is not None else None, "endpoint": endpoint.name if endpoint else None}


def _postgres_role(dbs: Databases, conn: psycopg.AsyncConnection[Any]) -> Role | None:
    """The role whose server *conn* is connected to (matched by port and host)."""
    try:
        port, host = int(conn.info.port), conn.info.host
    except (psycopg.Error, ValueError, TypeError):
        return None
    for role, endpoint in dbs.store("postgres").endpoints.items():
        try:
            parts = urlsplit(endpoint.url)
            if (parts.port or 5432) == port and (parts.hostname or "") in (host, ""):
                return role
        except ValueError:
            continue
    return None


def _secrets(dbs: Databases) -> tuple[str, ...]:
    return tuple(secret for store in dbs.stores.values() for ep in store.endpoints.values() for secret in ep.secrets)


def _error(exc: BaseException, secrets: tuple[str, ...]) -> dict[str, Any]:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return {
        "ok": False,
        "error": type(exc).__name__,
        "message": redact_text(text, secrets)[:300],
        "retryable": bool(getattr(exc, "retryable", False)),
    }


async def _guard(dbs: Databases, store: str, work: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Run one store's part; a failure is reported for that store instead of failing the request."""
    try:
        return await work()
    except Exception as exc:  # FailoverError, or the driver's own error (psycopg, pymongo, redis)
        result = _error(exc, _secrets(dbs))
        logger.warning("items: %s failed: %s: %s", store, result["error"], result["message"])
        return result


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


@items_router.post("", status_code=201)
async def create_item(request: Request, item: ItemIn = Body(...)) -> JSONResponse:
    """Store an item in every configured store and say which endpoint took each write."""
    dbs = get_databases(request)
    ttl: int = getattr(request.app.state, "failover_item_ttl", DEFAULT_ITEM_TTL)
    item_id = uuid.uuid4().hex
    created = dt.datetime.now(dt.timezone.utc)
    configured = set(dbs.stores)

    async def postgres() -> dict[str, Any]:
        async with dbs.postgres.connection() as conn:
            await conn.execute(
                "insert into items (id, name, payload, created_at) values (%s, %s, %s, %s)",
                (item_id, item.name, Jsonb(item.payload), created),
            )
            role = _postgres_role(dbs, conn)
        return {"ok": True, **_served(dbs, "postgres", role)}

    async def mongodb() -> dict[str, Any]:
        document = {"_id": item_id, "name": item.name, "payload": item.payload, "created_at": created}
        await dbs.mongodb.database["items"].insert_one(document)
        return {"ok": True, **_served(dbs, "mongodb", None)}

    async def redis() -> dict[str, Any]:
        count = await dbs.redis.incr("items:count")
        cached = json.dumps({"id": item_id, "name": item.name, "payload": item.payload, "created_at": created.isoformat()})
        await dbs.redis.set(f"item:{item_id}", cached, ex=ttl)
        return {"ok": True, "count": int(count), "ttl": ttl, **_served(dbs, "redis", None)}

    work = {"postgres": postgres, "mongodb": mongodb, "redis": redis}
    names = [name for name in work if name in configured]
    results = await asyncio.gather(*(_guard(dbs, name, work[name]) for name in names))
    stores = dict(zip(names, results))
    ok = all(r["ok"] for r in results)
    body = {"id": item_id, "name": item.name, "payload": item.payload, "created_at": created.isoformat(), "stores": stores}
    return JSONResponse(body, status_code=201 if ok else 503)


@items_router.get("/{item_id}")
async def read_item(request: Request, item_id: str) -> JSONResponse:
    """Read an item back from every configured store (Redis is a cache: it may have expired)."""
    dbs = get_databases(request)
    configured = set(dbs.stores)
    found: dict[str, Any] = {}

    async def postgres() -> dict[str, Any]:
        row = await dbs.postgres.fetchone("select name, payload, created_at from items where id = %s", (item_id,))
        if row is not None:
            found.setdefault("name", row[0])
            found.setdefault("payload", row[1])
            found.setdefault("created_at", row[2].isoformat())
        return {"ok": True, "found": row is not None, **_served(dbs, "postgres", None)}

    async def mongodb() -> dict[str, Any]:
        document = await dbs.mongodb.database["items"].find_one({"_id": item_id})
        if document is not None:
            found.setdefault("name", document.get("name"))
            found.setdefault("payload", document.get("payload"))
        return {"ok": True, "found": document is not None, **_served(dbs, "mongodb", None)}

    async def redis() -> dict[str, Any]:
        cached = _text(await dbs.redis.get(f"item:{item_id}"))
        count = _text(await dbs.redis.get("items:count"))
        if cached is not None:
            data = json.loads(cached)
            found.setdefault("name", data.get("name"))
            found.setdefault("payload", data.get("payload"))
        return {
            "ok": True,
            "found": cached is not None,
            "count": int(count) if count is not None else 0,
            **_served(dbs, "redis", None),
        }

    work = {"postgres": postgres, "mongodb": mongodb, "redis": redis}
    names = [name for name in work if name in configured]
    results = await asyncio.gather(*(_guard(dbs, name, work[name]) for name in names))
    stores = dict(zip(names, results))
    if not any(r.get("found") for r in results):
        code = 503 if not all(r["ok"] for r in results) else 404
        return JSONResponse({"id": item_id, "detail": "item not found", "stores": stores}, status_code=code)
    return JSONResponse({"id": item_id, **found, "stores": stores}, status_code=200)
