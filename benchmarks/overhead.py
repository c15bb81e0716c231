"""Overhead: the same workload through failover and through the raw driver, in the same run.

For each store and concurrency (1 and 32 closed-loop workers), raw and failover
rounds alternate (raw, failover, raw, failover, ...) against the same primary so
that drift on a busy 2-core machine hits both alike. The figure is the ratio of
operations per second, failover / raw.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ._common import WORKLOADS, open_databases, server_pair

CONCURRENCY = (1, 32)


async def _measure(operation: Callable[[int], Awaitable[Any]], workers: int, seconds: float) -> tuple[int, int, float]:
    """Run *workers* closed loops for *seconds*; return (ops, errors, elapsed)."""
    stop_at = time.monotonic() + seconds
    counts = [0, 0]
    counter = 0

    async def worker() -> None:
        nonlocal counter
        while time.monotonic() < stop_at:
            counter += 1
            try:
                await operation(counter)
                counts[0] += 1
            except Exception:
                counts[1] += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return counts[0], counts[1], time.monotonic() - started


async def run_store(store: str, *, seconds: float, rounds: int) -> dict[str, Any]:
    workload = WORKLOADS[store]()
    async with server_pair(store) as (primary, fallback):
        for server in (primary, fallback):
            await workload.prepare(server.url)
        dbs = await open_databases(store, primary.url, fallback.url)
        raw_op, raw_close = await workload.raw(primary.url)
        via_op = workload.via(dbs)
        results: dict[str, Any] = {}
        try:
            for workers in CONCURRENCY:
                # Warm both paths (pools filled, code paths hot) before measuring.
                await _measure(raw_op, workers, 0.3)
                await _measure(via_op, workers, 0.3)
                totals = {"raw": [0, 0, 0.0], "failover": [0, 0, 0.0]}
                for _ in range(rounds):
                    for name, op in (("raw", raw_op), ("failover", via_op)):
                        ops, errors, elapsed = await _measure(op, workers, seconds / rounds)
                        totals[name][0] += ops
                        totals[name][1] += errors
                        totals[name][2] += elapsed
                raw_rate = totals["raw"][0] / totals["raw"][2]
                via_rate = totals["failover"][0] / totals["failover"][2]
                results[f"c{workers}"] = {
                    "concurrency": workers,
                    "raw_ops_s": round(raw_rate, 1),
                    "failover_ops_s": round(via_rate, 1),
                    "ratio": round(via_rate / raw_rate, 4) if raw_rate else None,
                    "overhead_pct": round((1 - via_rate / raw_rate) * 100, 2) if raw_rate else None,
                    # Client time added per operation (at concurrency 1: latency; at 32: CPU on a busy loop).
                    "added_us_per_op": round((1 / via_rate - 1 / raw_rate) * 1e6, 1) if raw_rate and via_rate else None,
                    "raw_errors": totals["raw"][1],
                    "failover_errors": totals["failover"][1],
                    "seconds_each": round(totals["raw"][2], 2),
                }
        finally:
            await raw_close()
            await dbs.close()
    return results


async def run(stores: tuple[str, ...], quick: bool) -> dict[str, Any]:
    seconds, rounds = (1.5, 3) if quick else (6.0, 6)
    return {store: await run_store(store, seconds=seconds, rounds=rounds) for store in stores}
