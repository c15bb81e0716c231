"""The warm sync driver on a fake sync: when it runs, when it stops, how the lag and the RPO are measured."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from failover.core.clock import FakeClock
from failover.core.endpoint import Endpoint, Role
from failover.core.events import Event, FailoverStarted, SwitchState
from failover.core.store import FailoverStore
from failover.core.warm import SyncProgress, WarmSync, WarmUnavailable

from .test_router import ScriptedBackend, options, until


async def eventually(predicate: Any, what: str, timeout: float = 2.0) -> None:
    """Poll *predicate* with a deadline (the driver's loop runs on real time)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.002)


class FakeSync(WarmSync):
    """Records the calls; the fallback applies heartbeats at once unless ``stalled``."""

    store = "postgres"

    def __init__(self, unavailable: str | None = None) -> None:
        self.calls: list[str] = []
        self.beats = 0
        self.on_fallback = 0
        self.stalled = False
        self.unavailable = unavailable
        self.state = "streaming"

    async def setup(self, primary: Endpoint, fallback: Endpoint) -> None:
        self.calls.append("setup")
        if self.unavailable:
            raise WarmUnavailable(self.unavailable)

    async def pause(self, fallback: Endpoint) -> None:
        self.calls.append("pause")

    async def resume(self, primary: Endpoint, fallback: Endpoint) -> None:
        self.calls.append("resume")

    async def heartbeat(self, primary: Endpoint) -> int:
        self.beats += 1
        if not self.stalled:
            self.on_fallback = self.beats
        return self.beats

    async def applied(self, fallback: Endpoint) -> int | None:
        return self.on_fallback or None

    async def progress(self, fallback: Endpoint) -> SyncProgress:
        if self.state == "copying":
            return SyncProgress(state="copying", tables=2, tables_copied=1, rows_done=50, rows_total=200)
        return SyncProgress(state=self.state, tables=2, tables_copied=2)


async def store_with(sync: FakeSync, primary_up: bool = True) -> FailoverStore[None]:
    endpoints = [
        Endpoint("postgres", Role.PRIMARY, "Supabase", "postgresql://u:hunter2@db.x.supabase.co/db"),
        Endpoint("postgres", Role.FALLBACK, "Local PostgreSQL", "postgresql://localhost/db"),
    ]
    backend = ScriptedBackend()
    backend.up[Role.PRIMARY] = primary_up
    store = FailoverStore(backend, endpoints, options(failback_delay=0.0), clock=FakeClock(), warm=sync)
    await store.start()
    return store


async def test_the_sync_runs_on_the_primary_only_and_resumes_after_failback() -> None:
    sync = FakeSync()
    store = await store_with(sync)
    try:
        assert store.warm is not None
        await until(lambda: store.status()["warm"]["state"] == "streaming", "streaming")
        assert sync.calls == ["setup"]
        store.pin(Role.FALLBACK)  # the fallback takes writes: nothing may write into it
        await until(lambda: "pause" in sync.calls, "paused")
        await until(lambda: not store.warm.running, "stopped")
        doc = store.status()["warm"]
        assert doc["state"] == "off" and doc["lag_s"] is None and "warm sync stopped" in doc["reason"]
        store.pin(None)
        assert store.state is SwitchState.ON_PRIMARY
        await until(lambda: "resume" in sync.calls, "resumed")
        assert sync.calls == ["setup", "pause", "resume"]  # no second setup: no new initial copy
    finally:
        await store.close()


def test_lag_is_the_age_of_the_oldest_heartbeat_not_applied_else_the_last_apply_delay() -> None:
    sync = FakeSync()
    store = FailoverStore(
        ScriptedBackend(),
        [
            Endpoint("postgres", Role.PRIMARY, "P", "postgresql://p/db"),
            Endpoint("postgres", Role.FALLBACK, "F", "postgresql://f/db"),
        ],
        options(),
        clock=FakeClock(),
        warm=sync,
    )
    driver = store.warm
    assert driver is not None
    assert driver.lag(100.0) is None  # never set up: unknown, not zero
    driver.set_up = True
    driver._sent.extend([(1, 10.0), (2, 11.0)])
    assert driver.lag(12.5) == pytest.approx(2.5)  # heartbeat 1 is 2.5 s old and not applied
    driver._saw(1, 10.2)
    assert driver.lag(12.5) == pytest.approx(1.5)  # now heartbeat 2 is the oldest missing
    driver._saw(2, 11.004)
    assert driver.lag(50.0) == pytest.approx(0.004)  # all applied: the newest one's apply delay
    driver.progress = SyncProgress(state="copying")
    assert driver.lag(50.0) is None  # a partial copy has no meaningful lag


async def test_a_failover_records_the_lag_when_the_primary_was_last_seen_as_its_rpo() -> None:
    sync = FakeSync()
    store = await store_with(sync)
    events: list[Event] = []
    store.bus.subscribe(events.append)
    try:
        await eventually(lambda: sync.beats >= 1, "first heartbeat")
        sync.stalled = True  # the fallback stops applying: the lag grows
        await asyncio.sleep(0.05)
        store.warm._wake.set()  # type: ignore[union-attr]
        await eventually(lambda: sync.beats >= 2, "a heartbeat the fallback misses")
        await asyncio.sleep(0.01)
        store.pin(Role.FALLBACK)
        failovers = [e for e in events if isinstance(e, FailoverStarted)]
        assert failovers and failovers[0].rpo_s is not None and failovers[0].rpo_s > 0
        # The tick under way polls the fallback for the missed heartbeat; it gives up at the transition.
        async with asyncio.timeout(2):
            while "pause" not in sync.calls or store.warm.running:  # type: ignore[union-attr]
                await asyncio.sleep(0.005)
        doc = store.status()["warm"]
        assert doc["rpo_at_last_failover_s"] is not None and doc["rpo_at_last_failover_s"] > 0
        assert doc["last_failover"]["rpo_s"] == doc["rpo_at_last_failover_s"]
    finally:
        await store.close()


async def test_servers_that_do_not_allow_it_leave_it_off_with_the_reason() -> None:
    sync = FakeSync(unavailable="Supabase runs with wal_level=replica")
    store = await store_with(sync)
    try:
        await until(lambda: "setup" in sync.calls, "tried")
        await until(lambda: store.status()["warm"]["reason"] is not None, "reason")
        doc = store.status()["warm"]
        assert doc["state"] == "off" and doc["reason"] == "Supabase runs with wal_level=replica"
        assert sync.beats == 0
    finally:
        await store.close()


async def test_copy_progress_has_rows_and_no_lag() -> None:
    sync = FakeSync()
    sync.state = "copying"
    store = await store_with(sync)
    try:
        await until(lambda: store.status()["warm"]["state"] == "copying", "copying")
        doc: dict[str, Any] = store.status()["warm"]
        assert doc["lag_s"] is None
        assert doc["copy"]["rows_done"] == 50 and doc["copy"]["rows_total"] == 200 and doc["copy"]["tables"] == 2
    finally:
        await store.close()


async def test_a_process_starting_on_the_fallback_stops_a_sync_another_process_left_running() -> None:
    sync = FakeSync()
    store = await store_with(sync, primary_up=False)
    try:
        assert store.state is SwitchState.ON_FALLBACK
        await eventually(lambda: sync.calls == ["pause"], "paused")
        doc = store.status()["warm"]
        assert doc["state"] == "off" and "starts once it runs on its primary" in doc["reason"]
        assert sync.beats == 0 and doc["rpo_at_last_failover_s"] is None
    finally:
        await store.close()
