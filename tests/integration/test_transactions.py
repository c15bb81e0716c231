"""Transactions across a failover on real PostgreSQL servers (issue 12).

Rolled back is not unknown: a connection lost before COMMIT was sent raises
TransactionRolledBack (and run_transaction runs the block again), a connection
lost while committing raises OutcomeUnknown and nothing runs again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from typing import Any

import psycopg
import pytest

from failover import Databases, OperationTimeout, OutcomeUnknown, SwitchState, TransactionRolledBack
from failover.local import LocalServer
from failover.local.servers import pid_alive, process_tree
from failover.local.proxy import FaultProxy, proxied_url

from ..helpers import fast_settings, wait_for

pytestmark = pytest.mark.integration

SCHEMA = (
    "create table if not exists items (id bigint primary key, note text not null);"
    "create table if not exists counters (id int primary key, n int not null);"
    "insert into counters values (1, 0) on conflict do nothing"
)


def prepare(*servers: LocalServer) -> None:
    for server in servers:
        with psycopg.connect(server.url, connect_timeout=2, autocommit=True) as conn:
            conn.execute(SCHEMA)


def ids_on(server: LocalServer) -> list[int]:
    with psycopg.connect(server.url, connect_timeout=2) as conn:
        return [row[0] for row in conn.execute("select id from items")]


async def databases(primary_url: str, fallback_url: str, **overrides: Any) -> Databases:
    # These tests tell where a transaction ran by which server holds its rows: a cold fallback
    # (a warm one holds copies of the primary's rows; warm sync has tests of its own).
    overrides.setdefault("FAILOVER_WARM", "off")
    dbs = Databases(fast_settings(SUPABASE_DB_URL=primary_url, POSTGRES_URL=fallback_url, **overrides))
    await dbs.start()
    return dbs


def state(dbs: Databases) -> SwitchState:
    return dbs.store("postgres").state


async def insert(conn: psycopg.AsyncConnection[Any], item: int) -> int:
    await conn.execute("insert into items (id, note) values (%s, 'tx')", (item,))
    return item


async def test_block_broken_before_commit_raises_transaction_rolled_back(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = pg_pair
    prepare(primary, fallback)
    dbs = await databases(primary.url, fallback.url)
    try:
        with pytest.raises(TransactionRolledBack) as caught:
            async with dbs.postgres.connection() as conn:
                await conn.execute("insert into items values (42, 'in flight')")
                await asyncio.to_thread(primary.kill)
                await conn.execute("insert into items values (43, 'after the crash')")
        error = caught.value
        assert error.retryable is True
        assert error.store == "postgres"
        assert error.endpoint == "Primary PostgreSQL"
        assert not isinstance(error, OutcomeUnknown)
        assert "before COMMIT" in str(error)
        assert ids_on(fallback) == []  # a connection() block is never replayed by itself
        await asyncio.to_thread(primary.start)
        assert ids_on(primary) == []  # PostgreSQL did roll it back
    finally:
        await dbs.close()


async def test_a_block_that_committed_by_itself_is_unknown_not_rolled_back(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = pg_pair
    prepare(primary, fallback)
    dbs = await databases(primary.url, fallback.url)
    try:
        with pytest.raises(OutcomeUnknown):
            async with dbs.postgres.connection() as conn:
                await conn.execute("insert into items values (1, 'committed')")
                await conn.commit()  # the block's first transaction is durable now
                await conn.execute("insert into items values (2, 'lost')")
                await asyncio.to_thread(primary.kill)
                await conn.execute("insert into items values (3, 'after the crash')")
        await asyncio.to_thread(primary.start)
        assert ids_on(primary) == [1]
    finally:
        await dbs.close()


async def proxied_pair(pg_pair: tuple[LocalServer, LocalServer]) -> tuple[FaultProxy, Databases]:
    primary, fallback = pg_pair
    prepare(primary, fallback)
    proxy = await FaultProxy(primary.port).start()
    dbs = await databases(proxied_url(primary.url, proxy.port), fallback.url)
    return proxy, dbs


async def test_connection_cut_while_committing_is_outcome_unknown(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    """The fault proxy holds the COMMIT and resets the connection: the client cannot know."""
    primary, fallback = pg_pair
    proxy, dbs = await proxied_pair(pg_pair)
    loop = asyncio.get_running_loop()
    try:
        with pytest.raises(OutcomeUnknown) as caught:
            async with dbs.postgres.connection() as conn:
                await conn.execute("insert into items values (7, 'committing')")
                proxy.delay(5.0)  # what is sent from now on (the COMMIT) is held...
                loop.call_later(0.2, proxy.reset)  # ...and the connection reset while it waits
        assert not isinstance(caught.value, OperationTimeout)
        assert caught.value.retryable is False
        assert ids_on(fallback) == []
    finally:
        await dbs.close()
        await proxy.stop()


async def test_connection_cut_before_commit_is_rolled_back(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pg_pair
    proxy, dbs = await proxied_pair(pg_pair)
    loop = asyncio.get_running_loop()
    try:
        with pytest.raises(TransactionRolledBack):
            async with dbs.postgres.connection() as conn:
                await conn.execute("insert into items values (8, 'rolled back')")
                proxy.delay(5.0)
                loop.call_later(0.2, proxy.reset)
                await conn.execute("insert into items values (9, 'never answered')")
        assert ids_on(primary) == [] and ids_on(fallback) == []
    finally:
        await dbs.close()
        await proxy.stop()


async def test_commit_of_an_outermost_conn_transaction_block_is_known_to_be_sent(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    """``async with conn.transaction():`` commits when it ends: a failure there is unknown, while
    a failure inside it is still a rollback."""
    primary, fallback = pg_pair
    proxy, dbs = await proxied_pair(pg_pair)
    loop = asyncio.get_running_loop()
    try:
        with pytest.raises(OutcomeUnknown) as caught:
            async with dbs.postgres.connection() as conn:
                async with conn.transaction():
                    await conn.execute("insert into items values (20, 'in a transaction block')")
                    proxy.delay(5.0)
                    loop.call_later(0.2, proxy.reset)
        assert not isinstance(caught.value, OperationTimeout)
    finally:
        await dbs.close()
        await proxy.stop()
    proxy, dbs = await proxied_pair((primary, fallback))
    try:
        with pytest.raises(TransactionRolledBack):
            async with dbs.postgres.connection() as conn:
                async with conn.transaction():
                    await conn.execute("insert into items values (21, 'in a transaction block')")
                    proxy.delay(5.0)
                    loop.call_later(0.2, proxy.reset)
                    await conn.execute("insert into items values (22, 'never answered')")
    finally:
        await dbs.close()
        await proxy.stop()


async def test_run_transaction_never_runs_again_after_commit_was_sent(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = pg_pair
    proxy, dbs = await proxied_pair(pg_pair)
    loop = asyncio.get_running_loop()
    runs = 0

    async def write(conn: psycopg.AsyncConnection[Any]) -> None:
        nonlocal runs
        runs += 1
        await conn.execute("insert into items values (10, 'once')")
        if runs == 1:
            proxy.delay(5.0)
            loop.call_later(0.2, proxy.reset)

    try:
        with pytest.raises(OutcomeUnknown):
            await dbs.postgres.run_transaction(write)
        assert runs == 1
        assert ids_on(fallback) == []
    finally:
        await dbs.close()
        await proxy.stop()


async def test_backend_terminated_during_commit_is_outcome_unknown(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    """A 57P01 answer to the COMMIT itself: the commit's fate is not the client's to guess."""
    primary, fallback = pg_pair
    prepare(primary, fallback)
    with psycopg.connect(primary.url, autocommit=True) as admin:
        admin.execute(
            "create function slow_commit() returns trigger language plpgsql as "
            "$$ begin perform pg_sleep(5); return null; end $$;"
            "create constraint trigger slow_commit after insert on items "
            "deferrable initially deferred for each row execute function slow_commit()"
        )
    dbs = await databases(primary.url, fallback.url, FAILOVER_OPERATION_TIMEOUT=10)

    def terminate_the_committer() -> None:
        with psycopg.connect(primary.url, autocommit=True) as admin:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                row = admin.execute(
                    "select pid from pg_stat_activity where wait_event = 'PgSleep' and query ilike 'commit%'"
                ).fetchone()
                if row:
                    admin.execute("select pg_terminate_backend(%s)", row)
                    return
                time.sleep(0.01)
        raise AssertionError("the COMMIT never started")

    try:
        killer = asyncio.create_task(asyncio.to_thread(terminate_the_committer))
        with pytest.raises(OutcomeUnknown) as caught:
            await dbs.postgres.execute("insert into items values (11, 'terminated while committing')")
        await killer
        assert "AdminShutdown" in str(caught.value) or "terminating" in str(caught.value)
        assert ids_on(fallback) == []  # not re-run elsewhere
    finally:
        await dbs.close()


async def test_statement_answered_57p01_goes_to_the_fallback(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    """``execute`` whose statement is answered "terminating connection" (class 57) runs on the fallback."""
    primary, fallback = pg_pair
    prepare(primary, fallback)
    dbs = await databases(primary.url, fallback.url, FAILOVER_FAILBACK_DELAY=30)  # the primary stays up

    def terminate_the_sleeper() -> None:
        with psycopg.connect(primary.url, autocommit=True) as admin:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                row = admin.execute("select pid from pg_stat_activity where wait_event = 'PgSleep'").fetchone()
                if row:
                    admin.execute("select pg_terminate_backend(%s)", row)
                    return
                time.sleep(0.01)
        raise AssertionError("the statement never started")

    try:
        killer = asyncio.create_task(asyncio.to_thread(terminate_the_sleeper))
        count = await dbs.postgres.execute(
            "insert into items select 12, 'slow' from pg_sleep(1.5)", timeout=5
        )
        await killer
        assert count == 1
        assert ids_on(fallback) == [12]
        assert ids_on(primary) == []
        assert state(dbs) is SwitchState.ON_FALLBACK  # the session-ending reply fed the breaker
    finally:
        await dbs.close()


async def test_commit_cut_short_after_committing_locally_stays_unknown(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    """A synchronous-replication wait cut short: PostgreSQL warns the transaction "has already
    committed locally" and hangs up. That is the one session-ending answer that is not a rollback."""
    primary, fallback = pg_pair
    prepare(primary, fallback)
    with psycopg.connect(primary.url, autocommit=True) as admin:
        admin.execute("alter system set synchronous_standby_names = 'nobody_is_listening'")
        admin.execute("select pg_reload_conf()")
    dbs = await databases(primary.url, fallback.url, FAILOVER_OPERATION_TIMEOUT=10)

    def terminate_the_waiter() -> None:
        with psycopg.connect(primary.url, autocommit=True) as admin:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                row = admin.execute("select pid from pg_stat_activity where wait_event = 'SyncRep'").fetchone()
                if row:
                    admin.execute("select pg_terminate_backend(%s)", row)
                    return
                time.sleep(0.01)
        raise AssertionError("no transaction waited for synchronous replication")

    try:
        killer = asyncio.create_task(asyncio.to_thread(terminate_the_waiter))
        with pytest.raises(OutcomeUnknown):
            await dbs.postgres.execute("insert into items values (13, 'committed locally')", timeout=8)
        await killer
        assert ids_on(primary) == [13]  # it was committed: "rolled back" would have been a lie
        assert ids_on(fallback) == []
    finally:
        await dbs.close()


