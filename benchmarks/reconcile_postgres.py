"""PostgreSQL reconcile: throughput of the copy and the write hold at failback.

Throughput: the primary is killed, ``--rows`` rows are written on the fallback
through failover (one multi-row INSERT, captured row by row by the triggers), the
primary is restarted and the time the store spends ``RECONCILING`` is measured,
with the batch size used. Every row is then checked on the primary.

Write hold: ``--cycles`` outages of about one second under steady write traffic
(4 writers); for each failback the duration of the final catch-up, during which
new writes of the store wait, is taken from the ``ReconcileCompleted`` event.

Run: ``python3 -m benchmarks.reconcile_postgres [--rows 50000] [--batch 500] [--cycles 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from failover import Databases, SwitchState
from failover.core.events import Event, ReconcileCompleted
from failover.local import LocalServer

from ._common import open_databases, server_pair, wait_until
from ._reconcile import hold_table, write_hold

SCHEMA = "create table if not exists bench_items (id bigint primary key, note text not null, n int not null)"


def _count(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("select count(*) from bench_items").fetchone()
        return int(row[0]) if row else 0


async def throughput(rows: int, batch: int) -> dict[str, Any]:
    async with server_pair("postgres") as (primary, fallback):
        for server in (primary, fallback):
            with psycopg.connect(server.url, autocommit=True) as conn:
                conn.execute(SCHEMA)
        dbs = await open_databases("postgres", primary.url, fallback.url, FAILOVER_RECONCILE_BATCH=batch)
        events: list[Event] = []
        dbs.subscribe(events.append)
        store = dbs.store("postgres")
        try:
            await asyncio.to_thread(primary.kill)  # the block below trips the breaker and lands on the fallback
            async with dbs.postgres.connection(timeout=120) as conn:
                await conn.execute(
                    "insert into bench_items select g, md5(g::text), g from generate_series(1, %s) g", (rows,)
                )
            await asyncio.to_thread(primary.start)
            await wait_until(lambda: store.state is SwitchState.RECONCILING, 30, "reconciling")
            started = time.monotonic()
            await wait_until(lambda: store.state is SwitchState.ON_PRIMARY, 600, "failback")
            elapsed = time.monotonic() - started
        finally:
            await dbs.close()
        copied = await asyncio.to_thread(_count, primary.url)
        runs = [e for e in events if isinstance(e, ReconcileCompleted)]
        busy = sum(e.duration for e in runs)
        return {
            "rows": rows,
            "batch_size": batch,
            "rows_on_primary": copied,
            "reconciling_s": round(elapsed, 3),
            "rows_per_s": round(rows / elapsed, 1),
            "copy_rows_per_s": round(sum(e.applied for e in runs) / busy, 1) if busy else None,
            "runs": len(runs),
        }


async def _prepare(server: LocalServer) -> None:
    await asyncio.to_thread(_create_schema, server.url)


def _create_schema(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA)


def _hold_writer(dbs: Databases) -> Callable[[int], Awaitable[Any]]:
    async def write(i: int) -> None:
        await dbs.postgres.execute("insert into bench_items values (%s, 'hold', %s)", (i, i))

    return write


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = {"throughput": await throughput(args.rows, args.batch), "write_hold": await write_hold("postgres", _hold_writer, args.cycles, _prepare)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    t, h = result["throughput"], result["write_hold"]
    print("| rows | batch | RECONCILING | rows/s (wall) | rows/s (copy) | on primary |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {t['rows']} | {t['batch_size']} | {t['reconciling_s']} s | {t['rows_per_s']:.0f} | "
        f"{t['copy_rows_per_s'] or 0:.0f} | {t['rows_on_primary']} |"
    )
    hold_table(h)

if __name__ == "__main__":
    asyncio.run(main())
