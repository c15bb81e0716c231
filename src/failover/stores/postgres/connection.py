"""Connections that know whether they may have committed.

PostgreSQL commits nothing without a ``COMMIT``, so a connection failure is
classified exactly when the connection counts what it sends that may commit:
:class:`FailoverConnection` does, and every connection failover hands out is one.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection, AsyncCursor

from ...core.endpoint import Endpoint
from ...core.sockets import hung_up_or_pending

__all__ = ["FailoverConnection", "may_have_committed"]

# A statement that may end the transaction with a commit (at the start of the text or after a ';').
_ENDS_TRANSACTION = re.compile(r"\s*(?:commit|end|prepare\s+transaction)\b", re.IGNORECASE)
_IDLE = psycopg.pq.TransactionStatus.IDLE


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

    def commit_after_reply(self) -> Coroutine[Any, Any, None]:
        """``COMMIT`` without :meth:`commit`'s look at the socket first.

        For a one-statement helper that commits as soon as its statement's reply is read:
        no wait lies between the two for the server to speak in, and a failure of this
        ``COMMIT`` leaves the outcome unknown whether the look would have caught it or not.
        Returns psycopg's own coroutine (no frame of ours to resume while it waits).
        """
        if self.pgconn.transaction_status != _IDLE:
            self.commits_sent += 1
        return AsyncConnection.commit(self)

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

    # Plain methods returning psycopg's coroutine: the statement is noted when the call is
    # made (psycopg awaits it at once), and no frame of ours is resumed at every wait.
    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        _note(self._conn, query)
        return super().execute(query, params, **kwargs)

    def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        _note(self._conn, query)
        return super().executemany(query, params_seq, **kwargs)

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


def _committed_before(conn: AsyncConnection[Any]) -> bool:
    """Whether a transaction committed on *conn* since failover handed it out, before the current one."""
    if not isinstance(conn, FailoverConnection):
        return True
    return conn.transaction_commits != conn.block_commits



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

