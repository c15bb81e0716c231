"""The service's reconcile surfaces on a real PostgreSQL pair.

An item written during an outage reaches the primary before traffic does; the
store shows ``RECONCILING`` (and the service ``degraded``) meanwhile; a key the
primary changed too is a conflict that ``GET /api/v1/conflicts``, the dashboard
state, the metrics and ``failover conflicts`` all show.

The reconcile is held back deterministically by taking the pair's reconcile
lock on the fallback (as another process would): the store then stays
``RECONCILING`` with traffic on the fallback until the lock is released, which
leaves time to look at every surface and to write the conflicting row on the
primary. No test waits by sleeping: each polls for its condition with a deadline.

The items resource: its table, created on a fallback after capture was installed,
is captured from its first write; an item written while every store is down is
whole after failback (an xfail, not a pass, on a tree where MongoDB or Redis capture is off).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from failover.core.events import Event, StateChanged
from failover.local import LocalServer
from failover.service import create_app
from failover.stores.postgres.capture import _LOCK_KEY
from tests.integration.test_cli import clean_env, run_cli
from tests.integration.test_service import _sample, databases_of, http_server, serving, stack_settings, wait_status

pytestmark = pytest.mark.integration

Pair = tuple[LocalServer, LocalServer]
TOKEN = "tok-reconcile-5"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _row(server: LocalServer, item_id: str) -> tuple[Any, ...] | None:
    """The item's row read straight from *server* with the raw driver."""
    async with await psycopg.AsyncConnection.connect(server.url) as conn:
        cur = await conn.execute("select name, payload from items where id = %s", (item_id,))
        return await cur.fetchone()


async def _poll_http(client: httpx.AsyncClient, path: str, predicate: Any, what: str, timeout: float = 20) -> Any:
    """GET *path* until *predicate(json)* holds; return that JSON."""
    last: Any = None

    async def check() -> bool:
        nonlocal last
        last = (await client.get(path, headers=AUTH)).json()
        return bool(predicate(last))

    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g}s; last answer: {last}")
        await asyncio.sleep(0.05)
    return last


