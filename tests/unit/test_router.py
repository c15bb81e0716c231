"""Routing rules of FailoverStore.run with a scripted in-memory backend (pure logic, no servers).

Time is a fake clock: a test moves it with :func:`advance`, which lets the store's watchdog
fire what became due (suspicion, deadlines, probe timeouts). Nothing here sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from failover import NoEndpointAvailable, OperationTimeout, OutcomeUnknown
from failover.core.clock import FakeClock
from failover.core.endpoint import Endpoint, Role
from failover.core.events import OperationRetried, SwitchState
from failover.core.store import Backend, ErrorKind, FailoverStore, StoreOptions


class NotSent(Exception):
    pass


class Lost(Exception):
    pass


class AppError(Exception):
    pass


class Busy(Exception):
    pass


class ScriptedBackend(Backend[None]):
    store = "postgres"

    def __init__(self) -> None:
        self.up = {Role.PRIMARY: True, Role.FALLBACK: True}
        self.hung = {Role.PRIMARY: False, Role.FALLBACK: False}
        self.drained: list[Role] = []
        self.probes_done = {Role.PRIMARY: 0, Role.FALLBACK: 0}
        self.probes_hanging = {Role.PRIMARY: 0, Role.FALLBACK: 0}

    async def open(self, endpoint: Endpoint) -> None:
        pass

    async def drain(self, endpoint: Endpoint) -> None:
        self.drained.append(endpoint.role)

    async def close(self, endpoint: Endpoint) -> None:
        pass

    async def probe(self, endpoint: Endpoint) -> bool:
        if self.hung[endpoint.role]:
            self.probes_hanging[endpoint.role] += 1
            await asyncio.Event().wait()
        if not self.up[endpoint.role]:
            raise NotSent("connection refused to postgresql://u:hunter2@h/db")
        self.probes_done[endpoint.role] += 1
        return True

    def classify(self, exc: BaseException) -> ErrorKind:
        if isinstance(exc, NotSent):
            return ErrorKind.NOT_SENT
        if isinstance(exc, Lost):
            return ErrorKind.OUTCOME_UNKNOWN
        if isinstance(exc, Busy):
            return ErrorKind.BUSY
        return ErrorKind.APPLICATION


def options(**overrides: float) -> StoreOptions:
    values = dict(probe_interval=60.0, probe_timeout=0.2, operation_timeout=1.0, unhealthy_threshold=2,
                  healthy_threshold=2, breaker_threshold=1, failback_delay=10.0)
    values.update(overrides)
    return StoreOptions(**values)  # type: ignore[arg-type]


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Let other tasks run until *predicate* holds (a bounded number of loop turns, no sleeping)."""
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{what}: not reached")


async def advance(store: FailoverStore[None], seconds: float) -> None:
    """Move the store's fake clock by *seconds* and fire what became due."""
    clock = store.clock
    assert isinstance(clock, FakeClock)
    clock.advance(seconds)
    store.watchdog.check()
    for _ in range(5):  # let the cancelled attempts and probes unwind
        await asyncio.sleep(0)


async def started_store(**overrides: float) -> tuple[FailoverStore[None], ScriptedBackend]:
    backend = ScriptedBackend()
    endpoints = [
        Endpoint("postgres", Role.PRIMARY, "Supabase", "postgresql://u:hunter2@db.x.supabase.co/db"),
        Endpoint("postgres", Role.FALLBACK, "Local PostgreSQL", "postgresql://localhost/db"),
    ]
    store = FailoverStore(backend, endpoints, options(**overrides), clock=FakeClock())
    await store.start()
    return store, backend


async def test_not_sent_is_retried_on_the_fallback_and_trips_the_breaker() -> None:
    store, backend = await started_store()
    calls: list[Role] = []

    async def op(endpoint: Endpoint) -> str:
        calls.append(endpoint.role)
        if endpoint.role is Role.PRIMARY:
            raise NotSent("refused")
        return "ok"

    try:
        assert await store.run(op) == "ok"
        assert calls == [Role.PRIMARY, Role.FALLBACK]
        from failover import last_served

        served = last_served()
        assert served is not None and served.role is Role.FALLBACK
        assert store.state is SwitchState.ON_FALLBACK
        assert any(isinstance(e, OperationRetried) for e in store.bus.recent)
        await asyncio.sleep(0)  # let the drain task run
        assert Role.PRIMARY in backend.drained
    finally:
        await store.close()


async def test_outcome_unknown_is_raised_not_retried() -> None:
    store, _ = await started_store()
    calls: list[Role] = []

    async def op(endpoint: Endpoint) -> str:
        calls.append(endpoint.role)
        raise Lost("connection reset")

    try:
        with pytest.raises(OutcomeUnknown) as caught:
            await store.run(op)
        assert calls == [Role.PRIMARY]
        assert caught.value.endpoint == "Supabase"
        assert caught.value.retryable is False
    finally:
        await store.close()


async def test_idempotent_operations_are_retried_after_a_lost_connection() -> None:
    store, _ = await started_store()

    async def op(endpoint: Endpoint) -> str:
        if endpoint.role is Role.PRIMARY:
            raise Lost("connection reset")
        return "read"

    try:
        assert await store.run(op, idempotent=True) == "read"
    finally:
        await store.close()


