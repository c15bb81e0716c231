"""The rest of ``redis.asyncio.Redis`` on ``dbs.redis``: locks, pub/sub, transactions, modules.

:class:`~failover.stores.redis.RedisStore` gets redis-py's command methods from
``AsyncCoreCommands``; this mixin adds every other public method of
``redis.asyncio.Redis`` (redis-py 5.2 through 8.x), each with redis-py's
signature, either routed or refused with :class:`~failover.errors.NotRoutable`
(the message says why and what to use). ``tests/unit/test_driver_surface.py``
enumerates redis-py's methods, so a release that adds one is noticed.

Routed: ``lock()`` (see :mod:`.lock`), ``pubsub()`` (see
:mod:`.pubsub`), ``keyspace_notifications()`` (built on ``pubsub()``),
``transaction()`` (redis-py's loop over a routed pipeline with ``WATCH``),
module commands (``json()``, ``ft()``, ``ts()``, ``bf()``, ...: each command is
routed; their own ``pipeline()`` is not), sentinel commands (sent to the active
endpoint, as redis-py would to its server), ``set_response_callback()``,
``load_external_module()``, ``initialize()`` / ``await dbs.redis``.

Refused: ``monitor()`` (it streams one server's command log), ``client()`` (a
connection pinned to one server), ``set_retry()`` (redis-py's retries would
re-send non-idempotent commands), ``from_url()`` / ``from_pool()`` (failover
builds its own clients), the experimental ``himport_*`` fieldsets of redis-py
8.1 (prepared per connection).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.connection import ConnectionPool
from redis.commands.redismodules import AsyncRedisModuleCommands
from redis.commands.sentinel import AsyncSentinelCommands
from redis.exceptions import NoScriptError

from ...core.endpoint import Role
from ...errors import NotRoutable
from .lock import RoleEpoch, failover_lock_class
from .pubsub import RoutedPubSub, pubsub_pool

__all__ = ["NOT_ROUTED", "RedisSurface"]

#: Public methods of ``redis.asyncio.Redis`` that ``dbs.redis`` refuses, and why.
NOT_ROUTED: dict[str, str] = {
    "monitor": "MONITOR streams the commands of one server, and a stream cannot move to another "
    "server without losing its place; open redis.asyncio.Redis.from_url(URL).monitor() on the server you want to watch",
    "client": "it pins one connection to one server, which cannot fail over; use dbs.redis itself, or a "
    "pipeline with watch() for a transaction bound to one connection",
    "set_retry": "failover decides what is retried and where; redis-py's retries would re-send commands "
    "such as INCR whose reply was lost",
    "from_url": "dbs.redis is built by failover.Databases from UPSTASH_REDIS_URL and REDIS_URL",
    "from_pool": "dbs.redis is built by failover.Databases from UPSTASH_REDIS_URL and REDIS_URL",
    "himport_prepare": "HIMPORT fieldsets (experimental in redis-py) are prepared per connection and do not follow a switch",
    "himport_discard": "HIMPORT fieldsets (experimental in redis-py) are prepared per connection and do not follow a switch",
    "himport_discard_all": "HIMPORT fieldsets (experimental in redis-py) are prepared per connection and do not follow a switch",
    "himport_registry": "HIMPORT fieldsets (experimental in redis-py) are prepared per connection and do not follow a switch",
    "himport_set": "HIMPORT fieldsets (experimental in redis-py) are prepared per connection and do not follow a switch",
}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _refused(name: str) -> Callable[..., Any]:
    original = inspect.getattr_static(Redis, name, None)
    original = getattr(original, "__func__", original)  # a classmethod's function, cls included

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise NotRoutable("redis", name, NOT_ROUTED[name])

    refuse.__name__ = name
    refuse.__doc__ = f"Not available through failover: {NOT_ROUTED[name]}."
    if callable(original):
        refuse.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
    return refuse


def _borrowed(name: str) -> Callable[..., Any]:
    """redis-py's own implementation of *name*, run on ``dbs.redis`` (it only calls routed methods)."""
    function = getattr(Redis, name)

    @functools.wraps(function)
    def borrowed(self: Any, *args: Any, **kwargs: Any) -> Any:
        return function(self, *args, **kwargs)

    return borrowed


