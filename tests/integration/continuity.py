"""Shared by the data-continuity (warm sync) tests: a recording writer and one store's moves.

:class:`Continuity` starts ``Databases`` on a real pair and kills, restarts and waits for one
store. :class:`AckedWriter` writes in the background and remembers every acknowledged write.

Each store's warm-sync test subclasses :class:`AckedWriter` with one ``step`` (an insert,
an update or a delete through failover). The base keeps the record the assertions need:
``final`` holds each acknowledged key's final value (None: deleted) and ``acked`` the
monotonic time of its last acknowledged write; a key whose last write had an unknown
outcome (or failed) is left out of both. ``lock`` is held across each write and its record:
a check that holds it sees no write in flight, so what it reads from a server and what the
record says describe the same moment.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from failover import Databases, OutcomeUnknown, SwitchState, TransactionRolledBack
from failover.core.events import Event, FailoverStarted, ReconcileCompleted, ReconcileStarted
from failover.local import LocalServer

from ..helpers import fast_settings, wait_for

K = TypeVar("K")

_URL_SETTINGS = {
    "postgres": ("SUPABASE_DB_URL", "POSTGRES_URL"),
    "mongodb": ("MONGODB_ATLAS_URL", "MONGODB_URL"),
    "redis": ("UPSTASH_REDIS_URL", "REDIS_URL"),
}


class Continuity:
    """One store under test: start it on a pair, read its state and warm status, break and mend it."""

    def __init__(self, store: str, *, failback_timeout: float = 30) -> None:
        self.store = store
        self.failback_timeout = failback_timeout

    def state(self, dbs: Databases) -> SwitchState:
        return dbs.store(self.store).state

    def warm(self, dbs: Databases) -> dict[str, Any]:
        return dbs.status()[self.store]["warm"]  # type: ignore[no-any-return]

    async def start(self, primary: LocalServer, fallback: LocalServer, **overrides: Any) -> Databases:
        primary_url, fallback_url = _URL_SETTINGS[self.store]
        dbs = Databases(fast_settings(**{primary_url: primary.url, fallback_url: fallback.url}, **overrides))
        await dbs.start()
        return dbs

    async def streaming(self, dbs: Databases, timeout: float = 30) -> None:
        def ready() -> bool:
            status = self.warm(dbs)
            return status["state"] == "streaming" and status["lag_s"] is not None

        await wait_for(ready, timeout, "warm sync streaming")

    async def outage(self, dbs: Databases, primary: LocalServer) -> float:
        """Kill the primary, wait until the store serves from the fallback; return the kill's monotonic time."""
        killed = time.monotonic()
        await asyncio.to_thread(primary.kill)
        await wait_for(lambda: self.state(dbs) is SwitchState.ON_FALLBACK, 10, "failover")
        return killed

    async def outage_under(
        self, dbs: Databases, primary: LocalServer, writer: AckedWriter[Any], events: list[Event]
    ) -> tuple[float, dict[str, Any], float]:
        """Kill the primary while *writer* runs, then stop it; the status and the ``FailoverStarted``
        event must report this failover's RPO (under a second). Returns the kill's monotonic time,
        the warm status and the RPO."""
        killed = await self.outage(dbs, primary)
        await writer.stop()
        status = self.warm(dbs)
        rpo = status["rpo_at_last_failover_s"]
        assert rpo is not None and rpo < 1.0, status
        failovers = [e for e in events if isinstance(e, FailoverStarted)]
        assert failovers and failovers[-1].rpo_s is not None and failovers[-1].rpo_s < 1.0, failovers
        return killed, status, rpo

    async def copy_while_writing(
        self, dbs: Databases, write: Callable[[int], Awaitable[Any]], timeout: float, pause: float = 0.02
    ) -> tuple[list[dict[str, Any]], int]:
        """Write through the application (``write(i)``, then *pause*) until the initial copy is done.

        Returns the copy progress reports seen meanwhile and how many writes were made.
        """
        seen: list[dict[str, Any]] = []

        def streaming() -> bool:
            status = self.warm(dbs)
            if status["state"] == "copying" and status["copy"] and status["copy"]["rows_done"]:
                seen.append(status["copy"])
            return status["state"] == "streaming"

        writes = 0
        deadline = time.monotonic() + timeout
        while not streaming():
            assert time.monotonic() < deadline, f"initial copy did not finish: {self.warm(dbs)}"
            await write(writes)  # the application works meanwhile
            writes += 1
            await asyncio.sleep(pause)
        return seen, writes

    async def failback(self, dbs: Databases, primary: LocalServer) -> None:
        await asyncio.to_thread(primary.start)
        await wait_for(lambda: self.state(dbs) is SwitchState.ON_PRIMARY, self.failback_timeout, "failback after reconcile")


class Unacknowledged(Exception):
    """Raised by a step whose write was not applied (an update or delete that matched nothing)."""


