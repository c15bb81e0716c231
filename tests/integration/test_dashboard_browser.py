"""The dashboard in real headless Chromium, driven over the DevTools protocol.

It loads the page from a real uvicorn server on embedded local servers (local
mode, token set), checks that it shows the three stores, that a primary killed
behind its back shows up within seconds, and that its own kill/start buttons
drive a failover and a failback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from failover.local import LocalStack
from failover.service import LocalControl, create_app
from tests.helpers import fast_settings, wait_for
from tests.integration.test_service import http_server

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "tok-browser-9"

STATE_JS = """JSON.stringify({
  cards: Array.from(document.querySelectorAll('section.store')).map(function (s) {
    var cur = s.querySelector('[data-field=current_db]');
    return {store: s.dataset.store, state: s.dataset.state, role: s.dataset.activeRole,
            current: cur ? cur.textContent : null,
            primaryUp: (s.querySelector('tr[data-role=primary]') || {dataset: {}}).dataset.available,
            latency: (s.querySelector('tr[data-role=primary] [data-field=latency]') || {}).textContent,
            transitions: s.querySelectorAll('table.transitions tr').length,
            buttons: s.querySelectorAll('button[data-action]').length};
  }),
  overall: document.getElementById('overall') ? document.getElementById('overall').dataset.overall : null,
  error: document.getElementById('error') ? document.getElementById('error').textContent : null,
  search: window.location.search,
  html: document.documentElement ? document.documentElement.outerHTML : ''
})"""


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._next = 0

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        ident = self._next
        await self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        async with asyncio.timeout(15):
            while True:
                message = json.loads(await self.ws.recv())
                if message.get("id") == ident:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return message["result"]  # type: ignore[no-any-return]

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[DevTools]:
    """Headless Chromium with remote debugging on a free port; yields a client of its first page."""
    assert Path(CHROMIUM).exists(), "Chromium is missing: apt-get install -y chromium"
    profile = Path(tempfile.mkdtemp(prefix="failover-chromium-"))
    process = subprocess.Popen(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank",
        ],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        await wait_for(lambda: port_file.exists() and len(port_file.read_text().splitlines()) >= 2, 30, "Chromium's DevTools port")
        port = int(port_file.read_text().splitlines()[0])
        async with httpx.AsyncClient(timeout=10) as client:
            targets: list[dict[str, Any]] = []
            for _ in range(200):
                targets = [t for t in (await client.get(f"http://127.0.0.1:{port}/json/list")).json() if t["type"] == "page"]
                if targets:
                    break
                await asyncio.sleep(0.05)
        assert targets, "Chromium opened no page"
        async with websockets.connect(targets[0]["webSocketDebuggerUrl"], max_size=None) as ws:
            yield DevTools(ws)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await asyncio.to_thread(process.wait, 30)
        shutil.rmtree(profile, ignore_errors=True)


async def page_state(page: DevTools) -> dict[str, Any]:
    return json.loads(await page.evaluate(STATE_JS))  # type: ignore[no-any-return]


async def wait_page(page: DevTools, predicate: Any, what: str, timeout: float = 10) -> dict[str, Any]:
    """Poll the page until *predicate(state)* holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    state: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        state = await page_state(page)
        if predicate(state):
            return state
        await asyncio.sleep(0.1)
    state.pop("html", None)
    raise AssertionError(f"the page did not show {what} within {timeout:g}s; last state: {state}")


def card(state: dict[str, Any], store: str) -> dict[str, Any]:
    return next(c for c in state["cards"] if c["store"] == store)


# What the page shows of reconcile: each card's block, the progress bar, the conflict list.
RECONCILE_JS = """JSON.stringify({
  cards: Array.from(document.querySelectorAll('section.store')).map(function (s) {
    var block = s.querySelector('[data-field=reconcile]');
    var bar = s.querySelector('[data-field=reconcile-progress] .bar');
    var text = s.querySelector('[data-field=reconcile-progress-text]');
    var last = s.querySelector('[data-field=reconcile-last-run]');
    return {store: s.dataset.store, state: s.dataset.state,
            badge: (s.querySelector('[data-field=state]') || {}).textContent,
            enabled: block ? block.dataset.enabled : null,
            backlog: (s.querySelector('[data-reconcile=backlog] b') || {}).textContent,
            conflicts: (s.querySelector('[data-reconcile=conflicts] b') || {}).textContent,
            bar: bar ? bar.style.width : null, progress: text ? text.textContent : null,
            lastRun: last ? last.textContent : null};
  }),
  conflicts: Array.from(document.querySelectorAll('#conflicts tbody tr')).map(function (r) {
    var key = r.querySelector('[data-field=conflict-key]');
    var res = r.querySelector('[data-field=conflict-resolution]');
    return {store: r.dataset.conflictStore || null, key: key ? key.textContent : null,
            resolution: res ? res.textContent : null, text: r.textContent};
  })
})"""


async def render_synthetic(page: DevTools, state: dict[str, Any]) -> dict[str, Any]:
    """Draw *state* with the page's own render() and read the result in the same script run,
    so no poll of the page can redraw in between."""
    script = f"window.failoverDashboard.render({json.dumps(state)}); {RECONCILE_JS}"
    return json.loads(await page.evaluate(script))  # type: ignore[no-any-return]


