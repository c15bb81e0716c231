"""Immutable descriptions of endpoints and of what a probe saw."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .._urls import redact_url, url_hosts, url_secrets

__all__ = ["Role", "Endpoint", "ProbeResult", "display_name_for"]


class Role(enum.StrEnum):
    PRIMARY = "primary"
    FALLBACK = "fallback"

    @property
    def other(self) -> Role:
        return Role.FALLBACK if self is Role.PRIMARY else Role.PRIMARY


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One server of a store. ``url`` holds secrets and never appears in repr."""

    store: str
    role: Role
    name: str
    url: str = field(repr=False)
    options: tuple[tuple[str, str], ...] = ()

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings that must be scrubbed from any message about this endpoint."""
        return url_secrets(self.url)

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)

    def __str__(self) -> str:
        return f"{self.name} ({self.role}, {self.redacted_url})"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one probe of one endpoint.

    Attributes:
        role: which endpoint was probed.
        reachable: the server answered.
        writable: the server accepts writes (not a replica / read-only / in recovery).
        latency: seconds the probe took (None when it failed before an answer).
        error: why the probe failed, redacted; None when it succeeded.
        at: monotonic time the probe finished.
    """

    role: Role
    reachable: bool
    writable: bool
    latency: float | None
    error: str | None
    at: float

    @property
    def usable(self) -> bool:
        return self.reachable and self.writable


_CLOUD_NAMES = {
    "postgres": (("supabase.co", "Supabase"), ("supabase.com", "Supabase")),
    "mongodb": (("mongodb.net", "MongoDB Atlas"),),
    "redis": (("upstash.io", "Upstash"),),
}
_PRODUCT = {"postgres": "PostgreSQL", "mongodb": "MongoDB", "redis": "Redis"}


def display_name_for(store: str, role: Role, url: str) -> str:
    """Derive a display name: the cloud's name for a known cloud host, else
    ``Local PostgreSQL`` for the fallback and ``Primary PostgreSQL`` for the primary."""
    for host in url_hosts(url):
        for suffix, name in _CLOUD_NAMES.get(store, ()):
            if host == suffix or host.endswith("." + suffix):
                return name
    product = _PRODUCT.get(store, store)
    return f"Local {product}" if role is Role.FALLBACK else f"Primary {product}"
