"""All three stores at once: they fail over independently, and the status has the seed's shape."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from failover import Databases, SwitchState

from ..helpers import fast_settings, wait_for

pytestmark = pytest.mark.integration

SEED_STORE_KEYS = {"using_primary", "primary_available", "fallback_available", "primary_healthy", "current_db"}


@pytest.fixture
async def everything(make_server: Any) -> Any:
    servers = {
        (store, role): make_server(store)
        for store in ("postgres", "mongodb", "redis")
        for role in ("primary", "fallback")
    }
    settings = fast_settings(
        SUPABASE_DB_URL=servers[("postgres", "primary")].url,
        POSTGRES_URL=servers[("postgres", "fallback")].url,
        MONGODB_ATLAS_URL=servers[("mongodb", "primary")].url,
        MONGODB_URL=servers[("mongodb", "fallback")].url,
        UPSTASH_REDIS_URL=servers[("redis", "primary")].url,
        REDIS_URL=servers[("redis", "fallback")].url,
    )
    dbs = Databases(settings)
    await dbs.start()
    yield dbs, servers
    await dbs.close()


def check_seed_shape(status: dict[str, Any]) -> None:
    assert list(status)[:3] == ["postgres", "mongodb", "redis"]
    assert status["overall_status"] in {"healthy", "degraded", "unhealthy"}
    for store in ("postgres", "mongodb", "redis"):
        entry = status[store]
        assert SEED_STORE_KEYS <= set(entry)
        for key in SEED_STORE_KEYS - {"current_db"}:
            assert isinstance(entry[key], bool), (store, key)
        assert isinstance(entry["current_db"], str)


async def exercise(dbs: Databases, n: int) -> None:
    await dbs.postgres.execute("create table if not exists kv (k int primary key)")
    await dbs.postgres.execute("insert into kv values (%s)", (n,))
    await dbs.mongodb.database["kv"].insert_one({"_id": n})
    await dbs.redis.set(f"kv:{n}", n)


@pytest.mark.parametrize("victim", ["postgres", "mongodb", "redis"])
async def test_one_store_fails_over_the_others_stay_on_their_primaries(everything: Any, victim: str) -> None:
    dbs, servers = everything
    status = dbs.status()
    check_seed_shape(status)
    assert status["overall_status"] == "healthy"
    assert [status[s]["current_db"] for s in ("postgres", "mongodb", "redis")] == [
        "Primary PostgreSQL",
        "Primary MongoDB",
        "Primary Redis",
    ]
    await exercise(dbs, 1)

    await asyncio.to_thread(servers[(victim, "primary")].kill)
    await exercise(dbs, 2)  # the victim's operations move, the others' stay
    await wait_for(lambda: dbs.store(victim).state is SwitchState.ON_FALLBACK, 3, f"{victim} failover")
    status = dbs.status()
    check_seed_shape(status)
    assert status["overall_status"] == "degraded"
    for store in ("postgres", "mongodb", "redis"):
        assert status[store]["using_primary"] is (store != victim), store
    names = {"postgres": "Local PostgreSQL", "mongodb": "Local MongoDB", "redis": "Local Redis"}
    assert status[victim]["current_db"] == names[victim]
    assert status[victim]["primary_available"] is False
    assert status[victim]["primary_healthy"] is False
    assert status[victim]["fallback_available"] is True
