"""MongoDB reconcile: throughput of the copy and the write hold at failback.

Throughput: the primary is killed, ``--docs`` documents are written on the
fallback through failover (``insert_many`` of 1,000, each journaled), the
primary is restarted and the time the store spends ``RECONCILING`` is measured,
with the batch size used. Every document is then checked on the primary. As a
yardstick, the same documents are copied once more with the raw driver alone
(read by ``_id``, ``ReplaceOne(upsert=True)`` in bulks of the same size, into a
scratch collection): the ratio says how much of the time is the servers'.

Write hold: ``--cycles`` outages of about one second under steady write traffic
(4 writers); for each failback the duration of the final catch-up, during which
new writes of the store wait, is taken from the ``ReconcileCompleted`` event.

Run: ``python3 -m benchmarks.reconcile_mongodb [--docs 20000] [--batch 500] [--cycles 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pymongo import AsyncMongoClient, ReplaceOne

from failover import Databases, SwitchState
from failover.core.events import Event, ReconcileCompleted

from ._common import open_databases, server_pair, wait_until
from ._reconcile import hold_table, write_hold

COLLECTION = "bench_docs"


async def _raw_copy(fallback_url: str, primary_url: str, batch: int) -> float:
    """Seconds the raw driver takes to copy the fallback's documents, batch by batch."""
    source: AsyncMongoClient[Any] = AsyncMongoClient(fallback_url, directConnection=True)
    target: AsyncMongoClient[Any] = AsyncMongoClient(primary_url, directConnection=True)
    try:
        ids = [d["_id"] for d in await source["app"][COLLECTION].find({}, {"_id": 1}).to_list(None)]
        started = time.monotonic()
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            docs = await source["app"][COLLECTION].find({"_id": {"$in": chunk}}).to_list(None)
            await target["app"]["bench_raw_copy"].bulk_write(
                [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs], ordered=False
            )
        return time.monotonic() - started
    finally:
        await source.close()
        await target.close()


async def throughput(docs: int, batch: int) -> dict[str, Any]:
    async with server_pair("mongodb") as (primary, fallback):
        dbs = await open_databases("mongodb", primary.url, fallback.url, FAILOVER_RECONCILE_BATCH=batch)
        events: list[Event] = []
        dbs.subscribe(events.append)
        store = dbs.store("mongodb")
        collection = dbs.mongodb.database[COLLECTION]
        try:
            await asyncio.to_thread(primary.kill)
            for start in range(0, docs, 1000):
                await collection.insert_many(
                    [{"_id": i, "note": f"document {i}", "n": i} for i in range(start, min(docs, start + 1000))]
                )
            await asyncio.to_thread(primary.start)
            await wait_until(lambda: store.state is SwitchState.RECONCILING, 30, "reconciling")
            started = time.monotonic()
            await wait_until(lambda: store.state is SwitchState.ON_PRIMARY, 900, "failback")
            elapsed = time.monotonic() - started
        finally:
            await dbs.close()
        client: AsyncMongoClient[Any] = AsyncMongoClient(primary.url, directConnection=True)
        try:
            copied = await client["app"][COLLECTION].count_documents({})
        finally:
            await client.close()
        raw_s = await _raw_copy(fallback.url, primary.url, batch)
        runs = [e for e in events if isinstance(e, ReconcileCompleted)]
        busy = sum(e.duration for e in runs)
        return {
            "docs": docs,
            "batch_size": batch,
            "docs_on_primary": copied,
            "reconciling_s": round(elapsed, 3),
            "docs_per_s": round(docs / elapsed, 1),
            "copy_docs_per_s": round(sum(e.applied for e in runs) / busy, 1) if busy else None,
            "raw_driver_docs_per_s": round(docs / raw_s, 1) if raw_s else None,
            "runs": len(runs),
        }


def _hold_writer(dbs: Databases) -> Callable[[int], Awaitable[Any]]:
    collection = dbs.mongodb.database[COLLECTION]

    async def write(i: int) -> None:
        await collection.update_one({"_id": i % 500}, {"$set": {"n": i}}, upsert=True)

    return write


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = {"throughput": await throughput(args.docs, args.batch), "write_hold": await write_hold("mongodb", _hold_writer, args.cycles)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    t, h = result["throughput"], result["write_hold"]
    print("| docs | batch | RECONCILING | docs/s (wall) | docs/s (copy) | raw driver copy docs/s | on primary |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {t['docs']} | {t['batch_size']} | {t['reconciling_s']} s | {t['docs_per_s']:.0f} | "
        f"{t['copy_docs_per_s'] or 0:.0f} | {t['raw_driver_docs_per_s'] or 0:.0f} | {t['docs_on_primary']} |"
    )
    hold_table(h)

if __name__ == "__main__":
    asyncio.run(main())
