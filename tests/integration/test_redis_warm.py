"""Redis warm sync on real servers: the fallback follows the primary, and the lag is measured.

Every check reads the servers with the raw driver; the status document is what is being
tested, never the way to verify it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from failover import Databases
from failover.core.events import Event
from failover.local import LocalServer

from ..helpers import wait_for
from .continuity import AckedWriter, Continuity, missing

pytestmark = pytest.mark.integration

STORE = Continuity("redis")
state, warm, streaming, outage, failback = STORE.state, STORE.warm, STORE.streaming, STORE.outage, STORE.failback
start = STORE.start


def raw(server: LocalServer) -> aioredis.Redis:
    return aioredis.Redis.from_url(server.url, retry=Retry(NoBackoff(), 1), socket_timeout=10)


@pytest.fixture
def pair(make_server: Callable[..., LocalServer]) -> tuple[LocalServer, LocalServer]:
    """A primary that keeps its data across a kill (AOF), and a plain fallback."""
    return make_server("redis", persistent=True), make_server("redis")


class Writer(AckedWriter[str]):
    """Writes through failover: strings set, overwritten and deleted, and hashes."""

    def __init__(self, dbs: Databases, prefix: str = "w") -> None:
        super().__init__()
        self.dbs = dbs
        self.prefix = prefix

    async def step(self, i: int) -> tuple[str, Any]:
        r = self.dbs.redis
        live = self.live(lambda v: isinstance(v, bytes))  # strings only: hashes stay hashes
        if i % 4 == 3 and live:
            self.pending = key = live[(i * 7919) % len(live)]
            await r.set(key, f"u{i}")
            return key, f"u{i}".encode()
        if i % 10 == 9 and live:
            self.pending = key = live[(i * 104729) % len(live)]
            await r.delete(key)
            return key, None
        if i % 5 == 1:
            self.pending = key = f"{self.prefix}:h{i % 50}"
            await r.hset(key, mapping={"n": i, "who": "writer"})
            return key, {b"n": str(i).encode(), b"who": b"writer"}
        self.pending = key = f"{self.prefix}:{i}"
        await r.set(key, f"i{i}")
        return key, f"i{i}".encode()


async def values(client: aioredis.Redis, keys: list[str]) -> dict[str, Any]:
    """Each key's value as the Writer records it (bytes, a dict for hashes, None when absent)."""
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
        kinds = await pipe.execute()
    out: dict[str, Any] = {}
    async with client.pipeline(transaction=False) as pipe:
        for key, kind in zip(keys, kinds):
            if kind == b"hash":
                pipe.hgetall(key)
            else:
                pipe.get(key)
        for key, value in zip(keys, await pipe.execute()):
            out[key] = value
    return out


async def dumps(client: aioredis.Redis) -> dict[bytes, tuple[Any, bool]]:
    """Every non-library key's content (by type, order-free where Redis is) and whether it expires."""
    keys = [k async for k in client.scan_iter(count=1000) if not k.startswith(b"failover:")]
    out: dict[bytes, tuple[Any, bool]] = {}
    for start in range(0, len(keys), 1000):
        part = keys[start : start + 1000]
        async with client.pipeline(transaction=False) as pipe:
            for key in part:
                pipe.type(key)
                pipe.pttl(key)
            meta = await pipe.execute()
        readers = {
            b"string": lambda p, k: p.get(k),
            b"hash": lambda p, k: p.hgetall(k),
            b"set": lambda p, k: p.smembers(k),
            b"list": lambda p, k: p.lrange(k, 0, -1),
            b"zset": lambda p, k: p.zrange(k, 0, -1, withscores=True),
            b"stream": lambda p, k: p.xrange(k),
        }
        async with client.pipeline(transaction=False) as pipe:
            for i, key in enumerate(part):
                readers[meta[2 * i]](pipe, key)
            contents = await pipe.execute()
        for i, key in enumerate(part):
            out[key] = (meta[2 * i], contents[i], meta[2 * i + 1] >= 0)
    return out


