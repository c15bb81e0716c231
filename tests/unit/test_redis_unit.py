"""Pure-logic checks of the Redis store: which commands are idempotent, how errors route."""

from __future__ import annotations

import pytest
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ConnectionError,
    DataError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
    WatchError,
)

from failover.core.store import ErrorKind
from failover.stores.redis import CommandNotSent, RedisBackend, is_idempotent


@pytest.mark.parametrize(
    "args",
    [
        ("GET", "k"),
        ("MGET", "a", "b"),
        ("HGETALL", "h"),
        ("EXISTS", "k"),
        ("TTL", "k"),
        ("SCAN", 0, "MATCH", "*"),
        ("ZRANGE", "z", 0, -1),
        ("LRANGE", "l", 0, -1),
        ("SMEMBERS", "s"),
        ("SET", "k", "v"),
        ("SET", "k", "v", "EX", 10),
        (b"set", b"k", b"v", b"PX", 10),
        ("SET", "k", "NX"),  # a value that spells an option is still a value
        ("HSET", "h", "f", "v"),
        ("DEL", "k"),
        ("ZADD", "z", 1, "m"),
        ("CONFIG GET", "maxmemory"),
    ],
)
def test_idempotent_commands(args: tuple[object, ...]) -> None:
    assert is_idempotent(args)


@pytest.mark.parametrize(
    "args",
    [
        ("INCR", "k"),
        ("INCRBY", "k", 2),
        ("DECR", "k"),
        ("LPUSH", "l", "x"),
        ("RPUSH", "l", "x"),
        ("APPEND", "k", "x"),
        ("HINCRBY", "h", "f", 1),
        ("SET", "k", "v", "NX"),
        ("SET", "k", "v", "EX", 5, "xx"),
        ("SET", "k", "v", "GET"),
        ("ZADD", "z", "INCR", 1, "m"),
        ("ZADD", "z", "GT", 1, "m"),
        ("EVAL", "return 1", 0),
        ("UNKNOWN.MODULE.CMD", "x"),
        (),
    ],
)
def test_non_idempotent_commands(args: tuple[object, ...]) -> None:
    assert not is_idempotent(args)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (CommandNotSent("Error 111 connecting"), ErrorKind.NOT_SENT),
        (ReadOnlyError("READONLY You can't write against a read only replica."), ErrorKind.NOT_SENT),
        (BusyLoadingError("LOADING"), ErrorKind.NOT_SENT),
        (ConnectionError("Connection reset by peer"), ErrorKind.OUTCOME_UNKNOWN),
        (AuthenticationError("invalid password"), ErrorKind.OUTCOME_UNKNOWN),
        (TimeoutError("Timeout reading from socket"), ErrorKind.OUTCOME_UNKNOWN),
        (OSError(104, "reset"), ErrorKind.OUTCOME_UNKNOWN),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), ErrorKind.APPLICATION),
        (WatchError("Watched variable changed."), ErrorKind.APPLICATION),
        (DataError("Invalid input"), ErrorKind.APPLICATION),
    ],
)
def test_classify(exc: BaseException, kind: ErrorKind) -> None:
    assert RedisBackend().classify(exc) is kind


def test_backend_validates_its_configuration() -> None:
    with pytest.raises(ValueError, match="pool_max_size"):
        RedisBackend(pool_max_size=0)
    with pytest.raises(ValueError, match="greater than 0"):
        RedisBackend(connect_timeout=0)


def test_redis_py_never_retries_a_command_itself() -> None:
    """redis-py 6 would re-send a failed INCR three times; every pooled connection must have 0 retries."""
    from failover.core.endpoint import Endpoint, Role

    backend = RedisBackend(connect_timeout=0.5, socket_timeout=1.0)
    endpoint = Endpoint(store="redis", role=Role.PRIMARY, name="Primary Redis", url="redis://:pw-x1@127.0.0.1:1/0")
    pool = backend.pool(endpoint)
    conn = pool.make_connection()
    retries = conn.retry.get_retries() if hasattr(conn.retry, "get_retries") else conn.retry._retries  # < 6.0
    assert retries == 0
    assert conn.socket_connect_timeout == 0.5
    assert conn.socket_timeout == 1.0
    assert pool.max_connections == backend.pool_max_size


# --- private attributes of redis-py, each with a fallback that works without them -----------


class _PoolWithoutPrivates:
    """A pool of a redis-py release that renamed its private lists (and has no can_get_connection)."""

    max_connections = 2


def test_pool_counts_read_redis_py_and_fall_back_to_none() -> None:
    from redis.asyncio.connection import BlockingConnectionPool

    from failover.stores.redis.backend import _saturated, pool_counts

    pool = BlockingConnectionPool(max_connections=2)
    assert pool_counts(pool) == (0, 0)  # the attributes this release has
    assert not _saturated(pool)
    assert pool_counts(_PoolWithoutPrivates()) == (None, None)  # type: ignore[arg-type]
    assert not _saturated(_PoolWithoutPrivates())  # type: ignore[arg-type]


async def test_liveness_check_falls_back_to_the_public_api_when_the_stream_is_hidden() -> None:
    from failover.stores.redis.backend import _alive_by_driver, _idle_and_alive

    class Hidden:
        is_connected = True
        replies = [False, True]

        async def can_read_destructive(self) -> bool:
            return self.replies.pop(0)

    conn = Hidden()
    assert _idle_and_alive(conn) is None  # type: ignore[arg-type]
    assert await _alive_by_driver(conn) is True  # type: ignore[arg-type]
    assert await _alive_by_driver(conn) is False  # type: ignore[arg-type]  # a reply or hang-up waits

    class Broken(Hidden):
        async def can_read_destructive(self) -> bool:
            raise ConnectionError("Connection closed by server.")

    assert await _alive_by_driver(Broken()) is False  # type: ignore[arg-type]


def test_client_setinfo_is_disabled_without_deprecated_arguments() -> None:
    import warnings

    from redis.asyncio.connection import BlockingConnectionPool

    from failover.stores.redis.backend import _NO_CLIENT_SETINFO, _idle_and_alive

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        pool = BlockingConnectionPool.from_url("redis://127.0.0.1:1/0", **_NO_CLIENT_SETINFO)
        conn = pool.make_connection()
    # The installed redis-py still has what the fast paths read; CI on the newest release
    # fails here first if a rename sends production to the slower fallbacks.
    assert hasattr(conn, "_writer") and _idle_and_alive(conn) is False  # not connected yet
