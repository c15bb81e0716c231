"""What every benchmark shares: local servers, workloads per store, closed-loop load, percentiles.

Every server is started here, on 127.0.0.1 free ports; nothing else is contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from failover import Databases, Event, StateChanged, SwitchState
from failover.drill import settings_for
from failover.local import LocalMongo, LocalPostgres, LocalRedis, LocalServer

STORES = ("postgres", "mongodb", "redis")

# Detection of a crash or a blackhole is driven by live traffic and the default
# timeouts (probe 2 s, operation 5 s, breaker 1). Only the pace of failback is
# shortened, so that twenty crash/failback cycles fit in a minute.
BENCH_TUNING: dict[str, Any] = {
    "HEALTH_CHECK_INTERVAL": 0.5,
    "FAILOVER_FAILBACK_DELAY": 1.0,
    "FAILOVER_PROBE_TIMEOUT": 2.0,
    "FAILOVER_CONNECT_TIMEOUT": 2.0,
    "FAILOVER_OPERATION_TIMEOUT": 5.0,
    "FAILOVER_UNHEALTHY_THRESHOLD": 2,
    "FAILOVER_HEALTHY_THRESHOLD": 2,
    "FAILOVER_BREAKER_THRESHOLD": 1,
    "FAILOVER_POOL_MIN_SIZE": 1,
    "FAILOVER_POOL_MAX_SIZE": 10,
}

_SERVERS: dict[str, type[LocalServer]] = {"postgres": LocalPostgres, "mongodb": LocalMongo, "redis": LocalRedis}


@contextlib.asynccontextmanager
async def server_pair(store: str) -> AsyncIterator[tuple[LocalServer, LocalServer]]:
    """A started (primary, fallback) of *store* in a temporary directory, killed on exit."""
    root = Path(tempfile.mkdtemp(prefix=f"failover-bench-{store}-"))
    os.chmod(root, 0o755)  # the postgres user must enter it
    servers = [_SERVERS[store](root / f"{store}-{role}", name=f"{store} {role}") for role in ("primary", "fallback")]
    try:
        for server in servers:
            await asyncio.to_thread(server.start)
        yield servers[0], servers[1]
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(server.kill)
        shutil.rmtree(root, ignore_errors=True)


async def open_databases(store: str, primary_url: str, fallback_url: str, **tuning: Any) -> Databases:
    dbs = Databases(settings_for(store, primary_url, fallback_url, {**BENCH_TUNING, **tuning}))
    await dbs.start()
    return dbs


# --- workloads ---------------------------------------------------------------------------------

PG_TABLE = "failover_bench"
PG_UPSERT = f"insert into {PG_TABLE} (id, v) values (%s, %s) on conflict (id) do update set v = excluded.v"
KEYS = 1000


class Workload:
    """One small write per operation, the same through failover and through the raw driver.

    The write is an upsert of one of :data:`KEYS` keys: idempotent, so failover
    may retry it on the other endpoint, and every error it surfaces is ours.
    """

    store: str

    async def prepare(self, url: str) -> None:
        """Create what the workload needs on one server."""

    async def raw(self, url: str) -> tuple[Callable[[int], Awaitable[Any]], Callable[[], Awaitable[None]]]:
        """``(operation, close)`` using the raw driver with the same pool size as failover."""
        raise NotImplementedError

    def via(self, dbs: Databases) -> Callable[[int], Awaitable[Any]]:
        """The operation through failover."""
        raise NotImplementedError


class PostgresWorkload(Workload):
    store = "postgres"

    async def prepare(self, url: str) -> None:
        import psycopg

        async with await psycopg.AsyncConnection.connect(url, connect_timeout=5, autocommit=True) as conn:
            await conn.execute(f"create table if not exists {PG_TABLE} (id bigint primary key, v bigint not null)")
            # The local servers run with synchronous_commit=off: without a checkpoint a
            # SIGKILL soon after could take the new table with it.
            await conn.execute("checkpoint")

    async def raw(self, url: str) -> tuple[Callable[[int], Awaitable[Any]], Callable[[], Awaitable[None]]]:
        from psycopg_pool import AsyncConnectionPool

        pool = AsyncConnectionPool(
            url, min_size=BENCH_TUNING["FAILOVER_POOL_MIN_SIZE"], max_size=BENCH_TUNING["FAILOVER_POOL_MAX_SIZE"], open=False
        )
        await pool.open(wait=True, timeout=10)

        async def op(i: int) -> None:
            async with pool.connection() as conn:
                await conn.execute(PG_UPSERT, (i % KEYS, i))

        return op, pool.close

    def via(self, dbs: Databases) -> Callable[[int], Awaitable[Any]]:
        async def op(i: int) -> None:
            await dbs.postgres.execute(PG_UPSERT, (i % KEYS, i), idempotent=True)

        return op


class MongoWorkload(Workload):
    store = "mongodb"

    async def raw(self, url: str) -> tuple[Callable[[int], Awaitable[Any]], Callable[[], Awaitable[None]]]:
        from pymongo import AsyncMongoClient

        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            url, minPoolSize=BENCH_TUNING["FAILOVER_POOL_MIN_SIZE"], maxPoolSize=BENCH_TUNING["FAILOVER_POOL_MAX_SIZE"]
        )
        collection = client["app"]["failover_bench"]

        async def op(i: int) -> None:
            await collection.update_one({"_id": i % KEYS}, {"$set": {"v": i}}, upsert=True)

        return op, client.close

    def via(self, dbs: Databases) -> Callable[[int], Awaitable[Any]]:
        collection = dbs.mongodb.database["failover_bench"]

        async def op(i: int) -> None:
            await collection.update_one({"_id": i % KEYS}, {"$set": {"v": i}}, upsert=True, idempotent=True)

        return op


class RedisWorkload(Workload):
    store = "redis"

    async def raw(self, url: str) -> tuple[Callable[[int], Awaitable[Any]], Callable[[], Awaitable[None]]]:
        import redis.asyncio as aioredis

        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=BENCH_TUNING["FAILOVER_POOL_MAX_SIZE"])
        client = aioredis.Redis(connection_pool=pool)

        async def op(i: int) -> None:
            await client.set(f"bench:{i % KEYS}", i)

        async def close() -> None:
            await client.aclose()
            await pool.disconnect()

        return op, close

    def via(self, dbs: Databases) -> Callable[[int], Awaitable[Any]]:
        async def op(i: int) -> None:
            await dbs.redis.set(f"bench:{i % KEYS}", i)

        return op


WORKLOADS: dict[str, type[Workload]] = {"postgres": PostgresWorkload, "mongodb": MongoWorkload, "redis": RedisWorkload}


# --- waiting and measuring ----------------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll *predicate* every 5 ms; return the seconds it took, raise TimeoutError after *timeout*."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} not reached within {timeout:g}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


class SwitchTimes:
    """Records the monotonic time of every switch of one store (events carry wall time only)."""

    def __init__(self, dbs: Databases, store: str) -> None:
        self.store = store
        self.moves: list[tuple[float, SwitchState]] = []
        self.unsubscribe = dbs.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, StateChanged) and event.store == self.store:
            self.moves.append((time.monotonic(), event.to_state))

    def first_after(self, moment: float, state: SwitchState) -> float | None:
        found = [t for t, s in self.moves if t >= moment and s is state]
        return found[0] if found else None


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_s": percentile(values, 50),
        "p99_s": percentile(values, 99),
        "max_s": max(values) if values else None,
    }
