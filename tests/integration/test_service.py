"""The service on real servers: the seed's health endpoint, readiness, items, metrics, security."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from fastapi import FastAPI
from pymongo import AsyncMongoClient

from failover import Databases, Settings
from failover.local import LocalServer, free_port
from failover.service import create_app
from tests.helpers import fast_settings, wait_for

pytestmark = pytest.mark.integration

SEED_KEYS = {"using_primary", "primary_available", "fallback_available", "primary_healthy", "current_db"}
Pair = tuple[LocalServer, LocalServer]


def stack_settings(pg: Pair | None = None, mongo: Pair | None = None, redis: Pair | None = None, **extra: Any) -> Settings:
    """Fast settings pointing at the given primary/fallback pairs."""
    values: dict[str, Any] = {}
    if pg:
        values.update(SUPABASE_DB_URL=pg[0].url, POSTGRES_URL=pg[1].url)
    if mongo:
        values.update(MONGODB_ATLAS_URL=mongo[0].url, MONGODB_URL=mongo[1].url)
    if redis:
        values.update(UPSTASH_REDIS_URL=redis[0].url, REDIS_URL=redis[1].url)
    values.update(extra)
    return fast_settings(**values)


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run *app*'s lifespan and yield an HTTP client talking to it in-process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://failover.test", timeout=15) as client:
            yield client


class _InProcessServer(uvicorn.Server):
    """uvicorn without its signal handlers: the test process keeps its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@asynccontextmanager
async def http_server(app: FastAPI) -> AsyncIterator[str]:
    """Serve *app* on a free loopback port in this event loop; yield its base URL."""
    port = free_port()
    # The server keeps an idle connection longer than httpx's keep-alive expiry (5 s): with both at
    # uvicorn's default 5 s, a client could send a request on a connection in the very instant the
    # server closed it for idleness, and read a reset (a flake of the 50-client test, not a failover).
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", timeout_keep_alive=60
    )
    server = _InProcessServer(config)
    task = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: server.started or task.done(), 30, "uvicorn started")
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def databases_of(app: FastAPI) -> Databases:
    return app.state.failover_databases  # type: ignore[no-any-return]


async def wait_status(app: FastAPI, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = 10) -> None:
    dbs = databases_of(app)
    await wait_for(lambda: predicate(dbs.status()), timeout, what)


async def test_health_endpoint_follows_the_stores(pg_pair: Pair, mongo_pair: Pair, redis_pair: Pair) -> None:
    app = create_app(stack_settings(pg_pair, mongo_pair, redis_pair))
    async with serving(app) as client:
        r = await client.get("/api/v1/health/databases")
        assert r.status_code == 200
        body = r.json()
        assert set(body) == {"postgres", "mongodb", "redis", "overall_status"}
        for store in ("postgres", "mongodb", "redis"):
            assert SEED_KEYS <= set(body[store])
            assert body[store]["using_primary"] is True
            assert body[store]["primary_available"] is True
            assert body[store]["fallback_available"] is True
            assert body[store]["primary_healthy"] is True
        assert body["postgres"]["current_db"] == "Primary PostgreSQL"
        assert body["mongodb"]["current_db"] == "Primary MongoDB"
        assert body["redis"]["current_db"] == "Primary Redis"
        assert body["overall_status"] == "healthy"
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/livez")).json() == {"status": "alive"}

        # Redis primary dies: Redis moves, the others stay, the service is degraded but serving.
        redis_pair[0].kill()
        await wait_status(app, lambda s: s["redis"]["current_db"] == "Local Redis", "redis on its fallback")
        r = await client.get("/api/v1/health/databases")
        assert r.status_code == 200
        body = r.json()
        assert body["overall_status"] == "degraded"
        assert body["redis"]["using_primary"] is False
        assert body["redis"]["primary_available"] is False
        assert body["postgres"]["using_primary"] is True and body["mongodb"]["using_primary"] is True
        assert (await client.get("/readyz")).status_code == 200

        # And its fallback too: unhealthy, 503, not ready; still alive.
        redis_pair[1].kill()
        await wait_status(app, lambda s: s["overall_status"] == "unhealthy", "redis unavailable")
        r = await client.get("/api/v1/health/databases")
        assert r.status_code == 503
        assert r.json()["overall_status"] == "unhealthy"
        assert r.json()["redis"]["current_db"] is None
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"status": "not ready"}
        assert (await client.get("/livez")).status_code == 200


