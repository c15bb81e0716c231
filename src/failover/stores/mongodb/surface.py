"""The rest of PyMongo's ``AsyncDatabase``/``AsyncCollection`` on the routed objects, and sessions.

:mod:`.mongodb` routes CRUD, aggregation and indexes. These mixins add every
other public method of PyMongo's ``AsyncDatabase`` and ``AsyncCollection``
(4.10 through 4.x; ``tests/unit/test_driver_surface.py`` enumerates them), so
ODMs such as Beanie work unchanged on ``dbs.mongodb.database``:

* **Cursors** (``list_collections``, ``list_indexes``, ``cursor_command``,
  database ``aggregate``, ``list_search_indexes``, ``find_raw_batches``,
  ``aggregate_raw_batches``) are read whole on one endpoint inside one routed
  operation (retried on the other one when safe) and handed back as a
  :class:`BufferedCursor`: ``await cursor.to_list()``, ``async for``,
  ``await anext(cursor)``, ``close()`` behave like PyMongo's. A cursor of a live
  server cannot resume on another, so nothing is read lazily across a switch.
* **DDL** (``create_collection``, ``rename``, ``drop_indexes``, search indexes)
  runs on the active endpoint and is not captured for reconcile, like
  ``create_index``/``drop`` (DDL is not replicated; see the reconcile notes).
* **Options** (``with_options``, ``codec_options``, ``read_preference``,
  ``write_concern``, ``read_concern``) are applied on whichever endpoint serves
  each call.
* **Change streams** (``watch``) open on the active endpoint and return
  PyMongo's own change stream: it does **not** follow a switch (a resume token
  of one server means nothing to another); when its server goes away, reading
  it raises PyMongo's error and you open a new one. A standalone fallback has no
  change streams at all.
* **Sessions**: ``dbs.mongodb.start_session()`` starts a session (and
  transactions, on a replica set) on the endpoint active at that moment. A
  session belongs to one client: it does not survive a switch. After a switch,
  an operation that passes it is sent to the new endpoint's client, which
  refuses it with PyMongo's ``InvalidOperation`` ("Can only use session with the
  AsyncMongoClient that started it"): end it and start a new one. Inside
  ``with_transaction``, a failover aborts the transaction the way a lost
  primary would.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from bson.codec_options import DEFAULT_CODEC_OPTIONS
from pymongo.read_concern import ReadConcern
from pymongo.read_preferences import ReadPreference
from pymongo.write_concern import WriteConcern

__all__ = ["BufferedCursor", "RawBatches", "RoutedClient", "RoutedCollectionSurface", "RoutedDatabaseSurface", "RoutedQuerySurface"]

_OPTION_NAMES = ("codec_options", "read_preference", "write_concern", "read_concern")


class BufferedCursor(list):  # type: ignore[type-arg]
    """The documents of a cursor read whole on one endpoint, with PyMongo's cursor API.

    It is also a list, so code that expected the list older versions returned keeps working.
    """

    def __init__(self, documents: Sequence[Any] = ()) -> None:
        super().__init__(documents)
        self._pending = collections.deque(documents)

    @property
    def alive(self) -> bool:
        return bool(self._pending)

    def __aiter__(self) -> BufferedCursor:
        return self

    async def __anext__(self) -> Any:
        if not self._pending:
            raise StopAsyncIteration
        return self._pending.popleft()

    async def next(self) -> Any:
        return await self.__anext__()

    async def try_next(self) -> Any:
        return self._pending.popleft() if self._pending else None

    async def to_list(self, length: int | None = None) -> list[Any]:
        count = len(self._pending) if length is None else min(length, len(self._pending))
        return [self._pending.popleft() for _ in range(count)]

    async def close(self) -> None:
        self._pending.clear()

    async def __aenter__(self) -> BufferedCursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __await__(self) -> Any:
        async def itself() -> BufferedCursor:
            return self

        return itself().__await__()


async def _drain(cursor: Any) -> BufferedCursor:
    try:
        return BufferedCursor(await cursor.to_list(None))
    finally:
        await cursor.close()


class RawBatches:
    """``find_raw_batches()``/``aggregate_raw_batches()``: BSON batches read on one endpoint when iterated."""

    def __init__(self, collection: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._collection = collection
        self._method = method
        self._args = args
        self._kwargs = kwargs
        self._buffer: BufferedCursor | None = None

    async def _load(self) -> BufferedCursor:
        if self._buffer is None:
            async def read(c: Any) -> BufferedCursor:
                cursor = getattr(c, self._method)(*self._args, **self._kwargs)
                if isinstance(cursor, Awaitable):
                    cursor = await cursor
                return await _drain(cursor)

            self._buffer = await self._collection._run(read, idempotent=True, label=self._method)
        return self._buffer

    def __aiter__(self) -> RawBatches:
        return self

    async def __anext__(self) -> Any:
        return await (await self._load()).__anext__()

    async def to_list(self, length: int | None = None) -> list[Any]:
        return await (await self._load()).to_list(length)

    async def close(self) -> None:
        if self._buffer is not None:
            await self._buffer.close()

    def __await__(self) -> Any:
        async def itself() -> RawBatches:
            return self

        return itself().__await__()


class RoutedQuerySurface:
    """``anext(query)``: what Beanie and other ODMs call on a ``find()`` cursor."""

    to_list: Callable[..., Awaitable[list[Any]]]

    async def __anext__(self) -> Any:
        buffer: collections.deque[Any] | None = self.__dict__.get("_buffer")
        if buffer is None:
            buffer = self.__dict__["_buffer"] = collections.deque(await self.to_list())
        if not buffer:
            raise StopAsyncIteration
        return buffer.popleft()

    async def next(self) -> Any:
        return await self.__anext__()

    async def close(self) -> None:
        self.__dict__["_buffer"] = collections.deque()


class RoutedCollectionSurface:
    """Mixin of :class:`~failover.stores.mongodb.RoutedCollection` (see the module docstring)."""

    database: Any
    name: str
    _options: dict[str, Any]
    _run: Callable[..., Awaitable[Any]]
    _read: Callable[..., Awaitable[Any]]
    _write: Callable[..., Awaitable[Any]]

    # --- options --------------------------------------------------------------------------

    def with_options(
        self,
        codec_options: Any = None,
        read_preference: Any = None,
        write_concern: Any = None,
        read_concern: Any = None,
    ) -> Any:
        """A routed collection with other options (applied on every endpoint)."""
        given = dict(codec_options=codec_options, read_preference=read_preference, write_concern=write_concern, read_concern=read_concern)
        options = {**self._options, **{k: v for k, v in given.items() if v is not None}}
        return type(self)(self.database, self.name, options)  # type: ignore[call-arg]  # a mixin: RoutedCollection's __init__

    @property
    def codec_options(self) -> Any:
        return self._options.get("codec_options") or self.database.codec_options

    @property
    def read_preference(self) -> Any:
        return self._options.get("read_preference") or self.database.read_preference

    @property
    def write_concern(self) -> Any:
        return self._options.get("write_concern") or self.database.write_concern

    @property
    def read_concern(self) -> Any:
        return self._options.get("read_concern") or self.database.read_concern

    def next(self) -> Any:
        raise TypeError(f"'{type(self).__name__}' object is not iterable")

    __next__ = next

    # --- reads returning cursors ----------------------------------------------------------

    async def options(self, session: Any = None, comment: Any = None) -> Any:
        return await self._read("options", session=session, comment=comment)

    def find_raw_batches(self, *args: Any, **kwargs: Any) -> RawBatches:
        return RawBatches(self, "find_raw_batches", args, kwargs)

    async def aggregate_raw_batches(self, pipeline: Any, session: Any = None, comment: Any = None, **kwargs: Any) -> RawBatches:
        return RawBatches(self, "aggregate_raw_batches", (pipeline,), dict(session=session, comment=comment, **kwargs))

    async def list_search_indexes(self, name: Any = None, session: Any = None, comment: Any = None, **kwargs: Any) -> BufferedCursor:
        async def read(c: Any) -> BufferedCursor:
            return await _drain(await c.list_search_indexes(name, session=session, comment=comment, **kwargs))

        return await self._run(read, idempotent=True, label="list_search_indexes")  # type: ignore[no-any-return]

    async def watch(self, *args: Any, **kwargs: Any) -> Any:
        """PyMongo's change stream, opened on the active endpoint; it does not follow a switch."""
        return await self._run(lambda c: c.watch(*args, **kwargs), idempotent=True, label="watch")

    # --- DDL (not captured) ---------------------------------------------------------------

    async def rename(self, new_name: str, session: Any = None, comment: Any = None, **kwargs: Any) -> Any:
        return await self._write("rename", (new_name,), dict(session=session, comment=comment, **kwargs), False, captured=False)

    async def drop_indexes(self, session: Any = None, comment: Any = None, **kwargs: Any) -> None:
        await self._write("drop_indexes", (), dict(session=session, comment=comment, **kwargs), True, captured=False)

    async def create_search_index(self, model: Any, session: Any = None, comment: Any = None, **kwargs: Any) -> Any:
        return await self._write("create_search_index", (model,), dict(session=session, comment=comment, **kwargs), False, captured=False)

    async def create_search_indexes(self, models: Any, session: Any = None, comment: Any = None, **kwargs: Any) -> Any:
        return await self._write("create_search_indexes", (models,), dict(session=session, comment=comment, **kwargs), False, captured=False)

    async def drop_search_index(self, name: str, session: Any = None, comment: Any = None, **kwargs: Any) -> None:
        await self._write("drop_search_index", (name,), dict(session=session, comment=comment, **kwargs), False, captured=False)

    async def update_search_index(self, name: str, definition: Any, session: Any = None, comment: Any = None, **kwargs: Any) -> None:
        await self._write("update_search_index", (name, definition), dict(session=session, comment=comment, **kwargs), False, captured=False)


