"""SQLAlchemy 2 (asyncio) on the failover PostgreSQL store: the engine, its errors, session transactions.

Imported only by :meth:`PostgresStore.sqlalchemy_engine
<failover.stores.postgres.PostgresStore.sqlalchemy_engine>` and
:meth:`~failover.stores.postgres.PostgresStore.run_session_transaction`, so
``import failover`` works without SQLAlchemy (``pip install failover[sqlalchemy]``).

Why it is built this way:

* **SQLAlchemy keeps its own pool**, as every SQLAlchemy application expects
  (``pool_size``, ``max_overflow``, ``pool_recycle`` mean what they always
  mean). Its ``async_creator`` asks the failover router for a new
  :class:`~failover.stores.postgres.FailoverConnection` on the active endpoint,
  so a refused primary sends the new connection to the fallback and feeds the
  breaker, exactly like a raw ``connection()``.
* **No stale connections.** Each connection knows its endpoint. At checkout, a
  connection to an endpoint that is no longer active, or whose socket already
  saw the server hang up (a zero-round-trip check, no ``pool_pre_ping``), is
  thrown away with ``DisconnectionError`` and SQLAlchemy reconnects through the
  creator. On every switch the pool is also disposed, so idle connections to the
  endpoint left behind are closed at once.
* **Errors keep their meaning.** A disconnect seen by SQLAlchemy feeds the
  breaker and becomes :class:`SQLAlchemyTransactionRolledBack` (COMMIT not
  sent: rolled back) or :class:`SQLAlchemyOutcomeUnknown` (lost while
  committing). Each is *both* SQLAlchemy's ``OperationalError`` (a
  ``DBAPIError`` with ``.orig``, ``connection_invalidated=True``) and failover's
  :class:`~failover.errors.TransactionRolledBack` /
  :class:`~failover.errors.OutcomeUnknown`, so ``except DBAPIError`` code keeps
  working and ``except failover.TransactionRolledBack`` works too.
* **Reconcile's write hold covers plain sessions.** A connection checked out of
  the pool counts as an operation in flight until it is checked in (or detached),
  like a ``connection()`` block: the final catch-up before failback waits for it,
  and a checkout during the hold waits for the hold to end, then takes the route
  the switch chose; a hold still on after ``FAILOVER_OPERATION_TIMEOUT`` makes it
  raise :class:`~failover.errors.OperationTimeout` (nothing sent). A session's
  transaction therefore runs wholly before the catch-up or wholly after it, never
  across it (a write on the fallback after the catch-up would reach the primary
  only with a later sweep, possibly over a newer write). Checkouts of this store
  inside a :func:`run_session_transaction` run, admitted as a whole, are not
  counted again. ``hold_for_reconcile=False`` turns this off for an engine.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy import util as sa_util
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ...core.endpoint import Role
from ...core.events import Event, StateChanged, SwitchState
from ...core.store import ErrorKind
from ...errors import OperationTimeout, OutcomeUnknown, TransactionRolledBack
from .client import _REPLAY_SQLSTATES, PostgresStore, _Runs
from .connection import FailoverConnection, _socket_alive, may_have_committed

__all__ = [
    "SQLAlchemyOutcomeUnknown",
    "SQLAlchemyTransactionRolledBack",
    "create_engine",
    "run_session_transaction",
]

logger = logging.getLogger("failover.postgres.sqlalchemy")

T = TypeVar("T")

_await: Callable[[Awaitable[Any]], Any] = getattr(sa_util, "await_", None) or sa_util.await_only
"""Awaits from SQLAlchemy's synchronous pool code, run in a greenlet (``await_only`` before 2.1)."""


class _Admitted:
    """Set in the context of a :func:`run_session_transaction` run: checkouts of its store are
    covered by the run's own admission while it lasts (not in tasks that outlive it)."""

    __slots__ = ("admission", "active")

    def __init__(self, admission: Any) -> None:
        self.admission = admission
        self.active = True


_ADMITTED: contextvars.ContextVar[_Admitted | None] = contextvars.ContextVar("failover_sqlalchemy_admitted", default=None)
_COUNTED = "failover_counted_in_flight"
"""``record_info`` key (kept when a connection is invalidated, unlike ``info``): this checkout is in flight."""


class _FailoverDBAPIError(sa_exc.OperationalError):
    """SQLAlchemy's ``OperationalError`` for a lost connection, with failover's verdict on the outcome."""

    store: str
    endpoint: str | None

    def __init__(
        self,
        message: str,
        statement: str | None,
        params: Any,
        orig: Exception | None,
        hide_parameters: bool = False,
        code: str | None = None,
        ismulti: bool | None = None,
        *,
        store: str = "postgres",
        endpoint: str | None = None,
    ) -> None:
        # StatementError.__init__ would hand the message on to OperationError.__init__ (next
        # in the MRO), which needs keywords: set what StatementError sets, by hand.
        Exception.__init__(self, message)
        if code is not None:
            self.code = code
        self.statement = statement
        self.params = params
        self.orig = orig
        self.ismulti = ismulti
        self.hide_parameters = hide_parameters
        self.detail = []
        self.connection_invalidated = True
        self.store = store
        self.endpoint = endpoint