async def test_serialization_failure_is_run_again(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pg_pair
    prepare(primary, fallback)
    dbs = await databases(primary.url, fallback.url)
    runs = 0

    async def bump(conn: psycopg.AsyncConnection[Any], by: int) -> int:
        nonlocal runs
        runs += 1
        await conn.execute("set transaction isolation level repeatable read")
        cur = await conn.execute("select n from counters where id = 1")
        row = await cur.fetchone()
        assert row is not None
        if runs == 1:  # a concurrent writer commits in between: our update must fail with 40001
            async with await psycopg.AsyncConnection.connect(primary.url, autocommit=True) as other:
                await other.execute("update counters set n = n + 100 where id = 1")
        await conn.execute("update counters set n = %s where id = 1", (row[0] + by,))
        return int(row[0] + by)

    try:
        result = await dbs.postgres.run_transaction(bump, by=1)
        assert runs == 2
        assert result == 101
        assert await dbs.postgres.fetchone("select n from counters where id = 1") == (101,)
    finally:
        await dbs.close()


async def test_run_transaction_raises_application_errors_at_once(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pg_pair
    prepare(primary, fallback)
    dbs = await databases(primary.url, fallback.url)
    runs = 0

    async def duplicate(conn: psycopg.AsyncConnection[Any]) -> None:
        nonlocal runs
        runs += 1
        await conn.execute("insert into items values (1, 'a'), (1, 'b')")

    try:
        with pytest.raises(psycopg.errors.UniqueViolation):
            await dbs.postgres.run_transaction(duplicate)
        assert runs == 1
    finally:
        await dbs.close()


async def run_transactions_through_a_crash(
    dbs: Databases, crash: Any, workers: int = 4
) -> tuple[list[int], list[tuple[float, float, BaseException]], tuple[float, float]]:
    acknowledged: list[int] = []
    errors: list[tuple[float, float, BaseException]] = []
    stop = asyncio.Event()
    counter = iter(range(1, 10**9))

    async def worker() -> None:
        while not stop.is_set():
            item = next(counter)
            started = time.monotonic()
            try:
                acknowledged.append(await dbs.postgres.run_transaction(insert, item))
            except Exception as exc:
                errors.append((started, time.monotonic(), exc))

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        await wait_for(lambda: len(acknowledged) > 200, 10, "transactions on the primary")
        killed = time.monotonic()
        await asyncio.to_thread(crash)
        crashed = time.monotonic()
        await wait_for(lambda: state(dbs) is SwitchState.ON_FALLBACK, 2, "failover")
        before = len(acknowledged)
        await wait_for(lambda: len(acknowledged) > before + 200, 10, "transactions on the fallback")
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    return acknowledged, errors, (killed, crashed)


@pytest.mark.parametrize("crash", ["postmaster", "every process"])
async def test_primary_killed_under_run_transaction_inserts(
    pg_pair: tuple[LocalServer, LocalServer], crash: str
) -> None:
    """SIGKILL of the postmaster alone (its backends outlive it for a moment and answer 57P01) or of
    every server process at once. Every transaction cut before its COMMIT is run again on the
    fallback and none is applied twice; the only errors are transactions whose COMMIT was on the
    wire at the kill, which can only end in OutcomeUnknown."""
    primary, fallback = pg_pair
    prepare(primary, fallback)
    workers = 4
    dbs = await databases(primary.url, fallback.url)
    assert primary.pid is not None
    postmaster = primary.pid

    def kill() -> None:
        """Returns once every process of the old server is gone."""
        if crash == "every process":
            primary.kill()
            return
        backends = process_tree(postmaster)
        os.kill(postmaster, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(pid_alive(pid) for pid in backends if pid != postmaster):
            assert time.monotonic() < deadline, "the orphaned backends did not exit"
            time.sleep(0.005)

    try:
        acknowledged, errors, (killed, crashed) = await run_transactions_through_a_crash(dbs, kill, workers)
    finally:
        await dbs.close()
    for started, finished, error in errors:
        assert isinstance(error, OutcomeUnknown) and not isinstance(error, OperationTimeout), repr(error)
        assert started <= crashed and finished >= killed, "only a transaction in flight while the server died may fail"
    assert len(errors) <= workers
    await asyncio.to_thread(primary.kill)  # reap what is left of the old server
    await asyncio.to_thread(primary.start)
    stored = Counter(ids_on(primary) + ids_on(fallback))
    assert all(stored[item] == 1 for item in acknowledged), "an acknowledged row is missing or doubled"
    assert all(count == 1 for count in stored.values()), "a row was applied twice"
