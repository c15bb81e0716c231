"""PostgreSQL through psycopg 3 and psycopg_pool, with a pool per endpoint.

Routing rules:

* acquiring a connection never sends a statement, so an acquisition that fails
  (refused, pool cannot connect, a pooled socket found dead) is retried on the
  other endpoint;
* a pooled connection is checked without a round trip before it is handed out:
  if its socket already saw the server hang up, the server is probed and, when
  it is down, the breaker trips and the request goes to the fallback;
* PostgreSQL commits nothing without a ``COMMIT``. A connection failure (or a
  reply that ends the session, SQLSTATE class 57) *before* the ``COMMIT`` was
  sent means the transaction was rolled back: a ``connection()`` block raises
  :class:`~failover.errors.TransactionRolledBack`, and a one-statement helper
  (``execute``/``fetch``/``fetchone``) runs its statement again on the other
  endpoint. Only a failure *while committing* leaves the outcome unknown
  (:class:`~failover.errors.OutcomeUnknown`); nothing is re-executed then.
  Connections are :class:`FailoverConnection` objects, which count the
  ``COMMIT`` statements they send, so "was COMMIT sent?" has an exact answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import socket
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
import psycopg_pool
from psycopg import AsyncConnection, AsyncCursor

from ..core.endpoint import Endpoint, Role
from ..core.sockets import hung_up_or_pending
from ..core.attempt import attempt_deadline, current_attempt
from ..core.clock import Clock
from ..core.events import EventBus
from ..core.store import Backend, ErrorKind, FailoverStore, StoreOptions
from ..errors import TransactionRolledBack

__all__ = ["FailoverConnection", "PostgresBackend", "PostgresStore", "create"]

logger = logging.getLogger("failover.postgres")

# Time kept from an attempt's deadline for the statement itself after acquisition.
_SEND_MARGIN = 0.05
# Statements that only read, so retrying them on the other endpoint is harmless.
_READ_ONLY_SQL = re.compile(r"^\s*(select|show|values|table|explain)\b", re.IGNORECASE)

# SQLSTATE classes/codes that mean "this connection or server is gone".
_CONNECTION_SQLSTATES = ("08", "57P01", "57P02", "57P03")
_READ_ONLY_SQLSTATE = "25006"
# The server rolled the transaction back and says running it again may succeed.
_REPLAY_SQLSTATES = ("40001", "40P01")  # serialization_failure, deadlock_detected

DEFAULT_TRANSACTION_ATTEMPTS = 10
"""Most runs of one transaction by ``run_transaction`` (all within the operation timeout)."""
DEFAULT_BACKOFF_BASE = 0.01
"""Seconds: the cap of the first pause between runs; it doubles at each run (full jitter)."""
DEFAULT_BACKOFF_CAP = 0.5
"""Seconds: the longest pause between two runs."""
_MIN_ATTEMPT = 0.05  # an attempt with less time left than this is not started

# A statement that may end the transaction with a commit (at the start of the text or after a ';').
_ENDS_TRANSACTION = re.compile(r"\s*(?:commit|end|prepare\s+transaction)\b", re.IGNORECASE)
_IDLE = psycopg.pq.TransactionStatus.IDLE

P = ParamSpec("P")
T = TypeVar("T")

_PROBE_SQL = (
    "select pg_is_in_recovery(), current_setting('transaction_read_only'), "
    "current_setting('default_transaction_read_only')"
)


class _NotSent(Exception):
    """Internal: acquisition failed before any statement was sent."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.__cause__ = cause


class _RolledBack(_NotSent):
    """Internal: the connection failed before COMMIT was sent, so nothing was committed."""


