"""Events: what happened, to which store, when and why.

Events are immutable and named ``<Subject><PastTense>``. Subscribe a callable
with :meth:`EventBus.subscribe`; it is called synchronously, in the order events
happen, and must not block (schedule I/O on the loop instead). A listener that
raises is logged and does not stop the others.
"""

from __future__ import annotations

import collections
import enum
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from .endpoint import Role

__all__ = [
    "SwitchState",
    "TransitionCause",
    "Event",
    "StateChanged",
    "FailoverStarted",
    "FailbackStarted",
    "FailbackCompleted",
    "StoreUnavailable",
    "StoreRecovered",
    "EndpointHealthChanged",
    "BreakerTripped",
    "ProbeCompleted",
    "OperationRetried",
    "ReconcileStarted",
    "ReconcileCompleted",
    "ConflictResolved",
    "EventBus",
    "Listener",
]

logger = logging.getLogger("failover.events")


class SwitchState(enum.StrEnum):
    ON_PRIMARY = "ON_PRIMARY"
    ON_FALLBACK = "ON_FALLBACK"
    RECONCILING = "RECONCILING"
    UNAVAILABLE = "UNAVAILABLE"


class TransitionCause(enum.StrEnum):
    """Why the switch moved: a bounded label for metrics and tools (``reason`` is the sentence for humans)."""

    STARTED = "started"
    """The first decision of a store, from its first probes."""
    PROBE_FAILED = "probe_failed"
    """The primary failed enough probes in a row (or answered read-only)."""
    BREAKER_TRIPPED = "breaker_tripped"
    """Live operations failed on the primary at the connection level."""
    FALLBACK_DOWN = "fallback_down"
    """The fallback is down while the primary is healthy: back to the primary at once."""
    NO_ENDPOINT = "no_endpoint"
    """Neither endpoint is usable."""
    ONLY_ENDPOINT = "only_endpoint"
    """A store configured with one endpoint runs on it."""
    PRIMARY_RECOVERED = "primary_recovered"
    """The primary is healthy and the store was not serving from the fallback."""
    FAILBACK_DELAY_ELAPSED = "failback_delay_elapsed"
    """The primary stayed healthy for the failback delay."""
    FAILBACK_DEFERRED = "failback_deferred"
    """A failback was due but the primary's pool could not be readied."""
    RECONCILED = "reconciled"
    """Every write made on the fallback reached the primary."""
    RECONCILE_FAILED = "reconcile_failed"
    """Reconcile failed: traffic stays on (or goes back to) the fallback."""
    HOLD_RAN_OUT = "hold_ran_out"
    """The final catch-up of reconcile did not finish within the write hold."""
    PINNED = "pinned"
    """An operator pinned the store to one endpoint."""
    PIN_RELEASED = "pin_released"
    """An operator released the pin."""
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event. ``at`` is wall-clock seconds (display only)."""

    store: str
    at: float

    @property
    def kind(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        data = {k: (str(v) if isinstance(v, enum.Enum) else v) for k, v in asdict(self).items()}
        data["kind"] = self.kind
        return data


@dataclass(frozen=True, slots=True)
class StateChanged(Event):
    """The switch of a store moved. Subclasses say which way; ``cause`` says why, as a label."""

    from_state: SwitchState
    to_state: SwitchState
    reason: str
    cause: TransitionCause = TransitionCause.OTHER


@dataclass(frozen=True, slots=True)
class FailoverStarted(StateChanged):
    """Traffic moved from the primary to the fallback.

    ``rpo_s``: with warm sync, the fallback's lag (seconds) when the primary was last known
    alive: writes committed on the primary in that window may be missing on the fallback.
    None without warm sync (or before its first measurement).
    """

    rpo_s: float | None = None


@dataclass(frozen=True, slots=True)
class FailbackStarted(StateChanged):
    """The primary is back; writes made on the fallback are being reconciled."""


@dataclass(frozen=True, slots=True)
class FailbackCompleted(StateChanged):
    """Traffic is back on the primary."""


@dataclass(frozen=True, slots=True)
class StoreUnavailable(StateChanged):
    """No endpoint of the store is usable."""


@dataclass(frozen=True, slots=True)
class StoreRecovered(StateChanged):
    """An endpoint became usable after the store was unavailable."""


@dataclass(frozen=True, slots=True)
class EndpointHealthChanged(Event):
    """An endpoint crossed its healthy/unhealthy threshold."""

    role: Role
    endpoint: str
    healthy: bool
    reason: str


@dataclass(frozen=True, slots=True)
class BreakerTripped(Event):
    """Live operations failed on an endpoint at the connection level."""

    role: Role
    endpoint: str
    failures: int
    reason: str


@dataclass(frozen=True, slots=True)
class ProbeCompleted(Event):
    """One probe finished (successful or not)."""

    role: Role
    endpoint: str
    usable: bool
    latency: float | None
    error: str | None


@dataclass(frozen=True, slots=True)
class OperationRetried(Event):
    """An operation that failed before reaching a server was retried on the other endpoint."""

    from_role: Role
    to_role: Role
    reason: str


@dataclass(frozen=True, slots=True)
class ReconcileStarted(Event):
    """A reconcile run took the pair's lock and starts copying captured writes to the primary.

    ``gated`` is True when the run ends in failback (the store is ``RECONCILING``), False
    for a sweep of writes that other processes left on the fallback.
    """

    backlog: int
    gated: bool


@dataclass(frozen=True, slots=True)
class ReconcileCompleted(Event):
    """A reconcile run ended; ``ok`` says whether every captured write reached the primary."""

    applied: int
    conflicts: int
    duration: float
    hold: float | None
    ok: bool
    result: str


@dataclass(frozen=True, slots=True)
class ConflictResolved(Event):
    """A key changed on both sides; the conflict policy decided which version stays."""

    key: str
    resolution: str
    detail: str


Listener = Callable[[Event], None]


class EventBus:
    """Fan-out of events to subscribers, with a bounded memory of recent ones."""

    def __init__(self, history: int = 200) -> None:
        self._listeners: list[Listener] = []
        self.recent: collections.deque[Event] = collections.deque(maxlen=history)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call *listener* for every event; returns a function that unsubscribes it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def emit(self, event: Event) -> None:
        if not isinstance(event, ProbeCompleted):
            self.recent.append(event)
        for listener in tuple(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not break failover
                logger.exception("event listener %r failed on %s", listener, event.kind)

    def since(self, kinds: Iterable[type[Event]] | None = None) -> list[Event]:
        kinds = tuple(kinds) if kinds else (Event,)
        return [e for e in self.recent if isinstance(e, kinds)]
