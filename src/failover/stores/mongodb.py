"""MongoDB through PyMongo's ``AsyncMongoClient``, with a client per endpoint.

Routing rules:

* every call on a routed collection picks the active endpoint *at call time*,
  so a collection handle taken before a failover keeps working after it;
* reads (``find``, ``find_one``, ``count_documents``, ``distinct``,
  ``aggregate`` without ``$out``/``$merge``, ...) are idempotent: any
  connection-level failure sends them to the other endpoint;
* writes are sent to the other endpoint only when they are known not to have
  reached a server (no server selectable, connection refused, the server said
  "not primary"); a write whose connection broke after it was sent raises
  :class:`~failover.errors.OutcomeUnknown` and is never re-executed.

Detecting a dead server *before* sending. PyMongo's async pool checks an idle
connection only with ``transport.is_closing()`` and only after one second of
idleness (``Pool._perished``); its protocol pauses reading between replies,
so a FIN from a crashed server goes unnoticed and the first write after a
crash would be sent on a dead socket, with an unknown outcome. So each client
of a single-host endpoint is paired with a *sentinel*: a plain TCP connection
to the same server, opened before the client, that never carries a request.
Before every operation the sentinel is peeked (one non-blocking ``recv`` with
``MSG_PEEK``, no round trip). When the server hung up on it, the server died
or restarted, so every pooled connection (all younger than the sentinel) is
dead too: the client is retired, a new sentinel is opened, and when that
is refused the operation is reported as not sent and goes to the fallback.
Replica-set and ``mongodb+srv`` URLs have no sentinel: there PyMongo's own
server discovery and retryable writes handle a dying member, and a write cut
mid-flight raises ``OutcomeUnknown``.

"Not primary" refusals (codes 10107, 13435, 13436, legacy 10058) come before
anything is executed, so they count as not sent; step-down and shutdown errors
(189, 91, 11600, 11602) can interrupt a write that had started and count as
outcome unknown. ``insert_many``/``bulk_write`` of several requests are sent in
batches, so a refusal there may follow applied batches: outcome unknown.

Leaving an endpoint *drains* it: its client stops being handed out, waits up
to ``DEFAULT_DRAIN_GRACE`` for the operations it carries, then is closed; the
next use creates a new one. ``dbs.mongodb.client`` gives the raw client of
the endpoint active at that moment; it does not fail over.

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
import socket
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    ConnectionFailure,
    InvalidOperation,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
    WaitQueueTimeoutError,
)

from ..core.clock import Clock
from ..core.endpoint import Endpoint, Role
from ..core.events import EventBus
from ..core.store import Backend, ErrorKind, FailoverStore, StoreOptions
from .mongodb_surface import BufferedCursor, RoutedCollectionSurface, RoutedDatabaseSurface, RoutedQuerySurface, start_session

if TYPE_CHECKING:
    from .mongodb_capture import MongoJournal

__all__ = [
    "MongoBackend",
    "MongoStore",
    "RoutedCollection",
    "RoutedDatabase",
    "RoutedQuery",
    "create",
    "client_options",
]

logger = logging.getLogger("failover.mongodb")

T = TypeVar("T")

DEFAULT_DATABASE = "app"
DEFAULT_PORT = 27017
DEFAULT_DRAIN_GRACE = 1.0
"""Seconds a retired client waits for its in-flight operations before it is closed."""
DEFAULT_CLOSE_TIMEOUT = 2.0
"""Seconds ``AsyncMongoClient.close()`` may take (it may try to end sessions on a hung server)."""

# Server error codes meaning "refused before executing: I am not a writable primary".
# Other NotPrimaryError codes (ShutdownInProgress 91, InterruptedAtShutdown 11600,
# PrimarySteppedDown 189, ...) can interrupt a write that had started.
_REFUSED_NOT_PRIMARY_CODES = frozenset({10058, 10107, 13435, 13436})

_OUTPUT_STAGES = ("$out", "$merge")


# --- URLs ----------------------------------------------------------------------------------


def _split_url(url: str) -> tuple[str, list[str], dict[str, str]]:
    """``(scheme, hosts, options)`` of a MongoDB URL, without DNS lookups (keys lower-cased)."""
    scheme, _, rest = url.partition("://")
    netloc_end = len(rest)
    for sep in ("/", "?"):
        index = rest.find(sep)
        if index != -1:
            netloc_end = min(netloc_end, index)
    netloc = rest[:netloc_end]
    hosts_part = netloc.rpartition("@")[2]
    hosts = [h for h in hosts_part.split(",") if h]
    query = rest[netloc_end:].partition("?")[2]
    options = {k.lower(): v for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)}
    return scheme.lower(), hosts, options


def _single_host(url: str) -> tuple[str, int] | None:
    """The ``(host, port)`` of a URL that names exactly one TCP server, else None.

    None for ``mongodb+srv``, several hosts, ``replicaSet``, ``loadBalanced`` or a
    Unix socket path: those are not one fixed server.
    """
    scheme, hosts, options = _split_url(url)
    if scheme != "mongodb" or len(hosts) != 1:
        return None
    if "replicaset" in options or options.get("loadbalanced", "").lower() == "true":
        return None
    host = urllib.parse.unquote(hosts[0])
    if host.endswith(".sock") or host.startswith("/"):
        return None
    if host.startswith("["):  # [::1]:27017
        name, _, tail = host[1:].partition("]")
        port_text = tail.removeprefix(":")
    else:
        name, _, port_text = host.partition(":")
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        return None
    return name, port


def client_options(url: str, *, connect_timeout: float, pool_min_size: int, pool_max_size: int) -> dict[str, Any]:
    """Keyword arguments for ``AsyncMongoClient(url, **options)``.

    ``directConnection=True`` is added when the URL names one server with no
    ``replicaSet`` (a single local server would otherwise be discovered as a
    replica-set member and never selected); an explicit ``directConnection``
    in the URL wins.
    """
    millis = max(1, int(connect_timeout * 1000))
    options: dict[str, Any] = {
        "serverSelectionTimeoutMS": millis,
        "connectTimeoutMS": millis,
        "minPoolSize": pool_min_size,
        "maxPoolSize": pool_max_size,
        "appname": "failover",
    }
    _, _, url_options = _split_url(url)
    if "directconnection" not in url_options and _single_host(url) is not None:
        options["directConnection"] = True
    return options


# --- the sentinel --------------------------------------------------------------------------


class _Sentinel:
    """A plain TCP connection to a server that never carries a request.

    The server closes it when it dies or restarts, so peeking at it tells, with
    no round trip, whether the connections pooled after it was opened are dead.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def open(cls, host: str, port: int, timeout: float) -> _Sentinel:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, type_, proto, _, address = infos[0]
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, address)
            except BaseException:
                sock.close()
                raise
        return cls(sock)

    def alive(self) -> bool:
        """False once the server closed or reset the connection."""
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True  # nothing to read: still connected
        except OSError:
            return False
        return bool(data)  # b"" is the server's FIN

    def close(self) -> None:
        self.sock.close()