async def test_starts_on_the_fallback_when_the_primary_is_down(
    pg_pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    pg_pair[0].kill()
    caplog.set_level(logging.INFO, logger="failover")
    app = create_app(stack_settings(pg_pair))
    async with serving(app) as client:
        r = await client.get("/api/v1/health/databases")
        assert r.status_code == 200
        assert r.json()["postgres"]["current_db"] == "Local PostgreSQL"
        assert r.json()["overall_status"] == "degraded"
        created = await client.post("/api/v1/items", json={"name": "while the primary is down"})
        assert created.status_code == 201, created.text
        assert created.json()["stores"]["postgres"]["served_by"] == "fallback"

        # The primary comes back: it gets the schema when it turns healthy, then traffic fails back to it.
        await asyncio.to_thread(pg_pair[0].start)
        await wait_status(app, lambda s: s["postgres"]["using_primary"], "failback to the primary", timeout=15)
        created = await client.post("/api/v1/items", json={"name": "after failback"})
        assert created.status_code == 201, created.text
        assert created.json()["stores"]["postgres"]["served_by"] == "primary"
    warnings = [r for r in caplog.records if r.name == "failover.service" and r.levelno == logging.WARNING]
    assert any("started on its fallback Local PostgreSQL because the primary is down" in r.getMessage() for r in warnings)


async def test_items_are_written_to_every_store_and_follow_failover(
    pg_pair: Pair, mongo_pair: Pair, redis_pair: Pair
) -> None:
    app = create_app(stack_settings(pg_pair, mongo_pair, redis_pair), item_ttl=120)
    async with serving(app) as client:
        # The schema exists on both endpoints of each store, not only on the active one: made at
        # start-up, or (an attempt that timed out on a loaded machine) at the endpoint's next probe.
        deadline = time.monotonic() + 10
        for server in pg_pair:
            while True:
                async with await psycopg.AsyncConnection.connect(server.url) as conn:
                    row = await (await conn.execute("select to_regclass('items') is not null")).fetchone()
                if row == (True,) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert row == (True,), f"no items table on {server.name}"
        for server in mongo_pair:
            mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.url, serverSelectionTimeoutMS=2000)
            try:
                while True:
                    indexes = await mongo["app"]["items"].index_information()
                    keys = {tuple(tuple(k) for k in index["key"]) for index in indexes.values()}
                    if ((("created_at", 1),) in keys and (("name", 1),) in keys) or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
            finally:
                await mongo.close()
            assert (("created_at", 1),) in keys and (("name", 1),) in keys, indexes

        created = await client.post("/api/v1/items", json={"name": "first", "payload": {"n": 1}})
        assert created.status_code == 201, created.text
        item = created.json()
        assert {s: v["served_by"] for s, v in item["stores"].items()} == {
            "postgres": "primary", "mongodb": "primary", "redis": "primary"
        }
        assert item["stores"]["redis"]["count"] == 1
        read = await client.get(f"/api/v1/items/{item['id']}")
        assert read.status_code == 200
        assert read.json()["name"] == "first" and read.json()["payload"] == {"n": 1}
        assert all(v["found"] and v["served_by"] == "primary" for v in read.json()["stores"].values())
        ttl = await databases_of(app).redis.ttl(f"item:{item['id']}")
        assert 0 < ttl <= 120
        assert (await client.get("/api/v1/items/does-not-exist")).status_code == 404

        # Kill the Postgres and Mongo primaries: new items land on their fallbacks, Redis stays.
        pg_pair[0].kill()
        mongo_pair[0].kill()
        await wait_status(
            app,
            lambda s: not s["postgres"]["using_primary"] and not s["mongodb"]["using_primary"],
            "postgres and mongodb on their fallbacks",
        )
        created = await client.post("/api/v1/items", json={"name": "second"})
        assert created.status_code == 201, created.text
        second = created.json()
        assert {s: v["served_by"] for s, v in second["stores"].items()} == {
            "postgres": "fallback", "mongodb": "fallback", "redis": "primary"
        }
        assert second["stores"]["postgres"]["endpoint"] == "Local PostgreSQL"
        assert second["stores"]["redis"]["count"] == 2
        read = await client.get(f"/api/v1/items/{second['id']}")
        assert read.status_code == 200
        assert read.json()["stores"]["postgres"] == {"ok": True, "found": True, "served_by": "fallback", "endpoint": "Local PostgreSQL"}
        assert read.json()["stores"]["mongodb"]["found"] is True

        # Both Postgres endpoints gone: the write is reported per store, never as a crash.
        pg_pair[1].kill()
        await wait_status(app, lambda s: s["postgres"]["current_db"] is None, "postgres unavailable")
        failed = await client.post("/api/v1/items", json={"name": "third"})
        assert failed.status_code == 503
        stores = failed.json()["stores"]
        assert stores["postgres"]["ok"] is False and stores["postgres"]["error"] == "NoEndpointAvailable"
        assert stores["postgres"]["retryable"] is True
        assert stores["mongodb"]["ok"] is True and stores["redis"]["ok"] is True


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        found = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if "=" in part)
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(value)
    return None