async def test_application_errors_pass_through_and_do_not_trip() -> None:
    store, _ = await started_store()

    async def op(endpoint: Endpoint) -> str:
        raise AppError("duplicate key")

    try:
        with pytest.raises(AppError):
            await store.run(op)
        assert store.state is SwitchState.ON_PRIMARY
    finally:
        await store.close()


async def test_every_endpoint_refusing_raises_no_endpoint_available() -> None:
    store, _ = await started_store()

    async def op(endpoint: Endpoint) -> str:
        raise NotSent("refused")

    try:
        with pytest.raises(NoEndpointAvailable) as caught:
            await store.run(op)
        assert caught.value.retryable is True
        assert "Supabase" in str(caught.value) and "Local PostgreSQL" in str(caught.value)
    finally:
        await store.close()


async def test_a_hung_operation_times_out_with_a_typed_error() -> None:
    store, _ = await started_store(operation_timeout=0.3)
    started = asyncio.Event()

    async def op(endpoint: Endpoint) -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    try:
        task = asyncio.create_task(store.run(op))
        await until(started.is_set, "operation started")
        await advance(store, 0.29)
        assert not task.done()
        await advance(store, 0.02)  # past the operation timeout
        with pytest.raises(OperationTimeout):
            await task
    finally:
        await store.close()


async def test_a_hung_read_moves_to_the_fallback_and_a_failed_probe_trips_the_breaker() -> None:
    store, backend = await started_store(operation_timeout=1.0, probe_timeout=0.2)
    backend.hung[Role.PRIMARY] = True
    started = asyncio.Event()

    async def op(endpoint: Endpoint) -> str:
        if endpoint.role is Role.PRIMARY:
            started.set()
            await asyncio.Event().wait()
        return "fallback answered"

    try:
        task = asyncio.create_task(store.run(op, idempotent=True))
        await until(started.is_set, "read sent to the primary")
        await advance(store, 0.1)  # the suspicion point (half the probe timeout): a probe starts, and hangs
        await until(lambda: backend.probes_hanging[Role.PRIMARY] == 1, "confirmation probe waiting")
        await advance(store, 0.2)  # the probe times out: the breaker trips
        await until(lambda: store.state is SwitchState.ON_FALLBACK, "failover")
        assert "probe timed out" in store._health[Role.PRIMARY].reason
        assert not task.done()  # the read still waits for its own attempt deadline (half its budget)
        await advance(store, 0.2)
        assert await task == "fallback answered"
    finally:
        await store.close()


async def test_a_slow_operation_on_a_healthy_server_does_not_switch() -> None:
    store, backend = await started_store(operation_timeout=0.5, probe_timeout=0.1)
    started = asyncio.Event()

    def confirmations() -> int:
        return backend.probes_done[Role.PRIMARY] - 1  # the start-up probe excluded

    async def slow_report(endpoint: Endpoint) -> str:
        started.set()
        await asyncio.Event().wait()
        return "never in time"

    try:
        task = asyncio.create_task(store.run(slow_report))
        await until(started.is_set, "report started")
        await advance(store, 0.05)  # the suspicion point: a confirmation probe runs
        await until(lambda: confirmations() == 1, "first confirmation")
        await advance(store, 0.45)  # the report's deadline
        with pytest.raises(OperationTimeout):
            await task
        await until(lambda: confirmations() == 2, "confirmation after the timeout")
        assert store.state is SwitchState.ON_PRIMARY
        assert store._health[Role.PRIMARY].healthy is True
    finally:
        await store.close()


async def test_a_closed_store_refuses_operations() -> None:
    from failover import ClosedError

    store, _ = await started_store()
    await store.close()

    async def op(endpoint: Endpoint) -> str:
        return "x"

    with pytest.raises(ClosedError):
        await store.run(op)


async def test_probe_errors_are_redacted_in_status() -> None:
    store, backend = await started_store()
    backend.up[Role.PRIMARY] = False
    try:
        await store.probe_round()
        text = str(store.status())
        assert "hunter2" not in text
        assert "refused" in text
    finally:
        await store.close()


async def test_a_busy_pool_on_a_healthy_server_reaches_the_caller_and_moves_nothing() -> None:
    store, _ = await started_store()
    calls: list[Role] = []

    async def op(endpoint: Endpoint) -> str:
        calls.append(endpoint.role)
        raise Busy("every connection is busy")

    try:
        with pytest.raises(Busy):
            await store.run(op, idempotent=True)
        assert calls == [Role.PRIMARY]
        assert store.state is SwitchState.ON_PRIMARY
    finally:
        await store.close()


async def test_a_pool_held_by_a_hung_server_follows_the_switch() -> None:
    store, backend = await started_store(operation_timeout=2.0, probe_timeout=0.2)
    backend.hung[Role.PRIMARY] = True

    async def op(endpoint: Endpoint) -> str:
        if endpoint.role is Role.PRIMARY:
            store.suspect(Role.PRIMARY, "stuck statement")  # what a stuck operation's clock does
            raise Busy("every connection is held by stuck statements")
        return "fallback"

    try:
        task = asyncio.create_task(store.run(op))
        await until(lambda: backend.probes_hanging[Role.PRIMARY] == 1, "confirmation probe waiting")
        await advance(store, 0.2)  # the confirmation probe times out: the breaker trips
        assert await task == "fallback"
        assert store.state is SwitchState.ON_FALLBACK
    finally:
        await store.close()