class _NotSent(ConnectionFailure):
    """Internal: the operation was stopped before anything was sent to the server."""


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
        self.inflight = 0
        self.retired = False
        self.idle = asyncio.Event()
        self.idle.set()
        # Collection objects of this client, reused across calls (building them per
        # call costs more than the routing itself).
        self.collections: dict[tuple[str, str], AsyncCollection[Any]] = {}

    def collection(self, database: str, name: str, options: dict[str, Any]) -> AsyncCollection[Any]:
        if options:
            return self.client.get_database(database).get_collection(name, **options)
        key = (database, name)
        found = self.collections.get(key)
        if found is None:
            found = self.collections[key] = self.client.get_database(database).get_collection(name)
        return found

    def alive(self) -> bool:
        return self.sentinel is None or self.sentinel.alive()


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

    async def take(self, endpoint: Endpoint) -> _ClientEntry:
        """Like :meth:`lease` without a context manager (the hot path); pair with :meth:`give_back`."""
        entry = await self._entry(endpoint)
        entry.inflight += 1
        entry.idle.clear()
        return entry

    @staticmethod
    def give_back(entry: _ClientEntry) -> None:
        entry.inflight -= 1
        if entry.inflight == 0:
            entry.idle.set()

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
                await entry.idle.wait()
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
        if isinstance(exc, (_NotSent, ServerSelectionTimeoutError)):
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


# --- the routed API ------------------------------------------------------------------------


def _database_name(endpoint: Endpoint, override: str | None) -> str:
    return override or endpoint.option("database") or DEFAULT_DATABASE


