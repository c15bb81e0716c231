"""Errors raised by failover.

Every error derives from :class:`FailoverError`. Whether retrying can help is
visible in the tree::

    FailoverError
     ├── ConfigurationError          settings are invalid; fix the environment
     ├── StoreNotConfigured          the store has no URL; nothing to route to
     ├── ClosedError                 the Databases object is closed or not started
     ├── NotRoutable                 a driver method that cannot fail over (the
     │                               message names the method, why, and what to use)
     └── OperationError              an operation could not be completed
          ├── NoEndpointAvailable    [retryable later] no endpoint accepted the
          │                          operation before it reached a server
          ├── TransactionRolledBack  [retryable] the connection failed before
          │                          COMMIT was sent: nothing was committed
          └── OutcomeUnknown         [not retried] the connection failed after the
               │                     operation may have reached the server
               └── OperationTimeout  the operation ran past its deadline

Errors the database itself returns (a unique violation, a syntax error, a
``WRONGTYPE`` reply) are not wrapped: they reach the caller as the driver's own
exception, because they are about the operation, not about availability.

No message ever contains a password: URLs are shown through
:func:`failover.redact_url`.
"""

from __future__ import annotations

__all__ = [
    "ClosedError",
    "ConfigurationError",
    "FailoverError",
    "NoEndpointAvailable",
    "NotRoutable",
    "OperationError",
    "OperationTimeout",
    "OutcomeUnknown",
    "StoreNotConfigured",
    "TransactionRolledBack",
]


class FailoverError(Exception):
    """The root of every error raised by failover."""


class ConfigurationError(FailoverError, ValueError):
    """The settings are invalid. The message names the environment variable."""


class StoreNotConfigured(FailoverError):
    """A store was used that has no URL configured."""

    def __init__(self, store: str, variables: str) -> None:
        super().__init__(f"the {store} store is not configured: set {variables}")
        self.store = store


class ClosedError(FailoverError):
    """The object was used before ``start()`` or after ``close()``."""


class NotRoutable(FailoverError, NotImplementedError):
    """A driver method that failover does not route, because it cannot survive a switch.

    ``dbs.redis.monitor()`` streams one server's command log; a connection pinned
    by ``client()`` belongs to one server. The message names the method, says
    why, and what to use instead. Not retryable: the call is refused before any
    I/O.
    """

    def __init__(self, store: str, method: str, why: str) -> None:
        super().__init__(f"{store}: {method}() is not available through failover: {why}")
        self.store = store
        self.method = method


class OperationError(FailoverError):
    """An operation on a store failed for availability reasons.

    Attributes:
        store: ``postgres``, ``mongodb`` or ``redis``.
        endpoint: display name of the endpoint involved last, if any.
        retryable: whether the caller may safely run the operation again.
    """

    retryable: bool = False

    def __init__(self, message: str, *, store: str, endpoint: str | None = None) -> None:
        super().__init__(message)
        self.store = store
        self.endpoint = endpoint


class NoEndpointAvailable(OperationError):
    """No endpoint of the store could take the operation.

    The operation never reached a server, so retrying it later is safe.
    """

    retryable = True


class TransactionRolledBack(OperationError):
    """The connection failed while a transaction ran, before its ``COMMIT`` was sent.

    PostgreSQL commits nothing without a ``COMMIT``: the server rolled the
    transaction back (or will, as soon as it notices the lost connection), so
    running the whole transaction again, on whichever endpoint is active now,
    cannot apply it twice. :meth:`PostgresStore.run_transaction
    <failover.stores.postgres.PostgresStore.run_transaction>` does that for you.
    """

    retryable = True


class OutcomeUnknown(OperationError):
    """The connection failed after the operation may have reached the server.

    It may or may not have been applied. failover does not re-execute it,
    because a non-idempotent operation (an INSERT, an INCR) could then be
    applied twice. The caller decides, knowing its semantics.
    """

    retryable = False


class OperationTimeout(OutcomeUnknown):
    """The operation did not finish within its deadline (``FAILOVER_OPERATION_TIMEOUT``)."""
