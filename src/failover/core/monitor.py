"""The monitor: a background task that probes a store's endpoints at an interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any

from .tasks import cancel_and_wait

if TYPE_CHECKING:
    from .store import FailoverStore

__all__ = ["Monitor"]

logger = logging.getLogger("failover.monitor")

DEFAULT_MIN_GAP = 0.25


class Monitor:
    """Probes every endpoint of one store every *interval* seconds.

    :meth:`wake` asks for a probe round now (used when live traffic sees a
    failure). The task holds only a weak reference to its store, so a store
    that is dropped without ``close()`` does not live forever.
    """

    def __init__(self, store: FailoverStore[Any], interval: float) -> None:
        if interval <= 0:
            raise ValueError("interval must be greater than 0")
        self._store = weakref.ref(store)
        self.interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0
        # wake() may be called by every failing request; rounds stay this far apart
        # so an outage does not turn into a storm of probe connections.
        self.min_gap = min(interval, DEFAULT_MIN_GAP)

    def start(self) -> None:
        if self._task is None:
            store = self._store()
            name = f"failover-monitor-{store.name if store else '?'}"
            self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait([task])

    async def _run(self) -> None:
        last_round = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            too_soon = self.min_gap - (time.monotonic() - last_round)
            if too_soon > 0:
                await asyncio.sleep(too_soon)  # a rate limit, not a wait for a condition
            self._wake.clear()
            last_round = time.monotonic()
            store = self._store()
            if store is None:
                return
            try:
                await store.probe_round()
            except asyncio.CancelledError:
                raise
            except Exception:  # the monitor must survive anything a driver throws
                logger.exception("probe round of %s failed", store.name)
            self.rounds += 1
            del store