class RedisSurface(AsyncRedisModuleCommands, AsyncSentinelCommands):  # type: ignore[misc]
    """Mixin of :class:`~failover.stores.redis.RedisStore`: the methods of ``redis.asyncio.Redis``
    that are not plain commands. Needs ``failover``, ``backend`` and ``_reference()``."""

    failover: Any
    backend: Any
    _reference: Callable[[], Redis]
    if TYPE_CHECKING:
        execute_command: Callable[..., Awaitable[Any]]  # RedisStore's

    # --- locks ------------------------------------------------------------------------------

    def lock(
        self,
        name: Any,
        timeout: float | None = None,
        sleep: float = 0.1,
        blocking: bool = True,
        blocking_timeout: float | None = None,
        lock_class: type | None = None,
        thread_local: bool = True,
        raise_on_release_error: bool = True,
    ) -> Any:
        """redis-py's ``Lock`` on the active endpoint; a lock acquired before a switch is lost
        (``owned()``/``extend()``/``release()`` raise ``LockError``). See :mod:`.lock`."""
        cls = failover_lock_class(lock_class)
        extra: dict[str, Any] = {}
        if "raise_on_release_error" in inspect.signature(cls.__init__).parameters:
            extra["raise_on_release_error"] = raise_on_release_error
        # self is a Redis look-alike (Lock only calls its command methods): hence the ignore below.
        return cls(
            self, name, timeout=timeout, sleep=sleep, blocking=blocking, blocking_timeout=blocking_timeout,  # type: ignore[arg-type]
            thread_local=thread_local, **extra,
        )  # fmt: skip

    def _role_epoch(self) -> RoleEpoch:
        epoch = self.__dict__.get("_failover_role_epoch")
        if epoch is None:
            epoch = self.__dict__["_failover_role_epoch"] = RoleEpoch(self.failover)
        return epoch

    # --- pub/sub ----------------------------------------------------------------------------

    def pubsub(self, **kwargs: Any) -> RoutedPubSub:
        """redis-py's ``PubSub``, re-subscribed on the new endpoint after a switch, reporting the
        gap (``report_gaps=False`` leaves out the gap message). See :mod:`.pubsub`."""
        return RoutedPubSub(self, **kwargs)

    def _pubsub_pool(self, role: Role) -> ConnectionPool:
        pools: dict[Role, ConnectionPool] = self.__dict__.setdefault("_failover_pubsub_pools", {})
        pool = pools.get(role)
        if pool is None:
            pool = pools[role] = pubsub_pool(self.backend.pool(self.failover.endpoints[role]))
        return pool

    if hasattr(Redis, "keyspace_notifications"):  # redis-py 8
        keyspace_notifications = _borrowed("keyspace_notifications")

    # --- scripts: a script loaded on one endpoint is loaded on the other when needed ----------

    async def script_load(self, script: Any) -> Any:
        """``SCRIPT LOAD`` on the active endpoint; the script is remembered, so an ``EVALSHA`` of it
        that reaches an endpoint without it (after a switch) loads it there and runs."""
        sha = await super().script_load(script)  # type: ignore[misc]
        self.__dict__.setdefault("_failover_scripts", {})[_text(sha)] = script
        return sha

    async def evalsha(self, sha: Any, numkeys: int, *keys_and_args: Any) -> Any:
        return await self._evalsha_loading("evalsha", sha, numkeys, *keys_and_args)

    async def evalsha_ro(self, sha: Any, numkeys: int, *keys_and_args: Any) -> Any:
        return await self._evalsha_loading("evalsha_ro", sha, numkeys, *keys_and_args)

    async def _evalsha_loading(self, method: str, sha: Any, numkeys: int, *keys_and_args: Any) -> Any:
        run = getattr(super(), method)
        try:
            return await run(sha, numkeys, *keys_and_args)
        except NoScriptError:
            # NOSCRIPT: nothing ran. A script we saw loaded is loaded on this endpoint too.
            script = self.__dict__.get("_failover_scripts", {}).get(_text(sha))
            if script is None:
                raise
            await self.execute_command("SCRIPT LOAD", script)
            return await run(sha, numkeys, *keys_and_args)

    # --- transactions, callbacks, modules ---------------------------------------------------

    transaction = _borrowed("transaction")
    load_external_module = _borrowed("load_external_module")

    def set_response_callback(self, command: str, callback: Callable[..., Any]) -> None:
        """Set a custom response callback, on the client of every endpoint."""
        for endpoint in self.failover.endpoints.values():
            self.backend.client(endpoint).set_response_callback(command, callback)

    async def parse_response(self, connection: Any, command_name: Any, **options: Any) -> Any:
        """redis-py's reply parsing (response callbacks are the same on every endpoint)."""
        return await self._reference().parse_response(connection, command_name, **options)

    def get_retry(self) -> Any:
        """The ``Retry`` of the pooled connections: zero retries (failover decides what is retried)."""
        return self._reference().get_retry()

    async def initialize(self) -> Any:
        """Nothing to do (``Databases.start()`` opened the pools); returns ``dbs.redis``."""
        return self

    def __await__(self) -> Any:
        return self.initialize().__await__()

    async def _close_surface(self) -> None:
        """Close the subscribers' pools and stop following the switch (``aclose()`` calls it)."""
        for pool in self.__dict__.pop("_failover_pubsub_pools", {}).values():
            await pool.disconnect()
        epoch = self.__dict__.pop("_failover_role_epoch", None)
        if epoch is not None:
            epoch.close()

    async def close(self, close_connection_pool: bool | None = None) -> None:
        """Alias of ``aclose()`` (deprecated in redis-py)."""
        await self.aclose()  # type: ignore[attr-defined]

    monitor = _refused("monitor")
    client = _refused("client")
    set_retry = _refused("set_retry")
    from_url = classmethod(_refused("from_url"))
    from_pool = classmethod(_refused("from_pool"))
    himport_prepare = _refused("himport_prepare")
    himport_discard = _refused("himport_discard")
    himport_discard_all = _refused("himport_discard_all")
    himport_set = _refused("himport_set")

    @property
    def himport_registry(self) -> Any:
        raise NotRoutable("redis", "himport_registry", NOT_ROUTED["himport_registry"])