async def test_metrics_show_roles_probes_and_failovers(pg_pair: Pair, redis_pair: Pair) -> None:
    app = create_app(stack_settings(pg_pair, redis=redis_pair))
    other = create_app(stack_settings(pg_pair))  # a second app in the process: its own registry
    async with serving(app) as client, serving(other) as other_client:
        await wait_status(app, lambda s: True, "started")
        text = (await client.get("/metrics")).text
        assert _sample(text, "failover_active_role", store="postgres", role="primary") == 1.0
        assert _sample(text, "failover_active_role", store="postgres", role="fallback") == 0.0
        assert _sample(text, "failover_endpoint_up", store="redis", role="primary") == 1.0
        assert _sample(text, "failover_store_state", store="redis", state="ON_PRIMARY") == 1.0
        assert (_sample(text, "failover_probe_latency_seconds_count", store="postgres", role="primary") or 0) >= 1
        assert _sample(text, "failover_failovers_total", store="postgres") is None
        assert (await other_client.get("/metrics")).status_code == 200

        await databases_of(app).redis.set("k", "v")
        pg_pair[0].kill()
        await wait_status(app, lambda s: not s["postgres"]["using_primary"], "postgres on its fallback")
        text = (await client.get("/metrics")).text
        assert _sample(text, "failover_active_role", store="postgres", role="fallback") == 1.0
        assert _sample(text, "failover_endpoint_up", store="postgres", role="primary") == 0.0
        failovers = [
            line for line in text.splitlines() if line.startswith('failover_failovers_total{') and 'store="postgres"' in line
        ]
        assert failovers and float(failovers[0].rpartition(" ")[2]) == 1.0
        assert (_sample(text, "failover_probe_failures_total", store="postgres", role="primary") or 0) >= 1
        assert (_sample(text, "failover_transitions_total", store="postgres", from_state="ON_PRIMARY", to_state="ON_FALLBACK")) == 1.0
        assert (_sample(text, "failover_operations_total", store="redis") or 0) >= 1
        assert _sample(text, "failover_operation_errors_total", store="redis") == 0.0
        # The other app saw the same kill through its own Databases, counted in its own registry.
        await wait_status(other, lambda s: not s["postgres"]["using_primary"], "other app on its fallback")
        other_text = (await other_client.get("/metrics")).text
        assert _sample(other_text, "failover_active_role", store="postgres", role="fallback") == 1.0
        assert _sample(other_text, "failover_active_role", store="redis", role="primary") is None


