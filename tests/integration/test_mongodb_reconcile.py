"""MongoDB reconcile on real MongoDB-wire servers (nx-27017, standalone like the usual fallback).

The primary is SIGKILLed, writes are made through every write method of the
routed collection while traffic is on the fallback, the primary is restarted,
and after the store is back ``ON_PRIMARY`` every acknowledged write is read
back from the primary with a plain PyMongo client.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any

import pytest
from bson import Binary, encode
from pymongo import AsyncMongoClient, DeleteMany, DeleteOne, InsertOne, ReplaceOne, ReturnDocument, UpdateMany, UpdateOne

from failover import Databases
from failover.core.endpoint import Role
from failover.core.events import SwitchState
from failover.local import LocalServer
from failover.stores.mongodb.capture import CONFLICTS, JOURNAL, LOCKS, journal_key
from tests.helpers import Traffic, fast_settings, wait_for

pytestmark = pytest.mark.integration

FAILBACK = 20.0  # seconds allowed from the primary's restart to ON_PRIMARY
ROOT = Path(__file__).resolve().parents[2]


async def _start(primary: LocalServer, fallback: LocalServer, **extra: Any) -> Databases:
    values: dict[str, Any] = {"MONGODB_ATLAS_URL": primary.url, "MONGODB_URL": fallback.url, **extra}
    dbs = Databases(fast_settings(**values))
    await dbs.start()
    return dbs


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


def _state(dbs: Databases) -> SwitchState:
    return dbs.store("mongodb").state


async def _outage(dbs: Databases, primary: LocalServer) -> None:
    primary.kill()
    await dbs.mongodb.database["probe"].find_one({})  # a read notices the dead primary at once
    await wait_for(lambda: _state(dbs) is SwitchState.ON_FALLBACK, 5, "failover to the fallback")


async def _failback(dbs: Databases, primary: LocalServer) -> None:
    primary.start()
    await wait_for(lambda: _state(dbs) is SwitchState.ON_PRIMARY, FAILBACK, "failback through RECONCILING")


async def _all(collection: Any) -> dict[Any, dict[str, Any]]:
    return {d["_id"]: d for d in await collection.find({}).to_list(None)}


async def test_every_write_method_during_an_outage_reaches_the_primary(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any
) -> None:
    primary, fallback = mongo_pair
    seed = [{"_id": f"s{i}", "n": i, "g": i % 3, "tag": "seed"} for i in range(12)]
    await raw(primary)["docs"].insert_many(seed)
    await raw(fallback)["docs"].insert_many(seed)  # the fallback holds the primary's version at failover
    dbs = await _start(primary, fallback)
    try:
        docs = dbs.mongodb.database["docs"]
        await _outage(dbs, primary)
        await docs.insert_one({"_id": "one", "v": 1})
        auto = {"v": "auto-id"}
        await docs.insert_one(auto)
        await docs.insert_many([{"_id": f"m{i}", "v": i} for i in range(3)])
        await docs.update_one({"_id": "s0"}, {"$set": {"v": "by-id"}})
        await docs.update_one({"n": 1}, {"$set": {"v": "by-field"}})
        upserted = await docs.update_one({"k": "up1"}, {"$set": {"v": "upserted"}}, upsert=True)
        await docs.update_one({"_id": "up2"}, {"$set": {"v": "upserted-by-id"}}, upsert=True)
        many = await docs.update_many({"g": 2}, {"$inc": {"n": 100}})
        await docs.replace_one({"n": 3}, {"n": 3, "replaced": True})
        replaced_up = await docs.replace_one({"k": "rep"}, {"k": "rep", "v": "replace-upsert"}, upsert=True)
        await docs.delete_one({"n": 4})
        await docs.delete_one({"_id": "s6"})
        await docs.delete_many({"g": 1, "n": {"$gte": 7}})  # s7, s10
        found = await docs.find_one_and_update({"n": 0}, {"$set": {"f": "u"}}, return_document=ReturnDocument.AFTER)
        fo_up = await docs.find_one_and_update(
            {"k": "foup"}, {"$set": {"v": "fo-upsert"}}, upsert=True, return_document=ReturnDocument.AFTER
        )
        await docs.find_one_and_replace({"_id": "one"}, {"v": "fo-replaced"})
        await docs.find_one_and_delete({"_id": "m0"})
        bulk = await docs.bulk_write(
            [
                InsertOne({"_id": "b1", "v": 1}),
                UpdateOne({"_id": "b1"}, {"$set": {"w": 1}}),
                UpdateOne({"n": 9}, {"$set": {"bulk": "one"}}),
                UpdateMany({"tag": "seed", "g": 0}, {"$set": {"bulk": "many"}}),
                ReplaceOne({"_id": "b2"}, {"v": "bulk-replace"}, upsert=True),
                UpdateOne({"k": "bulk-up"}, {"$set": {"v": "bulk-upsert"}}, upsert=True),
                DeleteOne({"_id": "m1"}),
                DeleteMany({"_id": {"$in": ["s11"]}}),
            ]
        )
        assert bulk.inserted_count == 1 and bulk.upserted_count == 2 and bulk.deleted_count == 2
        assert many.matched_count == 4 and found["f"] == "u" and fo_up["v"] == "fo-upsert"

        expected = await _all(raw(fallback)["docs"])
        assert expected["s0"]["v"] == "by-id" and "s4" not in expected and expected["b1"]["w"] == 1
        await _failback(dbs, primary)
        assert await _all(raw(primary)["docs"]) == expected
        assert upserted.upserted_id in expected and replaced_up.upserted_id in expected
        assert auto["_id"] in expected and fo_up["_id"] in expected
        assert await raw(fallback)[JOURNAL].count_documents({}) == 0
        status = dbs.status()["mongodb"]["reconcile"]
        assert status["backlog"] == 0 and status["applied"] >= len(expected) - 12
        assert status["last_run"]["result"] == "completed"
    finally:
        await dbs.close()


async def test_a_crash_between_intent_and_write_copies_nothing_stale(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any
) -> None:
    primary, fallback = mongo_pair
    stale = {"_id": "doc", "v": "old"}
    await raw(fallback)["docs"].insert_one(stale)
    await raw(primary)["docs"].insert_one({"_id": "doc", "v": "newer on the primary"})
    await raw(primary)["docs"].insert_one({"_id": "kept", "v": "primary only"})
    dbs = await _start(primary, fallback)
    try:
        await _outage(dbs, primary)
        # Intents written, then the process died before the writes: one for an existing stale
        # document, one for a document that never got inserted (absent before and after).
        journal = raw(fallback)[JOURNAL]
        for doc_id, image in (("doc", stale), ("kept", None)):
            await journal.insert_one(
                {"_id": journal_key(None, "docs", doc_id), "db": None, "coll": "docs", "doc_id": doc_id,
                 "before": None if image is None else Binary(encode(image)), "first_at": time.time(),
                 "last_at": time.time(), "version": 1, "pending": 1, "pending_until": time.time() - 1}
            )  # fmt: skip
        await dbs.mongodb.database["docs"].insert_one({"_id": "real", "v": "written"})
        await _failback(dbs, primary)
        assert await raw(primary)["docs"].find_one({"_id": "doc"}) == {"_id": "doc", "v": "newer on the primary"}
        assert await raw(primary)["docs"].find_one({"_id": "kept"}) == {"_id": "kept", "v": "primary only"}
        assert await raw(primary)["docs"].find_one({"_id": "real"}) == {"_id": "real", "v": "written"}
        assert await raw(fallback)[JOURNAL].count_documents({}) == 0
        assert await dbs.conflicts("mongodb") == []
    finally:
        await dbs.close()


async def test_writes_under_concurrent_traffic_through_the_kill(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any
) -> None:
    primary, fallback = mongo_pair
    dbs = await _start(primary, fallback)
    items = dbs.mongodb.database["traffic"]
    acknowledged: dict[Any, int] = {}

    async def operation(i: int) -> Any:
        key = f"k{i % 40}"
        if i % 4 == 0:
            await items.update_one({"_id": key}, {"$set": {"last": i}}, upsert=True)
            acknowledged[key] = max(acknowledged.get(key, -1), i)
        else:
            await items.insert_one({"_id": f"i{i}", "i": i})
            acknowledged[f"i{i}"] = i

    traffic = Traffic(operation, workers=4, pause=0.002).start()
    try:
        await wait_for(lambda: len(traffic.successes_after(0)) >= 40, 10, "traffic on the primary")
        primary.kill()
        killed = time.monotonic()
        await wait_for(lambda: len(traffic.successes_after(killed)) >= 200, 15, "traffic on the fallback")
        primary.start()
        await wait_for(lambda: _state(dbs) is SwitchState.ON_PRIMARY, FAILBACK, "failback under traffic")
        back = time.monotonic()
        await wait_for(lambda: len(traffic.successes_after(back)) >= 40, 10, "traffic on the primary again")
    finally:
        await traffic.stop()
    try:
        stored = await _all(raw(primary)["traffic"])
        missing = [k for k in acknowledged if k not in stored]
        assert not missing, f"{len(missing)} acknowledged writes not on the primary, e.g. {missing[:5]}"
        stale = [k for k, i in acknowledged.items() if k.startswith("k") and stored[k]["last"] < i]
        assert not stale, stale[:5]
        run = dbs.status()["mongodb"]["reconcile"]["last_run"]
        assert run is not None and run["hold_s"] is not None and run["hold_s"] <= dbs.settings.reconcile_hold + 0.5
    finally:
        await dbs.close()


@pytest.mark.parametrize("policy", ["fallback_wins", "primary_wins", "newest_wins"])
async def test_conflict_policies(mongo_pair: tuple[LocalServer, LocalServer], raw: Any, policy: str) -> None:
    primary, fallback = mongo_pair
    base = {"_id": "c", "v": 0, "counter": 10}
    await raw(primary)["docs"].insert_many([dict(base), {"_id": "old", "v": 0}, {"_id": "free", "v": 0}])
    await raw(fallback)["docs"].insert_many([dict(base), {"_id": "old", "v": 0}, {"_id": "free", "v": 0}])
    dbs = await _start(primary, fallback, FAILOVER_CONFLICT_POLICY=policy)
    try:
        docs = dbs.mongodb.database["docs"]
        await _outage(dbs, primary)
        await docs.update_one({"_id": "c"}, {"$set": {"v": "fallback"}, "$inc": {"counter": 1}})
        await docs.update_one({"_id": "old"}, {"$set": {"v": "fallback"}})
        await docs.update_one({"_id": "free"}, {"$set": {"v": "fallback"}})
        primary.start()
        # While traffic is on the fallback, the primary gets its own changes: one newer than
        # the fallback's write, one stamped before it.
        future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
        await raw(primary)["docs"].update_one({"_id": "c"}, {"$set": {"v": "primary", "updated_at": future}, "$inc": {"counter": 5}})
        await raw(primary)["docs"].update_one({"_id": "old"}, {"$set": {"v": "primary", "updated_at": past}})
        await wait_for(lambda: _state(dbs) is SwitchState.ON_PRIMARY, FAILBACK, "failback")
        c = await raw(primary)["docs"].find_one({"_id": "c"})
        old = await raw(primary)["docs"].find_one({"_id": "old"})
        assert (await raw(primary)["docs"].find_one({"_id": "free"}))["v"] == "fallback"  # no conflict there
        if policy == "fallback_wins":
            assert c == {"_id": "c", "v": "fallback", "counter": 11}  # the fallback's final value wins, $inc too
            assert old["v"] == "fallback"
        elif policy == "primary_wins":
            assert c["v"] == "primary" and c["counter"] == 15
            assert old["v"] == "primary"
        else:
            assert c["v"] == "primary"  # stamped an hour after the fallback's write
            assert old["v"] == "fallback"  # stamped an hour before it
        conflicts = await dbs.conflicts("mongodb")
        assert {c["key"] for c in conflicts} == {'<default>.docs "c"', '<default>.docs "old"'}
        by_key = {c["key"]: c for c in conflicts}
        assert by_key['<default>.docs "c"']["fallback"] == {"_id": "c", "v": "fallback", "counter": 11}
        assert by_key['<default>.docs "c"']["primary"]["counter"] == 15
        assert all(c["store"] == "mongodb" and c["at"] > 0 for c in conflicts)
        assert dbs.status()["mongodb"]["reconcile"]["conflicts"] == 2
    finally:
        await dbs.close()


_CHILD = """
import asyncio, sys
from failover import Databases
from tests.helpers import fast_settings

