"""Shared by ``warm_postgres``, ``warm_redis``, ``warm_mongodb``: cost of warm sync, its lag, a crash's RPO.

For each mode (``FAILOVER_WARM=off``, then ``on``; ``--rounds`` alternations, each on a fresh
pair of servers) a closed loop of one-key upserts (:mod:`._common`'s workload) runs through
failover for ``--seconds`` at concurrency 1 and 8, after the raw driver on the same primary in
the same run: µs/op and the ratio to the raw driver. With warm sync on, the status ``lag_s`` is
sampled every 20 ms meanwhile (p50/p99/max); at the end the primary is SIGKILLed under 4
writers of new keys: the RPO the status reports and how many acknowledged writes the fallback
really lacks (read with the raw driver).

Both servers and the copies share this machine's two cores with the load (the Redis and MongoDB
warm worker runs in the application's own event loop): an upper bound of the cost.

``--pin``: the primary's server and this process (the load, and the Redis and MongoDB warm worker)
run on CPU 0, the fallback's server on CPU 1, so the fallback's own work of taking the copies no
longer competes with the primary path (a fallback on its own machine, as in production).

``--primary-rtt-ms MS``: the primary is reached through a proxy, in a process of its own (on CPU 1
with ``--pin``), that adds *MS* to every round trip (:mod:`._netem`): a cloud primary (Supabase,
Atlas, Upstash) is at least a millisecond or so away, where loopback is 0.05 ms. The raw driver, failover and warm
sync all go through it; the servers themselves are read and prepared directly.

``--cloud`` (implies ``--primary-rtt-ms 1`` unless given): the seed's deployment on these two cores.
The primary and the proxy run on CPU 1 (the cloud's machine and the network), this process and the
fallback's server on CPU 0 (the application's machine, with its local fallback).

A store plugs its own parts in through :class:`WarmBench`, whose defaults serve Redis and MongoDB;
``warm_postgres`` subclasses it for its extra modes, CPU pinning and reads with psycopg.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
import os
from typing import Any

from failover import SwitchState
from failover.local.servers import process_tree

from ._netem import delayed_primary
from ._common import (
    KEYS,
    WORKLOADS,
    open_databases,
    percentile,
    server_pair,
    wait_until,
)

CONCURRENCY = (1, 8)


def pin(server: Any, cpu: int) -> None:
    """Run every process of *server* (and the ones it forks later) on *cpu*."""
    for pid in process_tree(server.pid):
        os.sched_setaffinity(pid, {cpu})


class WarmBench:
    """One store's parts of the benchmark; the hooks do nothing by default (Redis and MongoDB need none)."""

    #: ``--rounds``'s help.
    rounds_help = "alternations of off and on"
    #: How long warm sync may take to reach ``streaming`` (its initial copy included).
    streaming_timeout_s = 60.0
    #: How long a crash writer waits after a failed write before the next (0: not at all).
    failed_write_pause_s = 0.01

    def __init__(self, store: str) -> None:
        self.store = store
        self.pin = False
        self.cloud = False
        self.primary_rtt_s = 0.0

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the command-line options after ``--seconds`` and ``--rounds`` (a store's own: extend it)."""
        parser.add_argument("--pin", action="store_true", help="primary and this process on CPU 0, fallback on CPU 1")
        parser.add_argument(
            "--primary-rtt-ms", type=float, default=None, help="milliseconds a delaying proxy adds to the primary's round trips"
        )
        parser.add_argument(
            "--cloud", action="store_true", help="primary and proxy on CPU 1; this process and the fallback on CPU 0"
        )

    def configure(self, args: argparse.Namespace) -> Sequence[str]:
        """Take the parsed options (and do the process-wide setup they ask for); return the modes of a round."""
        if args.pin and args.cloud:
            raise SystemExit("--pin and --cloud are two layouts: choose one")
        self.cloud = args.cloud
        if args.pin or args.cloud:
            self.pin = True
            os.sched_setaffinity(0, {0})
        rtt_ms = args.primary_rtt_ms if args.primary_rtt_ms is not None else 1.0 if args.cloud else 0.0
        self.primary_rtt_s = rtt_ms / 1000
        return ("off", "on")

    async def servers_started(self, primary: Any, fallback: Any) -> None:
        """A round's fresh servers are up; nothing has been written to them yet (``--pin`` pins them here)."""
        if self.pin:
            pin(primary, 1 if self.cloud else 0)
            pin(fallback, 0 if self.cloud else 1)

    async def before_failover(self, mode: str, primary: Any, fallback: Any) -> None:
        """The raw driver's figures are taken; failover is not open yet."""

    async def failover_ready(self, mode: str, primary: Any) -> None:
        """Failover is open (and warm sync streaming, with ``on``); its figures come next."""

    async def write_new(self, dbs: Any, key: int) -> None:
        """Write the new key *key* through failover (the crash's writers)."""
        if self.store == "redis":
            await dbs.redis.set(f"crash:{key}", 1)
        else:
            await dbs.mongodb.database["failover_bench_crash"].insert_one({"_id": key})

    async def present(self, fallback_url: str) -> set[int]:
        """The new keys the fallback has, read with the raw driver."""
        if self.store == "redis":
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(fallback_url)
            try:
                return {int(k.split(b":")[1]) async for k in client.scan_iter("crash:*", count=1000)}
            finally:
                await client.aclose()
        from pymongo import AsyncMongoClient

        mongo: AsyncMongoClient[Any] = AsyncMongoClient(fallback_url, directConnection=True)
        try:
            return {d["_id"] async for d in mongo["app"]["failover_bench_crash"].find({}, {"_id": 1})}
        finally:
            await mongo.close()


async def _closed_loop(op: Callable[[int], Awaitable[Any]], workers: int, seconds: float) -> float:
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


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by *pid* and the processes below it."""
    total = 0
    for one in process_tree(pid):
        try:
            fields = open(f"/proc/{one}/stat").read().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


async def _costed_loop(
    op: Callable[[int], Awaitable[Any]], workers: int, seconds: float, servers: dict[str, int]
) -> tuple[float, dict[str, float]]:
    """:func:`_closed_loop`, plus the CPU µs per operation of this process and of each of *servers*
    (name -> process id, counted with the processes below it)."""

    def cpu() -> dict[str, float]:
        times = os.times()
        return {"app": times.user + times.system, **{name: _cpu_s(pid) for name, pid in servers.items()}}

    before, started = cpu(), time.monotonic()
    us = await _closed_loop(op, workers, seconds)
    after, elapsed = cpu(), time.monotonic() - started
    ops = max(1.0, elapsed * 1e6 / us)
    return us, {name: round((after[name] - before[name]) * 1e6 / ops, 1) for name in before}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


async def _crash(bench: WarmBench, dbs: Any, primary: Any, fallback: Any) -> dict[str, Any]:
    """SIGKILL the primary under 4 writers of new keys; compare what was acknowledged with the fallback."""
    acked: dict[int, float] = {}
    stop = asyncio.Event()
    counter = [10 * KEYS]

    async def writer() -> None:
        while not stop.is_set():
            counter[0] += 1
            key = counter[0]
            try:
                await bench.write_new(dbs, key)
                acked[key] = time.monotonic()
            except Exception:  # noqa: BLE001 - outcome unknown at the kill: not counted either way
                if bench.failed_write_pause_s:
                    await asyncio.sleep(bench.failed_write_pause_s)

    tasks = [asyncio.create_task(writer()) for _ in range(4)]
    await asyncio.sleep(2.0)
    killed = time.monotonic()
    await asyncio.to_thread(primary.kill)
    failover = dbs.store(bench.store)
    await wait_until(lambda: failover.state is SwitchState.ON_FALLBACK, 15, "failover")
    stop.set()
    await asyncio.gather(*tasks)
    before_kill = {k for k, at in acked.items() if at < killed}
    lost = sorted(before_kill - await bench.present(fallback.url))
    # The oldest lost write tells how far back the loss really reached.
    reach = max((killed - acked[k] for k in lost), default=0.0)
    return {
        "rpo_reported_ms": _ms(failover.status()["warm"]["rpo_at_last_failover_s"]),
        "acked_before_kill": len(before_kill),
        "lost_on_fallback": len(lost),
        "loss_reach_ms": _ms(reach),
    }


async def one_round(bench: WarmBench, mode: str, seconds: float) -> dict[str, Any]:
    """The raw driver's figures, then failover's in *mode* (warm sync ``on`` only in ``on``), on fresh servers."""
    async with server_pair(bench.store) as (primary, fallback):
        await bench.servers_started(primary, fallback)
        if not bench.primary_rtt_s:
            return await _measure(bench, mode, seconds, primary, fallback, primary.url)
        cpu = 1 if bench.pin else None
        async with delayed_primary(primary.url, primary.port, bench.primary_rtt_s, cpu) as (primary_url, proxy):
            result = await _measure(bench, mode, seconds, primary, fallback, primary_url, proxy)
            result["primary_rtt_ms"] = bench.primary_rtt_s * 1000
            return result


async def _measure(
    bench: WarmBench, mode: str, seconds: float, primary: Any, fallback: Any, primary_url: str, proxy: int | None = None
) -> dict[str, Any]:
    """One round's figures on started servers; clients reach the primary at *primary_url* (through the
    delaying proxy of process id *proxy*, when given)."""
    workload = WORKLOADS[bench.store]()
    for server in (primary, fallback):
        await workload.prepare(server.url)
    result: dict[str, Any] = {"mode": mode}
    raw, close = await workload.raw(primary_url)
    try:
        await _closed_loop(raw, 1, 0.5)  # warm-up
        for c in CONCURRENCY:
            result[f"raw_us_c{c}"] = await _closed_loop(raw, c, seconds)
    finally:
        await close()
    await bench.before_failover(mode, primary, fallback)
    warm = "on" if mode == "on" else "off"
    dbs = await open_databases(bench.store, primary_url, fallback.url, FAILOVER_WARM=warm)
    try:
        failover = dbs.store(bench.store)
        if mode == "on":
            await wait_until(
                lambda: failover.status()["warm"]["state"] == "streaming",
                bench.streaming_timeout_s,
                "warm sync streaming",
            )
        await bench.failover_ready(mode, primary)
        op = workload.via(dbs)
        await _closed_loop(op, 1, 0.5)
        lags: list[float] = []

        async def sample() -> None:
            while True:
                lag = failover.status()["warm"]["lag_s"]
                if lag is not None:
                    lags.append(lag)
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        try:
            for c in CONCURRENCY:
                costed = {"primary": primary.pid, "fallback": fallback.pid}
                if proxy is not None:
                    costed["network"] = proxy
                result[f"failover_us_c{c}"], cpu = await _costed_loop(op, c, seconds, costed)
                for name, us in cpu.items():  # where the time went: CPU µs per operation
                    result[f"cpu_{name}_us_c{c}"] = us
                result[f"ratio_c{c}"] = result[f"failover_us_c{c}"] / result[f"raw_us_c{c}"]
        finally:
            sampler.cancel()
        if mode == "on":
            result["lag_p50_ms"] = _ms(percentile(lags, 50))
            result["lag_p99_ms"] = _ms(percentile(lags, 99))
            result["lag_max_ms"] = _ms(max(lags) if lags else None)
            result.update(await _crash(bench, dbs, primary, fallback))
    finally:
        await dbs.close()
    return result


def _print_summary(rounds: list[dict[str, Any]], modes: Sequence[str]) -> None:
    """The medians per mode as a table, warm on against off, and each crash."""
    print("\n| warm | concurrency | raw µs/op | failover µs/op | ratio to raw |")
    print("|---|---|---|---|---|")
    for mode in modes:
        mine = [r for r in rounds if r["mode"] == mode]
        for c in CONCURRENCY:
            raw = statistics.median(r[f"raw_us_c{c}"] for r in mine)
            via = statistics.median(r[f"failover_us_c{c}"] for r in mine)
            ratio = statistics.median(r[f"ratio_c{c}"] for r in mine)
            print(f"| {mode} | {c} | {raw:.0f} | {via:.0f} | {ratio:.2f} |")
    parts = ["app", "primary", "fallback"] + (["network"] if all("cpu_network_us_c1" in r for r in rounds) else [])
    print("\n| warm | concurrency | CPU µs/op: this process | primary | fallback |" + (" network proxy |" if len(parts) > 3 else ""))
    print("|---|---|---|---|---|" + ("---|" if len(parts) > 3 else ""))
    for mode in modes:
        mine = [r for r in rounds if r["mode"] == mode]
        for c in CONCURRENCY:
            cells = [statistics.median(r[f"cpu_{name}_us_c{c}"] for r in mine) for name in parts]
            print(f"| {mode} | {c} | " + " | ".join(f"{v:.0f}" for v in cells) + " |")
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


async def main(store: str, doc: str, kind: type[WarmBench] = WarmBench) -> None:
    """Parse the options, run the rounds of *store* (its parts from *kind*), print them and their summary."""
    bench = kind(store)
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help=bench.rounds_help)
    bench.add_arguments(parser)
    args = parser.parse_args()
    modes = bench.configure(args)
    rounds = []
    for _ in range(args.rounds):
        for mode in modes:
            rounds.append(await one_round(bench, mode, args.seconds))
    print(json.dumps(rounds, indent=1))
    _print_summary(rounds, modes)
