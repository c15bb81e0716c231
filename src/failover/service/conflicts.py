"""``GET /api/v1/conflicts``: the reconcile conflict log of every store, newest first.

A conflict is a key that changed on the primary after traffic left it *and* on
the fallback during the outage; the conflict policy decided which version stays
(see :mod:`failover.core.reconcile`). Each store keeps its log durably on its
fallback, so the list survives restarts and includes conflicts resolved by other
processes.

The entries summarise both versions (secrets masked, long values cut), but keys
and values are still application data: the route needs the health token when
one is set, like the health details.

:class:`RecentConflicts` is the small cache the dashboard reads: the log lives on
the fallbacks, and a page polling every second must not open a connection to
each of them every second, nor wait for a fallback that is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from ..databases import Databases
from ..settings import STORES
from ..core.tasks import cancel_and_wait
from .auth import require_token
from .deps import get_databases

__all__ = ["conflicts_router", "RecentConflicts", "DEFAULT_LIMIT", "MAX_LIMIT", "recent_conflicts"]

logger = logging.getLogger("failover.service.conflicts")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# The dashboard's list: how many, how old it may be, how long a poll waits for a refresh.
DEFAULT_RECENT = 10
DEFAULT_RECENT_TTL = 5.0
DEFAULT_RECENT_WAIT = 0.5

STATE_RECENT = "failover_recent_conflicts"

conflicts_router = APIRouter(tags=["reconcile"])
"""``GET /api/v1/conflicts`` (token-protected when a token is set)."""


def _parse_limit(limit: str | None) -> int:
    if limit is None or limit == "":
        return DEFAULT_LIMIT
    try:
        value = int(limit)
    except ValueError:
        raise HTTPException(400, detail=f"limit must be a whole number from 1 to {MAX_LIMIT}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise HTTPException(400, detail=f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return value


def _check_store(dbs: Databases, store: str | None) -> str | None:
    if store is None or store == "":
        return None
    if store not in STORES:
        raise HTTPException(400, detail=f"unknown store; expected one of {', '.join(STORES)}")
    if store not in dbs.stores:
        raise HTTPException(400, detail=f"the store {store} is not configured in this service")
    return store


@conflicts_router.get("/api/v1/conflicts", dependencies=[Depends(require_token)])
async def list_conflicts(
    request: Request,
    store: str | None = Query(None, description="postgres, mongodb or redis (default: every configured store)"),
    limit: str | None = Query(None, description=f"how many, newest first: 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT})"),
) -> JSONResponse:
    """Recorded reconcile conflicts, newest first.

    Each entry: ``store``, ``key``, ``resolution`` (``fallback_kept`` |
    ``primary_kept``), ``at`` (epoch seconds), ``primary`` and ``fallback``
    (summaries of both versions; null where the key was absent) and ``detail``.
    """
    dbs = get_databases(request)
    count = _parse_limit(limit)
    name = _check_store(dbs, store)
    found = await dbs.conflicts(name, count)
    return JSONResponse({"conflicts": found}, headers={"Cache-Control": "no-store"})


class RecentConflicts:
    """The last few conflicts of every store, re-read at most every *ttl* seconds.

    A read is also started at once when this process resolved a new conflict
    (the reconcilers' counters moved). A caller waits at most *wait* seconds for
    a read under way and otherwise gets the previous list; the read goes on and
    the next call picks it up. So a fallback that is down costs the dashboard
    half a second every *ttl* seconds, never a timeout per poll.
    """

    def __init__(
        self, *, limit: int = DEFAULT_RECENT, ttl: float = DEFAULT_RECENT_TTL, wait: float = DEFAULT_RECENT_WAIT
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.ttl = ttl
        self.wait = wait
        self.items: list[dict[str, Any]] = []
        self._read_at: float | None = None
        self._seen_count: int | None = None
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def _count(dbs: Databases) -> int:
        return sum(s.reconciler.conflict_count for s in dbs.stores.values() if s.reconciler is not None)

    async def _refresh(self, dbs: Databases, count: int) -> None:
        try:
            self.items = await dbs.conflicts(None, self.limit)
            self._seen_count = count
        except Exception as exc:  # Databases.conflicts already skips unreadable stores; be safe anyway
            logger.warning("reading the recent conflicts failed: %s", type(exc).__name__)
        finally:
            self._read_at = time.monotonic()

    async def get(self, dbs: Databases) -> list[dict[str, Any]]:
        """The cached list, refreshed first when it is stale (waiting at most *wait* seconds)."""
        if not any(s.reconciler is not None for s in dbs.stores.values()):
            return []
        count = self._count(dbs)
        stale = self._read_at is None or time.monotonic() - self._read_at >= self.ttl or count != self._seen_count
        if stale and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._refresh(dbs, count))
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=self.wait)
        return list(self.items)

    @contextlib.asynccontextmanager
    async def running(self, dbs: Databases) -> AsyncIterator[None]:
        """A lifespan extension: a read still under way when the app stops is cancelled."""
        try:
            yield
        finally:
            await self.close()

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait([task])


def recent_conflicts(request: Request) -> RecentConflicts:
    """The app's :class:`RecentConflicts`, made on first use (drop-in apps need no setup)."""
    recent = getattr(request.app.state, STATE_RECENT, None)
    if recent is None:
        recent = RecentConflicts()
        setattr(request.app.state, STATE_RECENT, recent)
    return recent  # type: ignore[no-any-return]