async def main():
    dbs = Databases(fast_settings(MONGODB_ATLAS_URL=sys.argv[1], MONGODB_URL=sys.argv[2], FAILOVER_RECONCILE_BATCH=20))
    await dbs.start()
    await asyncio.sleep(120)

asyncio.run(main())
"""


async def test_killed_mid_reconcile_a_new_instance_finishes(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any
) -> None:
    primary, fallback = mongo_pair
    total = 3000
    dbs = await _start(primary, fallback)
    try:
        docs = dbs.mongodb.database["docs"]
        await _outage(dbs, primary)
        for start in range(0, total, 500):
            await docs.insert_many([{"_id": i, "v": i} for i in range(start, start + 500)])
        await docs.update_many({"v": {"$lt": 500}}, {"$set": {"touched": True}})  # (nx-27017 compares _id ranges as text in updates)
    finally:
        await dbs.close()  # a clean close reconciles nothing: the backlog waits on the fallback
    assert await raw(fallback)[JOURNAL].count_documents({}) == total
    primary.start()
    # A process starts with the backlog, enters RECONCILING and is SIGKILLed part-way.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, primary.url, fallback.url], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 30
        while (copied := await raw(primary)["docs"].count_documents({})) < total // 10:
            assert time.monotonic() < deadline and child.poll() is None, "the child never started copying"
            await asyncio.sleep(0.01)
        child.kill()
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert copied < total, "the child finished before it could be killed: make the backlog larger"
    assert await raw(fallback)[JOURNAL].count_documents({}) > 0
    assert await raw(fallback)[LOCKS].count_documents({}) == 1  # the dead process's lease
    second = await _start(primary, fallback)
    try:
        # The lease expires (LOCK_TTL), the new instance takes it and finishes.
        await wait_for(lambda: _state(second) is SwitchState.ON_PRIMARY, 40, "the new instance fails back")
        stored = await _all(raw(primary)["docs"])
        assert len(stored) == total
        assert stored == await _all(raw(fallback)["docs"])
        assert all(bool(stored[i].get("touched")) is (stored[i]["v"] < 500) for i in range(total))
        assert await raw(fallback)[JOURNAL].count_documents({}) == 0
    finally:
        await second.close()


async def test_two_instances_share_the_pair(mongo_pair: tuple[LocalServer, LocalServer], raw: Any) -> None:
    primary, fallback = mongo_pair
    first = await _start(primary, fallback)
    second = await _start(primary, fallback)
    try:
        await _outage(first, primary)
        await second.mongodb.database["probe"].find_one({})
        await wait_for(lambda: _state(second) is SwitchState.ON_FALLBACK, 5, "the second instance fails over")
        await first.mongodb.database["docs"].insert_many([{"_id": f"a{i}"} for i in range(300)])
        await second.mongodb.database["docs"].insert_many([{"_id": f"b{i}"} for i in range(300)])
        # The second instance stays pinned on the fallback and writes after the first failed back.
        second.pin("mongodb", "fallback")
        primary.start()
        await wait_for(lambda: _state(first) is SwitchState.ON_PRIMARY, FAILBACK, "the first instance fails back")
        await second.mongodb.database["docs"].insert_one({"_id": "late"})
        assert second.mongodb.failover.active_role is Role.FALLBACK
        # The first instance, on the primary, sweeps what the second left on the fallback.
        async def present() -> bool:
            return await raw(primary)["docs"].count_documents({}) == 601

        deadline = time.monotonic() + FAILBACK
        while not await present():
            assert time.monotonic() < deadline, "the sweep did not copy the late write"
            await asyncio.sleep(0.05)
        second.pin("mongodb", None)
        await wait_for(lambda: _state(second) is SwitchState.ON_PRIMARY, FAILBACK, "the second instance fails back")
        assert await raw(fallback)[JOURNAL].count_documents({}) == 0
    finally:
        await first.close()
        await second.close()


async def test_reconcile_off_keeps_todays_behaviour(mongo_pair: tuple[LocalServer, LocalServer], raw: Any) -> None:
    primary, fallback = mongo_pair
    dbs = await _start(primary, fallback, FAILOVER_RECONCILE="false", FAILOVER_WARM="off")  # warm sync would overwrite it
    try:
        assert dbs.mongodb.journal is None
        assert dbs.status()["mongodb"]["reconcile"] == {"enabled": False}
        await _outage(dbs, primary)
        await dbs.mongodb.database["docs"].insert_one({"_id": "stranded"})
        await _failback(dbs, primary)
        assert await raw(primary)["docs"].find_one({"_id": "stranded"}) is None  # documented as unsafe
        assert JOURNAL not in await raw(fallback).list_collection_names()
    finally:
        await dbs.close()


async def test_primary_path_writes_no_journal(mongo_pair: tuple[LocalServer, LocalServer], raw: Any) -> None:
    primary, fallback = mongo_pair
    dbs = await _start(primary, fallback, FAILOVER_WARM="off")  # warm sync copies docs into the fallback on purpose
    try:
        docs = dbs.mongodb.database["docs"]
        await docs.insert_one({"_id": 1})
        await docs.update_many({}, {"$set": {"x": 1}})
        assert await raw(fallback)[JOURNAL].count_documents({}) == 0
        assert await raw(fallback)["docs"].count_documents({}) == 0
        for name in (JOURNAL, CONFLICTS, LOCKS):
            assert not dbs.mongodb.journal.captures(name)
    finally:
        await dbs.close()


async def test_another_instance_writing_to_the_fallback_does_not_stop_a_failback(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any
) -> None:
    primary, fallback = mongo_pair
    first = await _start(primary, fallback)
    second = await _start(primary, fallback)
    written: list[int] = []

    async def operation(i: int) -> None:
        await second.mongodb.database["busy"].insert_one({"_id": i})
        written.append(i)

    traffic: Traffic | None = None
    try:
        await _outage(first, primary)
        second.pin("mongodb", "fallback")  # it keeps writing to the fallback all along
        traffic = Traffic(operation, workers=2, pause=0.002).start()
        await first.mongodb.database["docs"].insert_many([{"_id": i} for i in range(100)])
        primary.start()
        await wait_for(lambda: _state(first) is SwitchState.ON_PRIMARY, FAILBACK, "failback despite the other writer")
        await traffic.stop()
        traffic = None
        assert await raw(primary)["docs"].count_documents({}) == 100
        second.pin("mongodb", None)
        await wait_for(lambda: _state(second) is SwitchState.ON_PRIMARY, FAILBACK, "the writer fails back too")
        stored = {d["_id"] for d in await raw(primary)["busy"].find({}, {"_id": 1}).to_list(None)}
        assert written and not set(written) - stored
    finally:
        if traffic is not None:
            await traffic.stop()
        await first.close()
        await second.close()
