"""Warm sync: the fallback follows the primary while the store is on it.

The pieces, one concept each:

* :class:`WarmSync` — what a store provides: the database's own machinery to
  copy the primary into the fallback and keep it current (PostgreSQL: a
  publication on the primary and a subscription on the fallback), a way to
  stop and restart it, and a *heartbeat*: a marker written on the primary and
  read on the fallback, in the same stream as the data.
* :class:`WarmDriver` — the driver owned by a :class:`~failover.core.store.FailoverStore`.
  It keeps one rule: while the store is ``ON_PRIMARY`` the sync runs; in every
  other state (``ON_FALLBACK``, ``RECONCILING``, ``UNAVAILABLE``) it is stopped,
  because the fallback is then the source of truth and reconcile copies *from*
  it. It measures the lag with the heartbeat (never assumes it) and records the
  lag at each failover: the RPO of that failover.

Lag, as PostgreSQL's own ``replay_lag`` defines it: the age of the oldest
heartbeat the primary acknowledged that the fallback has not applied yet; when
the fallback has applied every one, the delay with which it applied the newest
(measured by reading the fallback a few times right after writing it). Only the
monotonic clock of this process is used, so clock skew between the two servers
does not matter. The resolution is the heartbeat interval: a write made after
the newest heartbeat is covered by the figure only if the stream kept its pace.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .endpoint import Endpoint, Role
from .events import StateChanged, SwitchState
from .reasons import describe_exception
from .tasks import cancel_and_wait

if TYPE_CHECKING:
    from .store import FailoverStore

__all__ = ["SyncProgress", "WarmDriver", "WarmSync", "WarmUnavailable"]

logger = logging.getLogger("failover.warm")

DEFAULT_HEARTBEAT_INTERVAL = 1.0
"""Seconds between heartbeats (the probe interval when that is shorter)."""
DEFAULT_PROGRESS_INTERVAL = 1.0
"""Seconds between two reads of the sync's progress (state, copy, errors)."""
DEFAULT_REFRESH_INTERVAL = 10.0
"""Seconds between two checks of what is synced (tables created since, ...)."""
DEFAULT_STEP_TIMEOUT = 30.0
"""A setup/stop/restart step that takes longer than this is abandoned (and tried again)."""
COPY_LOG_INTERVAL = 5.0
"""Seconds between two log lines about an initial copy."""
_SENT_KEPT = 10_000  # heartbeats remembered while the fallback has not applied them


class WarmUnavailable(Exception):
    """The servers do not allow warm sync (a setting, a privilege); the message says which and what to do."""


@dataclass(slots=True)
class SyncProgress:
    """What :meth:`WarmSync.progress` reports."""

    state: str
    """``copying`` (initial copy under way), ``streaming`` or ``broken``."""
    tables: int = 0
    """Tables synced (the heartbeat's own excluded)."""
    tables_copied: int = 0
    rows_done: int | None = None
    """Rows of the initial copy already on the fallback (None: not copying)."""
    rows_total: int | None = None
    apply_errors: int = 0
    """Errors of the fallback's apply worker since the sync was set up by this process."""
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class WarmSync(abc.ABC):
    """A store's machinery to keep its fallback a copy of its primary.

    Every method gets the endpoints it works on and opens its own connections
    (never the routed pools, which follow the switch). The :class:`WarmDriver`
    bounds each call with a deadline.
    """

    store: str

    @abc.abstractmethod
    async def setup(self, primary: Endpoint, fallback: Endpoint) -> None:
        """Make the sync exist and run (idempotent): first call starts the initial copy.

        Raises :class:`WarmUnavailable` when the servers do not allow it.
        """

    async def refresh(self, primary: Endpoint, fallback: Endpoint) -> None:
        """Pick up what changed since :meth:`setup` (new tables); default: nothing."""

    @abc.abstractmethod
    async def pause(self, fallback: Endpoint) -> None:
        """Stop writing into *fallback*, and return only once nothing more will be written.

        Must work while the primary is down.
        """

    @abc.abstractmethod
    async def resume(self, primary: Endpoint, fallback: Endpoint) -> None:
        """Start again from where :meth:`pause` stopped (no new initial copy)."""

    @abc.abstractmethod
    async def heartbeat(self, primary: Endpoint) -> int:
        """Write the next heartbeat on the primary and return its number once committed."""

    @abc.abstractmethod
    async def applied(self, fallback: Endpoint) -> int | None:
        """The number of the newest heartbeat applied on the fallback (None: none yet)."""

    @abc.abstractmethod
    async def progress(self, fallback: Endpoint) -> SyncProgress:
        """The sync's state as the fallback sees it."""

    def describe(self) -> dict[str, Any]:
        """Store-specific details for the status document."""
        return {}

    async def close(self) -> None:
        """Release connections (the sync itself keeps running in the servers)."""


