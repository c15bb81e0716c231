"""MongoDB warm sync on real MongoDB-wire servers (nx-27017): the fallback follows the primary.

Every check reads the servers with the raw driver; the status document is what is being
tested, never the way to verify it.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from failover import Databases, SwitchState
from failover.core.events import Event
from failover.local import LocalServer
from failover.stores.mongodb.capture import JOURNAL

from ..helpers import wait_for
from .continuity import AckedWriter, Continuity, Unacknowledged, missing

pytestmark = pytest.mark.integration

STORE = Continuity("mongodb", failback_timeout=40)
state, warm, streaming, outage, failback = STORE.state, STORE.warm, STORE.streaming, STORE.outage, STORE.failback
start = STORE.start


@pytest.fixture
async def raw() -> AsyncIterator[Any]:
    """``raw(server)``: the ``app`` database through a plain PyMongo client on one server."""
    clients: list[AsyncMongoClient[Any]] = []

    def make(server: LocalServer) -> Any:
        client: AsyncMongoClient[Any] = AsyncMongoClient(server.url, directConnection=True, serverSelectionTimeoutMS=3000)
        clients.append(client)
        return client["app"]

    yield make
    for client in clients:
        await client.close()


class Writer(AckedWriter[int]):
    """Inserts, updates and deletes of ``items`` documents through failover."""

    pause = 0.01  # nx-27017 is a Python server: a faster writer starves the sync on a loaded machine

    def __init__(self, dbs: Databases) -> None:
        super().__init__()
        self.dbs = dbs

    async def step(self, i: int) -> tuple[int, str | None]:
        items = self.dbs.mongodb.database["items"]
        live = self.live()
        if i % 4 == 3 and live:
            self.pending = key = live[(i * 7919) % len(live)]
            if (await items.update_one({"_id": key}, {"$set": {"note": f"u{i}"}})).matched_count == 0:
                # Not on the fallback (inserted on the primary within the failover's RPO):
                # the update changed nothing, and the application was told so.
                raise Unacknowledged
            return key, f"u{i}"
        if i % 10 == 9 and live:
            self.pending = key = live[(i * 104729) % len(live)]
            if (await items.delete_one({"_id": key})).deleted_count == 0:
                raise Unacknowledged
            return key, None
        self.pending = i
        await items.insert_one({"_id": i, "note": f"i{i}"})
        return i, f"i{i}"


async def seeded_items(dbs: Databases, f: Any) -> Any:
    """``items`` through failover, with a seed document copied to the fallback: its stream is open."""
    items = dbs.mongodb.database["items"]
    await items.insert_one({"_id": 0, "note": "seed"})
    await streaming(dbs)
    deadline = time.monotonic() + 10
    while await f["items"].find_one({"_id": 0}) is None:
        assert time.monotonic() < deadline, warm(dbs)
        await asyncio.sleep(0.05)
    return items


async def same_items(p: Any, f: Any, count: int, dbs: Databases) -> None:
    """Wait (≤ 10 s) until the fallback's ``items`` are the primary's *count* documents, types and all."""
    deadline = time.monotonic() + 10
    while True:
        ours = sorted([repr(d) async for d in f["items"].find({})])
        theirs = sorted([repr(d) async for d in p["items"].find({})])
        if ours == theirs and len(theirs) == count:
            return
        assert time.monotonic() < deadline, (warm(dbs), ours, theirs)
        await asyncio.sleep(0.05)


async def notes(collection: Any) -> dict[int, str]:
    return {d["_id"]: d.get("note") async for d in collection.find({})}


async def test_a_write_on_the_primary_is_on_the_fallback_when_the_primary_dies_within_the_reported_lag(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any
) -> None:
    primary, fallback = mongo_pair
    dbs = await start(primary, fallback)
    events: list[Event] = []
    dbs.events.subscribe(events.append)
    try:
        await streaming(dbs)
        writer = Writer(dbs).start()
        await asyncio.sleep(1.5)
        await writer.acknowledged(200)
        lag_before = warm(dbs)["lag_s"]
        assert lag_before is not None and lag_before < 1.0, warm(dbs)
        assert "items" in warm(dbs)["streamed_collections"], warm(dbs)
        # Synced documents are not journaled as writes made on the fallback.
        assert await raw(fallback)[JOURNAL].count_documents({}) == 0
        killed, status, rpo = await STORE.outage_under(dbs, primary, writer, events)
        await wait_for(lambda: warm(dbs)["state"] == "off", 5, "warm sync stopped")
        horizon = killed - rpo - status["heartbeat_interval_s"] - 0.05
        expected = writer.expected_before(horizon)
        assert len(expected) > 50, "the writer made too few writes before the kill"
        served = {d["_id"]: d.get("note") async for d in dbs.mongodb.database["items"].find({})}
        assert missing(expected, served) == []
        print(f"lag before {lag_before}s, rpo {rpo}s; {len(expected)} documents checked")
    finally:
        await dbs.close()


async def test_initial_copy_of_a_non_empty_primary_reports_progress_while_the_application_works(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    primary, fallback = mongo_pair
    p, f = raw(primary), raw(fallback)
    for start_at in range(0, 20_000, 2000):
        await p["items"].insert_many([{"_id": i, "note": f"row {i}", "n": i} for i in range(start_at, start_at + 2000)])
    await p["other"].insert_many([{"_id": f"k{i}", "v": i} for i in range(500)])
    # The fallback holds an old version of some documents and one the primary no longer has.
    await f["items"].insert_many([{"_id": i, "note": "stale"} for i in range(50)])
    await f["items"].insert_one({"_id": -1, "note": "deleted on the primary long ago"})
    caplog.set_level("INFO", logger="failover")
    dbs = await start(primary, fallback)
    try:
        seen, writes = await STORE.copy_while_writing(
            dbs, lambda i: dbs.mongodb.database["other"].insert_one({"_id": f"app{i}", "v": i}), 100
        )
        assert seen, "no copy progress was ever reported"
        last = seen[-1]
        assert last["rows_total"] and last["rows_total"] >= 20_000, last
        assert 0 < last["rows_done"] <= last["rows_total"], last
        assert writes > 0
        assert any("initial copy into" in r.getMessage() for r in caplog.records)
        await wait_for(lambda: (warm(dbs)["lag_s"] or 9) < 1, 10, "caught up")
        for name in ("items", "other"):
            theirs = [d async for d in p[name].find({}).sort("_id", 1)]
            deadline = time.monotonic() + 10
            while [d async for d in f[name].find({}).sort("_id", 1)] != theirs:
                ours = {d["_id"]: d async for d in f[name].find({})}
                mine = {d["_id"]: d for d in theirs}
                diff = [(k, mine.get(k), ours.get(k)) for k in mine.keys() | ours.keys() if mine.get(k) != ours.get(k)]
                assert time.monotonic() < deadline, f"{name} differs on the fallback: {len(diff)} documents, {diff[:5]}"
                await asyncio.sleep(0.1)
        assert await f[JOURNAL].count_documents({}) == 0, "copied documents were journaled as fallback writes"
    finally:
        await dbs.close()


async def test_outage_reconcile_failback_and_a_second_outage_keep_every_acknowledged_write(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any
) -> None:
    primary, fallback = mongo_pair
    await raw(primary)["items"].insert_many([{"_id": -i, "note": f"seed {i}"} for i in range(1, 1001)])
    dbs = await start(primary, fallback)
    f = raw(fallback)
    try:
        await streaming(dbs)
        writer = Writer(dbs).start()
        await asyncio.sleep(1.0)

        await outage(dbs, primary)
        await wait_for(lambda: warm(dbs)["state"] == "off", 5, "warm sync stopped")
        await asyncio.sleep(1.0)
        assert await f[JOURNAL].count_documents({}) > 0, "no write landed on the fallback during the outage"

        await failback(dbs, primary)
        await wait_for(lambda: warm(dbs)["state"] == "streaming" and (warm(dbs)["lag_s"] or 9) < 1, 15, "caught up")
        assert warm(dbs)["copy"] is None, "failback started a new initial copy"

        lag = warm(dbs)["lag_s"]
        killed = await outage(dbs, primary)
        rpo = warm(dbs)["rpo_at_last_failover_s"]
        assert rpo is not None and rpo < 1.0, warm(dbs)
        horizon = killed - max(rpo, lag) - warm(dbs)["heartbeat_interval_s"] - 0.05
        async with writer.lock:  # no write in flight whose record is not written yet
            expected = writer.expected_before(horizon)
            served = await notes(f["items"])
        assert missing(expected, served) == [], "the fallback lacks writes made before the second outage"
        await asyncio.sleep(0.8)
        await failback(dbs, primary)
        await writer.stop()
        assert not writer.errors, writer.errors[:3]

        p = raw(primary)
        everything = writer.expected_before(time.monotonic() + 1)
        assert missing(everything, await notes(p["items"])) == []
        await wait_for(lambda: (warm(dbs)["lag_s"] or 9) < 1, 15, "caught up after the second failback")
        deadline = time.monotonic() + 10
        while await notes(f["items"]) != await notes(p["items"]):
            assert time.monotonic() < deadline, "fallback not equal to the primary"
            await asyncio.sleep(0.1)
    finally:
        await dbs.close()


async def test_warm_off_leaves_the_fallback_cold(mongo_pair: tuple[LocalServer, LocalServer], raw: Any) -> None:
    primary, fallback = mongo_pair
    dbs = await start(primary, fallback, FAILOVER_WARM="off")
    try:
        await dbs.mongodb.database["items"].insert_one({"_id": 1, "note": "primary only"})
        await asyncio.sleep(1.0)
        assert warm(dbs) == {"enabled": False, "state": "off", "lag_s": None}
        assert await raw(fallback)["items"].count_documents({}) == 0
        assert "failover_warm" not in await raw(fallback).list_collection_names()
    finally:
        await dbs.close()


async def test_without_change_streams_the_collections_are_compared(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A primary that refuses change streams (a standalone mongod: code 40573): periodic comparison."""
    from pymongo.asynchronous.database import AsyncDatabase
    from pymongo.errors import OperationFailure

    command = AsyncDatabase.command

    async def no_change_streams(self: Any, spec: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(spec, dict) and any("$changeStream" in stage for stage in spec.get("pipeline", ())):
            raise OperationFailure("The $changeStream stage is only supported on replica sets", code=40573)
        return await command(self, spec, *args, **kwargs)

    monkeypatch.setattr(AsyncDatabase, "command", no_change_streams)
    primary, fallback = mongo_pair
    p, f = raw(primary), raw(fallback)
    await p["items"].insert_many([{"_id": i, "note": f"before {i}"} for i in range(100)])
    dbs = await start(primary, fallback)
    sync = dbs.store("mongodb").warm.sync  # type: ignore[union-attr]
    sync.compare_interval = 0.3  # the default compares every 10 s
    try:
        await streaming(dbs)
        assert "items" in warm(dbs)["compared_collections"], warm(dbs)
        assert warm(dbs)["mechanism"] == "change streams + periodic comparison"
        await dbs.mongodb.database["items"].update_one({"_id": 5}, {"$set": {"note": "changed"}})
        await dbs.mongodb.database["items"].delete_one({"_id": 6})
        await p["items"].insert_one({"_id": 1000, "note": "another client"})
        deadline = time.monotonic() + 10
        while await notes(f["items"]) != await notes(p["items"]):
            assert time.monotonic() < deadline, "the comparison did not bring the fallback up to date"
            await asyncio.sleep(0.05)
        await wait_for(lambda: warm(dbs)["lag_s"] is not None and warm(dbs)["lag_s"] < 2, 10, "lag measured")
        assert await f[JOURNAL].count_documents({}) == 0
    finally:
        await dbs.close()


async def test_a_collection_dropped_on_the_primary_stays_dropped(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any
) -> None:
    """nx-27017's watch() creates the collection it watches: the sync must not bring a drop back."""
    from failover.stores.mongodb.warm import TOKENS, _Collection

    primary, fallback = mongo_pair
    p, f = raw(primary), raw(fallback)
    dbs = await start(primary, fallback)
    sync = dbs.store("mongodb").warm.sync  # type: ignore[union-attr]
    try:
        await streaming(dbs)
        await dbs.mongodb.database["temp"].insert_many([{"_id": i} for i in range(20)])
        deadline = time.monotonic() + 10
        while await f["temp"].count_documents({}) != 20 or "temp" not in warm(dbs)["streamed_collections"]:
            assert time.monotonic() < deadline, warm(dbs)
            await asyncio.sleep(0.05)
        while await f[TOKENS].count_documents({"_id": "temp"}) != 1:  # stored after its first applied round
            assert time.monotonic() < deadline, warm(dbs)
            await asyncio.sleep(0.05)
        await dbs.mongodb.database["temp"].drop()
        # Discovery (every second) forgets it: its stream and its stored token go.
        await wait_for(lambda: "temp" not in warm(dbs)["streamed_collections"], 5, "dropped collection forgotten")
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            assert "temp" not in await p.list_collection_names(), "the warm sync brought a dropped collection back"
            await asyncio.sleep(0.1)
        assert await f[TOKENS].count_documents({"_id": "temp"}) == 0
        # A stream (re)opened after the drop, before discovery saw it: refused, nothing created.
        assert await sync._open(sync._endpoints[0], _Collection("temp")) is False
        assert "temp" not in await p.list_collection_names()
        # The fallback keeps what it had (DDL is not synced); a new "temp" on the primary is copied again.
        await dbs.mongodb.database["temp"].insert_one({"_id": "new"})
        await wait_for(lambda: "temp" in warm(dbs)["streamed_collections"], 5, "recreated collection synced")
        deadline = time.monotonic() + 10
        while await f["temp"].count_documents({"_id": "new"}) != 1:
            assert time.monotonic() < deadline, warm(dbs)
            await asyncio.sleep(0.05)
    finally:
        await dbs.close()


async def test_generated_ids_are_synced(mongo_pair: tuple[LocalServer, LocalServer], raw: Any) -> None:
    """An ObjectId made by the driver (nx-27017 wraps it in ``fullDocument`` as a document, which
    is unhashable) once stopped the sync's loop for good at the first such insert."""
    primary, fallback = mongo_pair
    p, f = raw(primary), raw(fallback)
    dbs = await start(primary, fallback)
    try:
        items = await seeded_items(dbs, f)
        generated = (await items.insert_one({"note": "generated id"})).inserted_id
        await items.update_one({"_id": generated}, {"$set": {"note": "generated id, updated"}})
        await items.insert_one({"_id": 1, "note": "after it"})

        await same_items(p, f, 3, dbs)
        assert (await f["items"].find_one({"_id": generated}))["note"] == "generated id, updated"
        assert warm(dbs)["apply_errors"] == 0, warm(dbs)
        assert warm(dbs)["state"] == "streaming", warm(dbs)
    finally:
        await dbs.close()


async def test_dates_binary_and_object_ids_keep_their_types_on_the_fallback(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any
) -> None:
    """Copies are the documents as read on the primary, never an event's image (nx-27017 sends
    dates, ObjectIds and bytes in its storage form there)."""
    from bson import Binary, ObjectId

    primary, fallback = mongo_pair
    p, f = raw(primary), raw(fallback)
    dbs = await start(primary, fallback)
    try:
        items = await seeded_items(dbs, f)
        at = datetime.datetime(2026, 11, 29, 12, 0, 0, 123000)
        await items.insert_many(
            [
                {"_id": 1, "at": at, "ref": ObjectId(), "blob": Binary(b"\x00\x01"), "nested": [{"at": at}]},
                {"_id": 2, "note": "plain"},
            ]
        )
        await items.update_one({"_id": 2}, {"$set": {"note": "plain, updated", "at": at}})
        await items.replace_one({"_id": 0}, {"_id": 0, "note": "replaced"})

        await same_items(p, f, 3, dbs)
        copied = await f["items"].find_one({"_id": 1})
        assert copied["at"] == at and isinstance(copied["ref"], ObjectId) and copied["blob"] == b"\x00\x01"
        assert warm(dbs)["apply_errors"] == 0, warm(dbs)
    finally:
        await dbs.close()


async def test_under_writers_that_never_pause_the_stream_is_read_a_batch_at_a_time(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyMongo's change stream asks for the next batch as soon as one is used up: under a steady
    writer that was a ``getMore`` per write or two on the primary, and a stream never seen read
    to its end, so heartbeats stayed held and the lag grew to seconds. One ``getMore`` per round
    now, and heartbeats reach the fallback while the writers go on."""
    from pymongo.asynchronous.database import AsyncDatabase

    command = AsyncDatabase.command
    get_mores = 0

    async def counting(self: Any, spec: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal get_mores
        if isinstance(spec, dict) and "getMore" in spec and spec.get("collection") == "items":
            get_mores += 1
        return await command(self, spec, *args, **kwargs)

    monkeypatch.setattr(AsyncDatabase, "command", counting)
    primary, fallback = mongo_pair
    p, f = raw(primary), raw(fallback)
    dbs = await start(primary, fallback)
    sync = dbs.store("mongodb").warm.sync  # type: ignore[union-attr]
    items = dbs.mongodb.database["items"]
    written = 0
    stop = asyncio.Event()

    async def writer(first: int) -> None:
        nonlocal written
        i = first
        while not stop.is_set():
            await items.insert_one({"_id": i, "note": f"n{i}"})
            written += 1
            i += 4

    async def beat_on_fallback() -> int:
        doc = await f["failover_warm_heartbeat"].find_one({"_id": sync.heartbeat_id})
        return 0 if doc is None else int(doc["n"])

    try:
        await items.insert_one({"_id": -1, "note": "seed"})
        await streaming(dbs)
        await wait_for(lambda: "items" in warm(dbs)["streamed_collections"], 10, "items streamed")
        get_mores = 0
        writers = [asyncio.create_task(writer(k)) for k in range(4)]
        try:
            first_beat = await beat_on_fallback()
            deadline = time.monotonic() + 30
            while await beat_on_fallback() < first_beat + 3 or written < 1000:
                assert time.monotonic() < deadline, (written, get_mores, warm(dbs))
                assert not any(w.done() for w in writers), [w.exception() for w in writers if w.done()]
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.gather(*writers)
        # Heartbeats were applied while every writer kept writing; far fewer getMores than writes.
        assert get_mores * 5 < written, (get_mores, written)
        deadline = time.monotonic() + 20
        while await notes(f["items"]) != await notes(p["items"]):
            assert time.monotonic() < deadline, warm(dbs)
            await asyncio.sleep(0.1)
        assert warm(dbs)["apply_errors"] == 0, warm(dbs)
        print(f"{written} writes, {get_mores} getMores on items")
    finally:
        await dbs.close()


async def test_where_cursors_live_on_routers_the_drivers_own_stream_is_used(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sharded cluster's mongos or a load balancer: getMore must reach the router that has the
    cursor, which PyMongo's watch() does and raw commands cannot. Taken here for any topology."""
    from pymongo.topology_description import TOPOLOGY_TYPE

    from failover.stores.mongodb import warm as warm_module

    monkeypatch.setattr(warm_module, "_ROUTED_TOPOLOGIES", frozenset(TOPOLOGY_TYPE._asdict().values()))
    primary, fallback = mongo_pair
    p, f = raw(primary), raw(fallback)
    dbs = await start(primary, fallback)
    sync = dbs.store("mongodb").warm.sync  # type: ignore[union-attr]
    try:
        items = await seeded_items(dbs, f)
        streams = [c.stream for c in sync._collections.values() if c.stream is not None]
        assert streams and all(isinstance(stream, warm_module._DriverStream) for stream in streams), streams
        await items.insert_many([{"_id": i, "note": f"n{i}"} for i in range(1, 50)])
        await items.update_one({"_id": 3}, {"$set": {"note": "updated"}})
        await items.delete_one({"_id": 4})
        await same_items(p, f, 49, dbs)
        await wait_for(lambda: warm(dbs)["lag_s"] is not None, 10, "heartbeats through the driver's stream")
        assert warm(dbs)["apply_errors"] == 0, warm(dbs)
    finally:
        await dbs.close()


class OffsetWriter(Writer):
    """A :class:`Writer` on keys of its own (another application process's)."""

    def __init__(self, dbs: Databases, offset: int) -> None:
        super().__init__(dbs)
        self.offset = offset

    async def step(self, i: int) -> tuple[int, str | None]:
        return await super().step(i + self.offset)


async def test_two_processes_syncing_one_pair_each_report_an_rpo_that_holds_for_every_write(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any
) -> None:
    """Each application process runs its own sync of the same pair (and its own heartbeat): the
    RPO each reports at a kill must hold for the writes of both — no process may write a version
    older than what another's heartbeat already vouched for."""
    primary, fallback = mongo_pair
    first = await start(primary, fallback)
    second = await start(primary, fallback)
    try:
        await streaming(first)
        await streaming(second)
        writers = [OffsetWriter(first, 0).start(), OffsetWriter(second, 1_000_000).start()]
        for writer in writers:
            await writer.acknowledged(200)
        await asyncio.sleep(1.0)
        killed = await STORE.outage(first, primary)
        await wait_for(lambda: state(second) is SwitchState.ON_FALLBACK, 10, "the second process fails over")
        for writer in writers:
            await writer.stop()
        served = {d["_id"]: d.get("note") async for d in raw(fallback)["items"].find({})}
        for dbs in (first, second):
            status = warm(dbs)
            rpo = status["rpo_at_last_failover_s"]
            assert rpo is not None and rpo < 1.0, status
            horizon = killed - rpo - status["heartbeat_interval_s"] - 0.05
            expected = {k: v for writer in writers for k, v in writer.expected_before(horizon).items()}
            assert len(expected) > 50, "too few writes before the kill"
            assert missing(expected, served) == [], status
    finally:
        await first.close()
        await second.close()


async def test_a_round_stopped_between_reading_and_applying_reads_those_changes_again(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round that read a batch and could not write it (the store left its primary for a moment:
    the write's check stops it) must not go on from where the server cursor stands: those changes
    are read again from the applied position, or they never reach the fallback."""
    from failover.stores.mongodb import warm as warm_module

    primary, fallback = mongo_pair
    p, f = raw(primary), raw(fallback)
    dbs = await start(primary, fallback)
    try:
        items = await seeded_items(dbs, f)
        write = warm_module.MongoWarmSync._write
        stopped = 0

        async def stop_once(self: Any, fallback: Any, name: str, writes: list[Any], ids: list[Any]) -> None:
            nonlocal stopped
            if name == "items" and not stopped:
                stopped += 1
                raise warm_module._Stopped
            await write(self, fallback, name, writes, ids)

        monkeypatch.setattr(warm_module.MongoWarmSync, "_write", stop_once)
        await items.insert_many([{"_id": i, "note": f"n{i}"} for i in range(1, 50)])
        await same_items(p, f, 50, dbs)
        assert stopped == 1
    finally:
        await dbs.close()
