"""Per-endpoint health: probe thresholds (anti-flap) and the circuit breaker fed by live traffic.

An endpoint's health changes only here:

* the first probe decides directly (no waiting for thresholds at start-up);
* a healthy endpoint becomes unhealthy after ``unhealthy_threshold`` failed probes
  in a row, or at once when live operations fail at the connection level
  ``breaker_threshold`` times in a row (the breaker *trips*);
* an unhealthy endpoint becomes healthy again only after ``healthy_threshold``
  good probes in a row. Live traffic never closes a tripped breaker: only probes
  do, so one lucky request cannot bounce traffic back to a flapping server.
"""

from __future__ import annotations

import logging

from .clock import Clock
from .endpoint import Endpoint, ProbeResult
from .events import BreakerTripped, EndpointHealthChanged, EventBus, ProbeCompleted

__all__ = ["EndpointHealth"]

logger = logging.getLogger("failover.health")


class EndpointHealth:
    """The health of one endpoint as seen by probes and live operations.

    Attributes:
        endpoint: the endpoint described.
        healthy: None before the first probe, then whether the switch may route to it.
        healthy_since: monotonic time it last became healthy (None when unhealthy).
        last_probe: the most recent probe result.
        tripped: the breaker opened since the last probe.
        reason: why the endpoint is in its current state, redacted.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        unhealthy_threshold: int,
        healthy_threshold: int,
        breaker_threshold: int,
        clock: Clock,
        bus: EventBus,
    ) -> None:
        if unhealthy_threshold < 1 or healthy_threshold < 1 or breaker_threshold < 1:
            raise ValueError("thresholds must be at least 1")
        self.endpoint = endpoint
        self.unhealthy_threshold = unhealthy_threshold
        self.healthy_threshold = healthy_threshold
        self.breaker_threshold = breaker_threshold
        self._clock = clock
        self._bus = bus
        self.healthy: bool | None = None
        self.healthy_since: float | None = None
        self.last_probe: ProbeResult | None = None
        self.tripped = False
        self.reason = "not probed yet"
        self.consecutive_probe_failures = 0
        self.consecutive_probe_successes = 0
        self.consecutive_operation_failures = 0

    @property
    def available(self) -> bool:
        """The last probe found the endpoint usable and no live failure contradicted it since."""
        return bool(self.last_probe and self.last_probe.usable and not self.tripped)

    def record_probe(self, result: ProbeResult) -> bool:
        """Account for a probe. Returns True when ``healthy`` changed."""
        self.last_probe = result
        ep = self.endpoint
        self._bus.emit(
            ProbeCompleted(
                store=ep.store,
                at=self._clock.wall(),
                role=ep.role,
                endpoint=ep.name,
                usable=result.usable,
                latency=result.latency,
                error=result.error,
            )
        )
        if result.usable:
            self.tripped = False
            self.consecutive_probe_failures = 0
            self.consecutive_probe_successes += 1
            if self.healthy is None or (
                not self.healthy and self.consecutive_probe_successes >= self.healthy_threshold
            ):
                n = self.consecutive_probe_successes
                return self._set(True, f"{n} good probe{'s' if n > 1 else ''} in a row")
            return False
        self.consecutive_probe_successes = 0
        self.consecutive_probe_failures += 1
        why = result.error or "not writable"
        if self.healthy is None or (
            self.healthy and self.consecutive_probe_failures >= self.unhealthy_threshold
        ):
            n = self.consecutive_probe_failures
            return self._set(False, f"{why} ({n} failed probe{'s' if n > 1 else ''})")
        if not self.healthy:
            self.reason = why
        return False

    def record_operation_failure(self, reason: str) -> bool:
        """A live operation failed at the connection level. Returns True when the breaker tripped."""
        self.consecutive_operation_failures += 1
        self.consecutive_probe_successes = 0
        if self.consecutive_operation_failures < self.breaker_threshold or self.tripped:
            return False
        self.tripped = True
        ep = self.endpoint
        logger.warning("breaker tripped for %s %s: %s", ep.store, ep.name, reason)
        self._bus.emit(
            BreakerTripped(
                store=ep.store,
                at=self._clock.wall(),
                role=ep.role,
                endpoint=ep.name,
                failures=self.consecutive_operation_failures,
                reason=reason,
            )
        )
        if self.healthy is not False:
            self._set(False, f"breaker tripped: {reason}")
        return True

    def record_operation_success(self) -> None:
        self.consecutive_operation_failures = 0

    def healthy_for(self) -> float:
        """Seconds the endpoint has been continuously healthy (0 when it is not)."""
        if not self.healthy or self.healthy_since is None:
            return 0.0
        return self._clock.monotonic() - self.healthy_since

    def _set(self, healthy: bool, reason: str) -> bool:
        changed = self.healthy is not healthy
        self.healthy = healthy
        self.reason = reason
        self.healthy_since = self._clock.monotonic() if healthy else None
        if not healthy:
            self.consecutive_operation_failures = 0
        if changed:
            ep = self.endpoint
            logger.info("%s %s is now %s: %s", ep.store, ep.name, "healthy" if healthy else "unhealthy", reason)
            self._bus.emit(
                EndpointHealthChanged(
                    store=ep.store,
                    at=self._clock.wall(),
                    role=ep.role,
                    endpoint=ep.name,
                    healthy=healthy,
                    reason=reason,
                )
            )
        return changed
