"""MongoDB warm sync: change streams on the primary, final-state copies into the fallback.

Atlas (the usual primary) is a replica set: change streams work there. Per
collection of the configured database:

* **Initial copy** — a change stream is opened *first* (its resume token marks
  the start), then the collection is compared with the fallback's batch by
  batch (plain cursors: see :meth:`MongoWarmSync._compare`), and the documents that differ are written
  (``ReplaceOne(upsert=True)``), those the primary lacks deleted. Then the
  stream is read from that token: a change made during the copy arrives once
  more, harmlessly (see the next point). Progress: documents done of the
  primary's estimated count.
* **Streaming** — events only say *which* documents changed: each batch reads
  those documents' current state on the primary (one ``$in`` query per
  collection) and writes it (or deletes it) on the fallback with one unordered
  ``bulk_write``. A final state, never an event's image: replaying an old event
  cannot bring an old version back, so resuming from an older token is always
  safe, and several processes syncing the same pair never write a version
  older than the one their lookup saw (taking events' images instead made no
  measurable difference to the primary here, and a process behind the others
  would write older versions over newer ones, past the heartbeats of the
  others). After applied batches the stream's resume token is stored on the
  fallback (``failover_warm``, one document per collection, at most every
  :data:`TOKEN_SAVE_INTERVAL`; a quiet stream's advancing position every
  :data:`QUIET_TOKEN_SAVE_INTERVAL`): a new process resumes from it without a
  new copy. Streams are read with the server's own
  ``aggregate``/``getMore`` commands (:class:`_Stream`), one whole batch per
  ``getMore``, so a round costs the primary one ``getMore`` per stream however
  fast the application writes (more only while batches come back full), and
  knows when a stream was read to its end. Where cursors live on one of several
  routers (a sharded cluster, a load balancer) PyMongo's ``watch()`` is used
  instead (:class:`_DriverStream`), which cannot tell that.
* **Comparison** where change streams are not available (a standalone primary,
  a server without them: opening a change stream fails): the same
  comparison as the initial copy, every :data:`DEFAULT_COMPARE_INTERVAL`
  seconds; its pace is the lag.

Never against reconcile:

* Copies are written with the sync's own client, never through the routed
  collections, so the intent journal of :mod:`.capture` records none of them.
* A document that has an intent in the fallback's journal (written on the
  fallback, not yet reconciled) is never written by the sync; and every write
  checks first that the store is still on its primary.
* :meth:`MongoWarmSync.pause` (at failover) ends the loop and closes the
  streams; :meth:`MongoWarmSync.resume` (after failback) reopens them from their
  tokens: the events since (including the writes reconcile copied into the
  primary) are applied as final states, so nothing reconciled is undone and
  nothing is copied again.

Lag: a heartbeat document in ``failover_warm_heartbeat`` on the primary (one per
process) travels through its own change stream, polled first in each round and
applied last, and only once every data stream has been read to its end (a
``getMore`` answered with less than a full batch) in that round or a later one:
a heartbeat seen on the fallback means every change made before it was applied
too. Collections that are compared instead of streamed are not covered by it
(their lag is the comparison interval).

On ``nx-27017`` (the test servers), measured: a collection's change stream works
(insert/update/replace/delete events, resume tokens that survive a restart),
database- and client-level ``watch()`` open but deliver nothing, and an
integer ``_id`` comes back as text in ``documentKey`` (the ``fullDocument``'s
``_id`` is right, and it is sent for deletes too). Hence per-collection
streams, with the ``_id`` taken from ``fullDocument`` when present.

Dropped collections: a ``drop``/``invalidate`` event (MongoDB) or its absence
from the primary's list at a discovery (nx-27017 sends no event) ends its stream
and forgets its token, and a stream is never opened on a collection the primary
no longer lists: on nx-27017 opening a stream creates the collection it watches
(measured), which would bring a just-dropped collection back. A drop within the
instant between that check and the stream's opening can still be undone on such a server.
The fallback keeps a dropped collection's documents (DDL is not synced).

Not covered: other databases; DDL (indexes, drops on the fallback); a collection
created on the primary joins within :data:`DISCOVER_INTERVAL`, with an initial
copy of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import time
from typing import Any

import bson
from bson import ObjectId
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient, DeleteOne, ReplaceOne
from pymongo.errors import ConfigurationError, OperationFailure, PyMongoError
from pymongo.topology_description import TOPOLOGY_TYPE

from ...core.endpoint import Endpoint
from ...core.tasks import cancel_and_wait
from ...core.warm import SyncProgress, WarmSync
from .capture import JOURNAL, LIBRARY_COLLECTIONS, journal_key
from .urls import DEFAULT_DATABASE, client_options

__all__ = ["MongoWarmSync"]

logger = logging.getLogger("failover.mongodb.warm")

TOKENS = "failover_warm"
"""On the fallback: the resume token of each collection's stream."""
HEARTBEAT = "failover_warm_heartbeat"
"""On the primary (and, synced, on the fallback): one heartbeat document per process."""
DEFAULT_BATCH = 500
"""Documents per comparison batch and events per applied batch."""
DEFAULT_COMPARE_INTERVAL = 10.0
"""Seconds between two comparisons of a collection whose changes cannot be streamed."""
DEFAULT_POLL_INTERVAL = 0.02
"""Seconds the loop rests after a round that found no event."""
DEFAULT_IDLE_POLL_MAX = 0.1
"""Most seconds the loop rests while rounds keep finding nothing: the rest doubles from
:data:`DEFAULT_POLL_INTERVAL` after each empty round and is reset by the first round that applies a
change. A server that ignores ``maxAwaitTimeMS`` (nx-27017 answers every ``getMore`` at once) would
otherwise cost a ``getMore`` per stream every 20 ms while idle. Adds at most this much to the lag
of the first write after a quiet spell."""
DEFAULT_ROUND_INTERVAL = 0.05
"""Least seconds from the start of a round that applied changes to the start of the next. Under
load a round then gathers many events, so the primary's lookups and the fallback's writes are
one ``find`` and one ``bulk_write`` per batch, not per write; it adds at most this to the lag."""
TOKEN_SAVE_INTERVAL = 1.0
"""Least seconds between two saves of one collection's resume token on the fallback. Resuming
from an older token only applies some final states again (see above), so a process killed in
between loses nothing."""
QUIET_TOKEN_SAVE_INTERVAL = 60.0
"""Least seconds between two saves of a stream's position that advanced with no event (a quiet
collection's token would otherwise grow older than the primary's change history, and resuming
from it would need a new comparison)."""
EVENTS_PER_ROUND = 10 * DEFAULT_BATCH
"""Events read from one stream per round (their distinct documents are applied in batches)."""
EVENTS_PER_READ = 1000
"""Events asked for by one ``getMore``: a batch with fewer tells that the stream is read to its end."""
FULL_BATCH_BYTES = 8 * 1024 * 1024
"""A ``getMore`` reply this big may have been cut by the server's 16 MiB batch limit: not read to its end."""
SOCKET_TIMEOUT = 30.0
"""Most seconds the sync's connections wait for one reply (a copy batch, a lookup, a ``getMore``)."""
CLOSE_TIMEOUT = 1.0
"""Most seconds closing the streams may take (a dead primary does not answer; its cursors die with it)."""
POLL_AWAIT_MS = 20
"""How long one stream's ``getMore`` may wait for an event (a round polls every stream)."""
RETRY_PAUSE = 0.5
DISCOVER_INTERVAL = 1.0
"""Seconds between two looks for collections created on the primary (each joins with a copy)."""


