"""The live dashboard: a static page, the state it polls, and the local-mode buttons.

The page (``static/index.html`` + ``dashboard.js``, no build step) polls
``GET /api/v1/dashboard/state`` every second and draws, per store, the endpoint
in use, each endpoint's health and probe latency, recent transitions and
counters, the reconcile block (backlog, applied, conflicts, rate, last run, and
a bar while a run drains the backlog) and the last conflicts. The state is
``Databases.status()`` plus recent events and conflicts, so the page shows
exactly what the health endpoint, ``/api/v1/conflicts`` and metrics say.

In local mode (``FAILOVER_LOCAL_MODE``, set by ``failover local up --serve``)
``POST /api/v1/local/{store}/{role}/{action}`` kills (SIGKILL), hangs
(SIGSTOP) or starts the embedded servers, for demos. Outside local mode those
routes answer 404 and the page shows no buttons.

Every API route needs the health token when one is set. The page and its static
assets carry no data and stay open; the page is opened as ``/#token=...`` and its
script sends the token as a header (a URL fragment never reaches a server or a
log). Local actions also need the ``X-Failover-Action: 1`` header, which a
foreign web page cannot add without a CORS preflight.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse

from ..core.events import Event, ProbeCompleted, ReconcileCompleted, ReconcileStarted
from ..databases import Databases
from .auth import require_token
from .conflicts import recent_conflicts
from .deps import get_databases
from .local_control import ACTIONS, LocalControl

__all__ = ["dashboard_router", "STATIC_DIR", "get_local_control", "reconcile_runs"]

STATIC_DIR = Path(__file__).parent / "static"
STATE_LOCAL = "failover_local"

dashboard_router = APIRouter(tags=["dashboard"])

_NO_STORE = {"Cache-Control": "no-store"}


def get_local_control(request: Request) -> LocalControl | None:
    """The app's local-stack control, or None outside local mode."""
    control = getattr(request.app.state, STATE_LOCAL, None)
    if control is None or not get_databases(request).settings.local_mode:
        return None
    return control  # type: ignore[no-any-return]


# The page is static code with no data in it: it needs no token. Its script reads a token
# from the URL *fragment* (``/#token=...``), which browsers never send to a server, so the
# token cannot land in access logs or proxies.
@dashboard_router.get("/", include_in_schema=False)
async def dashboard_page() -> FileResponse:
    """The dashboard page."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_NO_STORE)


def reconcile_runs(dbs: Databases, events: list[Event] | None = None) -> dict[str, dict[str, Any]]:
    """The reconcile run under way in each store, for the page's progress bar.

    ``start_backlog`` is the backlog when the run started (its ``ReconcileStarted``
    event), ``backlog`` the one read last; ``done`` is the fraction copied so far,
    against the larger of the two (writes keep arriving while a run drains).
    """
    recent = list(dbs.events.recent) if events is None else events
    runs: dict[str, dict[str, Any]] = {}
    for name, store in dbs.stores.items():
        reconcile = store.snapshot().reconcile
        if not reconcile.get("running"):
            continue
        started = None
        for event in reversed(recent):
            if event.store != name:
                continue
            if isinstance(event, ReconcileCompleted):
                break
            if isinstance(event, ReconcileStarted):
                started = event
                break
        if started is None:
            continue  # waiting for the pair's lock, or the event is out of the history
        backlog = reconcile.get("backlog") or 0
        total = max(started.backlog, backlog)
        runs[name] = {
            "started_at": started.at,
            "gated": started.gated,
            "start_backlog": started.backlog,
            "backlog": backlog,
            "done": round(1.0 - backlog / total, 4) if total else 1.0,
        }
    return runs


@dashboard_router.get("/api/v1/dashboard/state", dependencies=[Depends(require_token)])
async def dashboard_state(request: Request) -> JSONResponse:
    """Everything the page draws, in one document."""
    dbs = get_databases(request)
    control = get_local_control(request)
    recent = list(dbs.events.recent)
    events = [e.to_dict() for e in recent[-50:] if not isinstance(e, ProbeCompleted)]
    conflicts = await recent_conflicts(request).get(dbs)
    body: dict[str, Any] = {
        "generated_at": time.time(),
        "status": dbs.status(),
        "events": list(reversed(events)),
        "reconcile_runs": reconcile_runs(dbs, recent),
        "conflicts": conflicts,
        "local_mode": control is not None,
        "local": await run_in_threadpool(control.describe) if control is not None else [],
    }
    return JSONResponse(body, headers=_NO_STORE)


ACTION_HEADER = "X-Failover-Action"
"""Header the dashboard sends with its buttons. Another site cannot add it to a cross-origin
request without a CORS preflight, which this app never grants: no drive-by SIGKILL."""


@dashboard_router.post("/api/v1/local/{store}/{role}/{action}", dependencies=[Depends(require_token)])
def local_action(request: Request, store: str, role: str, action: str) -> JSONResponse:
    """Kill (SIGKILL), stop (SIGSTOP) or start one embedded server. Local mode only."""
    if request.headers.get(ACTION_HEADER) != "1":
        raise HTTPException(403, detail=f"local actions need the {ACTION_HEADER}: 1 header (sent by the dashboard)")
    control = get_local_control(request)
    if control is None:
        raise HTTPException(404, detail="local mode is off: start the service with `failover local up --serve`")
    if action not in ACTIONS:
        raise HTTPException(404, detail=f"unknown action; expected one of {', '.join(ACTIONS)}")
    try:
        server = control.act(action, store, role)
    except ValueError as exc:
        raise HTTPException(400, detail=str(exc)) from None
    return JSONResponse({"action": action, "server": server}, headers=_NO_STORE)
