"""Redis through ``redis.asyncio``, with a connection pool per endpoint.

Why this module runs commands itself instead of calling ``Redis.execute_command``:
failover must know whether a command was *sent* when a connection fails, and
redis-py does not say. So a command runs in two phases:

1. **lease** (nothing sent yet): take a connection from the endpoint's pool and
   make sure it is alive. A pooled connection whose server died is noticed here
   without a round trip (its socket already holds the hang-up), and a reconnect
   to a dead server fails here too. Any error in this phase is *not sent*: the
   command goes to the other endpoint and the breaker of this one trips.
2. **send + read**: ``send_command`` then redis-py's own ``parse_response``. A
   connection failure from here on means the command may have been applied. It is
   retried on the other endpoint only when it is idempotent (see
   :data:`IDEMPOTENT_COMMANDS`); otherwise :class:`~failover.errors.OutcomeUnknown`.

redis-py 6 retries ``ConnectionError``/``TimeoutError`` three times by default,
silently re-sending an ``INCR`` or ``LPUSH``. Every pool here is built with a
``Retry`` of zero retries: failover alone decides what is retried, and where.

A replica, or an endpoint that answers ``READONLY``, is not usable for writes:
probes check ``ROLE`` (falling back to ``INFO replication``, then to "writable"
on servers that have neither, such as some managed services), and a
``READONLY`` reply is treated as *not applied*, so the command moves on.

A pool whose connections all stay busy for a whole attempt raises
:class:`PoolExhausted` (load, not a dead server: no breaker trips). Known limits: ``scan_iter`` keeps a whole iteration on one endpoint but
``hscan_iter``/``sscan_iter``/``zscan_iter`` route each step on its own.

Upstash (the usual primary) has no ``REPLICAOF``, ``DUMP`` or ``RESTORE``; nothing
here uses them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncCoreCommands
from redis.exceptions import (
    BusyLoadingError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import str_if_bytes

from ..core.reasons import describe_exception
from ..core.clock import Clock
from ..core.endpoint import Endpoint, Role
from ..core.events import EventBus
from ..core.sockets import hung_up_or_pending
from ..core.attempt import attempt_remaining
from ..core.store import Backend, ErrorKind, FailoverStore, StoreOptions
from .redis_blocking import BLOCKING_COMMANDS, run_blocking
from .redis_capture import BLOCKING_POLL_INTERVAL, Polled, RedisCapture
from .redis_surface import RedisSurface

__all__ = ["IDEMPOTENT_COMMANDS", "PoolExhausted", "RedisBackend", "RedisPipeline", "RedisStore", "create", "is_idempotent"]

logger = logging.getLogger("failover.redis")

#: Commands that may run twice without harm, so a connection failure after they
#: were sent is retried on the other endpoint. Reads, plus writes that set an
#: absolute state (``SET k v``, ``HSET``, ``SADD``, ``DEL``...). Anything absent
#: (``INCR``, ``LPUSH``, ``APPEND``, ``EVAL``...) is treated as non-idempotent.
IDEMPOTENT_COMMANDS: frozenset[str] = frozenset(
    {
        # keys and server
        "PING", "ECHO", "TIME", "INFO", "ROLE", "DBSIZE", "EXISTS", "TYPE", "TTL", "PTTL",
        "EXPIRETIME", "PEXPIRETIME", "KEYS", "SCAN", "RANDOMKEY", "OBJECT", "MEMORY USAGE", "TOUCH",
        "SORT_RO", "EVAL_RO", "EVALSHA_RO", "FCALL_RO", "LASTSAVE", "CONFIG GET", "CLIENT ID",
        # strings
        "GET", "MGET", "STRLEN", "GETRANGE", "SUBSTR", "GETBIT", "BITCOUNT", "BITPOS", "LCS",
        # hashes
        "HGET", "HGETALL", "HMGET", "HKEYS", "HVALS", "HLEN", "HEXISTS", "HSTRLEN", "HSCAN", "HRANDFIELD",
        # lists
        "LRANGE", "LLEN", "LINDEX", "LPOS",
        # sets
        "SMEMBERS", "SISMEMBER", "SMISMEMBER", "SCARD", "SRANDMEMBER", "SINTER", "SUNION", "SDIFF",
        "SINTERCARD", "SSCAN",
        # sorted sets
        "ZRANGE", "ZRANGEBYSCORE", "ZREVRANGE", "ZREVRANGEBYSCORE", "ZRANGEBYLEX", "ZREVRANGEBYLEX",
        "ZSCORE", "ZMSCORE", "ZRANK", "ZREVRANK", "ZCARD", "ZCOUNT", "ZLEXCOUNT", "ZSCAN",
        "ZRANDMEMBER", "ZUNION", "ZINTER", "ZDIFF", "ZINTERCARD",
        # streams, geo, hyperloglog
        "XRANGE", "XREVRANGE", "XLEN", "GEOPOS", "GEODIST", "GEOHASH", "GEOSEARCH", "GEORADIUS_RO",
        "GEORADIUSBYMEMBER_RO", "PFCOUNT",
        # writes that set an absolute state: applying them twice leaves the same data
        "MSET", "SETEX", "PSETEX", "HSET", "HMSET", "SADD", "SREM", "ZREM", "DEL", "UNLINK", "HDEL",
        "EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT", "PERSIST",
    }
)  # fmt: skip

# Options after which SET is no longer idempotent: it returns or depends on the previous value.
_SET_CONDITIONAL = frozenset({"NX", "XX", "GET"})
# ZADD flags that make it depend on the previous score.
_ZADD_CONDITIONAL = frozenset({"NX", "XX", "GT", "LT", "INCR"})


def is_idempotent(args: Sequence[Any]) -> bool:
    """Whether the command *args* may be sent twice (see :data:`IDEMPOTENT_COMMANDS`).

    ``SET key value`` is idempotent, with ``EX``/``PX``/``KEEPTTL`` too, but not
    with ``NX``, ``XX`` or ``GET``; ``ZADD`` only without ``NX/XX/GT/LT/INCR``.
    """
    if not args:
        return False
    name = _command_name(args[0])
    if name == "SET":
        return not any(_upper(a) in _SET_CONDITIONAL for a in args[3:])
    if name == "ZADD":
        return not any(_upper(a) in _ZADD_CONDITIONAL for a in args[2:])
    return name in IDEMPOTENT_COMMANDS


def _upper(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode().upper()
        except UnicodeDecodeError:
            return None
    return value.upper() if isinstance(value, str) else None


def _command_name(value: Any) -> str:
    return (_upper(value) or "").strip()


class CommandNotSent(RedisError):
    """Internal: the lease failed, nothing of the command was sent."""


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
        if isinstance(exc, (CommandNotSent, ReadOnlyError, BusyLoadingError)):
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
        pool = client.connection_pool if client is not None else self.pool(endpoint)
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
            what = "timed out connecting" if isinstance(exc, TimeoutError) else _redacted(endpoint, exc)
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
            return await self.client(endpoint).parse_response(conn, args[0], **options)
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
        pipe.connection = conn
        return pipe

    async def execute_pipeline(
        self, endpoint: Endpoint, stack: list[tuple[tuple[Any, ...], dict[str, Any]]], transaction: bool, raise_on_error: bool
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


def _redacted(endpoint: Endpoint, exc: BaseException) -> str:
    return describe_exception(exc, endpoint.secrets)


CommandStack = list[tuple[tuple[Any, ...], dict[str, Any]]]


class RedisStore(RedisSurface, AsyncCoreCommands):  # type: ignore[misc]
    """The Redis side of :class:`~failover.Databases` (``dbs.redis``).

    It has the command methods of ``redis.asyncio.Redis`` (``get``, ``set``,
    ``incr``, ``hset``, ``lpush``, ``zadd``, ``scan_iter``, ...), with redis-py's
    own argument handling and reply parsing; each command runs on the active
    endpoint at call time. Reads and idempotent writes are retried on the other
    endpoint after any connection failure; other commands only when they were not
    sent, else :class:`~failover.errors.OutcomeUnknown` is raised.

    Replies are bytes unless the URL says ``?decode_responses=True`` (give both
    URLs the same setting).
    """

    def __init__(self, store: FailoverStore[Any], backend: RedisBackend) -> None:
        self.failover = store
        self.backend = backend
        # Change capture of writes served by the fallback (None: reconcile is off).
        self.capture: Any = store.reconciler.capture if store.reconciler is not None else None

    def __repr__(self) -> str:
        return f"<RedisStore {self.failover.status()['current_db']!r}>"

    # --- what redis-py's command mixins need ----------------------------------------------

    def _reference(self) -> Redis:
        # Encoder and connection options come from the first configured endpoint.
        endpoint = next(iter(self.failover.endpoints.values()))
        return self.backend.client(endpoint)

    def get_encoder(self) -> Any:
        return self._reference().get_encoder()

    def get_connection_kwargs(self) -> dict[str, Any]:
        return dict(self._reference().get_connection_kwargs())

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        """Run one command on the active endpoint (every command method ends here)."""
        if args and args[0] in BLOCKING_COMMANDS:
            # BLPOP, XREAD BLOCK, WAIT...: their own timeout, in slices that follow a switch.
            return await run_blocking(self, args, options)
        result, _ = await self._execute(args, options)
        return result

    async def _execute(
        self, args: tuple[Any, ...], options: dict[str, Any], *, idempotent: bool | None = None, timeout: float | None = None
    ) -> tuple[Any, Role]:
        backend = self.backend
        capture = self.capture

        async def run(endpoint: Endpoint) -> tuple[Any, Role]:
            if capture is not None and endpoint.role is Role.FALLBACK:
                # Writes on the fallback carry their capture mark (see redis_capture).
                return await capture.execute(backend, endpoint, args, options), endpoint.role
            return await backend.execute(endpoint, args, options), endpoint.role  # it unpacks **options: no copy

        label = _command_name(args[0]) if args else "command"
        if idempotent is None:
            idempotent = is_idempotent(args)
        result = await self.failover.run(run, idempotent=idempotent, timeout=timeout, label=f"Redis {label}")
        if type(result[0]) is Polled:
            return await self._poll(run, args, label, result)
        return result

    async def _poll(
        self, run: Callable[[Endpoint], Awaitable[tuple[Any, Role]]], args: tuple[Any, ...], label: str, first: tuple[Any, Role]
    ) -> tuple[Any, Role]:
        """A blocking command (``BLPOP``...) served by the fallback: inside the capture's
        ``MULTI`` it answers at once, so it is tried again until its own timeout. Each try is
        a routed operation of its own: a failback in between sends the next try to the primary."""
        polled: Polled = first[0]
        deadline = None if polled.timeout <= 0 else time.monotonic() + polled.timeout
        result = first
        while type(result[0]) is Polled:
            if deadline is not None and time.monotonic() >= deadline:
                return result[0].reply, result[1]
            await asyncio.sleep(BLOCKING_POLL_INTERVAL)
            result = await self.failover.run(run, idempotent=is_idempotent(args), label=f"Redis {label}")
        return result

    # --- iteration and pipelines ----------------------------------------------------------

    async def scan_iter(  # type: ignore[override]
        self, match: Any = None, count: int | None = None, _type: str | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """Iterate over keys with ``SCAN``, every step on the same endpoint.

        A cursor means something only to the server that made it. When the active
        endpoint changes during the iteration, the scan starts over on the new one;
        keys may then be returned twice, which ``SCAN`` allows anyway.
        """
        cursor: Any = "0"
        origin: Role | None = None
        while True:
            pieces: list[Any] = ["SCAN", cursor]
            if match is not None:
                pieces += ["MATCH", match]
            if count is not None:
                pieces += ["COUNT", count]
            if _type is not None:
                pieces += ["TYPE", _type]
            (cursor, keys), served_by = await self._execute(tuple(pieces), dict(kwargs))
            if origin is not None and served_by is not origin:
                logger.info("SCAN restarted on the %s after a switch", served_by)
                origin, cursor = served_by, "0"
                continue
            origin = served_by
            for key in keys:
                yield key
            if cursor == 0:
                return

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> RedisPipeline:
        """A pipeline (``MULTI``/``EXEC`` when *transaction*) that runs wholly on one endpoint."""
        return RedisPipeline(self, transaction)

    # --- status ---------------------------------------------------------------------------

    @property
    def active_endpoint(self) -> Endpoint | None:
        """The endpoint serving traffic now (see :attr:`FailoverStore.active_endpoint`)."""
        return self.failover.active_endpoint

    def status(self) -> dict[str, Any]:
        return self.failover.status()

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Close every pool (``Databases.close()`` does it for you)."""
        await self._close_surface()
        for endpoint in self.failover.endpoints.values():
            await self.backend.close(endpoint)


