"""A network between this machine and a cloud primary, for the benchmarks: a delaying proxy in a process of its own.

``python -m benchmarks._netem TARGET_PORT ONE_WAY_SECONDS [CPU]`` listens on a free loopback port,
prints it, and forwards every chunk to ``127.0.0.1:TARGET_PORT`` *ONE_WAY_SECONDS* after it arrived,
in each direction (:class:`failover.local.proxy.FaultProxy` in ``delay`` mode), until stdin closes.
In its own process (pinned to *CPU* when given), the proxy's work does not count as the
application's, as a real network's would not.

:func:`delayed_primary` runs it from a benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator

from failover.local.proxy import FaultProxy, proxied_url


@contextlib.asynccontextmanager
async def delayed_primary(
    url: str, port: int, rtt_s: float, cpu: int | None = None
) -> AsyncIterator[tuple[str, int]]:
    """Yield *url* rewritten to reach the server on *port* through a proxy adding *rtt_s* per round trip,
    and the proxy's process id (its CPU time is the emulated network's, not the primary's)."""
    args = [sys.executable, "-m", "benchmarks._netem", str(port), repr(rtt_s / 2)]
    if cpu is not None:
        args.append(str(cpu))
    proc = await asyncio.to_thread(
        subprocess.Popen, args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        if not line.strip().isdigit():
            raise RuntimeError(f"the delaying proxy did not start (printed {line!r})")
        yield proxied_url(url, int(line)), proc.pid
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)


async def _serve(target_port: int, one_way_s: float) -> None:
    async with FaultProxy(target_port) as proxy:
        proxy.delay(one_way_s)
        print(proxy.port, flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the benchmark closes our stdin (or dies)


if __name__ == "__main__":
    if len(sys.argv) > 3:
        os.sched_setaffinity(0, {int(sys.argv[3])})
    asyncio.run(_serve(int(sys.argv[1]), float(sys.argv[2])))
