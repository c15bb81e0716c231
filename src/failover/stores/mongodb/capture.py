"""MongoDB change capture on the fallback (an intent journal) and its copy into the primary.

The usual local fallback is a standalone server: no multi-document transactions,
no change streams, so the only atomic unit is one document and the record of a
change cannot be written in the same transaction as the change. Hence an
*intent journal*, written by the routed client before every write it sends to
the fallback:

* **Intent** — one document per ``(database, collection, _id)`` in
  ``failover_journal`` (in the fallback's configured database), holding the
  document's image *before its first change since it was last reconciled*
  (BSON bytes, or ``None`` when it did not exist), a ``version`` bumped by every
  intent and every settle, and a ``pending`` count with a ``pending_until``
  deadline. A routed write to the fallback reads the images of the documents it
  may change, upserts their intents (``$setOnInsert`` keeps the first image),
  runs the write, then *settles* (``pending - 1``, ``version + 1``).
* **Filters whose ids are not known in advance** (``update_many``, ``delete_one``
  by a field, ``find_one_and_*``, upserts, every request kind of ``bulk_write``):
  the documents matching the filter are read first, with the same filter, sort,
  collation and hint; their intents are written; then the write runs restricted
  to ``{"$and": [{"_id": {"$in": ids}}, filter]}``, so it can only touch
  captured documents. A document that starts matching between the read and the
  write is left alone (as if the write ran just before the change that made it
  match); one that stops matching is left alone too (the change came first). A
  single-document write whose document stopped matching is retried from the
  read (up to ``SINGLE_RETRIES`` times), so it behaves like the original
  ``*_one``. An upsert that matched nothing gets its ``_id`` assigned in
  advance (``$setOnInsert`` or the replacement's ``_id``) and an intent for it,
  with "absent" as image. Pipeline-style upserts cannot have their ``_id``
  assigned: the upserted id is captured from the reply (a crash between that
  write and its intent is the one window where a write is not captured).
* **Why this is enough** — reconcile never trusts an intent on its own: it
  compares the fallback's current document with the intent's before-image.
  Equal means the fallback did not change it (a crash between intent and write,
  a write that failed or matched nothing): nothing is copied, so a stale
  fallback document never overwrites the primary. Absent now but present in the
  image means the fallback deleted it; absent in both means nothing happened.
  Images are read before the intent is written, so an image is never newer than
  the document's state when the intent appeared: a missed change cannot hide
  behind it.
* **In flight** — an intent with ``pending > 0`` belongs to a write that may not
  have landed yet; reconcile leaves it alone until it settles or until
  ``pending_until`` (the write's deadline plus a grace) has passed (the writer
  died). An intent leaves the journal only after the primary acknowledged the
  copy and only if its ``version`` did not move meanwhile (``delete_one`` on
  ``{_id, version}``), so a write made during the copy stays in the backlog.
* **Copy** — a batch reads the oldest settled intents, the fallback's current
  documents and the primary's, and writes the fallback's final state with one
  unordered ``bulk_write`` per collection: ``ReplaceOne(upsert=True)`` by
  ``_id``, or ``DeleteOne`` where the fallback deleted it.
* **Conflicts** — the primary's document differs from the before-image *and*
  from the fallback's: the primary changed it after we left.
  ``FAILOVER_CONFLICT_POLICY`` decides; ``newest_wins`` compares the time of the
  fallback's last intent with the primary document's ``updated_at`` (or
  ``modified_at``) field (a date, epoch seconds or ISO-8601 text); a document
  without one loses to the fallback's. Final-state copy means counters
  (``$inc``) are not merged: under ``fallback_wins`` the fallback's final value
  replaces the primary's, increments made on the primary meanwhile are lost
  (and reported as a conflict). Each conflict is written to
  ``failover_conflicts`` on the fallback before the primary is touched.
* **Final catch-up** — the write hold copies the intents whose ``last_at`` is at
  or below the wall-clock time taken once this process's writes are quiesced
  (the watermark); intents written later come from other processes still on the
  fallback and stay for them (or for the sweep of a process on the primary).
* **Lock** — a lease document ``{_id: "reconcile", owner, expires_at}`` in
  ``failover_locks`` on the fallback, taken with a conditional upsert and
  renewed while held. It uses wall-clock time because it is shared between
  processes; a SIGKILLed holder blocks the others for at most ``LOCK_TTL``.

The journal, conflict and lock collections are the library's own
(:data:`LIBRARY_COLLECTIONS`): never captured and never copied. Not captured:
writes through the raw client (``dbs.mongodb.client``), ``database.command``,
``aggregate`` with ``$out``/``$merge``, ``drop``/``drop_collection`` and index
changes (DDL is not replicated).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
import inspect
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

import bson
from bson import Binary, ObjectId
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient, DeleteMany, DeleteOne, InsertOne, ReplaceOne, ReturnDocument, UpdateMany, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, ConnectionFailure, DuplicateKeyError, NotPrimaryError, PyMongoError
from pymongo.results import BulkWriteResult, DeleteResult, UpdateResult

from ...core.endpoint import Endpoint, Role
from ...core.reconcile import BatchResult, Capture, Conflict, ConflictPolicy, Resolution, change_time, resolve, summarize
from .backend import _MaybePartlyApplied, _NotSent
from .urls import DEFAULT_DATABASE, client_options

__all__ = [
    "CONFLICTS",
    "JOURNAL",
    "LIBRARY_COLLECTIONS",
    "LOCKS",
    "MongoCapture",
    "MongoJournal",
    "UNKNOWN",
    "document_changed",
    "fixed_id",
    "journal_key",
    "plan_copy",
]

logger = logging.getLogger("failover.mongodb.capture")

# The library's own collections, in the fallback's configured database. Never captured.
JOURNAL = "failover_journal"
CONFLICTS = "failover_conflicts"
LOCKS = "failover_locks"
LIBRARY_COLLECTIONS = frozenset({JOURNAL, CONFLICTS, LOCKS})

LOCK_TTL = 15.0
"""Seconds a reconcile lease lives without renewal (a SIGKILLed holder blocks others this long)."""
LOCK_RENEW = LOCK_TTL / 3
PENDING_GRACE = 5.0
"""Seconds after a write's own deadline before its unsettled intent counts as settled."""
SINGLE_RETRIES = 3
"""Times a single-document write whose document stopped matching is retried from the read."""
EXACT_COUNT_BELOW = 1_000
"""Backlogs up to this size are counted exactly; larger ones from the collection's metadata."""
WRITE_CHUNK = 10_000
"""Ids per restricted write of ``update_many``/``delete_many`` (keeps ``$in`` lists bounded)."""
UNKNOWN = "unknown"
"""``before`` value of an intent whose image could not be taken (see :meth:`MongoJournal._settle`)."""

