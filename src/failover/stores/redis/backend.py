"""The Redis driver under the failover core: pools, the lease/send split, probes, error kinds.

Why commands are run here instead of through ``Redis.execute_command``: failover
must know whether a command was *sent* when a connection fails, and redis-py does
not say. So a command runs in two phases:

1. **lease** (nothing sent yet): take a connection from the endpoint's pool and
   make sure it is alive. A pooled connection whose server died is noticed here
   without a round trip (its socket already holds the hang-up), and a reconnect
   to a dead server fails here too. Any error in this phase is *not sent*: the
   command goes to the other endpoint and the breaker of this one trips.
2. **send + read**: ``send_command`` then redis-py's own ``parse_response``. A
   connection failure from here on means the command may have been applied. It is
   retried on the other endpoint only when it is idempotent (see
   :mod:`.commands`); otherwise :class:`~failover.errors.OutcomeUnknown`.

redis-py 6 retries ``ConnectionError``/``TimeoutError`` three times by default,
silently re-sending an ``INCR`` or ``LPUSH``. Every pool here is built with a
``Retry`` of zero retries: failover alone decides what is retried, and where.

A replica, or an endpoint that answers ``READONLY``, is not usable for writes:
probes check ``ROLE`` (falling back to ``INFO replication``, then to "writable"
on servers that have neither, such as some managed services), and a
``READONLY`` reply is treated as *not applied*, so the command moves on.

A pool whose connections all stay busy for a whole attempt raises
:class:`PoolExhausted` (load, not a dead server: no breaker trips).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import str_if_bytes

from ...core.attempt import attempt_remaining
from ...core.endpoint import Endpoint, Role
from ...core.reasons import describe_exception
from ...core.routing import NotSent
from ...core.sockets import hung_up_or_pending
from ...core.store import Backend, ErrorKind

__all__ = ["CommandNotSent", "CommandStack", "PoolExhausted", "RedisBackend", "pool_counts"]

logger = logging.getLogger("failover.redis")

CommandStack = list[tuple[tuple[Any, ...], dict[str, Any]]]


class CommandNotSent(NotSent, RedisError):
    """The lease failed: nothing of the command was sent (a ``RedisError`` for whoever catches those)."""


class PoolExhausted(RedisError):
    """Every connection of the endpoint's pool stayed busy for the whole attempt.

    Load is not a dead server: it reaches the caller and trips no breaker, unless
    the endpoint is found hung meanwhile (then the command follows the switch).
    """


def _saturated(pool: BlockingConnectionPool) -> bool:
    can_get = getattr(pool, "can_get_connection", None)  # public since redis-py 5.1
    if can_get is not None:
        return not can_get()
    in_use, _ = pool_counts(pool)
    return in_use is not None and in_use >= pool.max_connections


def _count(pool: BlockingConnectionPool, attribute: str) -> int | None:
    value = getattr(pool, attribute, None)
    try:
        return len(value) if value is not None else None
    except TypeError:
        return None


def _idle_count(pool: BlockingConnectionPool) -> int | None:
    """Idle connections of *pool* (the hot path: one attribute read when redis-py has the list)."""
    idle = getattr(pool, "_available_connections", None)
    return len(idle) if type(idle) is list else _count(pool, "_available_connections")


def pool_counts(pool: BlockingConnectionPool) -> tuple[int | None, int | None]:
    """``(in_use, idle)`` connections of *pool*; None where redis-py does not tell.

    redis-py has no public count of busy and idle connections, so these read its
    private lists (``_in_use_connections``, ``_available_connections``, the same from
    5.2 through 8.x). If a release renames them, the counts become None and the
    callers take their slower, always-correct path; nothing breaks.
    """
    return _count(pool, "_in_use_connections"), _count(pool, "_available_connections")


# redis-py < 5.3 wants a command name (ignored) when taking a pooled connection.
_NAME_REQUIRED = (
    inspect.signature(BlockingConnectionPool.get_connection).parameters["command_name"].default
    is inspect.Parameter.empty
)
_GET_CONNECTION_ARGS: tuple[str, ...] = ("_",) if _NAME_REQUIRED else ()


# redis-py 8 deprecates lib_name/lib_version for driver_info (None: send nothing).
_NO_CLIENT_SETINFO: dict[str, None] = (
    {"driver_info": None}
    if "driver_info" in inspect.signature(AbstractConnection.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)


def _no_retry() -> Retry:
    # One object per connection pool (redis-py deep-copies it per connection anyway).
    return Retry(NoBackoff(), 0)


class RedisBackend(Backend[BlockingConnectionPool]):
    """``redis.asyncio`` pools, probes and error classification for the failover core.

    Each endpoint gets a :class:`~redis.asyncio.BlockingConnectionPool` (at most
    *pool_max_size* connections; a burst waits for a free one instead of
    failing) and a :class:`~redis.asyncio.Redis` client bound to it, created on
    first use without touching the network.
    """

    store = "redis"

    def __init__(
        self, *, pool_max_size: int = 10, connect_timeout: float = 2.0, socket_timeout: float | None = None
    ) -> None:
        """*socket_timeout* None (the default) arms no redis-py timer per read: every
        routed command and probe is already bounded by its attempt's clock, and
        redis-py's own timer costs about 20 µs a command."""
        if pool_max_size < 1:
            raise ValueError("pool_max_size must be at least 1")
        if connect_timeout <= 0 or (socket_timeout is not None and socket_timeout <= 0):
            raise ValueError("connect_timeout and socket_timeout must be greater than 0")
        self.pool_max_size = pool_max_size
        self.connect_timeout = connect_timeout
        self.socket_timeout = socket_timeout
        self._clients: dict[Role, Redis] = {}

    # --- clients --------------------------------------------------------------------------

    def client(self, endpoint: Endpoint) -> Redis:
        """The ``redis.asyncio.Redis`` of *endpoint* (its own pool), created on first use."""
        client = self._clients.get(endpoint.role)
        if client is None:
            pool = BlockingConnectionPool.from_url(
                endpoint.url,
                max_connections=self.pool_max_size,
                timeout=None,  # the routed operation's deadline bounds the wait
                socket_connect_timeout=self.connect_timeout,
                socket_timeout=self.socket_timeout,
                retry=_no_retry(),
                retry_on_error=[],
                **_NO_CLIENT_SETINFO,  # no CLIENT SETINFO round trips on connect
            )
            client = Redis(connection_pool=pool)
            self._clients[endpoint.role] = client
        return client

    def pool(self, endpoint: Endpoint) -> BlockingConnectionPool:
        return self.client(endpoint).connection_pool  # type: ignore[return-value]

    async def open(self, endpoint: Endpoint) -> None:
        self.client(endpoint)

    async def warm(self, endpoint: Endpoint, timeout: float) -> None:
        """Open one pooled connection, so the first request after a switch does not pay for it."""
        async with asyncio.timeout(timeout):
            conn, pool = await self.lease(endpoint)
        await pool.release(conn)

    async def drain(self, endpoint: Endpoint) -> None:
        client = self._clients.get(endpoint.role)
        if client is not None:
            logger.info("closing the idle connections to %s", endpoint.name)
            # In-flight commands keep their connection; it is dropped when they fail.
            await client.connection_pool.disconnect(inuse_connections=False)

    async def close(self, endpoint: Endpoint) -> None:
        client = self._clients.pop(endpoint.role, None)
        if client is not None:
            await client.connection_pool.disconnect(inuse_connections=True)

    # --- probe ----------------------------------------------------------------------------

    async def probe(self, endpoint: Endpoint) -> bool:
        """``PING`` then ``ROLE`` on a fresh connection (never a pooled one)."""
        pool = self.pool(endpoint)
        conn = pool.make_connection()
        try:
            await conn.connect()
            await conn.send_command("PING", check_health=False)
            if str_if_bytes(await conn.read_response()) != "PONG":
                raise RedisConnectionError("unexpected answer to PING")
            return await _is_master(conn)
        finally:
            await conn.disconnect(nowait=True)

    # --- errors ---------------------------------------------------------------------------

    def classify(self, exc: BaseException) -> ErrorKind:
        if isinstance(exc, PoolExhausted):
            return ErrorKind.BUSY
        if isinstance(exc, (NotSent, ReadOnlyError, BusyLoadingError)):
            # Nothing sent, or the server refused before applying anything.
            return ErrorKind.NOT_SENT
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
            return ErrorKind.OUTCOME_UNKNOWN
        return ErrorKind.APPLICATION

    # --- running commands -----------------------------------------------------------------

    async def lease(self, endpoint: Endpoint) -> tuple[AbstractConnection, BlockingConnectionPool]:
        """A connected connection of *endpoint*'s pool, checked alive; nothing sent on it yet.

        Raises ``CommandNotSent`` (classified NOT_SENT) when there is none. The caller
        must ``release`` it to the pool.
        """
        client = self._clients.get(endpoint.role)
        # Every client of _clients is built on a BlockingConnectionPool (see client()).
        pool = cast(BlockingConnectionPool, client.connection_pool) if client is not None else self.pool(endpoint)
        conn: AbstractConnection | None = None
        try:
            if _idle_count(pool):
                # An idle connection is there: nothing to wait for, no timer on the hot path.
                conn = await pool.get_connection(*_GET_CONNECTION_ARGS)
            else:
                # Waiting for a slot, or connecting (AUTH may wait on a hung server): as long as
                # the attempt allows, leaving a little for sending (connecting itself is bounded
                # by socket_connect_timeout).
                remaining = attempt_remaining()
                budget = self.connect_timeout if remaining is None else max(0.001, remaining - 0.01)
                async with asyncio.timeout(budget):
                    conn = await pool.get_connection(*_GET_CONNECTION_ARGS)
            alive = _idle_and_alive(conn)
            if alive is None:  # redis-py hides the socket: ask it, at the price of a read attempt
                alive = await _alive_by_driver(conn)
            if not alive:
                # The socket already holds the server's hang-up (or stray bytes):
                # reconnect now; if the server is down this fails before sending.
                await conn.disconnect(nowait=True)
                await conn.connect()
        except (RedisError, OSError, TimeoutError) as exc:
            if conn is not None:
                await conn.disconnect(nowait=True)
                await pool.release(conn)
            elif isinstance(exc, TimeoutError) and _saturated(pool):
                raise PoolExhausted(
                    f"all {pool.max_connections} connections to {endpoint.name} are busy "
                    "(raise FAILOVER_POOL_MAX_SIZE or FAILOVER_OPERATION_TIMEOUT)"
                ) from exc
            what = "timed out connecting" if isinstance(exc, TimeoutError) else describe_exception(exc, endpoint.secrets)
            raise CommandNotSent(f"{what} (nothing was sent to {endpoint.name})") from exc
        except BaseException:
            if conn is not None:
                await conn.disconnect(nowait=True)
                await pool.release(conn)
            raise
        return conn, pool

    async def execute(self, endpoint: Endpoint, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
        """Run one command on *endpoint*: lease (not sent), then send and parse with redis-py's callbacks."""
        conn, pool = await self.lease(endpoint)
        try:
            await conn.send_command(*args)
            # redis-py annotates Connection; any AbstractConnection (a unix socket too) is parsed the same.
            return await self.client(endpoint).parse_response(conn, args[0], **options)  # type: ignore[arg-type]
        except ResponseError:
            raise  # a complete reply was read: the connection is clean
        except BaseException:
            # Unknown state (reply pending, cancelled mid-read): never reuse it.
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    async def bind_pipeline(self, endpoint: Endpoint, transaction: bool) -> Pipeline:
        """A redis-py ``Pipeline`` on *endpoint* holding a leased, live connection.

        The pipeline releases the connection itself (``execute()``/``reset()``).
        """
        conn, _ = await self.lease(endpoint)
        pipe = self.client(endpoint).pipeline(transaction=transaction)
        pipe.connection = conn  # type: ignore[assignment]  # redis-py annotates Connection; any AbstractConnection works
        return pipe

    async def execute_pipeline(
        self, endpoint: Endpoint, stack: CommandStack, transaction: bool, raise_on_error: bool
    ) -> list[Any]:
        """Send a whole pipeline (``MULTI``/``EXEC`` when *transaction*) on one connection of *endpoint*."""
        pipe = await self.bind_pipeline(endpoint, transaction)
        pipe.command_stack = [(args, dict(options)) for args, options in stack]
        # redis-py drops the connection on connection errors and cancellation, and
        # execute() hands it back to the pool in every case.
        return await pipe.execute(raise_on_error=raise_on_error)

    def stats(self) -> dict[str, dict[str, int | None]]:
        """Pooled connections per role: ``in_use`` and ``idle`` (None when redis-py does not tell)."""
        out = {}
        for role, client in self._clients.items():
            in_use, idle = pool_counts(client.connection_pool)  # type: ignore[arg-type]
            out[str(role)] = {"in_use": in_use, "idle": idle}
        return out


async def _is_master(conn: AbstractConnection) -> bool:
    """True when the server says it is a master; replicas are not usable for writes.

    ``ROLE`` first, ``INFO replication`` next; a server with neither (a managed
    service with a trimmed command set) answered PING, so it is taken as writable.
    """
    try:
        await conn.send_command("ROLE", check_health=False)
        reply = await conn.read_response()
        return str_if_bytes(reply[0]) == "master"
    except ResponseError:
        pass
    try:
        await conn.send_command("INFO", "replication", check_health=False)
        info = str_if_bytes(await conn.read_response())
    except ResponseError:
        return True
    for line in str(info).splitlines():
        if line.startswith("role:"):
            return line.split(":", 1)[1].strip() == "master"
    return True


def _idle_and_alive(conn: AbstractConnection) -> bool | None:
    """True when an idle pooled connection has nothing to read, i.e. its server did not hang up.

    redis-py's own check (``can_read_destructive``) sees a hang-up only after the
    event loop has read it; a server killed a moment ago may not have been
    noticed yet. Asking the kernel (``poll`` with a zero timeout) costs no round
    trip and no wait, and an idle RESP connection must have nothing to read.

    None when redis-py does not expose the stream (``_writer``, private, the same
    from 5.2 through 8.x): the caller then uses :func:`_alive_by_driver`.
    """
    if not conn.is_connected:
        return False
    if not hasattr(conn, "_writer"):
        return None
    writer = conn._writer
    sock = writer.transport.get_extra_info("socket") if writer is not None else None
    if sock is None:
        return False
    try:
        fd = sock.fileno()
        if fd < 0:
            return False
        return not hung_up_or_pending(fd)
    except (OSError, ValueError):
        return False


async def _alive_by_driver(conn: AbstractConnection) -> bool:
    """redis-py's public check: an idle connection with a reply (or a hang-up) waiting is not usable."""
    try:
        return not await conn.can_read_destructive()
    except (RedisError, OSError):
        return False

