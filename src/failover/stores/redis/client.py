"""``dbs.redis``: the command methods of ``redis.asyncio.Redis``, each routed by the failover core.

Known limits: ``scan_iter`` keeps a whole iteration on one endpoint but
``hscan_iter``/``sscan_iter``/``zscan_iter`` route each step on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from redis.asyncio import Redis
from redis.commands.core import AsyncCoreCommands

from ...core.endpoint import Endpoint, Role
from ...core.store import FailoverStore
from .backend import RedisBackend
from .blocking import BLOCKING_COMMANDS, run_blocking
from .capture import BLOCKING_POLL_INTERVAL, Polled
from .commands import command_name, is_idempotent
from .pipeline import RedisPipeline
from .surface import RedisSurface

__all__ = ["RedisStore"]

logger = logging.getLogger("failover.redis")


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

    if TYPE_CHECKING:
        # redis-py 8 picks each command's awaitable return type by this marker of redis.asyncio.Redis.
        _is_async_client: Literal[True]

    def __init__(self, store: FailoverStore[Any], backend: RedisBackend) -> None:
        self.failover = store
        self.backend = backend
        # Change capture of writes served by the fallback (None: reconcile is off).
        self.capture: Any = store.reconciler.capture if store.reconciler is not None else None
        # Warm sync's mirror: told of every command the primary served (None: warm sync is off).
        self.mirror: Any = None

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
        mirror = self.mirror

        async def run(endpoint: Endpoint) -> tuple[Any, Role]:
            if capture is not None and endpoint.role is Role.FALLBACK:
                # Writes on the fallback carry their capture mark (see .capture).
                return await capture.execute(backend, endpoint, args, options), endpoint.role
            reply = await backend.execute(endpoint, args, options)  # it unpacks **options: no copy
            if mirror is not None and endpoint.role is Role.PRIMARY:
                mirror.note(args)  # warm sync copies the keys it wrote (never blocks)
            return reply, endpoint.role

        label = command_name(args[0]) if args else "command"
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
        return RedisPipeline(self, transaction)  # type: ignore[abstract]  # redis-py 8's CommandsProtocol declares _event_dispatcher; the command mixins never use it

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

