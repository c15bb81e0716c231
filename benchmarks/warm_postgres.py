"""PostgreSQL warm sync: what it costs the primary path, its lag, and the RPO of a crash.

For each mode (``FAILOVER_WARM=off``, then ``on``; ``--rounds`` alternations, each on a
fresh pair of servers) a closed loop of one-row upserts runs through failover for
``--seconds`` at concurrency 1 and 8, after the raw driver (psycopg_pool) on the same
primary in the same run: steady-state µs/op and the ratio to the raw driver. With warm
sync on, the status ``lag_s`` is sampled every 20 ms meanwhile (p50/p99/max), and at
the end the primary is SIGKILLed under load: the RPO the status reports and how many
acknowledged writes the fallback really lacks.

Both servers share this machine's cores, so the walsender's decoding on the primary and
the apply worker on the fallback compete with the load: an upper bound of the cost a
primary on its own machine pays.

``--modes off,on,native``: ``native`` is warm off with a publication and subscription made by hand
(plain logical replication, no heartbeat, no trigger): what replication itself costs on this machine.

``--pin``: the primary's server and this process run on CPU 0, the fallback's server on CPU 1, so
the fallback's apply work no longer competes with the primary (a fallback on its own machine, as in
production); what remains is what the primary's side pays (its walsender decoding, the heartbeat).
``--pin-walsender`` (with ``--pin``): the primary's walsender runs on CPU 1 too, as it would on a spare
core of a multi-core primary: what is left is the cost on the commit path itself.

Run: ``python3 -m benchmarks.warm_postgres [--seconds 5] [--rounds 2] [--modes off,on,native] [--pin]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Sequence
from typing import Any

import psycopg

from ._common import KEYS, PG_TABLE, wait_until
from ._warm import WarmBench, main


def _walsenders(primary: Any) -> list[int]:
    with psycopg.connect(primary.url, autocommit=True) as conn:
        return [r[0] for r in conn.execute("select pid from pg_stat_replication where state = 'streaming'").fetchall()]


class PostgresWarm(WarmBench):
    """The ``native`` mode, ``--pin``/``--pin-walsender``, and the crash's writes and reads with psycopg."""

    rounds_help = "alternations of the modes"
    streaming_timeout_s = 30.0
    failed_write_pause_s = 0.0
    pin_walsender = False

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--modes", default="off,on", help="comma-separated: off, on, native")
        parser.add_argument("--pin-walsender", action="store_true", help="with --pin: the primary's walsender on CPU 1")

    def configure(self, args: argparse.Namespace) -> Sequence[str]:
        super().configure(args)
        self.pin_walsender = self.pin and args.pin_walsender
        return [m.strip() for m in args.modes.split(",") if m.strip()]

    async def before_failover(self, mode: str, primary: Any, fallback: Any) -> None:
        if mode == "native":
            with psycopg.connect(primary.url, autocommit=True) as conn:
                conn.execute(f"create publication bench_pub for table {PG_TABLE}")
            with psycopg.connect(fallback.url, autocommit=True) as conn:
                conn.execute(f"create subscription bench_sub connection '{primary.url}' publication bench_pub")

    async def failover_ready(self, mode: str, primary: Any) -> None:
        if mode != "off" and self.pin_walsender:
            await wait_until(lambda: bool(_walsenders(primary)), 30, "walsender streaming")
            for pid in _walsenders(primary):
                os.sched_setaffinity(pid, {1})

    async def write_new(self, dbs: Any, key: int) -> None:
        await dbs.postgres.execute(f"insert into {PG_TABLE} (id, v) values (%s, 1)", (key,))

    async def present(self, fallback_url: str) -> set[int]:
        with psycopg.connect(fallback_url, autocommit=True) as conn:
            return {r[0] for r in conn.execute(f"select id from {PG_TABLE} where id > %s", (10 * KEYS,)).fetchall()}


if __name__ == "__main__":
    asyncio.run(main("postgres", __doc__ or "", PostgresWarm))
