"""MongoDB failover on real MongoDB-wire servers (nx-27017) started by the suite.

Every claim is proven by killing (SIGKILL), pausing (SIGSTOP) or restarting a
real server while the routed API is in use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from failover import Databases
from failover.core.endpoint import Role
from failover.core.events import SwitchState
from failover.errors import FailoverError, NoEndpointAvailable, OperationTimeout, OutcomeUnknown
from failover.local import LocalServer
from failover.local.servers import free_port
from tests.helpers import Traffic, fast_settings, wait_for

pytestmark = pytest.mark.integration

SEED_KEYS = {"using_primary", "primary_available", "fallback_available", "primary_healthy", "current_db"}


async def _start(primary: LocalServer | None, fallback: LocalServer | None, **extra: Any) -> Databases:
    values: dict[str, Any] = dict(extra)
    if primary is not None:
        values.setdefault("MONGODB_ATLAS_URL", primary.url)
    if fallback is not None:
        values.setdefault("MONGODB_URL", fallback.url)
    dbs = Databases(fast_settings(**values))
    await dbs.start()
    return dbs


@pytest.fixture
async def raw() -> AsyncIterator[Any]:
    """``raw(server)``: a plain PyMongo client on one server, to see where data landed."""
    clients: list[AsyncMongoClient[Any]] = []

    def make(server: LocalServer) -> Any:
        client: AsyncMongoClient[Any] = AsyncMongoClient(server.url, serverSelectionTimeoutMS=2000)
        clients.append(client)
        return client["app"]

    yield make
    for client in clients:
        await client.close()


def _state(dbs: Databases) -> SwitchState:
    return dbs.store("mongodb").switch.state


def _mixed_traffic(dbs: Databases, collection: str = "traffic") -> Traffic:
    """Writes (insert_one, non-idempotent) and reads (find_one, count) in turn."""
    items = dbs.mongodb.database[collection]

    async def operation(i: int) -> Any:
        if i % 3 == 0:
            return await items.find_one({"i": i - 1})
        if i % 3 == 1:
            return await items.count_documents({})
        return (await items.insert_one({"i": i})).inserted_id

    return Traffic(operation, workers=3)


async def test_healthy_start_on_primary(mongo_pair: tuple[LocalServer, LocalServer], raw: Any) -> None:
    primary, fallback = mongo_pair
    dbs = await _start(primary, fallback)
    try:
        status = dbs.status()
        mongo = status["mongodb"]
        assert SEED_KEYS <= set(mongo)
        assert {k: mongo[k] for k in SEED_KEYS} == {
            "using_primary": True,
            "primary_available": True,
            "fallback_available": True,
            "primary_healthy": True,
            "current_db": "Primary MongoDB",
        }
        assert status["overall_status"] == "healthy"
        assert mongo["endpoints"]["fallback"]["name"] == "Local MongoDB"

        items = dbs.mongodb.database["items"]
        await items.insert_one({"_id": "a", "n": 1})
        assert await raw(primary)["items"].find_one({"_id": "a"}) == {"_id": "a", "n": 1}
        assert await raw(fallback)["items"].find_one({"_id": "a"}) is None
    finally:
        await dbs.close()


async def test_routed_api_covers_common_calls(mongo_pair: tuple[LocalServer, LocalServer]) -> None:
    from pymongo import InsertOne, UpdateOne

    primary, fallback = mongo_pair
    dbs = await _start(primary, fallback)
    try:
        db = dbs.mongodb.database
        coll = db.get_collection("api")
        assert db.api.name == db["api"].name == "api"
        await coll.create_index("k", unique=True)
        await coll.insert_many([{"k": i, "g": i % 2} for i in range(6)])
        assert await coll.count_documents({}) == 6
        assert [d["k"] for d in await coll.find({}, {"_id": 0}).sort("k", -1).limit(3).to_list()] == [5, 4, 3]
        assert sorted(await coll.distinct("g")) == [0, 1]
        await coll.update_one({"k": 0}, {"$set": {"x": 1}})
        await coll.update_many({"g": 1}, {"$set": {"odd": True}})
        await coll.replace_one({"k": 2}, {"k": 2, "replaced": True})
        doc = await coll.find_one_and_update({"k": 4}, {"$inc": {"n": 1}}, return_document=True)
        assert doc["n"] == 1
        result = await coll.bulk_write([InsertOne({"k": 10}), UpdateOne({"k": 10}, {"$set": {"b": 1}})])
        assert result.inserted_count == 1 and result.modified_count == 1
        grouped = await (await coll.aggregate([{"$match": {"odd": True}}, {"$count": "n"}])).to_list()
        assert grouped == [{"n": 3}]
        assert [d["k"] async for d in coll.find({"k": {"$lt": 2}}).sort("k")] == [0, 1]
        assert (await coll.delete_one({"k": 10})).deleted_count == 1
        assert (await coll.delete_many({"g": 1})).deleted_count == 3
        assert await coll.find_one({"k": 2}) == {"_id": (await coll.find_one({"k": 2}))["_id"], "k": 2, "replaced": True}
        from pymongo.errors import DuplicateKeyError

        with pytest.raises(DuplicateKeyError):  # an application error is the driver's own, not retried
            await coll.insert_one({"k": 0})
        assert _state(dbs) is SwitchState.ON_PRIMARY
    finally:
        await dbs.close()


async def test_sigkill_primary_under_traffic(mongo_pair: tuple[LocalServer, LocalServer], raw: Any) -> None:
    primary, fallback = mongo_pair
    dbs = await _start(primary, fallback)
    traffic = _mixed_traffic(dbs).start()
    try:
        await wait_for(lambda: len(traffic.successes_after(0)) >= 30, 5, "traffic on the primary")
        primary.kill()
        killed = time.monotonic()
        await wait_for(lambda: _state(dbs) is SwitchState.ON_FALLBACK, 1.0, "failover within 1 s of the kill")
        await wait_for(lambda: len(traffic.successes_after(killed)) >= 60, 5, "traffic on the fallback")
    finally:
        await traffic.stop()
    try:
        errors = traffic.errors_started_after(killed)
        assert not errors, [repr(o.error) for o in errors[:5]]
        status = dbs.status()["mongodb"]
        assert status["current_db"] == "Local MongoDB"
        assert status["using_primary"] is False and status["fallback_available"] is True
        assert dbs.status()["overall_status"] == "degraded"
        # The writes started after the kill were made on the fallback.
        assert await raw(fallback)["traffic"].count_documents({}) > 0
    finally:
        await dbs.close()


async def test_collection_handle_taken_before_failover_works_after(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any
) -> None:
    primary, fallback = mongo_pair
    dbs = await _start(primary, fallback)
    try:
        handle = dbs.mongodb.database["handles"]
        attribute_handle = dbs.mongodb.database.handles
        await handle.insert_one({"_id": "before"})
        primary.kill()
        await handle.insert_one({"_id": "after"})
        await attribute_handle.insert_one({"_id": "after-2"})
        assert await handle.find_one({"_id": "after"}) == {"_id": "after"}
        assert _state(dbs) is SwitchState.ON_FALLBACK
        assert await raw(fallback)["handles"].count_documents({}) == 2
    finally:
        await dbs.close()


async def test_sigstop_primary_fails_over_without_hanging(mongo_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = mongo_pair
    dbs = await _start(primary, fallback)
    budget = dbs.settings.operation_timeout
    traffic = _mixed_traffic(dbs).start()
    try:
        await wait_for(lambda: len(traffic.successes_after(0)) >= 30, 5, "traffic on the primary")
        primary.pause()
        paused = time.monotonic()
        # Detection bound: a timed-out live operation or two failed probes.
        bound = dbs.settings.probe_timeout * dbs.settings.unhealthy_threshold + dbs.settings.health_check_interval + budget
        await wait_for(lambda: _state(dbs) is SwitchState.ON_FALLBACK, bound, "failover of a paused primary")
        switched = time.monotonic()
        await wait_for(lambda: len(traffic.successes_after(switched)) >= 30, 5, "traffic on the fallback")
        # Once resumed, the primary gets traffic back after the failback delay.
        primary.resume()
        await wait_for(lambda: _state(dbs) is SwitchState.ON_PRIMARY, dbs.settings.failback_delay + 4, "failback")
        back = time.monotonic()
        await wait_for(lambda: len(traffic.successes_after(back)) >= 30, 5, "traffic on the primary again")
    finally:
        await traffic.stop()
        if primary.paused:
            primary.resume()
    try:
        # No operation hung: each finished within its budget (plus scheduling slack).
        slowest = max(o.finished - o.started for o in traffic.outcomes)
        assert slowest < budget + 1.0, slowest
        # Operations caught on the paused primary fail with a typed error only.
        for outcome in traffic.errors_started_after(paused):
            assert isinstance(outcome.error, OutcomeUnknown), repr(outcome.error)
        assert not traffic.errors_started_after(switched)
    finally:
        await dbs.close()


async def test_failback_only_after_the_delay(mongo_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = mongo_pair
    dbs = await _start(primary, fallback, FAILOVER_FAILBACK_DELAY=1.5)
    store = dbs.store("mongodb")
    items = dbs.mongodb.database["failback"]
    await items.insert_one({"_id": 0})
    primary.kill()
    await items.insert_one({"_id": 1})  # detects the kill
    assert _state(dbs) is SwitchState.ON_FALLBACK
    traffic = _mixed_traffic(dbs, "failback").start()
    try:
        await asyncio.to_thread(primary.start)
        await wait_for(lambda: bool(store.health[Role.PRIMARY].healthy), 5, "the primary healthy again")
        healthy_since = store.health[Role.PRIMARY].healthy_since
        assert healthy_since is not None
        # Poll the state until the failback; remember when it was last seen on the fallback.
        last_on_fallback = time.monotonic()

        def failed_back() -> bool:
            nonlocal last_on_fallback
            if _state(dbs) is SwitchState.ON_FALLBACK:
                last_on_fallback = time.monotonic()
                return False
            return True

        await wait_for(failed_back, dbs.settings.failback_delay + 3, "failback")
        # Failback passes through RECONCILING (the writes made on the fallback are copied first).
        await wait_for(lambda: _state(dbs) is SwitchState.ON_PRIMARY, 10, "reconciled failback")
        # It did not happen before the primary had been healthy for the whole delay.
        assert last_on_fallback >= healthy_since + dbs.settings.failback_delay - 0.05
        assert dbs.status()["mongodb"]["current_db"] == "Primary MongoDB"
        back = time.monotonic()
        await wait_for(lambda: len(traffic.successes_after(back)) >= 30, 5, "traffic on the primary again")
    finally:
        await traffic.stop()
    try:
        # Neither the restart nor the failback (which drains the fallback's client) surfaced an error.
        errors = [o for o in traffic.outcomes if not o.ok]
        assert not errors, [repr(o.error) for o in errors[:5]]
    finally:
        await dbs.close()


async def test_flapping_primary_switches_a_bounded_number_of_times(
    mongo_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = mongo_pair
    dbs = await _start(primary, fallback)
    store = dbs.store("mongodb")
    traffic = _mixed_traffic(dbs, "flap").start()
    try:
        await wait_for(lambda: len(traffic.successes_after(0)) >= 10, 5, "traffic on the primary")
        ends = time.monotonic() + 8
        while time.monotonic() < ends:
            primary.kill()
            await asyncio.sleep(0.5)  # the fault schedule, not a wait for a condition
            await asyncio.to_thread(primary.start)
            await asyncio.sleep(0.5)
        assert store.switch.switches <= 4, [t.to_dict() for t in store.switch.history]
        # Once the primary stays up, traffic returns to it, and only once.
        await wait_for(lambda: _state(dbs) is SwitchState.ON_PRIMARY, dbs.settings.failback_delay + 4, "failback")
        back = time.monotonic()
        await wait_for(lambda: len(traffic.successes_after(back)) >= 20, 5, "traffic on the primary again")
    finally:
        await traffic.stop()
    try:
        assert store.switch.switches <= 5, [t.to_dict() for t in store.switch.history]
        # Only operations caught in flight by a kill may fail, and only with a typed error.
        for outcome in traffic.outcomes:
            if not outcome.ok:
                assert isinstance(outcome.error, OutcomeUnknown), repr(outcome.error)
        assert not traffic.errors_started_after(back)
    finally:
        await dbs.close()


async def test_both_down_raises_a_typed_error_quickly(mongo_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = mongo_pair
    dbs = await _start(primary, fallback)
    budget = dbs.settings.operation_timeout
    items = dbs.mongodb.database["down"]
    try:
        await items.insert_one({"_id": 1})
        primary.kill()
        fallback.kill()
        for call in (lambda: items.insert_one({"_id": 2}), lambda: items.find_one({"_id": 1})):
            started = time.monotonic()
            with pytest.raises(NoEndpointAvailable) as caught:
                await call()
            assert time.monotonic() - started < budget + 0.5
            assert caught.value.store == "mongodb"
        await wait_for(lambda: dbs.status()["overall_status"] == "unhealthy", 5, "store unavailable")
        assert dbs.status()["mongodb"]["current_db"] is None
    finally:
        await dbs.close()


async def test_both_paused_raises_a_typed_error_within_the_timeout(
    mongo_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = mongo_pair
    dbs = await _start(primary, fallback)
    budget = dbs.settings.operation_timeout
    items = dbs.mongodb.database["hung"]
    try:
        await items.insert_one({"_id": 1})
        await items.find_one({"_id": 1})
        primary.pause()
        fallback.pause()
        for call in (lambda: items.insert_one({"_id": 2}), lambda: items.find_one({"_id": 1})):
            started = time.monotonic()
            with pytest.raises(FailoverError) as caught:
                await call()
            # A write caught on a hung server has an unknown outcome (OutcomeUnknown or its
            # subclass OperationTimeout); a read is retried and then reports no endpoint.
            assert isinstance(caught.value, (OutcomeUnknown, NoEndpointAvailable)), repr(caught.value)
            assert time.monotonic() - started < budget + 0.5
    finally:
        primary.resume()
        fallback.resume()
        await dbs.close()


async def test_fallback_down_while_on_primary(mongo_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = mongo_pair
    dbs = await _start(primary, fallback)
    traffic = _mixed_traffic(dbs, "fbdown").start()
    try:
        await wait_for(lambda: len(traffic.successes_after(0)) >= 10, 5, "traffic on the primary")
        fallback.kill()
        await wait_for(lambda: dbs.status()["mongodb"]["fallback_available"] is False, 3, "fallback marked down")
        marked = time.monotonic()
        await wait_for(lambda: len(traffic.successes_after(marked)) >= 20, 5, "traffic goes on")
    finally:
        await traffic.stop()
    try:
        assert not [o for o in traffic.outcomes if not o.ok]
        status = dbs.status()["mongodb"]
        assert status["using_primary"] is True and status["primary_available"] is True
        assert status["current_db"] == "Primary MongoDB"
        assert dbs.status()["overall_status"] == "healthy"
    finally:
        await dbs.close()


def _unread_bytes_on_server(port: int) -> int:
    """Bytes received by the server's sockets on *port* that it has not read yet (from /proc)."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            state = fields[3]
            if local_port == port and state == "01":  # ESTABLISHED, server side
                total += int(fields[4].split(":")[1], 16)  # rx_queue
    return total