class AckedWriter(Generic[K]):
    """Writes through failover in a loop until stopped; see the module docstring."""

    pause = 0.003
    """Seconds between writes."""

    def __init__(self) -> None:
        self.final: dict[K, Any] = {}
        self.acked: dict[K, float] = {}
        self.unknown: set[K] = set()
        self.errors: list[BaseException] = []
        self.lock = asyncio.Lock()
        self.pending: K | None = None
        """The key the running step writes, set by the step before it sends the write."""
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def step(self, i: int) -> tuple[K, Any]:
        """Make write number *i*; return its key and the value it left (None: deleted)."""
        raise NotImplementedError

    def live(self, keep: Callable[[Any], bool] = lambda v: v is not None) -> list[K]:
        """Keys whose recorded value passes *keep* (default: not deleted)."""
        return [k for k, v in self.final.items() if keep(v)]

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            async with self.lock:
                self.pending = None
                try:
                    key, value = await self.step(i)
                except Exception as exc:  # noqa: BLE001 - recorded; tests assert no unexpected errors
                    if not isinstance(exc, (OutcomeUnknown, Unacknowledged)):
                        self.errors.append(exc)
                    if self.pending is not None:
                        self.unknown.add(self.pending)
                        self.final.pop(self.pending, None)
                else:
                    self.final[key] = value
                    self.acked[key] = time.monotonic()
            await asyncio.sleep(self.pause)

    async def acknowledged(self, count: int, timeout: float = 20) -> None:
        """Wait until at least *count* keys have an acknowledged write (a loaded machine writes slower)."""
        await wait_for(lambda: len(self.acked) >= count, timeout, f"{count} acknowledged writes")

    def start(self) -> AckedWriter[K]:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 30)

    def expected_before(self, moment: float) -> dict[K, Any]:
        """Final values of the keys whose last acknowledged write came before *moment*."""
        return {k: v for k, v in self.final.items() if self.acked[k] < moment and k not in self.unknown}


def missing(expected: dict[K, Any], actual: dict[K, Any]) -> list[tuple[K, Any, Any]]:
    """``(key, expected, found)`` for each key whose value in *actual* differs."""
    return [(k, v, actual.get(k)) for k, v in expected.items() if actual.get(k) != v]


def sweeps_that_copied(events: list[Event]) -> list[ReconcileCompleted]:
    """The runs that started as sweeps (not gating a failback) and copied something."""
    found: list[ReconcileCompleted] = []
    sweeping = False
    for event in events:  # one run at a time per process: each Completed follows its Started
        if isinstance(event, ReconcileStarted):
            sweeping = not event.gated
        elif isinstance(event, ReconcileCompleted) and sweeping and event.applied:
            found.append(event)
    return found


class OwnedKeyWriters(Generic[K]):
    """One writer task per key, each the only one to write its key: ``write(key, n)`` for n = 1, 2, ...
    stores a value derived from *n* and returns it.

    ``final`` holds each key's last acknowledged value. A write that raises one of *not_applied*
    (rolled back) leaves the last value standing; ``OutcomeUnknown`` takes the key out of the check
    until a later write of it is acknowledged; anything else goes to ``errors``.
    """

    def __init__(
        self,
        keys: list[K],
        write: Callable[[K, int], Awaitable[Any]],
        not_applied: tuple[type[BaseException], ...] = (TransactionRolledBack,),
    ) -> None:
        self.keys = keys
        self._write = write
        self._not_applied = not_applied
        self.final: dict[K, Any] = {}
        self.unknown: set[K] = set()
        self.errors: list[BaseException] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _run(self, key: K) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                value = await self._write(key, n)
            except self._not_applied:
                continue
            except OutcomeUnknown:
                self.unknown.add(key)
                continue
            except Exception as exc:  # noqa: BLE001 - tests assert none
                self.errors.append(exc)
                await asyncio.sleep(0.05)
                continue
            self.final[key] = value
            self.unknown.discard(key)

    def start(self) -> OwnedKeyWriters[K]:
        self._tasks = [asyncio.create_task(self._run(key)) for key in self.keys]
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 30)

    async def until_every_key_written(self, since: dict[K, Any] | None = None, timeout: float = 20) -> None:
        """Wait until each key has an acknowledged write (one that differs from *since*, if given)."""
        since = since or {}
        await wait_for(
            lambda: len(self.final) == len(self.keys) and all(self.final[k] != since.get(k) for k in self.keys),
            timeout,
            "a write of every key",
        )

    def expected(self) -> dict[K, Any]:
        """The last acknowledged value of every key whose last write has a known outcome."""
        assert not self.errors, self.errors[:3]
        expected = {k: v for k, v in self.final.items() if k not in self.unknown}
        assert len(expected) >= len(self.keys) * 3 // 4, (self.final, self.unknown)
        return expected


async def across_an_outage(
    store: Continuity, dbs: Databases, primary: LocalServer, writers: OwnedKeyWriters[Any]
) -> dict[Any, Any]:
    """Run *writers* through a kill of *primary*, writes of every key on the fallback, its restart and
    the failback, then 1 s more on the primary; wait for the sweeps and return
    :meth:`OwnedKeyWriters.expected`.

    One process: every write made on the fallback is copied before failback, so a sweep that copied
    one means a transaction ran across the final catch-up (and was copied over the key's newer writes
    on the primary, which later writes may have overwritten again): asserted here.
    """
    events: list[Event] = []
    unsubscribe = dbs.subscribe(events.append)
    writers.start()
    try:
        await writers.until_every_key_written()
        await store.outage(dbs, primary)
        await writers.until_every_key_written(since=dict(writers.final))  # on the fallback
        await store.failback(dbs, primary)
        await asyncio.sleep(1.0)  # writers go on on the primary
    finally:
        await writers.stop()
        unsubscribe()
    reconcile = dbs.store(store.store).reconciler
    assert reconcile is not None
    await wait_for(lambda: not reconcile.running and reconcile.backlog == 0, 20, "sweeps")
    swept = sweeps_that_copied(events)
    assert not swept, swept
    return writers.expected()
