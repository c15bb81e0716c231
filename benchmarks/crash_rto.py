"""Crash RTO: the primary is SIGKILLed under steady load, again and again.

Each repetition waits until traffic runs on the primary, kills every process of
it (frozen first, so it says no goodbye), and measures the time from the kill
to the first operation that *started after the kill* and succeeded. It then
restarts the primary and waits for the failback before the next repetition.
Errors are every exception the workload's callers saw, by type.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from failover import SwitchState

from failover.local.traffic import Traffic

from ._common import WORKLOADS, SwitchTimes, open_databases, server_pair, summary, wait_until

WORKERS = 4
PAUSE = 0.002


async def run_store(store: str, repetitions: int) -> dict[str, Any]:
    workload = WORKLOADS[store]()
    async with server_pair(store) as (primary, fallback):
        for server in (primary, fallback):
            await workload.prepare(server.url)
        dbs = await open_databases(store, primary.url, fallback.url)
        switch = dbs.store(store)
        times = SwitchTimes(dbs, store)
        load = Traffic(workload.via(dbs), WORKERS, PAUSE).start()
        rtos: list[float] = []
        failover_times: list[float] = []
        failback_times: list[float] = []
        errors: Counter[str] = Counter()
        incomplete = 0
        try:
            for _ in range(repetitions):
                await wait_until(lambda: switch.state is SwitchState.ON_PRIMARY, 60, "failback")
                ready = time.monotonic()
                await wait_until(lambda: load.first_success_after(ready) is not None, 10, "traffic on the primary")
                # Freeze it on the spot (as kill() does first), so `killed` is when service stopped;
                # then SIGKILL and wait for every process to be gone, off the event loop.
                primary.pause()
                killed = time.monotonic()
                await asyncio.to_thread(primary.kill)
                try:
                    await wait_until(lambda: load.first_success_after(killed) is not None, 30, "service after the kill")
                    first = load.first_success_after(killed)
                    assert first is not None
                    rtos.append(first - killed)
                    await wait_until(lambda: times.first_after(killed, SwitchState.ON_FALLBACK) is not None, 30, "failover")
                    failover_times.append(times.first_after(killed, SwitchState.ON_FALLBACK) - killed)  # type: ignore[operator]
                except TimeoutError:
                    incomplete += 1
                restarted = time.monotonic()
                await asyncio.to_thread(primary.start)
                await wait_until(lambda: switch.state is SwitchState.ON_PRIMARY, 60, "failback")
                failback_times.append(time.monotonic() - restarted)
            errors = load.errors_between(float("-inf"), float("inf"))
        finally:
            await load.stop()
            await dbs.close()
    return {
        "repetitions": repetitions,
        "incomplete": incomplete,
        "rto": summary(rtos),
        "failover": summary(failover_times),
        "failback_after_restart": summary(failback_times),
        "operations": len(load.outcomes),
        "errors": sum(errors.values()),
        "errors_by_type": dict(errors),
    }


async def run(stores: tuple[str, ...], quick: bool) -> dict[str, Any]:
    repetitions = 5 if quick else 20
    return {store: await run_store(store, repetitions) for store in stores}
