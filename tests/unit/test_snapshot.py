"""The frozen store snapshot that status, readiness, metrics and the dashboard read (fake clock, no servers)."""

from __future__ import annotations

import dataclasses

import pytest

from failover.core.endpoint import Endpoint, Role
from failover.core.events import SwitchState, TransitionCause

from .test_router import NotSent, started_store


async def test_snapshot_is_frozen_and_says_what_status_says() -> None:
    store, backend = await started_store()
    try:
        snap = store.snapshot()
        assert snap.state is SwitchState.ON_PRIMARY and snap.active_role is Role.PRIMARY and snap.on_preferred
        assert snap.available and snap.active_endpoint is not None and snap.active_endpoint.name == "Supabase"
        assert snap.endpoints[Role.PRIMARY].url == "postgresql://u:***@db.x.supabase.co/db"
        assert snap.transitions[0].cause is TransitionCause.STARTED
        assert snap.to_status() == store.status()
        with pytest.raises(dataclasses.FrozenInstanceError):
            snap.state = SwitchState.UNAVAILABLE  # type: ignore[misc]
        with pytest.raises(TypeError):
            snap.counters["errors"] = 1  # type: ignore[index]
        with pytest.raises(TypeError):
            snap.endpoints[Role.FALLBACK] = snap.endpoints[Role.PRIMARY]  # type: ignore[index]

        async def op(endpoint: Endpoint) -> str:
            if endpoint.role is Role.PRIMARY:
                raise NotSent("refused")
            return "ok"

        assert await store.run(op, label="insert") == "ok"
        # The old snapshot did not move with the store; a new one shows the failover and its cause.
        assert snap.state is SwitchState.ON_PRIMARY and snap.counters["retries"] == 0
        now = store.snapshot()
        assert now.state is SwitchState.ON_FALLBACK and not now.on_preferred
        assert now.counters["retries"] == 1 and now.counters["switches"] == 1
        assert now.endpoints[Role.PRIMARY].breaker_open
        assert now.transitions[0].cause is TransitionCause.BREAKER_TRIPPED
        assert store.status()["transitions"][0]["cause"] == "breaker_tripped"
    finally:
        await store.close()
