"""A steady stream of operations through failover, every outcome recorded: the one traffic
generator of the tests, the drill and the benchmarks.

*workers* tasks each call ``operation(key)`` in a loop until :meth:`Traffic.stop`, pausing
*pause* seconds between calls (0: back to back, yielding to the loop). What a caller
varies is an option, not a copy: the key each call receives (a run-wide counter, or a
per-worker write id a drill later looks for on the servers), and the pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["Outcome", "Traffic", "counter", "write_ids"]

K = TypeVar("K")

KeyMaker = Callable[[int, int, int], Any]
"""``(worker, n, total)`` → the key of the *n*-th call of *worker* (both from 1), the *total*-th of the run."""


def counter(worker: int, n: int, total: int) -> int:
    """Keys 1, 2, 3... across every worker (the default)."""
    return total


def write_ids(worker: int, n: int, total: int) -> str:
    """Keys ``w1-1``, ``w1-2``, ``w2-1``...: unique per run, and whose writer they name."""
    return f"w{worker}-{n}"


@dataclass
class Outcome(Generic[K]):
    """One call: its key, when it started and finished (``time.monotonic()``), and how it ended."""

    key: K
    started: float
    finished: float
    ok: bool
    error: BaseException | None = None
    value: Any = None

    @property
    def error_kind(self) -> str | None:
        """The class name of the error (``OutcomeUnknown``...), None for a success."""
        return type(self.error).__name__ if self.error is not None else None


class Traffic(Generic[K]):
    """Runs ``operation(key)`` in a loop from *workers* tasks and records every outcome."""

    def __init__(
        self,
        operation: Callable[[K], Awaitable[Any]],
        workers: int = 2,
        pause: float = 0.005,
        *,
        keys: KeyMaker = counter,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if pause < 0:
            raise ValueError("pause must be 0 or more")
        self.operation = operation
        self.workers = workers
        self.pause = pause
        self.keys = keys
        self.outcomes: list[Outcome[K]] = []
        self._total = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _worker(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            self._total += 1
            key = self.keys(worker, n, self._total)
            started = time.monotonic()
            try:
                value = await self.operation(key)
            except Exception as exc:
                self.outcomes.append(Outcome(key, started, time.monotonic(), False, error=exc))
            else:
                self.outcomes.append(Outcome(key, started, time.monotonic(), True, value=value))
            if self.pause:
                with contextlib.suppress(TimeoutError):  # a stop ends the pause at once
                    async with asyncio.timeout(self.pause):
                        await self._stop.wait()
            else:
                await asyncio.sleep(0)

    def start(self) -> Traffic[K]:
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(1, self.workers + 1)]
        return self

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop the workers after their current call (bounded by *timeout*)."""
        self._stop.set()
        async with asyncio.timeout(timeout):
            await asyncio.gather(*self._tasks)

    # --- reading the outcomes -----------------------------------------------------------------

    def acked(self) -> list[Outcome[K]]:
        """The calls that succeeded."""
        return [o for o in self.outcomes if o.ok]

    def errors_started_after(self, moment: float) -> list[Outcome[K]]:
        return [o for o in self.outcomes if not o.ok and o.started >= moment]

    def successes_after(self, moment: float) -> list[Outcome[K]]:
        return [o for o in self.outcomes if o.ok and o.started >= moment]

    def first_success_after(self, moment: float) -> float | None:
        """When the first call that started at or after *moment* succeeded."""
        done = [o.finished for o in self.outcomes if o.ok and o.started >= moment]
        return min(done) if done else None

    def errors_between(self, start: float, end: float) -> Counter[str]:
        """Errors that ended between *start* and *end*, by class name."""
        return Counter(o.error_kind or "error" for o in self.outcomes if not o.ok and start <= o.finished <= end)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time without a success between *start* and *end*."""
        marks = sorted(o.finished for o in self.outcomes if o.ok and start <= o.finished <= end)
        points = [start, *marks, end]
        return max((b - a for a, b in zip(points, points[1:])), default=0.0)
