"""Test helpers: fast settings, polling with deadlines, a steady stream of traffic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from failover import Settings

FAST = {
    "HEALTH_CHECK_INTERVAL": 0.2,
    "FAILOVER_PROBE_TIMEOUT": 0.5,
    "FAILOVER_CONNECT_TIMEOUT": 0.5,
    "FAILOVER_OPERATION_TIMEOUT": 2.0,
    "FAILOVER_UNHEALTHY_THRESHOLD": 2,
    "FAILOVER_HEALTHY_THRESHOLD": 2,
    "FAILOVER_FAILBACK_DELAY": 1.0,
}


def fast_settings(**values: Any) -> Settings:
    """Settings with short intervals for tests; *values* use the environment names."""
    merged = {**FAST, **values}
    return Settings(_env_file=None, **merged)  # type: ignore[call-arg]


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str = "condition") -> float:
    """Poll *predicate* until it is true; return the seconds it took. Fails after *timeout*."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout:g}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@dataclass
class Outcome:
    started: float
    finished: float
    ok: bool
    error: BaseException | None = None
    value: Any = None


@dataclass
class Traffic:
    """Runs *operation(i)* in a loop from *workers* tasks and records every outcome."""

    operation: Callable[[int], Awaitable[Any]]
    workers: int = 2
    pause: float = 0.005
    outcomes: list[Outcome] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _counter: int = 0

    async def _worker(self) -> None:
        while not self._stop.is_set():
            self._counter += 1
            i = self._counter
            started = time.monotonic()
            try:
                value = await self.operation(i)
                self.outcomes.append(Outcome(started, time.monotonic(), True, value=value))
            except Exception as exc:
                self.outcomes.append(Outcome(started, time.monotonic(), False, error=exc))
            await asyncio.sleep(self.pause)

    def start(self) -> Traffic:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), timeout=30)

    def errors_started_after(self, moment: float) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok and o.started >= moment]

    def successes_after(self, moment: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.ok and o.started >= moment]

    def first_success_after(self, moment: float) -> float | None:
        done = [o.finished for o in self.outcomes if o.ok and o.started >= moment]
        return min(done) if done else None
