"""The MongoDB driver under the failover core: a client per endpoint, drains, probes, error kinds.

"Not primary" refusals (codes 10107, 13435, 13436, legacy 10058) come before
anything is executed, so they count as not sent; step-down and shutdown errors
(189, 91, 11600, 11602) can interrupt a write that had started and count as
outcome unknown. ``insert_many``/``bulk_write`` of several requests are sent in
batches, so a refusal there may follow applied batches: outcome unknown.

Leaving an endpoint *drains* it: its client stops being handed out, waits up
to ``DEFAULT_DRAIN_GRACE`` for the operations it carries, then is closed; the
next use creates a new one.

Driver retries: ``retryWrites``/``retryReads`` keep PyMongo's defaults (on).
On a replica set the driver retries a write once, on the new primary, with the
same transaction number, so the server applies it at most once: that hides
nothing from us. On a standalone server (what ``directConnection`` usually
reaches) the driver does not retry writes at all. When its retry cannot select
a server, PyMongo re-raises the *original* network error, so a
``ServerSelectionTimeoutError`` that reaches us really means nothing was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import (
    ConnectionFailure,
    InvalidOperation,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
    WaitQueueTimeoutError,
)

from ...core.endpoint import Endpoint, Role
from ...core.routing import NotSent
from ...core.store import Backend, ErrorKind
from .sentinel import _Sentinel
from .urls import DEFAULT_DATABASE, _single_host, client_options

__all__ = ["DEFAULT_DRAIN_GRACE", "MongoBackend"]

logger = logging.getLogger("failover.mongodb")

DEFAULT_DRAIN_GRACE = 1.0
"""Seconds a retired client waits for its in-flight operations before it is closed."""
DEFAULT_CLOSE_TIMEOUT = 2.0
"""Seconds ``AsyncMongoClient.close()`` may take (it may try to end sessions on a hung server)."""

# Server error codes meaning "refused before executing: I am not a writable primary".
# Other NotPrimaryError codes (ShutdownInProgress 91, InterruptedAtShutdown 11600,
# PrimarySteppedDown 189, ...) can interrupt a write that had started.
_REFUSED_NOT_PRIMARY_CODES = frozenset({10058, 10107, 13435, 13436})


class _NotSent(NotSent, ConnectionFailure):
    """The operation was stopped before anything was sent to the server (a ``ConnectionFailure``
    for whoever catches those)."""


class _MaybePartlyApplied(ConnectionFailure):
    """Internal: a multi-batch write was refused by a server that may have applied earlier batches.

    ``insert_many`` and ``bulk_write`` are split into batches (``maxWriteBatchSize``,
    ``maxMessageSizeBytes``); a "not primary" refusal of a later batch comes
    after earlier ones were applied, so it cannot be retried elsewhere.
    """


class _ClientEntry:
    """One ``AsyncMongoClient`` of an endpoint, its sentinel and its in-flight operations."""

    def __init__(self, client: AsyncMongoClient[Any], sentinel: _Sentinel | None) -> None:
        self.client = client
        self.sentinel = sentinel
        self.poll = sentinel.poll if sentinel is not None else None
        self.inflight = 0
        self.retired = False
        # Created only by a drain that has to wait (see ``wait_idle``): nothing per operation.
        self._idle: asyncio.Event | None = None
        # Collection objects of this client, reused across calls (building them per
        # call costs more than the routing itself).
        self.collections: dict[tuple[str, str], AsyncCollection[Any]] = {}
        # The same, keyed by the routed database's own name (None: the endpoint's configured one),
        # so the hot path does not read the endpoint's options.
        self.routed: dict[tuple[str | None, str], AsyncCollection[Any]] = {}

    def collection(self, database: str, name: str, options: dict[str, Any]) -> AsyncCollection[Any]:
        if options:
            return self.client.get_database(database).get_collection(name, **options)
        key = (database, name)
        found = self.collections.get(key)
        if found is None:
            found = self.collections[key] = self.client.get_database(database).get_collection(name)
        return found

    def routed_collection(
        self, endpoint: Endpoint, override: str | None, name: str, options: dict[str, Any]
    ) -> AsyncCollection[Any]:
        """The collection *name* of the routed database *override* (None: the endpoint's database)."""
        if options:
            database = override or endpoint.option("database") or DEFAULT_DATABASE
            return self.client.get_database(database).get_collection(name, **options)
        key = (override, name)
        found = self.routed.get(key)
        if found is None:
            database = override or endpoint.option("database") or DEFAULT_DATABASE
            found = self.routed[key] = self.collection(database, name, options)
        return found

    def alive(self) -> bool:
        return self.sentinel is None or self.sentinel.alive()

    async def wait_idle(self) -> None:
        """Return once no operation holds this client."""
        while self.inflight > 0:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()
            self._idle = None


# --- the backend ---------------------------------------------------------------------------


class MongoBackend(Backend[AsyncMongoClient[Any]]):
    """AsyncMongoClients, probes and error classification for the failover core.

    Args:
        connect_timeout: seconds to open a connection and to select a server.
        pool_min_size, pool_max_size: PyMongo's ``minPoolSize``/``maxPoolSize``.
        sentinel: pair single-host clients with a sentinel connection (see the
            module docstring); turn off only for servers that close idle
            connections quickly, at the price of an unknown outcome for the first
            write after a crash.
        drain_grace: seconds a retired client waits for its in-flight operations.
    """

    store = "mongodb"

    def __init__(
        self,
        *,
        connect_timeout: float = 2.0,
        pool_min_size: int = 0,
        pool_max_size: int = 10,
        sentinel: bool = True,
        drain_grace: float = DEFAULT_DRAIN_GRACE,
    ) -> None:
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be greater than 0")
        if pool_max_size < max(pool_min_size, 1):
            raise ValueError("pool_max_size must be greater or equal than pool_min_size")
        self.connect_timeout = connect_timeout
        self.pool_min_size = pool_min_size
        self.pool_max_size = pool_max_size
        self.use_sentinel = sentinel
        self.drain_grace = drain_grace
        self._entries: dict[Role, _ClientEntry] = {}
        self._locks: dict[Role, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._raw: dict[Role, AsyncMongoClient[Any]] = {}

    # --- clients --------------------------------------------------------------------------

    async def open(self, endpoint: Endpoint) -> None:
        # Clients are created on first use: creating one for a dead server would
        # only start a monitor that reconnects in the background.
        self._locks.setdefault(endpoint.role, asyncio.Lock())

    def current_client(self, endpoint: Endpoint) -> AsyncMongoClient[Any]:
        """A raw client of *endpoint* for callers that use PyMongo directly.

        It is the routed client when one exists, else a client of its own
        (created without connecting, closed by :meth:`close`). It does not fail
        over and has no sentinel check.
        """
        entry = self._entries.get(endpoint.role)
        if entry is not None:
            return entry.client
        client = self._raw.get(endpoint.role)
        if client is None:
            client = self._raw[endpoint.role] = self._new_client(endpoint)
        return client

    def _new_client(self, endpoint: Endpoint) -> AsyncMongoClient[Any]:
        options = client_options(
            endpoint.url,
            connect_timeout=self.connect_timeout,
            pool_min_size=self.pool_min_size,
            pool_max_size=self.pool_max_size,
        )
        return AsyncMongoClient(endpoint.url, **options)

    async def _entry(self, endpoint: Endpoint) -> _ClientEntry:
        """A client of *endpoint* whose server has not hung up since it was created.

        Raises ``_NotSent`` when the server refuses connections.
        """
        role = endpoint.role
        entry = self._entries.get(role)
        if entry is not None and entry.alive():
            return entry
        async with self._locks.setdefault(role, asyncio.Lock()):
            entry = self._entries.get(role)
            if entry is not None and entry.alive():
                return entry
            if entry is not None:
                # The server closed our sentinel: it died or restarted, and took
                # every pooled connection with it.
                logger.info("%s closed its connections; replacing its client", endpoint.name)
                self._retire(endpoint, entry)
            sentinel: _Sentinel | None = None
            address = _single_host(endpoint.url) if self.use_sentinel else None
            if address is not None:
                try:
                    sentinel = await _Sentinel.open(*address, timeout=self.connect_timeout)
                except (OSError, TimeoutError) as exc:
                    raise _NotSent(f"cannot connect: {exc or type(exc).__name__}") from exc
            try:
                client = self._new_client(endpoint)
            except BaseException:
                if sentinel is not None:
                    sentinel.close()
                raise
            entry = self._entries[role] = _ClientEntry(client, sentinel)
            return entry

    @asynccontextmanager
    async def lease(self, endpoint: Endpoint) -> AsyncIterator[AsyncMongoClient[Any]]:
        """The client of *endpoint* for one operation; it is not closed while leased."""
        entry = await self.take(endpoint)
        try:
            yield entry.client
        finally:
            self.give_back(entry)

    def take_alive(self, endpoint: Endpoint) -> _ClientEntry | None:
        """The hot path of :meth:`take`, without a coroutine: the current client of *endpoint* when
        its sentinel says the server has not hung up, else None (then ``await take()``)."""
        entry = self._entries.get(endpoint.role)
        if entry is None:
            return None
        poll = entry.poll
        # poll(0) returns [] while the sentinel is idle and connected; anything else gets the full check.
        if poll is not None and poll(0) and not entry.alive():
            return None
        entry.inflight += 1
        return entry

    async def take(self, endpoint: Endpoint) -> _ClientEntry:
        """Like :meth:`lease` without a context manager (the hot path); pair with :meth:`give_back`."""
        entry = await self._entry(endpoint)
        entry.inflight += 1
        return entry

    @staticmethod
    def give_back(entry: _ClientEntry) -> None:
        entry.inflight -= 1
        if entry.inflight == 0 and entry._idle is not None:
            entry._idle.set()

    def _retire(self, endpoint: Endpoint, entry: _ClientEntry) -> None:
        """Stop handing out *entry* and close it once its operations finished (bounded)."""
        if self._entries.get(endpoint.role) is entry:
            del self._entries[endpoint.role]
        if entry.retired:
            return
        entry.retired = True
        task = asyncio.get_running_loop().create_task(self._close_entry(endpoint, entry))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_entry(self, endpoint: Endpoint, entry: _ClientEntry) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.drain_grace):
                await entry.wait_idle()
        if entry.sentinel is not None:
            entry.sentinel.close()
        try:
            async with asyncio.timeout(DEFAULT_CLOSE_TIMEOUT):
                await entry.client.close()
        except TimeoutError:
            logger.warning("closing the client of %s timed out", endpoint.name)
        except Exception as exc:  # a client that cannot close cleanly is dropped anyway
            logger.warning("closing the client of %s failed: %s", endpoint.name, type(exc).__name__)

    async def drain(self, endpoint: Endpoint) -> None:
        entry = self._entries.get(endpoint.role)
        if entry is not None:
            logger.info("draining the client of %s", endpoint.name)
            self._retire(endpoint, entry)

    async def warm(self, endpoint: Endpoint, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            async with self.lease(endpoint) as client:
                await client.admin.command("ping")

    async def close(self, endpoint: Endpoint) -> None:
        entry = self._entries.get(endpoint.role)
        if entry is not None:
            self._retire(endpoint, entry)
        raw = self._raw.pop(endpoint.role, None)
        if raw is not None:
            self._retire(endpoint, _ClientEntry(raw, None))
        pending = list(self._retiring)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    # --- probe and classification ---------------------------------------------------------

    async def probe(self, endpoint: Endpoint) -> bool:
        try:
            async with self.lease(endpoint) as client:
                try:
                    reply = await client.admin.command("hello")
                except OperationFailure as exc:
                    if exc.code != 59:  # CommandNotFound: a server older than 4.4.2
                        raise
                    reply = await client.admin.command("isMaster")
        except BaseException:
            # Start from a fresh client next time: PyMongo marks a failed server
            # Unknown and waits for its monitor's next heartbeat (at least 0.5 s)
            # before selecting it again, which would make the probes of a recovered
            # server time out. A client still carrying operations is left alone:
            # those operations decide for themselves (and a dead server is caught
            # by the sentinel anyway).
            entry = self._entries.get(endpoint.role)
            if entry is not None and entry.inflight == 0:
                self._retire(endpoint, entry)
            raise
        return bool(reply.get("isWritablePrimary", reply.get("ismaster", False)))

    def classify(self, exc: BaseException) -> ErrorKind:
        if isinstance(exc, (NotSent, ServerSelectionTimeoutError)):
            return ErrorKind.NOT_SENT
        if isinstance(exc, NotPrimaryError):
            # "not writable primary" is a refusal before execution; shutdown and
            # step-down errors can interrupt a write that had started.
            if exc.details and isinstance(exc.details, Mapping):
                code = exc.details.get("code")
            else:
                code = getattr(exc, "code", None)
            if code in _REFUSED_NOT_PRIMARY_CODES or code is None:
                return ErrorKind.NOT_SENT
            return ErrorKind.OUTCOME_UNKNOWN
        if isinstance(exc, WaitQueueTimeoutError):
            return ErrorKind.BUSY  # the pool is saturated: load, or a hung server holding it
        if isinstance(exc, InvalidOperation) and "after close" in str(exc):
            return ErrorKind.NOT_SENT  # raised when opening the topology, before any I/O
        if isinstance(exc, (ConnectionFailure, OSError)):
            return ErrorKind.OUTCOME_UNKNOWN
        return ErrorKind.APPLICATION  # OperationFailure, DuplicateKeyError, BulkWriteError, ...