class RoutedQuery(RoutedQuerySurface):
    """A ``find()`` or ``aggregate()`` that runs on the active endpoint when it is read.

    Cursor modifiers (``sort``, ``limit``, ``skip``, ...) are recorded and applied
    to the driver's cursor on each attempt, so the whole read can be retried on
    the other endpoint. Results are read in one go by :meth:`to_list`; async
    iteration reads them the same way first (a cursor cannot resume on another
    server).
    """

    _MODIFIERS = frozenset(
        {
            "sort", "limit", "skip", "batch_size", "hint", "max_time_ms", "collation",
            "comment", "allow_disk_use", "where", "min", "max",
        }
    )  # fmt: skip

    def __init__(
        self,
        collection: RoutedCollection,
        kind: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        idempotent: bool = True,
    ) -> None:
        self._collection = collection
        self._kind = kind
        self._args = args
        self._kwargs = kwargs
        self._idempotent = idempotent
        self._modifiers: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., RoutedQuery]:
        if name not in self._MODIFIERS or self._kind != "find":
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

        def modifier(*args: Any, **kwargs: Any) -> RoutedQuery:
            self._modifiers.append((name, args, kwargs))
            return self

        return modifier

    async def _read(self, collection: AsyncCollection[Any], length: int | None) -> list[Any]:
        if self._kind == "find":
            cursor: Any = collection.find(*self._args, **self._kwargs)
            for name, args, kwargs in self._modifiers:
                cursor = getattr(cursor, name)(*args, **kwargs)
        else:
            cursor = await collection.aggregate(*self._args, **self._kwargs)
        try:
            return list(await cursor.to_list(length))
        finally:
            await cursor.close()

    async def to_list(self, length: int | None = None) -> list[Any]:
        """All results (at most *length*), read on one endpoint, retried on the other when safe."""
        return await self._collection._run(
            lambda coll: self._read(coll, length), idempotent=self._idempotent, label=self._kind
        )

    def __await__(self) -> Generator[Any, None, RoutedQuery]:
        # ``cursor = await collection.aggregate(...)`` is PyMongo's async style.
        async def itself() -> RoutedQuery:
            return self

        return itself().__await__()

    async def __aiter__(self) -> AsyncIterator[Any]:
        for document in await self.to_list():
            yield document