async def test_outage_items_reconcile_before_failback_and_the_conflict_is_listed(pg_pair: Pair, tmp_path: Path) -> None:
    primary, fallback = pg_pair
    app = create_app(stack_settings(pg_pair, FAILOVER_HEALTH_TOKEN=TOKEN))
    async with http_server(app) as url, httpx.AsyncClient(base_url=url, timeout=15) as client:
        dbs = databases_of(app)
        status = (await client.get("/api/v1/health/databases", headers=AUTH)).json()
        assert status["postgres"]["reconcile"]["enabled"] is True
        assert status["postgres"]["reconcile"]["capture_installed"] is True
        assert status["postgres"]["reconcile"]["policy"] == "fallback_wins"
        before = await client.post("/api/v1/items", json={"name": "before"}, headers=AUTH)
        assert before.status_code == 201 and before.json()["stores"]["postgres"]["served_by"] == "primary"

        # Outage: items land on the fallback.
        await asyncio.to_thread(primary.kill)
        await wait_status(app, lambda s: s["postgres"]["state"] == "ON_FALLBACK", "postgres on its fallback")
        outage = []
        for n in range(3):
            r = await client.post("/api/v1/items", json={"name": f"outage-{n}", "payload": {"n": n}}, headers=AUTH)
            assert r.status_code == 201, r.text
            assert r.json()["stores"]["postgres"]["served_by"] == "fallback"
            outage.append(r.json()["id"])

        # Another "process" holds the pair's reconcile lock: the store will wait in RECONCILING.
        async with await psycopg.AsyncConnection.connect(fallback.url, autocommit=True) as holder:
            await holder.execute("select pg_advisory_lock(%s)", (_LOCK_KEY,))
            await asyncio.to_thread(primary.start)
            health = await _poll_http(
                client, "/api/v1/health/databases", lambda s: s["postgres"]["state"] == "RECONCILING", "RECONCILING"
            )
            assert health["overall_status"] == "degraded"
            assert health["postgres"]["using_primary"] is False and health["postgres"]["primary_healthy"] is True
            reconcile = health["postgres"]["reconcile"]
            assert reconcile["backlog"] >= 3, reconcile
            assert {"applied", "conflicts", "rate_per_s", "last_run", "error", "unprotected_tables"} <= set(reconcile)
            await _poll_http(
                client,
                "/api/v1/health/databases",
                lambda s: s["postgres"]["reconcile"]["state"] == "waiting_for_lock",
                "the reconciler waiting for the lock",
            )

            # While traffic is still on the fallback, the primary gets its own version of an outage item.
            async with await psycopg.AsyncConnection.connect(primary.url, autocommit=True) as conn:
                await conn.execute("insert into items (id, name) values (%s, 'primary-version')", (outage[0],))

            # Every surface says RECONCILING and shows the backlog.
            state = (await client.get("/api/v1/dashboard/state", headers=AUTH)).json()
            assert state["status"]["postgres"]["state"] == "RECONCILING"
            assert state["status"]["overall_status"] == "degraded"
            assert state["conflicts"] == [] and state["reconcile_runs"] == {}  # no run has the lock
            metrics = (await client.get("/metrics", headers=AUTH)).text
            assert (_sample(metrics, "failover_reconcile_backlog", store="postgres") or 0) >= 3
            assert _sample(metrics, "failover_store_state", store="postgres", state="RECONCILING") == 1.0
            read = await client.get(f"/api/v1/items/{outage[1]}", headers=AUTH)
            assert read.json()["stores"]["postgres"] == {"ok": True, "found": True, "served_by": "fallback", "endpoint": "Local PostgreSQL"}
        # The lock holder is gone: reconcile, then failback.
        health = await _poll_http(
            client, "/api/v1/health/databases", lambda s: s["overall_status"] == "healthy", "healthy after failback"
        )
        assert health["postgres"]["state"] == "ON_PRIMARY"
        reconcile = health["postgres"]["reconcile"]
        assert reconcile["backlog"] == 0 and reconcile["applied"] >= 3 and reconcile["conflicts"] == 1, reconcile
        assert reconcile["last_run"]["result"] == "completed" and reconcile["last_run"]["gated"] is True
        assert reconcile["last_run"]["hold_s"] is not None

        # Every outage item is on the primary, with the fallback's version where both wrote (fallback_wins).
        for n, item_id in enumerate(outage):
            assert await _row(primary, item_id) == (f"outage-{n}", {"n": n})
            read = await client.get(f"/api/v1/items/{item_id}", headers=AUTH)
            assert read.status_code == 200 and read.json()["stores"]["postgres"]["served_by"] == "primary"
            assert read.json()["name"] == f"outage-{n}"

        # The conflict is listed, newest first, with both versions summarised.
        listed = (await client.get("/api/v1/conflicts", headers=AUTH)).json()["conflicts"]
        assert len(listed) == 1, listed
        conflict = listed[0]
        assert conflict["store"] == "postgres" and outage[0] in conflict["key"]
        assert conflict["resolution"] == "fallback_kept"
        assert conflict["primary"]["name"] == "primary-version" and conflict["fallback"]["name"] == "outage-0"
        assert (await client.get("/api/v1/conflicts", params={"store": "postgres", "limit": 1}, headers=AUTH)).json() == {
            "conflicts": listed
        }
        for bad in ({"store": "mysql"}, {"store": "redis"}, {"limit": 0}, {"limit": "ten"}, {"limit": 100000}):
            answer = await client.get("/api/v1/conflicts", params=bad, headers=AUTH)
            assert answer.status_code == 400, (bad, answer.text)
        assert (await client.get("/api/v1/conflicts")).status_code == 401
        assert (await client.get("/api/v1/conflicts", headers={"Authorization": "Bearer nope"})).status_code == 401

        # The dashboard lists it, and the metrics count it with the run and its write hold.
        state = await _poll_http(client, "/api/v1/dashboard/state", lambda s: s["conflicts"], "a conflict on the dashboard")
        assert state["conflicts"][0]["key"] == conflict["key"]
        metrics = (await client.get("/metrics", headers=AUTH)).text
        assert _sample(metrics, "failover_reconcile_backlog", store="postgres") == 0.0
        assert (_sample(metrics, "failover_reconcile_applied_total", store="postgres") or 0) >= 3
        assert _sample(metrics, "failover_reconcile_conflicts_total", store="postgres", resolution="fallback_kept") == 1.0
        assert (_sample(metrics, "failover_reconcile_runs_total", store="postgres", result="ok") or 0) >= 1
        assert (_sample(metrics, "failover_reconcile_duration_seconds_count", store="postgres", result="ok") or 0) >= 1
        assert (_sample(metrics, "failover_reconcile_hold_seconds_count", store="postgres") or 0) >= 1
        assert _sample(metrics, "failover_reconcile_unprotected_tables", store="postgres") == 0.0

        # failover conflicts: from the service (token from the environment, never printed) ...
        env = clean_env(FAILOVER_HEALTH_TOKEN=TOKEN)
        code, out, err = await run_cli("conflicts", "--url", url, "--json", env=env, cwd=tmp_path)
        assert code == 0, err
        assert json.loads(out) == {"conflicts": listed}
        code, out, err = await run_cli("conflicts", "--url", url, "--store", "postgres", env=env, cwd=tmp_path)
        assert code == 0, err
        assert "fallback_kept" in out and outage[0] in out and "primary-version" in out
        code, out, err = await run_cli("conflicts", "--url", url, env=clean_env(), cwd=tmp_path)
        assert code == 1 and "wants a token" in err
        # ... and straight from the fallback, without a service.
        direct = clean_env(SUPABASE_DB_URL=primary.url, POSTGRES_URL=fallback.url)
        code, out, err = await run_cli("conflicts", "--json", "--limit", "5", env=direct, cwd=tmp_path)
        assert code == 0, err
        assert [c["key"] for c in json.loads(out)["conflicts"]] == [conflict["key"]]
        code, _, err = await run_cli("conflicts", "--store", "redis", env=direct, cwd=tmp_path)
        assert code == 2 and "not configured" in err
        for text in (out, err):
            assert TOKEN not in text
        assert dbs.status()["overall_status"] == "healthy"


