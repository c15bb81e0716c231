"""Drills complete and report what they saw, with counts that agree with each other."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import signal
from pathlib import Path

import pytest

from failover import drill
from failover.drill import DrillReport, run_drill
from failover.local import LocalStack
from failover.local.servers import pid_alive

from ..helpers import wait_for

pytestmark = pytest.mark.integration

# Short phases and a quick failback so each drill lasts a few seconds.
QUICK = {
    "HEALTH_CHECK_INTERVAL": 0.2,
    "FAILOVER_PROBE_TIMEOUT": 0.4,
    "FAILOVER_CONNECT_TIMEOUT": 0.4,
    "FAILOVER_OPERATION_TIMEOUT": 1.0,
    "FAILOVER_FAILBACK_DELAY": 0.5,
}


def assert_consistent(report: DrillReport) -> None:
    """Every count the report gives must add up with the others."""
    assert report.writes_attempted == report.writes_acknowledged + report.errors_surfaced
    assert sum(report.errors_by_kind.values()) == report.errors_surfaced
    assert report.acked_on_primary + report.missing_from_primary == report.writes_acknowledged
    assert report.stranded_on_fallback + report.lost == report.missing_from_primary
    assert sum(report.acked_by_phase.values()) == report.writes_acknowledged
    assert sum(report.missing_by_phase.values()) == report.missing_from_primary
    assert all(report.missing_by_phase.get(k, 0) <= v for k, v in report.acked_by_phase.items())
    assert report.unacknowledged_but_applied <= report.errors_surfaced
    assert len(report.missing_ids_sample) == min(10, report.missing_from_primary)
    json.loads(json.dumps(report.to_dict()))  # the --json output is plain JSON


def store_available(store: str) -> bool:
    return importlib.util.find_spec(f"failover.stores.{store}") is not None


@pytest.mark.parametrize("store", ["postgres", "redis", "mongodb"])
async def test_kill_drill_reports_failover_failback_and_stranded_writes(store: str) -> None:
    if not store_available(store):
        pytest.fail(f"failover.stores.{store} is missing")
    report = await run_drill(store, "kill", duration=1.0, warmup=0.5, settle=0.3, tuning=QUICK)
    assert_consistent(report)
    assert report.completed and report.failover_observed and report.failback_observed
    assert report.switches >= 2
    assert report.rto_s is not None and report.failover_s is not None and report.failback_s is not None
    assert report.acked_by_phase["before_fault"] > 0
    assert report.acked_by_phase["during_outage"] > 0  # the fallback took writes while the primary was dead
    assert report.acked_by_phase["after_failback"] > 0
    # The drill's own servers are durable: nothing acknowledged before the crash is gone, nothing is lost.
    assert report.missing_by_phase.get("before_fault", 0) == 0
    assert report.lost == 0
    kinds = [(t["from"], t["to"]) for t in report.transitions]
    assert ("ON_PRIMARY", "ON_FALLBACK") in kinds
    if report.reconcile_enabled:
        # Every write acknowledged by the fallback was reconciled before traffic returned.
        assert report.missing_from_primary == 0 and report.stranded_on_fallback == 0
        assert ("ON_FALLBACK", "RECONCILING") in kinds and ("RECONCILING", "ON_PRIMARY") in kinds
        assert report.reconcile_applied > 0
        assert report.write_hold_s is not None
    else:
        # Writes made on the fallback during the outage are reported, not hidden.
        assert report.stranded_on_fallback > 0
        assert ("ON_FALLBACK", "ON_PRIMARY") in kinds
    assert_continuity_within_rpo(report)


def assert_continuity_within_rpo(report: DrillReport) -> None:
    """The fallback's continuity at failover was measured, and warm sync kept its word."""
    doc = report.to_dict()
    for name in ("rpo_reported_s", "missing_on_fallback_at_failover", "missing_max_age_s"):
        assert name in doc, name
    assert "fallback at failover:" in report.render()
    # The drill waited for warm sync to stream before traffic: the RPO of a crash is small.
    assert report.rpo_reported_s is not None and 0 <= report.rpo_reported_s < 1.0, report.notes
    assert report.warm_heartbeat_interval_s is not None and report.warm_heartbeat_interval_s > 0
    missing = report.missing_on_fallback_at_failover
    assert isinstance(missing, int) and 0 <= missing <= report.acked_by_phase["before_fault"]
    assert report.missing_max_age_s is not None and report.missing_max_age_s >= 0
    if missing == 0:
        assert report.missing_max_age_s == 0
    # The warm-sync guarantee: nothing older than the reported RPO (at the resolution of the
    # heartbeat) is missing on the fallback when it takes over.
    assert report.missing_max_age_s <= report.rpo_reported_s + report.warm_heartbeat_interval_s + 0.1
    assert report.fallback_read_after_failover_s is not None