class _Stopped(Exception):
    """The store left its primary: nothing more may be written into the fallback."""


class _Collection:
    """One synced collection: its stream (None: compared instead) and what it has done."""

    __slots__ = ("compare", "copied", "drained", "name", "next_compare", "saved_at", "stream", "token")

    def __init__(self, name: str) -> None:
        self.name = name
        self.stream: Any = None
        self.token: Any = None
        self.compare = False
        self.next_compare = 0.0
        self.copied = False
        self.drained = -1
        """The last round in which its stream was read to its end."""
        self.saved_at = float("-inf")
        """When its token was last stored on the fallback (``time.monotonic()``)."""


class _Stream:
    """One collection's change stream, read with the server's own ``aggregate``/``getMore`` commands.

    PyMongo's change stream hides where one server batch ends: ``try_next()`` asks for the next
    batch as soon as the last one is used up, so under a steady writer it goes on fetching a few
    events per round trip, never learns that it has read everything the server had, and costs the
    primary a ``getMore`` per write or two. :meth:`read` returns one whole batch and says whether
    it was the server's last (fewer events than asked for): the stream is then *drained* as of the
    moment that ``getMore`` was sent, whatever has been written since. The cursor lives in an
    explicit session: a server checks that a cursor's ``getMore`` comes in the session that opened it.
    """

    __slots__ = ("_batch", "_db", "_first", "_id", "_name", "_session", "token")

    def __init__(self, db: Any, name: str, session: Any, batch: int) -> None:
        self._db = db
        self._name = name
        self._session = session
        self._batch = batch
        self._id = 0
        self._first: list[dict[str, Any]] = []
        self.token: Any = None
        """Where the stream stands: resuming from it reads what comes after the events returned so far."""

    async def open(self, token: Any) -> None:
        """Open the stream after *token* (None: from now); raises the server's ``OperationFailure``."""
        spec = {} if token is None else {"resumeAfter": token}
        reply = await self._db.command(
            {"aggregate": self._name, "pipeline": [{"$changeStream": spec}], "cursor": {"batchSize": 0}},
            session=self._session,
        )
        cursor = reply["cursor"]
        self._id = cursor["id"]
        self._first = list(cursor.get("firstBatch") or ())
        self.token = self._position(cursor, self._first, token)

    @property
    def open_cursor(self) -> bool:
        """False once the server closed the cursor (an ``invalidate``, or a server that forgot it)."""
        return bool(self._id)

    async def read(self, await_ms: int) -> tuple[list[dict[str, Any]], bool]:
        """The next batch of events, and whether the server had no more when it was asked.

        A server ends a batch at ``batchSize`` events or at 16 MiB, whichever comes first: a batch
        with fewer events whose reply is under half that size was not cut by either — unless the
        next event is itself over 8 MiB (then a heartbeat can reach the fallback ahead of it).
        """
        if self._first:
            events, self._first = self._first, []
            return events, False
        reply = await self._db.command(
            {"getMore": self._id, "collection": self._name, "batchSize": self._batch, "maxTimeMS": await_ms},
            session=self._session,
            codec_options=_RAW,
        )
        cursor = reply["cursor"]
        events = [bson.decode(event.raw, self._db.codec_options) for event in cursor.get("nextBatch") or ()]
        self._id = cursor.get("id", 0)
        pbrt = cursor.get("postBatchResumeToken")
        self.token = self._position(
            {} if pbrt is None else {"postBatchResumeToken": bson.decode(pbrt.raw)}, events, self.token
        )
        return events, len(events) < self._batch and len(reply.raw) < FULL_BATCH_BYTES

    @staticmethod
    def _position(cursor: dict[str, Any], events: list[dict[str, Any]], before: Any) -> Any:
        # The server's position after the batch (postBatchResumeToken) when it sends one, else the
        # last event's own token: both resume after every event of the batch.
        token = cursor.get("postBatchResumeToken")
        if token is None and events:
            token = events[-1].get("_id")
        return before if token is None else token

    async def close(self) -> None:
        """Close the server's cursor (errors ignored: a cursor of a dead server is gone with it)."""
        cursor_id, self._id = self._id, 0
        if cursor_id:
            with contextlib.suppress(Exception):
                await self._db.command({"killCursors": self._name, "cursors": [cursor_id]}, session=self._session)


