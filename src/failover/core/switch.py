"""The switch: the one place where a store's active endpoint is decided.

States and transitions (every one emits an event and is kept in the history)::

    ON_PRIMARY ──primary unhealthy, fallback healthy──▶ ON_FALLBACK      FailoverStarted
    ON_FALLBACK ─primary healthy ≥ failback_delay────▶ ON_PRIMARY       FailbackCompleted
                 (or at once when the fallback dies)
    ON_FALLBACK ─…with a reconcile gate──────────────▶ RECONCILING      FailbackStarted
    RECONCILING ─gate finished───────────────────────▶ ON_PRIMARY       FailbackCompleted
    any ────────neither endpoint healthy─────────────▶ UNAVAILABLE      StoreUnavailable
    UNAVAILABLE ─an endpoint healthy─────────────────▶ ON_PRIMARY / ON_FALLBACK  StoreRecovered

A *pin* forces one endpoint (``pin(Role.FALLBACK)`` for maintenance); ``pin(None)``
releases it. The switch knows nothing about drivers: it reads two
:class:`EndpointHealth` objects and a clock.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass

from .clock import Clock
from .endpoint import Role
from .events import (
    EventBus,
    FailbackCompleted,
    FailbackStarted,
    FailoverStarted,
    StateChanged,
    StoreRecovered,
    StoreUnavailable,
    SwitchState,
    TransitionCause,
)
from .health import EndpointHealth

__all__ = ["Switch", "Transition"]

logger = logging.getLogger("failover.switch")

_ROLE_STATE = {Role.PRIMARY: SwitchState.ON_PRIMARY, Role.FALLBACK: SwitchState.ON_FALLBACK}


@dataclass(frozen=True, slots=True)
class Transition:
    """One entry of a store's transition history."""

    at: float  # wall clock, display only
    from_state: SwitchState
    to_state: SwitchState
    reason: str
    cause: TransitionCause = TransitionCause.OTHER

    def to_dict(self) -> dict[str, object]:
        return {
            "at": self.at,
            "from": str(self.from_state),
            "to": str(self.to_state),
            "reason": self.reason,
            "cause": str(self.cause),
        }


