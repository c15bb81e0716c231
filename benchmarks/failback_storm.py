"""Failback storm: 200 concurrent clients hammering a store at the moment of failback.

Both endpoints are reached through a :class:`~failover.local.proxy.FaultProxy`
in ``pass`` mode, which counts the connections the application opens to each
(pooled connections and probes alike). The primary is killed, traffic settles
on the fallback, the primary is restarted, and from that moment until traffic
has run on the primary for a while we count errors surfaced to the 200 clients
(the fallback stays up all along, so the target is 0) and the peak number of
connections open at once to each endpoint (bounded by the pool size plus probes).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from failover import SwitchState
from failover.local.proxy import FaultProxy, proxied_url

from failover.local.traffic import Traffic

from ._common import BENCH_TUNING, WORKLOADS, open_databases, server_pair, wait_until

CLIENTS = 200
AFTER_FAILBACK = 1.5


async def run_once(store: str) -> dict[str, Any]:
    workload = WORKLOADS[store]()
    async with server_pair(store) as (primary, fallback):
        for server in (primary, fallback):
            await workload.prepare(server.url)
        async with FaultProxy(primary.port) as p_proxy, FaultProxy(fallback.port) as f_proxy:
            dbs = await open_databases(store, proxied_url(primary.url, p_proxy.port), proxied_url(fallback.url, f_proxy.port))
            switch = dbs.store(store)
            load = Traffic(workload.via(dbs), CLIENTS, pause=0.001).start()
            try:
                await wait_until(lambda: len(load.outcomes) > CLIENTS, 30, "traffic")
                killed = time.monotonic()
                await asyncio.to_thread(primary.kill)
                await wait_until(lambda: switch.state is SwitchState.ON_FALLBACK, 30, "failover")
                settled = time.monotonic()
                await wait_until(lambda: load.first_success_after(settled) is not None, 30, "traffic on the fallback")
                restarted = time.monotonic()
                p_proxy.reset_peak()
                f_proxy.reset_peak()
                await asyncio.to_thread(primary.start)
                await wait_until(lambda: switch.state is SwitchState.ON_PRIMARY, 60, "failback")
                failed_back = time.monotonic()
                await wait_until(lambda: time.monotonic() - failed_back >= AFTER_FAILBACK, AFTER_FAILBACK + 1, "traffic after failback")
                ended = time.monotonic()
            finally:
                await load.stop()
                await dbs.close()
            at_failback = load.errors_between(restarted, ended)
            at_failover = load.errors_between(killed, restarted)
            ops = sum(1 for o in load.outcomes if restarted <= o.finished <= ended)
    return {
        "clients": CLIENTS,
        "pool_max_size": BENCH_TUNING["FAILOVER_POOL_MAX_SIZE"],
        "operations_in_window": ops,
        "errors_at_failback": sum(at_failback.values()),
        "errors_at_failback_by_type": dict(at_failback),
        "errors_at_failover": sum(at_failover.values()),
        "errors_at_failover_by_type": dict(at_failover),
        "peak_connections": {"primary": p_proxy.peak_active, "fallback": f_proxy.peak_active},
        "connections_opened_total": {"primary": p_proxy.accepted, "fallback": f_proxy.accepted},
    }


async def run(stores: tuple[str, ...], quick: bool) -> dict[str, Any]:
    return {store: await run_once(store) for store in stores}
