"""What the three reconcile benchmarks share: outages under load, and the write hold they cause.

``write_hold(store, make_write, cycles)`` runs 4 writers through ``make_write(dbs)`` while the
primary is killed for about a second and restarted, *cycles* times; each failback's final
catch-up, during which new writes of the store wait, is read from its ``ReconcileCompleted``
event. ``hold_table(result)`` prints it as a Markdown table.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from failover import Databases, SwitchState
from failover.core.events import Event, ReconcileCompleted
from failover.local import LocalServer
from failover.local.traffic import Traffic

from ._common import open_databases, server_pair, summary, wait_until

OUTAGE_S = 1.0
WRITERS = 4


async def write_hold(
    store: str,
    make_write: Callable[[Databases], Callable[[int], Awaitable[Any]]],
    cycles: int,
    prepare: Callable[[LocalServer], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """*cycles* outages of the primary under steady writes; the write hold of each failback."""
    async with server_pair(store) as (primary, fallback):
        if prepare is not None:
            for server in (primary, fallback):
                await prepare(server)
        dbs = await open_databases(store, primary.url, fallback.url)
        events: list[Event] = []
        dbs.subscribe(events.append)
        failover = dbs.store(store)
        load = Traffic(make_write(dbs), WRITERS, 0.002).start()
        try:
            for _ in range(cycles):
                await wait_until(lambda: failover.state is SwitchState.ON_PRIMARY, 60, "on the primary")
                await asyncio.to_thread(primary.kill)
                await wait_until(lambda: failover.state is SwitchState.ON_FALLBACK, 10, "failover")
                await asyncio.sleep(OUTAGE_S)  # the outage: writes land on the fallback
                await asyncio.to_thread(primary.start)
            await wait_until(lambda: failover.state is SwitchState.ON_PRIMARY, 60, "final failback")
        finally:
            await load.stop()
            await dbs.close()
    holds = [e.hold for e in events if isinstance(e, ReconcileCompleted) and e.ok and e.hold is not None]
    errors = Counter(o.error_kind or "error" for o in load.outcomes if not o.ok)
    return {"cycles": cycles, "hold_s": summary(holds), "writes": len(load.outcomes), "errors": dict(errors)}


def hold_table(result: dict[str, Any]) -> None:
    """Print :func:`write_hold`'s result as a Markdown table."""
    hold = result["hold_s"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f} ms"

    print()
    print("| failbacks under load | write hold p50 | p99 | max | writes | errors |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {hold['n']}/{result['cycles']} | {ms(hold['p50_s'])} | {ms(hold['p99_s'])} | {ms(hold['max_s'])} | "
        f"{result['writes']} | {result['errors'] or 0} |"
    )