class RoutedDatabaseSurface:
    """Mixin of :class:`~failover.stores.mongodb.RoutedDatabase` (see the module docstring)."""

    mongo: Any
    name: str | None
    _run: Callable[..., Awaitable[Any]]

    def _settings(self) -> dict[str, Any]:
        return self.__dict__.setdefault("_failover_options", {})

    @property
    def client(self) -> RoutedClient:
        """A routed stand-in for the database's ``AsyncMongoClient`` (what ODMs reach for)."""
        return RoutedClient(self.mongo)

    def with_options(
        self,
        codec_options: Any = None,
        read_preference: Any = None,
        write_concern: Any = None,
        read_concern: Any = None,
    ) -> Any:
        """A routed database whose collections use these options on every endpoint."""
        copy = type(self)(self.mongo, self.name)  # type: ignore[call-arg]  # a mixin: RoutedDatabase's __init__
        given = dict(codec_options=codec_options, read_preference=read_preference, write_concern=write_concern, read_concern=read_concern)
        copy._settings().update(self._settings())
        copy._settings().update({k: v for k, v in given.items() if v is not None})
        return copy

    @property
    def codec_options(self) -> Any:
        return self._settings().get("codec_options", DEFAULT_CODEC_OPTIONS)

    @property
    def read_preference(self) -> Any:
        return self._settings().get("read_preference", ReadPreference.PRIMARY)

    @property
    def write_concern(self) -> Any:
        return self._settings().get("write_concern", WriteConcern())

    @property
    def read_concern(self) -> Any:
        return self._settings().get("read_concern", ReadConcern())

    def next(self) -> Any:
        raise TypeError(f"'{type(self).__name__}' object is not iterable")

    __next__ = next

    def _collection(self, name: str, options: Mapping[str, Any] | None = None) -> Any:
        from .routed import RoutedCollection

        merged = {**self._settings(), **(options or {})}
        return RoutedCollection(self, name, merged)  # type: ignore[arg-type]

    async def create_collection(
        self,
        name: str,
        codec_options: Any = None,
        read_preference: Any = None,
        write_concern: Any = None,
        read_concern: Any = None,
        session: Any = None,
        check_exists: bool | None = True,
        **kwargs: Any,
    ) -> Any:
        """Create *name* on the active endpoint (not captured: DDL); returns a routed collection."""
        given = dict(codec_options=codec_options, read_preference=read_preference, write_concern=write_concern, read_concern=read_concern)
        options = {k: v for k, v in given.items() if v is not None}
        await self._run(
            lambda db: db.create_collection(name, session=session, check_exists=check_exists, **options, **kwargs),
            idempotent=False,
            label="create_collection",
        )
        return self._collection(name, options)

    async def list_collections(self, session: Any = None, filter: Any = None, comment: Any = None, **kwargs: Any) -> BufferedCursor:
        async def read(db: Any) -> BufferedCursor:
            return await _drain(await db.list_collections(session=session, filter=filter, comment=comment, **kwargs))

        return await self._run(read, idempotent=True, label="list_collections")  # type: ignore[no-any-return]

    async def cursor_command(self, command: Any, value: Any = 1, *args: Any, idempotent: bool = False, **kwargs: Any) -> BufferedCursor:
        """Like ``command``, for commands answering with a cursor; ``idempotent=True`` for reads."""
        async def read(db: Any) -> BufferedCursor:
            return await _drain(await db.cursor_command(command, value, *args, **kwargs))

        return await self._run(read, idempotent=idempotent, label="cursor_command")  # type: ignore[no-any-return]

    async def aggregate(self, pipeline: Any, session: Any = None, **kwargs: Any) -> BufferedCursor:
        """A database aggregation (``$currentOp``, ``$documents``...); ``$out``/``$merge`` are writes."""
        writes = any(isinstance(stage, Mapping) and ("$out" in stage or "$merge" in stage) for stage in pipeline)

        async def read(db: Any) -> BufferedCursor:
            return await _drain(await db.aggregate(pipeline, session=session, **kwargs))

        return await self._run(read, idempotent=not writes, label="aggregate")  # type: ignore[no-any-return]

    async def dereference(self, dbref: Any, session: Any = None, comment: Any = None, **kwargs: Any) -> Any:
        return await self._run(
            lambda db: db.dereference(dbref, session=session, comment=comment, **kwargs), idempotent=True, label="dereference"
        )

    async def validate_collection(
        self, name_or_collection: Any, scandata: bool = False, full: bool = False, session: Any = None,
        background: bool | None = None, comment: Any = None,
    ) -> Any:  # fmt: skip
        name = getattr(name_or_collection, "name", name_or_collection)
        return await self._run(
            lambda db: db.validate_collection(name, scandata=scandata, full=full, session=session, background=background, comment=comment),
            idempotent=True,
            label="validate_collection",
        )

    async def watch(self, *args: Any, **kwargs: Any) -> Any:
        """PyMongo's database change stream, opened on the active endpoint; it does not follow a switch."""
        return await self._run(lambda db: db.watch(*args, **kwargs), idempotent=True, label="watch")


