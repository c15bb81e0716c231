"""``failover drill``: break a primary on purpose and report what the application saw.

A drill is the honest answer to "what happens when the primary dies?". It runs
against the embedded local servers, sends a steady stream of *acknowledged
writes* with unique ids through :class:`~failover.Databases`, injects a fault
into the primary, restores it, waits for the failback, and then looks into both
servers directly to report:

* **RTO**: from the fault to the first write that succeeded after it, and the
  longest gap between two acknowledged writes;
* **errors surfaced to callers**, by kind (``NoEndpointAvailable``: nothing was
  written; ``OutcomeUnknown``: a write was in flight when the connection broke);
* **acknowledged writes missing from the primary** after failback, split into
  those *stranded on the fallback* (written there during the outage and not
  reconciled: with reconcile on, a defect; with ``FAILOVER_RECONCILE=false``,
  expected) and those *lost* (on neither server: a durability problem);
* **reconcile**: how long the store stayed ``RECONCILING``, how many captured
  keys it copied, at what rate, and how long new writes were held for the final
  catch-up;
* **the warm fallback's continuity at failover**: the RPO warm sync reported for
  the failover, and what the fallback really held: right after the switch the
  drill reads the fallback directly and counts the writes the primary
  acknowledged *before the fault* that are not there, and how old the oldest of
  them was at the fault. Traffic starts only once warm sync streams (the drill
  waits up to :data:`WARM_STREAMING_TIMEOUT`); when it is off or never streams,
  these figures are None and a note says why.

Faults:

* ``kill``: SIGKILL the primary (every process of it), restart it after ``--duration``.
* ``blackhole``: the primary is reached through a :class:`~failover.local.proxy.FaultProxy`
  switched to ``drop`` for ``--duration`` (the drill starts its own servers).
* ``flap``: the primary is killed and restarted repeatedly during ``--duration``,
  then left up; the report shows how often traffic switched.

When ``failover local up`` has left its state (``stack.json``) in the data
directory and that store's servers answer, the drill uses them (the service and
its dashboard see the drill live); otherwise it starts temporary servers and
removes them afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._urls import redact_text
from .core.events import Event, FailoverStarted, ReconcileCompleted, StateChanged, StoreRecovered, SwitchState
from .core.store import FailoverStore
from .databases import Databases
from .local.proxy import FaultProxy, proxied_url
from .local.processes import pid_alive, signal_tree, wait_gone
from .local.servers import HOST, LocalPostgres, LocalRedis, LocalServer
from .local.stack import LocalStack, update_state
from .local.traffic import Outcome, Traffic, write_ids
from .settings import STORES, Settings

__all__ = ["DrillReport", "FAULTS", "DRILL_TUNING", "add_arguments", "main", "run_drill", "settings_for"]

logger = logging.getLogger("failover.drill")

FAULTS = ("kill", "blackhole", "flap")

DEFAULT_DURATION = 5.0
DEFAULT_WORKERS = 4
DEFAULT_WARMUP = 1.0
DEFAULT_SETTLE = 1.0
FAILBACK_TIMEOUT = 60.0
FLAP_DOWN = 0.5
FLAP_UP = 0.7
WARM_STREAMING_TIMEOUT = 60.0
"""Seconds the drill waits for warm sync to stream before it starts traffic."""
WARM_FINAL_TIMEOUT = 10.0
"""Seconds the drill waits, after a failover, for warm sync to stop and fix that failover's RPO."""

# Probe every half second so a drill finishes in seconds; detection of a crash
# does not depend on it (live traffic trips the breaker), failback does.
DRILL_TUNING: dict[str, Any] = {
    "HEALTH_CHECK_INTERVAL": 0.5,
    "FAILOVER_FAILBACK_DELAY": 2.0,
}

_ENV_BY_ROLE = {
    "postgres": ("SUPABASE_DB_URL", "POSTGRES_URL"),
    "mongodb": ("MONGODB_ATLAS_URL", "MONGODB_URL"),
    "redis": ("UPSTASH_REDIS_URL", "REDIS_URL"),
}


# --- what a drill knows about each store ----------------------------------------------------


