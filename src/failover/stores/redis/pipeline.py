"""Redis pipelines and ``MULTI``/``EXEC`` that run wholly on one endpoint."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncCoreCommands
from redis.exceptions import RedisError

from ...core.endpoint import Endpoint, Role
from .backend import CommandStack
from .commands import command_name, is_idempotent

if TYPE_CHECKING:
    from .client import RedisStore

__all__ = ["RedisPipeline"]

logger = logging.getLogger("failover.redis")


class RedisPipeline(AsyncCoreCommands):  # type: ignore[misc]
    """Commands queued and sent together to one endpoint, the one active at ``execute()``.

    A pipeline that fails before it was sent is retried on the other endpoint; one
    that fails after is retried only when every command in it is idempotent,
    otherwise :class:`~failover.errors.OutcomeUnknown` is raised.

    ``WATCH`` binds the pipeline to the active endpoint at that moment: the
    following commands and ``execute()`` run there, never elsewhere (a lost
    connection then raises redis-py's ``WatchError`` or ``OutcomeUnknown``).
    From binding to :meth:`reset` (which ``execute()`` and ``async with`` call)
    the pipeline counts as an operation in flight: a reconcile's final catch-up
    waits for it, so an ``EXEC`` bound to the fallback never lands there after
    failback (where only a later sweep would copy it, over newer writes).
    """

    def __init__(self, store: RedisStore, transaction: bool) -> None:
        self._store = store
        self.is_transaction = transaction
        self.command_stack: CommandStack = []
        self.explicit_transaction = False
        self._bound: tuple[Endpoint, Pipeline] | None = None
        # Counts this pipeline in its store's admission gate while bound; called once, by reset() or,
        # for a pipeline dropped without one, by its garbage collection (a count left behind would
        # make every later final catch-up wait out its whole hold).
        self._in_flight: weakref.finalize[..., Any] | None = None

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
        if (self._bound is not None or command_name(args[0]) == "WATCH") and not self.explicit_transaction:
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

    # As in redis-py's own async Pipeline: WATCH/UNWATCH are awaited and return the reply.
    async def watch(self, *names: Any) -> Any:  # type: ignore[override]
        if self.explicit_transaction:
            raise RedisError("Cannot issue a WATCH after a MULTI")
        return await self.execute_command("WATCH", *names)

    async def unwatch(self) -> Any:  # type: ignore[override]
        if self._bound is None:
            return True
        return await self.execute_command("UNWATCH")

    async def _immediate(self, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
        store, backend = self._store.failover, self._store.backend
        if self._bound is None:
            transaction = self.is_transaction

            async def bind(endpoint: Endpoint) -> tuple[Endpoint, Pipeline]:
                pipe = await backend.bind_pipeline(endpoint, transaction)
                # Counted while run() still counts the bind: a final catch-up that began meanwhile
                # waits for the pipeline as well (counted after run(), it could be let through).
                self._leave()
                admission = store.admission
                admission.enter()
                self._in_flight = weakref.finalize(self, admission.leave_on, asyncio.get_running_loop())
                self._in_flight.atexit = False
                return endpoint, pipe

            # Leasing sends nothing, so it may be tried on either endpoint.
            self._bound = await store.run(bind, idempotent=True, label="Redis WATCH")
        endpoint, pipe = self._bound
        try:
            capture = self._store.capture
            if capture is not None and endpoint.role is Role.FALLBACK:
                # Outside MULTI on a watched connection: the mark goes just before the write.
                await capture.mark_before(pipe, args)
            reply = await pipe.immediate_execute_command(*args, **options)
            mirror = self._store.mirror
            if mirror is not None and endpoint.role is Role.PRIMARY:
                mirror.note(args)
            return reply
        except Exception as exc:
            mapped = store.lost_during(endpoint, exc, f"Redis {command_name(args[0])}")
            if mapped is exc:
                raise
            # The connection is lost, and with it the WATCH: counted out now, so that an error kept
            # alive (with this pipeline in its frames) holds no count until reset() or collection.
            self._leave()
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
                    pipe.command_stack = stack  # type: ignore[assignment]  # redis-py 8 types the stack with str|bytes args (list invariance): same tuples
                    replies = await pipe.execute(raise_on_error=raise_on_error)
                    mirror = self._store.mirror
                    if mirror is not None and endpoint.role is Role.PRIMARY:
                        mirror.note_many(stack)
                    return replies
                except Exception as exc:
                    mapped = store.lost_during(endpoint, exc, "Redis pipeline")
                    if mapped is exc:
                        raise
                    raise mapped from exc
            if not stack:
                return []
            transaction = self.is_transaction or self.explicit_transaction
            capture = self._store.capture

            mirror = self._store.mirror

            async def run(endpoint: Endpoint) -> list[Any]:
                if capture is not None and endpoint.role is Role.FALLBACK:
                    return await capture.execute_pipeline(backend, endpoint, stack, transaction, raise_on_error)
                replies = await backend.execute_pipeline(endpoint, stack, transaction, raise_on_error)
                if mirror is not None and endpoint.role is Role.PRIMARY:
                    mirror.note_many(stack)  # warm sync copies the keys it wrote
                return replies

            idempotent = all(is_idempotent(args) for args, _ in stack)
            label = "Redis MULTI/EXEC" if transaction else "Redis pipeline"
            return await store.run(run, idempotent=idempotent, label=label)
        finally:
            await self.reset()

    def _leave(self) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight()

    # The pipeline's reset() (as redis-py's Pipeline.reset), not the RESET command of the mixin.
    async def reset(self) -> None:  # type: ignore[override]
        """Forget queued commands and release a connection held by ``WATCH``."""
        self.command_stack = []
        self.explicit_transaction = False
        bound, self._bound = self._bound, None
        self._leave()
        if bound is not None:
            try:
                await bound[1].reset()
            except (RedisError, OSError):
                logger.debug("resetting a watched pipeline on %s failed", bound[0].name)

    async def aclose(self) -> None:
        await self.reset()

