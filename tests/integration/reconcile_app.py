"""A separate application process for the reconcile tests (several processes, SIGKILL).

It reads the usual environment (``SUPABASE_DB_URL``, ``POSTGRES_URL``, ``FAILOVER_*``),
starts :class:`~failover.Databases` and, with ``--writer N``, inserts rows
``(N * 1_000_000 + i, 'p<N>')`` into ``items`` in a loop for ``--duration`` seconds,
appending the id of every *acknowledged* insert to ``--acks`` (flushed per line, so a
SIGKILL loses nothing that was acknowledged). Then it waits until the store is back on
its primary and prints ``done``. Without ``--writer`` it only runs (reconciling what
it finds) until killed or until ``--until-primary`` sees the primary serving.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from failover import Databases, OutcomeUnknown, SwitchState
from failover.settings import Settings


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--writer", type=int, default=None)
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--acks", default=None)
    parser.add_argument("--until-primary", action="store_true")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    dbs = Databases(Settings(_env_file=None))  # type: ignore[call-arg]
    await dbs.start()
    print("started", dbs.store("postgres").state, flush=True)
    try:
        if args.writer is not None:
            acks = open(args.acks, "a", buffering=1)  # noqa: SIM115 - line-buffered on purpose
            ends = time.monotonic() + args.duration
            i = 0
            while time.monotonic() < ends:
                i += 1
                key = args.writer * 1_000_000 + i
                try:
                    await dbs.postgres.execute("insert into items (id, note) values (%s, %s)", (key, f"p{args.writer}"))
                except OutcomeUnknown:
                    print("unknown", key, flush=True)
                    continue
                except Exception as exc:  # reported, the loop goes on: the test counts acks only
                    print("error", key, type(exc).__name__, flush=True)
                    await asyncio.sleep(0.01)
                    continue
                acks.write(f"{key}\n")
                await asyncio.sleep(0.002)
            acks.close()
        if args.until_primary or args.writer is not None:
            ends = time.monotonic() + args.timeout
            while dbs.store("postgres").state is not SwitchState.ON_PRIMARY:
                if time.monotonic() > ends:
                    print("timeout", dbs.store("postgres").state, flush=True)
                    return 1
                await asyncio.sleep(0.05)
            print("done", flush=True)
            return 0
        while True:
            await asyncio.sleep(3600)
    finally:
        await dbs.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
