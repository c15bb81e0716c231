"""MongoDB failover on real MongoDB-wire servers (nx-27017) started by the suite.

Every claim is proven by killing (SIGKILL), pausing (SIGSTOP) or restarting a
real server while the routed API is in use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from failover import Databases, last_served
from failover.core.endpoint import Role
from failover.core.events import SwitchState
from failover.errors import FailoverError, NoEndpointAvailable, OperationTimeout, OutcomeUnknown
from failover.local import LocalServer
from failover.local.servers import free_port
from tests.helpers import Traffic, fast_settings, wait_for

from . import scenarios

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
    return dbs.store("mongodb").state


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


def reads_and_writes(dbs: Databases, collection: str = "traffic") -> Callable[[int], Any]:
    """find_one, count_documents and insert_one (not idempotent) in turn; each returns the role
    that served it."""
    items = dbs.mongodb.database[collection]

    async def operation(i: int) -> str:
        if i % 3 == 0:
            await items.find_one({"i": i - 1})
        elif i % 3 == 1:
            await items.count_documents({})
        else:
            await items.insert_one({"i": i})
        endpoint = last_served()  # the endpoint that served this call, not the one active after it
        return str(endpoint.role) if endpoint else "none"

    return operation


def subject(dbs: Databases, pair: tuple[LocalServer, LocalServer], collection: str = "traffic") -> scenarios.Subject:
    return scenarios.Subject(dbs, "mongodb", pair[0], pair[1], reads_and_writes(dbs, collection))


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
    try:
        await scenarios.crash_moves_within_a_second(subject(dbs, mongo_pair))
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
    try:
        await scenarios.hang_fails_over_within_the_timeouts(subject(dbs, mongo_pair))
        # Once resumed (the scenario resumes it), the primary gets traffic back after the failback delay.
        traffic = Traffic(reads_and_writes(dbs), workers=2).start()
        try:
            await wait_for(lambda: _state(dbs) is SwitchState.ON_PRIMARY, dbs.settings.failback_delay + 6, "failback")
            back = time.monotonic()
            await wait_for(lambda: len(traffic.successes_after(back)) >= 30, 5, "traffic on the primary again")
        finally:
            await traffic.stop()
        assert not traffic.errors_started_after(back)
    finally:
        await dbs.close()


async def test_failback_waits_for_the_failback_delay(mongo_pair: tuple[LocalServer, LocalServer], raw: Any) -> None:
    primary, fallback = mongo_pair
    dbs = await _start(primary, fallback, FAILOVER_FAILBACK_DELAY=1.5)
    items = dbs.mongodb.database["delay"]

    async def during_outage() -> None:
        await items.insert_one({"_id": "during"})  # live traffic notices the crash
        assert await raw(fallback)["delay"].find_one({"_id": "during"}) == {"_id": "during"}

    async def after_failback() -> None:
        await items.insert_one({"_id": "after"})
        assert await raw(primary)["delay"].find_one({"_id": "after"}) == {"_id": "after"}

    try:
        await scenarios.failback_waits_for_the_delay(subject(dbs, mongo_pair), during_outage, after_failback)
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
        await wait_for(lambda: bool(store._health[Role.PRIMARY].healthy), 5, "the primary healthy again")
        healthy_since = store._health[Role.PRIMARY].healthy_since
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
    dbs = await _start(primary, fallback, FAILOVER_FAILBACK_DELAY=2.0)
    try:
        await scenarios.flapping_switches_a_bounded_number_of_times(subject(dbs, mongo_pair, "flap"), seconds=8)
        # Once the primary stays up, traffic returns to it.
        await wait_for(lambda: _state(dbs) is SwitchState.ON_PRIMARY, dbs.settings.failback_delay + 6, "failback")
        switches = dbs.store("mongodb").snapshot().counters["switches"]
        assert switches <= 6, dbs.status()["mongodb"]["transitions"]
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
    items = dbs.mongodb.database["hung"]

    def typed(call: Callable[[], Any]) -> Callable[[], Any]:
        async def run() -> Any:
            try:
                return await call()
            except FailoverError as exc:
                # A write caught on a hung server has an unknown outcome (OutcomeUnknown or its
                # subclass OperationTimeout); a read is retried and then reports no endpoint.
                assert isinstance(exc, (OutcomeUnknown, NoEndpointAvailable)), repr(exc)
                raise

        return run

    try:
        await items.insert_one({"_id": 1})
        await items.find_one({"_id": 1})
        await scenarios.both_hung_raise_within_the_operation_timeout(
            subject(dbs, mongo_pair),
            typed(lambda: items.insert_one({"_id": 2})),
            typed(lambda: items.find_one({"_id": 1})),
        )
    finally:
        await dbs.close()


async def test_fallback_down_while_on_primary(mongo_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = mongo_pair
    dbs = await _start(primary, fallback)
    try:
        await scenarios.fallback_down_is_reported_and_harmless(subject(dbs, mongo_pair, "fbdown"))
        status = dbs.status()["mongodb"]
        assert status["primary_available"] is True and status["current_db"] == "Primary MongoDB"
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
