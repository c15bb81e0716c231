"""``dbs.postgres``: connection blocks, one-statement helpers and transactions run again when safe."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
import psycopg_pool
from psycopg import AsyncConnection

from ...core.endpoint import Endpoint
from ...core.store import ErrorKind, FailoverStore
from ...errors import TransactionRolledBack
from .backend import PostgresBackend, _Deadline, _RolledBack
from .connection import FailoverConnection, _committed_before, may_have_committed

__all__ = ["PostgresStore"]

logger = logging.getLogger("failover.postgres")

# Statements that only read, so retrying them on the other endpoint is harmless.
_READ_ONLY_SQL = re.compile(r"^\s*(select|show|values|table|explain)\b", re.IGNORECASE)
# The server rolled the transaction back and says running it again may succeed.
_REPLAY_SQLSTATES = ("40001", "40P01")  # serialization_failure, deadlock_detected

DEFAULT_TRANSACTION_ATTEMPTS = 10
"""Most runs of one transaction by ``run_transaction`` (all within the operation timeout)."""
DEFAULT_BACKOFF_BASE = 0.01
"""Seconds: the cap of the first pause between runs; it doubles at each run (full jitter)."""
DEFAULT_BACKOFF_CAP = 0.5
"""Seconds: the longest pause between two runs."""
_MIN_ATTEMPT = 0.05  # an attempt with less time left than this is not started

P = ParamSpec("P")
T = TypeVar("T")


def _sqlalchemy_integration() -> Any:
    try:
        from . import sqlalchemy as integration
    except ImportError as exc:
        raise ImportError("the SQLAlchemy integration needs SQLAlchemy: pip install 'failover[sqlalchemy]'") from exc
    return integration



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
        # Every leased connection is a FailoverConnection (the pool's connection_class); any other gets the attribute ad hoc.
        block_commits = conn.block_commits = conn.commits_sent if isinstance(conn, FailoverConnection) else 0  # type: ignore[attr-defined]
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
        self.failover.record_success(endpoint.role)

    def _statement(
        self, query: Any, params: Sequence[Any] | dict[str, Any] | None, fetch: str, idempotent: bool, timeout: float | None
    ) -> Awaitable[Any]:
        # Not a coroutine itself: the caller awaits the router's, one frame fewer to resume at
        # every round trip of the statement.
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
                if isinstance(conn, FailoverConnection):
                    await conn.commit_after_reply()
                else:
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
                    raise _RolledBack(f"rolled back, COMMIT was never sent: {exc}") from exc
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

        return store.run(run, idempotent=idempotent, timeout=budget, label="statement")

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

    def sqlalchemy_engine(self, *, hold_for_reconcile: bool = True, **engine_kwargs: Any) -> Any:
        """An SQLAlchemy ``AsyncEngine`` (``postgresql+psycopg``) on the active endpoint.

        Needs ``pip install failover[sqlalchemy]``. Its pool gets its connections
        from the active endpoint, drops them when the store switches, and its
        disconnects feed the breaker. A checked-out connection counts as an
        operation in flight for a reconcile's write hold; pass
        ``hold_for_reconcile=False`` for an engine whose connections stay checked
        out for long (a ``LISTEN`` loop), which would keep failback waiting.
        *engine_kwargs* go to ``create_async_engine`` (``pool_size``, ``echo``,
        ...). See :mod:`failover.stores.postgres.sqlalchemy`.
        """
        return _sqlalchemy_integration().create_engine(self, hold_for_reconcile=hold_for_reconcile, **engine_kwargs)

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