async def test_write_cut_mid_flight_raises_outcome_unknown(
    mongo_pair: tuple[LocalServer, LocalServer], raw: Any
) -> None:
    primary, fallback = mongo_pair
    dbs = await _start(primary, fallback)
    items = dbs.mongodb.database["midflight"]
    try:
        for i in range(3):  # a pooled connection exists: the write below is sent at once
            await items.insert_one({"_id": f"warm-{i}"})
        primary.pause()
        write = asyncio.create_task(items.insert_one({"_id": "cut"}))
        # The request has reached the server's socket (the server, paused, has not read it).
        await wait_for(lambda: _unread_bytes_on_server(primary.port) > 0, 1.0, "the write sent to the server")
        primary.kill()
        with pytest.raises(OutcomeUnknown) as caught:
            await write
        assert not isinstance(caught.value, OperationTimeout)
        # Not re-executed elsewhere.
        assert await raw(fallback)["midflight"].find_one({"_id": "cut"}) is None
        # The next write goes to the fallback without an error.
        await items.insert_one({"_id": "next"})
        assert await raw(fallback)["midflight"].find_one({"_id": "next"}) == {"_id": "next"}
    finally:
        await dbs.close()


async def test_password_never_shown(mongo_pair: tuple[LocalServer, LocalServer], caplog: pytest.LogCaptureFixture) -> None:
    _, fallback = mongo_pair
    secret = "s3cret-Mongo-pw"
    dead_primary = f"mongodb://app:{secret}@127.0.0.1:{free_port()}/?authSource=admin"
    caplog.set_level(logging.DEBUG, logger="failover")
    dbs = await _start(None, fallback, MONGODB_ATLAS_URL=dead_primary)
    try:
        await dbs.mongodb.database["pw"].insert_one({"_id": 1})
        status = dbs.status()
        assert status["mongodb"]["current_db"] == "Local MongoDB"
        assert status["mongodb"]["endpoints"]["primary"]["last_error"]
        assert secret not in json.dumps(status)
        assert secret not in caplog.text
    finally:
        await dbs.close()
