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

Who reaps a killed server? Only its parent can, and a server's parent is the
process that started it. So the owner (``local up --serve``) reaps its children
in a thread, and it takes the requests of ``failover local kill|stop|start`` (and
of a drill) on ``DIR/control.sock`` (mode 0600): a server started that way is
its child too, never an orphan that nobody may reap (a container's init often
reaps nothing). Without an owner the command acts by itself, and a server's
stale ``postmaster.pid`` or pid file never blocks its next start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..local.processes import pid_alive, process_tree, signal_tree, stopped, wait_gone
from ..local.servers import LocalServer, ServerError
from ..local.stack import ROLES, LocalStack, update_state

__all__ = ["LocalControl", "ACTIONS", "ask_owner", "CONTROL_SOCKET"]

logger = logging.getLogger("failover.local")

ACTIONS = ("kill", "stop", "start")
"""``kill``: SIGKILL (a crash). ``stop``: SIGSTOP (a hung server). ``start``: start it again, or SIGCONT it."""

CONTROL_SOCKET = "control.sock"
"""Where the owner of a stack takes requests, in the stack's directory."""

REAP_INTERVAL = 0.05
"""Seconds between two reaping rounds of the owner: a killed server is a zombie at most this long."""

_MAX_REQUEST = 4096
_UNIX_PATH_MAX = 107


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
        self._closed = threading.Event()
        self._reaper: threading.Thread | None = None
        self._listener: socket.socket | None = None
        if self._owned:
            self._ensure_reaper()

    # --- owning servers: reaping, taking requests -------------------------------------

    def _ensure_reaper(self) -> None:
        """Reap every server this process started as soon as it dies (no zombie lingers)."""
        if self._reaper is not None and self._reaper.is_alive():
            return
        self._reaper = threading.Thread(target=self._reap_loop, name="failover-local-reaper", daemon=True)
        self._reaper.start()

    def _reap_loop(self) -> None:
        while not self._closed.wait(REAP_INTERVAL):
            for server in list(self.stack.servers.values()):
                process = server.process
                if process is not None:
                    process.poll()  # waitpid(WNOHANG) on our own child; thread-safe in Popen

    @property
    def socket_path(self) -> Path:
        return self.base_dir / CONTROL_SOCKET

    def listen(self) -> bool:
        """Take the requests of ``failover local kill|stop|start`` on ``DIR/control.sock``.

        Returns False (and the commands act by themselves) when another live process
        already listens there or the path is too long for a Unix socket.
        """
        path = self.socket_path
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            logger.warning("%s is too long for a Unix socket: `failover local` commands will act by themselves", path)
            return False
        if path.exists():
            if _owner_listening(path):
                logger.warning("another process already controls the local stack in %s", self.base_dir)
                return False
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # left by an owner that was killed
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: only this user may drive the servers
        try:
            listener.bind(str(path))
        finally:
            os.umask(old_umask)
        listener.listen(8)
        listener.settimeout(0.2)
        self._listener = listener
        threading.Thread(target=self._serve_requests, args=(listener,), name="failover-local-control", daemon=True).start()
        return True

    def _serve_requests(self, listener: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(5.0)
                try:
                    reply = self._answer(_read_line(conn))
                except (OSError, ValueError) as exc:
                    reply = {"ok": False, "kind": "request", "error": f"bad request: {exc}"}
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(reply).encode() + b"\n")

    def _answer(self, request: bytes) -> dict[str, Any]:
        fields = json.loads(request)
        if not isinstance(fields, dict):
            raise ValueError("expected a JSON object")
        try:
            entry = self.act(str(fields.get("action")), str(fields.get("store")), str(fields.get("role")))
        except ValueError as exc:
            return {"ok": False, "kind": "request", "error": str(exc)}
        except ServerError as exc:
            return {"ok": False, "kind": "server", "error": str(exc)}
        return {"ok": True, "server": entry}

    def close(self) -> None:
        """Stop reaping and taking requests (the servers keep running: see :meth:`shutdown`)."""
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

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
        return stopped(pid)

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
            signal_tree(pid, signal.SIGKILL, freeze=True)
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
        signal_tree(pid, signal.SIGSTOP)

    def _start(self, store: str, role: str) -> None:
        server = self.stack.server(store, role)
        if server.running:
            if server.paused or (server.pid is not None and self._paused(server.pid)):
                server.resume()
            return
        pid = self._recorded_pid(store, role)
        if pid is not None:
            signal_tree(pid, signal.SIGCONT)
            return
        server.start()
        self.record(store, role, server.pid)
        self._ensure_reaper()

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
                signal_tree(pid, signal.SIGCONT, pids=pids)
                # PostgreSQL's SIGTERM waits for clients to leave; SIGINT is its fast shutdown.
                signal_tree(pid, signal.SIGINT if store == "postgres" else signal.SIGTERM, pids=pids)
                stopping.append((store, role, server, pid, pids))
            # Every server was asked at once; now wait for each, killing the slow ones.
            deadline = time.monotonic() + timeout
            for store, role, server, pid, pids in stopping:
                if not _wait_dead(pid, max(0.0, deadline - time.monotonic()), pids, reap=server):
                    logger.warning("local %s %s did not stop within %gs: killing it", store, role, timeout)
                    signal_tree(pid, signal.SIGKILL, freeze=True, pids=pids)
                    _wait_dead(pid, 10.0, pids, reap=server)
                if server.process is not None and server.process.poll() is not None:
                    server.process = None
                self.record(store, role, None)

def ask_owner(base_dir: str | Path, action: str, store: str, role: str, timeout: float = 60.0) -> dict[str, Any] | None:
    """Have the process that owns the stack in *base_dir* apply *action*; None when no process does.

    Raises ValueError for a request the owner refused and ServerError when the
    server could not be started.
    """
    path = Path(base_dir).resolve() / CONTROL_SOCKET
    if not path.exists() or len(os.fsencode(path)) > _UNIX_PATH_MAX:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(str(path))
        except OSError:
            return None  # the owner is gone (its socket file stayed behind)
        conn.sendall(json.dumps({"action": action, "store": store, "role": role}).encode() + b"\n")
        reply = json.loads(_read_line(conn))
    if reply.get("ok"):
        return reply["server"]  # type: ignore[no-any-return]
    if reply.get("kind") == "server":
        raise ServerError(reply.get("error", "the server could not be started"))
    raise ValueError(reply.get("error", "the request was refused"))


def _owner_listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(_MAX_REQUEST)
        if not chunk:
            break
        data += chunk
        if len(data) > _MAX_REQUEST * 4:
            raise ValueError("message too long")
    return data


def _wait_dead(pid: int, timeout: float, pids: list[int] | None = None, reap: LocalServer | None = None) -> bool:
    """Wait until *pid* (and *pids*) are gone, reaping our own child; True when they are."""

    def collect() -> None:
        if reap is not None and reap.process is not None:
            reap.process.poll()  # our own child: reap it so it does not linger as a zombie
        else:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)

    return wait_gone(pids or [pid], timeout, reap=collect)
