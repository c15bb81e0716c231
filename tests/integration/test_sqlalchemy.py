"""SQLAlchemy 2 (asyncio) on failover, on real PostgreSQL servers (issue 12).

The ORM, Core and session.begin() work unchanged on dbs.postgres.sqlalchemy_engine();
a disconnect feeds the breaker and keeps its meaning (rolled back or unknown) while
staying a DBAPIError; examples/sqlalchemy_app.py survives a primary crash under load.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy
from sqlalchemy import Integer, String, func, insert, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from failover import Databases, OperationTimeout, OutcomeUnknown, SwitchState, TransactionRolledBack
from failover.local import LocalServer
from failover.local.proxy import FaultProxy, proxied_url

from ..helpers import FAST, fast_settings, wait_for
from .continuity import Continuity, OwnedKeyWriters, across_an_outage, missing
from .test_service import http_server

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sqlalchemy_app.py"
Pair = tuple[LocalServer, LocalServer]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "sa_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    note: Mapped[str] = mapped_column(String(100))


def create_schema(metadata: sqlalchemy.MetaData, *servers: LocalServer) -> None:
    for server in servers:
        engine = sqlalchemy.create_engine(server.url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            metadata.create_all(engine)
        finally:
            engine.dispose()


def item_ids(server: LocalServer, table: str = "sa_items") -> list[Any]:
    with psycopg.connect(server.url, connect_timeout=2) as conn:
        return [row[0] for row in conn.execute(f"select id from {table} order by id")]  # noqa: S608


async def databases(primary_url: str, fallback_url: str, **overrides: Any) -> Databases:
    # These tests tell where a transaction ran by which server holds its rows: a cold fallback
    # (a warm one holds copies of the primary's rows; warm sync has tests of its own).
    overrides.setdefault("FAILOVER_WARM", "off")
    dbs = Databases(fast_settings(SUPABASE_DB_URL=primary_url, POSTGRES_URL=fallback_url, **overrides))
    await dbs.start()
    return dbs


def state(dbs: Databases) -> SwitchState:
    return dbs.store("postgres").state


async def test_orm_core_and_session_begin_work_unchanged_and_follow_a_failover(pg_pair: Pair) -> None:
    primary, fallback = pg_pair
    create_schema(Base.metadata, primary, fallback)
    dbs = await databases(primary.url, fallback.url)
    engine = dbs.postgres.sqlalchemy_engine()
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    try:
        assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
        async with sessions() as session:  # ORM
            session.add(Item(id=1, note="orm"))
            await session.commit()
        async with sessions() as session, session.begin():  # session.begin()
            session.add(Item(id=2, note="begin"))
        async with engine.begin() as conn:  # Core
            await conn.execute(insert(Item).values(id=3, note="core"))
            assert (await conn.execute(select(func.count()).select_from(Item))).scalar_one() == 3
        assert item_ids(primary) == [1, 2, 3]

        await asyncio.to_thread(primary.kill)
        # Pooled connections to the dead primary are discarded at checkout (their sockets saw
        # the hang-up), and the new ones come from the fallback: no error at all.
        async with sessions() as session, session.begin():
            session.add(Item(id=4, note="after the crash"))
        assert state(dbs) is SwitchState.ON_FALLBACK
        async with sessions() as session:
            found = await session.get(Item, 4)
            assert found is not None and found.note == "after the crash"
        assert item_ids(fallback) == [4]
    finally:
        await engine.dispose()
        await dbs.close()


async def test_a_switch_discards_pooled_connections_to_the_old_endpoint(pg_pair: Pair) -> None:
    primary, fallback = pg_pair
    create_schema(Base.metadata, primary, fallback)
    dbs = await databases(primary.url, fallback.url)
    engine = dbs.postgres.sqlalchemy_engine(pool_size=3)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("select inet_server_port()"))).scalar_one() == primary.port
        assert engine.pool.checkedin() == 1
        dbs.pin("postgres", "fallback")  # a switch with both servers alive
        await wait_for(lambda: engine.pool.checkedin() == 0, 5, "the pool disposed after the switch")
        async with engine.connect() as conn:
            assert (await conn.execute(text("select inet_server_port()"))).scalar_one() == fallback.port
    finally:
        await engine.dispose()
        await dbs.close()


async def test_a_disconnect_feeds_the_breaker_and_raises_a_rolled_back_dbapi_error(pg_pair: Pair) -> None:
    primary, fallback = pg_pair
    create_schema(Base.metadata, primary, fallback)
    dbs = await databases(primary.url, fallback.url, HEALTH_CHECK_INTERVAL=30)  # only live traffic detects
    engine = dbs.postgres.sqlalchemy_engine()
    sessions = async_sessionmaker(engine)
    try:
        with pytest.raises(DBAPIError) as caught:
            async with sessions() as session, session.begin():
                session.add(Item(id=5, note="first"))
                await session.flush()
                await asyncio.to_thread(primary.kill)
                session.add(Item(id=6, note="second"))
                await session.flush()
        error = caught.value
        assert isinstance(error, TransactionRolledBack) and error.retryable
        assert error.connection_invalidated
        assert isinstance(error.orig, psycopg.OperationalError)
        assert error.endpoint == "Primary PostgreSQL"
        assert state(dbs) is SwitchState.ON_FALLBACK  # the breaker heard it at once
        await asyncio.to_thread(primary.start)
        assert item_ids(primary) == [] and item_ids(fallback) == []
    finally:
        await engine.dispose()
        await dbs.close()


async def test_a_commit_cut_by_the_proxy_is_outcome_unknown(pg_pair: Pair) -> None:
    primary, fallback = pg_pair
    create_schema(Base.metadata, primary, fallback)
    proxy = await FaultProxy(primary.port).start()
    dbs = await databases(proxied_url(primary.url, proxy.port), fallback.url)
    engine = dbs.postgres.sqlalchemy_engine()
    sessions = async_sessionmaker(engine)
    loop = asyncio.get_running_loop()
    runs = 0

    async def write(session: AsyncSession) -> None:
        nonlocal runs
        runs += 1
        session.add(Item(id=7, note="committing"))
        await session.flush()
        proxy.delay(5.0)  # the COMMIT is held...
        loop.call_later(0.2, proxy.reset)  # ...and the connection reset while it waits

    try:
        with pytest.raises(OutcomeUnknown) as caught:
            await dbs.postgres.run_session_transaction(sessions, write)
        assert isinstance(caught.value, DBAPIError)
        assert not isinstance(caught.value, (TransactionRolledBack, OperationTimeout))
        assert runs == 1  # never run again after COMMIT was sent
        assert item_ids(fallback) == []
    finally:
        await engine.dispose()
        await dbs.close()
        await proxy.stop()


async def test_run_session_transaction_runs_a_serialization_failure_again(pg_pair: Pair) -> None:
    primary, fallback = pg_pair
    create_schema(Base.metadata, primary, fallback)
    with psycopg.connect(primary.url, autocommit=True) as admin:
        admin.execute("insert into sa_items values (1, '0')")
    dbs = await databases(primary.url, fallback.url)
    engine = dbs.postgres.sqlalchemy_engine()
    sessions = async_sessionmaker(engine)
    runs = 0

    async def bump(session: AsyncSession) -> str:
        nonlocal runs
        runs += 1
        await session.execute(text("set transaction isolation level repeatable read"))
        item = await session.get(Item, 1)
        assert item is not None
        if runs == 1:
            async with await psycopg.AsyncConnection.connect(primary.url, autocommit=True) as other:
                await other.execute("update sa_items set note = '100' where id = 1")
        item.note = str(int(item.note) + 1)
        await session.flush()
        return item.note

    try:
        assert await dbs.postgres.run_session_transaction(sessions, bump) == "101"
        assert runs == 2
    finally:
        await engine.dispose()
        await dbs.close()


async def test_plain_sessions_count_as_in_flight_and_wait_out_a_reconcile_hold(pg_pair: Pair) -> None:
    primary, fallback = pg_pair
    create_schema(Base.metadata, primary, fallback)
    dbs = await databases(primary.url, fallback.url)
    engine = dbs.postgres.sqlalchemy_engine()
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    admission = dbs.store("postgres").admission

    async def add(item_id: int) -> None:
        async with sessions() as session, session.begin():
            session.add(Item(id=item_id, note="plain"))

    try:
        # From checkout to checkin, a session's connection is an operation in flight.
        async with sessions() as session:
            assert admission.inflight == 0
            await session.execute(text("select 1"))
            assert admission.inflight == 1
            await session.commit()
            assert admission.inflight == 0

        # The final catch-up waits for a session in flight...
        async with sessions() as session:
            session.add(Item(id=1, note="in flight"))
            await session.flush()
            async with admission.hold():
                idle = asyncio.create_task(admission.idle())
                done, _ = await asyncio.wait({idle}, timeout=0.5)
                assert not done, "the hold did not wait for the session's transaction"
                await session.commit()
                await asyncio.wait_for(idle, 5)

        # ...and a session that starts during it waits for it to end (FAST: within 2 s).
        async with admission.hold():
            late = asyncio.create_task(add(2))
            done, _ = await asyncio.wait({late}, timeout=0.5)
            assert not done, "a session ran during the hold"
            assert admission.inflight == 0
        await asyncio.wait_for(late, 5)
        assert item_ids(primary) == [1, 2]

        # run_session_transaction is admitted as a whole: its checkout is not counted twice. A task
        # started inside it that opens a session after the run ended is counted again.
        go = asyncio.Event()
        seen: list[int] = []

        async def later() -> None:
            await go.wait()
            async with sessions() as session:
                await session.execute(text("select 1"))
                seen.append(admission.inflight)

        spawned: list[asyncio.Task[None]] = []

        async def add_three(session: AsyncSession) -> None:
            assert admission.inflight == 1
            session.add(Item(id=3, note="run_session_transaction"))
            spawned.append(asyncio.create_task(later()))

        await dbs.postgres.run_session_transaction(sessions, add_three)
        assert admission.inflight == 0
        go.set()
        await asyncio.wait_for(spawned[0], 5)
        assert seen == [1]
        assert admission.inflight == 0
        assert item_ids(primary) == [1, 2, 3]
    finally:
        await engine.dispose()
        await dbs.close()


async def test_in_flight_counting_survives_a_retried_checkout_and_a_hold_longer_than_the_timeout(
    pg_pair: Pair,
) -> None:
    primary, fallback = pg_pair
    create_schema(Base.metadata, primary, fallback)
    dbs = await databases(primary.url, fallback.url, FAILOVER_OPERATION_TIMEOUT=0.5)
    engine = dbs.postgres.sqlalchemy_engine()
    sessions = async_sessionmaker(engine)
    admission = dbs.store("postgres").admission
    refused: list[int] = []

    @sqlalchemy.event.listens_for(engine.sync_engine, "checkout")
    def refuse_once(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        # An application's own listener (a ping on checkout) refusing a connection after ours
        # counted it: SQLAlchemy reconnects on the same record and runs ours again.
        if not refused:
            refused.append(1)
            raise sqlalchemy.exc.DisconnectionError("refused by the application's listener")

    try:
        async with sessions() as session:
            await session.execute(text("select 1"))
            assert refused and admission.inflight == 1
        assert admission.inflight == 0

        # A hold that outlasts the operation timeout: the session gives up without sending anything.
        async with admission.hold():
            with pytest.raises(OperationTimeout, match="final catch-up held"):
                async with sessions() as session, session.begin():
                    session.add(Item(id=1, note="during the hold"))
            assert admission.inflight == 0
        assert item_ids(primary) == [] and item_ids(fallback) == []

        # An engine that opts out is neither counted nor held.
        unheld = dbs.postgres.sqlalchemy_engine(hold_for_reconcile=False)
        try:
            async with admission.hold():
                async with unheld.begin() as conn:
                    await conn.execute(insert(Item).values(id=2, note="not held"))
                    assert admission.inflight == 0
            assert item_ids(primary) == [2]
        finally:
            await unheld.dispose()
    finally:
        await engine.dispose()
        await dbs.close()


async def test_a_session_whose_server_died_is_no_longer_counted_in_flight(pg_pair: Pair) -> None:
    primary, fallback = pg_pair
    create_schema(Base.metadata, primary, fallback)
    dbs = await databases(primary.url, fallback.url, HEALTH_CHECK_INTERVAL=30)  # only live traffic detects
    engine = dbs.postgres.sqlalchemy_engine()
    sessions = async_sessionmaker(engine)
    admission = dbs.store("postgres").admission
    try:
        with pytest.raises(DBAPIError):
            async with sessions() as session, session.begin():
                await session.execute(text("select 1"))
                assert admission.inflight == 1
                await asyncio.to_thread(primary.kill)
                await session.execute(text("select 1"))  # the connection is invalidated
        # A count left behind would make every later final catch-up wait out its whole hold.
        assert admission.inflight == 0
        async with sessions() as session, session.begin():  # on the fallback now
            session.add(Item(id=4, note="after"))
        assert admission.inflight == 0
        assert item_ids(fallback) == [4]
    finally:
        await engine.dispose()
        await dbs.close()


async def test_plain_session_writers_lose_no_acknowledged_write_across_an_outage_and_failback(pg_pair: Pair) -> None:
    """8 writers, each the only one to write its key, through plain sessions that stay open ~150 ms
    (a request's work): kill the primary, write on the fallback, restart it; after reconcile,
    failback and the sweeps, the primary holds every key's last acknowledged value. A transaction
    left running across the final catch-up would commit on the fallback after failback, and the
    sweep would later copy it over the key's newer writes on the primary."""
    primary, fallback = pg_pair
    create_schema(Base.metadata, primary, fallback)
    # An operation timeout above the hold (2 s): a checkout that waits out a slow catch-up must
    # not give up (it would be counted as an error here).
    dbs = await databases(primary.url, fallback.url, FAILOVER_OPERATION_TIMEOUT=5)
    engine = dbs.postgres.sqlalchemy_engine(pool_size=8)
    sessions = async_sessionmaker(engine)
    upsert = text("insert into sa_items (id, note) values (:id, :note) on conflict (id) do update set note = excluded.note")

    async def write(key: int, n: int) -> str:
        async with sessions() as session, session.begin():
            await session.execute(upsert, {"id": key, "note": str(n)})
            await asyncio.sleep(0.15)  # open, its connection in flight, longer than a final catch-up takes
        return str(n)

    try:
        writers = OwnedKeyWriters(list(range(1, 9)), write)
        expected = await across_an_outage(Continuity("postgres"), dbs, primary, writers)
        with psycopg.connect(fallback.url, connect_timeout=2) as conn:  # nor one waiting for a sweep
            assert conn.execute("select count(*) from failover.changes").fetchone() == (0,)
        with psycopg.connect(primary.url, connect_timeout=2) as conn:
            on_primary = dict(conn.execute("select id, note from sa_items").fetchall())
        wrong = missing(expected, on_primary)
        assert not wrong, f"(key, acknowledged, on the primary): {wrong}"
    finally:
        await engine.dispose()
        await dbs.close()


async def test_a_session_kept_open_holds_failback_back_and_says_so(pg_pair: Pair) -> None:
    primary, fallback = pg_pair
    create_schema(Base.metadata, primary, fallback)
    dbs = await databases(primary.url, fallback.url, FAILOVER_RECONCILE_HOLD=0.3)
    engine = dbs.postgres.sqlalchemy_engine()
    sessions = async_sessionmaker(engine)
    try:
        await asyncio.to_thread(primary.kill)
        async with sessions() as session, session.begin():  # detects the crash, on the fallback
            session.add(Item(id=1, note="outage"))
        assert state(dbs) is SwitchState.ON_FALLBACK
        async with sessions() as kept:
            await kept.execute(text("select 1"))  # checked out, and kept so across the failback
            await asyncio.to_thread(primary.start)

            def held_up() -> bool:
                run = dbs.status()["postgres"]["reconcile"]["last_run"]
                return run is not None and "still in flight" in run["result"]

            await wait_for(held_up, 20, "a final catch-up that gave up on the open session")
            assert state(dbs) is not SwitchState.ON_PRIMARY
            await kept.commit()
        await wait_for(lambda: state(dbs) is SwitchState.ON_PRIMARY, 20, "failback once the session closed")
        assert item_ids(primary) == [1]
    finally:
        await engine.dispose()
        await dbs.close()


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sqlalchemy_app_under_test", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: the ORM resolves annotations through it
    spec.loader.exec_module(module)
    return module


async def test_example_app_survives_a_primary_crash_under_50_clients(
    pg_pair: Pair, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    primary, fallback = pg_pair
    monkeypatch.chdir(tmp_path)  # no stray .env
    # Default operation and connect timeouts: 50 clients reconnect to the fallback at once after the
    # crash, and on a loaded 2-core machine PostgreSQL took more than the fast 0.5 s to accept them.
    env = {**{k: str(v) for k, v in FAST.items()}, "FAILOVER_OPERATION_TIMEOUT": "5", "FAILOVER_CONNECT_TIMEOUT": "2"}
    env |= {"SUPABASE_DB_URL": primary.url, "POSTGRES_URL": fallback.url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    example = load_example()
    create_schema(example.Base.metadata, primary, fallback)
    app = example.app

    acknowledged: list[uuid.UUID] = []
    failures: list[str] = []
    stale_reads: list[float] = []  # when the POST of a note the fallback did not have started
    stop = asyncio.Event()

    async def client(http: httpx.AsyncClient, number: int) -> None:
        while not stop.is_set():
            posted = time.monotonic()
            try:
                created = await http.post("/notes", json={"body": f"client {number}"})
                if created.status_code != 201:
                    failures.append(f"POST {created.status_code} {created.text[:200]}")
                    continue
                note_id = created.json()["id"]
                acknowledged.append(uuid.UUID(note_id))
                read = await http.get(f"/notes/{note_id}")
                if read.status_code == 404:
                    # Written on the primary, read after the failover: the fallback does not
                    # have it (yet). Only possible for a note written before the crash.
                    stale_reads.append(posted)
                elif read.status_code != 200:
                    failures.append(f"GET {read.status_code} {read.text[:200]}")
            except httpx.HTTPError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    async with http_server(app) as url:
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
            assert (await http.get("/notes")).json() == {"count": 0}
            clients = [asyncio.create_task(client(http, n)) for n in range(50)]
            try:
                await wait_for(lambda: len(acknowledged) > 300, 60, "notes written on the primary")
                await asyncio.to_thread(primary.kill)
                crashed = time.monotonic()
                before = len(acknowledged)
                await wait_for(lambda: len(acknowledged) > before + 300, 60, "notes written on the fallback")
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*clients), 60)
            dbs = app.state.failover_databases
            assert dbs.status()["postgres"]["current_db"] == "Local PostgreSQL"
            counted = (await http.get("/notes")).json()["count"]
    assert failures == [], failures[:5]
    assert all(posted <= crashed for posted in stale_reads), "a note written after the crash was not readable"
    await asyncio.to_thread(primary.start)
    stored = Counter(item_ids(primary, "notes") + item_ids(fallback, "notes"))
    missing = [note for note in acknowledged if note not in stored]
    assert missing == [], f"{len(missing)} acknowledged notes are on neither server"
    assert counted == len(item_ids(fallback, "notes"))
