"""The clock of one routed attempt, and the watchdog that keeps every attempt of a store on time.

Every routed operation needs three things done on time: make its endpoint
*suspect* when it waits long (a confirmation probe starts), let the driver cut
its socket at the *deadline* (psycopg must not be cancelled mid-query: it would
wait on the server to cancel), and as a last resort *cancel* the task.

Nearly every operation ends long before its first stage (the suspicion point,
0.5 s). So an attempt arms no timer of its own: it registers with its store's
:class:`Watchdog`, which keeps **one** event-loop timer for the earliest stage
of all registered attempts. Starting and ending an attempt costs a dict insert
and delete; the timer is re-armed only when a new attempt's first stage comes
before the one already scheduled (a short timeout), or when the timer fires.

Times are read from the watchdog's injected :class:`~failover.core.clock.Clock`,
so tests drive attempts with a fake clock: advance it, call :meth:`Watchdog.check`.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
import weakref
from collections.abc import Callable
from typing import Any

from .clock import Clock, SystemClock

__all__ = ["AttemptClock", "Watchdog", "attempt_deadline", "attempt_remaining", "current_attempt"]

DEFAULT_BACKSTOP = 1.0
"""Seconds after the deadline before a task whose driver registered a cut-off hook is cancelled."""

_current: contextvars.ContextVar[AttemptClock | None] = contextvars.ContextVar("failover_attempt", default=None)


def current_attempt() -> AttemptClock | None:
    """The clock of the routed attempt running in this task, if any."""
    return _current.get()


def attempt_remaining() -> float | None:
    """Seconds left before the current attempt's deadline (may be negative), or None outside an attempt."""
    clock = _current.get()
    return None if clock is None else clock.deadline - clock.watchdog.clock.monotonic()


def attempt_deadline() -> float | None:
    """The ``time.monotonic()`` by which the current attempt must end, if any (drivers compare it
    with ``time.monotonic()``; the attempt itself may run on an injected clock)."""
    clock = _current.get()
    if clock is None:
        return None
    source = clock.watchdog.clock
    if type(source) is SystemClock:
        return clock.deadline
    return time.monotonic() + (clock.deadline - source.monotonic())


class Watchdog:
    """Fires the due stages of the attempts registered with it, from one timer.

    One per store (each store has its own injected clock). :meth:`check` is what the
    timer calls; tests on a fake clock call it after advancing the clock.
    """

    __slots__ = ("clock", "_attempts", "_due", "_handle", "__weakref__")

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock if clock is not None else SystemClock()
        # Insertion-ordered set of the attempts under way.
        self._attempts: dict[AttemptClock, None] = {}
        self._due = math.inf  # clock time the armed timer is for
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._attempts)

    def _add(self, attempt: AttemptClock) -> None:
        self._attempts[attempt] = None
        if attempt.next_at < self._due:
            self._arm(attempt.next_at)

    def _discard(self, attempt: AttemptClock) -> None:
        self._attempts.pop(attempt, None)

    def _arm(self, at: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._due = at
        delay = at - self.clock.monotonic()
        self._handle = asyncio.get_running_loop().call_later(delay if delay > 0 else 0, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._due = math.inf
        self.check()

    def check(self) -> None:
        """Run every stage that is due by the clock, then arm the timer for the next one."""
        now = self.clock.monotonic()
        earliest = math.inf
        for attempt in list(self._attempts):
            while attempt.next_at <= now:
                attempt._advance()
            if attempt.next_at < earliest and attempt in self._attempts:
                earliest = attempt.next_at
        if earliest < self._due:
            self._arm(earliest)

    def close(self) -> None:
        """Disarm the timer (the attempts still registered keep their stages until they end)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._due = math.inf


_default_watchdogs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Watchdog] = weakref.WeakKeyDictionary()


def _default_watchdog() -> Watchdog:
    loop = asyncio.get_running_loop()
    watchdog = _default_watchdogs.get(loop)
    if watchdog is None:
        watchdog = _default_watchdogs[loop] = Watchdog()
    return watchdog


class AttemptClock:
    """Suspect at *suspect_at*, run the cut-off hooks at *deadline*, cancel *backstop* seconds later.

    Use as a context manager around the attempt, in the task that runs it. When
    it had to cancel the task, the :class:`asyncio.CancelledError` leaving the
    block becomes :class:`TimeoutError` (like :func:`asyncio.timeout`). Times are
    those of *watchdog*'s clock (default: a per-event-loop watchdog on the system
    clock); *on_suspect* is called with *suspect_args* (no closure per call needed).

    Attributes:
        deadline: the clock time by which the attempt must end.
        next_at: the clock time of the next stage (infinity when none is left).
        expired: the attempt's task was cancelled because its time ran out.
        watchdog: the watchdog that fires the stages.
    """

    __slots__ = (
        "deadline", "expired", "next_at", "watchdog", "_backstop", "_hooks", "_on_suspect", "_stage",
        "_suspect_args", "_task", "_token",
    )  # fmt: skip

    def __init__(
        self,
        deadline: float,
        *,
        suspect_at: float | None = None,
        on_suspect: Callable[..., None] | None = None,
        suspect_args: tuple[Any, ...] = (),
        backstop: float = DEFAULT_BACKSTOP,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.deadline = deadline
        self.expired = False
        self.watchdog = watchdog if watchdog is not None else _default_watchdog()
        self._backstop = backstop
        self._on_suspect = on_suspect
        self._suspect_args = suspect_args
        self._hooks: list[Callable[[], None]] | None = None
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("an AttemptClock must run inside a task")
        self._task = task
        if on_suspect is not None and suspect_at is not None and suspect_at < deadline:
            self._stage = 0
            self.next_at = suspect_at
        else:
            self._stage = 1
            self.next_at = deadline
        self._token: contextvars.Token[AttemptClock | None] | None = None

    def on_deadline(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Run *hook* at the deadline (a driver cutting its socket). Returns a remover."""
        if self._stage >= 2:
            hook()
            return _nothing
        if self._hooks is None:
            self._hooks = []
        hooks = self._hooks
        hooks.append(hook)

        def remove() -> None:
            if hook in hooks:
                hooks.remove(hook)

        return remove

    def _advance(self) -> None:
        """Enter the next stage (called by the watchdog when ``next_at`` has passed)."""
        if self._stage == 0:
            self._stage = 1
            self.next_at = self.deadline
            assert self._on_suspect is not None
            self._on_suspect(*self._suspect_args)
        elif self._stage == 1:
            self._stage = 2
            hooks, self._hooks = self._hooks, None
            if hooks:
                for hook in hooks:
                    hook()
                if self._backstop > 0:
                    self.next_at = self.deadline + self._backstop
                    return
            self._cancel_task()
        else:
            self._cancel_task()

    def _cancel_task(self) -> None:
        self.next_at = math.inf
        self.watchdog._discard(self)
        if not self.expired:
            self.expired = True
            self._task.cancel()

    def __enter__(self) -> AttemptClock:
        self._token = _current.set(self)
        self.watchdog._add(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.watchdog._attempts.pop(self, None)
        if self._token is not None:
            _current.reset(self._token)
        if exc_type is asyncio.CancelledError and self.expired and self._task.uncancel() == 0:
            raise TimeoutError from exc


def _nothing() -> None:
    pass
