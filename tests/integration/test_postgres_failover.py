"""PostgreSQL failover on real servers: crash, hang, recovery, flapping, both down."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from failover import (
    last_served,
    Databases,
    FailoverError,
    NoEndpointAvailable,
    OperationTimeout,
    OutcomeUnknown,
    SwitchState,
    TransactionRolledBack,
)
from failover.local import LocalServer

from ..helpers import fast_settings, wait_for
from . import scenarios

pytestmark = pytest.mark.integration

SCHEMA = "create table if not exists items (id bigint primary key, note text not null)"


def server_count(server: LocalServer, where: str = "true") -> int:
    with psycopg.connect(server.url, connect_timeout=2) as conn:
        conn.execute(SCHEMA)
        row = conn.execute(f"select count(*) from items where {where}").fetchone()
        assert row is not None
        return int(row[0])


def prepare(*servers: LocalServer) -> None:
    for server in servers:
        with psycopg.connect(server.url, connect_timeout=2) as conn:
            conn.execute(SCHEMA)


def state(dbs: Databases) -> SwitchState:
    return dbs.store("postgres").state


async def databases(primary: LocalServer | None, fallback: LocalServer | None, **overrides: Any) -> Databases:
    urls: dict[str, Any] = {}
    if primary is not None:
        urls["SUPABASE_DB_URL"] = primary.url
    if fallback is not None:
        urls["POSTGRES_URL"] = fallback.url
    dbs = Databases(fast_settings(**urls, **overrides))
    await dbs.start()
    return dbs


def subject(dbs: Databases, pair: tuple[LocalServer, LocalServer]) -> scenarios.Subject:
    return scenarios.Subject(dbs, "postgres", pair[0], pair[1], write_and_read(dbs))


def write_and_read(dbs: Databases) -> Any:
    async def operation(i: int) -> str:
        if i % 2:
            await dbs.postgres.execute("insert into items (id, note) values (%s, 'traffic')", (i,))
        else:
            await dbs.postgres.fetchone("select count(*) from items")
        endpoint = last_served()  # the endpoint that served this call, not the one active after it
        return str(endpoint.role) if endpoint else "none"

    return operation


async def test_healthy_start_serves_from_primary(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pg_pair
    prepare(primary, fallback)
    dbs = await databases(primary, fallback)
    try:
        status = dbs.status()
        assert status["overall_status"] == "healthy"
        assert status["postgres"]["using_primary"] is True
        assert status["postgres"]["primary_available"] is True
        assert status["postgres"]["fallback_available"] is True
        assert status["postgres"]["primary_healthy"] is True
        assert status["postgres"]["current_db"] == "Primary PostgreSQL"
        async with dbs.postgres.connection() as conn:
            await conn.execute("insert into items (id, note) values (1, 'hello')")
        assert server_count(primary) == 1
        assert server_count(fallback) == 0
    finally:
        await dbs.close()


async def test_sigkill_primary_under_traffic_moves_within_a_second_without_errors(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = pg_pair
    prepare(primary, fallback)
    dbs = await databases(primary, fallback)
    try:
        await scenarios.crash_moves_within_a_second(subject(dbs, pg_pair))
    finally:
        await dbs.close()
    assert server_count(fallback) > 0


async def test_sigstop_primary_fails_over_within_the_timeouts(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    prepare(*pg_pair)
    dbs = await databases(*pg_pair)
    try:
        await scenarios.hang_fails_over_within_the_timeouts(subject(dbs, pg_pair))
    finally:
        await dbs.close()


async def test_failback_waits_for_the_failback_delay(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pg_pair
    prepare(primary, fallback)
    dbs = await databases(primary, fallback, FAILOVER_FAILBACK_DELAY=1.5)

    async def after_failback() -> None:
        await dbs.postgres.execute("insert into items values (99, 'after failback')")
        assert server_count(primary, "id = 99") == 1

    try:
        await scenarios.failback_waits_for_the_delay(
            subject(dbs, pg_pair), lambda: dbs.postgres.fetch("select 1"), after_failback
        )
    finally:
        await dbs.close()


async def test_flapping_primary_causes_a_bounded_number_of_switches(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    prepare(*pg_pair)
    dbs = await databases(*pg_pair, FAILOVER_FAILBACK_DELAY=2.0)
    try:
        await scenarios.flapping_switches_a_bounded_number_of_times(subject(dbs, pg_pair))
    finally:
        await dbs.close()


async def test_both_down_raises_a_typed_error_without_hanging(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pg_pair
    prepare(primary, fallback)
    dbs = await databases(primary, fallback)
    try:
        await asyncio.to_thread(primary.kill)
        await asyncio.to_thread(fallback.kill)
        started = time.monotonic()
        with pytest.raises(FailoverError) as caught:
            await asyncio.wait_for(dbs.postgres.execute("insert into items values (9, 'x')"), timeout=10)
        assert time.monotonic() - started <= dbs.settings.operation_timeout + 0.5
        assert isinstance(caught.value, NoEndpointAvailable | OutcomeUnknown)
        with pytest.raises(NoEndpointAvailable):
            async with dbs.postgres.connection():
                pass
        await wait_for(lambda: dbs.status()["overall_status"] == "unhealthy", 3, "unhealthy status")
        assert dbs.status()["postgres"]["current_db"] is None
    finally:
        await dbs.close()


async def test_both_hung_raises_within_the_operation_timeout(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    prepare(*pg_pair)
    dbs = await databases(*pg_pair)
    try:
        await scenarios.both_hung_raise_within_the_operation_timeout(
            subject(dbs, pg_pair),
            lambda: dbs.postgres.fetch("select 1"),
            lambda: dbs.postgres.execute("insert into items values (8, 'hung')"),
        )
    finally:
        await dbs.close()


async def test_fallback_down_while_on_primary_is_reported_and_harmless(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    prepare(*pg_pair)
    dbs = await databases(*pg_pair)
    try:
        await scenarios.fallback_down_is_reported_and_harmless(subject(dbs, pg_pair))
    finally:
        await dbs.close()


async def test_connection_lost_mid_transaction_is_not_replayed(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pg_pair
    prepare(primary, fallback)
    dbs = await databases(primary, fallback)
    try:
        # COMMIT was never sent: rolled back, not "unknown" (issue 12), and still not replayed.
        with pytest.raises(TransactionRolledBack) as caught:
            async with dbs.postgres.connection() as conn:
                await conn.execute("insert into items values (42, 'in flight')")
                await asyncio.to_thread(primary.kill)
                await conn.execute("insert into items values (43, 'after the crash')")
        assert caught.value.store == "postgres"
        assert caught.value.retryable
        assert server_count(fallback) == 0  # nothing was re-executed elsewhere
    finally:
        await dbs.close()


async def test_hung_server_mid_transaction_times_out(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pg_pair
    prepare(primary, fallback)
    dbs = await databases(primary, fallback)
    try:
        started = time.monotonic()
        with pytest.raises(OperationTimeout):
            async with dbs.postgres.connection(timeout=1.0) as conn:
                await conn.execute("select 1")
                primary.pause()
                await conn.execute("select 2")
        assert time.monotonic() - started < 3
    finally:
        primary.resume()
        await dbs.close()


async def test_read_only_primary_is_not_usable(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pg_pair
    prepare(primary, fallback)
    dbs = await databases(primary, fallback)
    try:
        with psycopg.connect(primary.url, autocommit=True) as conn:
            conn.execute("alter system set default_transaction_read_only = on")
            conn.execute("select pg_reload_conf()")
        await wait_for(lambda: state(dbs) is SwitchState.ON_FALLBACK, 5, "failover from a read-only primary")
        assert "read-only" in dbs.status()["postgres"]["endpoints"]["primary"]["last_error"]
        await dbs.postgres.execute("insert into items values (7, 'written on the fallback')")
        assert server_count(fallback) == 1
    finally:
        with psycopg.connect(primary.url, autocommit=True) as conn:
            conn.execute("alter system reset default_transaction_read_only")
            conn.execute("select pg_reload_conf()")
        await dbs.close()


async def test_pin_to_fallback_and_release(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pg_pair
    prepare(primary, fallback)
    dbs = await databases(primary, fallback, FAILOVER_FAILBACK_DELAY=0)
    try:
        dbs.pin("postgres", "fallback")
        await dbs.postgres.execute("insert into items values (1, 'pinned')")
        assert server_count(fallback) == 1
        assert dbs.status()["postgres"]["pinned"] == "fallback"
        dbs.pin("postgres", None)
        # The write made while pinned is reconciled before traffic returns to the primary.
        assert state(dbs) is SwitchState.RECONCILING
        await wait_for(lambda: state(dbs) is SwitchState.ON_PRIMARY, 10, "failback after reconcile")
        await dbs.postgres.execute("insert into items values (2, 'released')")
        assert server_count(primary) == 2
        assert server_count(fallback) == 1
    finally:
        await dbs.close()


async def test_a_single_url_works_without_failover(make_server: Any) -> None:
    only = make_server("postgres")
    prepare(only)
    dbs = await databases(None, only)
    try:
        assert await dbs.postgres.fetchone("select 41 + 1") == (42,)
        status = dbs.status()
        assert status["postgres"]["current_db"] == "Local PostgreSQL"
        assert status["postgres"]["using_primary"] is False
        assert status["overall_status"] == "healthy"
        assert "mongodb" not in status and "redis" not in status
    finally:
        await dbs.close()


async def test_start_with_primary_down_serves_from_the_fallback(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pg_pair
    prepare(fallback)
    await asyncio.to_thread(primary.kill)
    dbs = await databases(primary, fallback)
    try:
        assert state(dbs) is SwitchState.ON_FALLBACK
        assert dbs.status()["overall_status"] == "degraded"
        await dbs.postgres.execute("insert into items values (5, 'x')")
        assert server_count(fallback) == 1
    finally:
        await dbs.close()


async def test_more_than_1024_open_files_do_not_break_liveness_checks(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    import resource

    primary, fallback = pg_pair
    prepare(primary, fallback)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    ballast = [open("/dev/null") for _ in range(1100)]  # pushes new sockets above fd 1023
    try:
        dbs = await databases(primary, fallback)
        try:
            for i in range(5):
                await dbs.postgres.execute("insert into items values (%s, 'high fd')", (i,))
            assert await dbs.postgres.fetchone("select count(*) from items") == (5,)
            assert state(dbs) is SwitchState.ON_PRIMARY
        finally:
            await dbs.close()
    finally:
        for f in ballast:
            f.close()


async def test_a_saturated_pool_is_not_mistaken_for_a_dead_server(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    import psycopg_pool

    primary, fallback = pg_pair
    prepare(primary, fallback)
    dbs = await databases(primary, fallback, FAILOVER_POOL_MAX_SIZE=1, FAILOVER_OPERATION_TIMEOUT=1.0)
    try:
        async with dbs.postgres.connection(timeout=5) as held:
            await held.execute("select 1")
            with pytest.raises(psycopg_pool.PoolTimeout):
                await dbs.postgres.execute("insert into items values (1, 'waits for a connection')")
        assert state(dbs) is SwitchState.ON_PRIMARY
        assert server_count(fallback) == 0
    finally:
        await dbs.close()


async def test_insert_returning_is_not_a_read_but_runs_elsewhere_when_rolled_back(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    from failover.stores.postgres import _idempotent

    assert _idempotent("select * from items", None) is True
    assert _idempotent("  WITH x AS (delete from items returning *) select * from x", None) is False
    assert _idempotent("insert into items values (1, 'a') returning id", None) is False
    assert _idempotent("insert into items values (1, 'a') returning id", True) is True
    primary, fallback = pg_pair
    prepare(primary, fallback)
    dbs = await databases(primary, fallback)
    try:
        await dbs.postgres.fetchone("select 1")  # a pooled connection, idle and alive
        primary.pause()
        idle = dbs.postgres.backend.stats()["primary"]["pool_available"]
        task = asyncio.create_task(dbs.postgres.fetchone("insert into items values (77, 'once') returning id"))
        # Sent once its connection left the pool: the statement goes out in the same step as
        # the checkout, before the task first waits (for the hung server's reply).
        await wait_for(lambda: dbs.postgres.backend.stats()["primary"]["pool_available"] < idle, 5, "statement sent")
        await asyncio.to_thread(primary.kill)
        # Its COMMIT was never sent, so the primary rolled it back: it runs on the fallback, once.
        assert await task == (77,)
        assert server_count(fallback, "id = 77") == 1
    finally:
        await dbs.close()
    await asyncio.to_thread(primary.start)
    assert server_count(primary, "id = 77") == 0

