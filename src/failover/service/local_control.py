"""Kill, hang and start the servers of a ``failover local`` stack, from any process.

The stack that ``failover local up`` started records each server's port and pid
in ``stack.json``. Two kinds of callers act on those servers:

* the process that started them (``failover local up --serve`` and its
  dashboard buttons) holds the :class:`~failover.local.LocalStack` and its
  ``Popen`` objects;
* another process (``failover local kill postgres primary`` in a second
  terminal) only has ``stack.json``.

:class:`LocalControl` serves both: it prefers the live ``LocalServer`` object and
falls back to the recorded pid, checking ``/proc/<pid>/cmdline`` names the
server's data directory before signalling, so a recycled pid is never hit.
Every method blocks (it waits for processes to die or to serve); call it from
a thread in async code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ..local.servers import LocalServer, pid_alive, process_tree
from ..local.stack import ROLES, LocalStack, update_state

__all__ = ["LocalControl", "ACTIONS"]

logger = logging.getLogger("failover.local")

ACTIONS = ("kill", "stop", "start")
"""``kill``: SIGKILL (a crash). ``stop``: SIGSTOP (a hung server). ``start``: start it again, or SIGCONT it."""


class LocalControl:
    """Control of the servers of the local stack in *base_dir*.

    Args:
        base_dir: the stack's data directory (holds ``stack.json``).
        stack: the live stack when this process started it, else None.
    """

    def __init__(self, base_dir: str | Path, stack: LocalStack | None = None) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.stack = stack if stack is not None else LocalStack(self.base_dir)
        self._owned = stack is not None
        self._lock = threading.Lock()

    # --- state ------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.base_dir / "stack.json"

    def _read_state(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self.state_file.read_text())  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError):
            return {}

    def record(self, store: str, role: str, pid: int | None) -> None:
        """Write *pid* (None: not running) for one server into ``stack.json``."""
        server = self.stack.server(store, role)
        update_state(self.state_file, {f"{store}.{role}": {"port": server.port, "pid": pid}})

    def record_all(self) -> None:
        """Write the pid and port of every server of the live stack."""
        for (store, role), server in self.stack.servers.items():
            self.record(store, role, server.pid if server.running else None)

    def _recorded_pid(self, store: str, role: str) -> int | None:
        pid = self._read_state().get(f"{store}.{role}", {}).get("pid")
        if not isinstance(pid, int) or not pid_alive(pid) or not self._is_server(pid, self.stack.server(store, role)):
            return None
        return pid

    @staticmethod
    def _is_server(pid: int, server: LocalServer) -> bool:
        return server.owns(pid)

    def _pid(self, store: str, role: str) -> int | None:
        server = self.stack.server(store, role)
        if server.running and server.pid is not None:
            return server.pid
        return self._recorded_pid(store, role)

    @staticmethod
    def _paused(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "T"
        except (OSError, IndexError):
            return False

    def describe(self) -> list[dict[str, Any]]:
        """One entry per server: store, role, port, pid and ``running``/``paused``/``stopped``."""
        entries = []
        for (store, role), server in self.stack.servers.items():
            pid = self._pid(store, role)
            state = "stopped" if pid is None else "paused" if self._paused(pid) else "running"
            entries.append({"store": store, "role": role, "port": server.port, "pid": pid, "state": state})
        return entries

    def any_running(self) -> bool:
        return any(entry["pid"] is not None for entry in self.describe())

    # --- actions ----------------------------------------------------------------------

    def act(self, action: str, store: str, role: str) -> dict[str, Any]:
        """Apply *action* (``kill``, ``stop`` or ``start``) to one server; return its new description."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}: expected one of {', '.join(ACTIONS)}")
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
        self.stack.server(store, role)  # raises ValueError for an unknown store
        with self._lock:
            getattr(self, f"_{action}")(store, role)
        logger.info("local %s %s: %s done", store, role, action)
        return next(e for e in self.describe() if e["store"] == store and e["role"] == role)

    def kill(self, store: str, role: str) -> dict[str, Any]:
        return self.act("kill", store, role)

    def stop(self, store: str, role: str) -> dict[str, Any]:
        return self.act("stop", store, role)

    def start(self, store: str, role: str) -> dict[str, Any]:
        return self.act("start", store, role)

    def _kill(self, store: str, role: str) -> None:
        server = self.stack.server(store, role)
        if server.running:
            server.kill()
        pid = self._recorded_pid(store, role)
        if pid is not None:
            _signal_tree(pid, signal.SIGKILL, freeze=True)
            _wait_dead(pid, timeout=10.0)
        self.record(store, role, None)

    def _stop(self, store: str, role: str) -> None:
        server = self.stack.server(store, role)
        if server.running:
            server.pause()
            return
        pid = self._recorded_pid(store, role)
        if pid is None:
            raise ValueError(f"local {store} {role} is not running")
        _signal_tree(pid, signal.SIGSTOP)

    def _start(self, store: str, role: str) -> None:
        server = self.stack.server(store, role)
        if server.running:
            if server.paused or (server.pid is not None and self._paused(server.pid)):
                server.resume()
            return
        pid = self._recorded_pid(store, role)
        if pid is not None:
            _signal_tree(pid, signal.SIGCONT)
            return
        server.start()
        self.record(store, role, server.pid)

    def shutdown(self, timeout: float = 10.0, only: set[tuple[str, str]] | None = None) -> None:
        """Stop the servers of the stack cleanly (SIGKILL after *timeout*) and wait until they are gone.

        *only* limits it to those ``(store, role)`` keys; servers this process
        spawned itself are always stopped, so none outlives it by accident.
        """
        with self._lock:
            stopping: list[tuple[str, str, LocalServer, int, list[int]]] = []
            for (store, role), server in self.stack.servers.items():
                if only is not None and (store, role) not in only and not server.running:
                    continue
                pid = self._pid(store, role)
                if pid is None:
                    continue
                pids = process_tree(pid)
                # A paused server cannot act on SIGTERM: wake it first.
                _signal_tree(pid, signal.SIGCONT, pids=pids)
                # PostgreSQL's SIGTERM waits for clients to leave; SIGINT is its fast shutdown.
                _signal_tree(pid, signal.SIGINT if store == "postgres" else signal.SIGTERM, pids=pids)
                stopping.append((store, role, server, pid, pids))
            # Every server was asked at once; now wait for each, killing the slow ones.
            deadline = time.monotonic() + timeout
            for store, role, server, pid, pids in stopping:
                if not _wait_dead(pid, max(0.0, deadline - time.monotonic()), pids, reap=server):
                    logger.warning("local %s %s did not stop within %gs: killing it", store, role, timeout)
                    _signal_tree(pid, signal.SIGKILL, freeze=True, pids=pids)
                    _wait_dead(pid, 10.0, pids, reap=server)
                if server.process is not None and server.process.poll() is not None:
                    server.process = None
                self.record(store, role, None)

def _signal_tree(pid: int, sig: signal.Signals, *, freeze: bool = False, pids: list[int] | None = None) -> None:
    """Send *sig* to the process group led by *pid* and every descendant."""
    pids = pids if pids is not None else process_tree(pid)
    if freeze:
        _signal_tree(pid, signal.SIGSTOP, pids=pids)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for each in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(each, sig)


def _wait_dead(pid: int, timeout: float, pids: list[int] | None = None, reap: LocalServer | None = None) -> bool:
    """Wait until *pid* (and *pids*) are gone; True when they are."""
    pids = pids or [pid]
    deadline = time.monotonic() + timeout
    while True:
        if reap is not None and reap.process is not None:
            reap.process.poll()  # reap our own child so it does not linger as a zombie
        else:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        if not any(pid_alive(p) for p in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
