"""The routed API: ``dbs.mongodb.database``, its collections and queries.

* every call on a routed collection picks the active endpoint *at call time*,
  so a collection handle taken before a failover keeps working after it;
* reads (``find``, ``find_one``, ``count_documents``, ``distinct``,
  ``aggregate`` without ``$out``/``$merge``, ...) are idempotent: any
  connection-level failure sends them to the other endpoint;
* writes are sent to the other endpoint only when they are known not to have
  reached a server (no server selectable, connection refused, the server said
  "not primary"); a write whose connection broke after it was sent raises
  :class:`~failover.errors.OutcomeUnknown` and is never re-executed.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import NotPrimaryError

from ...core.endpoint import Endpoint, Role
from .backend import _MaybePartlyApplied
from .surface import BufferedCursor, RoutedCollectionSurface, RoutedDatabaseSurface, RoutedQuerySurface
from .urls import DEFAULT_DATABASE

if TYPE_CHECKING:
    from .client import MongoStore

__all__ = ["RoutedCollection", "RoutedDatabase", "RoutedQuery"]

T = TypeVar("T")

_OUTPUT_STAGES = ("$out", "$merge")


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

    # The hot path of every CRUD method: one coroutine for the routing (``store.run``) and one for
    # the attempt, which calls PyMongo's method itself (no closure, no lambda, no lease coroutine).
    async def _attempt(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], captured: bool, endpoint: Endpoint
    ) -> Any:
        mongo = self.database.mongo
        backend = mongo.backend
        entry = backend.take_alive(endpoint)
        if entry is None:
            entry = await backend.take(endpoint)  # a new client (and sentinel) is needed: may raise _NotSent
        try:
            collection = entry.routed.get((self.database.name, self.name)) if not self._options else None
            if collection is None:
                collection = entry.routed_collection(endpoint, self.database.name, self.name, self._options)
            if captured and endpoint.role is Role.FALLBACK:
                journal = mongo.journal
                if journal is not None and journal.captures(self.name):
                    # Writes on the fallback are journaled so they reach the primary before failback.
                    return await journal.write(entry.client, endpoint, self.database.name, collection, method, args, kwargs)
            return await getattr(collection, method)(*args, **kwargs)
        finally:
            entry.inflight -= 1  # backend.give_back, inlined (hot path)
            if not entry.inflight and entry._idle is not None:
                entry._idle.set()

    def _read(self, method: str, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        return self.database.mongo.failover.run(
            functools.partial(self._attempt, method, args, kwargs, False), idempotent=True, label=f"{method} on {self.name}"
        )

    def _write(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], idempotent: bool, *, captured: bool = True
    ) -> Coroutine[Any, Any, Any]:
        return self.database.mongo.failover.run(
            functools.partial(self._attempt, method, args, kwargs, captured),
            idempotent=idempotent,
            label=f"{method} on {self.name}",
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