_READ_OPTIONS = ("collation", "hint", "let", "session", "comment")


# --- pure helpers --------------------------------------------------------------------------


def fixed_id(filter: Any) -> tuple[bool, Any]:
    """``(True, id)`` when *filter* pins ``_id`` by equality, so the write can touch only that document."""
    if not isinstance(filter, Mapping) or "_id" not in filter:
        return False, None
    value = filter["_id"]
    if isinstance(value, Mapping) and any(str(k).startswith("$") for k in value):
        if len(value) == 1 and "$eq" in value:
            return True, value["$eq"]
        return False, None
    return True, value


def journal_key(database: str | None, collection: str, doc_id: Any) -> str:
    """The journal ``_id`` of one document: unambiguous for any BSON ``_id`` type.

    (An embedded document as ``_id`` would need equality on a sub-document, which
    some MongoDB-wire servers do not support; a string works everywhere.)
    """
    return f"{database or ''}\x1f{collection}\x1f{bson.encode({'i': doc_id}).hex()}"


def _encode(document: Mapping[str, Any] | None) -> Binary | None:
    if document is None:
        return None
    if isinstance(document, RawBSONDocument):
        return Binary(document.raw)
    return Binary(bson.encode(document))


def _decode(image: Any) -> dict[str, Any] | None:
    if image is None:
        return None
    return bson.decode(bytes(image))


def document_changed(before: Any, current: Mapping[str, Any] | None) -> bool:
    """Did the fallback change the document since the intent's image was taken?

    *before* is the stored image (BSON bytes), ``None`` for "absent", or
    :data:`UNKNOWN`. Absent before and absent now is no change; equal documents
    (field order aside) are no change.
    """
    if before == UNKNOWN:
        return True
    image = _decode(before)
    if image is None:
        return current is not None
    return current is None or dict(current) != image


def plan_copy(
    before: Any, mine: Mapping[str, Any] | None, theirs: Mapping[str, Any] | None,
    policy: ConflictPolicy, fallback_changed_at: float | None,
) -> tuple[str, tuple[Resolution, str] | None]:
    """What to do with one captured document: ``(action, conflict)``.

    *action* is ``"skip"`` (the fallback did not change it, or the primary
    already holds the fallback's version), ``"replace"`` or ``"delete"``;
    *conflict* is the resolution and its reason when the primary changed it too.
    """
    if not document_changed(before, mine):
        return "skip", None
    if (None if theirs is None else dict(theirs)) == (None if mine is None else dict(mine)):
        return "skip", None
    conflict = None
    if before == UNKNOWN or _decode(before) != (None if theirs is None else dict(theirs)):
        conflict = resolve(policy, fallback_changed_at, change_time(theirs))
        if conflict[0] is Resolution.PRIMARY_KEPT:
            return "skip", conflict
    return ("delete" if mine is None else "replace"), conflict


def _restricted(ids: list[Any], filter: Any) -> dict[str, Any]:
    return {"$and": [{"_id": {"$in": ids}}, filter or {}]}


def _read_options(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: kwargs[k] for k in _READ_OPTIONS if kwargs.get(k) is not None}


_SIGNATURES: dict[str, inspect.Signature] = {}


