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
