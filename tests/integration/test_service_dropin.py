"""The README's drop-in snippet (examples/dropin_app.py), run as-is against real servers."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from failover.local import LocalServer
from tests.helpers import FAST, wait_for
from tests.integration.test_service import serving

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dropin_app.py"
Pair = tuple[LocalServer, LocalServer]


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dropin_app_under_test", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_dropin_snippet_serves_and_fails_over(
    pg_pair: Pair, mongo_pair: Pair, redis_pair: Pair, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    env = {
        "SUPABASE_DB_URL": pg_pair[0].url,
        "POSTGRES_URL": pg_pair[1].url,
        "MONGODB_ATLAS_URL": mongo_pair[0].url,
        "MONGODB_URL": mongo_pair[1].url,
        "UPSTASH_REDIS_URL": redis_pair[0].url,
        "REDIS_URL": redis_pair[1].url,
        **{k: str(v) for k, v in FAST.items()},
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = load_example().app
    async with serving(app) as client:
        first = await client.get("/hello")
        assert first.status_code == 200, first.text
        assert first.json()["visits"] == 1
        assert (await client.get("/hello")).json()["visits"] == 2
        health = await client.get("/api/v1/health/databases")
        assert health.status_code == 200 and health.json()["overall_status"] == "healthy"
        dbs = app.state.failover_databases
        assert await dbs.mongodb.database["visits"].count_documents({}) == 2

        pg_pair[0].kill()
        await wait_for(lambda: not dbs.status()["postgres"]["using_primary"], 10, "postgres on its fallback")
        after = await client.get("/hello")
        assert after.status_code == 200, after.text
        assert after.json()["visits"] == 3
        assert (await client.get("/api/v1/health/databases")).json()["postgres"]["current_db"] == "Local PostgreSQL"
