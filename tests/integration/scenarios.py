"""Failure scenarios every store must pass, written once and run against each store.

A scenario gets a :class:`Subject` (a started ``Databases``, the store's name, its two
real servers and a traffic operation that returns the role that served it) and
asserts the behaviour the issues ask of every store. Store test modules call them
and add what only their store can check (where the data landed, typed commands).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from failover import (
    Databases,
    EndpointHealthChanged,
    FailbackCompleted,
    FailoverError,
    FailoverStarted,
    OutcomeUnknown,
    Role,
    SwitchState,
)
from failover.core.events import Event
from failover.local import LocalServer

from ..helpers import Traffic, wait_for


@dataclass
class Subject:
    dbs: Databases
    store: str
    primary: LocalServer
    fallback: LocalServer
    operation: Callable[[int], Awaitable[str]]

    @property
    def state(self) -> SwitchState:
        return self.dbs.store(self.store).snapshot().state


async def crash_moves_within_a_second(s: Subject, workers: int = 4) -> Traffic:
    """SIGKILL the primary under traffic: the switch happens within 1 s of the kill and no
    operation started after the kill fails; afterwards traffic is served by the fallback."""
    events: list[Event] = []
    s.dbs.subscribe(events.append)
    traffic = Traffic(s.operation, workers=workers).start()
    try:
        await wait_for(lambda: len(traffic.outcomes) > 20, 5, "traffic on the primary")
        await asyncio.to_thread(s.primary.kill)
        killed = time.monotonic()
        took = await wait_for(lambda: s.state is SwitchState.ON_FALLBACK, 1.0, "failover within 1 s")
        await wait_for(lambda: len(traffic.successes_after(killed)) > 20, 5, "traffic on the fallback")
    finally:
        await traffic.stop()
    assert took < 1.0
    assert traffic.errors_started_after(killed) == []
    assert {o.value for o in traffic.successes_after(killed + took)} == {"fallback"}
    assert any(isinstance(e, FailoverStarted) for e in events)
    return traffic


async def failback_waits_for_the_delay(
    s: Subject, during_outage: Callable[[], Awaitable[object]], after_failback: Callable[[], Awaitable[object]]
) -> None:
    """Kill the primary, let live traffic (*during_outage*) notice, restart it: traffic stays on the
    fallback until the primary has been healthy for FAILOVER_FAILBACK_DELAY, then returns;
    *after_failback* checks the primary serves again."""
    delay = s.dbs.settings.failback_delay
    healthy_at: list[float] = []
    failback_at: list[float] = []

    def listen(event: Event) -> None:
        if isinstance(event, EndpointHealthChanged) and event.role is Role.PRIMARY and event.healthy:
            healthy_at.append(time.monotonic())
        if isinstance(event, FailbackCompleted):
            failback_at.append(time.monotonic())

    unsubscribe = s.dbs.subscribe(listen)
    try:
        await asyncio.to_thread(s.primary.kill)
        await during_outage()
        assert s.state is SwitchState.ON_FALLBACK
        await asyncio.to_thread(s.primary.start)
        await wait_for(lambda: bool(healthy_at), 5, "primary healthy again")
        assert s.state is SwitchState.ON_FALLBACK  # healthy is not enough
        await wait_for(lambda: s.state is SwitchState.ON_PRIMARY, delay + 5, "failback")
        await after_failback()
        assert s.dbs.status()[s.store]["using_primary"] is True
    finally:
        unsubscribe()
    assert failback_at[0] - healthy_at[0] >= delay


async def hang_fails_over_within_the_timeouts(s: Subject) -> None:
    """SIGSTOP the primary: the store fails over within operation + probe timeouts (+ a probe
    interval); operations in flight end in bounded time with OutcomeUnknown, none started
    after the switch fails."""
    settings = s.dbs.settings
    traffic = Traffic(s.operation, workers=2).start()
    try:
        await wait_for(lambda: len(traffic.outcomes) > 10, 5, "traffic on the primary")
        s.primary.pause()
        paused = time.monotonic()
        bound = settings.operation_timeout + settings.probe_timeout + settings.health_check_interval
        await wait_for(lambda: s.state is SwitchState.ON_FALLBACK, bound + 1, "failover from a hung primary")
        switched = time.monotonic()
        await wait_for(lambda: len(traffic.successes_after(switched)) > 10, 5, "traffic on the fallback")
    finally:
        await traffic.stop()
        s.primary.resume()
    assert all(o.finished - o.started < settings.operation_timeout + 1 for o in traffic.outcomes)
    assert all(isinstance(o.error, OutcomeUnknown) for o in traffic.outcomes if not o.ok)
    assert traffic.errors_started_after(switched) == []
    assert switched - paused <= bound + 1


async def flapping_switches_a_bounded_number_of_times(s: Subject, seconds: float = 10) -> None:
    """Kill and restart the primary once a second: a bounded number of switches, and the only
    errors are operations that were on the wire when a crash hit them (typed, overlapping a kill)."""
    traffic = Traffic(s.operation, workers=2).start()
    kills: list[tuple[float, float]] = []
    try:
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            started = time.monotonic()
            await asyncio.to_thread(s.primary.kill)
            kills.append((started, time.monotonic()))
            await asyncio.sleep(0.5)  # the fault schedule, not a wait for a condition
            await asyncio.to_thread(s.primary.start)
            await asyncio.sleep(0.5)
    finally:
        await traffic.stop()
    switches = s.dbs.store(s.store).snapshot().counters["switches"]
    assert 1 <= switches <= 4
    first_kill = kills[0][0]
    assert len(traffic.successes_after(first_kill)) > 50
    for failed in traffic.errors_started_after(first_kill):
        assert isinstance(failed.error, OutcomeUnknown), failed.error
        assert any(failed.started <= end and failed.finished >= begin for begin, end in kills), failed


async def both_hung_raise_within_the_operation_timeout(s: Subject, *commands: Callable[[], Awaitable[object]]) -> None:
    """SIGSTOP both servers: every command raises a failover error within the operation timeout."""
    s.primary.pause()
    s.fallback.pause()
    try:
        for command in commands:
            started = time.monotonic()
            try:
                await asyncio.wait_for(command(), timeout=10)
            except FailoverError:
                pass
            else:
                raise AssertionError("a command succeeded with both servers hung")
            assert time.monotonic() - started <= s.dbs.settings.operation_timeout + 0.5
    finally:
        s.primary.resume()
        s.fallback.resume()


async def fallback_down_is_reported_and_harmless(s: Subject) -> None:
    """Kill the fallback while on the primary: status says so, traffic sees no error."""
    traffic = Traffic(s.operation, workers=2).start()
    try:
        await asyncio.to_thread(s.fallback.kill)
        killed = time.monotonic()
        await wait_for(
            lambda: s.dbs.status()[s.store]["fallback_available"] is False, 3, "fallback reported down"
        )
        await wait_for(lambda: len(traffic.successes_after(killed)) > 10, 5, "traffic")
        status = s.dbs.status()
    finally:
        await traffic.stop()
    assert status[s.store]["using_primary"] is True
    assert status["overall_status"] == "healthy"
    assert [o for o in traffic.outcomes if not o.ok] == []