class Switch:
    """Decides which endpoint of one store serves traffic.

    Args:
        store: the store's name, for events.
        primary, fallback: health of each configured endpoint (one may be None).
        failback_delay: seconds the primary must be healthy before traffic returns to it.
        reconcile_gate: when True, failback passes through ``RECONCILING`` and waits
            for :meth:`finish_reconcile`.
    """

    def __init__(
        self,
        store: str,
        primary: EndpointHealth | None,
        fallback: EndpointHealth | None,
        *,
        failback_delay: float,
        clock: Clock,
        bus: EventBus,
        history_size: int = 50,
        reconcile_gate: bool = False,
    ) -> None:
        if primary is None and fallback is None:
            raise ValueError(f"the {store} switch needs at least one endpoint")
        if failback_delay < 0:
            raise ValueError("failback_delay must be greater or equal than 0")
        self.store = store
        self.health: dict[Role, EndpointHealth] = {}
        if primary is not None:
            self.health[Role.PRIMARY] = primary
        if fallback is not None:
            self.health[Role.FALLBACK] = fallback
        self.failback_delay = failback_delay
        self.reconcile_gate = reconcile_gate
        self._clock = clock
        self._bus = bus
        self.state = SwitchState.UNAVAILABLE
        self.pinned: Role | None = None
        self.history: collections.deque[Transition] = collections.deque(maxlen=history_size)
        self.switches = 0
        self.lag_at_failover: Callable[[], float | None] | None = None
        """Set by warm sync: the fallback's lag when a failover happens (``FailoverStarted.rpo_s``)."""

    # --- queries --------------------------------------------------------------------------

    @property
    def preferred_role(self) -> Role:
        """The role that serves when everything is well: the primary when configured."""
        return Role.PRIMARY if Role.PRIMARY in self.health else Role.FALLBACK

    @property
    def active_role(self) -> Role | None:
        """The endpoint traffic goes to, or None when the store is unavailable."""
        if self.state is SwitchState.ON_PRIMARY:
            return Role.PRIMARY
        if self.state in (SwitchState.ON_FALLBACK, SwitchState.RECONCILING):
            return Role.FALLBACK
        return None

    def candidates(self) -> list[Role]:
        """Roles to try for an operation, best first.

        The active endpoint comes first; the other follows unless it is known to
        be unhealthy. When the store is unavailable every configured endpoint is
        tried (primary first), so an operation can find a server that came back
        before the next probe notices.
        """
        if self.pinned is not None:
            return [self.pinned]
        active = self.active_role
        if active is None:
            return [r for r in (Role.PRIMARY, Role.FALLBACK) if r in self.health]
        other = self.alternative()
        return [active] if other is None else [active, other]

    def alternative(self) -> Role | None:
        """The role an operation may try after the active one, or None (no list built: the hot path)."""
        if self.pinned is not None:
            return None
        active = self.active_role
        if active is None:
            return None
        other = active.other
        health = self.health.get(other)
        if health is None or health.healthy is False:
            return None
        if self.state is SwitchState.ON_FALLBACK and other is Role.PRIMARY:
            return None  # the primary gets traffic back through failback only
        return other

    # --- transitions ----------------------------------------------------------------------

    def initialize(self, reconcile_first: bool = False) -> None:
        """Take the state the first probes call for, without counting it as a switch.

        *reconcile_first*: writes made on the fallback are still waiting to be
        reconciled (a previous run was interrupted), so a store that would start on
        the primary starts ``RECONCILING`` instead: traffic stays on the fallback
        until they are on the primary.
        """
        target, reason, _ = self._decide()
        fallback = self.health.get(Role.FALLBACK)
        if (
            reconcile_first
            and self.reconcile_gate
            and target is SwitchState.ON_PRIMARY
            and self.pinned is None
            and fallback is not None
            and fallback.healthy
        ):
            target, reason = SwitchState.RECONCILING, "writes made on the fallback wait to be reconciled"
        self.state = target
        self.history.append(
            Transition(self._clock.wall(), SwitchState.UNAVAILABLE, target, f"started: {reason}", TransitionCause.STARTED)
        )
        log = logger.info if target is self._preferred_state() else logger.warning
        log("%s: started %s (%s)", self.store, target, reason)

    def _preferred_state(self) -> SwitchState:
        return _ROLE_STATE[self.preferred_role]

    @property
    def on_preferred(self) -> bool:
        """True when the store runs where it should when all is well."""
        return self.state is self._preferred_state()

    def evaluate(self, allow_failback: bool = True) -> StateChanged | None:
        """Apply the current health to the state. Returns the event if the state moved.

        ``allow_failback=False`` applies everything but a return to the primary
        (used when the primary's pool could not be readied).
        """
        target, reason, cause = self._decide(allow_failback)
        if target is self.state:
            return None
        if self.state is SwitchState.RECONCILING and target is SwitchState.ON_PRIMARY:
            return None  # only finish_reconcile() leaves RECONCILING for the primary
        return self._move(target, reason, cause)

    def pin(self, role: Role | None, reason: str = "pinned by operator") -> StateChanged | None:
        """Force traffic to *role* (None releases the pin and returns to automatic mode)."""
        if role is not None and role not in self.health:
            raise ValueError(f"the {self.store} store has no {role} endpoint to pin")
        self.pinned = role
        logger.info("%s switch %s", self.store, f"pinned to {role}" if role else "released")
        target, why, _ = self._decide()
        if target is self.state:
            return None
        if role is not None:
            return self._move(target, reason, TransitionCause.PINNED)
        return self._move(target, f"pin released: {why}", TransitionCause.PIN_RELEASED)

    def finish_reconcile(self, ok: bool, reason: str, cause: TransitionCause | None = None) -> StateChanged | None:
        """End ``RECONCILING``: to the primary when *ok*, else back to the fallback.

        *cause* defaults to ``RECONCILED`` when *ok*, else ``RECONCILE_FAILED``.
        """
        if self.state is not SwitchState.RECONCILING:
            return None
        primary = self.health.get(Role.PRIMARY)
        if ok and primary is not None and primary.healthy:
            return self._move(SwitchState.ON_PRIMARY, reason, cause or TransitionCause.RECONCILED)
        target, why, _ = self._decide(allow_failback=False)
        return self._move(target, f"{reason}; {why}", cause or TransitionCause.RECONCILE_FAILED)

    def _decide(self, allow_failback: bool = True) -> tuple[SwitchState, str, TransitionCause]:
        """The state the health calls for, with the sentence and the cause of a move there."""
        primary = self.health.get(Role.PRIMARY)
        fallback = self.health.get(Role.FALLBACK)
        if self.pinned is not None:
            pinned = self.health[self.pinned]
            if pinned.healthy:
                return _ROLE_STATE[self.pinned], f"pinned to {self.pinned}", TransitionCause.PINNED
            why = f"pinned to {self.pinned} {pinned.endpoint.name}, which is down: {pinned.reason}"
            return SwitchState.UNAVAILABLE, why, TransitionCause.PINNED
        p_ok = bool(primary and primary.healthy)
        f_ok = bool(fallback and fallback.healthy)
        if not p_ok and not f_ok:
            parts = [f"{h.endpoint.name}: {h.reason}" for h in self.health.values()]
            return SwitchState.UNAVAILABLE, "no usable endpoint (" + "; ".join(parts) + ")", TransitionCause.NO_ENDPOINT
        if not f_ok:
            assert primary is not None
            if fallback is None:
                return SwitchState.ON_PRIMARY, f"{primary.endpoint.name} is healthy", TransitionCause.ONLY_ENDPOINT
            why = f"{primary.endpoint.name} is healthy, {fallback.endpoint.name} is down: {fallback.reason}"
            return SwitchState.ON_PRIMARY, why, TransitionCause.FALLBACK_DOWN
        assert fallback is not None
        if not p_ok:
            if primary is None:
                return SwitchState.ON_FALLBACK, f"{fallback.endpoint.name} is the only endpoint", TransitionCause.ONLY_ENDPOINT
            cause = TransitionCause.BREAKER_TRIPPED if primary.tripped else TransitionCause.PROBE_FAILED
            return SwitchState.ON_FALLBACK, f"{primary.endpoint.name} is down: {primary.reason}", cause
        assert primary is not None
        # Both healthy. Leaving the fallback waits for the primary to prove itself.
        if self.state in (SwitchState.ON_FALLBACK, SwitchState.RECONCILING):
            if not allow_failback:
                return SwitchState.ON_FALLBACK, "staying on the fallback", TransitionCause.FAILBACK_DEFERRED
            healthy_for = primary.healthy_for()
            if healthy_for < self.failback_delay:
                return self.state, f"{primary.endpoint.name} healthy for {healthy_for:.1f}s", TransitionCause.OTHER
            reason = f"{primary.endpoint.name} healthy for {healthy_for:.1f}s (failback delay {self.failback_delay:g}s)"
            if self.reconcile_gate and self.state is SwitchState.ON_FALLBACK:
                return SwitchState.RECONCILING, reason, TransitionCause.FAILBACK_DELAY_ELAPSED
            return SwitchState.ON_PRIMARY, reason, TransitionCause.FAILBACK_DELAY_ELAPSED
        return SwitchState.ON_PRIMARY, f"{primary.endpoint.name} is healthy", TransitionCause.PRIMARY_RECOVERED

    def _move(self, target: SwitchState, reason: str, cause: TransitionCause) -> StateChanged:
        source = self.state
        self.state = target
        self.switches += 1
        at = self._clock.wall()
        self.history.append(Transition(at, source, target, reason, cause))
        event_type: type[StateChanged]
        if target is SwitchState.UNAVAILABLE:
            event_type = StoreUnavailable
        elif source is SwitchState.UNAVAILABLE:
            event_type = StoreRecovered
        elif target is SwitchState.ON_FALLBACK and source is SwitchState.ON_PRIMARY:
            event_type = FailoverStarted
        elif target is SwitchState.RECONCILING:
            event_type = FailbackStarted
        elif target is SwitchState.ON_PRIMARY:
            event_type = FailbackCompleted
        else:
            event_type = StateChanged
        log = logger.warning if target in (SwitchState.UNAVAILABLE, SwitchState.ON_FALLBACK) else logger.info
        log("%s: %s -> %s (%s)", self.store, source, target, reason)
        if event_type is FailoverStarted:
            rpo = self.lag_at_failover() if self.lag_at_failover is not None else None
            event: StateChanged = FailoverStarted(
                store=self.store, at=at, from_state=source, to_state=target, reason=reason, cause=cause, rpo_s=rpo
            )
        else:
            event = event_type(store=self.store, at=at, from_state=source, to_state=target, reason=reason, cause=cause)
        self._bus.emit(event)
        return event
