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
import json
import os
import statistics
import time
from typing import Any

import psycopg

from failover import SwitchState

from failover.local.servers import process_tree

from ._common import KEYS, PG_TABLE, PG_UPSERT, PostgresWorkload, open_databases, percentile, server_pair, wait_until

CONCURRENCY = (1, 8)
PIN = False
PIN_WALSENDER = False


def _pin(server: Any, cpu: int) -> None:
    """Run every process of *server* (and the backends it forks later) on *cpu*."""
    for pid in process_tree(server.pid):
        os.sched_setaffinity(pid, {cpu})


async def _closed_loop(op: Any, workers: int, seconds: float) -> float:
    """µs per operation of *workers* back-to-back loops running *op* for *seconds*."""
    done = 0
    stop = time.monotonic() + seconds
    counter = 0

    async def worker() -> None:
        nonlocal done, counter
        while time.monotonic() < stop:
            counter += 1
            await op(counter)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return (time.monotonic() - started) * 1e6 / max(1, done)


async def one_round(mode: str, seconds: float) -> dict[str, Any]:
    workload = PostgresWorkload()
    async with server_pair("postgres") as (primary, fallback):
        if PIN:
            _pin(primary, 0)
            _pin(fallback, 1)
        for server in (primary, fallback):
            await workload.prepare(server.url)
        result: dict[str, Any] = {"mode": mode}
        raw, close = await workload.raw(primary.url)
        try:
            await _closed_loop(raw, 1, 0.5)  # warm-up
            for c in CONCURRENCY:
                result[f"raw_us_c{c}"] = await _closed_loop(raw, c, seconds)
        finally:
            await close()
        if mode == "native":
            with psycopg.connect(primary.url, autocommit=True) as conn:
                conn.execute(f"create publication bench_pub for table {PG_TABLE}")
            with psycopg.connect(fallback.url, autocommit=True) as conn:
                conn.execute(f"create subscription bench_sub connection '{primary.url}' publication bench_pub")
        dbs = await open_databases("postgres", primary.url, fallback.url, FAILOVER_WARM="on" if mode == "on" else "off")
        try:
            store = dbs.store("postgres")
            if mode == "on":
                await wait_until(lambda: store.status()["warm"]["state"] == "streaming", 30, "warm sync streaming")
            if mode != "off" and PIN_WALSENDER:
                await wait_until(lambda: bool(_walsenders(primary)), 30, "walsender streaming")
                for pid in _walsenders(primary):
                    os.sched_setaffinity(pid, {1})
            op = workload.via(dbs)
            await _closed_loop(op, 1, 0.5)
            lags: list[float] = []

            async def sample() -> None:
                while True:
                    lag = store.status()["warm"]["lag_s"]
                    if lag is not None:
                        lags.append(lag)
                    await asyncio.sleep(0.02)

            sampler = asyncio.create_task(sample())
            try:
                for c in CONCURRENCY:
                    result[f"failover_us_c{c}"] = await _closed_loop(op, c, seconds)
                    result[f"ratio_c{c}"] = result[f"failover_us_c{c}"] / result[f"raw_us_c{c}"]
            finally:
                sampler.cancel()
            if mode == "on":
                result["lag_p50_ms"] = _ms(percentile(lags, 50))
                result["lag_p99_ms"] = _ms(percentile(lags, 99))
                result["lag_max_ms"] = _ms(max(lags) if lags else None)
                result.update(await _crash(dbs, primary, fallback))
        finally:
            await dbs.close()
        return result