class RoutedCollection(RoutedCollectionSurface):
    """An ``AsyncCollection``-like object that routes each call to the active endpoint.

    Reads are retried on the other endpoint after any connection-level failure.
    Writes are retried there only when they never reached a server; otherwise
    they raise :class:`~failover.errors.OutcomeUnknown`. Write methods accept
    ``idempotent=True`` when running them twice is harmless (a ``$set`` by
    ``_id``), which lets them be retried like reads.
    """

    def __init__(self, database: RoutedDatabase, name: str, options: dict[str, Any] | None = None) -> None:
        self.database = database
        self.name = name
        self._options = options or {}

    def __repr__(self) -> str:
        return f"<RoutedCollection {self.database.name or '<per endpoint>'}.{self.name}>"

    @property
    def full_name(self) -> str:
        return f"{self.database.name or '<per endpoint>'}.{self.name}"

    def __getitem__(self, name: str) -> RoutedCollection:
        return RoutedCollection(self.database, f"{self.name}.{name}", self._options)


    async def _run(
        self,
        call: Callable[[AsyncCollection[Any]], Awaitable[T]],
        *,
        idempotent: bool,
        label: str,
        write: tuple[str, tuple[Any, ...], dict[str, Any]] | None = None,
    ) -> T:
        store = self.database.mongo.failover
        backend = self.database.mongo.backend
        journal = self.database.mongo.journal if write is not None else None

        async def attempt(endpoint: Endpoint) -> T:
            entry = await backend.take(endpoint)
            try:
                collection = entry.collection(_database_name(endpoint, self.database.name), self.name, self._options)
                if journal is not None and endpoint.role is Role.FALLBACK and journal.captures(self.name):
                    # Writes on the fallback are journaled so they reach the primary before failback.
                    method, args, kwargs = write  # type: ignore[misc]
                    return await journal.write(entry.client, endpoint, self.database.name, collection, method, args, kwargs)  # type: ignore[no-any-return]
                return await call(collection)
            finally:
                backend.give_back(entry)

        return await store.run(attempt, idempotent=idempotent, label=f"{label} on {self.name}")

    async def _read(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await self._run(lambda c: getattr(c, method)(*args, **kwargs), idempotent=True, label=method)

    async def _write(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], idempotent: bool, *, captured: bool = True
    ) -> Any:
        return await self._run(
            lambda c: getattr(c, method)(*args, **kwargs),
            idempotent=idempotent,
            label=method,
            write=(method, args, kwargs) if captured else None,
        )

    async def _batched_write(
        self, method: str, requests: list[Any], args: tuple[Any, ...], kwargs: dict[str, Any], idempotent: bool
    ) -> Any:
        async def call(collection: AsyncCollection[Any]) -> Any:
            try:
                return await getattr(collection, method)(requests, *args, **kwargs)
            except NotPrimaryError as exc:
                if len(requests) > 1:
                    raise _MaybePartlyApplied(f"{method} refused part-way: {exc}") from exc
                raise

        return await self._run(call, idempotent=idempotent, label=method, write=(method, (requests, *args), kwargs))

    # --- reads ----------------------------------------------------------------------------

    def find(self, *args: Any, **kwargs: Any) -> RoutedQuery:
        """Like ``AsyncCollection.find``; read it with ``await ....to_list(length)``."""
        return RoutedQuery(self, "find", args, kwargs)

    def aggregate(self, pipeline: Sequence[Mapping[str, Any]], *args: Any, **kwargs: Any) -> RoutedQuery:
        """Like ``AsyncCollection.aggregate``; ``$out``/``$merge`` pipelines count as writes."""
        writes = any(isinstance(stage, Mapping) and any(k in stage for k in _OUTPUT_STAGES) for stage in pipeline)
        return RoutedQuery(self, "aggregate", (pipeline, *args), kwargs, idempotent=not writes)

    async def find_one(self, *args: Any, **kwargs: Any) -> Any:
        return await self._read("find_one", *args, **kwargs)

    async def count_documents(self, *args: Any, **kwargs: Any) -> int:
        return int(await self._read("count_documents", *args, **kwargs))

    async def estimated_document_count(self, **kwargs: Any) -> int:
        return int(await self._read("estimated_document_count", **kwargs))

    async def distinct(self, *args: Any, **kwargs: Any) -> list[Any]:
        return list(await self._read("distinct", *args, **kwargs))

    async def index_information(self, **kwargs: Any) -> dict[str, Any]:
        return dict(await self._read("index_information", **kwargs))

    async def list_indexes(self, **kwargs: Any) -> BufferedCursor:
        async def read(c: AsyncCollection[Any]) -> BufferedCursor:
            cursor = await c.list_indexes(**kwargs)
            return BufferedCursor(await cursor.to_list(None))

        return await self._run(read, idempotent=True, label="list_indexes")

    # --- writes ---------------------------------------------------------------------------

    async def insert_one(self, document: Any, *args: Any, idempotent: bool = False, **kwargs: Any) -> Any:
        # PyMongo sets document["_id"] before sending, so a retry elsewhere inserts the same _id.
        return await self._write("insert_one", (document, *args), kwargs, idempotent)

    async def insert_many(self, documents: Any, *args: Any, idempotent: bool = False, **kwargs: Any) -> Any:
        return await self._batched_write("insert_many", list(documents), args, kwargs, idempotent)

    async def update_one(self, *args: Any, idempotent: bool = False, **kwargs: Any) -> Any:
        return await self._write("update_one", args, kwargs, idempotent)

    async def update_many(self, *args: Any, idempotent: bool = False, **kwargs: Any) -> Any:
        return await self._write("update_many", args, kwargs, idempotent)

    async def replace_one(self, *args: Any, idempotent: bool = False, **kwargs: Any) -> Any:
        return await self._write("replace_one", args, kwargs, idempotent)

    async def delete_one(self, *args: Any, idempotent: bool = False, **kwargs: Any) -> Any:
        return await self._write("delete_one", args, kwargs, idempotent)

    async def delete_many(self, *args: Any, idempotent: bool = False, **kwargs: Any) -> Any:
        return await self._write("delete_many", args, kwargs, idempotent)

    async def find_one_and_update(self, *args: Any, idempotent: bool = False, **kwargs: Any) -> Any:
        return await self._write("find_one_and_update", args, kwargs, idempotent)

    async def find_one_and_replace(self, *args: Any, idempotent: bool = False, **kwargs: Any) -> Any:
        return await self._write("find_one_and_replace", args, kwargs, idempotent)

    async def find_one_and_delete(self, *args: Any, idempotent: bool = False, **kwargs: Any) -> Any:
        return await self._write("find_one_and_delete", args, kwargs, idempotent)

    async def bulk_write(self, requests: Any, *args: Any, idempotent: bool = False, **kwargs: Any) -> Any:
        return await self._batched_write("bulk_write", list(requests), args, kwargs, idempotent)

    async def create_index(self, keys: Any, **kwargs: Any) -> str:
        """Creating an index that exists is a no-op, so this is retried like a read."""
        return str(await self._write("create_index", (keys,), kwargs, True, captured=False))

    async def create_indexes(self, indexes: Any, **kwargs: Any) -> list[str]:
        return list(await self._write("create_indexes", (list(indexes),), kwargs, True, captured=False))

    async def drop_index(self, index: Any, **kwargs: Any) -> None:
        await self._write("drop_index", (index,), kwargs, False, captured=False)

    async def drop(self, **kwargs: Any) -> None:
        """Dropping twice leaves the same state, so this is retried like a read."""
        await self._write("drop", (), kwargs, True, captured=False)


