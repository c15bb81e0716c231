"""The live dashboard: a static page, the state it polls, and the local-mode buttons.

The page (``static/index.html`` + ``dashboard.js``, no build step) polls
``GET /api/v1/dashboard/state`` every second and draws, per store, the endpoint
in use, each endpoint's health and probe latency, recent transitions and
counters. The state is ``Databases.status()`` plus recent events, so the page
shows exactly what the health endpoint and metrics say.

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

from ..core.events import ProbeCompleted
from .auth import require_token
from .deps import get_databases
from .local_control import ACTIONS, LocalControl

__all__ = ["dashboard_router", "STATIC_DIR", "get_local_control"]

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


@dashboard_router.get("/api/v1/dashboard/state", dependencies=[Depends(require_token)])
async def dashboard_state(request: Request) -> JSONResponse:
    """Everything the page draws, in one document."""
    dbs = get_databases(request)
    control = get_local_control(request)
    events = [e.to_dict() for e in list(dbs.events.recent)[-50:] if not isinstance(e, ProbeCompleted)]
    body: dict[str, Any] = {
        "generated_at": time.time(),
        "status": dbs.status(),
        "events": list(reversed(events)),
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