class FailoverConnection(AsyncConnection[Any]):
    """A psycopg ``AsyncConnection`` that knows whether it may have committed.

    Every connection failover hands out is one. It counts what it sends that may
    commit: :meth:`commit`, the exit of an outermost :meth:`transaction` block,
    ``tpc_prepare``/``tpc_commit``, a ``COMMIT``/``END``/``PREPARE TRANSACTION``
    statement, any statement in autocommit mode, and a server warning that a
    transaction "has already committed locally" (a synchronous-replication wait
    cut short). A connection failure is then classified exactly: if nothing that
    may commit was sent since the transaction began, it was rolled back.

    Attributes:
        commits_sent: things that may have committed, sent over the connection's life.
        transaction_commits: the value of ``commits_sent`` when the current
            transaction began; differs from it once its ``COMMIT`` was sent.
        block_commits: the value of ``commits_sent`` when failover handed the
            connection out (start of a ``connection()`` block).
        endpoint: the endpoint this connection goes to.
    """

    commits_sent: int = 0
    ended_by_server: bool = False
    """The server announced it is ending the session (a FATAL message received while idle)."""
    transaction_commits: int = 0
    block_commits: int = 0
    endpoint: Endpoint | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursor_factory = _TrackedCursor
        ref = weakref.ref(self)  # a bound method would make a reference cycle
        self.add_notice_handler(lambda diag: _on_notice(ref, diag))

    @property
    def commit_sent(self) -> bool:
        """Whether the current transaction's ``COMMIT`` (or something that may commit) was sent."""
        return self.commits_sent != self.transaction_commits

    def _may_commit(self) -> None:
        self.commits_sent += 1

    def _note_statement(self, query: Any) -> None:
        if self.autocommit:  # the statement is a transaction of its own
            self.transaction_commits = self.commits_sent
            self.commits_sent += 1
            return
        if self.pgconn.transaction_status == _IDLE:
            self.transaction_commits = self.commits_sent  # psycopg is about to send BEGIN
        if _ends_transaction(query, self):
            self.commits_sent += 1

    async def commit(self) -> None:
        if self.pgconn.transaction_status != _IDLE:
            if not _socket_alive(self) or self.ended_by_server:
                # The server spoke while the transaction waited for us: a backend ending the
                # session (57P01 after a postmaster crash) or a reset. COMMIT never left.
                raise psycopg.OperationalError("the server closed the connection before COMMIT was sent")
            self.commits_sent += 1
        await super().commit()

    async def tpc_prepare(self) -> None:
        self.commits_sent += 1
        await super().tpc_prepare()

    async def tpc_commit(self, xid: Any = None) -> None:
        self.commits_sent += 1
        await super().tpc_commit(xid)

    @asynccontextmanager
    async def transaction(self, savepoint_name: str | None = None, force_rollback: bool = False) -> AsyncIterator[Any]:
        outermost = self.pgconn.transaction_status == _IDLE
        if outermost:
            self.transaction_commits = self.commits_sent
        async with super().transaction(savepoint_name, force_rollback) as tx:
            yield tx
            if outermost and not force_rollback:
                self.commits_sent += 1  # leaving the block sends COMMIT