class _StoreProbe:
    """Writes a unique id through failover; lists the ids a server holds, directly."""

    store: str

    async def prepare(self, url: str) -> None:
        """Create what the writes need on one server."""

    async def write(self, dbs: Databases, run: str, write_id: str) -> None:
        raise NotImplementedError

    async def ids_on(self, url: str, run: str) -> set[str]:
        raise NotImplementedError


class _PostgresProbe(_StoreProbe):
    store = "postgres"
    TABLE = "failover_drill"

    async def prepare(self, url: str) -> None:
        import psycopg

        async with await psycopg.AsyncConnection.connect(url, connect_timeout=5, autocommit=True) as conn:
            await conn.execute(
                f"create table if not exists {self.TABLE} "
                "(id text primary key, run text not null, at timestamptz not null default now())"
            )

    async def write(self, dbs: Databases, run: str, write_id: str) -> None:
        await dbs.postgres.execute(f"insert into {self.TABLE} (id, run) values (%s, %s)", (write_id, run))

    async def ids_on(self, url: str, run: str) -> set[str]:
        import psycopg

        async with await psycopg.AsyncConnection.connect(url, connect_timeout=5, autocommit=True) as conn:
            cur = await conn.execute(f"select id from {self.TABLE} where run = %s", (run,))
            return {row[0] for row in await cur.fetchall()}


class _MongoProbe(_StoreProbe):
    store = "mongodb"
    COLLECTION = "failover_drill"
    DATABASE = "app"

    async def prepare(self, url: str) -> None:
        # Created before failover starts, so warm sync streams it from the start instead of
        # discovering it once traffic has begun (the writes before that are not covered by its RPO).
        from pymongo import AsyncMongoClient
        from pymongo.errors import CollectionInvalid

        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url, serverSelectionTimeoutMS=5000, connectTimeoutMS=5000)
        try:
            with contextlib.suppress(CollectionInvalid):  # already there
                await client[self.DATABASE].create_collection(self.COLLECTION)
        finally:
            await client.close()

    async def write(self, dbs: Databases, run: str, write_id: str) -> None:
        await dbs.mongodb.database[self.COLLECTION].insert_one({"_id": write_id, "run": run})

    async def ids_on(self, url: str, run: str) -> set[str]:
        from pymongo import AsyncMongoClient

        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url, serverSelectionTimeoutMS=5000, connectTimeoutMS=5000)
        try:
            cursor = client[self.DATABASE][self.COLLECTION].find({"run": run}, {"_id": 1})
            return {doc["_id"] async for doc in cursor}
        finally:
            await client.close()


class _RedisProbe(_StoreProbe):
    store = "redis"

    async def write(self, dbs: Databases, run: str, write_id: str) -> None:
        await dbs.redis.set(f"failover-drill:{run}:{write_id}", "1")

    async def ids_on(self, url: str, run: str) -> set[str]:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        try:
            prefix = f"failover-drill:{run}:"
            found = set()
            async for key in client.scan_iter(match=prefix + "*", count=1000):
                found.add(key.decode()[len(prefix):])
            return found
        finally:
            await client.aclose()


_PROBES: dict[str, Callable[[], _StoreProbe]] = {
    "postgres": _PostgresProbe,
    "mongodb": _MongoProbe,
    "redis": _RedisProbe,
}


# --- the servers a drill acts on ------------------------------------------------------------


class _DurablePostgres(LocalPostgres):
    """A local PostgreSQL that acknowledges a commit only once its WAL is written.

    The demo servers trade durability for speed (``synchronous_commit=off``), so
    a SIGKILL can lose the last acknowledged commits. A drill on its own servers
    measures failover, not that trade, so it turns durability back on.
    """

    def _command(self) -> list[str]:
        return [*super()._command(), "-c", "synchronous_commit=on"]


