"""Redis and MongoDB warm sync pieces that need no server: the mirror's queue and heartbeat order,
the ids and heartbeat numbers read from change events (including nx-27017's quirks)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from bson import ObjectId

import bson
from bson.codec_options import DEFAULT_CODEC_OPTIONS
from bson.raw_bson import RawBSONDocument

from failover.stores.mongodb.warm import (
    FULL_BATCH_BYTES,
    _NO_ID,
    _beat_number,
    _Collection,
    _event_id,
    _releasable,
    _Stream,
)
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


class _Server:
    """Answers a change stream's commands from a script (the stream only sends and reads them)."""

    codec_options = DEFAULT_CODEC_OPTIONS

    def __init__(self, *cursors: dict[str, object]) -> None:
        self.cursors = list(cursors)
        self.sent: list[dict[str, object]] = []

    async def command(self, spec: dict[str, object], session: object = None, codec_options: object = None) -> object:
        self.sent.append(spec)
        reply = {"ok": 1, "cursor": self.cursors.pop(0)}
        return RawBSONDocument(bson.encode(reply)) if codec_options is not None else reply


def _events(*numbers: int, note: str = "") -> list[dict[str, object]]:
    return [{"_id": {"_data": f"t{n}"}, "operationType": "insert", "fullDocument": {"_id": n, "note": note}} for n in numbers]


async def test_a_stream_read_says_when_the_server_had_no_more() -> None:
    server = _Server(
        {"id": 7, "firstBatch": _events(1), "postBatchResumeToken": {"_data": "t1"}},
        {"id": 7, "nextBatch": _events(2, 3, 4)},  # a full batch (3 asked): maybe more
        {"id": 7, "nextBatch": _events(5), "postBatchResumeToken": {"_data": "p9"}},  # fewer: read to its end
        {"id": 7, "nextBatch": []},
    )
    stream = _Stream(server, "items", None, 3)
    await stream.open(None)
    assert server.sent[0]["pipeline"] == [{"$changeStream": {}}]
    assert await stream.read(20) == (_events(1), False)  # the first batch, then the server is asked
    assert await stream.read(20) == (_events(2, 3, 4), False)
    assert stream.token == {"_data": "t4"}  # no postBatchResumeToken: the last event's own
    assert await stream.read(20) == (_events(5), True)
    assert stream.token == {"_data": "p9"}
    assert await stream.read(20) == ([], True)
    assert stream.token == {"_data": "p9"}  # nothing new: where it was
    assert server.sent[1] == {"getMore": 7, "collection": "items", "batchSize": 3, "maxTimeMS": 20}
    assert stream.open_cursor


async def test_a_batch_cut_by_size_is_not_taken_for_the_end_of_the_stream() -> None:
    big = "x" * (FULL_BATCH_BYTES // 2)
    server = _Server({"id": 7, "firstBatch": []}, {"id": 7, "nextBatch": _events(1, 2, note=big)})
    stream = _Stream(server, "items", None, 1000)
    await stream.open({"_data": "t0"})
    assert server.sent[0]["pipeline"] == [{"$changeStream": {"resumeAfter": {"_data": "t0"}}}]
    assert stream.token == {"_data": "t0"}
    events, drained = await stream.read(20)
    assert len(events) == 2 and not drained


async def test_a_cursor_the_server_closed_is_reported() -> None:
    server = _Server({"id": 7, "firstBatch": []}, {"id": 0, "nextBatch": []})
    stream = _Stream(server, "items", None, 10)
    await stream.open(None)
    await stream.read(20)
    assert not stream.open_cursor
    await stream.close()  # nothing to kill
    assert len(server.sent) == 2


def _collections(**drained: int) -> tuple[list[_Collection], _Collection]:
    heartbeat = _Collection("failover_warm_heartbeat")
    found = [heartbeat]
    for name, rnd in drained.items():
        coll = _Collection(name)
        coll.drained, coll.copied = rnd, True
        found.append(coll)
    return found, heartbeat


def test_a_heartbeat_goes_once_every_stream_was_read_to_its_end_after_it() -> None:
    held = [(3, 10), (4, 11), (6, 12)]  # (round read in, number)
    colls, hb = _collections(items=5, orders=4)
    assert _releasable(held, colls, hb) == (11, [(6, 12)])  # orders was drained in round 4
    colls, hb = _collections(items=5, orders=6)
    assert _releasable(held, colls, hb) == (11, [(6, 12)])
    colls, hb = _collections(items=6, orders=9)
    assert _releasable(held, colls, hb) == (12, [])


def test_a_closed_stream_holds_every_heartbeat_back() -> None:
    """A stream closed by an error is read again from its token: what it had read and drained may
    not be on the fallback, so a heartbeat read before must wait for it to be drained again."""
    colls, hb = _collections(items=9, orders=-1)
    assert _releasable([(3, 10)], colls, hb) == (None, [(3, 10)])
    # Read to its end, but waiting for its copy (new, or its change history lost): holds them too.
    colls, hb = _collections(items=9, orders=9)
    colls[-1].copied = False
    assert _releasable([(3, 10)], colls, hb) == (None, [(3, 10)])
    compared = _Collection("logs")
    compared.compare, compared.drained = True, -1  # compared collections are not covered by heartbeats
    colls, hb = _collections(items=9)
    assert _releasable([(3, 10)], [*colls, compared], hb) == (10, [])
    colls, hb = _collections()
    assert _releasable([(1, 4), (2, 5)], colls, hb) == (5, [])  # nothing streamed but the heartbeat
    assert _releasable([], colls, hb) == (None, [])