class RedisPipeline(AsyncCoreCommands):  # type: ignore[misc]
    """Commands queued and sent together to one endpoint, the one active at ``execute()``.

    A pipeline that fails before it was sent is retried on the other endpoint; one
    that fails after is retried only when every command in it is idempotent,
    otherwise :class:`~failover.errors.OutcomeUnknown` is raised.

    ``WATCH`` binds the pipeline to the active endpoint at that moment: the
    following commands and ``execute()`` run there, never elsewhere (a lost
    connection then raises redis-py's ``WatchError`` or ``OutcomeUnknown``).
    """

    def __init__(self, store: RedisStore, transaction: bool) -> None:
        self._store = store
        self.is_transaction = transaction
        self.command_stack: CommandStack = []
        self.explicit_transaction = False
        self._bound: tuple[Endpoint, Pipeline] | None = None

    def get_encoder(self) -> Any:
        return self._store.get_encoder()

    def get_connection_kwargs(self) -> dict[str, Any]:
        return self._store.get_connection_kwargs()

    def __len__(self) -> int:
        return len(self.command_stack)

    def __bool__(self) -> bool:
        return True

    def __await__(self) -> Generator[Any, None, RedisPipeline]:
        async def itself() -> RedisPipeline:
            return self

        return itself().__await__()

    async def __aenter__(self) -> RedisPipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.reset()

    def execute_command(self, *args: Any, **options: Any) -> Any:
        if (self._bound is not None or _command_name(args[0]) == "WATCH") and not self.explicit_transaction:
            return self._immediate(args, options)
        self.command_stack.append((args, options))
        return self

    def multi(self) -> None:
        """Start the transaction after ``WATCH``; end it with :meth:`execute`."""
        if self.explicit_transaction:
            raise RedisError("Cannot issue nested calls to MULTI")
        if self.command_stack:
            raise RedisError("Commands without an initial WATCH have already been issued")
        self.explicit_transaction = True
        if self._bound is not None:
            self._bound[1].multi()

    async def watch(self, *names: Any) -> Any:
        if self.explicit_transaction:
            raise RedisError("Cannot issue a WATCH after a MULTI")
        return await self.execute_command("WATCH", *names)

    async def unwatch(self) -> Any:
        if self._bound is None:
            return True
        return await self.execute_command("UNWATCH")

    async def _immediate(self, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
        store, backend = self._store.failover, self._store.backend
        if self._bound is None:
            transaction = self.is_transaction

            async def bind(endpoint: Endpoint) -> tuple[Endpoint, Pipeline]:
                return endpoint, await backend.bind_pipeline(endpoint, transaction)

            # Leasing sends nothing, so it may be tried on either endpoint.
            self._bound = await store.run(bind, idempotent=True, label="Redis WATCH")
        endpoint, pipe = self._bound
        try:
            capture = self._store.capture
            if capture is not None and endpoint.role is Role.FALLBACK:
                # Outside MULTI on a watched connection: the mark goes just before the write.
                await capture.mark_before(pipe, args)
            return await pipe.immediate_execute_command(*args, **options)
        except Exception as exc:
            mapped = store.lost_during(endpoint, exc, f"Redis {_command_name(args[0])}")
            if mapped is exc:
                raise
            raise mapped from exc

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send the queued commands; return their replies in order."""
        stack, self.command_stack = self.command_stack, []
        store, backend = self._store.failover, self._store.backend
        try:
            if self._bound is not None:
                endpoint, pipe = self._bound
                capture = self._store.capture
                try:
                    if capture is not None and endpoint.role is Role.FALLBACK:
                        return await capture.execute_bound(pipe, stack, raise_on_error)
                    pipe.command_stack = stack
                    return await pipe.execute(raise_on_error=raise_on_error)
                except Exception as exc:
                    mapped = store.lost_during(endpoint, exc, "Redis pipeline")
                    if mapped is exc:
                        raise
                    raise mapped from exc
            if not stack:
                return []
            transaction = self.is_transaction or self.explicit_transaction
            capture = self._store.capture

            async def run(endpoint: Endpoint) -> list[Any]:
                if capture is not None and endpoint.role is Role.FALLBACK:
                    return await capture.execute_pipeline(backend, endpoint, stack, transaction, raise_on_error)
                return await backend.execute_pipeline(endpoint, stack, transaction, raise_on_error)

            idempotent = all(is_idempotent(args) for args, _ in stack)
            label = "Redis MULTI/EXEC" if transaction else "Redis pipeline"
            return await store.run(run, idempotent=idempotent, label=label)
        finally:
            await self.reset()

    async def reset(self) -> None:
        """Forget queued commands and release a connection held by ``WATCH``."""
        self.command_stack = []
        self.explicit_transaction = False
        bound, self._bound = self._bound, None
        if bound is not None:
            try:
                await bound[1].reset()
            except (RedisError, OSError):
                logger.debug("resetting a watched pipeline on %s failed", bound[0].name)

    async def aclose(self) -> None:
        await self.reset()


def create(
    settings: Any, endpoints: list[Endpoint], options: StoreOptions, bus: EventBus, clock: Clock
) -> RedisStore:
    """Build the Redis store for :class:`~failover.Databases`."""
    backend = RedisBackend(
        pool_max_size=settings.pool_max_size,
        connect_timeout=settings.connect_timeout,
        socket_timeout=None,  # every routed command and probe is bounded by its attempt clock
    )
    capture = None
    if options.reconcile and len(endpoints) == 2:
        capture = RedisCapture(connect_timeout=settings.connect_timeout)
    return RedisStore(FailoverStore(backend, endpoints, options, bus=bus, clock=clock, capture=capture), backend)
