"""Prometheus metrics of one :class:`~failover.Databases`, in a registry of its own.

Two sources feed them:

* events (``ProbeCompleted``, ``StateChanged``, ``OperationRetried``,
  ``BreakerTripped``, ``ReconcileCompleted``, ``ConflictResolved``) become
  histograms and counters as they happen, so a failover that came and went
  between two scrapes is still counted;
* the current state (active role, endpoint health, the stores' operation
  counters, the reconcile backlog and applied count, warm sync) is read from each
  store's :meth:`~failover.core.store.FailoverStore.snapshot` at scrape time by a
  custom collector, so it can never drift from what ``/api/v1/health/databases`` says.

Each app gets its own ``CollectorRegistry`` (never the global one): two apps in
one process, as in the test suite, do not collide. Label values are bounded:
failovers and failbacks are counted by the switch's own
:class:`~failover.core.events.TransitionCause`, never by parsing the free-text reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..core.events import (
    BreakerTripped,
    ConflictResolved,
    Event,
    FailbackCompleted,
    FailoverStarted,
    OperationRetried,
    ProbeCompleted,
    ReconcileCompleted,
    StateChanged,
    SwitchState,
)

if TYPE_CHECKING:
    from ..databases import Databases

__all__ = ["FailoverMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DEFAULT_PROBE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A reconcile run drains an outage's backlog: from milliseconds to many minutes.
DEFAULT_RECONCILE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# The final catch-up holds writes for at most FAILOVER_RECONCILE_HOLD (default 2 s).
DEFAULT_HOLD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
# Conflict resolutions (core.reconcile.Resolution); anything else is counted as "other".
_RESOLUTIONS = frozenset({"fallback_kept", "primary_kept"})

class _StatusCollector(Collector):
    """Reads the live state of every store at scrape time."""

    def __init__(self, databases: Databases) -> None:
        self._databases = databases

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "failover_active_role", "1 for the role currently serving each store, else 0", labels=["store", "role"]
        )
        state = GaugeMetricFamily("failover_store_state", "1 for the switch state of each store", labels=["store", "state"])
        up = GaugeMetricFamily(
            "failover_endpoint_up",
            "1 when the endpoint's last probe found it usable and no live failure contradicted it",
            labels=["store", "role", "endpoint"],
        )
        healthy = GaugeMetricFamily(
            "failover_endpoint_healthy", "1 when the switch may route to the endpoint", labels=["store", "role", "endpoint"]
        )
        operations = CounterMetricFamily("failover_operations", "routed operations started", labels=["store"])
        errors = CounterMetricFamily("failover_operation_errors", "routed operations that raised", labels=["store"])
        retries = CounterMetricFamily(
            "failover_operation_retries", "routed operations retried on the other endpoint", labels=["store"]
        )
        switches = CounterMetricFamily("failover_switches", "moves of the active endpoint", labels=["store"])
        backlog = GaugeMetricFamily(
            "failover_reconcile_backlog",
            "captured writes on the fallback waiting to be copied to the primary (as last read)",
            labels=["store"],
        )
        applied = CounterMetricFamily(
            "failover_reconcile_applied", "captured writes copied to the primary by this process", labels=["store"]
        )
        unprotected = GaugeMetricFamily(
            "failover_reconcile_unprotected_tables",
            "tables whose writes on the fallback cannot be reconciled (no primary key)",
            labels=["store"],
        )
        warm_lag = GaugeMetricFamily(
            "failover_warm_lag_seconds",
            "how far the fallback trails the primary, measured by heartbeat (absent while unknown)",
            labels=["store"],
        )
        warm_state = GaugeMetricFamily(
            "failover_warm_state", "1 for the warm sync state of each store", labels=["store", "state"]
        )
        for name, store in self._databases.stores.items():
            snap = store.snapshot()
            for candidate in store.endpoints:
                active.add_metric([name, str(candidate)], 1.0 if candidate is snap.active_role else 0.0)
            for each in SwitchState:
                state.add_metric([name, str(each)], 1.0 if snap.state is each else 0.0)
            for r, endpoint in snap.endpoints.items():
                labels = [name, str(r), endpoint.name]
                up.add_metric(labels, 1.0 if endpoint.available else 0.0)
                healthy.add_metric(labels, 1.0 if endpoint.healthy else 0.0)
            counters = snap.counters
            operations.add_metric([name], float(counters.get("operations", 0)))
            errors.add_metric([name], float(counters.get("errors", 0)))
            retries.add_metric([name], float(counters.get("retries", 0)))
            switches.add_metric([name], float(counters.get("switches", 0)))
            reconcile = snap.reconcile
            if reconcile.get("enabled"):
                if reconcile.get("backlog") is not None:  # None: not read yet (fallback down since start)
                    backlog.add_metric([name], float(reconcile["backlog"]))
                applied.add_metric([name], float(reconcile.get("applied") or 0))
                if isinstance(reconcile.get("unprotected_tables"), list):
                    unprotected.add_metric([name], float(len(reconcile["unprotected_tables"])))
            warm = snap.warm
            if warm.get("enabled"):
                if warm.get("lag_s") is not None:
                    warm_lag.add_metric([name], float(warm["lag_s"]))
                for phase in ("copying", "streaming", "off", "broken"):
                    warm_state.add_metric([name, phase], 1.0 if warm.get("state") == phase else 0.0)
        yield from (
            active, state, up, healthy, operations, errors, retries, switches, backlog, applied, unprotected,
            warm_lag, warm_state,
        )  # fmt: skip


class FailoverMetrics:
    """The metrics of one app. :meth:`attach` binds them to a :class:`Databases`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.probe_latency = Histogram(
            "failover_probe_latency_seconds",
            "duration of successful probes",
            ["store", "role"],
            buckets=DEFAULT_PROBE_BUCKETS,
            registry=self.registry,
        )
        self.probe_failures = Counter(
            "failover_probe_failures", "probes that found the endpoint unusable", ["store", "role"], registry=self.registry
        )
        self.transitions = Counter(
            "failover_transitions", "switch state changes", ["store", "from_state", "to_state"], registry=self.registry
        )
        self.failovers = Counter(
            "failover_failovers", "moves from the primary to the fallback, by cause", ["store", "cause"], registry=self.registry
        )
        self.failbacks = Counter(
            "failover_failbacks", "returns from the fallback to the primary, by cause", ["store", "cause"], registry=self.registry
        )
        self.retried = Counter(
            "failover_retries_by_role",
            "operations retried elsewhere, by the role that failed them",
            ["store", "from_role", "to_role"],
            registry=self.registry,
        )
        self.breaker_trips = Counter(
            "failover_breaker_trips", "circuit breaker trips on live traffic", ["store", "role"], registry=self.registry
        )
        self.reconcile_runs = Counter(
            "failover_reconcile_runs",
            "reconcile runs that ended, by result (ok: every captured write reached the primary)",
            ["store", "result"],
            registry=self.registry,
        )
        self.reconcile_duration = Histogram(
            "failover_reconcile_duration_seconds",
            "duration of reconcile runs, by result",
            ["store", "result"],
            buckets=DEFAULT_RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_hold = Histogram(
            "failover_reconcile_hold_seconds",
            "how long the final catch-up of a reconcile held the store's new operations",
            ["store"],
            buckets=DEFAULT_HOLD_BUCKETS,
            registry=self.registry,
        )
        self.conflicts = Counter(
            "failover_reconcile_conflicts",
            "keys changed on both sides, by the version the conflict policy kept",
            ["store", "resolution"],
            registry=self.registry,
        )
        self._collector: _StatusCollector | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def attach(self, databases: Databases) -> None:
        """Count *databases*' events and expose its live state. Call before ``start()``
        so the first probes are counted too."""
        self.detach()
        self._unsubscribe = databases.subscribe(self.on_event)
        self._collector = _StatusCollector(databases)
        self.registry.register(self._collector)

    def detach(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._collector is not None:
            self.registry.unregister(self._collector)
            self._collector = None

    def on_event(self, event: Event) -> None:
        """Event listener (synchronous, cheap)."""
        if isinstance(event, ProbeCompleted):
            role = str(event.role)
            if event.usable and event.latency is not None:
                self.probe_latency.labels(event.store, role).observe(event.latency)
            else:
                self.probe_failures.labels(event.store, role).inc()
        elif isinstance(event, StateChanged):
            self.transitions.labels(event.store, str(event.from_state), str(event.to_state)).inc()
            if isinstance(event, FailoverStarted):
                self.failovers.labels(event.store, str(event.cause)).inc()
            elif isinstance(event, FailbackCompleted):
                self.failbacks.labels(event.store, str(event.cause)).inc()
        elif isinstance(event, OperationRetried):
            self.retried.labels(event.store, str(event.from_role), str(event.to_role)).inc()
        elif isinstance(event, BreakerTripped):
            self.breaker_trips.labels(event.store, str(event.role)).inc()
        elif isinstance(event, ReconcileCompleted):
            result = "ok" if event.ok else "failed"
            self.reconcile_runs.labels(event.store, result).inc()
            self.reconcile_duration.labels(event.store, result).observe(event.duration)
            if event.hold is not None:
                self.reconcile_hold.labels(event.store).observe(event.hold)
        elif isinstance(event, ConflictResolved):
            resolution = event.resolution if event.resolution in _RESOLUTIONS else "other"
            self.conflicts.labels(event.store, resolution).inc()

    def render(self) -> bytes:
        """The exposition text of every metric."""
        return generate_latest(self.registry)