@dataclass
class _Target:
    """The primary and fallback of one store, and how to hurt the primary."""

    store: str
    primary: LocalServer
    fallback: LocalServer
    external: bool
    proxy: FaultProxy | None = None
    state_file: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def primary_client_url(self) -> str:
        """The URL failover uses for the primary (through the proxy when there is one)."""
        return proxied_url(self.primary.url, self.proxy.port) if self.proxy else self.primary.url

    async def kill_primary(self) -> float:
        """SIGKILL the primary; return the monotonic time at which it stopped serving.

        Its processes are frozen (SIGSTOP) on the spot, before the slower kill-and-wait
        runs in a thread, so the returned time is when service really stopped.
        """
        key = f"{self.store}.primary"
        if self.external and self.primary.process is None:
            pids = _freeze_foreign(self.primary, self.state_file, key)
            frozen = time.monotonic()
            await asyncio.to_thread(_kill_foreign, self.primary, pids)
        else:
            self.primary.pause()
            frozen = time.monotonic()
            await asyncio.to_thread(self.primary.kill)
        return frozen

    async def start_primary(self) -> None:
        if self.external and self.state_file is not None:
            # `failover local up --serve` starts it when it runs, so the server is its child
            # (reaped there) rather than an orphan of this short-lived drill.
            from .service.local_control import ask_owner

            if await asyncio.to_thread(ask_owner, self.state_file.parent, "start", self.store, "primary") is not None:
                return
        await asyncio.to_thread(self.primary.start)
        if self.external and self.state_file is not None:
            _record_pid(self.state_file, f"{self.store}.primary", self.primary.pid)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _freeze_foreign(server: LocalServer, state_file: Path | None, key: str) -> list[int]:
    """SIGSTOP a server started by another process (``failover local up``), by its recorded pid.

    Returns its processes. Freezing first is what makes it a crash: no process of it can
    notice the others dying and say goodbye to its clients.
    """
    pid = None
    if state_file is not None:
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            pid = json.loads(state_file.read_text())[key]["pid"]
    if not pid or not pid_alive(int(pid)):
        raise RuntimeError(f"the {key.replace('.', ' ')} server has no live pid in {state_file}; is `failover local up` running?")
    if not server.owns(int(pid)):  # a recycled pid must never be hit
        raise RuntimeError(f"pid {pid} recorded for the {key.replace('.', ' ')} server is another process; not touching it")
    return signal_tree(int(pid), signal.SIGSTOP, freeze=True)  # listed once frozen: complete


def _kill_foreign(server: LocalServer, pids: list[int]) -> None:
    """SIGKILL the frozen processes *pids* of *server* and wait until they and its port are gone."""
    signal_tree(pids[0], signal.SIGKILL, pids=pids)
    wait_gone(pids, 10, also=lambda: _port_open(server.port), interval=0.005)
    if isinstance(server, LocalPostgres):
        # Its parent, not us, reaps the dead postmaster; until then the pid in the lock
        # file still "exists" (a zombie) and a restart would refuse to start.
        with contextlib.suppress(FileNotFoundError):
            (server.data_dir / "postmaster.pid").unlink()


def _record_pid(state_file: Path, key: str, pid: int | None) -> None:
    update_state(state_file, {key: {"pid": pid}})


@contextlib.asynccontextmanager
async def _target(store: str, fault: str, data_dir: Path | None) -> AsyncIterator[_Target]:
    """The servers to drill: ``failover local up``'s when usable, else temporary ones."""
    if data_dir is not None and fault != "blackhole" and (data_dir / "stack.json").exists():
        stack = LocalStack(data_dir, stores=(store,))
        primary, fallback = stack.server(store, "primary"), stack.server(store, "fallback")
        if _port_open(primary.port) and _port_open(fallback.port):
            target = _Target(store, primary, fallback, external=True, state_file=stack.state_file)
            target.notes.append(f"used the running local servers of {data_dir}")
            yield target
            return
    notes: list[str] = []
    if fault == "blackhole":
        notes.append("a blackhole needs the fault proxy in front of the primary: the drill started servers of its own")
    root = Path(tempfile.mkdtemp(prefix="failover-drill-"))
    os.chmod(root, 0o755)
    servers: list[LocalServer] = []
    proxy: FaultProxy | None = None
    try:
        for role in ("primary", "fallback"):
            path = root / f"{store}-{role}"
            server: LocalServer
            if store == "postgres":
                server = _DurablePostgres(path, name=f"postgres {role}")
            elif store == "redis":
                server = LocalRedis(path, name=f"redis {role}", persistent=True)
            else:
                from .local.servers import LocalMongo

                server = LocalMongo(path, name=f"mongodb {role}")
            servers.append(server)
            await asyncio.to_thread(server.start)
        if fault == "blackhole":
            proxy = await FaultProxy(servers[0].port).start()
        target = _Target(store, servers[0], servers[1], external=False, proxy=proxy)
        target.notes.append("started temporary servers (durable commits) for this drill")
        target.notes.extend(notes)
        yield target
    finally:
        if proxy is not None:
            await proxy.stop()
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(server.kill)
        shutil.rmtree(root, ignore_errors=True)