def _arguments(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The caller's arguments by name, as PyMongo's *method* would bind them (defaults left out)."""
    signature = _SIGNATURES.get(method)
    if signature is None:
        signature = _SIGNATURES[method] = inspect.signature(getattr(AsyncCollection, method))
    bound = signature.bind(None, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop("self", None)
    arguments.update(arguments.pop("kwargs", {}))
    return arguments


def _wall() -> float:
    return time.time()  # shared between processes: monotonic clocks are not


# --- the journal: capture on the routed write path -----------------------------------------


class _Write:
    """One routed write to the fallback: where its intents go and whether it was sent yet."""

    __slots__ = ("journal", "database", "collection", "until", "keys", "sent", "batched")

    def __init__(
        self, journal: AsyncCollection[Any], database: str | None, collection: str, until: float, batched: bool
    ) -> None:
        self.journal = journal
        self.database = database
        self.collection = collection
        self.until = until
        self.keys: list[str] = []
        self.sent = False
        self.batched = batched
        """The write is sent in several batches (a refusal may follow applied ones)."""


class MongoJournal:
    """Writes intents around every routed write sent to the fallback (see the module docstring).

    Args:
        operation_timeout: the routed operations' deadline; an unsettled intent
            counts as settled this long (plus ``PENDING_GRACE``) after it was written.
    """

    def __init__(self, *, operation_timeout: float) -> None:
        self.pending_for = max(operation_timeout, 1.0) + PENDING_GRACE

    @staticmethod
    def captures(collection: str) -> bool:
        return collection not in LIBRARY_COLLECTIONS and not collection.startswith("system.")

    async def write(
        self,
        client: AsyncMongoClient[Any],
        fallback: Endpoint,
        database: str | None,
        collection: AsyncCollection[Any],
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Run *method* on *collection* (of the fallback) with its intents around it."""
        journal = client.get_database(fallback.option("database") or DEFAULT_DATABASE).get_collection(JOURNAL)
        handler = getattr(self, f"_{method}")
        arguments = _arguments(method, args, kwargs)
        batched = method in ("insert_many", "bulk_write") and len(args[0]) > 1
        ctx = _Write(journal, database, collection.name, _wall() + self.pending_for, batched)
        try:
            return await handler(ctx, collection, **arguments)
        finally:
            if ctx.keys:
                await self._settle(ctx)

    # --- intents --------------------------------------------------------------------------

    async def _step(self, ctx: _Write, step: Awaitable[Any]) -> Any:
        """A read or intent step: a connection failure before the write was sent is "not sent"."""
        try:
            return await step
        except ConnectionFailure as exc:
            if not ctx.sent:
                raise _NotSent(f"recording the write on the fallback failed: {exc}") from exc
            raise _MaybePartlyApplied(f"recording a later part of the write failed: {exc}") from exc

    async def _send(self, ctx: _Write, step: Awaitable[Any]) -> Any:
        """The application's write itself."""
        first = not ctx.sent
        ctx.sent = True
        try:
            return await step
        except NotPrimaryError as exc:
            if first and not ctx.batched:
                raise
            raise _MaybePartlyApplied(f"the fallback refused a later part of the write: {exc}") from exc

    async def _images(
        self, ctx: _Write, collection: AsyncCollection[Any], ids: list[Any], session: Any = None
    ) -> dict[Any, Any]:
        if not ids:
            return {}
        found = await self._step(
            ctx, collection.find({"_id": {"$in": ids}}, session=session).to_list(None)
        )
        images: dict[Any, Any] = dict.fromkeys(ids)
        for document in found:
            images[document["_id"]] = document
        return images

    async def _intend(self, ctx: _Write, images: Mapping[Any, Any]) -> None:
        """Record an intent for each document of *images* (its ``_id`` → image or None)."""
        if not images:
            return
        now = _wall()
        requests = []
        for doc_id, image in images.items():
            key = journal_key(ctx.database, ctx.collection, doc_id)
            ctx.keys.append(key)
            requests.append(
                UpdateOne(
                    {"_id": key},
                    {
                        "$setOnInsert": {
                            "db": ctx.database,
                            "coll": ctx.collection,
                            "doc_id": doc_id,
                            "before": _encode(image),
                            "first_at": now,
                        },
                        "$inc": {"version": 1, "pending": 1},
                        "$max": {"pending_until": ctx.until},
                        "$set": {"last_at": now},
                    },
                    upsert=True,
                )
            )
        for attempt in range(2):
            try:
                await self._step(ctx, ctx.journal.bulk_write(requests, ordered=False))
                return
            except BulkWriteError as exc:
                # Two writers inserting the same intent at once: the loser retries as an update.
                if attempt or any(e.get("code") != 11000 for e in exc.details.get("writeErrors", [])):
                    raise
                failed = {e["index"] for e in exc.details["writeErrors"]}
                requests = [r for i, r in enumerate(requests) if i in failed]

    async def _settle(self, ctx: _Write) -> None:
        """Mark this write's intents as landed. Never raises: an unsettled intent expires."""
        keys = list(dict.fromkeys(ctx.keys))
        counts: dict[str, int] = {}
        for key in ctx.keys:
            counts[key] = counts.get(key, 0) + 1
        try:
            result = await ctx.journal.bulk_write(
                [UpdateOne({"_id": k}, {"$inc": {"pending": -counts[k], "version": 1}}) for k in keys], ordered=False
            )
            if result.matched_count < len(keys):
                # Our intent outlived pending_until and a reconcile took it away before this
                # write landed: record the document again, image unknown.
                present = {d["_id"] for d in await ctx.journal.find({"_id": {"$in": keys}}, {"_id": 1}).to_list(None)}
                now = _wall()
                await ctx.journal.bulk_write(
                    [
                        UpdateOne(
                            {"_id": k},
                            {
                                "$setOnInsert": {"db": ctx.database, "coll": ctx.collection, "before": UNKNOWN,
                                                 "first_at": now, "pending": 0, "pending_until": 0.0,
                                                 "doc_id": bson.decode(bytes.fromhex(k.rsplit("\x1f", 1)[1]))["i"]},
                                "$inc": {"version": 1},
                                "$set": {"last_at": now},
                            },
                            upsert=True,
                        )
                        for k in keys
                        if k not in present
                    ],
                    ordered=False,
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the intents stay pending until pending_until: reconcile still sees them
            logger.warning("settling %d intent(s) on the fallback failed: %s", len(keys), type(exc).__name__)

    async def _capture_upserted(self, ctx: _Write, ids: list[Any]) -> None:
        """Intents for documents upserted under an ``_id`` we could not assign in advance."""
        fresh = [i for i in ids if journal_key(ctx.database, ctx.collection, i) not in ctx.keys]
        if fresh:
            await self._intend(ctx, dict.fromkeys(fresh))

    # --- inserts --------------------------------------------------------------------------

    @staticmethod
    def _ensure_id(document: Any) -> Any:
        if isinstance(document, RawBSONDocument):
            return document["_id"]
        if "_id" not in document:
            document["_id"] = ObjectId()  # what PyMongo itself does before sending
        return document["_id"]

    async def _insert_one(self, ctx: _Write, collection: AsyncCollection[Any], document: Any, *args: Any, **kwargs: Any) -> Any:
        doc_id = self._ensure_id(document)
        await self._intend(ctx, await self._images(ctx, collection, [doc_id], kwargs.get("session")))
        return await self._send(ctx, collection.insert_one(document, *args, **kwargs))

    async def _insert_many(self, ctx: _Write, collection: AsyncCollection[Any], documents: Any, *args: Any, **kwargs: Any) -> Any:
        documents = list(documents)
        ids = [self._ensure_id(d) for d in documents]
        await self._intend(ctx, await self._images(ctx, collection, ids, kwargs.get("session")))
        return await self._send(ctx, collection.insert_many(documents, *args, **kwargs))

    # --- single-document writes -----------------------------------------------------------

    async def _single(
        self,
        ctx: _Write,
        collection: AsyncCollection[Any],
        method: str,
        filter: Any,
        body: Any,
        kwargs: dict[str, Any],
    ) -> Any:
        """``update_one``, ``replace_one``, ``delete_one`` and ``find_one_and_*``, captured."""
        upsert = bool(kwargs.get("upsert"))
        replace = method in ("replace_one", "find_one_and_replace")
        returns_document = method.startswith("find_one_and_")
        call_args = () if body is None else (body,)
        session = kwargs.get("session")
        pinned, doc_id = fixed_id(filter)
        if pinned:
            # Only that document can change: its image is all we need.
            await self._intend(ctx, await self._images(ctx, collection, [doc_id], session))
            if replace and upsert and isinstance(body, Mapping) and "_id" not in body:
                body = {"_id": doc_id, **body}  # some servers ignore the filter's _id on a replace upsert
                call_args = (body,)
            result = await self._send(ctx, getattr(collection, method)(filter, *call_args, **kwargs))
            if upsert and not returns_document:
                upserted = getattr(result, "upserted_id", None)
                if upserted is not None:
                    await self._capture_upserted(ctx, [upserted])
            return result
        read = _read_options(kwargs)
        if kwargs.get("sort") is not None:
            read["sort"] = kwargs["sort"]
        result = None
        for _ in range(SINGLE_RETRIES):
            current = await self._step(ctx, collection.find_one(filter, **read))
            if current is None:
                if upsert:
                    return await self._upsert_new(ctx, collection, method, filter, body, kwargs)
                if returns_document:
                    return None
                # Nothing matched when we looked: answer as the server would, touching nothing.
                return await self._send(ctx, getattr(collection, method)(_restricted([], filter), *call_args, **kwargs))
            await self._intend(ctx, {current["_id"]: current})
            options = dict(kwargs)
            options.pop("upsert", None)
            result = await self._send(
                ctx, getattr(collection, method)(_restricted([current["_id"]], filter), *call_args, **options)
            )
            if returns_document:
                if result is not None:
                    return result
            elif (result.deleted_count if isinstance(result, DeleteResult) else result.matched_count) > 0:
                return result
            # The document stopped matching between our read and the write: look again.
        return result

    async def _upsert_new(
        self, ctx: _Write, collection: AsyncCollection[Any], method: str, filter: Any, body: Any, kwargs: dict[str, Any]
    ) -> Any:
        """An upsert that matched nothing: insert under an ``_id`` chosen (and captured) in advance."""
        new_id: Any = ObjectId()
        restricted = _restricted([], filter)  # never matches: the write can only insert
        options = dict(kwargs)
        returns_document = method.startswith("find_one_and_")
        pipeline = isinstance(body, list)
        if method in ("replace_one", "find_one_and_replace"):
            new_id = body.get("_id", new_id)
            body = {**body, "_id": new_id}
        elif not pipeline:
            on_insert = dict(body.get("$setOnInsert") or {})
            new_id = on_insert.setdefault("_id", new_id)
            body = {**body, "$setOnInsert": on_insert}
        if not pipeline:
            await self._intend(ctx, {new_id: None})
        if returns_document:
            # find_one_and_* with an upsert, as update_one/replace_one then a read: some servers
            # ignore a $setOnInsert _id in findAndModify.
            for name in ("sort", "projection", "return_document", "array_filters"):
                options.pop(name, None)
            plain = "replace_one" if method == "find_one_and_replace" else "update_one"
            if method == "find_one_and_update" and kwargs.get("array_filters") is not None:
                options["array_filters"] = kwargs["array_filters"]
            result = await self._send(ctx, getattr(collection, plain)(restricted, body, **options))
            if pipeline and result.upserted_id is not None:
                await self._capture_upserted(ctx, [result.upserted_id])
            if kwargs.get("return_document", ReturnDocument.BEFORE) != ReturnDocument.AFTER:
                return None
            upserted = result.upserted_id if result.upserted_id is not None else new_id
            read = {k: kwargs[k] for k in ("projection", "session") if kwargs.get(k) is not None}
            return await collection.find_one({"_id": upserted}, **read)
        result = await self._send(ctx, getattr(collection, method)(restricted, body, **options))
        upserted = getattr(result, "upserted_id", None)
        if upserted is not None:
            await self._capture_upserted(ctx, [upserted])
        return result

    async def _update_one(self, ctx: _Write, collection: AsyncCollection[Any], filter: Any, update: Any, **kwargs: Any) -> Any:
        return await self._single(ctx, collection, "update_one", filter, update, kwargs)

    async def _replace_one(self, ctx: _Write, collection: AsyncCollection[Any], filter: Any, replacement: Any, **kwargs: Any) -> Any:
        return await self._single(ctx, collection, "replace_one", filter, replacement, kwargs)

    async def _delete_one(self, ctx: _Write, collection: AsyncCollection[Any], filter: Any, **kwargs: Any) -> Any:
        return await self._single(ctx, collection, "delete_one", filter, None, kwargs)

    async def _find_one_and_update(self, ctx: _Write, collection: AsyncCollection[Any], filter: Any, update: Any, **kwargs: Any) -> Any:
        return await self._single(ctx, collection, "find_one_and_update", filter, update, kwargs)

    async def _find_one_and_replace(self, ctx: _Write, collection: AsyncCollection[Any], filter: Any, replacement: Any, **kwargs: Any) -> Any:
        return await self._single(ctx, collection, "find_one_and_replace", filter, replacement, kwargs)

    async def _find_one_and_delete(self, ctx: _Write, collection: AsyncCollection[Any], filter: Any, **kwargs: Any) -> Any:
        return await self._single(ctx, collection, "find_one_and_delete", filter, None, kwargs)

    # --- multi-document writes ------------------------------------------------------------

    async def _many(
        self, ctx: _Write, collection: AsyncCollection[Any], method: str, filter: Any, body: Any, kwargs: dict[str, Any]
    ) -> Any:
        """``update_many``/``delete_many``: read the matching documents, capture them, write only those."""
        call_args = () if body is None else (body,)
        pinned, doc_id = fixed_id(filter)
        if pinned:
            await self._intend(ctx, await self._images(ctx, collection, [doc_id], kwargs.get("session")))
            result = await self._send(ctx, getattr(collection, method)(filter, *call_args, **kwargs))
            upserted = getattr(result, "upserted_id", None)
            if upserted is not None:
                await self._capture_upserted(ctx, [upserted])
            return result
        found = await self._step(ctx, collection.find(filter, **_read_options(kwargs)).to_list(None))
        options = dict(kwargs)
        upsert = bool(options.pop("upsert", False))
        if not found:
            if upsert:
                return await self._upsert_new(ctx, collection, method, filter, body, kwargs)
            return await self._send(ctx, getattr(collection, method)(_restricted([], filter), *call_args, **options))
        matched = modified = 0
        for start in range(0, len(found), WRITE_CHUNK):
            chunk = found[start : start + WRITE_CHUNK]
            await self._intend(ctx, {d["_id"]: d for d in chunk})
            part = await self._send(
                ctx, getattr(collection, method)(_restricted([d["_id"] for d in chunk], filter), *call_args, **options)
            )
            if isinstance(part, DeleteResult):
                matched += part.deleted_count
            else:
                matched += part.matched_count
                modified += part.modified_count
        if method == "delete_many":
            return DeleteResult({"n": matched, "ok": 1.0}, True)
        if matched == 0 and upsert:  # every document stopped matching: the upsert applies
            return await self._upsert_new(ctx, collection, method, filter, body, kwargs)
        return UpdateResult({"n": matched, "nModified": modified, "ok": 1.0, "updatedExisting": matched > 0}, True)

    async def _update_many(self, ctx: _Write, collection: AsyncCollection[Any], filter: Any, update: Any, **kwargs: Any) -> Any:
        return await self._many(ctx, collection, "update_many", filter, update, kwargs)

    async def _delete_many(self, ctx: _Write, collection: AsyncCollection[Any], filter: Any, **kwargs: Any) -> Any:
        return await self._many(ctx, collection, "delete_many", filter, None, kwargs)

    # --- bulk_write -----------------------------------------------------------------------

    async def _bulk_write(
        self, ctx: _Write, collection: AsyncCollection[Any], requests: Any, ordered: bool = True, **kwargs: Any
    ) -> Any:
        """Runs of requests that name their ``_id`` go as one captured bulk; the others one by one.

        An unordered bulk runs its keyed requests first. The reply is one
        ``BulkWriteResult`` (or ``BulkWriteError``) with the caller's indexes.
        """
        requests = list(requests)
        segments: list[tuple[bool, list[tuple[int, Any]]]] = []
        for index, request in enumerate(requests):
            keyed = isinstance(request, InsertOne) or fixed_id(getattr(request, "_filter", None))[0]
            if keyed and segments and segments[-1][0]:
                segments[-1][1].append((index, request))
            else:
                segments.append((keyed, [(index, request)]))
        if not ordered:
            keyed_all = [item for keyed, items in segments if keyed for item in items]
            segments = ([(True, keyed_all)] if keyed_all else []) + [s for s in segments if not s[0]]
        if len(segments) == 1 and segments[0][0]:
            return await self._keyed_bulk(ctx, collection, [r for _, r in segments[0][1]], ordered, kwargs)
        totals: dict[str, Any] = {
            "writeErrors": [], "writeConcernErrors": [], "nInserted": 0, "nUpserted": 0,
            "nMatched": 0, "nModified": 0, "nRemoved": 0, "upserted": [],
        }  # fmt: skip
        for keyed, items in segments:
            if keyed:
                try:
                    result = await self._keyed_bulk(ctx, collection, [r for _, r in items], ordered, kwargs)
                    _merge(totals, result.bulk_api_result, [i for i, _ in items])
                except BulkWriteError as exc:
                    _merge(totals, exc.details, [i for i, _ in items])
                    if ordered:
                        raise BulkWriteError(totals) from exc
                continue
            index, request = items[0]
            try:
                _merge_single(totals, index, request, await self._one_request(ctx, collection, request, kwargs))
            except (DuplicateKeyError, PyMongoError) as exc:
                if isinstance(exc, ConnectionFailure):
                    raise
                totals["writeErrors"].append(
                    {"index": index, "code": getattr(exc, "code", None), "errmsg": str(exc), "op": {}}
                )
                if ordered:
                    raise BulkWriteError(totals) from exc
        if totals["writeErrors"]:
            raise BulkWriteError(totals)
        return BulkWriteResult(totals, True)

    async def _keyed_bulk(
        self, ctx: _Write, collection: AsyncCollection[Any], requests: list[Any], ordered: bool, kwargs: dict[str, Any]
    ) -> Any:
        ids: list[Any] = []
        prepared: list[Any] = []
        for request in requests:
            if isinstance(request, InsertOne):
                ids.append(self._ensure_id(request._doc))
                prepared.append(request)
                continue
            doc_id = fixed_id(request._filter)[1]
            ids.append(doc_id)
            if isinstance(request, ReplaceOne) and request._upsert and "_id" not in request._doc:
                request = ReplaceOne(
                    request._filter, {"_id": doc_id, **request._doc}, upsert=True,
                    collation=request._collation, hint=getattr(request, "_hint", None),
                )  # fmt: skip
            prepared.append(request)
        await self._intend(ctx, await self._images(ctx, collection, list(dict.fromkeys(ids)), kwargs.get("session")))
        return await self._send(ctx, collection.bulk_write(prepared, ordered=ordered, **kwargs))

    async def _one_request(self, ctx: _Write, collection: AsyncCollection[Any], request: Any, kwargs: dict[str, Any]) -> Any:
        options: dict[str, Any] = {k: v for k, v in kwargs.items() if k in ("session", "comment", "let")}
        for name in ("collation", "hint"):
            value = getattr(request, f"_{name}", None)
            if value is not None:
                options[name] = value
        if isinstance(request, (UpdateOne, UpdateMany, ReplaceOne)) and request._upsert:
            options["upsert"] = True
        if isinstance(request, (UpdateOne, UpdateMany)) and request._array_filters is not None:
            options["array_filters"] = request._array_filters
        if isinstance(request, (UpdateOne, ReplaceOne)) and getattr(request, "_sort", None) is not None:
            options["sort"] = request._sort
        if isinstance(request, UpdateOne):
            return await self._single(ctx, collection, "update_one", request._filter, request._doc, options)
        if isinstance(request, ReplaceOne):
            return await self._single(ctx, collection, "replace_one", request._filter, request._doc, options)
        if isinstance(request, DeleteOne):
            return await self._single(ctx, collection, "delete_one", request._filter, None, options)
        if isinstance(request, UpdateMany):
            return await self._many(ctx, collection, "update_many", request._filter, request._doc, options)
        if isinstance(request, DeleteMany):
            return await self._many(ctx, collection, "delete_many", request._filter, None, options)
        raise TypeError(f"{type(request).__name__} is not a supported bulk_write request")


def _merge(totals: dict[str, Any], reply: Mapping[str, Any], indexes: list[int]) -> None:
    """Add one sub-bulk's reply to *totals*, mapping its request indexes to the caller's."""
    for name in ("nInserted", "nUpserted", "nMatched", "nModified", "nRemoved"):
        totals[name] += reply.get(name, 0)
    for item in reply.get("upserted", []):
        totals["upserted"].append({**item, "index": indexes[item["index"]]})
    for error in reply.get("writeErrors", []):
        totals["writeErrors"].append({**error, "index": indexes[error["index"]]})
    totals["writeConcernErrors"].extend(reply.get("writeConcernErrors", []))


def _merge_single(totals: dict[str, Any], index: int, request: Any, result: Any) -> None:
    if isinstance(result, DeleteResult):
        totals["nRemoved"] += result.deleted_count
        return
    if result.upserted_id is not None:
        totals["nUpserted"] += 1
        totals["upserted"].append({"index": index, "_id": result.upserted_id})
    else:
        totals["nMatched"] += result.matched_count
        totals["nModified"] += result.modified_count or 0


# --- reconcile -----------------------------------------------------------------------------


class MongoCapture(Capture):
    """The reconcile side of the intent journal: backlog, copy, lock, conflict log.

    Args:
        journal: the routed write path's journal (its settings).
        connect_timeout: seconds to connect and to select a server.
        lock_ttl: seconds a reconcile lease lives without renewal.
    """

    store = "mongodb"

    def __init__(self, journal: MongoJournal, *, connect_timeout: float = 2.0, lock_ttl: float = LOCK_TTL) -> None:
        if lock_ttl <= 0:
            raise ValueError("lock_ttl must be greater than 0")
        self.journal = journal
        self.connect_timeout = connect_timeout
        self.lock_ttl = lock_ttl
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._clients: dict[Role, AsyncMongoClient[Any]] = {}
        self._installed = False
        self.skipped_unchanged = 0

    # --- connections ----------------------------------------------------------------------

    def _client(self, endpoint: Endpoint) -> AsyncMongoClient[Any]:
        client = self._clients.get(endpoint.role)
        if client is None:
            options = client_options(endpoint.url, connect_timeout=self.connect_timeout, pool_min_size=0, pool_max_size=4)
            options["appname"] = "failover-reconcile"
            client = self._clients[endpoint.role] = AsyncMongoClient(endpoint.url, **options)
        return client

    def _own(self, fallback: Endpoint, name: str) -> AsyncCollection[Any]:
        return self._client(fallback).get_database(fallback.option("database") or DEFAULT_DATABASE).get_collection(name)

    def _collection(self, endpoint: Endpoint, database: str | None, name: str) -> AsyncCollection[Any]:
        return self._client(endpoint).get_database(database or endpoint.option("database") or DEFAULT_DATABASE)[name]

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await client.close()

    # --- Capture --------------------------------------------------------------------------

    async def install(self, fallback: Endpoint, primary: Endpoint | None) -> None:
        # Intents are written by the routed client whatever happens here; this only
        # adds the indexes the copy reads by.
        if self._installed:
            return
        await self._own(fallback, JOURNAL).create_index([("first_at", 1)])
        await self._own(fallback, CONFLICTS).create_index([("at", -1)])
        self._installed = True

    async def backlog(self, fallback: Endpoint) -> int:
        journal = self._own(fallback, JOURNAL)
        # The collection's metadata count is nearly free, but may be off after an unclean
        # shutdown: near zero, where the reconciler decides to fail back, count exactly.
        estimate = int(await journal.estimated_document_count())
        if estimate > EXACT_COUNT_BELOW:
            return estimate
        return int(await journal.count_documents({}))

    async def watermark(self, fallback: Endpoint) -> float:
        # Intents carry the wall-clock time of their last write (last_at): every intent this
        # process wrote before its writes were held is at or below "now".
        return _wall()

    async def backlog_upto(self, fallback: Endpoint, watermark: Any) -> int:
        return int(await self._own(fallback, JOURNAL).count_documents({"last_at": {"$lte": watermark}}))

    async def apply_upto(
        self, primary: Endpoint, fallback: Endpoint, policy: ConflictPolicy, limit: int, watermark: Any
    ) -> BatchResult:
        return await self._apply(primary, fallback, policy, limit, {"last_at": {"$lte": watermark}})

    async def apply_batch(
        self, primary: Endpoint, fallback: Endpoint, policy: ConflictPolicy, limit: int
    ) -> BatchResult:
        return await self._apply(primary, fallback, policy, limit, {})

    async def _apply(
        self, primary: Endpoint, fallback: Endpoint, policy: ConflictPolicy, limit: int, selection: dict[str, Any]
    ) -> BatchResult:
        journal = self._own(fallback, JOURNAL)
        now = _wall()
        # Oldest first; intents of writes still in flight wait for the next batch. (A plain
        # sorted read: an $or on pending/pending_until costs more than it saves.)
        oldest = await journal.find(selection, sort=[("first_at", 1)], limit=limit).to_list(None)
        entries = [e for e in oldest if e.get("pending", 0) <= 0 or e.get("pending_until", 0) < now]
        if not entries:
            if oldest:
                await asyncio.sleep(0.02)  # only writes still in flight: let them land
            return BatchResult(remaining=len(oldest))
        groups: dict[tuple[str | None, str], list[dict[str, Any]]] = {}
        for entry in entries:
            groups.setdefault((entry.get("db"), entry["coll"]), []).append(entry)
        conflicts: list[Conflict] = []
        plans: list[tuple[tuple[str | None, str], list[Any], list[dict[str, Any]]]] = []
        for (database, name), items in groups.items():
            ids = [e["doc_id"] for e in items]
            mine = {d["_id"]: d async for d in self._collection(fallback, database, name).find({"_id": {"$in": ids}})}
            theirs = {d["_id"]: d async for d in self._collection(primary, database, name).find({"_id": {"$in": ids}})}
            writes: list[Any] = []
            for entry in items:
                doc_id = entry["doc_id"]
                current = mine.get(doc_id)
                action, conflict = plan_copy(entry.get("before"), current, theirs.get(doc_id), policy, entry.get("last_at"))
                if action == "skip" and conflict is None and not document_changed(entry.get("before"), current):
                    self.skipped_unchanged += 1
                if conflict is not None:
                    conflicts.append(
                        Conflict(
                            store=self.store,
                            key=f"{database or '<default>'}.{name} {_id_text(doc_id)}",
                            resolution=conflict[0],
                            at=now,
                            primary=summarize(theirs.get(doc_id)),
                            fallback=summarize(current),
                            detail=conflict[1],
                        )
                    )
                if action == "replace":
                    writes.append(ReplaceOne({"_id": doc_id}, current, upsert=True))
                elif action == "delete":
                    writes.append(DeleteOne({"_id": doc_id}))
            plans.append(((database, name), writes, items))
        if conflicts:
            await self._record_conflicts(fallback, conflicts)
        done: list[dict[str, Any]] = []
        failure: BulkWriteError | None = None
        for (database, name), writes, items in plans:
            if writes:
                try:
                    await self._collection(primary, database, name).bulk_write(writes, ordered=False)
                except BulkWriteError as exc:
                    # Keep the intents of the documents the primary refused (e.g. a unique index).
                    refused = {writes[e["index"]]._filter["_id"] for e in exc.details.get("writeErrors", [])}
                    items = [e for e in items if e["doc_id"] not in refused]
                    failure = exc
            done.extend(items)
        result = BatchResult(conflicts=conflicts)
        if done:
            # Forget an intent only if no write touched its document since we read it.
            by_version: dict[Any, list[str]] = {}
            for entry in done:
                by_version.setdefault(entry["version"], []).append(entry["_id"])
            removed = await journal.bulk_write(
                [DeleteMany({"_id": {"$in": keys}, "version": version}) for version, keys in by_version.items()],
                ordered=False,
            )
            result.applied = removed.deleted_count
        if failure is not None:
            errors = failure.details.get("writeErrors", [])
            raise RuntimeError(
                f"the primary refused {len(errors)} document(s) of the copy: {errors[0].get('errmsg', '')[:200]}"
            )
        return result

    async def _record_conflicts(self, fallback: Endpoint, conflicts: list[Conflict]) -> None:
        await self._own(fallback, CONFLICTS).insert_many(
            [{**c.to_dict(), "primary": _plain(c.primary), "fallback": _plain(c.fallback)} for c in conflicts],
            ordered=False,
        )

    async def conflicts(self, fallback: Endpoint, limit: int) -> list[dict[str, Any]]:
        found = await self._own(fallback, CONFLICTS).find({}, {"_id": 0}, sort=[("at", -1)], limit=limit).to_list(None)
        keys = ("store", "key", "resolution", "at", "primary", "fallback", "detail")
        return [{k: doc.get(k) for k in keys} for doc in found]

    @contextlib.asynccontextmanager
    async def lock(self, fallback: Endpoint) -> AsyncIterator[bool]:
        locks = self._own(fallback, LOCKS)
        taken = await self._take_lease(locks)
        if not taken:
            yield False
            return
        renewer = asyncio.get_running_loop().create_task(self._renew(locks))
        try:
            yield True
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await renewer
            with contextlib.suppress(Exception):
                await locks.delete_one({"_id": "reconcile", "owner": self.owner})

    async def _take_lease(self, locks: AsyncCollection[Any]) -> bool:
        now = _wall()
        try:
            result = await locks.update_one(
                {"_id": "reconcile", "$or": [{"expires_at": {"$lt": now}}, {"owner": self.owner}]},
                {"$set": {"owner": self.owner, "expires_at": now + self.lock_ttl}},
                upsert=True,
            )
        except DuplicateKeyError:
            return False  # held by a live owner
        return bool(result.matched_count or result.upserted_id is not None)

    async def _renew(self, locks: AsyncCollection[Any]) -> None:
        while True:
            await asyncio.sleep(min(LOCK_RENEW, self.lock_ttl / 3))
            try:
                result = await locks.update_one(
                    {"_id": "reconcile", "owner": self.owner}, {"$set": {"expires_at": _wall() + self.lock_ttl}}
                )
                if not result.matched_count:
                    logger.warning("mongodb: the reconcile lease expired and was taken by another process")
            except PyMongoError as exc:
                logger.warning("mongodb: renewing the reconcile lease failed: %s", type(exc).__name__)

    def describe(self) -> dict[str, Any]:
        return {"journal": JOURNAL, "unchanged_intents_skipped": self.skipped_unchanged}


def _id_text(doc_id: Any) -> str:
    try:
        return json.dumps(doc_id, default=str)
    except (TypeError, ValueError):
        return str(doc_id)


def _field(name: str) -> str:
    name = name.replace(".", "\uff0e")
    return "\uff04" + name[1:] if name.startswith("$") else name


def _plain(summary: Any) -> Any:
    """A summary made storable: keys that MongoDB refuses (``$x``, ``a.b``) as text."""
    if isinstance(summary, dict):
        return {_field(str(k)): _plain(v) for k, v in summary.items()}
    if isinstance(summary, list):
        return [_plain(v) for v in summary]
    return summary

