"""``dbs.redis.pubsub()``: redis-py's ``PubSub`` whose subscriptions follow the active endpoint.

Pub/sub in Redis is fire-and-forget: a message reaches the clients subscribed
*on that server at that moment*. Publishers use ``dbs.redis.publish()``, which
goes to the active endpoint, so subscribers must be there too. A
:class:`RoutedPubSub` is a redis-py ``redis.asyncio.client.PubSub`` (same
methods, same messages) that:

* connects to the endpoint active when it first connects;
* moves when the store switches (failover, failback) or when its connection
  breaks: it drops the old connection, waits (at most
  ``FAILOVER_OPERATION_TIMEOUT``) for the switch to name a usable endpoint,
  connects there and subscribes again to every channel and pattern (with
  their handlers), using redis-py's own re-subscription (``on_connect``);
* reports the gap, since messages published while it moved are lost by
  Redis's design: a :class:`SubscriptionsMoved` event on ``dbs.bus``, a
  message ``{"type": "failover", "pattern": None, "channel": None, "data":
  {...}}`` from ``get_message()``/``listen()`` (turn it off with
  ``pubsub(report_gaps=False)``), and the counters :attr:`RoutedPubSub.gaps` /
  :attr:`RoutedPubSub.last_gap`.

A blocked ``listen()``/``get_message(timeout=...)`` on an endpoint the store
left (a failback: the fallback is still up, but publishers now use the primary)
is interrupted at once and resumes on the new endpoint.

Each pub/sub object holds one connection of its own (redis-py does the same),
from a pool separate from the command pool, so subscribers never take the
connections that commands need.

If no endpoint can be reached within the operation timeout,
:class:`~failover.errors.NoEndpointAvailable` is raised from the read; the
subscriptions are kept and the next read tries again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import PubSub
from redis.asyncio.connection import ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...core.endpoint import Role
from ...core.events import Event, StateChanged
from ...core.reasons import describe_exception
from ...errors import NoEndpointAvailable
from .lock import active_role

__all__ = ["GAP_MESSAGE_TYPE", "RoutedPubSub", "SubscriptionsMoved", "pubsub_pool"]

logger = logging.getLogger("failover.redis.pubsub")

GAP_MESSAGE_TYPE = "failover"
"""The ``type`` of the message that reports a gap (see the module docstring)."""

MOVE_POLL_INTERVAL = 0.05
"""Seconds between two looks at the switch while a pub/sub object waits for a usable endpoint."""

_LOST = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class SubscriptionsMoved(Event):
    """A pub/sub object re-subscribed on another connection: messages published meanwhile are lost."""

    from_role: Role | None
    to_role: Role
    endpoint: str
    channels: tuple[str, ...]
    patterns: tuple[str, ...]
    gap_s: float
    reason: str


def pubsub_pool(command_pool: Any) -> ConnectionPool:
    """A pool with the connection settings of *command_pool* and no size limit, for subscribers."""
    return ConnectionPool(connection_class=command_pool.connection_class, **command_pool.connection_kwargs)


def _text(name: Any) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, (bytes, bytearray)) else str(name)


class RoutedPubSub(PubSub):
    """redis-py's ``PubSub``, re-established on the active endpoint after each switch.

    Build it with ``dbs.redis.pubsub(**kwargs)`` (redis-py's keyword arguments,
    plus ``report_gaps``). See the module docstring.

    Attributes:
        gaps: how many times the subscriptions moved (each one a window of lost messages).
        last_gap: the :class:`SubscriptionsMoved` of the last move, or None.
        endpoint_role: the role of the endpoint the subscriptions live on now.
    """

    def __init__(self, redis: Any, *, report_gaps: bool = True, **kwargs: Any) -> None:
        self._redis = redis
        self._failover = redis.failover
        role = self._failover.active_role or self._failover.preferred_role
        self.endpoint_role: Role = role
        super().__init__(redis._pubsub_pool(role), **kwargs)
        self.report_gaps = report_gaps
        self.gaps = 0
        self.last_gap: SubscriptionsMoved | None = None
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._stale: str | None = None  # why the subscriptions must move before the next read
        self._switched: asyncio.Event | None = None
        self._moving = False
        self._lost_at: float | None = None
        reference = weakref.ref(self)
        bus = self._failover.bus

        def listener(event: Any) -> None:
            me = reference()
            if me is None:
                unsubscribe()
                return
            me._on_event(event)

        unsubscribe = bus.subscribe(listener)
        self._unsubscribe_events = unsubscribe

    # --- following the switch -------------------------------------------------------------

    def _on_event(self, event: Any) -> None:
        if not isinstance(event, StateChanged) or event.store != self._failover.name:
            return
        target = active_role(event.to_state)
        if target is not None and target is not self.endpoint_role and self.connection is not None:
            self._mark_stale(f"the redis store switched ({event.from_state} -> {event.to_state}: {event.reason})")

    def _mark_stale(self, reason: str) -> None:
        if self._stale is None:
            self._stale = reason
            self._lost_at = time.monotonic()
        if self._switched is not None:
            self._switched.set()

    def _lost(self, exc: BaseException) -> str:
        endpoint = self._failover.endpoints[self.endpoint_role]
        reason = f"the subscription connection to {endpoint.name} failed: {describe_exception(exc, endpoint.secrets)}"
        self._failover.record_failure(self.endpoint_role, reason)
        self._mark_stale(reason)
        return reason

    async def _drop_connection(self) -> None:
        connection, self.connection = self.connection, None
        if connection is None:
            return
        connection.deregister_connect_callback(self.on_connect)
        with contextlib.suppress(RedisError, OSError):
            await connection.disconnect(nowait=True)
        with contextlib.suppress(RedisError, OSError):
            await self.connection_pool.release(connection)

    async def _move(self) -> None:
        """Re-establish every subscription on the endpoint the switch names (bounded wait)."""
        reason = self._stale or "reconnecting"
        lost_at = self._lost_at or time.monotonic()
        previous = self.endpoint_role
        had_connection = self.connection is not None
        store = self._failover
        deadline = time.monotonic() + store.options.operation_timeout
        await self._drop_connection()
        failures: list[str] = []
        self._moving = True
        try:
            while True:
                role = store.active_role
                if role is not None:
                    endpoint = store.endpoints[role]
                    self.endpoint_role = role
                    self.connection_pool = self._redis._pubsub_pool(role)
                    try:
                        async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                            await PubSub.connect(self)
                            if self.subscribed:
                                # redis-py leaves PubSub.connection unannotated (inferred None); connect() set it.
                                await self.on_connect(self.connection)  # type: ignore[arg-type]
                        break
                    except (*_LOST, TimeoutError) as exc:
                        what = describe_exception(exc, endpoint.secrets) if str(exc) else "timed out"
                        failures.append(f"{endpoint.name}: {what}")
                        if not isinstance(exc, TimeoutError):
                            store.record_failure(role, f"subscribing again failed: {what}")
                        await self._drop_connection()
                if time.monotonic() >= deadline:
                    self._stale = reason  # the next read tries again
                    raise NoEndpointAvailable(
                        f"redis: no endpoint could take the subscriptions back within "
                        f"{store.options.operation_timeout:g}s ({'; '.join(failures[-2:]) or store._why_unavailable()})",
                        store=store.name,
                        endpoint=store.endpoints[previous].name,
                    )
                await asyncio.sleep(MOVE_POLL_INTERVAL)
        finally:
            self._moving = False
        self._stale = None
        self._lost_at = None
        if self._switched is not None:
            self._switched.clear()
        if had_connection:
            self._report(previous, reason, time.monotonic() - lost_at)

    def _report(self, previous: Role, reason: str, gap: float) -> None:
        endpoint = self._failover.endpoints[self.endpoint_role]
        event = SubscriptionsMoved(
            store=self._failover.name,
            at=self._failover.clock.wall(),
            from_role=previous,
            to_role=self.endpoint_role,
            endpoint=endpoint.name,
            channels=tuple(sorted(_text(c) for c in self.channels)),
            patterns=tuple(sorted(_text(p) for p in self.patterns)),
            gap_s=round(gap, 3),
            reason=reason,
        )
        self.gaps += 1
        self.last_gap = event
        logger.warning(
            "redis: %d subscription(s) moved to %s after %.3fs; messages published meanwhile are lost (%s)",
            len(event.channels) + len(event.patterns), endpoint.name, gap, reason,
        )
        self._failover.bus.emit(event)
        if self.report_gaps and self.subscribed:
            data = event.to_dict()
            self._pending.append({"type": GAP_MESSAGE_TYPE, "pattern": None, "channel": None, "data": data})

    # --- redis-py's I/O entry points, routed --------------------------------------------------

    async def connect(self) -> None:
        if self.connection is None and not self._moving:
            role = self._failover.active_role
            if role is not None and role is not self.endpoint_role:
                self.endpoint_role = role
                self.connection_pool = self._redis._pubsub_pool(role)
        await super().connect()

    async def execute_command(self, *args: Any) -> Any:
        """``SUBSCRIBE``, ``PING``...: sent on the active endpoint; after a lost connection, sent again
        once the subscriptions have moved (these commands are idempotent)."""
        if self._moving:
            return await super().execute_command(*args)
        if self._stale is not None:
            await self._move()
        try:
            return await super().execute_command(*args)
        except _LOST as exc:
            self._lost(exc)
        await self._move()
        return await super().execute_command(*args)

    async def parse_response(self, block: bool = True, timeout: float | None = 0) -> Any:
        """Read the next reply; None (no message this time) after the subscriptions moved."""
        # redis-py annotates timeout as float, yet its get_message(timeout=None) passes None (wait for ever).
        if self._moving:
            return await super().parse_response(block=block, timeout=timeout)  # type: ignore[arg-type]
        if self._stale is not None:
            await self._move()
            return None
        if self.connection is None:
            return await super().parse_response(block=block, timeout=timeout)  # type: ignore[arg-type]
        try:
            if not block and not timeout:
                return await super().parse_response(block=block, timeout=timeout)
            return await self._read_unless_switched(block, timeout)
        except _LOST as exc:
            self._lost(exc)
        await self._move()
        return None

    async def _read_unless_switched(self, block: bool, timeout: float | None) -> Any:
        if self._switched is None:
            self._switched = asyncio.Event()
        read = asyncio.ensure_future(super().parse_response(block=block, timeout=timeout))  # type: ignore[arg-type]
        switched = asyncio.ensure_future(self._switched.wait())
        try:
            await asyncio.wait({read, switched}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            switched.cancel()
            if not read.done():
                # The store left this endpoint: the read is abandoned with its connection.
                read.cancel()
                with contextlib.suppress(BaseException):
                    await read
        if read.cancelled():
            await self._move()
            return None
        return read.result()

    async def get_message(self, ignore_subscribe_messages: bool = False, timeout: float | None = 0.0) -> Any:
        if self._pending:
            return self._pending.popleft()
        message = await super().get_message(ignore_subscribe_messages=ignore_subscribe_messages, timeout=timeout)
        if message is None and self._pending:
            return self._pending.popleft()
        return message

    async def listen(self) -> Any:  # an async generator, like redis-py's
        """Listen for messages on the subscribed channels and patterns, across switches."""
        while self.subscribed or self._pending:
            if self._pending:
                yield self._pending.popleft()
                continue
            response = await self.parse_response(block=True)
            if response is None:
                continue
            message = await self.handle_message(response)
            if message is not None:
                yield message

    async def aclose(self) -> None:
        self._unsubscribe_events()
        self._pending.clear()
        await super().aclose()
