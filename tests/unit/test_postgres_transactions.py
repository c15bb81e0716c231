"""Pure pieces of PostgreSQL transaction handling: what may commit, how many runs (no servers)."""

from __future__ import annotations


def test_statements_that_may_commit_are_recognised() -> None:
    from psycopg import sql

    from failover.stores.postgres import _ends_transaction

    conn = None  # as_string() needs no connection for plain SQL
    for query in ("commit", "  COMMIT;", "insert into t values (1); commit", "END", "prepare transaction 'x'", sql.SQL("COMMIT")):
        assert _ends_transaction(query, conn), query  # type: ignore[arg-type]
    for query in ("select 1", "select case when true then 1 end", "insert into commits values (1)", b"update t set x = 1"):
        assert not _ends_transaction(query, conn), query  # type: ignore[arg-type]


async def test_runs_are_bounded_in_number_and_by_the_deadline() -> None:
    from failover.stores.postgres import _Runs

    runs = _Runs(budget=10.0, attempts=3)
    assert await runs.another() and await runs.another()
    assert runs.number == 3
    assert not await runs.another()  # the third run was the last
    assert not await _Runs(budget=0.01, attempts=10).another()  # no time for another run


def test_not_sent_errors_are_the_core_one_and_read_plainly() -> None:
    import psycopg_pool

    from failover.core.routing import NotSent
    from failover.core.store import ErrorKind
    from failover.stores.postgres import PostgresBackend
    from failover.stores.postgres.backend import _RolledBack

    backend = PostgresBackend()
    cause = OSError("server closed the connection unexpectedly")
    for error in (NotSent("cannot connect: refused"), _RolledBack(f"rolled back, COMMIT was never sent: {cause}"), psycopg_pool.PoolClosed()):
        assert backend.classify(error) is ErrorKind.NOT_SENT, error
    # The reason a breaker trip logs is the message, not a tuple of arguments.
    assert str(_RolledBack(f"rolled back, COMMIT was never sent: {cause}")) == (
        "rolled back, COMMIT was never sent: server closed the connection unexpectedly"
    )
