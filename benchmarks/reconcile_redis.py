"""Redis reconcile: throughput of the copy and the write hold at failback.

Throughput: the primary is killed, ``--keys`` keys are written on the fallback
through failover (pipelines of 1,000 commands, every write captured: 80 % strings,
10 % hashes of 10 fields, 10 % lists of 10 items), the primary is restarted and
the time the store spends ``RECONCILING`` is measured, with the batch size used.
Every key is then checked on the primary.

Big key: one hash of ``--big`` fields written during an outage, copied in chunks
and swapped in whole: elements per second.

Write hold: ``--cycles`` outages of about one second under steady write traffic
(4 writers); for each failback the duration of the final catch-up, during which
new writes of the store wait, is taken from the ``ReconcileCompleted`` event.

Run: ``python3 -m benchmarks.reconcile_redis [--keys 50000] [--batch 500] [--big 200000] [--cycles 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from failover import Databases, SwitchState
from failover.core.events import Event, ReconcileCompleted

from ._common import open_databases, server_pair, wait_until
from ._reconcile import hold_table, write_hold


async def _write_outage(dbs: Any, keys: int) -> None:
    for start in range(0, keys, 1000):
        async with dbs.redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(keys, start + 1000)):
                if i % 10 == 0:
                    pipe.hset(f"h:{i}", mapping={f"f{j}": j for j in range(10)})
                elif i % 10 == 1:
                    pipe.rpush(f"l:{i}", *range(10))
                else:
                    pipe.set(f"s:{i}", i)
            await pipe.execute()


async def _on_primary(url: str, keys: int) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        return int(await client.dbsize())
    finally:
        await client.aclose()


async def throughput(keys: int, batch: int) -> dict[str, Any]:
    async with server_pair("redis") as (primary, fallback):
        dbs = await open_databases("redis", primary.url, fallback.url, FAILOVER_RECONCILE_BATCH=batch)
        events: list[Event] = []
        dbs.subscribe(events.append)
        store = dbs.store("redis")
        try:
            await asyncio.to_thread(primary.kill)
            await wait_until(lambda: store.state is SwitchState.ON_FALLBACK, 30, "failover")
            await _write_outage(dbs, keys)
            await asyncio.to_thread(primary.start)
            await wait_until(lambda: store.state is SwitchState.RECONCILING, 30, "reconciling")
            started = time.monotonic()
            await wait_until(lambda: store.state is SwitchState.ON_PRIMARY, 600, "failback")
            elapsed = time.monotonic() - started
        finally:
            await dbs.close()
        copied = await _on_primary(primary.url, keys)
        runs = [e for e in events if isinstance(e, ReconcileCompleted)]
        busy = sum(e.duration for e in runs)
        return {
            "keys": keys,
            "batch_size": batch,
            "keys_on_primary": copied,
            "reconciling_s": round(elapsed, 3),
            "keys_per_s": round(keys / elapsed, 1),
            "copy_keys_per_s": round(sum(e.applied for e in runs) / busy, 1) if busy else None,
            "runs": len(runs),
        }


async def big_key(fields: int) -> dict[str, Any]:
    async with server_pair("redis") as (primary, fallback):
        dbs = await open_databases("redis", primary.url, fallback.url, FAILOVER_OPERATION_TIMEOUT=30.0)
        events: list[Event] = []
        dbs.subscribe(events.append)
        store = dbs.store("redis")
        try:
            await asyncio.to_thread(primary.kill)
            await wait_until(lambda: store.state is SwitchState.ON_FALLBACK, 30, "failover")
            for start in range(0, fields, 5000):
                await dbs.redis.hset("big", mapping={f"f{i}": i for i in range(start, min(fields, start + 5000))})
            await asyncio.to_thread(primary.start)
            await wait_until(lambda: store.state is SwitchState.ON_PRIMARY, 600, "failback")
        finally:
            await dbs.close()
        client = aioredis.Redis.from_url(primary.url)
        try:
            copied = int(await client.hlen("big"))
        finally:
            await client.aclose()
        runs = [e for e in events if isinstance(e, ReconcileCompleted) and e.applied]
        busy = sum(e.duration for e in runs)
        return {
            "fields": fields,
            "fields_on_primary": copied,
            "copy_s": round(busy, 3),
            "elements_per_s": round(fields / busy, 1) if busy else None,
        }


def _hold_writer(dbs: Databases) -> Callable[[int], Awaitable[Any]]:
    async def write(i: int) -> None:
        await dbs.redis.set(f"hold:{i}", i)

    return write


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--big", type=int, default=200_000)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = {
        "throughput": await throughput(args.keys, args.batch),
        "big_key": await big_key(args.big),
        "write_hold": await write_hold("redis", _hold_writer, args.cycles),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    t, b, h = result["throughput"], result["big_key"], result["write_hold"]
    print("| keys | batch | RECONCILING | keys/s (wall) | keys/s (copy) | on primary |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {t['keys']} | {t['batch_size']} | {t['reconciling_s']} s | {t['keys_per_s']:.0f} | "
        f"{t['copy_keys_per_s'] or 0:.0f} | {t['keys_on_primary']} |"
    )
    print()
    print("| big hash fields | copy time | elements/s | on primary |")
    print("|---:|---:|---:|---:|")
    print(f"| {b['fields']} | {b['copy_s']} s | {b['elements_per_s'] or 0:.0f} | {b['fields_on_primary']} |")
    hold_table(h)

if __name__ == "__main__":
    asyncio.run(main())
