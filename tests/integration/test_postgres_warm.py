"""PostgreSQL warm sync on real servers: the fallback follows the primary, and the lag is measured.

Every check reads the servers with the raw driver; the status document is what is
being tested, never the way to verify it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from failover import Databases
from failover.core.events import Event
from failover.local import LocalServer

from ..helpers import wait_for
from .continuity import AckedWriter, Continuity, missing

pytestmark = pytest.mark.integration

STORE = Continuity("postgres")
state, warm, streaming, outage, failback = STORE.state, STORE.warm, STORE.streaming, STORE.outage, STORE.failback


async def start(pair: tuple[LocalServer, LocalServer], **overrides: Any) -> Databases:
    return await STORE.start(*pair, **overrides)

ITEMS = "create table if not exists items (id bigserial primary key, note text not null, n bigint not null default 0)"


def sql(server: LocalServer, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement on *server* with the raw driver (autocommit); return its rows."""
    with psycopg.connect(server.url, connect_timeout=3, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def on_both(pair: tuple[LocalServer, LocalServer], statement: str) -> None:
    for server in pair:
        sql(server, statement)


def subscription(fallback: LocalServer) -> dict[str, Any]:
    """The subscription as the fallback's catalogs see it."""
    rows = sql(
        fallback,
        "select s.subenabled, (select count(*) from pg_stat_subscription w where w.subid = s.oid and w.pid is not null), "
        "coalesce(st.apply_error_count, 0), coalesce(st.sync_error_count, 0) "
        "from pg_subscription s left join pg_stat_subscription_stats st on st.subid = s.oid "
        "where s.subname = 'failover_warm'",
    )
    if not rows:
        return {}
    enabled, workers, apply_errors, sync_errors = rows[0]
    return {"enabled": enabled, "workers": workers, "apply_errors": apply_errors, "sync_errors": sync_errors}


class Writer(AckedWriter[int]):
    """Inserts (default ids), updates and deletes of its own rows through failover."""

    def __init__(self, dbs: Databases) -> None:
        super().__init__()
        self.dbs = dbs

    async def step(self, i: int) -> tuple[int, str | None]:
        live = self.live()
        if i % 4 == 3 and live:
            self.pending = key = live[(i * 7919) % len(live)]
            await self.dbs.postgres.execute("update items set note = %s where id = %s", (f"u{i}", key))
            return key, f"u{i}"
        if i % 10 == 9 and live:
            self.pending = key = live[(i * 104729) % len(live)]
            await self.dbs.postgres.execute("delete from items where id = %s", (key,))
            return key, None
        row = await self.dbs.postgres.fetchone("insert into items (note) values (%s) returning id", (f"i{i}",))
        return int(row[0]), f"i{i}"


def server_errors(server: LocalServer) -> list[str]:
    """ERROR lines of *server*'s log (for failure messages)."""
    log = server.data_dir.parent / f"{server.data_dir.name}.log"
    lines = log.read_text(errors="replace").splitlines()
    return [line for line in lines if "ERROR" in line or "CONTEXT" in line][-10:]


def rows(server: LocalServer) -> dict[int, str]:
    return {int(k): v for k, v in sql(server, "select id, note from items")}


async def test_a_write_on_the_primary_is_on_the_fallback_when_the_primary_dies_within_the_reported_lag(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = pg_pair
    on_both(pg_pair, ITEMS)
    dbs = await start(pg_pair)
    events: list[Event] = []
    dbs.events.subscribe(events.append)
    try:
        await streaming(dbs)
        assert subscription(fallback)["enabled"] is True
        writer = Writer(dbs).start()
        await asyncio.sleep(1.0)
        await writer.acknowledged(200)
        lag_before = warm(dbs)["lag_s"]
        assert lag_before is not None and lag_before < 1.0, warm(dbs)
        killed, status, rpo = await STORE.outage_under(dbs, primary, writer, events)
        # Nothing more lands on the fallback: the subscription is off, its workers gone.
        await wait_for(lambda: subscription(fallback)["workers"] == 0, 5, "subscription workers stopped")
        assert subscription(fallback)["enabled"] is False
        assert status["state"] == "off"
        # Every write acknowledged before the reported lag (plus one heartbeat of resolution) is there.
        horizon = killed - rpo - status["heartbeat_interval_s"] - 0.05
        expected = writer.expected_before(horizon)
        assert len(expected) > 50, "the writer made too few writes before the kill"
        # Read through failover: the store serves from the fallback now.
        served = {int(k): v for k, v in await dbs.postgres.fetch("select id, note from items")}
        assert missing(expected, served) == []
        later = writer.expected_before(killed + 1) .keys() - expected.keys()
        print(f"lag before {lag_before}s, rpo {rpo}s; {len(expected)} keys checked; {len(later)} written in the last window")
    finally:
        await dbs.close()


async def test_initial_copy_of_a_non_empty_primary_reports_progress_while_the_application_works(
    pg_pair: tuple[LocalServer, LocalServer], caplog: pytest.LogCaptureFixture
) -> None:
    primary, fallback = pg_pair
    on_both(pg_pair, ITEMS)
    on_both(pg_pair, "create table other (k text primary key, v int)")
    sql(primary, "insert into items (note) select 'row ' || g from generate_series(1, 400000) g")
    sql(primary, "insert into other select 'k' || g, g from generate_series(1, 1000) g")
    # The fallback holds an old version of some rows: the copy replaces them instead of stopping.
    sql(fallback, "insert into items (id, note) select g, 'stale' from generate_series(1, 100) g")
    caplog.set_level("INFO", logger="failover.warm")
    dbs = await start(pg_pair)
    try:
        seen, writes = await STORE.copy_while_writing(
            dbs, lambda i: dbs.postgres.execute("insert into other values (%s, 1)", (f"app{i}",)), 60
        )
        assert seen, "no copy progress was ever reported"
        last = seen[-1]
        assert last["rows_total"] and last["rows_total"] >= 400_000 * 0.9, last
        assert 0 < last["rows_done"] <= last["rows_total"], last
        assert writes > 0
        assert any("initial copy into" in r.getMessage() for r in caplog.records)
        await wait_for(lambda: (warm(dbs)["lag_s"] or 9) < 1, 10, "caught up")
        await wait_for(
            lambda: sql(fallback, "select count(*) from other")[0][0] == sql(primary, "select count(*) from other")[0][0],
            10,
            "the application's writes made during the copy reach the fallback",
        )
        assert sql(fallback, "select count(*), count(*) filter (where note = 'stale') from items")[0] == (400_000, 0)
        assert subscription(fallback)["apply_errors"] == 0 and subscription(fallback)["sync_errors"] == 0
        # Replicated rows are not captured as writes made on the fallback.
        assert sql(fallback, "select count(*) from failover.changes")[0][0] == 0
    finally:
        await dbs.close()


async def test_outage_reconcile_failback_and_a_second_outage_keep_every_acknowledged_write(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = pg_pair
    on_both(pg_pair, ITEMS)
    sql(primary, "insert into items (note) select 'seed ' || g from generate_series(1, 2000) g")
    dbs = await start(pg_pair)
    try:
        await streaming(dbs)
        writer = Writer(dbs).start()
        await asyncio.sleep(0.8)

        # First outage: the fallback takes the writes, the subscription is off.
        await outage(dbs, primary)
        await wait_for(lambda: subscription(fallback)["workers"] == 0, 5, "subscription stopped")
        await asyncio.sleep(1.0)
        on_fallback = sql(fallback, "select count(*) from failover.changes")[0][0]
        assert on_fallback > 0, "no write landed on the fallback during the outage"

        # Reconcile and failback: the subscription resumes from its slot, without stalling.
        await failback(dbs, primary)
        await wait_for(lambda: subscription(fallback).get("enabled") is True, 10, "subscription enabled again")
        # The apply worker's connection broke when the primary died (one error, before failover
        # stopped the subscription): from here on there must be none.
        base = subscription(fallback)
        await asyncio.sleep(1.0)
        await wait_for(lambda: warm(dbs)["state"] == "streaming" and (warm(dbs)["lag_s"] or 9) < 1, 15, "caught up")
        assert warm(dbs)["copy"] is None, "failback started a new initial copy"
        sub = subscription(fallback)
        assert sub["workers"] >= 1, sub
        assert (sub["apply_errors"], sub["sync_errors"]) == (base["apply_errors"], base["sync_errors"]), (
            sub,
            server_errors(fallback),
        )
        assert warm(dbs)["apply_errors"] == 0

        # Second outage: the fallback serves the data the primary had when it died.
        lag = warm(dbs)["lag_s"]
        killed = await outage(dbs, primary)
        rpo = warm(dbs)["rpo_at_last_failover_s"]
        assert rpo is not None and rpo < 1.0, warm(dbs)
        horizon = killed - max(rpo, lag) - warm(dbs)["heartbeat_interval_s"] - 0.05
        async with writer.lock:  # no write in flight whose record is not written yet
            expected = writer.expected_before(horizon)
            served = {int(k): v for k, v in await dbs.postgres.fetch("select id, note from items")}
        assert missing(expected, served) == [], "the fallback lacks writes made on the primary before the second outage"
        await asyncio.sleep(0.8)
        await failback(dbs, primary)
        await writer.stop()
        assert not writer.errors, writer.errors[:3]

        # Every acknowledged write is on the primary (raw driver), and the fallback converges to it.
        assert missing(writer.expected_before(time.monotonic() + 1), rows(primary)) == []
        await wait_for(lambda: (warm(dbs)["lag_s"] or 9) < 1, 15, "caught up after the second failback")
        await wait_for(lambda: rows(fallback) == rows(primary), 10, "fallback equal to primary")
        sub = subscription(fallback)
        # The second kill may cost the worker one connection error too; nothing else.
        assert sub["apply_errors"] <= base["apply_errors"] + 1 and sub["sync_errors"] == base["sync_errors"], (
            sub,
            server_errors(fallback),
        )
        assert warm(dbs)["apply_errors"] == 0
        # Ids generated on the fallback stayed clear of the primary's.
        fallback_next = sql(fallback, "select last_value from items_id_seq")[0][0]
        primary_max = sql(primary, "select max(id) from items where id < 1000000000")[0][0]
        assert fallback_next > primary_max + 1_000_000_000
    finally:
        await dbs.close()


async def test_warm_off_leaves_the_fallback_cold(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pg_pair
    on_both(pg_pair, ITEMS)
    dbs = await start(pg_pair, FAILOVER_WARM="off")
    try:
        await dbs.postgres.execute("insert into items (note) values ('primary only')")
        await asyncio.sleep(1.0)
        assert warm(dbs) == {"enabled": False, "state": "off", "lag_s": None}
        assert sql(fallback, "select count(*) from items")[0][0] == 0
        assert sql(fallback, "select count(*) from pg_subscription")[0][0] == 0
        assert sql(primary, "select count(*) from pg_publication")[0][0] == 0
    finally:
        await dbs.close()


async def test_the_service_shows_warm_sync_in_health_details_and_metrics(pg_pair: tuple[LocalServer, LocalServer]) -> None:
    from failover.service import create_app
    from tests.integration.test_service import _sample, serving, stack_settings

    on_both(pg_pair, ITEMS)
    token = "tok-warm-11"
    auth = {"Authorization": f"Bearer {token}"}
    app = create_app(stack_settings(pg_pair, FAILOVER_HEALTH_TOKEN=token))
    async with serving(app) as client:

        async def streaming_in_health() -> dict[str, Any]:
            deadline = time.monotonic() + 30
            while True:
                body = (await client.get("/api/v1/health/databases", headers=auth)).json()
                doc = body["postgres"].get("warm") or {}
                if doc.get("state") == "streaming" and doc.get("lag_s") is not None:
                    return doc
                assert time.monotonic() < deadline, body["postgres"].get("warm")
                await asyncio.sleep(0.1)

        doc = await streaming_in_health()
        assert doc["lag_s"] < 1.0 and doc["apply_errors"] == 0 and doc["synced_tables"] == ["public.items"]
        metrics = (await client.get("/metrics", headers=auth)).text
        lag = _sample(metrics, "failover_warm_lag_seconds", store="postgres")
        assert lag is not None and lag < 1.0
        assert _sample(metrics, "failover_warm_state", store="postgres", state="streaming") == 1.0


async def test_a_table_created_later_joins_with_its_rows_and_a_table_missing_on_the_fallback_is_named(
    pg_pair: tuple[LocalServer, LocalServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    import failover.core.warm as warm_module

    monkeypatch.setattr(warm_module, "DEFAULT_REFRESH_INTERVAL", 0.5)  # the table set is checked every 10 s otherwise
    primary, fallback = pg_pair
    on_both(pg_pair, ITEMS)
    sql(primary, "create table later (k int primary key, v text)")
    sql(primary, "insert into later select g, 'v' || g from generate_series(1, 500) g")
    dbs = await start(pg_pair)
    try:
        await streaming(dbs)
        assert warm(dbs)["missing_on_fallback"] == ["public.later"]
        assert warm(dbs)["synced_tables"] == ["public.items"]
        sql(fallback, "create table later (k int primary key, v text)")  # DDL is not replicated: the user creates it
        await wait_for(lambda: "public.later" in warm(dbs)["synced_tables"], 10, "the new table synced")
        await wait_for(lambda: sql(fallback, "select count(*) from later")[0][0] == 500, 10, "its rows copied")
        await dbs.postgres.execute("insert into later values (501, 'new')")
        await wait_for(lambda: sql(fallback, "select count(*) from later")[0][0] == 501, 10, "streamed")
        assert warm(dbs)["missing_on_fallback"] == []
        assert subscription(fallback)["apply_errors"] == 0 and subscription(fallback)["sync_errors"] == 0
    finally:
        await dbs.close()


async def test_the_subscription_leaves_rows_written_on_the_fallback_until_they_are_reconciled(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    """Several processes share the pair: one fails back and resumes the subscription while another
    still writes on the fallback. The primary's version must not overwrite such a write before
    reconcile has copied it (it would be lost: reconcile copies the fallback's current row)."""
    from failover.stores.postgres.capture import _LOCK_KEY

    primary, fallback = pg_pair
    on_both(pg_pair, ITEMS)
    sql(primary, "insert into items (id, note) values (1, 'one'), (2, 'two')")
    dbs = await start(pg_pair)
    try:
        await streaming(dbs)
        await wait_for(lambda: rows(fallback) == rows(primary), 10, "initial copy")
        base = subscription(fallback)
        with psycopg.connect(fallback.url, connect_timeout=3, autocommit=True) as holder:
            holder.execute("select pg_advisory_lock(%s)", (_LOCK_KEY,))  # no reconcile run meanwhile
            # Another process, still on the fallback, writes there (captured for reconcile) ...
            sql(fallback, "update items set note = 'fallback' where id = 1")
            assert sql(fallback, "select count(*) from failover.changes")[0][0] == 1
            # ... while the primary changes the same row, another row, and adds one.
            sql(primary, "update items set note = 'primary' where id = 1")
            sql(primary, "update items set note = 'primary' where id = 2")
            sql(primary, "insert into items (id, note) values (3, 'three')")
            await wait_for(lambda: rows(fallback).get(3) == "three", 10, "the primary's later insert streamed")
            assert rows(fallback) == {1: "fallback", 2: "primary", 3: "three"}
            # A delete and a re-insert of that key on the primary leave it alone too.
            sql(primary, "delete from items where id = 1")
            sql(primary, "insert into items (id, note) values (1, 'primary again'), (4, 'four')")
            await wait_for(lambda: 4 in rows(fallback), 10, "the primary's later insert streamed")
            assert rows(fallback)[1] == "fallback"
            sub = subscription(fallback)
            assert (sub["apply_errors"], sub["sync_errors"]) == (base["apply_errors"], base["sync_errors"]), (
                sub,
                server_errors(fallback),
            )
        # Lock released: a sweep reconciles row 1 (the fallback's write wins by default), and the
        # copy into the primary streams back: both sides agree.
        await wait_for(lambda: sql(fallback, "select count(*) from failover.changes")[0][0] == 0, 15, "reconciled")
        await wait_for(lambda: rows(fallback) == rows(primary), 10, "fallback equal to primary")
        assert rows(primary) == {1: "fallback", 2: "primary", 3: "three", 4: "four"}
    finally:
        await dbs.close()


async def test_an_older_apply_trigger_is_replaced_and_a_key_column_may_have_any_name(
    pg_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = pg_pair
    on_both(pg_pair, "create table odd (r int primary key, failover_row_ text)")
    # What an older version left on the fallback: a BEFORE INSERT trigger on a function of its own.
    sql(fallback, "create schema if not exists failover")
    sql(
        fallback,
        "create function failover.old_apply() returns trigger language plpgsql as "
        "$$ begin delete from odd where r = NEW.r; return NEW; end $$",
    )
    sql(fallback, "create trigger failover_warm_apply before insert on odd for each row execute function failover.old_apply()")
    sql(fallback, "alter table odd enable replica trigger failover_warm_apply")
    sql(primary, "insert into odd values (1, 'a'), (2, 'b')")

    def odd(server: LocalServer) -> list[tuple[Any, ...]]:
        return sql(server, "select * from odd order by r")

    dbs = await start(pg_pair)
    try:
        await streaming(dbs)
        await wait_for(lambda: odd(fallback) == odd(primary), 10, "initial copy")
        function = sql(
            fallback, "select tgfoid::regproc::text from pg_trigger where tgrelid = 'odd'::regclass and tgname = 'failover_warm_apply'"
        )
        assert function and function[0][0].startswith("failover.warm_apply_v2_"), function
        base = subscription(fallback)
        sql(primary, "update odd set failover_row_ = 'changed' where r = 1")
        sql(primary, "delete from odd where r = 2")
        sql(primary, "insert into odd values (3, 'c')")
        await wait_for(lambda: odd(fallback) == [(1, "changed"), (3, "c")], 10, "updates, deletes and inserts applied")
        sub = subscription(fallback)
        assert (sub["apply_errors"], sub["sync_errors"]) == (base["apply_errors"], base["sync_errors"]), server_errors(fallback)
    finally:
        await dbs.close()