class _TrackedCursor(AsyncCursor[Any]):
    """The cursor of :class:`FailoverConnection`: tells it about every statement sent."""

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        _note(self._conn, query)
        return await super().execute(query, params, **kwargs)

    async def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:
        _note(self._conn, query)
        await super().executemany(query, params_seq, **kwargs)

    async def stream(self, query: Any, params: Any = None, **kwargs: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        _note(self._conn, query)
        async for row in super().stream(query, params, **kwargs):
            yield row


def _note(conn: Any, query: Any) -> None:
    if isinstance(conn, FailoverConnection):
        conn._note_statement(query)


def _ends_transaction(query: Any, conn: AsyncConnection[Any]) -> bool:
    if isinstance(query, str):
        text = query
    elif isinstance(query, bytes | bytearray | memoryview):
        text = bytes(query).decode("utf-8", "replace")
    else:
        try:
            text = query.as_string(conn)
        except Exception:
            return True  # cannot tell: assume the worst
    if _ENDS_TRANSACTION.match(text):
        return True
    # Only a multi-statement string can hide one further on (the common case has no ';').
    return ";" in text and any(_ENDS_TRANSACTION.match(part) for part in text.split(";")[1:])


def _on_notice(ref: weakref.ReferenceType[FailoverConnection], diag: psycopg.errors.Diagnostic) -> None:
    # PostgreSQL's sync-replication wait, cut short by a cancel or a shutdown, warns
    # "The transaction has already committed locally, but might not have been replicated
    # to the standby" (sqlstate 57P01 when terminating). Whatever failure follows, the
    # outcome is unknown, never "rolled back".
    # A FATAL error that arrives while the connection is idle (libpq hands it to the notice
    # handler) is the server saying goodbye: COMMIT must not be sent as if nothing happened.
    detail = diag.message_detail or ""
    severity = diag.severity_nonlocalized
    conn = ref()
    if conn is None:
        return
    if severity in ("FATAL", "PANIC"):
        conn.ended_by_server = True
    elif severity == "WARNING" and ((diag.sqlstate or "").startswith("57") or "committed locally" in detail):
        conn.commits_sent += 1


def may_have_committed(conn: AsyncConnection[Any], since: int | None = None) -> bool:
    """Whether *conn* sent anything that may have committed since *since*
    (default: since its current transaction began). True for a foreign connection."""
    if not isinstance(conn, FailoverConnection):
        return True
    start = conn.transaction_commits if since is None else since
    return conn.commits_sent != start


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

        Raises the internal not-sent error when the server cannot be reached, so
        the router tries the other endpoint.
        """
        try:
            async with asyncio.timeout(self.connect_timeout):
                conn = await FailoverConnection.connect(endpoint.url, **self._connect_kwargs(), **kwargs)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise _NotSent(f"cannot connect: {exc}", exc) from exc
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
                raise _NotSent(f"cannot connect: {exc}", exc) from exc
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
        if isinstance(exc, (_NotSent, psycopg_pool.PoolClosed)):
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
        """A live connection of *endpoint*'s pool; raises ``_NotSent`` when there is none.

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
                    raise _NotSent("timed out connecting", exc) from exc
            try:
                conn = await pool.getconn(timeout=max(0.001, deadline - time.monotonic()))
            except psycopg_pool.PoolTimeout as exc:
                if pool.get_stats().get("pool_size", 0) > 0:
                    raise  # saturated by live traffic, not down: the caller's problem, not a failover
                raise _NotSent("the pool could not open a connection in time", exc) from exc
            except psycopg_pool.PoolClosed as exc:  # drained by a switch in the meantime
                raise _NotSent("the pool was drained by a switch", exc) from exc
            if _socket_alive(conn):
                return conn, pool
            await pool.putconn(conn)  # broken: the pool discards it
            if checked:
                continue
            try:
                async with asyncio.timeout(max(0.001, min(probe_timeout, deadline - time.monotonic()))):
                    writable = await self.probe(endpoint)
            except Exception as exc:
                raise _NotSent(f"pooled connection was dead and the server does not answer: {exc}", exc) from exc
            if not writable:
                raise _NotSent("pooled connection was dead and the server is read-only now")
            # The server is up (it restarted): its other idle connections are dead too.
            # Have the pool weed them out in one pass instead of probing once per connection.
            checked = True
            with contextlib.suppress(Exception):
                async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                    await pool.check()
        raise _NotSent("every pooled connection was dead")

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


def _sqlalchemy_integration() -> Any:
    try:
        from . import postgres_sqlalchemy
    except ImportError as exc:
        raise ImportError("the SQLAlchemy integration needs SQLAlchemy: pip install 'failover[sqlalchemy]'") from exc
    return postgres_sqlalchemy


def _committed_before(conn: AsyncConnection[Any]) -> bool:
    """Whether a transaction committed on *conn* since failover handed it out, before the current one."""
    if not isinstance(conn, FailoverConnection):
        return True
    return conn.transaction_commits != conn.block_commits


class _Runs:
    """The runs of one transaction: bounded in number and by a deadline, with jittered backoff."""

    __slots__ = ("attempts", "deadline", "number")

    def __init__(self, budget: float, attempts: int = DEFAULT_TRANSACTION_ATTEMPTS) -> None:
        self.deadline = time.monotonic() + budget
        self.attempts = attempts
        self.number = 1  # the run under way

    def remaining(self) -> float:
        return max(0.001, self.deadline - time.monotonic())

    async def another(self) -> bool:
        """Pause before the next run; False when no run or not enough time is left."""
        if self.number >= self.attempts:
            return False
        # "Full jitter": contenders that failed together do not retry together.
        pause = random.uniform(0.0, min(DEFAULT_BACKOFF_CAP, DEFAULT_BACKOFF_BASE * 2 ** (self.number - 1)))
        if self.deadline - time.monotonic() - pause < _MIN_ATTEMPT:
            return False
        await asyncio.sleep(pause)
        self.number += 1
        return True


def _idempotent(query: Any, declared: bool | None) -> bool:
    if declared is not None:
        return declared
    return isinstance(query, str) and bool(_READ_ONLY_SQL.match(query))


def _socket_alive(conn: AsyncConnection[Any]) -> bool:
    """True unless the connection's socket already saw the server hang up.

    Costs no round trip: a socket with nothing to read is taken as alive; one
    that is readable while idle is consumed, which fails on EOF/reset.
    """
    if conn.closed or conn.broken:
        return False
    try:
        if not hung_up_or_pending(conn.pgconn.socket):
            return True
        conn.pgconn.consume_input()
    except (psycopg.Error, OSError, ValueError):
        return False
    return conn.pgconn.status == psycopg.pq.ConnStatus.OK


class PostgresStore:
    """The PostgreSQL side of :class:`~failover.Databases` (``dbs.postgres``).

    Use :meth:`connection` for transactions, or the one-statement helpers
    :meth:`execute`, :meth:`fetch` and :meth:`fetchone`.
    """

    def __init__(self, store: FailoverStore[Any], backend: PostgresBackend) -> None:
        self.failover = store
        self.backend = backend

    async def _lease(self, budget: float) -> tuple[AsyncConnection[Any], psycopg_pool.AsyncConnectionPool, Endpoint]:
        store = self.failover

        async def acquire(endpoint: Endpoint) -> tuple[AsyncConnection[Any], psycopg_pool.AsyncConnectionPool, Endpoint]:
            conn, pool = await self.backend.acquire(endpoint, budget, store.options.probe_timeout)
            return conn, pool, endpoint

        # Acquiring sends no statement, so it is always safe to retry elsewhere. The block was
        # admitted by connection() already (a reconcile hold waits for it as a whole).
        return await store.run(acquire, idempotent=True, timeout=budget, label="connection acquire", gated=False)

    @asynccontextmanager
    async def connection(self, *, timeout: float | None = None) -> AsyncIterator[AsyncConnection[Any]]:
        """A psycopg ``AsyncConnection`` on the active endpoint, in a transaction.

        On normal exit the transaction is committed, on an exception rolled back,
        like ``psycopg_pool``'s ``connection()``. The whole block, acquisition
        included, is bounded by *timeout* (default ``FAILOVER_OPERATION_TIMEOUT``).

        Raises:
            NoEndpointAvailable: no endpoint could give a connection.
            TransactionRolledBack: the connection failed (or the server ended the
                session) before ``COMMIT`` was sent; nothing was committed and
                the block may run again (:meth:`run_transaction` does that).
            OutcomeUnknown: the connection failed while committing (or after the
                block committed by itself); it may or may not have been committed.
            OperationTimeout: the block ran past its deadline.
        """
        budget = self.failover.options.operation_timeout if timeout is None else timeout
        started = time.monotonic()
        async with self.failover.admission.admitted(started + budget):
            async with self._connection_block(budget, started) as conn:
                yield conn

    @asynccontextmanager
    async def _connection_block(self, budget: float, started: float) -> AsyncIterator[AsyncConnection[Any]]:
        conn, pool, endpoint = await self._lease(budget)
        deadline = _Deadline(conn, budget - (time.monotonic() - started))
        block_commits = conn.block_commits = conn.commits_sent if isinstance(conn, FailoverConnection) else 0
        healthy_exit = False
        try:
            try:
                yield conn
                await conn.commit()
                healthy_exit = True
            except BaseException:
                if not conn.broken and not conn.closed and not deadline.fired:
                    # A failed rollback leaves the connection to be closed below; a
                    # cancellation during it propagates (it is never swallowed).
                    with contextlib.suppress(Exception):
                        await conn.rollback()
                        healthy_exit = True
                raise
        except (psycopg.Error, OSError) as exc:
            if deadline.fired:
                raise self.failover.lost_during(endpoint, TimeoutError(), "transaction") from exc
            store = self.failover

            def rolled_back(reason: str) -> TransactionRolledBack:
                return TransactionRolledBack(
                    f"{store.name}: connection to {endpoint.name} failed before COMMIT was sent; "
                    f"the transaction was rolled back and can be run again ({reason})",
                    store=store.name,
                    endpoint=endpoint.name,
                )

            # The decision table: a connection lost before COMMIT was sent applied nothing.
            mapped = store.lost_during(
                endpoint, exc, "transaction", maybe_sent=may_have_committed(conn, block_commits), not_applied=rolled_back
            )
            if mapped is exc:
                raise
            raise mapped from exc
        finally:
            deadline.cancel()
            if not healthy_exit and not conn.closed:
                await conn.close()  # never hand a connection in an unknown state back to the pool
            await pool.putconn(conn)
        self.failover.health[endpoint.role].record_operation_success()

    async def _statement(self, query: Any, params: Sequence[Any] | dict[str, Any] | None, fetch: str, idempotent: bool, timeout: float | None) -> Any:
        store = self.failover
        budget = store.options.operation_timeout if timeout is None else timeout

        async def run(endpoint: Endpoint) -> Any:
            conn, pool = await self.backend.acquire(endpoint, budget, store.options.probe_timeout)
            deadline = _Deadline(conn)  # cut by the attempt's clock at its deadline

            ok = committing = False
            since = conn.commits_sent if isinstance(conn, FailoverConnection) else 0
            try:
                cur = await conn.execute(query, params)
                if fetch == "all":
                    result: Any = await cur.fetchall()
                elif fetch == "one":
                    result = await cur.fetchone()
                else:
                    result = cur.rowcount
                committing = True
                await conn.commit()
                ok = True
                return result
            except (psycopg.Error, OSError) as exc:
                if deadline.fired:
                    raise TimeoutError("the statement ran past its deadline") from exc
                if (
                    not committing
                    and not may_have_committed(conn, since)
                    and self.backend.classify(exc) is ErrorKind.OUTCOME_UNKNOWN
                ):
                    # Lost (or told the session is over, class 57) before COMMIT: rolled back,
                    # so running it on the other endpoint cannot apply it twice.
                    raise _RolledBack(f"rolled back, COMMIT was never sent: {exc}", exc) from exc
                raise
            finally:
                deadline.cancel()
                if not ok and not conn.closed:
                    if conn.broken or deadline.fired:
                        await conn.close()
                    else:
                        try:
                            await conn.rollback()
                        except BaseException as rollback_error:
                            await conn.close()
                            if not isinstance(rollback_error, Exception):  # cancelled while rolling back
                                await pool.putconn(conn)
                                raise
                await pool.putconn(conn)

        return await store.run(run, idempotent=idempotent, timeout=budget, label="statement")

    async def execute(
        self,
        query: Any,
        params: Sequence[Any] | dict[str, Any] | None = None,
        *,
        idempotent: bool = False,
        timeout: float | None = None,
    ) -> int:
        """Run one statement in its own transaction; return the row count.

        A connection failure before the statement's ``COMMIT`` was sent (its
        transaction rolled back) sends it to the other endpoint. Pass
        ``idempotent=True`` when running it twice is harmless (an UPSERT to a fixed
        value), so that even a failure while committing is retried there.
        """
        return int(await self._statement(query, params, "none", idempotent, timeout))

    async def fetch(
        self,
        query: Any,
        params: Sequence[Any] | dict[str, Any] | None = None,
        *,
        idempotent: bool | None = None,
        timeout: float | None = None,
    ) -> list[Any]:
        """Run one statement in its own transaction and return every row.

        *idempotent* defaults to True for statements that only read (``SELECT``,
        ``SHOW``, ``VALUES``, ``TABLE``, ``EXPLAIN``), which are then retried on the
        other endpoint after any connection failure; an ``INSERT ... RETURNING`` only
        when its transaction was rolled back (the failure came before ``COMMIT``).
        """
        return list(await self._statement(query, params, "all", _idempotent(query, idempotent), timeout))

    async def fetchone(
        self,
        query: Any,
        params: Sequence[Any] | dict[str, Any] | None = None,
        *,
        idempotent: bool | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Like :meth:`fetch`, returning the first row or None."""
        return await self._statement(query, params, "one", _idempotent(query, idempotent), timeout)

    async def run_transaction(
        self,
        fn: Callable[Concatenate[AsyncConnection[Any], P], Awaitable[T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``await fn(conn, *args, **kwargs)`` in a transaction; run it again when that is safe.

        The transaction runs on the active endpoint and commits when *fn* returns.
        It runs again, on whichever endpoint is active by then, when it was
        rolled back: a connection failure before ``COMMIT`` was sent
        (:class:`~failover.errors.TransactionRolledBack`), a serialization failure
        (``40001``) or a deadlock (``40P01``). At most
        :data:`DEFAULT_TRANSACTION_ATTEMPTS` runs, all within
        ``FAILOVER_OPERATION_TIMEOUT``, with a jittered, doubling pause between them.
        *fn* never runs again once ``COMMIT`` was sent: a failure then raises
        :class:`~failover.errors.OutcomeUnknown`. *fn* must not commit by itself
        (nor have effects outside the database that must not happen twice).

        Returns *fn*'s result. Raises the last error when no run succeeded.
        """
        runs = _Runs(self.failover.options.operation_timeout)
        while True:
            conn: AsyncConnection[Any] | None = None
            try:
                async with self.connection(timeout=runs.remaining()) as conn:
                    return await fn(conn, *args, **kwargs)
            except TransactionRolledBack as exc:
                error: BaseException = exc
            except psycopg.Error as exc:
                # The server answered: this transaction was rolled back. Safe to run again
                # unless fn committed an earlier transaction of its own on this connection.
                if exc.sqlstate not in _REPLAY_SQLSTATES or conn is None or _committed_before(conn):
                    raise
                error = exc
            if not await runs.another():
                raise error
            logger.info("running the transaction again (run %d of at most %d) after %s", runs.number, runs.attempts, type(error).__name__)

    def sqlalchemy_engine(self, **engine_kwargs: Any) -> Any:
        """An SQLAlchemy ``AsyncEngine`` (``postgresql+psycopg``) on the active endpoint.

        Needs ``pip install failover[sqlalchemy]``. Its pool gets its connections
        from the active endpoint, drops them when the store switches, and its
        disconnects feed the breaker. *engine_kwargs* go to
        ``create_async_engine`` (``pool_size``, ``echo``, ...). See
        :mod:`failover.stores.postgres_sqlalchemy`.
        """
        return _sqlalchemy_integration().create_engine(self, **engine_kwargs)

    async def run_session_transaction(
        self,
        session_factory: Callable[[], Any],
        fn: Callable[[Any], Awaitable[T]],
        *,
        idempotent: bool = False,
        timeout: float | None = None,
    ) -> T:
        """:meth:`run_transaction` for SQLAlchemy: ``await fn(session)`` inside ``session.begin()``.

        *session_factory* is an ``async_sessionmaker`` bound to :meth:`sqlalchemy_engine`'s
        engine; each run gets a new session. Runs again when the transaction was
        rolled back (connection lost before ``COMMIT``, ``40001``, ``40P01``); with
        ``idempotent=True`` also after a failure while committing (when *fn*
        writes only rows whose keys it chose beforehand, e.g. with ``session.merge``).
        Returns *fn*'s result.
        """
        return await _sqlalchemy_integration().run_session_transaction(
            self, session_factory, fn, idempotent=idempotent, timeout=timeout
        )

    @property
    def active_endpoint(self) -> Endpoint | None:
        """The endpoint serving traffic now (see :attr:`FailoverStore.active_endpoint`)."""
        return self.failover.active_endpoint

    def status(self) -> dict[str, Any]:
        return self.failover.status()


def create(
    settings: Any, endpoints: list[Endpoint], options: StoreOptions, bus: EventBus, clock: Clock
) -> PostgresStore:
    """Build the PostgreSQL store for :class:`~failover.Databases`."""
    backend = PostgresBackend(
        pool_min_size=settings.pool_min_size,
        pool_max_size=settings.pool_max_size,
        connect_timeout=settings.connect_timeout,
    )
    capture = None
    if options.reconcile and len(endpoints) == 2:
        from .postgres_capture import PostgresCapture

        capture = PostgresCapture(tables=settings.protected_tables(), connect_timeout=settings.connect_timeout)
    warm = None
    if getattr(settings, "warm", False) and len(endpoints) == 2:
        from .postgres_warm import PostgresWarmSync

        warm = PostgresWarmSync(tables=settings.protected_tables(), connect_timeout=settings.connect_timeout)
    return PostgresStore(
        FailoverStore(backend, endpoints, options, bus=bus, clock=clock, capture=capture, warm=warm), backend
    )
