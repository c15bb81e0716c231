"""Redis and MongoDB warm sync pieces that need no server: the mirror's queue and heartbeat order,
the ids and heartbeat numbers read from change events (including nx-27017's quirks)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from bson import ObjectId

from failover.stores.mongodb.warm import _NO_ID, _beat_number, _event_id
from failover.stores.redis.warm import _BEAT, RETRY_PAUSE, RETRY_PAUSE_MAX, RedisWarmSync


def active(sync: RedisWarmSync) -> RedisWarmSync:
    sync._active = True
    return sync


async def test_reads_are_not_queued_and_writes_are() -> None:
    sync = active(RedisWarmSync())
    sync.note(("GET", "k"))
    sync.note(("HGETALL", "h"))
    sync.note(("SET", "k", "v"))
    sync.note(("XGROUP CREATE", "s", "g", "$"))  # a multi-word name, as redis-py sends it
    sync.note((b"DEL", b"gone"))
    assert [args[0] for args in sync._queue] == ["SET", "XGROUP CREATE", b"DEL"]


async def test_nothing_is_queued_while_paused() -> None:
    sync = RedisWarmSync()
    sync.note(("SET", "k", "v"))
    assert not sync._queue


async def test_a_full_queue_drops_and_counts_without_waiting_and_asks_for_a_resync() -> None:
    sync = active(RedisWarmSync(queue_size=2))
    for i in range(5):
        sync.note(("SET", f"k{i}", "v"))
    assert len(sync._queue) == 2
    assert sync.queue_overflows == 3
    assert sync._resync_now.is_set()


async def test_the_backlog_keeps_distinct_keys_in_order_without_the_librarys_own() -> None:
    sync = active(RedisWarmSync())
    for args in (("SET", "a", 1), ("MSET", "b", 1, "a", 2), ("SET", "failover:dirty", 1), ("DEL", "c")):
        sync.note(args)
    sync._drain()
    assert list(sync._backlog) == [b"a", b"b", b"c"]


async def test_a_heartbeat_is_drained_only_after_every_write_noted_before_it() -> None:
    sync = active(RedisWarmSync(batch=2))
    sync.note(("SET", "a", 1))
    sync.note(("SET", "b", 1))
    sync._enqueue((_BEAT, 7))
    sync.note(("SET", "c", 1))
    sync._drain(limit=2)  # a batch: a and b; the beat is still queued behind them
    assert list(sync._backlog) == [b"a", b"b"] and sync._beat_drained is None
    sync._drain()
    assert sync._beat_drained == 7
    assert list(sync._backlog) == [b"a", b"b", b"c"]  # the mirror writes the beat once these are copied


async def test_pause_keeps_the_keys_still_to_copy_for_after_failback() -> None:
    sync = active(RedisWarmSync())
    sync.note(("SET", "late", 1))
    await sync.pause(None)  # type: ignore[arg-type]
    assert list(sync._backlog) == [b"late"] and not sync._queue
    sync.note(("SET", "during-outage", 1))  # paused: not noted
    assert not sync._queue


def test_failed_copies_back_off_and_warn_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    sync = RedisWarmSync()
    caplog.set_level(logging.DEBUG, logger="failover.redis.warm")
    pauses = [sync._failed("re-sync", ConnectionError("refused"), n) for n in range(1, 10)]
    assert pauses[0] == RETRY_PAUSE
    assert pauses == sorted(pauses) and pauses[-1] == RETRY_PAUSE_MAX
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "re-sync failed: ConnectionError" in warnings[0].getMessage()
    assert sync.copy_errors == 9 and sync._resync_now.is_set()
    sync._succeeded()
    caplog.clear()
    sync._failed("mirror copy", ConnectionError("refused"))
    assert [r.levelno for r in caplog.records] == [logging.WARNING]  # a new episode warns again


def test_event_id_prefers_the_full_document_whose_id_keeps_its_type() -> None:
    # nx-27017 sends an integer _id as text in documentKey; fullDocument has the real one.
    assert _event_id({"documentKey": {"_id": "10"}, "fullDocument": {"_id": 10, "v": 1}}) == 10
    oid = ObjectId()
    assert _event_id({"operationType": "delete", "documentKey": {"_id": oid}}) == oid
    assert _event_id({"operationType": "update", "documentKey": {"_id": 3}, "fullDocument": None}) == 3
    assert _event_id({"operationType": "drop"}) is _NO_ID


def test_heartbeat_number_comes_from_the_event_itself() -> None:
    assert _beat_number({"fullDocument": {"_id": "me", "n": 4}, "documentKey": {"_id": "me"}}, "me") == 4
    update = {"documentKey": {"_id": "me"}, "updateDescription": {"updatedFields": {"n": 5}}}
    assert _beat_number(update, "me") == 5
    assert _beat_number({"fullDocument": {"_id": "other", "n": 9}, "documentKey": {"_id": "other"}}, "me") is None



async def test_stopped_loops_end_at_once_even_when_their_cancel_is_lost() -> None:
    sync = RedisWarmSync(resync_interval=3600)
    sync._active = True
    generation = sync._generation
    # Both loops idle: the mirror waits for a write, the re-sync for its next hour.
    sync._resync_now.set()  # not set by a copy here: lets the first pass end at once
    sync._resync = _no_resync  # type: ignore[method-assign]
    mirror = asyncio.create_task(sync._mirror_loop(generation))
    resync = asyncio.create_task(sync._resync_loop(generation))
    await asyncio.sleep(0.05)
    assert not mirror.done() and not resync.done()
    sync._next_generation()  # what _stop_tasks does before it cancels: no cancel() reaches them here
    await asyncio.wait_for(asyncio.gather(mirror, resync), 2)


async def _no_resync() -> None:
    return None