class _DriverStream:
    """PyMongo's own change stream (``watch()``), for a primary whose cursors live on one of several
    routers (a sharded cluster's ``mongos``, a load balancer): the driver sends each ``getMore`` to
    the router that has the cursor, which :class:`_Stream`'s commands cannot. It hides where a
    server batch ends, so a read counts as the end of the stream only when a ``getMore`` found
    nothing: under writers that never pause, heartbeats wait and the lag is over-stated, never
    under-stated. Same interface as :class:`_Stream`.
    """

    __slots__ = ("_batch", "_collection", "_stream", "token")

    def __init__(self, collection: Any, batch: int) -> None:
        self._collection = collection
        self._batch = batch
        self._stream: Any = None
        self.token: Any = None

    async def open(self, token: Any) -> None:
        self._stream = await self._collection.watch(
            resume_after=token, max_await_time_ms=POLL_AWAIT_MS, batch_size=self._batch
        )
        self.token = self._stream.resume_token if self._stream.resume_token is not None else token

    @property
    def open_cursor(self) -> bool:
        return self._stream is not None and bool(self._stream.alive)

    async def read(self, await_ms: int) -> tuple[list[dict[str, Any]], bool]:
        events: list[dict[str, Any]] = []
        while len(events) < self._batch:
            event = await self._stream.try_next()
            if self._stream.resume_token is not None:
                self.token = self._stream.resume_token
            if event is None:
                return events, True
            events.append(event)
            if not self._stream.alive:  # ended by this event (invalidate)
                break
        return events, False

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.close()


