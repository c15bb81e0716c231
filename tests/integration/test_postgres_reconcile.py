"""PostgreSQL reconcile on real servers: every write acknowledged by the fallback reaches the primary.

Each test kills a real primary, writes through failover while it is down, restarts it and,
once the store is back ON_PRIMARY, reads every acknowledged write back from the primary
with the raw driver.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from failover import Databases, OutcomeUnknown, SwitchState
from failover.core.events import ConflictResolved, Event, ReconcileCompleted
from failover.local import LocalServer

from ..helpers import fast_settings, wait_for

pytestmark = pytest.mark.integration

ITEMS = "create table if not exists items (id bigint primary key, note text not null)"
ROOT = Path(__file__).resolve().parents[2]


def sql(server: LocalServer, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement on *server* with the raw driver (autocommit); return its rows."""
    with psycopg.connect(server.url, connect_timeout=3, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def on_both(pair: tuple[LocalServer, LocalServer], statement: str) -> None:
    for server in pair:
        sql(server, statement)


def state(dbs: Databases) -> SwitchState:
    return dbs.store("postgres").state


async def start(pair: tuple[LocalServer, LocalServer], **overrides: Any) -> Databases:
    dbs = Databases(fast_settings(SUPABASE_DB_URL=pair[0].url, POSTGRES_URL=pair[1].url, **overrides))
    await dbs.start()
    return dbs


async def outage(dbs: Databases, primary: LocalServer) -> None:
    """Kill the primary and wait until the store serves from the fallback."""
    await asyncio.to_thread(primary.kill)
    await wait_for(lambda: state(dbs) is SwitchState.ON_FALLBACK or _probe_sees_down(dbs), 5, "failover")
    if state(dbs) is not SwitchState.ON_FALLBACK:
        await dbs.postgres.fetchone("select 1")  # a live failure trips the breaker at once
        await wait_for(lambda: state(dbs) is SwitchState.ON_FALLBACK, 5, "failover")


def _probe_sees_down(dbs: Databases) -> bool:
    return False


async def back_on_primary(dbs: Databases, primary: LocalServer, timeout: float = 20) -> None:
    await asyncio.to_thread(primary.start)
    await wait_for(lambda: state(dbs) is SwitchState.ON_PRIMARY, timeout, "failback after reconcile")


def changes_left(fallback: LocalServer) -> int:
    return int(sql(fallback, "select count(*) from failover.changes")[0][0])


async def test_inserts_updates_and_deletes_made_during_an_outage_reach_the_primary(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    """Two writers through a SIGKILL of the primary and through failback: every acknowledged
    insert, update and delete is on the primary afterwards (each key checked).

    The fallback is cold (no warm sync): it holds the rows both sides were loaded with, so
    updates and deletes target those; a row inserted on the primary alone cannot be deleted
    through the fallback (it is not there)."""
    primary, fallback = pg_pair
    on_both(pg_pair, "create table acct (id bigint primary key, v bigint not null)")
    on_both(pg_pair, "insert into acct select g, 0 from generate_series(1, 800) g")
    dbs = await start(pg_pair)
    expected: dict[int, int | None] = {}  # key -> acknowledged final value (None: deleted)
    unknown: set[int] = set()
    stop = asyncio.Event()
    counts = {"ok": 0, "fallback": 0}

    async def writer(w: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            kind = i % 3
            try:
                if kind == 0:  # insert a new key
                    key = 10_000 * (w + 1) + i
                    await dbs.postgres.execute("insert into acct (id, v) values (%s, %s)", (key, i))
                    expected[key] = i
                elif kind == 1:  # update a key this writer owns
                    key = 1 + (2 * (i // 3) + w) % 400
                    await dbs.postgres.execute("update acct set v = %s where id = %s", (i, key))
                    if expected.get(key, 0) is not None:
                        expected[key] = i
                else:  # delete a key this writer owns (the fallback is cold: it must hold the row)
                    key = 401 + (2 * (i // 3) + w) % 400
                    await dbs.postgres.execute("delete from acct where id = %s", (key,))
                    expected[key] = None
                counts["ok"] += 1
                if state(dbs) is not SwitchState.ON_PRIMARY:
                    counts["fallback"] += 1
            except OutcomeUnknown:
                unknown.add(key)
            await asyncio.sleep(0.002)

    writers = [asyncio.create_task(writer(w)) for w in range(2)]
    try:
        await wait_for(lambda: counts["ok"] > 100, 10, "traffic on the primary")
        await outage(dbs, primary)
        await wait_for(lambda: counts["fallback"] > 300, 15, "traffic on the fallback")
        await back_on_primary(dbs, primary)
        on_primary = counts["ok"]
        await wait_for(lambda: counts["ok"] > on_primary + 100, 10, "traffic after failback")
    finally:
        stop.set()
        await asyncio.gather(*writers)
        await dbs.close()
    rows = dict(sql(primary, "select id, v from acct"))
    wrong = {
        key: (value, rows.get(key))
        for key, value in expected.items()
        if key not in unknown and rows.get(key) != value
    }
    assert wrong == {}, f"{len(wrong)} acknowledged writes differ on the primary, e.g. {list(wrong.items())[:5]}"
    assert len(expected) > 300
    assert changes_left(fallback) == 0


async def test_truncate_on_the_fallback_is_reconciled(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pg_pair
    on_both(pg_pair, ITEMS)
    on_both(pg_pair, "insert into items select g, 'old' from generate_series(1, 50) g")
    dbs = await start(pg_pair)
    try:
        await outage(dbs, primary)
        await dbs.postgres.execute("truncate items")
        await dbs.postgres.execute("insert into items values (7, 'after truncate')")
        await back_on_primary(dbs, primary)
    finally:
        await dbs.close()
    assert sql(primary, "select id, note from items") == [(7, "after truncate")]


async def test_a_table_created_after_start_is_protected_before_its_first_write(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = pg_pair
    dbs = await start(pg_pair)
    try:
        on_both(pg_pair, "create table later (id int primary key, note text)")  # DDL is not replicated
        await outage(dbs, primary)
        await dbs.postgres.execute("insert into later values (1, 'written on the fallback')")
        await back_on_primary(dbs, primary)
        assert dbs.status()["postgres"]["reconcile"]["new_tables_protected"] == "at CREATE TABLE (event trigger)"
    finally:
        await dbs.close()
    assert sql(primary, "select id, note from later") == [(1, "written on the fallback")]


async def test_a_table_without_primary_key_is_named_in_a_warning_and_in_status(
    pg_pair: tuple[LocalServer, LocalServer], caplog: pytest.LogCaptureFixture
) -> None:
    on_both(pg_pair, "create table events_log (at timestamptz, what text)")
    on_both(pg_pair, ITEMS)
    with caplog.at_level(logging.WARNING, logger="failover"):
        dbs = await start(pg_pair)
    try:
        block = dbs.status()["postgres"]["reconcile"]
        assert block["unprotected_tables"] == ["public.events_log"]
        assert block["protected_tables"] == 1
        assert any("public.events_log has no primary key" in r.getMessage() for r in caplog.records)
    finally:
        await dbs.close()


async def test_listed_tables_only_and_missing_ones_reported(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pg_pair
    on_both(pg_pair, ITEMS)
    on_both(pg_pair, "create table other (id int primary key)")
    dbs = await start(pg_pair, FAILOVER_POSTGRES_TABLES="public.items,public.nothere")
    try:
        block = dbs.status()["postgres"]["reconcile"]
        assert block["protected_tables"] == 1
        assert block["missing_tables"] == ["public.nothere"]
        await outage(dbs, primary)
        await dbs.postgres.execute("insert into items values (1, 'x')")
        await dbs.postgres.execute("insert into other values (1)")
        assert sql(fallback, "select tbl from failover.changes") == [("public.items",)]
    finally:
        await dbs.close()


async def test_generated_ids_on_the_fallback_never_collide_with_the_primary(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = pg_pair
    on_both(pg_pair, "create table notes (id bigserial primary key, body text not null)")
    on_both(pg_pair, "create table small (id serial primary key, body text not null)")
    for table in ("notes", "small"):
        on_both(pg_pair, f"insert into {table} (body) values ('both 1'), ('both 2'), ('both 3')")
    dbs = await start(pg_pair, FAILOVER_FAILBACK_DELAY=2.0)
    try:
        await outage(dbs, primary)
        for table in ("notes", "small"):
            for n in range(5):
                await dbs.postgres.execute(f"insert into {table} (body) values (%s)", (f"fallback {n}",))
        await asyncio.to_thread(primary.start)
        for table in ("notes", "small"):  # the primary goes on generating ids meanwhile
            for n in range(5):
                sql(primary, f"insert into {table} (body) values (%s)", (f"primary {n}",))
        await wait_for(lambda: state(dbs) is SwitchState.ON_PRIMARY, 20, "failback")
        conflicts = await dbs.conflicts("postgres")
    finally:
        await dbs.close()
    assert conflicts == []
    for table in ("notes", "small"):
        bodies = sorted(b for (b,) in sql(primary, f"select body from {table}"))
        assert bodies == sorted(
            ["both 1", "both 2", "both 3"] + [f"fallback {n}" for n in range(5)] + [f"primary {n}" for n in range(5)]
        ), table
        # ... and the primary's own sequence goes on without meeting the copied rows
        sql(primary, f"insert into {table} (body) values ('after')")


@pytest.mark.parametrize(
    ("policy", "winner", "resolution"),
    [
        ("fallback_wins", "fallback", "fallback_kept"),
        ("primary_wins", "primary", "primary_kept"),
        ("newest_wins", "primary", "primary_kept"),
    ],
)
async def test_conflict_policies(
    pg_pair: tuple[LocalServer, LocalServer], policy: str, winner: str, resolution: str
) -> None:
    """The same row changed on the fallback during the outage and on the primary after it."""
    primary, fallback = pg_pair
    on_both(pg_pair, "create table doc (id int primary key, body text, secret_token text, updated_at timestamptz)")
    on_both(pg_pair, "insert into doc values (1, 'original', 's3cr3t', '2026-01-01T00:00:00Z'), (2, 'untouched', 'x', '2026-01-01T00:00:00Z')")
    events: list[Event] = []
    dbs = await start(pg_pair, FAILOVER_CONFLICT_POLICY=policy, FAILOVER_FAILBACK_DELAY=2.0)
    dbs.subscribe(events.append)
    try:
        await outage(dbs, primary)
        await dbs.postgres.execute("update doc set body = 'fallback', updated_at = now() where id = 1")
        await dbs.postgres.execute("update doc set body = 'fallback too', updated_at = now() where id = 2")
        await asyncio.to_thread(primary.start)
        sql(primary, "update doc set body = 'primary', updated_at = now() + interval '1 hour' where id = 1")
        await wait_for(lambda: state(dbs) is SwitchState.ON_PRIMARY, 20, "failback")
        conflicts = await dbs.conflicts()
    finally:
        await dbs.close()
    assert sql(primary, "select body from doc order by id") == [(winner,), ("fallback too",)]
    assert len(conflicts) == 1
    conflict = conflicts[0]
    assert conflict["store"] == "postgres"
    assert conflict["key"] == 'public.doc {"id": 1}'
    assert conflict["resolution"] == resolution
    assert conflict["primary"]["body"] == "primary" and conflict["fallback"]["body"] == "fallback"
    assert conflict["primary"]["secret_token"] == "***"  # secrets never reach the conflict log
    resolved = [e for e in events if isinstance(e, ConflictResolved)]
    assert [e.resolution for e in resolved] == [resolution]
    status = dbs.status()["postgres"]["reconcile"]
    assert status["conflicts"] == 1 and status["applied"] >= 1


async def test_apply_sessions_are_not_captured(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pg_pair
    on_both(pg_pair, ITEMS)
    dbs = await start(pg_pair)
    await dbs.close()
    with psycopg.connect(fallback.url, connect_timeout=3) as conn:
        conn.execute("select set_config('failover.applying', 'on', true)")
        conn.execute("insert into items values (1, 'applied')")
    assert changes_left(fallback) == 0
    sql(fallback, "insert into items values (2, 'application write')")
    assert sql(fallback, "select pk from failover.changes") == [({"id": 2},)]


async def test_reconcile_off_keeps_the_old_behaviour(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pg_pair
    on_both(pg_pair, ITEMS)
    # Warm sync off as well: it keeps its own objects in the fallback's failover schema, and the
    # behaviour from before both features installs nothing there.
    dbs = await start(pg_pair, FAILOVER_RECONCILE="false", FAILOVER_WARM="off")
    try:
        assert dbs.status()["postgres"]["reconcile"] == {"enabled": False}
        await outage(dbs, primary)
        await dbs.postgres.execute("insert into items values (1, 'stranded')")
        await back_on_primary(dbs, primary)
    finally:
        await dbs.close()
    assert sql(fallback, "select count(*) from pg_namespace where nspname = 'failover'") == [(0,)]
    assert sql(primary, "select count(*) from items") == [(0,)]


async def test_primary_failing_again_during_reconcile_keeps_traffic_on_the_fallback(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = pg_pair
    on_both(pg_pair, ITEMS)
    dbs = await start(pg_pair, FAILOVER_RECONCILE_BATCH=20)
    try:
        await outage(dbs, primary)
        async with dbs.postgres.connection() as conn:
            await conn.execute("insert into items select g, 'bulk' from generate_series(1, 20000) g")
        await asyncio.to_thread(primary.start)
        await wait_for(lambda: state(dbs) is SwitchState.RECONCILING, 10, "reconciling")
        await wait_for(lambda: (dbs.store("postgres").reconciler.applied or 0) > 0, 10, "first batches")  # type: ignore[union-attr]
        await asyncio.to_thread(primary.kill)
        await wait_for(lambda: state(dbs) is SwitchState.ON_FALLBACK, 10, "back on the fallback")
        assert await dbs.postgres.fetchone("select count(*) from items") == (20000,)
        await back_on_primary(dbs, primary, timeout=60)
    finally:
        await dbs.close()
    assert sql(primary, "select count(*), min(id), max(id) from items") == [(20000, 1, 20000)]
    assert changes_left(fallback) == 0


def _app(pair: tuple[LocalServer, LocalServer], *args: str, **env: str) -> subprocess.Popen[str]:
    environ = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "SUPABASE_DB_URL": pair[0].url,
        "POSTGRES_URL": pair[1].url,
        "HEALTH_CHECK_INTERVAL": "0.2",
        "FAILOVER_PROBE_TIMEOUT": "0.5",
        "FAILOVER_CONNECT_TIMEOUT": "0.5",
        "FAILOVER_OPERATION_TIMEOUT": "2",
        "FAILOVER_FAILBACK_DELAY": "1",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("reconcile_app.py")), *args],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


async def test_application_sigkilled_mid_reconcile_finishes_after_restart(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    """SIGKILL the reconciling process; a new one starts RECONCILING (traffic stays on the
    fallback) and finishes: every row once on the primary, the backlog empty."""
    primary, fallback = pg_pair
    on_both(pg_pair, ITEMS)
    dbs = await start(pg_pair)
    try:
        await outage(dbs, primary)
        async with dbs.postgres.connection() as conn:
            await conn.execute("insert into items select g, 'outage' from generate_series(1, 30000) g")
    finally:
        await dbs.close()
    assert changes_left(fallback) == 30000
    await asyncio.to_thread(primary.start)
    app = _app(pg_pair, FAILOVER_RECONCILE_BATCH="25")
    try:
        await wait_for(lambda: 0 < changes_left(fallback) < 29000, 30, "the first process reconciling")
    finally:
        app.send_signal(signal.SIGKILL)
        app.wait(10)
    left = changes_left(fallback)
    assert 0 < left < 30000, "the kill should land mid-reconcile"
    events: list[Event] = []
    dbs = Databases(fast_settings(SUPABASE_DB_URL=primary.url, POSTGRES_URL=fallback.url))
    dbs.subscribe(events.append)
    await dbs.start()
    try:
        assert state(dbs) in (SwitchState.RECONCILING, SwitchState.ON_PRIMARY)
        started_on = dbs.status()["postgres"]["transitions"][-1]["to"]
        assert started_on == "RECONCILING", "a backlog left by a dead process must hold traffic on the fallback"
        await wait_for(lambda: state(dbs) is SwitchState.ON_PRIMARY, 60, "the second process finishing")
    finally:
        await dbs.close()
    assert sql(primary, "select count(*), count(distinct id), min(id), max(id) from items") == [(30000, 30000, 1, 30000)]
    assert changes_left(fallback) == 0
    assert any(isinstance(e, ReconcileCompleted) and e.ok for e in events)


async def test_two_processes_share_one_pair_and_strand_nothing(pg_pair: tuple[LocalServer, LocalServer], tmp_path: Path) -> None:
    """Two application processes write through a primary SIGKILL; one fails back seconds
    before the other, which keeps writing to the fallback meanwhile. Every acknowledged
    insert of both ends up on the primary."""
    primary, fallback = pg_pair
    on_both(pg_pair, ITEMS)
    acks = [tmp_path / "acks-1", tmp_path / "acks-2"]
    early = _app(pg_pair, "--writer", "1", "--duration", "8", "--acks", str(acks[0]))
    late = _app(pg_pair, "--writer", "2", "--duration", "11", "--acks", str(acks[1]), FAILOVER_FAILBACK_DELAY="4")
    try:
        await wait_for(lambda: all(p.exists() and p.stat().st_size > 200 for p in acks), 20, "both writing")
        await asyncio.to_thread(primary.kill)
        await asyncio.sleep(2.0)  # the outage itself: both processes write to the fallback
        await asyncio.to_thread(primary.start)
        outs = await asyncio.gather(*(asyncio.to_thread(p.communicate, timeout=60) for p in (early, late)))
    finally:
        for p in (early, late):
            if p.poll() is None:
                p.kill()
                p.wait(10)
    for (out, _err), proc in zip(outs, (early, late)):
        assert proc.returncode == 0, out
        assert "done" in out
    acknowledged = {int(line) for path in acks for line in path.read_text().split()}
    on_primary = {row[0] for row in sql(primary, "select id from items")}
    missing = acknowledged - on_primary
    assert len(acknowledged) > 500
    assert {k // 1_000_000 for k in acknowledged} == {1, 2}
    assert missing == set(), f"{len(missing)} acknowledged rows are not on the primary"
    await wait_for(lambda: changes_left(fallback) == 0, 10, "no backlog left")
