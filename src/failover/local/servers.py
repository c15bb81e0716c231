"""Real servers run as direct child processes on loopback ports of their own.

Each server runs in the foreground in its own process group, so that
:meth:`LocalServer.kill` (SIGKILL to the whole group), :meth:`pause` (SIGSTOP,
a hung server) and :meth:`resume` act on every process of it, and a restart on
the same data directory is instant.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .processes import pid_alive, process_tree, signal_tree, wait_gone

__all__ = ["LocalServer", "LocalPostgres", "LocalRedis", "LocalMongo", "free_port", "pid_alive", "process_tree", "ServerError"]

HOST = "127.0.0.1"


class ServerError(RuntimeError):
    """A local server could not be started or controlled."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


class LocalServer(abc.ABC):
    """One server process bound to 127.0.0.1:*port*, keeping its data in *data_dir*."""

    kind: str = "server"

    def __init__(self, data_dir: str | Path, port: int | None = None, *, name: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.name = name or f"{self.kind}-{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    # --- what each server defines ---------------------------------------------------------

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The URL clients use."""

    @abc.abstractmethod
    def _command(self) -> list[str]:
        """argv of the foreground server."""

    def _prepare(self) -> None:
        """Create the data directory before the first start."""
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _popen_kwargs(self) -> dict[str, Any]:
        return {}

    def _ready(self) -> bool:
        return _port_open(self.port)

    # --- control --------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 20.0) -> LocalServer:
        """Start the server (on the same data as before) and wait until it serves."""
        if self.running:
            return self
        if _port_open(self.port):
            raise ServerError(f"{self.name}: something else already listens on 127.0.0.1:{self.port}")
        self._prepare()
        log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab")
        try:
            self.process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._popen_kwargs(),
            )
        finally:
            log.close()
        self.paused = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.name} exited with code {self.process.returncode}; see {log.name}")
            if self._ready() and self.process.poll() is None:
                return self
            time.sleep(0.02)
        self.kill()
        raise ServerError(f"{self.name} did not become ready within {timeout:g}s; see {log.name}")

    def _signal_group(self, sig: signal.Signals, *, freeze: bool = False) -> list[int]:
        if self.process is None:
            return []
        return signal_tree(self.process.pid, sig, freeze=freeze)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL every process of the server and wait until they are gone (a crash).

        When this returns the kernel has closed every socket of the server, so
        clients already see the connection reset.
        """
        if self.process is None:
            return
        # Frozen first, so no process can notice the others dying and say goodbye
        # to its clients: a crash gives no notice.
        pids = self._signal_group(signal.SIGKILL, freeze=True)
        self.process.wait(timeout)
        wait_gone(pids, timeout, interval=0.002)
        self.process = None
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP the server: it keeps its sockets but answers nothing (a hung server)."""
        self._signal_group(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT a paused server."""
        self._signal_group(signal.SIGCONT)
        self.paused = False

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down cleanly (SIGTERM), killing it if it does not stop in time."""
        if self.process is None:
            return
        if self.paused:
            self.resume()
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def owns(self, pid: int) -> bool:
        """Whether live process *pid* is this server, judged by whole ``argv`` elements.

        Used before signalling a pid read from a state file, so a recycled pid (or a
        ``tail -f`` of the server's log) is never hit. PostgreSQL and nx-27017 name
        the data directory as an argument; redis-server rewrites its title to
        ``redis-server 127.0.0.1:PORT``.
        """
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        words = [w.decode(errors="replace").strip() for w in argv if w]
        if str(self.data_dir) in words:
            return True
        address = f"{HOST}:{self.port}"
        return bool(words) and "redis-server" in words[0] and (
            words[0].endswith(" " + address) or address in words[1:2]
        )

    def restart(self, timeout: float = 20.0) -> LocalServer:
        self.kill()
        return self.start(timeout)

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.name} 127.0.0.1:{self.port} {state}>"


class LocalPostgres(LocalServer):
    """Debian's PostgreSQL, run as the ``postgres`` user (the server refuses root)."""

    kind = "postgres"
    _template: Path | None = None

    def __init__(self, data_dir: str | Path, port: int | None = None, *, name: str | None = None, password: str | None = None) -> None:
        super().__init__(data_dir, port, name=name)
        self.password = password

    @property
    def url(self) -> str:
        auth = f"postgres:{self.password}" if self.password else "postgres"
        return f"postgresql://{auth}@{HOST}:{self.port}/postgres"

    @staticmethod
    def _bin(name: str) -> str:
        for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
            if (base / name).exists():
                return str(base / name)
        found = shutil.which(name)
        if not found:
            raise ServerError(f"PostgreSQL's {name} was not found: install the postgresql package")
        return found

    @staticmethod
    def _user() -> pwd.struct_passwd:
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise ServerError("there is no 'postgres' user: install the postgresql package") from None

    @classmethod
    def _template_dir(cls) -> Path:
        """An initdb'd cluster made once per machine and copied for each server (0.04 s vs 0.5 s).

        It lives at one stable path per PostgreSQL version (made under a lock, then
        renamed into place), so processes share it instead of leaving one behind each.
        """
        if LocalPostgres._template is not None and (LocalPostgres._template / "PG_VERSION").exists():
            return LocalPostgres._template
        user = cls._user()
        initdb = cls._bin("initdb")
        version = Path(initdb).parent.parent.name if "/postgresql/" in initdb else "pg"
        root = Path(tempfile.gettempdir()) / f"failover-pg-template-{version}-{os.getuid()}"
        target = root / "data"
        root.mkdir(mode=0o755, exist_ok=True)
        os.chown(root, user.pw_uid, user.pw_gid)
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "PG_VERSION").exists():
                building = root / f"building-{os.getpid()}"
                shutil.rmtree(building, ignore_errors=True)
                result = subprocess.run(
                    [initdb, "-D", str(building), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
                    user="postgres",
                    capture_output=True,
                    cwd=root,
                )
                if result.returncode != 0:
                    raise ServerError(f"initdb failed: {result.stderr.decode(errors='replace')[-500:]}")
                os.rename(building, target)
        LocalPostgres._template = target
        return target

    def _prepare(self) -> None:
        user = self._user()
        parent = self.data_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        # The postgres user must be able to reach the data directory.
        for path in (parent, *parent.parents):
            mode = path.stat().st_mode
            if not mode & 0o001 and path != Path("/"):
                os.chmod(path, mode | 0o011)
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(["cp", "-a", str(self._template_dir()), str(self.data_dir)], check=True)
            os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        self._remove_stale_lock()
        log = self.data_dir.parent / f"{self.data_dir.name}.log"
        log.touch()
        os.chown(log, user.pw_uid, user.pw_gid)

    def _remove_stale_lock(self) -> None:
        """Delete ``postmaster.pid`` when the postmaster it names is dead.

        PostgreSQL refuses to start while the pid in its lock file exists, and a
        killed postmaster that its parent has not reaped yet (a zombie), or a pid the
        system has since given to another program, still "exists". A live
        postmaster of this data directory keeps its lock.
        """
        lock = self.data_dir / "postmaster.pid"
        try:
            pid = int(lock.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        if pid_alive(pid) and self.owns(pid):
            return
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()

    def _command(self) -> list[str]:
        return [
            self._bin("postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-c", f"listen_addresses={HOST}",
            # TCP only: a Unix socket path must stay under 108 bytes, which a deep data dir breaks.
            "-c", "unix_socket_directories=",
            # fsync off: a killed *process* loses nothing (the kernel keeps its writes);
            # synchronous_commit stays on so an acknowledged commit survives SIGKILL.
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
            "-c", "shared_buffers=32MB",
            "-c", "wal_level=logical",
            "-c", "wal_retrieve_retry_interval=200ms",
        ]  # fmt: skip

    def _popen_kwargs(self) -> dict[str, Any]:
        return {"user": "postgres", "cwd": str(self.data_dir.parent)}

    def _ready(self) -> bool:
        if not _port_open(self.port):
            return False
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=2) as conn:
                conn.execute("select 1")
                if self.password:
                    conn.execute(f"alter user postgres password '{self.password}'")
                    conn.commit()
            return True
        except psycopg.Error:
            return False


class LocalRedis(LocalServer):
    """Debian's ``redis-server`` in the foreground."""

    kind = "redis"

    def __init__(
        self,
        data_dir: str | Path,
        port: int | None = None,
        *,
        name: str | None = None,
        password: str | None = None,
        persistent: bool = False,
    ) -> None:
        super().__init__(data_dir, port, name=name)
        self.password = password
        self.persistent = persistent

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    def _command(self) -> list[str]:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        cmd = [binary, "--port", str(self.port), "--bind", HOST, "--dir", str(self.data_dir), "--save", ""]
        if self.persistent:
            # The AOF is written before replies are sent, so a killed process loses no
            # acknowledged write; fsync once a second only matters if the machine dies.
            cmd += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            cmd += ["--appendonly", "no"]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd

    def _ready(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    sock.recv(64)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class LocalMongo(LocalServer):
    """A MongoDB-wire server from PyPI (``nx-27017``, SQLite-backed), for tests and demos only."""

    kind = "mongodb"

    @property
    def url(self) -> str:
        return f"mongodb://{HOST}:{self.port}/?directConnection=true"

    def _command(self) -> list[str]:
        # This interpreter's own (its venv), else the PATH's: CI runs the oldest PyMongo
        # against a server from another venv, since nx-27017 needs a newer PyMongo itself.
        own = Path(sys.executable).parent / "nx-27017"
        binary = str(own) if own.exists() else shutil.which("nx-27017") or str(own)
        if not Path(binary).exists():
            raise ServerError("nx-27017 was not found: pip install 'failover[local]'")
        return [
            binary,
            "--host", HOST,
            "-p", str(self.port),
            "--data-dir", str(self.data_dir),
            "--pid-file", str(self.data_dir.parent / f"{self.data_dir.name}.pid"),
            "--log-file", str(self.data_dir.parent / f"{self.data_dir.name}.nx.log"),
        ]  # fmt: skip

    def _prepare(self) -> None:
        super()._prepare()
        # After a SIGKILL the pid file stays behind and would stop the restart.
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir.parent / f"{self.data_dir.name}.pid").unlink()

    def _ready(self) -> bool:
        if not _port_open(self.port):
            return False
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        try:
            client: MongoClient[dict[str, object]] = MongoClient(self.url, serverSelectionTimeoutMS=500, connectTimeoutMS=500)
            try:
                return bool(client.admin.command("hello").get("isWritablePrimary"))
            finally:
                client.close()
        except PyMongoError:
            return False
