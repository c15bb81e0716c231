"""A cached psycopg connection per endpoint, for the library's own background work.

Reconcile and warm sync talk to both servers outside the routed pools (which follow the
switch). Each keeps one connection per endpoint, used by one task at a time, checked without
a round trip before use, and dropped on any failure so the next use reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from psycopg import AsyncConnection

from ...core.endpoint import Endpoint, Role
from .connection import _socket_alive

__all__ = ["EndpointConnections"]


class EndpointConnections:
    """One cached connection per endpoint role.

    Args:
        application_name: shown in ``pg_stat_activity`` on the servers.
        connect_timeout: seconds to open a connection.
        autocommit: the connections' mode.
        utc: set the session time zone to UTC (``to_jsonb`` of timestamps is then comparable
            between servers).
    """

    def __init__(self, application_name: str, *, connect_timeout: float, autocommit: bool = False, utc: bool = False) -> None:
        self.application_name = application_name
        self.connect_timeout = connect_timeout
        self.autocommit = autocommit
        self.utc = utc
        self._conns: dict[Role, AsyncConnection[Any]] = {}
        self._locks: dict[Role, asyncio.Lock] = {Role.PRIMARY: asyncio.Lock(), Role.FALLBACK: asyncio.Lock()}

    async def connect(self, endpoint: Endpoint, **kwargs: Any) -> AsyncConnection[Any]:
        """A new connection to *endpoint* with this cache's settings (*kwargs* override them)."""
        options: dict[str, Any] = {"autocommit": self.autocommit, **kwargs}
        async with asyncio.timeout(self.connect_timeout + 1):
            conn = await AsyncConnection.connect(
                endpoint.url,
                connect_timeout=max(2, int(round(self.connect_timeout))),
                application_name=self.application_name,
                **options,
            )
        if self.utc:
            await conn.execute("set timezone to 'UTC'")
            if not conn.autocommit:
                await conn.commit()
        return conn

    @contextlib.asynccontextmanager
    async def using(self, endpoint: Endpoint) -> AsyncIterator[AsyncConnection[Any]]:
        """The cached connection to *endpoint*, one task at a time; dropped on any failure."""
        async with self._locks[endpoint.role]:
            conn = self._conns.get(endpoint.role)
            if conn is not None and not _socket_alive(conn):
                await self._drop(endpoint.role)
                conn = None
            if conn is None:
                conn = await self.connect(endpoint)
                self._conns[endpoint.role] = conn
            try:
                yield conn
            except BaseException:
                await self._drop(endpoint.role)
                raise

    async def _drop(self, role: Role) -> None:
        conn = self._conns.pop(role, None)
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        """Close every cached connection."""
        for role in list(self._conns):
            await self._drop(role)