async def test_kill_drill_without_warm_sync_reports_no_continuity() -> None:
    report = await run_drill("redis", "kill", duration=1.0, warmup=0.3, settle=0.3, tuning={**QUICK, "FAILOVER_WARM": "off"})
    assert_consistent(report)
    assert report.failover_observed
    assert report.rpo_reported_s is None and report.missing_on_fallback_at_failover is None and report.missing_max_age_s is None
    assert any("FAILOVER_WARM=off" in note for note in report.notes)
    assert "fallback at failover: not measured" in report.render()


async def test_flap_drill_completes_and_counts_switches() -> None:
    report = await run_drill("postgres", "flap", duration=2.0, warmup=0.3, settle=0.3, tuning=QUICK)
    assert_consistent(report)
    assert report.completed and report.failover_observed
    assert report.switches == len(report.transitions) - 1  # every transition but the start is a switch
    assert report.lost == 0


async def test_blackhole_drill_through_the_command_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    for name, value in QUICK.items():
        monkeypatch.setenv(name, str(value))
    # A URL in the environment must not be used by the drill (it only drills its own servers).
    monkeypatch.setenv("UPSTASH_REDIS_URL", "redis://:hunter2@203.0.113.1:6379")
    parser = argparse.ArgumentParser()
    drill.add_arguments(parser)
    args = parser.parse_args(["--store", "postgres", "--fault", "blackhole", "--duration", "2", "--json", "--data-dir", str(tmp_path)])
    status = await asyncio.to_thread(drill.main, args)
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert status == 0, out
    assert doc["fault"] == "blackhole" and doc["failover_observed"] and doc["failback_observed"]
    assert doc["writes_attempted"] == doc["writes_acknowledged"] + doc["errors_surfaced"]
    assert doc["stranded_on_fallback"] + doc["lost"] == doc["missing_from_primary"]
    assert "hunter2" not in out and "203.0.113.1" not in out


async def test_kill_drill_uses_running_local_servers(server_root: Path) -> None:
    """With `failover local up` state in the data dir, the drill kills and restarts *those* servers."""
    data_dir = server_root / "local-up"
    stack = LocalStack(data_dir, stores=("postgres",))
    await asyncio.to_thread(stack.start)
    try:
        old_pid = stack.server("postgres", "primary").pid
        report = await run_drill("postgres", "kill", duration=1.0, data_dir=data_dir, warmup=0.5, settle=0.3, tuning=QUICK)
        assert_consistent(report)
        assert any("running local servers" in note for note in report.notes)
        assert report.failover_observed and report.failback_observed
        state = json.loads((data_dir / "stack.json").read_text())
        new_pid = state["postgres.primary"]["pid"]
        assert new_pid != old_pid  # killed and restarted, and the state says where it is now
    finally:
        restarted = json.loads((data_dir / "stack.json").read_text()).get("postgres.primary", {}).get("pid")
        await asyncio.to_thread(stack.stop)
        if restarted and restarted != old_pid:
            # The drill restarted the primary; no LocalServer object of this test owns it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(restarted, signal.SIGKILL)
            await wait_for(lambda: not pid_alive(restarted), 10, "the restarted primary to exit")


def test_rejects_unknown_store_and_fault() -> None:
    with pytest.raises(ValueError, match="store must be"):
        asyncio.run(run_drill("mysql", "kill"))
    with pytest.raises(ValueError, match="fault must be"):
        asyncio.run(run_drill("postgres", "unplug"))