class MongoWarmSync(WarmSync):
    """Change streams (or periodic comparison) from the primary into the fallback.

    Args:
        connect_timeout: seconds to reach a server.
        on_primary: tells whether the store still runs on its primary (checked before every
            write into the fallback); default: always.
        batch, compare_interval, round_interval: see the ``DEFAULT_*`` constants.
    """

    store = "mongodb"

    def __init__(
        self,
        *,
        connect_timeout: float = 2.0,
        on_primary: Any = None,
        batch: int = DEFAULT_BATCH,
        compare_interval: float = DEFAULT_COMPARE_INTERVAL,
        round_interval: float = DEFAULT_ROUND_INTERVAL,
    ) -> None:
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be greater than 0")
        if batch < 1 or compare_interval <= 0:
            raise ValueError("batch must be at least 1 and compare_interval greater than 0")
        if round_interval < 0:
            raise ValueError("round_interval must not be negative")
        self.round_interval = round_interval
        self.connect_timeout = connect_timeout
        self.on_primary = on_primary or (lambda: True)
        self.batch = batch
        self.compare_interval = compare_interval
        self.heartbeat_id = f"{secrets.token_hex(6)}"
        self._beats = 0  # heartbeats written on the primary (or tried)
        self._beat_seen = 0  # the newest of them read back from its stream
        self._clients: dict[str, AsyncMongoClient[Any]] = {}
        self._sessions: dict[str, Any] = {}
        self._orphans: list[Any] = []  # streams taken out of use, still to close
        self._endpoints: tuple[Endpoint, Endpoint] | None = None
        self._collections: dict[str, _Collection] = {}
        self._task: asyncio.Task[None] | None = None
        self._generation = 0  # bumped when the loop is stopped: a loop of an older one ends
        self._next_discover = 0.0
        self._held_beats: list[tuple[int, int]] = []  # (round read in, heartbeat number) not yet written
        self._rounds = 0
        self._active = False
        self._copying = False  # the first copy after setup (reported as 'copying')
        self._to_copy = False  # collections wait for their copy (later ones are copied quietly)
        self._copy_done = 0
        self._copy_total: int | None = None
        self._error: str | None = None
        self._failing_since: float | None = None
        # What the status reports.
        self.applied_documents = 0
        self.compared_copies = 0
        self.skipped_journaled = 0
        self.apply_errors = 0
        self.events = 0

    # --- connections ------------------------------------------------------------------------

    def _client(self, endpoint: Endpoint) -> AsyncMongoClient[Any]:
        client = self._clients.get(endpoint.url)
        if client is None:
            options = client_options(endpoint.url, connect_timeout=self.connect_timeout, pool_min_size=0, pool_max_size=4)
            options["appname"] = "failover-warm"
            # A timeoutMS in the URL would replace each getMore's short wait; a socket timeout
            # keeps a half-open connection from holding the loop for ever.
            options["timeoutMS"] = None
            options["socketTimeoutMS"] = int(SOCKET_TIMEOUT * 1000)
            client = AsyncMongoClient(endpoint.url, **options)
            self._clients[endpoint.url] = client
        return client

    async def _session(self, endpoint: Endpoint) -> Any:
        """The session this process's change streams on *endpoint* live in (see :class:`_Stream`)."""
        session = self._sessions.get(endpoint.url)
        if session is None:
            session = self._client(endpoint).start_session(causal_consistency=False)
            if inspect.isawaitable(session):  # PyMongo before 4.11 made it a coroutine
                session = await session
            self._sessions[endpoint.url] = session
        return session

    def _db(self, endpoint: Endpoint) -> Any:
        return self._client(endpoint).get_database(endpoint.option("database") or DEFAULT_DATABASE)

    async def close(self) -> None:
        self._active = False
        await self._stop()
        await self._close_streams()
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            with contextlib.suppress(Exception):
                await session.end_session()
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()

    # --- WarmSync ---------------------------------------------------------------------------

    async def setup(self, primary: Endpoint, fallback: Endpoint) -> None:
        await self._db(primary).command("ping")
        await self._db(fallback).command("ping")
        self._endpoints = (primary, fallback)
        await self._discover()
        self._copying = self._to_copy = any(not c.copied for c in self._collections.values())
        self._start()

    async def refresh(self, primary: Endpoint, fallback: Endpoint) -> None:
        # Discovery changes the collections the loop works on: it runs in the loop, now.
        self._next_discover = 0.0

    async def resume(self, primary: Endpoint, fallback: Endpoint) -> None:
        self._endpoints = (primary, fallback)
        await self._discover()
        self._start()

    async def pause(self, fallback: Endpoint) -> None:
        self._active = False
        self._detach(self._collections.values())  # now: even if this wait is cut short, none is reused
        await self._stop()
        self._held_beats = []  # their streams reopen past them: the next beats measure the lag
        await self._close_streams()

    def _detach(self, collections: Any) -> None:
        """Take *collections*' streams out of use at once (no wait): each reopens from its token,
        the position of what was applied, and is closed by the next :meth:`_close_streams`."""
        for coll in collections:
            if coll.stream is not None:
                self._orphans.append(coll.stream)
                coll.stream = None
            coll.drained = -1  # read again from its token before it lets a heartbeat through

    async def _close_streams(self) -> None:
        """Close every stream (each reopens from its token): at most :data:`CLOSE_TIMEOUT` seconds in all."""
        self._detach(self._collections.values())
        streams, self._orphans = self._orphans, []
        await _close(streams)

    async def heartbeat(self, primary: Endpoint) -> int:
        self._beats += 1
        await self._db(primary)[HEARTBEAT].update_one(
            {"_id": self.heartbeat_id}, {"$set": {"n": self._beats}}, upsert=True
        )
        return self._beats

    async def applied(self, fallback: Endpoint) -> int | None:
        doc = await self._db(fallback)[HEARTBEAT].find_one({"_id": self.heartbeat_id})
        return None if doc is None else int(doc["n"])

    async def progress(self, fallback: Endpoint) -> SyncProgress:
        broken = self._failing_since is not None and time.monotonic() - self._failing_since > 10.0
        return SyncProgress(
            state="broken" if broken else "copying" if self._copying else "streaming",
            tables=len(self._collections),
            tables_copied=sum(1 for c in self._collections.values() if c.copied),
            rows_done=self._copy_done if self._copying else None,
            rows_total=self._copy_total if self._copying else None,
            apply_errors=self.apply_errors,
            error=self._error,
        )

    def describe(self) -> dict[str, Any]:
        streamed = sorted(c.name for c in self._collections.values() if not c.compare)
        compared = sorted(c.name for c in self._collections.values() if c.compare)
        return {
            "mechanism": "change streams" if not compared else "change streams + periodic comparison",
            "streamed_collections": streamed,
            "compared_collections": compared,
            "compare_interval_s": self.compare_interval,
            "events": self.events,
            "applied_documents": self.applied_documents,
            "compared_copies": self.compared_copies,
            "skipped_journaled": self.skipped_journaled,
        }

    # --- collections ------------------------------------------------------------------------

    async def _discover(self) -> None:
        """Collections of the primary's database to sync; a new one starts with its initial copy."""
        assert self._endpoints is not None
        primary, fallback = self._endpoints
        names = await self._db(primary).list_collection_names()
        wanted = [n for n in names if not n.startswith("system.") and n not in LIBRARY_COLLECTIONS and n != TOKENS]
        if HEARTBEAT not in wanted:
            wanted.append(HEARTBEAT)
        for name in [n for n in self._collections if n not in wanted]:
            await self._forget(fallback, self._collections[name])
        stored = {d["_id"]: d.get("token") async for d in self._db(fallback)[TOKENS].find({"_id": {"$in": wanted}})}
        for name in wanted:
            if name not in self._collections:
                coll = _Collection(name)
                coll.token = stored.get(name)
                # A stored token: this fallback was copied before. Heartbeats are never copied: each
                # process writes its own on the fallback when the data before it is there.
                coll.copied = coll.token is not None or name == HEARTBEAT
                self._collections[name] = coll
                if not coll.copied:
                    self._to_copy = True

    async def _forget(self, fallback: Endpoint, coll: _Collection) -> None:
        """Stop syncing a collection the primary dropped; a new one of that name starts with a copy."""
        # The stored token first: when that fails (or is cancelled) nothing has changed yet, and
        # the next discovery forgets the collection again. Not application data: no _check().
        await self._db(fallback)[TOKENS].delete_one({"_id": coll.name})
        logger.info("mongodb: warm sync: %s was dropped on the primary: no longer synced", coll.name)
        self._collections.pop(coll.name, None)
        if coll.name == HEARTBEAT:
            self._next_discover = 0.0  # it is always synced: back (and re-created) at the next round
        if coll.stream is not None:
            stream, coll.stream = coll.stream, None
            await _close([stream])

    def _start(self) -> None:
        self._active = True
        task = self._task
        if task is None or task.done() or task.cancelling():
            self._generation += 1
            self._task = asyncio.get_running_loop().create_task(
                self._loop(self._generation), name="failover mongodb warm sync"
            )

    async def _stop(self) -> None:
        # The loop ends at its next turn even if this wait is itself cancelled (a deadline around
        # pause()): the reference is kept until it has ended, for close().
        self._generation += 1
        task = self._task
        await cancel_and_wait([task])
        if self._task is task:
            self._task = None

    # --- the loop ---------------------------------------------------------------------------

    async def _loop(self, generation: int) -> None:
        idle = 0  # consecutive rounds that applied nothing
        while generation == self._generation:
            started = time.monotonic()
            try:
                busy = await self._round()
                self._failing_since = None
                self._error = None
            except _Stopped:
                busy = False
                await self._close_streams()  # what was read and not applied is read again, from the tokens
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one round
                self.apply_errors += 1
                self._error = f"{type(exc).__name__}: {exc}"
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                if isinstance(exc, (PyMongoError, OSError, TimeoutError)):
                    logger.warning("mongodb: warm sync: %s", type(exc).__name__)
                else:  # a defect: say where, and go on (status turns "broken" if it persists)
                    logger.exception("mongodb: warm sync round failed unexpectedly")
                await self._close_streams()  # reopened from their tokens
                await asyncio.sleep(RETRY_PAUSE)
                continue
            if not busy:
                idle += 1
                await asyncio.sleep(min(DEFAULT_IDLE_POLL_MAX, DEFAULT_POLL_INTERVAL * 2 ** min(idle - 1, 8)))
                continue
            idle = 0
            if (rest := self.round_interval - (time.monotonic() - started)) > 0:
                await asyncio.sleep(rest)

    async def _round(self) -> bool:
        """Copy what is new, read every stream once, apply; True when anything was found."""
        assert self._endpoints is not None
        primary, fallback = self._endpoints
        if time.monotonic() >= self._next_discover:
            self._next_discover = time.monotonic() + DISCOVER_INTERVAL
            await self._discover()
        if self._to_copy:
            await self._initial_copy(primary, fallback)
        busy = False
        heartbeat = self._collections[HEARTBEAT]
        # The heartbeat's stream first: see below for when a heartbeat reaches the fallback.
        order = [heartbeat, *(c for c in self._collections.values() if c is not heartbeat)]
        changed: dict[str, tuple[_Collection, dict[Any, Any], Any]] = {}
        dropped: list[_Collection] = []
        drained_now: list[_Collection] = []  # read to their end in this round: drained once applied
        self._rounds += 1
        now = time.monotonic()
        for coll in order:
            if coll.compare:
                if now >= coll.next_compare:
                    coll.next_compare = now + self.compare_interval
                    await self._compare(primary, fallback, coll.name)
                continue
            if coll.stream is None:
                if not await self._open(primary, coll):
                    dropped.append(coll)
                    continue
                if coll.compare:
                    continue
            if coll is heartbeat and self._beats <= self._beat_seen:
                continue  # none of our heartbeats on its way: its getMore can wait for one
            ids: dict[Any, Any] = {}  # _key(id) -> id, in order of first change
            read = 0
            ended = False
            while read < EVENTS_PER_ROUND and not ended:
                events, drained = await coll.stream.read(POLL_AWAIT_MS)
                read += len(events)
                self.events += len(events)
                for event in events:
                    if event.get("operationType") in _ENDS_STREAM:  # dropped (the heartbeat's too)
                        dropped.append(coll)
                        ended = True
                        break
                    if coll is heartbeat:
                        number = _beat_number(event, self.heartbeat_id)
                        if number is not None:
                            self._held_beats.append((self._rounds, number))
                            self._beat_seen = max(self._beat_seen, number)
                        continue
                    doc_id = _event_id(event)
                    if doc_id is not _NO_ID:
                        ids[_key(doc_id)] = doc_id
                if drained:
                    drained_now.append(coll)  # every event written before that getMore is read
                    break
                if not coll.stream.open_cursor:
                    break
            token = coll.stream.token
            if not ended and not coll.stream.open_cursor:
                # The server closed the cursor without saying why: reopened from its token next round.
                self._detach([coll])
                if coll in drained_now:
                    drained_now.remove(coll)
            if read or token != coll.token:  # a quiet stream's position advances too
                changed[coll.name] = (coll, ids, token)
        for name, (coll, ids, token) in changed.items():
            chunk = list(ids.values())
            for start in range(0, len(chunk), self.batch):
                await self._apply(primary, fallback, name, chunk[start : start + self.batch])
                busy = True
            if coll not in dropped:
                coll.token = token
                every = TOKEN_SAVE_INTERVAL if ids or coll is heartbeat else QUIET_TOKEN_SAVE_INTERVAL
                if time.monotonic() - coll.saved_at >= every:
                    await self._save_token(fallback, name, token)
                    coll.saved_at = time.monotonic()
        for coll in drained_now:
            coll.drained = self._rounds  # its events are on the fallback now
        for coll in dropped:
            await self._forget(fallback, coll)
        ready, held = _releasable(self._held_beats, self._collections.values(), heartbeat)
        if ready is not None:
            self._check()
            await self._db(fallback)[HEARTBEAT].update_one(
                {"_id": self.heartbeat_id}, {"$max": {"n": ready}}, upsert=True
            )
        self._held_beats = held  # once written: a beat ready now stays held if that write failed
        return busy

    async def _open(self, primary: Endpoint, coll: _Collection) -> bool:
        """Open *coll*'s stream (or mark it compared); False when the primary no longer has it."""
        if coll.name != HEARTBEAT and coll.name not in await self._db(primary).list_collection_names():
            return False  # opening a stream would create it again on some servers (see the module docstring)
        try:
            stream = await self._new_stream(primary, coll.name)
            try:
                await stream.open(coll.token)
            except OperationFailure as exc:
                if coll.token is None or not (_history_lost(exc) or coll.name == HEARTBEAT):
                    raise
                coll.token = None
                if coll.name != HEARTBEAT:  # heartbeats need no copy: the next ones measure the lag
                    # The token is older than the primary's change history: a new stream from now,
                    # and a comparison after it (the next round's copy), as for a new collection.
                    logger.warning(
                        "mongodb: the change history of %s no longer reaches its stored token: comparing it", coll.name
                    )
                    coll.copied = False
                    self._to_copy = True
                await stream.open(None)
        except (OperationFailure, ConfigurationError) as exc:  # no change streams (or no sessions) there
            why = exc.code if isinstance(exc, OperationFailure) else type(exc).__name__
            logger.info("mongodb: %s cannot be watched (%s): compared every %ss", coll.name, why, self.compare_interval)
            coll.compare = True
            coll.next_compare = 0.0
            return True
        coll.stream = stream
        if coll.token is None:
            coll.token = stream.token
        return True

    async def _new_stream(self, primary: Endpoint, name: str) -> _Stream | _DriverStream:
        """A :class:`_Stream`, or PyMongo's own where a cursor lives on one of several routers."""
        client = self._client(primary)
        if client.topology_description.topology_type in _ROUTED_TOPOLOGIES:
            return _DriverStream(self._db(primary)[name], EVENTS_PER_READ)
        return _Stream(self._db(primary), name, await self._session(primary), EVENTS_PER_READ)

    async def _initial_copy(self, primary: Endpoint, fallback: Endpoint) -> None:
        todo = [c for c in self._collections.values() if not c.copied]  # never the heartbeats (see _discover)
        self._copy_done = 0
        total = 0
        for coll in todo:
            with contextlib.suppress(PyMongoError):
                total += await self._db(primary)[coll.name].estimated_document_count()
        self._copy_total = total
        started = time.monotonic()
        for coll in todo:
            if coll.stream is None and not coll.compare and not await self._open(primary, coll):
                await self._forget(fallback, coll)  # dropped since it was discovered
                continue
            # The stream is opened first: changes made during the copy are streamed after it.
            await self._compare(primary, fallback, coll.name, counting=True)
            coll.copied = True
            if coll.token is not None:
                await self._save_token(fallback, coll.name, coll.token)
        logger.info(
            "mongodb: %s into %s done: %d collections (%s), %d documents in %.1fs",
            "initial copy" if self._copying else "copy of new collections", fallback.name, len(todo),
            ", ".join(c.name for c in todo), self._copy_done, time.monotonic() - started,
        )  # fmt: skip
        self._copying = self._to_copy = False

    # --- copies -----------------------------------------------------------------------------

    def _check(self) -> None:
        if not (self._active and self.on_primary()):
            raise _Stopped

    async def _journaled(self, fallback: Endpoint, name: str, ids: list[Any]) -> set[Any]:
        """Of *ids*, those with an intent in the fallback's journal (they belong to reconcile)."""
        assert self._endpoints is not None
        databases = {None, fallback.option("database") or DEFAULT_DATABASE, self._endpoints[0].option("database")}
        keys = {journal_key(db, name, i): i for i in ids for db in databases}
        found = self._db(fallback)[JOURNAL].find({"_id": {"$in": list(keys)}}, {"_id": 1}, batch_size=len(keys))
        return {_key(keys[d["_id"]]) async for d in found}

    async def _write(self, fallback: Endpoint, name: str, writes: list[Any], ids: list[Any]) -> None:
        if not writes:
            return
        journaled = await self._journaled(fallback, name, ids)
        if journaled:
            self.skipped_journaled += len(journaled)
            writes = [w for w in writes if _key(_write_id(w)) not in journaled]
        self._check()
        if writes:
            await self._db(fallback)[name].bulk_write(writes, ordered=False)

    async def _apply(self, primary: Endpoint, fallback: Endpoint, name: str, ids: list[Any]) -> None:
        """Write the current state of *ids* (read on the primary now) into the fallback."""
        found = self._db(primary)[name].find({"_id": {"$in": ids}}, batch_size=len(ids))  # one round trip
        current = {_key(d["_id"]): d async for d in found}
        writes: list[Any] = [
            ReplaceOne({"_id": i}, current[_key(i)], upsert=True) if _key(i) in current else DeleteOne({"_id": i})
            for i in ids
        ]
        await self._write(fallback, name, writes, ids)
        self.applied_documents += len(writes)

    async def _compare(self, primary: Endpoint, fallback: Endpoint, name: str, *, counting: bool = False) -> None:
        """Make the fallback's *name* equal to the primary's, one cursor batch at a time.

        Plain cursors, no ``_id`` paging: some MongoDB-wire servers sort ``_id`` in an
        order of their own (nx-27017 sorts integers as text).
        """
        source, target = self._db(primary)[name], self._db(fallback)[name]
        async for docs in _chunks(source.find({}, batch_size=self.batch), self.batch):
            ids = [d["_id"] for d in docs]
            ours = {_key(d["_id"]): d async for d in target.find({"_id": {"$in": ids}})}
            writes = [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs if ours.get(_key(d["_id"])) != d]
            await self._write(fallback, name, writes, [_write_id(w) for w in writes])
            self.compared_copies += len(writes)
            if counting:
                self._copy_done += len(docs)
                if self._copy_total is not None and self._copy_done > self._copy_total:
                    self._copy_total = self._copy_done
        # Documents only the fallback has: deleted on the primary.
        async for found in _chunks(target.find({}, {"_id": 1}, batch_size=self.batch), self.batch):
            ids = [d["_id"] for d in found]
            theirs = {_key(d["_id"]) async for d in source.find({"_id": {"$in": ids}}, {"_id": 1})}
            gone = [i for i in ids if _key(i) not in theirs]
            await self._write(fallback, name, [DeleteOne({"_id": i}) for i in gone], gone)

    async def _save_token(self, fallback: Endpoint, name: str, token: Any) -> None:
        self._check()
        await self._db(fallback)[TOKENS].update_one(
            {"_id": name}, {"$set": {"token": token, "saved_at": time.time()}}, upsert=True
        )


