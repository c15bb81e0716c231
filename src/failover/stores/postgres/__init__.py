"""PostgreSQL through psycopg 3 and psycopg_pool, with a pool per endpoint.

Routing rules:

* acquiring a connection never sends a statement, so an acquisition that fails
  (refused, pool cannot connect, a pooled socket found dead) is retried on the
  other endpoint;
* a pooled connection is checked without a round trip before it is handed out:
  if its socket already saw the server hang up, the server is probed and, when
  it is down, the breaker trips and the request goes to the fallback;
* PostgreSQL commits nothing without a ``COMMIT``. A connection failure (or a
  reply that ends the session, SQLSTATE class 57) *before* the ``COMMIT`` was
  sent means the transaction was rolled back: a ``connection()`` block raises
  :class:`~failover.errors.TransactionRolledBack`, and a one-statement helper
  (``execute``/``fetch``/``fetchone``) runs its statement again on the other
  endpoint. Only a failure *while committing* leaves the outcome unknown
  (:class:`~failover.errors.OutcomeUnknown`); nothing is re-executed then.
  Connections are :class:`FailoverConnection` objects, which count the
  ``COMMIT`` statements they send, so "was COMMIT sent?" has an exact answer.

One module per reason to change:

* :mod:`.connection` — :class:`FailoverConnection`, which counts what it sends that may commit;
* :mod:`.backend` — pools, acquisition (a pooled socket checked without a round trip),
  probes, error kinds, cutting a statement's socket at its deadline (:class:`PostgresBackend`);
* :mod:`.client` — :class:`PostgresStore` (``dbs.postgres``): ``connection()``,
  ``execute``/``fetch``/``fetchone``, ``run_transaction``;
* :mod:`.sqlalchemy` — an SQLAlchemy ``AsyncEngine`` on the active endpoint (optional extra);
* :mod:`.capture` — change capture on the fallback and reconcile;
* :mod:`.warm` — warm sync by native logical replication;
* :mod:`.connections` — the cached per-endpoint connections of capture and warm sync.
"""

from __future__ import annotations

from typing import Any

from ...core.clock import Clock
from ...core.endpoint import Endpoint
from ...core.events import EventBus
from ...core.store import FailoverStore, StoreOptions
from .backend import PostgresBackend
from .client import DEFAULT_TRANSACTION_ATTEMPTS, PostgresStore
from .client import _idempotent, _Runs  # noqa: F401 (tests import them from here)
from .connection import FailoverConnection, may_have_committed
from .connection import _ends_transaction  # noqa: F401 (tests import it from here)

__all__ = [
    "DEFAULT_TRANSACTION_ATTEMPTS",
    "FailoverConnection",
    "PostgresBackend",
    "PostgresStore",
    "create",
    "may_have_committed",
]


def create(
    settings: Any, endpoints: list[Endpoint], options: StoreOptions, bus: EventBus, clock: Clock
) -> PostgresStore:
    """Build the PostgreSQL store for :class:`~failover.Databases`."""
    backend = PostgresBackend(
        pool_min_size=settings.pool_min_size,
        pool_max_size=settings.pool_max_size,
        connect_timeout=settings.connect_timeout,
    )
    capture = None
    if options.reconcile and len(endpoints) == 2:
        from .capture import PostgresCapture

        capture = PostgresCapture(tables=settings.protected_tables(), connect_timeout=settings.connect_timeout)
    warm = None
    if getattr(settings, "warm", False) and len(endpoints) == 2:
        from .warm import PostgresWarmSync

        warm = PostgresWarmSync(tables=settings.protected_tables(), connect_timeout=settings.connect_timeout)
    return PostgresStore(
        FailoverStore(backend, endpoints, options, bus=bus, clock=clock, capture=capture, warm=warm), backend
    )
