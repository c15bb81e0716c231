"""MongoDB through PyMongo's ``AsyncMongoClient``: ``dbs.mongodb``, with a client per endpoint.

One module per reason to change:

* :mod:`.urls` — what a URL names (one fixed server or not) and the client's options;
* :mod:`.sentinel` — telling a dead server before sending, without a round trip;
* :mod:`.backend` — a client per endpoint, drains, probes, error kinds (:class:`MongoBackend`);
* :mod:`.routed` — the routing rules of databases, collections and queries;
* :mod:`.surface` — the rest of ``AsyncDatabase``/``AsyncCollection``: buffered cursors,
  DDL, sessions, what is refused;
* :mod:`.client` — :class:`MongoStore` (``dbs.mongodb``);
* :mod:`.capture` — the intent journal of writes served by the fallback, for reconcile;
* :mod:`.warm` — warm sync: change streams from the primary into the fallback.

``dbs.mongodb.client`` gives the raw client of the endpoint active at that moment;
it does not fail over.
"""

from __future__ import annotations

from typing import Any

from ...core.clock import Clock
from ...core.endpoint import Endpoint
from ...core.events import EventBus
from ...core.store import FailoverStore, StoreOptions
from .backend import DEFAULT_DRAIN_GRACE, MongoBackend
from .client import MongoStore
from .routed import RoutedCollection, RoutedDatabase, RoutedQuery
from .urls import client_options

__all__ = [
    "MongoBackend",
    "MongoStore",
    "RoutedCollection",
    "RoutedDatabase",
    "RoutedQuery",
    "create",
    "client_options",
]


def create(
    settings: Any, endpoints: list[Endpoint], options: StoreOptions, bus: EventBus, clock: Clock
) -> MongoStore:
    """Build the MongoDB store for :class:`~failover.Databases`."""
    backend = MongoBackend(
        connect_timeout=settings.connect_timeout,
        pool_min_size=settings.pool_min_size,
        pool_max_size=settings.pool_max_size,
        # A retired client must outlive every operation it carries: closing it under a
        # write that PyMongo is retrying turns the write's network error into "client
        # closed", which would read as "never sent" and run the write a second time.
        drain_grace=max(DEFAULT_DRAIN_GRACE, settings.operation_timeout + 1.0),
    )
    journal = capture = None
    if options.reconcile and len(endpoints) == 2:
        from .capture import MongoCapture, MongoJournal

        journal = MongoJournal(operation_timeout=options.operation_timeout)
        capture = MongoCapture(journal, connect_timeout=settings.connect_timeout)
    warm = None
    if getattr(settings, "warm", False) and len(endpoints) == 2:
        from .warm import MongoWarmSync

        warm = MongoWarmSync(connect_timeout=settings.connect_timeout)
    store = FailoverStore(backend, endpoints, options, bus=bus, clock=clock, capture=capture, warm=warm)
    if warm is not None:
        from ...core.events import SwitchState

        # Nothing may land on the fallback once the application writes there.
        warm.on_primary = lambda: store.state is SwitchState.ON_PRIMARY
    return MongoStore(store, backend, journal)