class WarmDriver:
    """Runs a :class:`WarmSync` for one store and measures its lag.

    Args:
        store: the failover store it serves (its switch, endpoints, probes).
        sync: the store's warm sync.
        interval: seconds between heartbeats.
    """

    def __init__(
        self,
        store: FailoverStore[Any],
        sync: WarmSync,
        *,
        interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be greater than 0")
        self._store = store
        self.sync = sync
        self.interval = interval
        self.step_timeout = step_timeout
        self.state = "off"
        self.reason: str | None = "not started yet"
        self.error: str | None = None
        self.unavailable: str | None = None
        self.set_up = False
        self.running: bool | None = None
        """Whether the sync writes into the fallback; None: unknown (a previous process may have left it on)."""
        self.progress: SyncProgress | None = None
        self.rpo_at_last_failover: float | None = None
        self.last_failover: dict[str, Any] | None = None
        self._sent: collections.deque[tuple[int, float]] = collections.deque(maxlen=_SENT_KEPT)
        self._seen = -1
        self._seen_sent: float | None = None  # when the newest applied heartbeat was sent
        self._delay: float | None = None
        self._last_ack: float | None = None
        self._copy_started: float | None = None
        self._copy_samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=30)
        self._copy_logged = 0.0
        self._next_progress = 0.0
        self._next_refresh = 0.0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._unsubscribe = store.bus.subscribe(self._on_event)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = self._store._spawn(self._loop(), "warm sync")

    async def stop(self) -> None:
        self._unsubscribe()
        await cancel_and_wait([self._task])
        self._task = None
        with contextlib.suppress(Exception):
            await self.sync.close()

    @property
    def _primary(self) -> Endpoint:
        return self._store.endpoints[Role.PRIMARY]

    @property
    def _fallback(self) -> Endpoint:
        return self._store.endpoints[Role.FALLBACK]

    def _usable(self, role: Role) -> bool:
        probe = self._store._health[role].last_probe
        return bool(probe and probe.usable)

    async def _step(self, coro: Any) -> Any:
        async with asyncio.timeout(self.step_timeout):
            return await coro

    # --- the loop -------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            self._wake.clear()  # before the tick: a transition during it must not be missed
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a tick never kills the loop: the next one tries again
                self.error = self._describe(exc)
                logger.warning("%s: warm sync: %s", self._store.name, self.error)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, self.interval - (time.monotonic() - started))):
                    await self._wake.wait()

    async def _tick(self) -> None:
        if self.unavailable is not None:
            return
        on_primary = self._store.state is SwitchState.ON_PRIMARY
        if not on_primary:
            # The fallback is (or may become) the source of truth: nothing may write into it.
            if self.running is not False and self._usable(Role.FALLBACK):
                await self._pause()
            if not self.set_up:
                self.reason = f"the store is {self._store.state}: warm sync starts once it runs on its primary"
            return
        if not (self._usable(Role.PRIMARY) and self._usable(Role.FALLBACK)):
            return
        now = time.monotonic()
        if not self.set_up:
            try:
                await self._step(self.sync.setup(self._primary, self._fallback))
            except WarmUnavailable as exc:
                self.unavailable = str(exc)
                self.state, self.reason = "off", str(exc)
                logger.warning("%s: warm sync is off: %s", self._store.name, exc)
                return
            self.set_up = self.running = True
            self.reason = None
            self._next_refresh = now + DEFAULT_REFRESH_INTERVAL
            logger.info("%s: warm sync set up: %s follows %s", self._store.name, self._fallback.name, self._primary.name)
        elif not self.running:
            await self._step(self.sync.resume(self._primary, self._fallback))
            self.running = True
            self.reason = None
            logger.info("%s: warm sync resumed: %s follows %s again", self._store.name, self._fallback.name, self._primary.name)
        elif now >= self._next_refresh:
            self._next_refresh = now + DEFAULT_REFRESH_INTERVAL
            await self._step(self.sync.refresh(self._primary, self._fallback))
        await self._beat()
        if time.monotonic() >= self._next_progress:
            self._next_progress = time.monotonic() + DEFAULT_PROGRESS_INTERVAL
            await self._read_progress()
        self.error = None

    async def _beat(self) -> None:
        """Write a heartbeat, then read the fallback a few times to see it arrive."""
        sent = time.monotonic()
        number = await self._step(self.sync.heartbeat(self._primary))
        self._last_ack = time.monotonic()
        self._sent.append((number, sent))
        pause, waited, budget = 0.002, 0.0, min(0.5, self.interval / 2)
        while True:
            seen = await self._step(self.sync.applied(self._fallback))
            self._saw(seen, time.monotonic())
            if seen is not None and seen >= number:
                return
            if waited >= budget or self._store.state is not SwitchState.ON_PRIMARY:
                return
            await asyncio.sleep(pause)
            waited += pause
            pause = min(pause * 2, 0.1)

    def _saw(self, seen: int | None, at: float) -> None:
        if seen is None or seen <= self._seen:
            return
        delay = None
        while self._sent and self._sent[0][0] <= seen:
            number, sent = self._sent.popleft()
            if number == seen:
                delay = at - sent
                self._seen_sent = sent
        self._seen = seen
        if delay is not None:
            self._delay = delay

    def lag(self, now: float | None = None) -> float | None:
        """Seconds the fallback trails the primary (None: unknown, e.g. still copying)."""
        if not self.set_up or (self.progress is not None and self.progress.state == "copying"):
            return None
        now = time.monotonic() if now is None else now
        if self._sent:
            return max(0.0, now - self._sent[0][1])
        return self._delay

    async def _read_progress(self) -> None:
        progress = await self._step(self.sync.progress(self._fallback))
        previous = self.progress
        self.progress = progress
        self.state = progress.state
        now = time.monotonic()
        if progress.state == "copying":
            if self._copy_started is None:
                self._copy_started = now
                self._copy_samples.clear()
                logger.info("%s: initial copy into %s started (%d tables)", self._store.name, self._fallback.name, progress.tables)
            if progress.rows_done is not None:
                self._copy_samples.append((now, progress.rows_done))
            if now - self._copy_logged >= COPY_LOG_INTERVAL:
                self._copy_logged = now
                copy = self._copy()
                logger.info(
                    "%s: initial copy into %s: %s of %s rows, %s rows/s, ETA %s",
                    self._store.name,
                    self._fallback.name,
                    copy.get("rows_done"),
                    copy.get("rows_total"),
                    copy.get("rate_per_s"),
                    f"{copy['eta_s']}s" if copy.get("eta_s") is not None else "unknown",
                )
        elif self._copy_started is not None and progress.state == "streaming":
            logger.info(
                "%s: initial copy into %s done in %.1fs; streaming",
                self._store.name,
                self._fallback.name,
                now - self._copy_started,
            )
            self._copy_started = None
        if progress.state == "broken" and (previous is None or previous.state != "broken"):
            logger.warning("%s: warm sync into %s is broken: %s", self._store.name, self._fallback.name, progress.error)

    def _copy(self) -> dict[str, Any]:
        progress = self.progress
        if progress is None or progress.state != "copying":
            return {}
        rate = None
        if len(self._copy_samples) >= 2:
            (t0, r0), (t1, r1) = self._copy_samples[0], self._copy_samples[-1]
            if t1 > t0:
                rate = max(0.0, (r1 - r0) / (t1 - t0))
        eta = None
        if rate and progress.rows_total is not None and progress.rows_done is not None:
            eta = round(max(0, progress.rows_total - progress.rows_done) / rate, 1)
        return {
            "tables": progress.tables,
            "tables_copied": progress.tables_copied,
            "rows_done": progress.rows_done,
            "rows_total": progress.rows_total,
            "rate_per_s": None if rate is None else round(rate, 1),
            "eta_s": eta,
            "elapsed_s": None if self._copy_started is None else round(time.monotonic() - self._copy_started, 1),
        }

    async def _pause(self) -> None:
        await self._step(self.sync.pause(self._fallback))
        self.running = False
        self.state = "off"
        # The fallback applies nothing more: its last heartbeat fixes the failover's RPO.
        if self.unavailable is None and self.last_failover is not None and self.last_failover.get("final") is False:
            with contextlib.suppress(Exception):
                self._saw(await self._step(self.sync.applied(self._fallback)), time.monotonic())
            rpo = self._lag_at_last_ack()
            self.rpo_at_last_failover = rpo
            self.last_failover.update(rpo_s=_round(rpo), final=True)
        logger.info("%s: warm sync stopped: %s is the source of truth until failback", self._store.name, self._fallback.name)

    # --- events ---------------------------------------------------------------------------

    def _lag_at_last_ack(self) -> float | None:
        """The RPO: how far back writes may be missing on the fallback, as of the primary's last
        acknowledged heartbeat (the last moment it was known alive).

        When the fallback misses a heartbeat, everything committed after the newest heartbeat it
        applied may be missing; when it applied them all, the stream kept pace with the last
        measured delay.
        """
        if self._last_ack is None or not self.set_up:
            return None
        if self._sent:
            since = self._seen_sent if self._seen_sent is not None else self._sent[0][1]
            return max(self._delay or 0.0, self._last_ack - since)
        return self._delay

    def lag_at_failover(self) -> float | None:
        """The RPO of a failover happening now (the switch puts it in ``FailoverStarted``)."""
        if not self.running:
            return None
        return _round(self._lag_at_last_ack())

    def _on_event(self, event: Any) -> None:
        if not isinstance(event, StateChanged) or event.store != self._store.name:
            return
        if event.from_state is SwitchState.ON_PRIMARY and event.to_state is not SwitchState.ON_PRIMARY:
            if self.running and event.to_state is SwitchState.ON_FALLBACK:
                rpo = self._lag_at_last_ack()
                self.rpo_at_last_failover = rpo
                self.last_failover = {
                    "at": event.at,
                    "rpo_s": _round(rpo),
                    "state": self.state,
                    "final": False,  # refined once the sync has stopped
                }
            self.reason = f"the store is {event.to_state}: the fallback takes writes, warm sync stopped"
            self.state = "off"
            self._wake.set()  # stop it now, not at the next tick
        elif event.to_state is SwitchState.ON_PRIMARY:
            self._wake.set()

    # --- reading --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The ``warm`` block of the store's status."""
        progress = self.progress
        state = self.state if self.running else "off"
        doc: dict[str, Any] = {
            "enabled": True,
            "state": state,
            "lag_s": _round(self.lag()) if self.running else None,
            "rpo_at_last_failover_s": _round(self.rpo_at_last_failover),
            "last_failover": self.last_failover,
            "heartbeat_interval_s": self.interval,
            "reason": self.unavailable or (self.reason if state == "off" else None),
            "copy": self._copy() or None,
            "tables": progress.tables if progress else None,
            "apply_errors": progress.apply_errors if progress else 0,
            "error": self.error or (progress.error if progress and progress.state == "broken" else None),
        }
        doc.update(self.sync.describe())
        return doc

    def _describe(self, exc: BaseException) -> str:
        # A step may talk to either server (or the fallback about the primary): hide both's secrets.
        return describe_exception(exc, (*self._primary.secrets, *self._fallback.secrets))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
