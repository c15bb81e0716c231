"""What a store looks like at one moment: the frozen document every reader reads.

Status, ``/readyz``, metrics, the dashboard and the start-up log read a
:class:`StoreSnapshot` built by :meth:`FailoverStore.snapshot
<failover.core.store.FailoverStore.snapshot>`, never the switch, the health
objects or the counters themselves (PyMongo's ``ServerDescription`` is the model):
a reader cannot change the store, and what it reads is consistent, taken at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .endpoint import Role
from .events import SwitchState
from .health import EndpointHealth
from .switch import Transition

__all__ = ["EndpointSnapshot", "StoreSnapshot"]


@dataclass(frozen=True, slots=True)
class EndpointSnapshot:
    """One endpoint of a store as its health saw it."""

    role: Role
    name: str
    url: str
    """Redacted: no password."""
    healthy: bool | None
    """None before the first probe; the switch routes to it only when True."""
    available: bool
    """Its last probe found it usable and no live failure contradicted it since."""
    breaker_open: bool
    reason: str
    probe_latency_s: float | None
    last_probe_at: float | None
    """Monotonic time of the last probe."""
    last_error: str | None

    @classmethod
    def of(cls, health: EndpointHealth) -> EndpointSnapshot:
        probe = health.last_probe
        return cls(
            role=health.endpoint.role,
            name=health.endpoint.name,
            url=health.endpoint.redacted_url,
            healthy=health.healthy,
            available=health.available,
            breaker_open=health.tripped,
            reason=health.reason,
            probe_latency_s=probe.latency if probe else None,
            last_probe_at=probe.at if probe else None,
            last_error=probe.error if probe else None,
        )

    def to_dict(self, now: float) -> dict[str, Any]:
        """The status document's entry for this endpoint (*now*: the same monotonic clock)."""
        return {
            "name": self.name,
            "url": self.url,
            "healthy": self.healthy,
            "available": self.available,
            "breaker_open": self.breaker_open,
            "reason": self.reason,
            "probe_latency_ms": round(self.probe_latency_s * 1000, 2) if self.probe_latency_s is not None else None,
            "last_probe_age_s": round(now - self.last_probe_at, 2) if self.last_probe_at is not None else None,
            "last_error": self.last_error,
        }


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """One store at one moment: switch state, endpoints, counters, history, reconcile and warm sync."""

    store: str
    taken_at: float
    """Monotonic time the snapshot was taken (ages are measured from it)."""
    state: SwitchState
    active_role: Role | None
    """Where traffic goes; None when the store is unavailable."""
    preferred_role: Role
    """Where traffic goes when all is well: the primary when configured."""
    pinned: Role | None
    endpoints: Mapping[Role, EndpointSnapshot]
    counters: Mapping[str, int]
    """``operations``, ``retries``, ``errors`` and ``switches`` since the store was built."""
    transitions: tuple[Transition, ...]
    """Newest first."""
    reconcile: Mapping[str, Any]
    warm: Mapping[str, Any]

    @property
    def available(self) -> bool:
        """Some endpoint serves traffic."""
        return self.active_role is not None

    @property
    def on_preferred(self) -> bool:
        """The store runs where it should when all is well."""
        return self.active_role is self.preferred_role and self.state is not SwitchState.RECONCILING

    @property
    def active_endpoint(self) -> EndpointSnapshot | None:
        return self.endpoints.get(self.active_role) if self.active_role is not None else None

    def why_unavailable(self) -> str:
        """Each endpoint's reason, for a store that has none to serve from."""
        return "; ".join(f"{e.name}: {e.reason}" for e in self.endpoints.values())

    def to_status(self) -> dict[str, Any]:
        """The seed-shaped status of the store, with details under extra keys."""
        primary = self.endpoints.get(Role.PRIMARY)
        fallback = self.endpoints.get(Role.FALLBACK)
        active = self.active_endpoint
        return {
            "using_primary": self.active_role is Role.PRIMARY,
            "primary_available": bool(primary and primary.available),
            "fallback_available": bool(fallback and fallback.available),
            "primary_healthy": bool(primary and primary.healthy),
            "current_db": active.name if active is not None else None,
            "state": str(self.state),
            "active_role": str(self.active_role) if self.active_role else None,
            "pinned": str(self.pinned) if self.pinned else None,
            "endpoints": {str(role): e.to_dict(self.taken_at) for role, e in self.endpoints.items()},
            "transitions": [t.to_dict() for t in self.transitions],
            "counters": dict(self.counters),
            "reconcile": dict(self.reconcile),
            "warm": dict(self.warm),
        }


def frozen(mapping: Mapping[Any, Any]) -> Mapping[Any, Any]:
    """A read-only copy of *mapping*."""
    return MappingProxyType(dict(mapping))