async def test_overall_status_is_degraded_for_the_whole_reconcile(pg_pair: Pair) -> None:
    """Every status document taken while a store is RECONCILING says degraded (checked at each transition)."""
    primary, fallback = pg_pair
    app = create_app(stack_settings(pg_pair))
    async with serving(app) as client:
        dbs = databases_of(app)
        seen: list[tuple[str, str]] = []

        def on_event(event: Event) -> None:
            if isinstance(event, StateChanged):  # the switch has moved: the status is the new one
                seen.append((str(event.to_state), dbs.status()["overall_status"]))

        unsubscribe = dbs.subscribe(on_event)
        try:
            await asyncio.to_thread(primary.kill)
            await wait_status(app, lambda s: s["postgres"]["state"] == "ON_FALLBACK", "postgres on its fallback")
            assert (await client.post("/api/v1/items", json={"name": "during"})).status_code == 201
            await asyncio.to_thread(primary.start)
            await wait_status(app, lambda s: s["overall_status"] == "healthy", "healthy after failback", timeout=20)
        finally:
            unsubscribe()
        assert ("RECONCILING", "degraded") in seen, seen
        assert seen[-1] == ("ON_PRIMARY", "healthy"), seen


async def test_reconcile_off_shows_in_every_surface(pg_pair: Pair) -> None:
    app = create_app(stack_settings(pg_pair, FAILOVER_RECONCILE=False))
    async with serving(app) as client:
        status = (await client.get("/api/v1/health/databases")).json()
        assert status["postgres"]["reconcile"] == {"enabled": False}
        assert (await client.get("/api/v1/conflicts")).json() == {"conflicts": []}
        state = (await client.get("/api/v1/dashboard/state")).json()
        assert state["conflicts"] == [] and state["reconcile_runs"] == {}
        metrics = (await client.get("/metrics")).text
        assert _sample(metrics, "failover_reconcile_backlog", store="postgres") is None


