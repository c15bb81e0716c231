"""Redis through ``redis.asyncio``: ``dbs.redis``, with a connection pool per endpoint.

One module per reason to change:

* :mod:`.commands` — which commands may be sent twice (routing after a lost reply);
* :mod:`.writes` — which keys each write command changes (change capture);
* :mod:`.backend` — pools, the lease/send split that tells *not sent* from *maybe
  applied*, probes, error kinds (:class:`RedisBackend`, :class:`PoolExhausted`);
* :mod:`.client` — :class:`RedisStore`, redis-py's command methods routed by the core;
* :mod:`.pipeline` — pipelines and ``MULTI``/``EXEC`` on one endpoint;
* :mod:`.blocking` — ``BLPOP``/``XREAD BLOCK``... in slices that follow a switch;
* :mod:`.surface`, :mod:`.lock`, :mod:`.pubsub` — the rest of ``redis.asyncio.Redis``:
  what is borrowed, what is refused, locks and subscriptions across a switch;
* :mod:`.capture` — writes served by the fallback are marked for reconcile;
* :mod:`.warm` — warm sync: the primary's keys copied into the fallback.

Upstash (the usual primary) has no ``REPLICAOF``, ``DUMP`` or ``RESTORE``; nothing
here uses them.
"""

from __future__ import annotations

from typing import Any

from ...core.clock import Clock
from ...core.endpoint import Endpoint
from ...core.events import EventBus
from ...core.store import FailoverStore, StoreOptions
from .backend import CommandNotSent, PoolExhausted, RedisBackend, pool_counts
from .capture import RedisCapture
from .client import RedisStore
from .commands import IDEMPOTENT_COMMANDS, is_idempotent
from .lock import LockLostInFailover
from .pipeline import RedisPipeline
from .pubsub import GAP_MESSAGE_TYPE, SubscriptionsMoved

__all__ = [
    "GAP_MESSAGE_TYPE",
    "IDEMPOTENT_COMMANDS",
    "CommandNotSent",
    "LockLostInFailover",
    "PoolExhausted",
    "RedisBackend",
    "RedisPipeline",
    "RedisStore",
    "SubscriptionsMoved",
    "create",
    "is_idempotent",
    "pool_counts",
]


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
    warm = None
    if getattr(settings, "warm", False) and len(endpoints) == 2:
        from .warm import RedisWarmSync

        warm = RedisWarmSync(connect_timeout=settings.connect_timeout)
    failover = FailoverStore(backend, endpoints, options, bus=bus, clock=clock, capture=capture, warm=warm)
    if warm is not None:
        from ...core.events import SwitchState

        # A copy read before a failover must not land after the application's first write to the fallback.
        warm.on_primary = lambda: failover.state is SwitchState.ON_PRIMARY
    store = RedisStore(failover, backend)  # type: ignore[abstract]  # redis-py 8's CommandsProtocol declares _event_dispatcher; the command mixins never use it
    store.mirror = warm
    return store
