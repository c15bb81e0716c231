"""Blackhole RTO: the primary's traffic is silently dropped (no RST, no answer).

The primary is reached through the project's :class:`~failover.local.proxy.FaultProxy`.
Each repetition switches the proxy to ``drop`` under steady load and measures
the time to the switch onto the fallback (detection + switch) and to the first
operation started after the fault that succeeded; then it heals the proxy and
waits for the failback. Nothing but the failover layer's own timeouts can
detect this fault: the server is alive, the network path is not.
"""

from __future__ import annotations

import time
from typing import Any

from failover import SwitchState
from failover.local.proxy import FaultProxy, proxied_url

from failover.local.traffic import Traffic

from ._common import WORKLOADS, SwitchTimes, open_databases, server_pair, summary, wait_until

WORKERS = 4
PAUSE = 0.002


async def run_store(store: str, repetitions: int) -> dict[str, Any]:
    workload = WORKLOADS[store]()
    async with server_pair(store) as (primary, fallback):
        for server in (primary, fallback):
            await workload.prepare(server.url)
        async with FaultProxy(primary.port) as proxy:
            dbs = await open_databases(store, proxied_url(primary.url, proxy.port), fallback.url)
            switch = dbs.store(store)
            times = SwitchTimes(dbs, store)
            load = Traffic(workload.via(dbs), WORKERS, PAUSE).start()
            detection: list[float] = []
            service: list[float] = []
            incomplete = 0
            try:
                for _ in range(repetitions):
                    await wait_until(lambda: switch.state is SwitchState.ON_PRIMARY, 60, "failback")
                    ready = time.monotonic()
                    await wait_until(lambda: load.first_success_after(ready) is not None, 10, "traffic on the primary")
                    dropped = time.monotonic()
                    proxy.drop()
                    try:
                        await wait_until(lambda: times.first_after(dropped, SwitchState.ON_FALLBACK) is not None, 30, "failover")
                        detection.append(times.first_after(dropped, SwitchState.ON_FALLBACK) - dropped)  # type: ignore[operator]
                        await wait_until(lambda: load.first_success_after(dropped) is not None, 30, "service")
                        service.append(load.first_success_after(dropped) - dropped)  # type: ignore[operator]
                    except TimeoutError:
                        incomplete += 1
                    proxy.pass_through()
                    await wait_until(lambda: switch.state is SwitchState.ON_PRIMARY, 60, "failback")
                errors = load.errors_between(float("-inf"), float("inf"))
            finally:
                await load.stop()
                await dbs.close()
    return {
        "repetitions": repetitions,
        "incomplete": incomplete,
        "detection_and_switch": summary(detection),
        "first_success": summary(service),
        "operations": len(load.outcomes),
        "errors": sum(errors.values()),
        "errors_by_type": dict(errors),
    }


async def run(stores: tuple[str, ...], quick: bool) -> dict[str, Any]:
    repetitions = 3 if quick else 10
    return {store: await run_store(store, repetitions) for store in stores}
