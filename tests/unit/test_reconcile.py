"""Reconcile core: policies, summaries, the admission gate and the driver, with an in-memory capture."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest

from failover.core.clock import FakeClock
from failover.core.endpoint import Endpoint, Role
from failover.core.events import ConflictResolved, Event, ReconcileCompleted, SwitchState
from failover.core.reconcile import (
    Admission,
    BatchResult,
    Capture,
    Conflict,
    ConflictPolicy,
    Resolution,
    change_time,
    resolve,
    summarize,
)
from failover.core.store import FailoverStore

from .test_router import ScriptedBackend, options


def test_policies() -> None:
    assert resolve(ConflictPolicy.FALLBACK_WINS, 1.0, 2.0)[0] is Resolution.FALLBACK_KEPT
    assert resolve(ConflictPolicy.PRIMARY_WINS, 2.0, 1.0)[0] is Resolution.PRIMARY_KEPT
    assert resolve(ConflictPolicy.NEWEST_WINS, 1.0, 2.0)[0] is Resolution.PRIMARY_KEPT
    assert resolve(ConflictPolicy.NEWEST_WINS, 3.0, 2.0)[0] is Resolution.FALLBACK_KEPT
    resolution, why = resolve(ConflictPolicy.NEWEST_WINS, 3.0, None)
    assert resolution is Resolution.FALLBACK_KEPT and "no timestamp" in why


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"updated_at": dt.datetime(2026, 1, 1)}, dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc).timestamp()),
        ({"modified_at": "2026-01-01T00:00:00+00:00"}, dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc).timestamp()),
        ({"updated_at": "2026-01-01T00:00:00Z"}, dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc).timestamp()),
        ({"updated_at": "2026-01-01T00:00:00"}, dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc).timestamp()),
        ({"updated_at": 1_700_000_000}, 1_700_000_000.0),
        ({"updated_at": 1_700_000_000_000}, 1_700_000_000.0),  # milliseconds
        ({"updated_at": b"1700000000500"}, 1_700_000_000.5),
        ({"updated_at": "yesterday", "modified_at": 5.0}, 5.0),
        ({"updated_at": True}, None),
        ({}, None),
        (None, None),
    ],
)
def test_change_time(fields: dict[str, Any] | None, expected: float | None) -> None:
    assert change_time(fields) == expected


def test_summaries_mask_secrets_and_cut_long_values() -> None:
    row = {"id": 1, "password_hash": "x" * 10, "API_KEY": "k", "note": "n" * 500, "nested": {"token": "t", "ok": [1, 2]}}
    out = summarize(row)
    assert out["password_hash"] == "***" and out["API_KEY"] == "***" and out["nested"]["token"] == "***"
    assert out["note"].startswith("n" * 80) and out["note"].endswith("(500 chars)")
    assert out["nested"]["ok"] == [1, 2] and out["id"] == 1
    assert summarize(None) is None
    assert summarize(b"bytes") == "bytes"
    assert len(summarize(list(range(100)))) == 21


async def test_admission_holds_new_operations_and_waits_for_those_in_flight() -> None:
    gate = Admission()
    gate.enter()  # one operation in flight
    order: list[str] = []

    async def newcomer() -> None:
        async with gate.admitted(asyncio.get_running_loop().time() + 10):
            order.append("newcomer ran")

    async with gate.hold():
        task = asyncio.create_task(newcomer())
        await asyncio.sleep(0)
        idle = asyncio.create_task(gate.idle())
        await asyncio.sleep(0)
        assert not idle.done() and order == []
        gate.leave()
        await asyncio.wait_for(idle, 1)
        assert order == []  # still held
        order.append("switched")
    await asyncio.wait_for(task, 1)
    assert order == ["switched", "newcomer ran"]
    assert gate.inflight == 0 and not gate.held


async def test_admission_wait_gives_up_at_the_deadline() -> None:
    import time

    gate = Admission()
    async with gate.hold():
        started = time.monotonic()
        await gate.wait(time.monotonic() + 0.05)
        assert time.monotonic() - started < 1


async def test_admission_leave_on_its_loop_from_any_thread() -> None:
    import threading

    gate = Admission()
    loop = asyncio.get_running_loop()
    for _ in range(3):
        gate.enter()
    gate.leave_on(loop)  # on the loop: at once
    assert gate.inflight == 2
    async with gate.hold():
        idle = asyncio.create_task(gate.idle())
        threads = [threading.Thread(target=gate.leave_on, args=(loop,)) for _ in range(2)]
        for thread in threads:  # as a garbage-collection finalizer would: scheduled on the loop
            thread.start()
        for thread in threads:
            thread.join()
        await asyncio.wait_for(idle, 1)
    assert gate.inflight == 0
    closed = asyncio.new_event_loop()
    closed.close()
    gate.enter()
    gate.leave_on(closed)  # nothing waits on a closed loop: no error
    assert gate.inflight == 1


class MemoryCapture(Capture):
    """Two dicts for two servers, a log of captured keys with before-images."""

    store = "postgres"

    def __init__(self) -> None:
        self.primary: dict[str, Any] = {}
        self.fallback: dict[str, Any] = {}
        self.log: dict[str, tuple[Any, int]] = {}  # key -> (before, version)
        self.conflict_log: list[Conflict] = []
        self.locked = False
        self.lock_free = True
        self.slow = 0.0
        self.fail: Exception | None = None

    def write(self, key: str, value: Any) -> None:
        """An application write on the fallback, captured."""
        before, version = self.log.get(key, (self.fallback.get(key), 0))
        self.log[key] = (before, version + 1)
        if value is None:
            self.fallback.pop(key, None)
        else:
            self.fallback[key] = value

    async def install(self, fallback: Endpoint, primary: Endpoint | None) -> None:
        pass

    async def backlog(self, fallback: Endpoint) -> int:
        return len(self.log)

    async def apply_batch(self, primary: Endpoint, fallback: Endpoint, policy: ConflictPolicy, limit: int) -> BatchResult:
        if self.fail is not None:
            raise self.fail
        if self.slow:
            await asyncio.sleep(self.slow)
        result = BatchResult()
        for key, (before, version) in list(self.log.items())[:limit]:
            mine, theirs = self.fallback.get(key), self.primary.get(key)
            copy = True
            if theirs != mine and theirs != before:
                resolution, why = resolve(policy, None, None)
                copy = resolution is Resolution.FALLBACK_KEPT
                conflict = Conflict(self.store, key, resolution, 0.0, theirs, mine, why)
                self.conflict_log.append(conflict)
                result.conflicts.append(conflict)
            if copy:
                if mine is None:
                    self.primary.pop(key, None)
                else:
                    self.primary[key] = mine
            if self.log.get(key, (None, -1))[1] == version:
                del self.log[key]
                result.applied += 1
        return result

    @contextlib.asynccontextmanager
    async def lock(self, fallback: Endpoint) -> AsyncIterator[bool]:
        if self.locked or not self.lock_free:
            yield False
            return
        self.locked = True
        try:
            yield True
        finally:
            self.locked = False

    async def conflicts(self, fallback: Endpoint, limit: int) -> list[dict[str, Any]]:
        return [c.to_dict() for c in reversed(self.conflict_log)][:limit]


async def store_with(capture: MemoryCapture, **overrides: Any) -> FailoverStore[None]:
    endpoints = [
        Endpoint("postgres", Role.PRIMARY, "Supabase", "postgresql://u:hunter2@db.x.supabase.co/db"),
        Endpoint("postgres", Role.FALLBACK, "Local PostgreSQL", "postgresql://localhost/db"),
    ]
    store = FailoverStore(
        ScriptedBackend(), endpoints, options(failback_delay=0.0, **overrides), clock=FakeClock(), capture=capture
    )
    await store.start()
    return store


async def settle(store: FailoverStore[None], state: SwitchState) -> None:
    async with asyncio.timeout(5):
        while store.state is not state or (store.reconciler and store.reconciler.running):
            await asyncio.sleep(0.001)


async def on_fallback_with_writes(capture: MemoryCapture, store: FailoverStore[None]) -> None:
    store.pin(Role.FALLBACK)
    capture.write("a", 1)
    capture.write("b", 2)
    capture.write("a", 3)
    capture.primary["gone"] = "old"
    capture.fallback["gone"] = "old"
    capture.write("gone", None)


async def test_failback_passes_through_reconciling_and_copies_final_states() -> None:
    capture = MemoryCapture()
    store = await store_with(capture)
    events: list[Event] = []
    store.bus.subscribe(events.append)
    try:
        await on_fallback_with_writes(capture, store)
        store.pin(None)
        assert store.state is SwitchState.RECONCILING
        await settle(store, SwitchState.ON_PRIMARY)
        assert capture.primary == {"a": 3, "b": 2}
        assert capture.log == {}
        done = [e for e in events if isinstance(e, ReconcileCompleted)]
        assert done and done[-1].ok and done[-1].applied == 3 and done[-1].hold is not None
        assert store.status()["reconcile"]["applied"] == 3
    finally:
        await store.close()


async def test_a_conflict_is_resolved_by_policy_and_announced() -> None:
    capture = MemoryCapture()
    store = await store_with(capture, conflict_policy="primary_wins")
    events: list[Event] = []
    store.bus.subscribe(events.append)
    try:
        capture.primary["k"] = capture.fallback["k"] = "v0"
        store.pin(Role.FALLBACK)
        capture.write("k", "fallback")
        capture.primary["k"] = "primary"  # changed on the primary after we left
        store.pin(None)
        await settle(store, SwitchState.ON_PRIMARY)
        assert capture.primary["k"] == "primary"
        assert [e.resolution for e in events if isinstance(e, ConflictResolved)] == ["primary_kept"]
        assert store.status()["reconcile"]["conflicts"] == 1
    finally:
        await store.close()


async def test_a_hold_that_runs_out_keeps_traffic_on_the_fallback() -> None:
    capture = MemoryCapture()
    store = await store_with(capture, reconcile_hold=0.05)
    try:
        await on_fallback_with_writes(capture, store)
        capture.slow = 0.5  # the final batch cannot fit in the hold
        store.pin(None)
        await settle(store, SwitchState.ON_FALLBACK)
        assert store.status()["reconcile"]["last_run"]["result"].startswith("the final catch-up did not fit")
        assert not store.admission.held  # the gate opened on time
        capture.slow = 0
        await store.probe_round()  # the next round tries again
        await settle(store, SwitchState.ON_PRIMARY)
        assert capture.primary == {"a": 3, "b": 2}
    finally:
        await store.close()


async def test_a_failing_copy_keeps_traffic_on_the_fallback_and_says_why() -> None:
    capture = MemoryCapture()
    store = await store_with(capture)
    try:
        await on_fallback_with_writes(capture, store)
        capture.fail = RuntimeError("copy failed for postgresql://u:hunter2@db.x.supabase.co/db")
        store.pin(None)
        await settle(store, SwitchState.ON_FALLBACK)
        error = store.status()["reconcile"]["error"]
        assert "copy failed" in error and "hunter2" not in error
        assert capture.log  # nothing was forgotten
    finally:
        await store.close()


async def test_another_process_holding_the_lock_keeps_this_one_reconciling() -> None:
    capture = MemoryCapture()
    store = await store_with(capture)
    try:
        await on_fallback_with_writes(capture, store)
        capture.lock_free = False
        store.pin(None)
        async with asyncio.timeout(5):
            while store.reconciler is None or store.reconciler.running or store.reconciler.state != "waiting_for_lock":
                await asyncio.sleep(0.001)
        assert store.state is SwitchState.RECONCILING
        capture.lock_free = True
        await store.probe_round()
        await settle(store, SwitchState.ON_PRIMARY)
    finally:
        await store.close()


async def test_a_backlog_found_at_start_starts_reconciling() -> None:
    capture = MemoryCapture()
    capture.write("left", "by a dead process")
    store = await store_with(capture)
    try:
        first = store.status()["transitions"][-1]
        assert first["to"] == "RECONCILING"
        await settle(store, SwitchState.ON_PRIMARY)
        assert capture.primary == {"left": "by a dead process"}
    finally:
        await store.close()


@pytest.mark.parametrize("bad", [{"reconcile_hold": 0}, {"reconcile_batch": 0}])
async def test_bad_reconcile_options_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        await store_with(MemoryCapture(), **bad)