async def test_a_write_on_the_primary_is_on_the_fallback_when_the_primary_dies_within_the_reported_lag(
    redis_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = redis_pair
    dbs = await start(primary, fallback)
    events: list[Event] = []
    dbs.events.subscribe(events.append)
    fraw = raw(fallback)
    try:
        await streaming(dbs)
        writer = Writer(dbs).start()
        await asyncio.sleep(1.0)
        await writer.acknowledged(200)
        lag_before = warm(dbs)["lag_s"]
        assert lag_before is not None and lag_before < 1.0, warm(dbs)
        # Mirrored writes are not captured as writes made on the fallback.
        assert await fraw.scard("failover:dirty") == 0
        killed, status, rpo = await STORE.outage_under(dbs, primary, writer, events)
        await wait_for(lambda: warm(dbs)["state"] == "off", 5, "warm sync stopped")
        horizon = killed - rpo - status["heartbeat_interval_s"] - 0.05
        expected = writer.expected_before(horizon)
        assert len(expected) > 50, "the writer made too few writes before the kill"
        # Through failover (the fallback serves now) and with the raw driver.
        served = await values(fraw, list(expected))
        assert missing(expected, served) == []
        assert await dbs.redis.get(next(k for k, v in expected.items() if isinstance(v, bytes))) is not None
        print(f"lag before {lag_before}s, rpo {rpo}s; {len(expected)} keys checked; warm {status}")
    finally:
        await fraw.aclose()
        await dbs.close()


async def test_initial_copy_of_a_non_empty_primary_reports_progress_while_the_application_works(
    redis_pair: tuple[LocalServer, LocalServer], caplog: pytest.LogCaptureFixture
) -> None:
    primary, fallback = redis_pair
    praw, fraw = raw(primary), raw(fallback)
    try:
        for start_at in range(0, 60_000, 5000):
            async with praw.pipeline(transaction=False) as pipe:
                for i in range(start_at, start_at + 5000):
                    pipe.set(f"s:{i}", f"value {i}")
                    if i % 10 == 0:
                        pipe.hset(f"h:{i}", mapping={"a": i, "b": "x"})
                        pipe.sadd(f"set:{i}", i, i + 1)
                    if i % 100 == 0:
                        pipe.zadd(f"z:{i}", {"m1": 1.5, "m2": 2.25})
                        pipe.rpush(f"l:{i}", *range(5))
                        pipe.xadd(f"x:{i}", {"f": "v"})
                    if i % 1000 == 0:
                        pipe.set(f"ttl:{i}", "expiring", ex=600)
                await pipe.execute()
        await praw.rpush("big:list", *range(5000))  # copied in chunks
        await praw.sadd("big:set", *range(3000))
        # The fallback holds old versions and a key the primary no longer has.
        await fraw.set("s:1", "stale")
        await fraw.hset("h:10", "c", "stale")
        await fraw.set("gone", "deleted on the primary long ago")
        caplog.set_level("INFO", logger="failover")
        dbs = await start(primary, fallback)
        try:
            seen, writes = await STORE.copy_while_writing(dbs, lambda i: dbs.redis.set(f"app:{i}", i), 120, pause=0.01)
            assert seen, "no copy progress was ever reported"
            last = seen[-1]
            assert last["rows_total"] and last["rows_total"] >= 60_000, last
            assert 0 < last["rows_done"] <= last["rows_total"], last
            assert any(c["rate_per_s"] for c in seen), seen
            assert writes > 0
            assert any("initial copy into" in r.getMessage() for r in caplog.records)
            await wait_for(lambda: (warm(dbs)["lag_s"] or 9) < 1, 10, "caught up")
            # Converged: the application's last writes may still be in the mirror's queue.
            deadline = time.monotonic() + 10
            while True:
                ours, theirs = await dumps(fraw), await dumps(praw)
                differ = [k for k in theirs if ours.get(k) != theirs[k]][:10]
                extra = [k for k in ours if k not in theirs][:10]
                if (not differ and not extra) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert len(theirs) > 73_000
            detail = {
                "fallback": {k: ours.get(k) for k in differ + extra},
                "primary": {k: theirs.get(k) for k in differ + extra},
                "dirty on the fallback": [k for k in differ + extra if await fraw.sismember("failover:dirty", k)],
                "warm": warm(dbs),
                "counters": dbs.status()["redis"].get("counters"),
            }
            assert differ == [], detail
            assert extra == [], detail
            assert await fraw.scard("failover:dirty") == 0, "copied keys were captured as fallback writes"
            assert warm(dbs)["mechanism"].startswith("mirror")
        finally:
            await dbs.close()
    finally:
        await praw.aclose()
        await fraw.aclose()


async def test_keys_written_by_other_clients_arrive_with_the_resync_and_an_overflow_is_counted(
    redis_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = redis_pair
    praw, fraw = raw(primary), raw(fallback)
    dbs = await start(primary, fallback)
    sync = dbs.store("redis").warm.sync  # type: ignore[union-attr]
    try:
        await streaming(dbs)
        await praw.set("other:client", "not through the library")
        await praw.hset("other:hash", mapping={"a": "1"})
        await asyncio.sleep(0.3)
        assert await fraw.get("other:client") is None  # not mirrored: written by someone else
        sync.resync_interval = 0.2  # the re-sync finds it (the default waits a minute)
        sync._resync_now.set()
        await wait_for(lambda: warm(dbs)["resync_copied_keys"] >= 2, 10, "re-sync copied the other client's keys")
        assert await fraw.get("other:client") == b"not through the library"
        sync.resync_interval = 3600
        await praw.delete("other:client")
        sync._resync_now.set()
        await wait_for(lambda: warm(dbs)["resync_deleted_keys"] >= 1, 10, "re-sync deleted the key")
        assert await fraw.get("other:client") is None
        # A full queue drops commands (never blocks) and counts them; the re-sync covers them.
        sync.queue_size = 1
        await asyncio.gather(*(dbs.redis.set(f"burst:{i}", i) for i in range(300)))
        sync.queue_size = 100_000
        assert warm(dbs)["queue_overflows"] > 0
        deadline = time.monotonic() + 10
        while await fraw.mget([f"burst:{i}" for i in range(300)]) != [str(i).encode() for i in range(300)]:
            assert time.monotonic() < deadline, f"the re-sync did not cover the dropped commands: {warm(dbs)}"
            await asyncio.sleep(0.05)
    finally:
        await dbs.close()
        await praw.aclose()
        await fraw.aclose()


async def test_outage_reconcile_failback_and_a_second_outage_keep_every_acknowledged_write(
    pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = pair
    praw = raw(primary)
    for start_at in range(0, 2000, 500):
        await praw.mset({f"seed:{i}": f"seed {i}" for i in range(start_at, start_at + 500)})
    dbs = await start(primary, fallback)
    fraw = raw(fallback)
    try:
        await streaming(dbs)
        writer = Writer(dbs).start()
        await asyncio.sleep(0.8)

        await outage(dbs, primary)
        await wait_for(lambda: warm(dbs)["state"] == "off", 5, "warm sync stopped")
        await asyncio.sleep(1.0)
        assert await fraw.scard("failover:dirty") > 0, "no write landed on the fallback during the outage"

        await failback(dbs, primary)
        await wait_for(lambda: warm(dbs)["state"] == "streaming" and (warm(dbs)["lag_s"] or 9) < 1, 15, "caught up")
        assert warm(dbs)["copy"] is None, "failback started a new initial copy"

        # Second outage: the fallback serves the data the primary had when it died.
        lag = warm(dbs)["lag_s"]
        killed = await outage(dbs, primary)
        rpo = warm(dbs)["rpo_at_last_failover_s"]
        assert rpo is not None and rpo < 1.0, warm(dbs)
        horizon = killed - max(rpo, lag) - warm(dbs)["heartbeat_interval_s"] - 0.05
        async with writer.lock:  # no write in flight whose record is not written yet
            expected = writer.expected_before(horizon)
            served = await values(fraw, list(expected))
        assert missing(expected, served) == [], "the fallback lacks writes made before the second outage"
        assert (await fraw.get("seed:1999")) == b"seed 1999"
        await asyncio.sleep(0.8)
        await failback(dbs, primary)
        await writer.stop()
        assert not writer.errors, writer.errors[:3]

        # Every acknowledged write is on the primary (raw driver), and the fallback converges to it.
        everything = writer.expected_before(time.monotonic() + 1)
        assert missing(everything, await values(praw, list(everything))) == []
        await wait_for(lambda: (warm(dbs)["lag_s"] or 9) < 1, 15, "caught up after the second failback")
        theirs = await dumps(praw)

        async def equal() -> bool:
            return await dumps(fraw) == theirs

        deadline = time.monotonic() + 10
        while not await equal():
            assert time.monotonic() < deadline, "fallback not equal to the primary"
            await asyncio.sleep(0.1)
    finally:
        await dbs.close()
        await praw.aclose()
        await fraw.aclose()


async def test_warm_off_leaves_the_fallback_cold(redis_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = redis_pair
    fraw = raw(fallback)
    dbs = await start(primary, fallback, FAILOVER_WARM="off")
    try:
        assert dbs.redis.mirror is None
        await dbs.redis.set("primary-only", "1")
        await asyncio.sleep(1.0)
        assert warm(dbs) == {"enabled": False, "state": "off", "lag_s": None}
        assert await fraw.dbsize() == 0
    finally:
        await dbs.close()
        await fraw.aclose()