# --- the report ------------------------------------------------------------------------------


@dataclass
class DrillReport:
    """What a drill saw. Times are seconds; every count is of writes made by this drill."""

    store: str
    fault: str
    duration: float
    run: str
    completed: bool
    failover_observed: bool
    failback_observed: bool
    rto_s: float | None
    """From the fault to the first acknowledged write that started after it."""
    longest_gap_s: float
    """The longest time without any acknowledged write, from the fault to failback."""
    failover_s: float | None
    """From the fault to the switch onto the fallback."""
    failback_s: float | None
    """From the restore to traffic back on the primary."""
    switches: int
    writes_attempted: int
    writes_acknowledged: int
    errors_surfaced: int
    errors_by_kind: dict[str, int]
    acked_on_primary: int
    missing_from_primary: int
    stranded_on_fallback: int
    """Acknowledged, missing from the primary, present on the fallback (expected until reconcile)."""
    lost: int
    """Acknowledged and on neither server."""
    missing_by_phase: dict[str, int]
    acked_by_phase: dict[str, int]
    unacknowledged_but_applied: int
    """Writes that raised (outcome unknown) but are found on a server."""
    transitions: list[dict[str, Any]]
    tuning: dict[str, Any]
    notes: list[str]
    missing_ids_sample: list[str] = field(default_factory=list)
    reconcile_enabled: bool = False
    """Whether the store captured writes on the fallback and reconciled them before failback."""
    reconcile_s: float | None = None
    """Time spent ``RECONCILING`` (from the first entry to failback)."""
    reconcile_applied: int = 0
    """Captured keys copied to the primary by the drill's reconcile runs."""
    reconcile_rate_per_s: float | None = None
    write_hold_s: float | None = None
    """How long new writes waited for the final catch-up of the run that failed back."""
    rpo_reported_s: float | None = None
    """The status's ``warm.rpo_at_last_failover_s`` for the (first) failover; None: warm sync off or not streaming."""
    missing_on_fallback_at_failover: int | None = None
    """Writes acknowledged by the primary before the fault and absent from the fallback right after the
    failover (read there directly); None: not measured (warm sync off or not streaming, or no failover)."""
    missing_max_age_s: float | None = None
    """Age at the fault (since its acknowledgement) of the oldest of those missing writes; 0 when none."""
    warm_heartbeat_interval_s: float | None = None
    """The status's ``warm.heartbeat_interval_s``: the resolution of the reported RPO."""
    fallback_read_after_failover_s: float | None = None
    """From the switch to the fallback to the end of the direct read of the fallback."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        """A human-readable summary."""

        def secs(value: float | None) -> str:
            return "not observed" if value is None else f"{value:.3f} s"

        lines = [
            f"drill: {self.store} / {self.fault} for {self.duration:g} s (run {self.run})",
            f"  completed:            {'yes' if self.completed else 'NO'}"
            f" (failover {'seen' if self.failover_observed else 'NOT seen'}, failback {'seen' if self.failback_observed else 'NOT seen'},"
            f" {self.switches} switch{'es' if self.switches != 1 else ''})",
            f"  RTO:                  {secs(self.rto_s)} (fault -> first acknowledged write after it)",
            f"  longest write gap:    {self.longest_gap_s:.3f} s",
            f"  failover after:       {secs(self.failover_s)}",
            f"  failback after:       {secs(self.failback_s)} (from restore; includes the failback delay)",
            f"  writes:               {self.writes_attempted} attempted, {self.writes_acknowledged} acknowledged",
            f"  errors surfaced:      {self.errors_surfaced}"
            + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.errors_by_kind.items()))})" if self.errors_by_kind else ""),
            f"  acknowledged writes missing from the primary after failback: {self.missing_from_primary}",
            f"    stranded on the fallback (not reconciled):         {self.stranded_on_fallback}",
            f"    lost (on neither server):                          {self.lost}",
            (
                f"  reconcile:            {secs(self.reconcile_s)} RECONCILING, {self.reconcile_applied} keys copied"
                + (f" ({self.reconcile_rate_per_s:.0f}/s)" if self.reconcile_rate_per_s else "")
                + f", writes held {secs(self.write_hold_s)}"
                if self.reconcile_enabled
                else "  reconcile:            off (FAILOVER_RECONCILE=false): outage writes stay on the fallback"
            ),
            "    missing/acknowledged by phase: " + ", ".join(f"{k} {self.missing_by_phase.get(k, 0)}/{v}" for k, v in self.acked_by_phase.items()),
            self._render_continuity(secs),
            f"  errored writes found applied anyway: {self.unacknowledged_but_applied}",
        ]
        for t in self.transitions:
            lines.append(f"  transition: {t['from']} -> {t['to']}: {t['reason']}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def _render_continuity(self, secs: Callable[[float | None], str]) -> str:
        rpo = f"warm sync reported RPO {secs(self.rpo_reported_s)}"
        if self.warm_heartbeat_interval_s is not None:
            rpo += f" (heartbeat every {self.warm_heartbeat_interval_s:g} s)"
        if self.missing_on_fallback_at_failover is None:
            return f"  fallback at failover: not measured (see the notes); {rpo}"
        oldest = f", oldest {secs(self.missing_max_age_s)} old at the fault" if self.missing_on_fallback_at_failover else ""
        return (
            f"  fallback at failover: {self.missing_on_fallback_at_failover} of {self.acked_by_phase.get('before_fault', 0)}"
            f" writes acknowledged before the fault missing{oldest}; {rpo};"
            f" read {secs(self.fallback_read_after_failover_s)} after the switch"
        )


# --- the drill -------------------------------------------------------------------------------


def settings_for(store: str, primary_url: str, fallback_url: str, tuning: dict[str, Any]) -> Settings:
    """Settings for *store* alone on these two URLs, *tuning* given by environment names.

    Every URL is set explicitly (no ``.env``, the other stores blank): a drill or
    benchmark must never reach a server of the environment (a real Supabase,
    say), only the local servers it drills. Tuning the caller does not give is
    read from the environment (``FAILOVER_PROBE_TIMEOUT``...).
    """
    urls: dict[str, str] = {name: "" for names in _ENV_BY_ROLE.values() for name in names}
    primary_env, fallback_env = _ENV_BY_ROLE[store]
    urls.update({primary_env: primary_url, fallback_env: fallback_url})
    if store == "mongodb":
        urls.update({"MONGODB_ATLAS_DATABASE": _MongoProbe.DATABASE, "MONGODB_DATABASE": _MongoProbe.DATABASE})
    return Settings(_env_file=None, **urls, **tuning)  # type: ignore[call-arg]



async def run_drill(
    store: str,
    fault: str,
    *,
    duration: float = DEFAULT_DURATION,
    data_dir: str | Path | None = None,
    workers: int = DEFAULT_WORKERS,
    warmup: float = DEFAULT_WARMUP,
    settle: float = DEFAULT_SETTLE,
    tuning: dict[str, Any] | None = None,
) -> DrillReport:
    """Run one drill and return its report (see the module docstring)."""
    if store not in STORES:
        raise ValueError(f"store must be one of {', '.join(STORES)}, not {store!r}")
    if fault not in FAULTS:
        raise ValueError(f"fault must be one of {', '.join(FAULTS)}, not {fault!r}")
    if duration <= 0:
        raise ValueError("duration must be greater than 0")
    tuning = {**DRILL_TUNING, **(tuning or {})}
    probe = _PROBES[store]()
    run = uuid.uuid4().hex[:10]
    async with _target(store, fault, Path(data_dir) if data_dir else None) as target:
        for url in (target.primary.url, target.fallback.url):
            await probe.prepare(url)
        settings = settings_for(store, target.primary_client_url, target.fallback.url, tuning)
        dbs = Databases(settings)
        marks: dict[str, float] = {}
        failed_over = asyncio.Event()

        reconciles: list[ReconcileCompleted] = []

        def on_event(event: Event) -> None:
            if isinstance(event, ReconcileCompleted) and event.store == store:
                reconciles.append(event)
            if not isinstance(event, StateChanged) or event.store != store:
                return
            now = time.monotonic()
            if event.to_state is SwitchState.RECONCILING:
                marks.setdefault("reconciling", now)
            if isinstance(event, FailoverStarted) or (
                isinstance(event, StoreRecovered) and event.to_state is SwitchState.ON_FALLBACK
            ):
                marks.setdefault("failover", now)
                failed_over.set()
            if event.to_state is SwitchState.ON_PRIMARY and "restored" in marks:
                marks.setdefault("failback", now)

        unsubscribe = dbs.subscribe(on_event)
        await dbs.start()
        switch = dbs.store(store)
        traffic: Traffic[str] = Traffic(lambda write_id: probe.write(dbs, run, write_id), workers, keys=write_ids)
        switches_before = switch.snapshot().counters["switches"]
        continuity: asyncio.Task[_FallbackAtFailover] | None = None
        try:
            if switch.state is not SwitchState.ON_PRIMARY:
                raise RuntimeError(f"{store} does not start on its primary ({switch.state}); is the primary up?")
            warm_off = await _wait_for_warm(switch, WARM_STREAMING_TIMEOUT)
            if warm_off is None:
                continuity = asyncio.create_task(_read_fallback_at_failover(switch, probe, target.fallback.url, run, failed_over, marks))
            else:
                target.notes.append(f"{warm_off}: the fallback's continuity at failover is not measured")
            traffic.start()
            await _pause(warmup)
            await _inject(target, fault, duration, marks)
            marks["restored"] = time.monotonic()
            if switch.state is SwitchState.ON_PRIMARY and "failover" in marks:
                marks.setdefault("failback", marks["restored"])
            deadline = time.monotonic() + FAILBACK_TIMEOUT + float(tuning.get("FAILOVER_FAILBACK_DELAY", 30))
            while "failback" not in marks and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await _pause(settle)
        finally:
            await traffic.stop()
            at_failover = await _finish(continuity, failed_over)
            switches = switch.snapshot().counters["switches"] - switches_before
            transitions = [t for t in reversed(dbs.store(store).status()["transitions"])]
            await dbs.close()
            unsubscribe()
        on_primary = await probe.ids_on(target.primary.url, run)
        on_fallback = await probe.ids_on(target.fallback.url, run)
        report = _report(store, fault, duration, run, traffic, marks, switches, transitions, on_primary, on_fallback, tuning, target.notes)
        report.reconcile_enabled = settings.reconcile and dbs.store(store).reconciler is not None
        if "reconciling" in marks and "failback" in marks:
            report.reconcile_s = marks["failback"] - marks["reconciling"]
        report.reconcile_applied = sum(e.applied for e in reconciles)
        busy = sum(e.duration for e in reconciles)
        report.reconcile_rate_per_s = report.reconcile_applied / busy if busy > 0 and report.reconcile_applied else None
        holds = [e.hold for e in reconciles if e.ok and e.hold is not None]
        report.write_hold_s = holds[-1] if holds else None
        if at_failover is not None:
            _add_continuity(report, traffic, marks, at_failover)
        elif continuity is not None:
            why = "its read failed (see the log)" if failed_over.is_set() else "no failover was seen"
            report.notes.append(f"the fallback's continuity at failover is not measured: {why}")
        if report.stranded_on_fallback and report.reconcile_enabled:
            report.notes.append(
                f"{report.stranded_on_fallback} acknowledged write(s) made on the fallback were not reconciled "
                "into the primary: that is a defect, please report it"
            )
        return report


@dataclass
class _FallbackAtFailover:
    """What the fallback held right after the (first) switch to it, and what warm sync said of it."""

    ids: set[str] | None
    """The drill's ids on the fallback; None when it could not be read."""
    read_after_s: float | None
    rpo_s: float | None
    heartbeat_interval_s: float | None
    notes: list[str] = field(default_factory=list)