async def test_items_table_created_on_a_fallback_without_event_triggers_is_captured_from_its_first_write(
    pg_pair: Pair,
) -> None:
    """A fallback user that may not create event triggers: the items table, created after capture was
    installed, is protected right after its creation, not at the next (30 s away) probe round."""
    primary, fallback = pg_pair
    async with await psycopg.AsyncConnection.connect(fallback.url, autocommit=True) as admin:
        await admin.execute("create role app login")
        await admin.execute("grant create on database postgres to app")
        await admin.execute("grant create on schema public to app")
    app_url = fallback.url.replace("postgresql://postgres@", "postgresql://app@")
    assert app_url != fallback.url
    await asyncio.to_thread(primary.kill)  # start on the fallback: the table is new there
    settings = stack_settings(HEALTH_CHECK_INTERVAL=30, SUPABASE_DB_URL=primary.url, POSTGRES_URL=app_url)
    app = create_app(settings)
    async with serving(app) as client:
        reconcile = databases_of(app).status()["postgres"]["reconcile"]
        assert reconcile["capture_installed"] is True
        assert reconcile["new_tables_protected"] == "at the next probe round"  # no event trigger for this user
        created = await client.post("/api/v1/items", json={"name": "first-write"})
        assert created.status_code == 201 and created.json()["stores"]["postgres"]["served_by"] == "fallback"
        async with await psycopg.AsyncConnection.connect(fallback.url) as conn:
            cur = await conn.execute("select count(*) from failover.changes where tbl = 'public.items'")
            assert await cur.fetchone() == (1,)


async def test_an_item_written_during_an_outage_of_every_store_is_whole_after_failback(
    pg_pair: Pair, mongo_pair: Pair, redis_pair: Pair
) -> None:
    app = create_app(stack_settings(pg_pair, mongo_pair, redis_pair), item_ttl=600)
    primaries = (pg_pair[0], mongo_pair[0], redis_pair[0])
    async with serving(app) as client:
        status = databases_of(app).status()
        assert status["postgres"]["reconcile"]["enabled"] is True
        missing = [n for n in ("mongodb", "redis") if not status[n]["reconcile"]["enabled"]]
        if missing:  # reported as XFAIL, never as a pass: the whole item needs every store's capture
            pytest.xfail(f"change capture of {' and '.join(missing)} is not wired yet (issue 10)")
        assert (await client.post("/api/v1/items", json={"name": "before"})).status_code == 201
        for server in primaries:
            await asyncio.to_thread(server.kill)
        await wait_status(
            app, lambda s: all(s[n]["state"] == "ON_FALLBACK" for n in ("postgres", "mongodb", "redis")), "all on fallbacks"
        )
        created = await client.post("/api/v1/items", json={"name": "outage", "payload": {"k": 1}})
        assert created.status_code == 201, created.text
        item = created.json()
        assert {s: v["served_by"] for s, v in item["stores"].items()} == {
            "postgres": "fallback", "mongodb": "fallback", "redis": "fallback"
        }
        for server in primaries:
            await asyncio.to_thread(server.start)
        await wait_status(app, lambda s: s["overall_status"] == "healthy", "every store back on its primary", timeout=30)
        read = await client.get(f"/api/v1/items/{item['id']}")
        assert read.status_code == 200, read.text
        body = read.json()
        assert body["name"] == "outage" and body["payload"] == {"k": 1}
        for store in ("postgres", "mongodb", "redis"):
            assert body["stores"][store]["found"] is True and body["stores"][store]["served_by"] == "primary", body
        assert body["stores"]["redis"]["count"] >= 1  # items:count is on the primary (its value: the conflict policy's)
        ttl = await databases_of(app).redis.ttl(f"item:{item['id']}")
        assert 0 < ttl <= 600  # the cached copy kept its remaining TTL
