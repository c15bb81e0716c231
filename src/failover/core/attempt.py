"""The clock of one routed attempt: a single timer with three stages.

Every routed operation needs three things done on time: make its endpoint
*suspect* when it waits long (a confirmation probe starts), let the driver cut
its socket at the *deadline* (psycopg must not be cancelled mid-query: it would
wait on the server to cancel), and as a last resort *cancel* the task. Arming
three timers per operation costs more than the operation's own bookkeeping, so
one timer handle is re-armed from stage to stage; an operation that finishes
before the suspicion point (nearly all of them) costs one timer.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable

__all__ = ["AttemptClock", "attempt_deadline", "current_attempt"]

DEFAULT_BACKSTOP = 1.0
"""Seconds after the deadline before a task whose driver registered a cut-off hook is cancelled."""

_current: contextvars.ContextVar[AttemptClock | None] = contextvars.ContextVar("failover_attempt", default=None)


def current_attempt() -> AttemptClock | None:
    """The clock of the routed attempt running in this task, if any."""
    return _current.get()


def attempt_deadline() -> float | None:
    """The ``loop.time()`` (= ``time.monotonic()``) by which the current attempt must end, if any."""
    clock = _current.get()
    return clock.deadline if clock is not None else None


class AttemptClock:
    """Suspect at *suspect_at*, run the cut-off hooks at *deadline*, cancel *backstop* seconds later.

    Use as a context manager around the attempt, in the task that runs it. When
    it had to cancel the task, the :class:`asyncio.CancelledError` leaving the
    block becomes :class:`TimeoutError` (like :func:`asyncio.timeout`).
    """

    __slots__ = ("deadline", "expired", "_backstop", "_handle", "_hooks", "_loop", "_on_suspect", "_stage", "_task", "_token")

    def __init__(
        self,
        deadline: float,
        *,
        suspect_at: float | None = None,
        on_suspect: Callable[[], None] | None = None,
        backstop: float = DEFAULT_BACKSTOP,
    ) -> None:
        self.deadline = deadline
        self.expired = False
        self._backstop = backstop
        self._on_suspect = on_suspect
        self._hooks: list[Callable[[], None]] = []
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("an AttemptClock must run inside a task")
        self._task = task
        if on_suspect is not None and suspect_at is not None and suspect_at < deadline:
            self._stage = 0
            self._handle: asyncio.TimerHandle | None = self._loop.call_at(suspect_at, self._fire)
        else:
            self._stage = 1
            self._handle = self._loop.call_at(deadline, self._fire)
        self._token: contextvars.Token[AttemptClock | None] | None = None

    def on_deadline(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Run *hook* at the deadline (a driver cutting its socket). Returns a remover."""
        if self._stage >= 2:
            hook()
            return lambda: None
        self._hooks.append(hook)

        def remove() -> None:
            if hook in self._hooks:
                self._hooks.remove(hook)

        return remove

    def _fire(self) -> None:
        if self._stage == 0:
            self._stage = 1
            self._handle = self._loop.call_at(self.deadline, self._fire)
            assert self._on_suspect is not None
            self._on_suspect()
        elif self._stage == 1:
            self._stage = 2
            hooks, self._hooks = self._hooks, []
            for hook in hooks:
                hook()
            if hooks and self._backstop > 0:
                self._handle = self._loop.call_at(self.deadline + self._backstop, self._fire)
            else:
                self._cancel_task()
        else:
            self._cancel_task()

    def _cancel_task(self) -> None:
        self._handle = None
        self.expired = True
        self._task.cancel()

    def __enter__(self) -> AttemptClock:
        self._token = _current.set(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._token is not None:
            _current.reset(self._token)
        if exc_type is asyncio.CancelledError and self.expired and self._task.uncancel() == 0:
            raise TimeoutError from exc