async def _wait_for_warm(store: FailoverStore[Any], timeout: float) -> str | None:
    """Wait until *store*'s warm sync streams; None once it does, else why it does not."""
    deadline = time.monotonic() + timeout
    while True:
        warm = store.snapshot().warm
        if not warm.get("enabled"):
            return "warm sync is off (FAILOVER_WARM=off)"
        if warm.get("state") == "streaming" and warm.get("lag_s") is not None:
            return None
        if store.warm is not None and store.warm.unavailable:  # the servers refuse it: waiting will not help
            return f"warm sync is unavailable ({redact_text(store.warm.unavailable)})"
        if time.monotonic() >= deadline:
            why = warm.get("error") or warm.get("reason") or "no reason given"
            return f"warm sync did not stream within {timeout:g} s (state {warm.get('state')}: {redact_text(str(why))})"
        await asyncio.sleep(0.05)


async def _read_fallback_at_failover(
    store: FailoverStore[Any], probe: _StoreProbe, fallback_url: str, run: str, failed_over: asyncio.Event, marks: dict[str, float]
) -> _FallbackAtFailover:
    """Once the store switched to the fallback, read the drill's ids there, then the RPO warm sync reported.

    The read comes first and at once: the drill keeps writing to the fallback, and only what it
    held at the switch tells whether the writes the primary had acknowledged reached it.
    """
    await failed_over.wait()
    notes: list[str] = []
    ids: set[str] | None
    try:
        ids = await probe.ids_on(fallback_url, run)
        read_after = time.monotonic() - marks["failover"]
    except Exception as exc:  # reported, not raised: the drill itself goes on
        ids, read_after = None, None
        notes.append(f"the fallback could not be read right after the failover: {redact_text(str(exc))}")
    # The RPO is fixed once warm sync has stopped writing into the fallback (``final``).
    deadline = time.monotonic() + WARM_FINAL_TIMEOUT
    while True:
        warm = store.snapshot().warm
        final = bool((warm.get("last_failover") or {}).get("final"))
        if final or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.02)
    if not final:
        notes.append(f"warm sync had not stopped {WARM_FINAL_TIMEOUT:g} s after the failover: its RPO is provisional")
    return _FallbackAtFailover(ids, read_after, warm.get("rpo_at_last_failover_s"), warm.get("heartbeat_interval_s"), notes)


