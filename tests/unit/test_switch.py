"""The switch and endpoint health, driven by a fake clock: no servers, no sleeps."""

from __future__ import annotations

import pytest

from failover.core.clock import FakeClock
from failover.core.endpoint import Endpoint, ProbeResult, Role
from failover.core.events import (
    BreakerTripped,
    Event,
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
from failover.core.health import EndpointHealth
from failover.core.switch import Switch


class World:
    def __init__(self, *, failback_delay: float = 10, unhealthy: int = 2, healthy: int = 2, breaker: int = 1,
                 roles: tuple[Role, ...] = (Role.PRIMARY, Role.FALLBACK), gate: bool = False) -> None:
        self.clock = FakeClock()
        self.bus = EventBus()
        self.events: list[Event] = []
        self.bus.subscribe(self.events.append)
        self.health = {
            role: EndpointHealth(
                Endpoint("postgres", role, f"{role} db", f"postgresql://u:pw@{role}/db"),
                unhealthy_threshold=unhealthy,
                healthy_threshold=healthy,
                breaker_threshold=breaker,
                clock=self.clock,
                bus=self.bus,
            )
            for role in roles
        }
        self.switch = Switch(
            "postgres",
            self.health.get(Role.PRIMARY),
            self.health.get(Role.FALLBACK),
            failback_delay=failback_delay,
            clock=self.clock,
            bus=self.bus,
            reconcile_gate=gate,
        )

    def probe(self, role: Role, ok: bool, writable: bool = True) -> None:
        result = ProbeResult(role, ok, ok and writable, 0.001 if ok else None, None if ok else "refused", self.clock.now)
        self.health[role].record_probe(result)

    def round(self, primary: bool, fallback: bool = True, advance: float = 1.0) -> None:
        self.clock.advance(advance)
        if Role.PRIMARY in self.health:
            self.probe(Role.PRIMARY, primary)
        if Role.FALLBACK in self.health:
            self.probe(Role.FALLBACK, fallback)
        self.switch.evaluate()

    def start(self, primary: bool = True, fallback: bool = True) -> None:
        if Role.PRIMARY in self.health:
            self.probe(Role.PRIMARY, primary)
        if Role.FALLBACK in self.health:
            self.probe(Role.FALLBACK, fallback)
        self.switch.initialize()

    def kinds(self) -> list[type[Event]]:
        return [type(e) for e in self.events if not type(e).__name__.startswith(("Probe", "EndpointHealth"))]


def test_starts_on_primary_when_both_are_up() -> None:
    w = World()
    w.start()
    assert w.switch.state is SwitchState.ON_PRIMARY
    assert w.switch.switches == 0
    assert w.switch.history[-1].reason.startswith("started")


def test_starts_on_fallback_when_primary_is_down_at_start() -> None:
    w = World()
    w.start(primary=False)
    assert w.switch.state is SwitchState.ON_FALLBACK


def test_probe_failures_below_the_threshold_do_not_switch() -> None:
    w = World(unhealthy=3)
    w.start()
    w.round(primary=False)
    w.round(primary=False)
    assert w.switch.state is SwitchState.ON_PRIMARY
    w.round(primary=False)
    assert w.switch.state is SwitchState.ON_FALLBACK
    assert FailoverStarted in w.kinds()


def test_breaker_trips_at_once_on_a_live_connection_failure() -> None:
    w = World(unhealthy=5)
    w.start()
    assert w.health[Role.PRIMARY].record_operation_failure("connection refused")
    w.switch.evaluate()
    assert w.switch.state is SwitchState.ON_FALLBACK
    assert BreakerTripped in w.kinds()
    assert "breaker tripped" in w.switch.history[-1].reason


def test_breaker_threshold_counts_consecutive_failures_only() -> None:
    w = World(breaker=3)
    w.start()
    p = w.health[Role.PRIMARY]
    assert not p.record_operation_failure("x")
    assert not p.record_operation_failure("x")
    p.record_operation_success()
    assert not p.record_operation_failure("x")
    assert not p.record_operation_failure("x")
    assert p.record_operation_failure("x")
    assert p.healthy is False


def test_failback_waits_for_healthy_threshold_and_delay() -> None:
    w = World(failback_delay=10, healthy=2)
    w.start()
    w.health[Role.PRIMARY].record_operation_failure("refused")
    w.switch.evaluate()
    assert w.switch.state is SwitchState.ON_FALLBACK
    w.round(primary=True)  # one good probe: not healthy yet
    assert w.health[Role.PRIMARY].healthy is False
    w.round(primary=True)  # healthy now, delay starts
    assert w.health[Role.PRIMARY].healthy is True
    w.round(primary=True, advance=9.5)
    assert w.switch.state is SwitchState.ON_FALLBACK
    w.round(primary=True, advance=0.5)
    assert w.switch.state is SwitchState.ON_PRIMARY
    assert w.kinds()[-1] is FailbackCompleted


def test_a_flapping_primary_does_not_bounce_traffic() -> None:
    w = World(failback_delay=5, healthy=2, unhealthy=1)
    w.start()
    for _ in range(20):  # up for 3 s, down for 1 s, repeatedly
        for _ in range(3):
            w.round(primary=True)
        w.round(primary=False)
    assert w.switch.switches == 1
    assert w.switch.state is SwitchState.ON_FALLBACK


def test_primary_dropping_during_the_delay_restarts_it() -> None:
    w = World(failback_delay=3, healthy=1, unhealthy=1)
    w.start(primary=False)
    w.round(primary=True, advance=1)
    w.round(primary=True, advance=2)
    w.round(primary=False, advance=0.5)
    w.round(primary=True, advance=0.5)
    w.round(primary=True, advance=2.5)
    assert w.switch.state is SwitchState.ON_FALLBACK
    w.round(primary=True, advance=0.5)
    assert w.switch.state is SwitchState.ON_PRIMARY


def test_fallback_dying_sends_traffic_back_to_a_healthy_primary_at_once() -> None:
    w = World(failback_delay=100, healthy=1, unhealthy=1)
    w.start(primary=False)
    w.round(primary=True)
    assert w.switch.state is SwitchState.ON_FALLBACK
    w.round(primary=True, fallback=False)
    assert w.switch.state is SwitchState.ON_PRIMARY


def test_both_down_is_unavailable_then_recovers() -> None:
    w = World(unhealthy=1, healthy=1)
    w.start()
    w.round(primary=False, fallback=False)
    assert w.switch.state is SwitchState.UNAVAILABLE
    assert w.switch.active_role is None
    assert StoreUnavailable in w.kinds()
    w.round(primary=False, fallback=True)
    assert w.switch.state is SwitchState.ON_FALLBACK
    assert w.kinds()[-1] is StoreRecovered


def test_unavailable_candidates_try_every_endpoint_primary_first() -> None:
    w = World(unhealthy=1)
    w.start(primary=False, fallback=False)
    assert w.switch.candidates() == [Role.PRIMARY, Role.FALLBACK]


def test_on_fallback_never_offers_the_primary_before_failback() -> None:
    w = World(failback_delay=10, healthy=1)
    w.start(primary=False)
    w.round(primary=True)
    assert w.switch.candidates() == [Role.FALLBACK]


def test_on_primary_offers_the_fallback_unless_known_down() -> None:
    w = World(unhealthy=1)
    w.start()
    assert w.switch.candidates() == [Role.PRIMARY, Role.FALLBACK]
    w.round(primary=True, fallback=False)
    assert w.switch.candidates() == [Role.PRIMARY]


def test_pin_and_release() -> None:
    w = World(failback_delay=0)
    w.start()
    w.switch.pin(Role.FALLBACK)
    assert w.switch.state is SwitchState.ON_FALLBACK
    assert w.switch.candidates() == [Role.FALLBACK]
    w.switch.pin(None)
    assert w.switch.state is SwitchState.ON_PRIMARY


def test_pinned_endpoint_down_is_unavailable_not_silently_moved() -> None:
    w = World(unhealthy=1)
    w.start()
    w.switch.pin(Role.PRIMARY)
    w.round(primary=False)
    assert w.switch.state is SwitchState.UNAVAILABLE


def test_pin_unknown_role_is_refused() -> None:
    w = World(roles=(Role.FALLBACK,))
    w.start()
    with pytest.raises(ValueError, match="no primary endpoint"):
        w.switch.pin(Role.PRIMARY)


def test_single_endpoint_store() -> None:
    w = World(roles=(Role.FALLBACK,), unhealthy=1)
    w.start()
    assert w.switch.state is SwitchState.ON_FALLBACK
    assert w.switch.on_preferred
    w.round(primary=False, fallback=False)
    assert w.switch.state is SwitchState.UNAVAILABLE


def test_reconcile_gate_passes_through_reconciling() -> None:
    w = World(failback_delay=0, healthy=1, gate=True)
    w.start(primary=False)
    w.round(primary=True)
    assert w.switch.state is SwitchState.RECONCILING
    assert w.switch.active_role is Role.FALLBACK
    w.round(primary=True)
    assert w.switch.state is SwitchState.RECONCILING  # only finish_reconcile leaves it
    w.switch.finish_reconcile(True, "copied 3 keys")
    assert w.switch.state is SwitchState.ON_PRIMARY
    assert FailbackStarted in w.kinds() and w.kinds()[-1] is FailbackCompleted


def test_failed_reconcile_stays_on_fallback() -> None:
    w = World(failback_delay=0, healthy=1, gate=True)
    w.start(primary=False)
    w.round(primary=True)
    w.switch.finish_reconcile(False, "conflict")
    assert w.switch.state is SwitchState.ON_FALLBACK


def test_history_is_bounded_and_newest_last() -> None:
    w = World(unhealthy=1, healthy=1, failback_delay=0)
    w.switch.history = type(w.switch.history)(maxlen=3)
    w.start()
    for _ in range(5):
        w.round(primary=False)
        w.round(primary=True)
    assert len(w.switch.history) == 3
    assert w.switch.history[-1].to_state is SwitchState.ON_PRIMARY


def test_read_only_probe_is_not_usable() -> None:
    w = World(unhealthy=1)
    w.start()
    w.clock.advance(1)
    w.probe(Role.PRIMARY, True, writable=False)
    w.switch.evaluate()
    assert w.switch.state is SwitchState.ON_FALLBACK


def test_a_failing_listener_does_not_break_the_switch() -> None:
    w = World(unhealthy=1)

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    w.bus.subscribe(broken)
    w.start()
    w.round(primary=False)
    assert w.switch.state is SwitchState.ON_FALLBACK


def test_fake_clock_cannot_go_back() -> None:
    with pytest.raises(ValueError):
        FakeClock().advance(-1)


def _causes(w: World) -> list[TransitionCause]:
    return [e.cause for e in w.events if isinstance(e, StateChanged)]


def test_every_move_carries_the_cause_the_switch_decided() -> None:
    w = World(failback_delay=5, healthy=1, unhealthy=1, gate=True)
    w.start()
    assert w.switch.history[-1].cause is TransitionCause.STARTED
    w.health[Role.PRIMARY].record_operation_failure("connection refused")
    w.switch.evaluate()
    w.round(primary=True)
    w.round(primary=True, advance=5)
    w.switch.finish_reconcile(False, "reconcile hold ran out", TransitionCause.HOLD_RAN_OUT)
    w.round(primary=True, advance=5)
    w.switch.finish_reconcile(True, "copied")
    w.round(primary=False)
    w.round(primary=False, fallback=False)
    w.round(primary=True, fallback=False)
    w.round(primary=True, fallback=True)
    w.switch.pin(Role.FALLBACK)
    w.round(primary=True, fallback=False)  # the pinned endpoint dies: unavailable, still pinned
    w.switch.pin(None)
    assert _causes(w) == [
        TransitionCause.BREAKER_TRIPPED,
        TransitionCause.FAILBACK_DELAY_ELAPSED,  # to RECONCILING
        TransitionCause.HOLD_RAN_OUT,
        TransitionCause.FAILBACK_DELAY_ELAPSED,
        TransitionCause.RECONCILED,
        TransitionCause.PROBE_FAILED,
        TransitionCause.NO_ENDPOINT,
        TransitionCause.FALLBACK_DOWN,  # recovered onto the primary while the fallback is down
        TransitionCause.PINNED,
        TransitionCause.PINNED,
        TransitionCause.PIN_RELEASED,
    ]
    assert [t.cause for t in list(w.switch.history)[1:]] == _causes(w)
    assert w.switch.history[-1].to_dict()["cause"] == "pin_released"


def test_a_failed_reconcile_and_a_dead_fallback_say_so() -> None:
    w = World(failback_delay=0, healthy=1, unhealthy=1, gate=True)
    w.start(primary=False)
    w.round(primary=True)
    w.switch.finish_reconcile(False, "conflict")
    w.round(primary=True, fallback=False)
    assert _causes(w)[-2:] == [TransitionCause.RECONCILE_FAILED, TransitionCause.FALLBACK_DOWN]
