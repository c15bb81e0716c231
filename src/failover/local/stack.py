"""A primary and a fallback server for each store, started together for demos and drills."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .servers import LocalMongo, LocalPostgres, LocalRedis, LocalServer

__all__ = ["LocalStack", "ROLES", "update_state"]

ROLES = ("primary", "fallback")
_CLASSES: dict[str, type[LocalServer]] = {"postgres": LocalPostgres, "mongodb": LocalMongo, "redis": LocalRedis}
_ENV = {
    ("postgres", "primary"): "SUPABASE_DB_URL",
    ("postgres", "fallback"): "POSTGRES_URL",
    ("mongodb", "primary"): "MONGODB_ATLAS_URL",
    ("mongodb", "fallback"): "MONGODB_URL",
    ("redis", "primary"): "UPSTASH_REDIS_URL",
    ("redis", "fallback"): "REDIS_URL",
}


@contextlib.contextmanager
def _locked(state_file: Path) -> Iterator[None]:
    state_file.parent.mkdir(parents=True, exist_ok=True)
    with open(state_file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def update_state(state_file: Path, changes: dict[str, dict[str, Any]]) -> None:
    """Merge *changes* (``{"redis.primary": {"pid": 123}}``) into ``stack.json``.

    Several processes write it (``local up --serve``, ``local kill``, a drill): the
    read-modify-write happens under a lock and the file is replaced atomically.
    """
    with _locked(state_file):
        try:
            state = json.loads(state_file.read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        for key, values in changes.items():
            state.setdefault(key, {}).update(values)
        tmp = state_file.with_suffix(f".json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(state_file)


class LocalStack:
    """Local primary+fallback servers of *stores* under *base_dir*.

    Ports are chosen once and written to ``base_dir/stack.json`` so a restart
    (or another process, like ``failover local kill``) finds the same servers.
    """

    def __init__(self, base_dir: str | Path, stores: tuple[str, ...] = ("postgres", "mongodb", "redis")) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.stores = stores
        self.servers: dict[tuple[str, str], LocalServer] = {}
        saved = self._load()
        for store in stores:
            for role in ROLES:
                port = saved.get(f"{store}.{role}", {}).get("port")
                options = {"persistent": True} if store == "redis" else {}
                self.servers[(store, role)] = _CLASSES[store](
                    self.base_dir / f"{store}-{role}", port, name=f"{store} {role}", **options
                )

    @property
    def state_file(self) -> Path:
        return self.base_dir / "stack.json"

    def _load(self) -> dict[str, dict[str, int]]:
        try:
            return json.loads(self.state_file.read_text())  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError):
            return {}

    def save(self) -> None:
        update_state(
            self.state_file,
            {f"{store}.{role}": {"port": server.port, "pid": server.pid} for (store, role), server in self.servers.items()},
        )

    def server(self, store: str, role: str) -> LocalServer:
        try:
            return self.servers[(store, role)]
        except KeyError:
            raise ValueError(f"no local {store} {role}: stores are {', '.join(self.stores)}, roles {', '.join(ROLES)}") from None

    def start(self) -> LocalStack:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for server in self.servers.values():
            server.start()
        self.save()
        return self

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.save()

    def env(self) -> dict[str, str]:
        """The environment that points failover at these servers."""
        values = {_ENV[key]: server.url for key, server in self.servers.items()}
        if "mongodb" in self.stores:
            values["MONGODB_ATLAS_DATABASE"] = "app"
            values["MONGODB_DATABASE"] = "app"
        values["FAILOVER_LOCAL_DIR"] = str(self.base_dir)
        return values

    def write_env(self, path: str | Path) -> Path:
        path = Path(path)
        lines = [f"{key}={value}" for key, value in self.env().items()]
        path.write_text("\n".join(lines) + "\n")
        os.chmod(path, 0o600)
        return path

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
