"""psycopg pools per endpoint: acquisition, probes, error kinds, and cutting a statement at its deadline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

import psycopg
import psycopg_pool
from psycopg import AsyncConnection

from ...core.attempt import attempt_deadline, current_attempt
from ...core.endpoint import Endpoint, Role
from ...core.routing import NotSent
from ...core.store import Backend, ErrorKind
from .connection import FailoverConnection, _socket_alive

__all__ = ["PostgresBackend"]

logger = logging.getLogger("failover.postgres")

# Time kept from an attempt's deadline for the statement itself after acquisition.
_SEND_MARGIN = 0.05

# SQLSTATE classes/codes that mean "this connection or server is gone".
_CONNECTION_SQLSTATES = ("08", "57P01", "57P02", "57P03")
_READ_ONLY_SQLSTATE = "25006"

_PROBE_SQL = (
    "select pg_is_in_recovery(), current_setting('transaction_read_only'), "
    "current_setting('default_transaction_read_only')"
)



class _RolledBack(NotSent):
    """Internal: the connection failed before COMMIT was sent, so nothing was committed."""


class PostgresBackend(Backend[psycopg_pool.AsyncConnectionPool]):
    """psycopg pools, probes and error classification for the failover core."""

    store = "postgres"

    def __init__(self, *, pool_min_size: int = 1, pool_max_size: int = 10, connect_timeout: float = 2.0) -> None:
        if pool_max_size < max(pool_min_size, 1):
            raise ValueError("pool_max_size must be greater or equal than pool_min_size")
        self.pool_min_size = pool_min_size
        self.pool_max_size = pool_max_size
        self.connect_timeout = connect_timeout
        self._pools: dict[Role, psycopg_pool.AsyncConnectionPool] = {}
        self._locks: dict[Role, asyncio.Lock] = {}

    def _connect_kwargs(self) -> dict[str, Any]:
        # libpq wants whole seconds and at least 2.
        return {"connect_timeout": max(2, int(round(self.connect_timeout))), "application_name": "failover"}

    async def open(self, endpoint: Endpoint) -> None:
        self._locks.setdefault(endpoint.role, asyncio.Lock())

    async def _connect(self, endpoint: Endpoint, **kwargs: Any) -> AsyncConnection[Any]:
        async with asyncio.timeout(self.connect_timeout):
            return await AsyncConnection.connect(endpoint.url, **self._connect_kwargs(), **kwargs)

    async def connect(self, endpoint: Endpoint, **kwargs: Any) -> FailoverConnection:
        """A new, unpooled :class:`FailoverConnection` to *endpoint* (SQLAlchemy's pool uses this).

        Raises :class:`~failover.core.routing.NotSent` when the server cannot be reached, so
        the router tries the other endpoint.
        """
        try:
            async with asyncio.timeout(self.connect_timeout):
                conn = await FailoverConnection.connect(endpoint.url, **self._connect_kwargs(), **kwargs)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise NotSent(f"cannot connect: {exc}") from exc
        conn.endpoint = endpoint
        return conn

    async def pool(self, endpoint: Endpoint) -> psycopg_pool.AsyncConnectionPool:
        """The pool of *endpoint*, created on first use.

        A new pool is created only after a direct connection succeeded, so a
        request never waits a whole pool timeout on a server that refuses.
        """
        pool = self._pools.get(endpoint.role)
        if pool is not None:
            return pool
        async with self._locks.setdefault(endpoint.role, asyncio.Lock()):
            pool = self._pools.get(endpoint.role)
            if pool is not None:
                return pool
            try:
                conn = await self._connect(endpoint)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                raise NotSent(f"cannot connect: {exc}") from exc
            await conn.close()
            pool = psycopg_pool.AsyncConnectionPool(
                endpoint.url,
                min_size=self.pool_min_size,
                max_size=self.pool_max_size,
                kwargs=self._connect_kwargs(),
                connection_class=FailoverConnection,
                configure=_EndpointTag(endpoint),
                open=False,
                name=f"failover-{endpoint.store}-{endpoint.role}",
                timeout=30.0,
                reconnect_timeout=60.0,
            )
            await pool.open(wait=False)
            self._pools[endpoint.role] = pool
            return pool

    async def warm(self, endpoint: Endpoint, timeout: float) -> None:
        pool = await self.pool(endpoint)
        if self.pool_min_size:
            await pool.wait(timeout=timeout)

    async def drain(self, endpoint: Endpoint) -> None:
        pool = self._pools.pop(endpoint.role, None)
        if pool is not None:
            logger.info("draining the pool of %s", endpoint.name)
            await pool.close(timeout=1.0)

    async def close(self, endpoint: Endpoint) -> None:
        await self.drain(endpoint)

    async def probe(self, endpoint: Endpoint) -> bool:
        ends = attempt_deadline() or (time.monotonic() + self.connect_timeout)
        async with asyncio.timeout(max(0.001, ends - time.monotonic())):
            conn = await AsyncConnection.connect(endpoint.url, autocommit=True, **self._connect_kwargs())
        deadline = _Deadline(conn) if current_attempt() else _Deadline(conn, ends - time.monotonic())
        try:
            cur = await conn.execute(_PROBE_SQL)
            row = await cur.fetchone()
        except (psycopg.Error, OSError) as exc:
            if deadline.fired:
                raise TimeoutError("the probe query got no answer in time") from exc
            raise
        finally:
            deadline.cancel()
            await conn.close()
        assert row is not None
        in_recovery, read_only, default_read_only = row
        return not in_recovery and read_only == "off" and default_read_only == "off"

    def classify(self, exc: BaseException) -> ErrorKind:
        if isinstance(exc, (NotSent, psycopg_pool.PoolClosed)):
            return ErrorKind.NOT_SENT
        if isinstance(exc, psycopg_pool.PoolTimeout):
            return ErrorKind.BUSY  # every connection busy: load, or a hung server holding them
        if isinstance(exc, psycopg.Error):
            sqlstate = exc.sqlstate
            if sqlstate == _READ_ONLY_SQLSTATE:
                return ErrorKind.NOT_SENT  # refused before anything was applied; the server is not writable
            if sqlstate is None and isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
                return ErrorKind.OUTCOME_UNKNOWN
            if sqlstate is not None and sqlstate.startswith(_CONNECTION_SQLSTATES):
                return ErrorKind.OUTCOME_UNKNOWN
            return ErrorKind.APPLICATION
        if isinstance(exc, (OSError, ConnectionError)):
            return ErrorKind.OUTCOME_UNKNOWN
        return ErrorKind.APPLICATION

    # --- acquisition ----------------------------------------------------------------------

    async def acquire(
        self, endpoint: Endpoint, timeout: float, probe_timeout: float
    ) -> tuple[AsyncConnection[Any], psycopg_pool.AsyncConnectionPool]:
        """A live connection of *endpoint*'s pool; raises ``NotSent`` when there is none.

        Bounded by the routed attempt's deadline (less a margin for the statement),
        so a slow acquisition is reported as *not sent*, never as a timed-out statement.
        """
        deadline = min(time.monotonic() + timeout, attempt_deadline() or float("inf")) - _SEND_MARGIN
        checked = False
        for _ in range(self.pool_max_size + 1):
            pool = self._pools.get(endpoint.role)  # the hot path: no timer needed
            if pool is None:
                try:
                    async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                        pool = await self.pool(endpoint)
                except TimeoutError as exc:
                    raise NotSent("timed out connecting") from exc
            try:
                conn = await pool.getconn(timeout=max(0.001, deadline - time.monotonic()))
            except psycopg_pool.PoolTimeout as exc:
                if pool.get_stats().get("pool_size", 0) > 0:
                    raise  # saturated by live traffic, not down: the caller's problem, not a failover
                raise NotSent("the pool could not open a connection in time") from exc
            except psycopg_pool.PoolClosed as exc:  # drained by a switch in the meantime
                raise NotSent("the pool was drained by a switch") from exc
            if _socket_alive(conn):
                return conn, pool
            await pool.putconn(conn)  # broken: the pool discards it
            if checked:
                continue
            try:
                async with asyncio.timeout(max(0.001, min(probe_timeout, deadline - time.monotonic()))):
                    writable = await self.probe(endpoint)
            except Exception as exc:
                raise NotSent(f"pooled connection was dead and the server does not answer: {exc}") from exc
            if not writable:
                raise NotSent("pooled connection was dead and the server is read-only now")
            # The server is up (it restarted): its other idle connections are dead too.
            # Have the pool weed them out in one pass instead of probing once per connection.
            checked = True
            with contextlib.suppress(Exception):
                async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                    await pool.check()
        raise NotSent("every pooled connection was dead")

    def stats(self) -> dict[str, dict[str, int]]:
        return {str(role): pool.get_stats() for role, pool in self._pools.items()}


class _EndpointTag:
    """Pool ``configure`` callback: tag each new connection with its endpoint."""

    __slots__ = ("endpoint",)

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def __call__(self, conn: AsyncConnection[Any]) -> None:
        if isinstance(conn, FailoverConnection):
            conn.endpoint = self.endpoint


class _Deadline:
    """Cut a connection's socket when its time is up.

    Cancelling a psycopg query makes psycopg try to cancel it on the server and
    wait for that (up to 10 s on a hung server). Shutting the socket down
    instead makes the pending read fail at once, and the connection is then
    known to be unusable. Inside a routed attempt the attempt's own timer does
    the cutting (one timer per operation); elsewhere (a ``connection()`` block)
    this arms a timer of its own.
    """

    __slots__ = ("conn", "fired", "_cancel")

    def __init__(self, conn: AsyncConnection[Any], seconds: float | None = None) -> None:
        self.conn = conn
        self.fired = False
        attempt = current_attempt() if seconds is None else None
        if attempt is not None:
            self._cancel = attempt.on_deadline(self._fire)
        elif seconds is not None:
            self._cancel = asyncio.get_running_loop().call_later(max(0.0, seconds), self._fire).cancel
        else:
            self._cancel = _nothing

    def _fire(self) -> None:
        self.fired = True
        try:
            fd = self.conn.pgconn.socket
            sock = socket.socket(fileno=os.dup(fd))
        except (psycopg.Error, OSError, ValueError):
            return
        with sock:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._cancel()


def _nothing() -> None:
    pass