async def _finish(task: asyncio.Task[_FallbackAtFailover] | None, failed_over: asyncio.Event) -> _FallbackAtFailover | None:
    """The result of the continuity read; None when no failover came (or the read failed)."""
    if task is None:
        return None
    if failed_over.is_set():
        await asyncio.wait({task}, timeout=WARM_FINAL_TIMEOUT + 5)  # bounded: its own waits are
    if not task.done():
        task.cancel()  # no failover: traffic has stopped, none will come now
        await asyncio.wait({task})
        return None
    if task.cancelled():
        return None
    if (exc := task.exception()) is not None:
        logger.warning("reading the fallback at failover failed: %s", redact_text(str(exc)))
        return None
    return task.result()


def _add_continuity(report: DrillReport, traffic: Traffic[str], marks: dict[str, float], at_failover: _FallbackAtFailover) -> None:
    """Fill *report*'s continuity figures: the acknowledged-before-fault writes the fallback lacked at failover."""
    report.rpo_reported_s = at_failover.rpo_s
    report.warm_heartbeat_interval_s = at_failover.heartbeat_interval_s
    report.notes.extend(at_failover.notes)
    if at_failover.ids is None:
        return
    fault_at = marks["fault"]
    missing = [w for w in traffic.acked() if w.finished < fault_at and w.key not in at_failover.ids]
    report.missing_on_fallback_at_failover = len(missing)
    report.missing_max_age_s = max((fault_at - w.finished for w in missing), default=0.0)
    report.fallback_read_after_failover_s = at_failover.read_after_s