class SQLAlchemyTransactionRolledBack(_FailoverDBAPIError, TransactionRolledBack):
    """The connection was lost before ``COMMIT`` was sent: the transaction was rolled back.

    Both ``sqlalchemy.exc.OperationalError`` and :class:`failover.TransactionRolledBack`.
    """


class SQLAlchemyOutcomeUnknown(_FailoverDBAPIError, OutcomeUnknown):
    """The connection was lost while committing: it may or may not have been committed.

    Both ``sqlalchemy.exc.OperationalError`` and :class:`failover.OutcomeUnknown`.
    """


def create_engine(store: PostgresStore, *, hold_for_reconcile: bool = True, **engine_kwargs: Any) -> AsyncEngine:
    """An ``AsyncEngine`` (``postgresql+psycopg``) whose connections come from *store*'s active endpoint.

    *engine_kwargs* go to ``create_async_engine``; ``url``, ``creator`` and
    ``async_creator`` are failover's to set. With *hold_for_reconcile* false, checked-out
    connections are not counted in flight and checkouts do not wait for a reconcile's
    final catch-up (for connections kept checked out for long: a ``LISTEN`` loop, a long
    report); a write of theirs racing a failback is then copied by a later sweep.
    """
    for reserved in ("url", "creator", "async_creator"):
        if reserved in engine_kwargs:
            raise TypeError(f"sqlalchemy_engine() sets {reserved!r} itself: the store chooses the endpoint")
    failover = store.failover
    backend = store.backend

    async def connect_to_active() -> FailoverConnection:
        async def connect(endpoint: Any) -> FailoverConnection:
            return await backend.connect(endpoint)

        # Connecting sends no statement: always safe to try the other endpoint, and nothing for a
        # reconcile's write hold to wait for (the checkout below is what it holds).
        return await failover.run(connect, idempotent=True, label="SQLAlchemy connect", gated=False)

    engine = create_async_engine("postgresql+psycopg://", async_creator=connect_to_active, **engine_kwargs)
    sync_engine = engine.sync_engine

    admission = failover.admission

    @event.listens_for(sync_engine, "checkout")
    def admit_and_discard_stale(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        admitted = _ADMITTED.get()
        counted = hold_for_reconcile and not (admitted is not None and admitted.active and admitted.admission is admission)
        if counted and admission.held:
            # A reconcile's final catch-up: wait for it like a connection() block (SQLAlchemy checks
            # out inside a greenlet, so the wait can be awaited from this synchronous hook); the
            # check below then sends a connection to the endpoint left behind back to the creator.
            budget = failover.options.operation_timeout
            _await(admission.wait(time.monotonic() + budget))
            if admission.held:  # still: going on would write on the fallback during the catch-up
                raise _held_too_long(failover, budget)
        conn = getattr(dbapi_connection, "driver_connection", None)
        endpoint = getattr(conn, "endpoint", None)
        if endpoint is None or endpoint.role is not failover.active_role:
            raise sa_exc.DisconnectionError("the connection goes to an endpoint that is no longer active")
        if not _socket_alive(conn):  # type: ignore[arg-type]
            raise sa_exc.DisconnectionError(f"{endpoint.name} closed the connection while it was idle")
        # Last, and once per record: a checkout refused here or by a later listener is tried again
        # on the same record with no checkin in between.
        if counted and not record.record_info.get(_COUNTED):
            admission.enter()
            record.record_info[_COUNTED] = asyncio.get_running_loop()  # checkouts run in the loop's greenlets

    @event.listens_for(sync_engine, "checkin")
    def release(dbapi_connection: Any, record: Any) -> None:
        loop = record.record_info.pop(_COUNTED, None) if record is not None else None
        if loop is not None:
            admission.leave_on(loop)  # a connection garbage-collected unreturned: on any thread

    @event.listens_for(sync_engine, "detach")
    def release_detached(dbapi_connection: Any, record: Any) -> None:
        release(dbapi_connection, record)  # a detached connection is never checked in

    @event.listens_for(sync_engine, "handle_error")
    def classify(ctx: Any) -> BaseException | None:
        exc = ctx.original_exception
        if ctx.is_pre_ping or not isinstance(exc, (psycopg.Error, OSError)):
            return None
        conn = _driver_connection(ctx)
        endpoint = getattr(conn, "endpoint", None)
        kind = backend.classify(exc)
        if kind in (ErrorKind.APPLICATION, ErrorKind.BUSY) or endpoint is None:
            return None
        reason = failover.describe(endpoint, exc)
        failover.record_failure(endpoint.role, reason)
        if kind is ErrorKind.NOT_SENT:  # refused by a read-only server: the driver's error says it best
            return None
        ctx.is_disconnect = True
        failover.count_error()
        rolled_back = conn is not None and not may_have_committed(conn)
        if rolled_back:
            cls: type[_FailoverDBAPIError] = SQLAlchemyTransactionRolledBack
            message = (
                f"postgres: connection to {endpoint.name} failed before COMMIT was sent; "
                f"the transaction was rolled back and can be run again ({reason})"
            )
        else:
            cls = SQLAlchemyOutcomeUnknown
            message = (
                f"postgres: connection to {endpoint.name} failed while committing; "
                f"it may or may not have been committed ({reason})"
            )
        hide = bool(getattr(ctx.engine, "hide_parameters", False))
        return cls(
            message,
            ctx.statement,
            ctx.parameters,
            exc,
            hide,
            "e3q8",  # SQLAlchemy's code for OperationalError
            store=failover.name,
            endpoint=endpoint.name,
        )

    _dispose_on_switch(engine, failover)
    return engine


def _driver_connection(ctx: Any) -> Any:
    try:
        return ctx.connection.connection.driver_connection
    except Exception:  # no connection, or already invalidated
        return None


def _dispose_on_switch(engine: AsyncEngine, failover: Any) -> None:
    """Close the pool's idle connections whenever the active endpoint changes."""
    ref = weakref.ref(engine)
    tasks: set[asyncio.Task[None]] = set()

    def on_event(ev: Event) -> None:
        if not isinstance(ev, StateChanged) or ev.store != failover.name:
            return
        if _serving(ev.from_state) is _serving(ev.to_state):
            return
        target = ref()
        if target is None:
            unsubscribe()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(_dispose(target))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    unsubscribe = failover.bus.subscribe(on_event)
    weakref.finalize(engine, unsubscribe)


def _serving(state: SwitchState) -> Role | None:
    if state is SwitchState.ON_PRIMARY:
        return Role.PRIMARY
    if state is SwitchState.UNAVAILABLE:
        return None
    return Role.FALLBACK  # ON_FALLBACK, RECONCILING


async def _dispose(engine: AsyncEngine) -> None:
    try:
        await engine.dispose()
    except Exception:
        logger.exception("disposing the SQLAlchemy pool after a switch failed")


def _replayable(exc: BaseException, idempotent: bool) -> bool:
    """Whether a session transaction that raised *exc* may run again."""
    if isinstance(exc, TransactionRolledBack):
        return True
    if isinstance(exc, OutcomeUnknown):
        return idempotent
    orig = getattr(exc, "orig", None) if isinstance(exc, sa_exc.DBAPIError) else exc
    return isinstance(orig, psycopg.Error) and orig.sqlstate in _REPLAY_SQLSTATES


async def run_session_transaction(
    store: PostgresStore,
    session_factory: Callable[[], Any],
    fn: Callable[[Any], Awaitable[T]],
    *,
    idempotent: bool = False,
    timeout: float | None = None,
) -> T:
    """See :meth:`failover.stores.postgres.PostgresStore.run_session_transaction`."""
    failover = store.failover
    budget = failover.options.operation_timeout if timeout is None else timeout
    runs = _Runs(budget)
    while True:
        try:
            # Admitted like a connection() block, so a reconcile hold waits for it as a whole.
            async with failover.admission.admitted(runs.deadline):
                marker = _Admitted(failover.admission)
                admitted = _ADMITTED.set(marker)
                try:
                    async with asyncio.timeout(runs.remaining()):
                        async with session_factory() as session:
                            async with session.begin():
                                result = await fn(session)
                finally:
                    marker.active = False  # for tasks started inside fn, which keep the marker
                    _ADMITTED.reset(admitted)
            return result
        except TimeoutError as exc:
            raise _timed_out(failover, budget) from exc
        except Exception as exc:
            if not _replayable(exc, idempotent):
                raise
            error: BaseException = exc
        if not await runs.another():
            raise error
        logger.info("running the session transaction again (run %d of at most %d) after %s", runs.number, runs.attempts, type(error).__name__)


def _held_too_long(failover: Any, budget: float) -> BaseException:
    return OperationTimeout(
        f"{failover.name}: a reconcile's final catch-up held new operations for {budget:g}s "
        "(FAILOVER_OPERATION_TIMEOUT); nothing was sent, the session can be run again",
        store=failover.name,
        endpoint=None,
    )


def _timed_out(failover: Any, budget: float) -> BaseException:
    endpoint = failover.active_endpoint
    return OperationTimeout(
        f"{failover.name}: the session transaction did not finish within {budget:g}s; "
        "it may or may not have been committed",
        store=failover.name,
        endpoint=endpoint.name if endpoint is not None else None,
    )
