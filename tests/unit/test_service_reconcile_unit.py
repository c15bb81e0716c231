"""The service's reconcile readers without servers: the dashboard's conflict cache, its
progress figures, the metrics of reconcile events, the CLI's conflict table."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from failover.cli import format_conflicts
from failover.core.events import ConflictResolved, Event, EventBus, ReconcileCompleted, ReconcileStarted
from failover.service.conflicts import RecentConflicts
from failover.service.dashboard import reconcile_runs
from failover.service.metrics import FailoverMetrics


class FakeStore(SimpleNamespace):
    def snapshot(self) -> SimpleNamespace:
        r = self.reconciler
        reconcile = {"enabled": True, "running": r.running, "backlog": r.backlog} if r is not None else {"enabled": False}
        return SimpleNamespace(reconcile=reconcile)


class FakeDatabases:
    """Just what the readers use: stores with reconcilers, recent events, the conflict log."""

    def __init__(self, *, running: bool = False) -> None:
        self.reconciler = SimpleNamespace(conflict_count=0, running=running, backlog=None)
        self.stores = {"postgres": FakeStore(reconciler=self.reconciler), "redis": FakeStore(reconciler=None)}
        self.events = EventBus()
        self.reads = 0
        self.gate: asyncio.Event | None = None
        self.log: list[dict[str, Any]] = []

    async def conflicts(self, store: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        return self.log[:limit]


async def test_recent_conflicts_are_read_once_per_ttl_and_again_when_a_conflict_is_resolved() -> None:
    dbs = FakeDatabases()
    dbs.log = [{"key": "a"}]
    recent = RecentConflicts(ttl=3600, wait=5)
    assert await recent.get(dbs) == [{"key": "a"}]  # type: ignore[arg-type]
    assert await recent.get(dbs) == [{"key": "a"}]  # type: ignore[arg-type]
    assert dbs.reads == 1
    dbs.log = [{"key": "b"}, {"key": "a"}]
    dbs.reconciler.conflict_count = 1  # this process resolved one: no need to wait for the ttl
    assert await recent.get(dbs) == [{"key": "b"}, {"key": "a"}]  # type: ignore[arg-type]
    assert dbs.reads == 2
    await recent.close()


async def test_a_slow_conflict_log_does_not_hold_the_dashboard() -> None:
    dbs = FakeDatabases()
    dbs.log = [{"key": "a"}]
    dbs.gate = asyncio.Event()
    recent = RecentConflicts(ttl=3600, wait=0.01)
    assert await recent.get(dbs) == []  # type: ignore[arg-type]  # the previous (empty) list, after `wait`
    assert await recent.get(dbs) == []  # type: ignore[arg-type]
    assert dbs.reads == 1  # one read under way, not one per poll
    dbs.gate.set()
    recent.wait = 5
    assert await recent.get(dbs) == [{"key": "a"}]  # type: ignore[arg-type]
    await recent.close()


async def test_no_reconciler_no_read() -> None:
    dbs = FakeDatabases()
    dbs.stores["postgres"].reconciler = None
    assert await RecentConflicts().get(dbs) == []  # type: ignore[arg-type]
    assert dbs.reads == 0


def test_progress_of_the_run_under_way() -> None:
    dbs = FakeDatabases(running=True)
    dbs.reconciler.backlog = 250
    events: list[Event] = [
        ReconcileStarted(store="postgres", at=1.0, backlog=10, gated=False),
        ReconcileCompleted(store="postgres", at=2.0, applied=10, conflicts=0, duration=0.1, hold=None, ok=True, result="completed"),
        ReconcileStarted(store="postgres", at=3.0, backlog=1000, gated=True),
    ]
    runs = reconcile_runs(dbs, events)  # type: ignore[arg-type]
    assert runs == {"postgres": {"started_at": 3.0, "gated": True, "start_backlog": 1000, "backlog": 250, "done": 0.75}}
    # Writes that arrive during the run grow the backlog past its start: never a negative fraction.
    dbs.reconciler.backlog = 1500
    assert reconcile_runs(dbs, events)["postgres"]["done"] == 0.0  # type: ignore[arg-type]
    # The last run ended (or none has the lock yet): no bar.
    assert reconcile_runs(dbs, events[:2]) == {}  # type: ignore[arg-type]
    dbs.reconciler.running = False
    assert reconcile_runs(dbs, events) == {}  # type: ignore[arg-type]


def test_reconcile_events_become_bounded_metrics() -> None:
    metrics = FailoverMetrics()
    metrics.on_event(ReconcileCompleted(store="postgres", at=1.0, applied=5, conflicts=1, duration=0.5, hold=0.01, ok=True, result="completed"))
    metrics.on_event(ReconcileCompleted(store="postgres", at=2.0, applied=0, conflicts=0, duration=0.1, hold=None, ok=False,
                                        result="failed: OperationalError: connection refused to 10.0.0.1"))  # fmt: skip
    metrics.on_event(ConflictResolved(store="postgres", at=1.0, key="public.items[id=1]", resolution="fallback_kept", detail="x"))
    metrics.on_event(ConflictResolved(store="postgres", at=1.0, key="public.items[id=2]", resolution="whatever", detail="x"))
    text = metrics.render().decode()
    assert 'failover_reconcile_runs_total{result="ok",store="postgres"} 1.0' in text
    assert 'failover_reconcile_runs_total{result="failed",store="postgres"} 1.0' in text
    assert 'failover_reconcile_hold_seconds_count{store="postgres"} 1.0' in text
    assert 'failover_reconcile_duration_seconds_count{result="failed",store="postgres"} 1.0' in text
    assert 'failover_reconcile_conflicts_total{resolution="fallback_kept",store="postgres"} 1.0' in text
    assert 'failover_reconcile_conflicts_total{resolution="other",store="postgres"} 1.0' in text
    assert "10.0.0.1" not in text and "items[id" not in text  # free text and keys never become labels


def test_conflict_table_is_readable() -> None:
    assert format_conflicts([]) == "no conflicts recorded"
    text = format_conflicts([
        {"store": "postgres", "key": "public.items[id=7]", "resolution": "primary_kept", "at": 0.0,
         "primary": {"name": "p"}, "fallback": None, "detail": "policy primary_wins"},
    ])  # fmt: skip
    lines = text.splitlines()
    assert lines[0].split() == ["TIME", "STORE", "RESOLUTION", "KEY"]
    assert lines[1].split()[-3:] == ["postgres", "primary_kept", "public.items[id=7]"]
    assert '{"name": "p"}' in lines[2] and "(absent)" in lines[3] and "policy primary_wins" in lines[4]
