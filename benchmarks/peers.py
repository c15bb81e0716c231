"""failover next to its closest peers, in one run, against the same local servers.

    python3 benchmarks/peers.py [--quick] [--stores redis postgres mongodb] [--rounds N] [--seconds S]

For each store, three clients drive the same workload:

* **raw** — the driver alone on the primary (the baseline of every "added µs");
* **failover** — ``Databases`` with the benchmark tuning of ``_common.BENCH_TUNING``;
* **peer** — what a user would otherwise reach for:
  Redis: redis-py's ``MultiDBClient`` (``redis.asyncio.multidb``, default config, primary weight 1,
  fallback 0.5, each on a ``BlockingConnectionPool`` of 10);
  PostgreSQL: ``psycopg_pool`` on a libpq multi-host conninfo with ``target_session_attrs=read-write``;
  MongoDB: plain PyMongo (``AsyncMongoClient``): it fails over inside a replica set only, so between
  two standalone servers it *is* the raw driver (its steady state is the raw row).

**Steady state**: closed loops at concurrency 1 and 16; each round runs every client for the same
time, in an order rotated from round to round; the figure is the median over rounds of
(client − raw) µs/op measured in the same round, so drift on a shared machine hits both alike. Both
wall time per operation and client CPU (``process_time``) per operation are reported.

**Crash drill** (per client, on the same pair of servers): 4 workers with a 2 ms pause run the
write; the primary is SIGKILLed, kept down ``DOWN`` seconds, then restarted. Reported: errors the
callers saw (by type), time from the kill to the first success of an operation started after it,
and the time from the restart until traffic is back on the primary (bounded by ``FAILBACK_WAIT``).

Figures are printed (and written to ``benchmarks/results/peers.json``), never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from failover import SwitchState  # noqa: E402
from failover.local.traffic import Traffic  # noqa: E402

from benchmarks._common import (  # noqa: E402
    BENCH_TUNING,
    KEYS,
    PG_TABLE,
    PG_UPSERT,
    PostgresWorkload,
    open_databases,
    server_pair,
    wait_until,
)

CONCURRENCY = (1, 16)
POOL = BENCH_TUNING["FAILOVER_POOL_MAX_SIZE"]
DOWN = 3.0
FAILBACK_WAIT = 15.0
DRILL_WORKERS = 4
RESULTS = Path(__file__).resolve().parent / "results" / "peers.json"

Op = Callable[[int], Awaitable[Any]]


@dataclass
class Client:
    """One way of talking to a store: an operation per workload, and how to tell where it goes."""

    name: str
    version: str
    ops: dict[str, Op]
    close: Callable[[], Awaitable[None]]
    on_primary: Callable[[], Awaitable[bool]] | None = None
    notes: str = ""
    steady: bool = True  # measured in steady state (PyMongo's peer is the raw driver itself)
    extra: dict[str, Any] = field(default_factory=dict)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


# --- clients -------------------------------------------------------------------------------------


async def _redis_clients(primary_url: str, fallback_url: str) -> list[Client]:
    import redis.asyncio as aioredis

    raw_pool = aioredis.BlockingConnectionPool.from_url(primary_url, max_connections=POOL)
    raw = aioredis.Redis(connection_pool=raw_pool)

    async def raw_set(i: int) -> None:
        await raw.set(f"bench:{i % KEYS}", i)

    async def raw_get(i: int) -> None:
        await raw.get(f"bench:{i % KEYS}")

    async def raw_close() -> None:
        await raw.aclose()
        await raw_pool.disconnect()

    clients = [Client("raw", _version("redis"), {"SET": raw_set, "GET": raw_get}, raw_close)]

    dbs = await open_databases("redis", primary_url, fallback_url)

    async def via_set(i: int) -> None:
        await dbs.redis.set(f"bench:{i % KEYS}", i)

    async def via_get(i: int) -> None:
        await dbs.redis.get(f"bench:{i % KEYS}")

    clients.append(_failover_client(dbs, "redis", {"SET": via_set, "GET": via_get}))

    try:
        from redis.asyncio.multidb.client import MultiDBClient
        from redis.asyncio.multidb.config import DatabaseConfig, MultiDbConfig
    except ImportError as exc:  # redis-py < 7 has no multidb client
        print(f"redis-py {_version('redis')} has no MultiDBClient ({exc}); skipping the Redis peer", file=sys.stderr)
        return clients
    pools = [aioredis.BlockingConnectionPool.from_url(url, max_connections=POOL) for url in (primary_url, fallback_url)]
    config = MultiDbConfig(
        databases_config=[DatabaseConfig(from_pool=pools[0], weight=1.0), DatabaseConfig(from_pool=pools[1], weight=0.5)]
    )
    multi = MultiDBClient(config)
    await multi.initialize()
    primary_db = max(multi.get_databases(), key=lambda item: item[1])[0]

    async def multi_set(i: int) -> None:
        await multi.set(f"bench:{i % KEYS}", i)

    async def multi_get(i: int) -> None:
        await multi.get(f"bench:{i % KEYS}")

    async def multi_on_primary() -> bool:
        return multi.command_executor.active_database is primary_db

    async def multi_close() -> None:
        await multi.aclose()
        for pool in pools:
            await pool.disconnect()

    clients.append(
        Client(
            "MultiDBClient",
            f"redis-py {_version('redis')}",
            {"SET": multi_set, "GET": multi_get},
            multi_close,
            multi_on_primary,
            notes="default MultiDbConfig (auto_fallback_interval 120 s)",
        )
    )
    return clients


def _failover_client(dbs: Any, store: str, ops: dict[str, Op]) -> Client:
    switch = dbs.store(store)

    async def on_primary() -> bool:
        return switch.state is SwitchState.ON_PRIMARY

    return Client(
        "failover",
        _version("failover"),
        ops,
        dbs.close,
        on_primary,
        notes="defaults; failback pace HEALTH_CHECK_INTERVAL=0.5, FAILOVER_FAILBACK_DELAY=1",
    )


PG_READ = f"select v from {PG_TABLE} where id = %s"


async def _postgres_clients(primary_url: str, fallback_url: str) -> list[Client]:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from psycopg_pool import AsyncConnectionPool

    async def pool_ops(pool: AsyncConnectionPool) -> dict[str, Op]:
        async def upsert(i: int) -> None:
            async with pool.connection() as conn:
                await conn.execute(PG_UPSERT, (i % KEYS, i))

        async def fetchone(i: int) -> None:
            async with pool.connection() as conn:
                await (await conn.execute(PG_READ, (i % KEYS,))).fetchone()

        return {"upsert (execute)": upsert, "select (fetchone)": fetchone}

    raw_pool = AsyncConnectionPool(primary_url, min_size=1, max_size=POOL, open=False)
    await raw_pool.open(wait=True, timeout=10)
    clients = [Client("raw", f"psycopg {_version('psycopg')}", await pool_ops(raw_pool), raw_pool.close)]

    dbs = await open_databases("postgres", primary_url, fallback_url)

    async def via_upsert(i: int) -> None:
        await dbs.postgres.execute(PG_UPSERT, (i % KEYS, i), idempotent=True)

    async def via_fetchone(i: int) -> None:
        await dbs.postgres.fetchone(PG_READ, (i % KEYS,))

    clients.append(_failover_client(dbs, "postgres", {"upsert (execute)": via_upsert, "select (fetchone)": via_fetchone}))

    first, second = conninfo_to_dict(primary_url), conninfo_to_dict(fallback_url)
    multi_host = make_conninfo(
        "",
        host=f"{first['host']},{second['host']}",
        port=f"{first['port']},{second['port']}",
        user=first.get("user", "postgres"),
        dbname=first.get("dbname", "postgres"),
        target_session_attrs="read-write",
        connect_timeout="2",
    )
    peer_pool = AsyncConnectionPool(multi_host, min_size=1, max_size=POOL, open=False)
    await peer_pool.open(wait=True, timeout=10)
    primary_port = int(first["port"])

    async def peer_on_primary() -> bool:
        try:
            async with peer_pool.connection(timeout=2) as conn:
                row = await (await conn.execute("select inet_server_port()")).fetchone()
        except Exception:
            return False
        return row is not None and row[0] == primary_port

    clients.append(
        Client(
            "psycopg_pool multi-host",
            f"psycopg_pool {_version('psycopg-pool')}",
            await pool_ops(peer_pool),
            peer_pool.close,
            peer_on_primary,
            notes="host=a,b target_session_attrs=read-write, pool defaults (no check)",
        )
    )
    return clients


async def _mongo_clients(primary_url: str, fallback_url: str) -> list[Client]:
    from pymongo import AsyncMongoClient

    def client_ops(collection: Any) -> dict[str, Op]:
        async def insert(i: int) -> None:
            await collection.insert_one({"v": i})

        async def find(i: int) -> None:
            await collection.find_one({"_id": i % KEYS})

        return {"insert_one": insert, "find_one": find}

    raw: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(primary_url, minPoolSize=1, maxPoolSize=POOL)
    await raw["app"]["peers"].insert_many([{"_id": i, "v": i} for i in range(KEYS)])
    clients = [Client("raw", f"pymongo {_version('pymongo')}", client_ops(raw["app"]["peers"]), raw.close)]

    dbs = await open_databases("mongodb", primary_url, fallback_url)
    clients.append(_failover_client(dbs, "mongodb", client_ops(dbs.mongodb.database["peers"])))

    # Plain PyMongo: server selection waits as long as failover's connect timeout (its default is 30 s).
    peer: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        primary_url, minPoolSize=1, maxPoolSize=POOL, serverSelectionTimeoutMS=2000
    )

    async def peer_on_primary() -> bool:
        return True  # it knows one server only

    clients.append(
        Client(
            "PyMongo",
            f"pymongo {_version('pymongo')}",
            client_ops(peer["app"]["peers"]),
            peer.close,
            peer_on_primary,
            notes="no client-side failover between standalone servers; serverSelectionTimeoutMS=2000",
            steady=False,
        )
    )
    return clients


CLIENTS = {"redis": _redis_clients, "postgres": _postgres_clients, "mongodb": _mongo_clients}
DRILL_OP = {"redis": "SET", "postgres": "upsert (execute)", "mongodb": "insert_one"}


# --- steady state --------------------------------------------------------------------------------


async def _closed_loop(op: Op, workers: int, seconds: float) -> tuple[int, int, float, float]:
    """(operations, errors, wall seconds, CPU seconds) of *workers* loops for *seconds*."""
    stop_at = time.perf_counter() + seconds
    counts = [0, 0]
    counter = 0

    async def worker() -> None:
        nonlocal counter
        while time.perf_counter() < stop_at:
            counter += 1
            try:
                await op(counter)
                counts[0] += 1
            except Exception:
                counts[1] += 1

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return counts[0], counts[1], time.perf_counter() - wall, time.process_time() - cpu


async def steady_state(clients: list[Client], workload: str, workers: int, seconds: float, rounds: int) -> dict[str, Any]:
    measured = [c for c in clients if c.steady]
    for client in measured:  # warm pools and code paths
        await _closed_loop(client.ops[workload], workers, 0.3)
    samples: dict[str, list[tuple[float, float]]] = {c.name: [] for c in measured}
    errors = {c.name: 0 for c in measured}
    for r in range(rounds):
        order = measured[r % len(measured):] + measured[: r % len(measured)]
        for client in order:
            ops, errs, wall, cpu = await _closed_loop(client.ops[workload], workers, seconds)
            errors[client.name] += errs
            samples[client.name].append((wall / max(ops, 1) * 1e6, cpu / max(ops, 1) * 1e6))
    raw = samples["raw"]
    out: dict[str, Any] = {}
    for client in measured:
        mine = samples[client.name]
        out[client.name] = {
            "wall_us": round(statistics.median(s[0] for s in mine), 1),
            "cpu_us": round(statistics.median(s[1] for s in mine), 1),
            "added_wall_us": round(statistics.median(m[0] - r[0] for m, r in zip(mine, raw)), 1),
            "added_cpu_us": round(statistics.median(m[1] - r[1] for m, r in zip(mine, raw)), 1),
            "added_wall_iqr_us": _iqr([m[0] - r[0] for m, r in zip(mine, raw)]),
            "errors": errors[client.name],
        }
    return out


def _iqr(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return [round(q[0], 1), round(q[2], 1)]


# --- crash drill ---------------------------------------------------------------------------------


async def crash_drill(client: Client, workload: str, primary: Any) -> dict[str, Any]:
    load = Traffic(client.ops[workload], DRILL_WORKERS, pause=0.002).start()
    try:
        ready = time.monotonic()
        await wait_until(lambda: load.first_success_after(ready) is not None, 10, f"{client.name} traffic")
        primary.pause()  # frozen at once, so `killed` is when service stopped
        killed = time.monotonic()
        await asyncio.to_thread(primary.kill)
        await asyncio.sleep(DOWN)  # the outage lasts DOWN seconds (a measurement window)
        first = load.first_success_after(killed)
        restarted = time.monotonic()
        await asyncio.to_thread(primary.start)
        failback: float | None = None
        if client.on_primary is not None:
            while time.monotonic() - restarted < FAILBACK_WAIT:
                if await client.on_primary():
                    failback = time.monotonic() - restarted
                    break
                await asyncio.sleep(0.05)
        if first is None:  # nothing succeeded during the outage: the first success came after the restart
            await wait_until(lambda: load.first_success_after(killed) is not None, 30, f"{client.name} after restart")
            first = load.first_success_after(killed)
    finally:
        await load.stop()
    errors = load.errors_between(killed, float("inf"))
    return {
        "operations": sum(1 for o in load.outcomes if o.started >= killed),
        "errors": sum(errors.values()),
        "errors_by_type": dict(errors),
        "first_success_s": round(first - killed, 3) if first is not None else None,
        "served_during_outage": first is not None and first < restarted,
        "failback_s": round(failback, 3) if failback is not None else None,
    }


# --- the run -------------------------------------------------------------------------------------


async def run_store(store: str, *, seconds: float, rounds: int) -> dict[str, Any]:
    async with server_pair(store) as (primary, fallback):
        if store == "postgres":
            for server in (primary, fallback):
                await PostgresWorkload().prepare(server.url)
        clients = await CLIENTS[store](primary.url, fallback.url)
        result: dict[str, Any] = {
            "clients": {c.name: {"version": c.version, "notes": c.notes} for c in clients},
            "steady": {},
            "drill": {},
        }
        try:
            for workload in clients[0].ops:
                for workers in CONCURRENCY:
                    key = f"{workload} c{workers}"
                    result["steady"][key] = await steady_state(clients, workload, workers, seconds, rounds)
                    print(f"  {store} {key}: " + _steady_line(result["steady"][key]), file=sys.stderr, flush=True)
            for client in clients:
                if client.name == "raw":
                    continue
                result["drill"][client.name] = await crash_drill(client, DRILL_OP[store], primary)
                print(f"  {store} drill {client.name}: {result['drill'][client.name]}", file=sys.stderr, flush=True)
        finally:
            for client in clients:
                try:
                    await client.close()
                except Exception as exc:  # a client that cannot close must not hide the figures
                    print(f"closing {client.name} failed: {exc!r}", file=sys.stderr)
    return result


def _steady_line(rows: dict[str, Any]) -> str:
    return ", ".join(f"{name} {row['wall_us']:.0f} µs ({row['added_wall_us']:+.1f})" for name, row in rows.items())


def table(results: dict[str, Any]) -> str:
    lines = [
        "| store | workload | concurrency | raw µs/op | client | version | added µs/op (wall) | added µs/op (CPU) | errors |",
        "|---|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for store, result in results.items():
        for key, rows in result["steady"].items():
            workload, conc = key.rsplit(" c", 1)
            raw = rows["raw"]["wall_us"]
            for name, row in rows.items():
                if name == "raw":
                    continue
                version = result["clients"][name]["version"]
                lines.append(
                    f"| {store} | {workload} | {conc} | {raw:.0f} | {name} | {version} | "
                    f"{row['added_wall_us']:+.1f} | {row['added_cpu_us']:+.1f} | {row['errors']} |"
                )
    lines += [
        "",
        "| store | client | version | errors surfaced / ops | kill → first success | served during the outage | restart → traffic on primary |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    for store, result in results.items():
        for name, drill in result["drill"].items():
            version = result["clients"][name]["version"]
            errors = f"{drill['errors']} / {drill['operations']}"
            if drill["errors"]:
                errors += " (" + ", ".join(f"{k} {v}" for k, v in sorted(drill["errors_by_type"].items())) + ")"
            first = "-" if drill["first_success_s"] is None else f"{drill['first_success_s'] * 1000:.0f} ms"
            failback = "-" if drill["failback_s"] is None else f"{drill['failback_s']:.1f} s"
            if drill["failback_s"] is None:
                failback = f"not within {FAILBACK_WAIT:g} s"
            lines.append(
                f"| {store} | {name} | {version} | {errors} | {first} | {'yes' if drill['served_during_outage'] else 'no'} | {failback} |"
            )
    return "\n".join(lines)


async def run(stores: tuple[str, ...], *, seconds: float, rounds: int) -> dict[str, Any]:
    return {store: await run_store(store, seconds=seconds, rounds=rounds) for store in stores}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="failover next to redis-py MultiDBClient, psycopg_pool multi-host and PyMongo.")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--stores", nargs="+", choices=list(CLIENTS), default=["redis", "postgres", "mongodb"])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="seconds per client per round")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 15)
    seconds = args.seconds or (0.3 if args.quick else 0.5)
    started = time.time()
    results = asyncio.run(run(tuple(args.stores), seconds=seconds, rounds=rounds))
    print(table(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {"started": started, "rounds": rounds, "seconds_per_round": seconds, "tuning": BENCH_TUNING, "results": results},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
