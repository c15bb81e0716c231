"""Test helpers: fast settings, polling with deadlines, and the traffic generator (failover.local.traffic)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from failover import Settings
from failover.local.traffic import Outcome, Traffic

__all__ = ["FAST", "Outcome", "Traffic", "fast_settings", "wait_for"]

FAST = {
    "HEALTH_CHECK_INTERVAL": 0.2,
    "FAILOVER_PROBE_TIMEOUT": 0.5,
    "FAILOVER_CONNECT_TIMEOUT": 0.5,
    "FAILOVER_OPERATION_TIMEOUT": 2.0,
    "FAILOVER_UNHEALTHY_THRESHOLD": 2,
    "FAILOVER_HEALTHY_THRESHOLD": 2,
    "FAILOVER_FAILBACK_DELAY": 1.0,
}


def fast_settings(**values: Any) -> Settings:
    """Settings with short intervals for tests; *values* use the environment names."""
    merged = {**FAST, **values}
    return Settings(_env_file=None, **merged)  # type: ignore[call-arg]


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str = "condition") -> float:
    """Poll *predicate* until it is true; return the seconds it took. Fails after *timeout*."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout:g}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started