async def _pause(seconds: float) -> None:
    """Let traffic run for *seconds* (pacing the drill, not waiting for a condition)."""
    await asyncio.sleep(seconds)


async def _inject(target: _Target, fault: str, duration: float, marks: dict[str, float]) -> None:
    """Apply *fault* to the primary for *duration*; ``marks["fault"]`` is when it took effect."""
    if fault == "kill":
        marks["fault"] = await target.kill_primary()
        await _pause(duration)
        await target.start_primary()
    elif fault == "blackhole":
        assert target.proxy is not None
        target.proxy.drop()
        marks["fault"] = time.monotonic()
        await _pause(duration)
        target.proxy.pass_through()
    else:  # flap
        ends = time.monotonic() + duration
        while True:
            frozen = await target.kill_primary()
            marks.setdefault("fault", frozen)
            await _pause(FLAP_DOWN)
            await target.start_primary()
            if time.monotonic() + FLAP_UP + FLAP_DOWN >= ends:
                break
            await _pause(FLAP_UP)


def _report(
    store: str,
    fault: str,
    duration: float,
    run: str,
    traffic: Traffic[str],
    marks: dict[str, float],
    switches: int,
    transitions: list[dict[str, Any]],
    on_primary: set[str],
    on_fallback: set[str],
    tuning: dict[str, Any],
    notes: list[str],
) -> DrillReport:
    fault_at = marks["fault"]
    restored_at = marks.get("restored")
    failback_at = marks.get("failback")
    acked = traffic.acked()
    acked_ids = {w.key for w in acked}
    missing = acked_ids - on_primary
    stranded = missing & on_fallback
    lost = missing - on_fallback

    def phase(w: Outcome[str]) -> str:
        if w.finished < fault_at:
            return "before_fault"
        if failback_at is None or w.finished < failback_at:
            return "during_outage"
        return "after_failback"

    acked_by_phase: Counter[str] = Counter({"before_fault": 0, "during_outage": 0, "after_failback": 0})
    missing_by_phase: Counter[str] = Counter()
    for w in acked:
        acked_by_phase[phase(w)] += 1
        if w.key in missing:
            missing_by_phase[phase(w)] += 1
    failed = [w for w in traffic.outcomes if not w.ok]
    errors = Counter(w.error_kind or "error" for w in failed)
    applied_anyway = sum(1 for w in failed if w.key in on_primary or w.key in on_fallback)
    first = traffic.first_success_after(fault_at)
    gap_end = failback_at or (traffic.outcomes[-1].finished if traffic.outcomes else fault_at)
    note_list = list(notes)
    if lost:
        note_list.append(
            f"{len(lost)} acknowledged write(s) are on neither server: the server that acknowledged them did not keep them"
        )
    return DrillReport(
        store=store,
        fault=fault,
        duration=duration,
        run=run,
        completed="failback" in marks,
        failover_observed="failover" in marks,
        failback_observed="failback" in marks,
        rto_s=None if first is None else first - fault_at,
        longest_gap_s=traffic.longest_gap(fault_at, gap_end),
        failover_s=marks["failover"] - fault_at if "failover" in marks else None,
        failback_s=failback_at - restored_at if failback_at is not None and restored_at is not None else None,
        switches=switches,
        writes_attempted=len(traffic.outcomes),
        writes_acknowledged=len(acked),
        errors_surfaced=len(failed),
        errors_by_kind=dict(errors),
        acked_on_primary=len(acked_ids & on_primary),
        missing_from_primary=len(missing),
        stranded_on_fallback=len(stranded),
        lost=len(lost),
        missing_by_phase=dict(missing_by_phase),
        acked_by_phase=dict(acked_by_phase),
        unacknowledged_but_applied=applied_anyway,
        transitions=[{**t, "reason": redact_text(str(t.get("reason", "")))} for t in transitions],
        tuning=tuning,
        notes=note_list,
        missing_ids_sample=sorted(missing)[:10],
    )