class RoutedClient:
    """What ``database.client`` gives: the parts of ``AsyncMongoClient`` that can be routed.

    ``append_metadata`` (ODMs announce themselves) reaches the clients open now;
    ``start_session`` starts a session on the active endpoint (see the module
    docstring); ``get_database``/``[name]`` return routed databases. For
    anything else use ``dbs.mongodb.client``, the raw client of the active
    endpoint (it does not fail over).
    """

    def __init__(self, mongo: Any) -> None:
        self._mongo = mongo

    def append_metadata(self, driver_info: Any) -> None:
        backend = self._mongo.backend
        clients = [entry.client for entry in backend._entries.values()] + list(backend._raw.values())
        for client in clients:
            append = getattr(client, "append_metadata", None)
            if append is not None:
                append(driver_info)

    def get_database(self, name: str | None = None, **options: Any) -> Any:
        database = self._mongo.get_database(name)
        return database.with_options(**options) if options else database

    def get_default_database(self, default: str | None = None, **options: Any) -> Any:
        return self.get_database(None, **options)

    def __getitem__(self, name: str) -> Any:
        return self.get_database(name)

    def start_session(self, **kwargs: Any) -> Any:
        return self._mongo.start_session(**kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(
            f"database.client.{name} is not routed: use dbs.mongodb.client for the raw AsyncMongoClient "
            "of the active endpoint (it does not fail over)"
        )


def start_session(mongo: Any, **kwargs: Any) -> Any:
    """``dbs.mongodb.start_session(**kwargs)``: PyMongo's session on the endpoint active now."""
    return mongo.client.start_session(**kwargs)