async def test_dashboard_shows_the_stores_and_follows_a_killed_primary(server_root: Path) -> None:
    stack = LocalStack(server_root / "dash")
    await asyncio.to_thread(stack.start)
    control = LocalControl(stack.base_dir, stack)
    try:
        settings = fast_settings(**stack.env(), FAILOVER_LOCAL_MODE=True, FAILOVER_HEALTH_TOKEN=TOKEN)
        app = create_app(settings, local=control)
        async with http_server(app) as url, chromium() as page:
            await page.send("Page.navigate", url=f"{url}/#token={TOKEN}")
            state = await wait_page(
                page, lambda s: len(s["cards"]) == 3 and s["overall"] == "healthy", "three healthy stores"
            )
            assert [c["store"] for c in state["cards"]] == ["postgres", "mongodb", "redis"]
            assert all(c["role"] == "primary" and c["state"] == "ON_PRIMARY" for c in state["cards"])
            assert card(state, "postgres")["current"] == "Primary PostgreSQL"
            assert all(c["primaryUp"] == "true" and c["latency"].endswith(" ms") for c in state["cards"])
            assert all(c["buttons"] == 5 for c in state["cards"])  # local mode: kill/hang/start primary, kill/start fallback
            assert state["error"] == ""
            assert TOKEN not in state["search"] and TOKEN not in state["html"]  # taken out of the address bar

            # Each card has its reconcile block (PostgreSQL's capture is on), and the page a conflict list.
            shown = json.loads(await page.evaluate(RECONCILE_JS))
            pg_card = next(c for c in shown["cards"] if c["store"] == "postgres")
            assert pg_card["enabled"] == "true" and pg_card["backlog"] == "0" and pg_card["conflicts"] == "0", pg_card
            assert pg_card["bar"] is None  # no run under way
            assert all(c["enabled"] in ("true", "false") for c in shown["cards"]), shown
            assert [c["text"] for c in shown["conflicts"]] == ["none recorded"]

            # A store in the middle of a reconcile, drawn from a state document shaped like the server's.
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
                live = (await client.get("/api/v1/dashboard/state")).json()
            postgres = live["status"]["postgres"]
            postgres["state"] = "RECONCILING"
            postgres["reconcile"].update(
                backlog=250, applied=750, conflicts=1, rate_per_s=5000.0, state="draining",
                last_run={"started_at": live["generated_at"], "duration_s": 0.2, "applied": 10, "conflicts": 0,
                          "hold_s": 0.004, "result": "completed", "gated": True},
            )  # fmt: skip
            live["reconcile_runs"] = {
                "postgres": {"started_at": live["generated_at"], "gated": True, "start_backlog": 1000, "backlog": 250, "done": 0.75}
            }
            live["conflicts"] = [{
                "store": "postgres", "key": "public.items[id=\"<b>x</b>\"]", "resolution": "fallback_kept",
                "at": live["generated_at"], "primary": {"name": "p"}, "fallback": {"name": "f"}, "detail": "policy fallback_wins",
            }]  # fmt: skip
            drawn = await render_synthetic(page, live)
            pg_card = next(c for c in drawn["cards"] if c["store"] == "postgres")
            assert pg_card["state"] == "RECONCILING" and pg_card["badge"] == "RECONCILING"
            assert pg_card["backlog"] == "250" and pg_card["conflicts"] == "1"
            assert pg_card["bar"] == "75%" and pg_card["progress"].startswith("copied 750 of 1000 (75%)"), pg_card
            assert "completed" in pg_card["lastRun"] and "writes held 4 ms" in pg_card["lastRun"], pg_card
            assert drawn["conflicts"] == [{
                "store": "postgres", "key": 'public.items[id="<b>x</b>"]', "resolution": "fallback_kept",
                "text": drawn["conflicts"][0]["text"],
            }]  # fmt: skip  (the key is text, never HTML)

            # A primary killed behind the dashboard's back shows up within seconds.
            await asyncio.to_thread(stack.server("redis", "primary").kill)
            state = await wait_page(
                page,
                lambda s: card(s, "redis")["role"] == "fallback" and card(s, "redis")["current"] == "Local Redis",
                "redis on its fallback",
            )
            assert card(state, "redis")["primaryUp"] == "false"
            assert state["overall"] == "degraded"
            assert card(state, "postgres")["role"] == "primary"

            # The page's own button kills the PostgreSQL primary ...
            await page.evaluate(
                "document.querySelector('button[data-store=postgres][data-role=primary][data-action=kill]').click()"
            )
            await wait_page(page, lambda s: card(s, "postgres")["role"] == "fallback", "postgres on its fallback")
            assert not stack.server("postgres", "primary").running
            # ... and its start button brings it back: failback after the delay.
            await page.evaluate(
                "document.querySelector('button[data-store=postgres][data-role=primary][data-action=start]').click()"
            )
            state = await wait_page(
                page, lambda s: card(s, "postgres")["role"] == "primary", "postgres back on its primary", timeout=20
            )
            assert stack.server("postgres", "primary").running
            assert card(state, "postgres")["transitions"] >= 3  # started, failover, failback
            assert TOKEN not in state["html"]
    finally:
        await asyncio.to_thread(control.shutdown)
