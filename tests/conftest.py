"""Fixtures shared by every test: real servers started by the suite on loopback ports."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from failover.local import LocalMongo, LocalPostgres, LocalRedis, LocalServer

_KINDS: dict[str, type[LocalServer]] = {"postgres": LocalPostgres, "redis": LocalRedis, "mongodb": LocalMongo}
_SERIAL = itertools.count()  # every server of the session gets a data directory of its own


@pytest.fixture(scope="session")
def server_root() -> Iterator[Path]:
    """A directory the ``postgres`` user can enter (pytest's tmp_path is 0700 root-only)."""
    root = Path(tempfile.mkdtemp(prefix="failover-tests-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_server(server_root: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., LocalServer]]:
    """``make_server("postgres"|"redis"|"mongodb", **kwargs)`` starts a real server for this test.

    Every server made here is killed when the test ends, whatever happened.
    """
    made: list[LocalServer] = []

    def make(kind: str, **kwargs: object) -> LocalServer:
        name = f"{next(_SERIAL):03d}-{kind}-{re.sub(r'[^A-Za-z0-9_-]', '_', request.node.name)[:40]}"
        server = _KINDS[kind](server_root / name, **kwargs)  # type: ignore[arg-type]
        made.append(server)
        return server.start()

    yield make
    for server in made:
        if server.paused:
            server.resume()
        server.kill()


@pytest.fixture
def pg_pair(make_server: Callable[..., LocalServer]) -> tuple[LocalServer, LocalServer]:
    """A running PostgreSQL primary and fallback."""
    return make_server("postgres"), make_server("postgres")


@pytest.fixture
def redis_pair(make_server: Callable[..., LocalServer]) -> tuple[LocalServer, LocalServer]:
    """A running Redis primary and fallback."""
    return make_server("redis"), make_server("redis")


@pytest.fixture
def mongo_pair(make_server: Callable[..., LocalServer]) -> tuple[LocalServer, LocalServer]:
    """A running MongoDB-wire primary and fallback."""
    return make_server("mongodb"), make_server("mongodb")
