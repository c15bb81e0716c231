"""Where a MongoDB primary's CPU goes when warm sync streams it: per write, per event read, per lookup.

``python3 -m benchmarks.mongodb_stream_cost [--writes 5000] [--rounds 3] [--batch 100]``

Against one MongoDB-wire server started here (nx-27017, on a free loopback port), with the raw
driver and the commands warm sync sends (:mod:`failover.stores.mongodb.warm`), it prints the
server's CPU µs (user + system, from ``/proc``, the server's processes only) for:

* one write (the warm benchmarks' one-key ``$set`` upsert over 1 000 keys) to a collection with no
  change stream open and to one with a stream open, in alternating chunks: the difference is what serving change streams adds to every write
  (nx-27017 keeps a change table filled by triggers; a ``mongod`` writes its oplog either way);
* one event read by ``getMore`` in batches of ``--batch`` (a round of the sync at concurrency 8
  gathers about 100);
* one document read back by the sync's lookup, ``find({_id: {$in: ids}})`` of ``--batch`` ids.

Medians of the rounds are printed. The kernel counts CPU time in ticks (10 ms), hence the thousands of operations per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from failover.local import LocalMongo

from ._warm import _cpu_s

KEYS = 1000
CHUNK = 250
"""Writes per chunk: a chunk to the plain collection, one to the watched one, and so on."""


async def _round(url: str, pid: int, writes: int, batch: int, name: str) -> dict[str, float]:
    client: AsyncMongoClient[Any] = AsyncMongoClient(url, directConnection=True)
    db = client["app"]
    plain, watched = db[f"{name}_plain"], db[f"{name}_watched"]
    try:
        for coll in (plain, watched):
            await coll.insert_many([{"_id": i, "v": 0} for i in range(KEYS)])
        opened = await db.command(
            {"aggregate": watched.name, "pipeline": [{"$changeStream": {}}], "cursor": {"batchSize": 0}}
        )
        cursor = opened["cursor"]["id"]
        # Writes to the plain and the watched collection alternate in chunks, so that the machine's
        # drift hits both alike.
        cpu = {plain.name: 0.0, watched.name: 0.0}
        for start in range(0, writes, CHUNK):
            for coll in (plain, watched):
                before = _cpu_s(pid)
                for i in range(start, min(writes, start + CHUNK)):
                    await coll.update_one({"_id": i % KEYS}, {"$set": {"v": i}}, upsert=True)
                cpu[coll.name] += _cpu_s(pid) - before
        result = {
            "write_no_stream_us": cpu[plain.name] * 1e6 / writes,
            "write_stream_open_us": cpu[watched.name] * 1e6 / writes,
        }
        result["stream_adds_per_write_us"] = result["write_stream_open_us"] - result["write_no_stream_us"]
        events = 0
        before = _cpu_s(pid)
        while True:
            reply = await db.command({"getMore": cursor, "collection": watched.name, "batchSize": batch})
            events += len(reply["cursor"]["nextBatch"])
            if len(reply["cursor"]["nextBatch"]) < batch:
                break
        result["read_per_event_us"] = (_cpu_s(pid) - before) * 1e6 / max(1, events)
        result["events"] = events
        looked_up = 0
        before = _cpu_s(pid)
        for start in range(0, writes, batch):
            ids = [(start + k) % KEYS for k in range(batch)]
            looked_up += len(await watched.find({"_id": {"$in": ids}}, batch_size=batch).to_list())
        result["lookup_per_document_us"] = (_cpu_s(pid) - before) * 1e6 / max(1, looked_up)
        await db.command({"killCursors": watched.name, "cursors": [cursor]})
        for coll in (plain, watched):
            await coll.drop()
        return result
    finally:
        await client.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=5000, help="writes per phase (and events, and lookups)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100, help="events per getMore, ids per lookup")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="failover-bench-stream-cost-"))
    server = LocalMongo(root / "mongodb", name="mongodb primary")
    rounds: list[dict[str, float]] = []
    try:
        await asyncio.to_thread(server.start)
        pid = server.pid
        if pid is None:
            raise SystemExit("the MongoDB server did not start")
        started = time.monotonic()
        for n in range(args.rounds):
            rounds.append(await _round(server.url, pid, args.writes, args.batch, f"cost_{n}"))
        print(json.dumps(rounds, indent=1))
        print(f"\n{args.rounds} rounds in {time.monotonic() - started:.0f} s, medians, the server's CPU µs:")
        print("| one write, no stream | one write, a stream open | added by the stream | one event read | one lookup |")
        print("|---|---|---|---|---|")
        keys = (
            "write_no_stream_us",
            "write_stream_open_us",
            "stream_adds_per_write_us",
            "read_per_event_us",
            "lookup_per_document_us",
        )
        print("| " + " | ".join(f"{statistics.median(r[k] for r in rounds):.0f}" for k in keys) + " |")
    finally:
        await asyncio.to_thread(server.kill)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