class RoutedDatabase(RoutedDatabaseSurface):
    """An ``AsyncDatabase``-like object whose collections route each call at call time.

    ``database["items"]``, ``database.items`` and ``database.get_collection("items")``
    all return a :class:`RoutedCollection`. The database name is
    ``MONGODB_ATLAS_DATABASE`` on the primary and ``MONGODB_DATABASE`` on the
    fallback, unless *name* fixes one for both.
    """

    def __init__(self, mongo: MongoStore, name: str | None = None) -> None:
        self.mongo = mongo
        self.name = name

    def __repr__(self) -> str:
        return f"<RoutedDatabase {self.name or '<per endpoint>'}>"

    def __getitem__(self, name: str) -> RoutedCollection:
        return self._collection(name)

    def __getattr__(self, name: str) -> RoutedCollection:
        if name.startswith("_"):
            raise AttributeError(f"RoutedDatabase has no attribute {name!r}; use database[{name!r}]")
        return RoutedCollection(self, name)

    def get_collection(self, name: str, **options: Any) -> RoutedCollection:
        """A routed collection; *options* (``codec_options``, ``write_concern``, ...) go to PyMongo."""
        return self._collection(name, options)

    async def _run(self, call: Callable[[AsyncDatabase[Any]], Awaitable[T]], *, idempotent: bool, label: str) -> T:
        store = self.mongo.failover
        backend = self.mongo.backend

        async def attempt(endpoint: Endpoint) -> T:
            async with backend.lease(endpoint) as client:
                return await call(client.get_database(_database_name(endpoint, self.name)))

        return await store.run(attempt, idempotent=idempotent, label=label)

    async def command(self, command: Any, *args: Any, idempotent: bool = False, **kwargs: Any) -> Any:
        """Run a database command; pass ``idempotent=True`` for read-only commands."""
        return await self._run(lambda db: db.command(command, *args, **kwargs), idempotent=idempotent, label="command")

    async def list_collection_names(self, **kwargs: Any) -> list[str]:
        names = await self._run(lambda db: db.list_collection_names(**kwargs), idempotent=True, label="list_collection_names")
        return list(names)

    async def drop_collection(self, name: str, **kwargs: Any) -> Any:
        return await self._run(lambda db: db.drop_collection(name, **kwargs), idempotent=True, label="drop_collection")


class MongoStore:
    """The MongoDB side of :class:`~failover.Databases` (``dbs.mongodb``).

    >>> await dbs.mongodb.database["items"].insert_one({"name": "x"})

    Attributes:
        failover: the :class:`~failover.core.store.FailoverStore` (state, health, status).
        backend: the :class:`MongoBackend` holding a client per endpoint.
    """

    def __init__(self, store: FailoverStore[Any], backend: MongoBackend, journal: MongoJournal | None = None) -> None:
        self.failover = store
        self.backend = backend
        self.journal = journal
        """Records writes sent to the fallback for reconcile (None when ``FAILOVER_RECONCILE=false``)."""
        self._database = RoutedDatabase(self)

    @property
    def database(self) -> RoutedDatabase:
        """The application database, routed to the active endpoint at each call."""
        return self._database

    def get_database(self, name: str | None = None) -> RoutedDatabase:
        """A routed database named *name* on both endpoints (default: the configured names)."""
        return self._database if name is None else RoutedDatabase(self, name)

    @property
    def client(self) -> AsyncMongoClient[Any]:
        """The raw ``AsyncMongoClient`` of the endpoint active *now*, for advanced use.

        It does not fail over: it keeps talking to that endpoint, and it is
        closed when traffic leaves it. Take it again after a switch.
        """
        role = self.failover.switch.active_role or self.failover.switch.preferred_role
        return self.backend.current_client(self.failover.endpoints[role])

    def start_session(self, **kwargs: Any) -> Any:
        """PyMongo's ``AsyncClientSession`` on the endpoint active now; it does not survive a switch
        (see :mod:`.mongodb_surface`)."""
        return start_session(self, **kwargs)

    async def aclose(self) -> None:
        """Close every client (``Databases.close()`` calls it)."""
        for endpoint in self.failover.endpoints.values():
            await self.backend.close(endpoint)


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
        from .mongodb_capture import MongoCapture, MongoJournal

        journal = MongoJournal(operation_timeout=options.operation_timeout)
        capture = MongoCapture(journal, connect_timeout=settings.connect_timeout)
    store = FailoverStore(backend, endpoints, options, bus=bus, clock=clock, capture=capture)
    return MongoStore(store, backend, journal)