async def test_token_guards_details_but_not_liveness(pg_pair: Pair) -> None:
    token = "tok-Secret-42"
    app = create_app(stack_settings(pg_pair, FAILOVER_HEALTH_TOKEN=token))
    good = {"Authorization": f"Bearer {token}"}
    async with serving(app) as client:
        for path in ("/api/v1/health/databases", "/metrics", "/api/v1/dashboard/state", "/api/v1/items/x"):
            missing = await client.get(path)
            assert missing.status_code == 401, path
            assert missing.headers["www-authenticate"].startswith("Bearer")
            wrong = await client.get(path, headers={"Authorization": "Bearer tok-Secret-43"})
            assert wrong.status_code == 401, path
            assert token not in wrong.text and "tok-Secret-43" not in wrong.text
            ok = await client.get(path, headers=good)
            assert ok.status_code in (200, 404), path  # 404: item x does not exist
            assert token not in ok.text
        assert (await client.post("/api/v1/items", json={"name": "x"})).status_code == 401
        page = await client.get("/")  # static code, no data: open; the token travels in #token=
        assert page.status_code == 200 and "failover dashboard" in page.text and token not in page.text
        assert (await client.get("/api/v1/health/databases", params={"token": token})).status_code == 401
        assert (await client.get("/livez")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/static/dashboard.js")).status_code == 200
        # Local-mode actions are protected and do not exist outside local mode.
        assert (await client.post("/api/v1/local/postgres/primary/kill")).status_code == 401
        assert (await client.post("/api/v1/local/postgres/primary/kill", headers=good)).status_code == 403
        action = {**good, "X-Failover-Action": "1"}
        assert (await client.post("/api/v1/local/postgres/primary/kill", headers=action)).status_code == 404
        assert pg_pair[0].running


async def test_no_password_or_token_in_any_response_page_or_log(
    make_server: Callable[..., LocalServer], caplog: pytest.LogCaptureFixture
) -> None:
    pg = (make_server("postgres", password="pw-secret-1"), make_server("postgres", password="pw-secret-1"))
    redis = (make_server("redis", password="pw-secret-2"), make_server("redis", password="pw-secret-3"))
    token = "tok-secret-4"
    secrets = ("pw-secret-1", "pw-secret-2", "pw-secret-3", token)
    caplog.set_level(logging.DEBUG)
    app = create_app(stack_settings(pg, redis=redis, FAILOVER_HEALTH_TOKEN=token))
    headers = {"Authorization": f"Bearer {token}"}
    bodies: list[str] = []

    async def collect(client: httpx.AsyncClient) -> None:
        for path in ("/api/v1/health/databases", "/api/v1/dashboard/state", "/metrics", "/", "/openapi.json", "/readyz"):
            bodies.append((await client.get(path, headers=headers)).text)
        created = await client.post("/api/v1/items", json={"name": "x"}, headers=headers)
        bodies.append(created.text)
        if created.status_code == 201:
            bodies.append((await client.get(f"/api/v1/items/{created.json()['id']}", headers=headers)).text)

    async with serving(app) as client:
        await collect(client)
        # Failures produce the messages most likely to carry a URL: kill every primary, then a fallback.
        pg[0].kill()
        redis[0].kill()
        await wait_status(
            app, lambda s: not s["postgres"]["using_primary"] and not s["redis"]["using_primary"], "both on fallbacks"
        )
        await collect(client)
        pg[1].kill()
        redis[1].kill()
        await wait_status(app, lambda s: s["overall_status"] == "unhealthy", "unhealthy")
        await collect(client)
        status = databases_of(app).status()
        assert status["postgres"]["endpoints"]["primary"]["last_error"]  # there is an error text to leak
        assert "***" in status["postgres"]["endpoints"]["primary"]["url"]
    for body in bodies:
        for secret in secrets:
            assert secret not in body
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "Local PostgreSQL" in logged  # the log did talk about the endpoints
    for secret in secrets:
        assert secret not in logged