async def _crash(dbs: Any, primary: Any, fallback: Any) -> dict[str, Any]:
    """SIGKILL the primary under 4 writers of new keys; compare what was acknowledged with the fallback."""
    acked: dict[int, float] = {}
    stop = asyncio.Event()
    counter = [10 * KEYS]

    async def writer() -> None:
        while not stop.is_set():
            counter[0] += 1
            key = counter[0]
            try:
                await dbs.postgres.execute(f"insert into {PG_TABLE} (id, v) values (%s, 1)", (key,))
                acked[key] = time.monotonic()
            except Exception:  # noqa: BLE001 - outcome unknown at the kill: not counted either way
                pass

    tasks = [asyncio.create_task(writer()) for _ in range(4)]
    await asyncio.sleep(2.0)
    killed = time.monotonic()
    await asyncio.to_thread(primary.kill)
    store = dbs.store("postgres")
    await wait_until(lambda: store.state is SwitchState.ON_FALLBACK, 15, "failover")
    stop.set()
    await asyncio.gather(*tasks)
    before_kill = {k for k, at in acked.items() if at < killed}
    with psycopg.connect(fallback.url, autocommit=True) as conn:
        present = {r[0] for r in conn.execute(f"select id from {PG_TABLE} where id > %s", (10 * KEYS,)).fetchall()}
    lost = sorted(before_kill - present)
    # The oldest lost write tells how far back the loss really reached.
    reach = max((killed - acked[k] for k in lost), default=0.0)
    return {
        "rpo_reported_ms": _ms(store.status()["warm"]["rpo_at_last_failover_s"]),
        "acked_before_kill": len(before_kill),
        "lost_on_fallback": len(lost),
        "loss_reach_ms": _ms(reach),
    }


def _walsenders(primary: Any) -> list[int]:
    with psycopg.connect(primary.url, autocommit=True) as conn:
        return [r[0] for r in conn.execute("select pid from pg_stat_replication where state = 'streaming'").fetchall()]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the modes")
    parser.add_argument("--modes", default="off,on", help="comma-separated: off, on, native")
    parser.add_argument("--pin", action="store_true", help="primary and this process on CPU 0, fallback on CPU 1")
    parser.add_argument("--pin-walsender", action="store_true", help="with --pin: the primary's walsender on CPU 1")
    args = parser.parse_args()
    if args.pin:
        global PIN, PIN_WALSENDER
        PIN = True
        PIN_WALSENDER = args.pin_walsender
        os.sched_setaffinity(0, {0})
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rounds = []
    for _ in range(args.rounds):
        for mode in modes:
            rounds.append(await one_round(mode, args.seconds))
    print(json.dumps(rounds, indent=1))
    print("\n| warm | concurrency | raw µs/op | failover µs/op | ratio to raw |")
    print("|---|---|---|---|---|")
    for mode in modes:
        mine = [r for r in rounds if r["mode"] == mode]
        for c in CONCURRENCY:
            raw = statistics.median(r[f"raw_us_c{c}"] for r in mine)
            via = statistics.median(r[f"failover_us_c{c}"] for r in mine)
            ratio = statistics.median(r[f"ratio_c{c}"] for r in mine)
            print(f"| {mode} | {c} | {raw:.0f} | {via:.0f} | {ratio:.2f} |")
    on = [r for r in rounds if r["mode"] == "on"]
    for c in CONCURRENCY if on and "off" in modes else ():
        off_ratio = statistics.median(r[f"ratio_c{c}"] for r in rounds if r["mode"] == "off")
        on_ratio = statistics.median(r[f"ratio_c{c}"] for r in on)
        off_us = statistics.median(r[f"failover_us_c{c}"] for r in rounds if r["mode"] == "off")
        on_us = statistics.median(r[f"failover_us_c{c}"] for r in on)
        print(
            f"concurrency {c}: warm on vs off: {100 * (on_ratio / off_ratio - 1):+.1f}% on the ratio to raw, "
            f"{100 * (on_us / off_us - 1):+.1f}% on failover µs/op ({on_us:.0f} vs {off_us:.0f})"
        )
    for r in on:
        print(
            f"lag p50 {r['lag_p50_ms']} ms, p99 {r['lag_p99_ms']} ms, max {r['lag_max_ms']} ms; crash: RPO reported "
            f"{r['rpo_reported_ms']} ms, {r['lost_on_fallback']} of {r['acked_before_kill']} acknowledged writes "
            f"missing on the fallback (oldest {r['loss_reach_ms']} ms before the kill)"
        )


if __name__ == "__main__":
    asyncio.run(main())