_ROUTED_TOPOLOGIES = frozenset({TOPOLOGY_TYPE.Sharded, TOPOLOGY_TYPE.LoadBalanced})
"""Where a cursor lives on one of several routers: :class:`_DriverStream` there."""
_RAW: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)
"""Replies read undecoded first, for their size (see :meth:`_Stream.read`)."""
_NO_ID = object()
_ENDS_STREAM = frozenset({"drop", "dropDatabase", "rename", "invalidate"})


async def _close(streams: list[Any]) -> None:
    """Close *streams* together, for at most :data:`CLOSE_TIMEOUT` seconds (a dead primary does not answer)."""
    if streams:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.gather(*(stream.close() for stream in streams))


async def _chunks(cursor: Any, size: int) -> Any:
    chunk: list[Any] = []
    async for doc in cursor:
        chunk.append(doc)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _event_id(event: dict[str, Any]) -> Any:
    """The changed document's ``_id`` (from ``fullDocument`` first: see the module docstring).

    Except an ``ObjectId`` in ``documentKey``: nx-27017 sends that one right there but wraps it in
    ``fullDocument`` (``{"__neosqlite_objectid__": True, "id": "..."}``, a dict: unhashable, and it
    stopped the loop at the first insert of a document with a generated ``_id``).
    """
    key = event.get("documentKey")
    if isinstance(key, dict) and isinstance(key.get("_id"), ObjectId):
        return key["_id"]
    full = event.get("fullDocument")
    if isinstance(full, dict) and "_id" in full:
        return full["_id"]
    if isinstance(key, dict) and "_id" in key:
        return key["_id"]
    return _NO_ID