# --- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``failover drill`` options to *parser*."""
    parser.add_argument("--store", required=True, choices=STORES, help="the store to drill")
    parser.add_argument("--fault", required=True, choices=FAULTS, help="what to do to the primary")
    parser.add_argument(
        "--duration", type=float, default=DEFAULT_DURATION, help=f"seconds the fault lasts (default {DEFAULT_DURATION:g})"
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("FAILOVER_LOCAL_DIR", ".failover-local"),
        help="directory of `failover local up` (its servers are used when running; default .failover-local)",
    )
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="concurrent writers (default 4)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.epilog = (
        "Timeouts and thresholds come from the environment (FAILOVER_PROBE_TIMEOUT, FAILOVER_OPERATION_TIMEOUT, ...); "
        f"the drill probes every {DRILL_TUNING['HEALTH_CHECK_INTERVAL']:g} s and fails back after "
        f"{DRILL_TUNING['FAILOVER_FAILBACK_DELAY']:g} s so that it ends in seconds."
    )


def main(args: argparse.Namespace) -> int:
    """Run the drill described by *args*; exit status 0 when it completed (failover and failback seen)."""
    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    try:
        report = asyncio.run(
            run_drill(args.store, args.fault, duration=args.duration, data_dir=args.data_dir, workers=args.workers)
        )
    except (RuntimeError, OSError) as exc:
        print(f"drill failed: {redact_text(str(exc))}")
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0 if report.completed and report.failover_observed else 1


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="failover drill", description=__doc__.split("\n")[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