def _releasable(
    held: list[tuple[int, int]], collections: Any, heartbeat: _Collection
) -> tuple[int | None, list[tuple[int, int]]]:
    """Of the *held* heartbeats (round read in, number), the newest that may be written on the
    fallback now, and those still held.

    A heartbeat read in round r may go once every streamed data collection was read to its end, and
    what it read applied, in round r or later (the heartbeat's stream is polled first in a round):
    every change made before the heartbeat is on the fallback then. A collection whose stream is
    closed (an error, not opened yet) has ``drained == -1``, and one still waiting for its copy (new,
    or its change history lost) counts as never drained: either holds them all.
    The number is the one the event carried, never a newer one read from the primary.
    """
    floor = min(
        (c.drained if c.copied else -1 for c in collections if c is not heartbeat and not c.compare), default=None
    )
    if floor is None:  # nothing streamed but the heartbeat
        return (max(n for _, n in held) if held else None), []
    ready = [number for read, number in held if read <= floor]
    return (max(ready) if ready else None), [(read, number) for read, number in held if read > floor]


def _beat_number(event: dict[str, Any], heartbeat_id: str) -> int | None:
    """This process's heartbeat number carried by *event* (its own image, never a lookup)."""
    full = event.get("fullDocument")
    if isinstance(full, dict) and full.get("_id") == heartbeat_id and "n" in full:
        return int(full["n"])
    key = event.get("documentKey") or {}
    fields = (event.get("updateDescription") or {}).get("updatedFields") or {}
    if key.get("_id") == heartbeat_id and "n" in fields:
        return int(fields["n"])
    return None


def _key(doc_id: Any) -> Any:
    """*doc_id* as a dict key: itself when hashable, else its BSON (an ``_id`` may be a document or an array)."""
    try:
        hash(doc_id)
    except TypeError:
        return ("bson", bson.encode({"_id": doc_id}))
    return doc_id


def _write_id(write: Any) -> Any:
    return write._filter["_id"]


def _history_lost(exc: OperationFailure) -> bool:
    # ChangeStreamHistoryLost (286), or the older "resume token not found" (280).
    return exc.code in (280, 286)
