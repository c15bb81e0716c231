"""Redis reconcile on real servers: every write acknowledged by the fallback is on the primary
after failback, read back with the raw driver."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import WatchError

from failover import Databases, SwitchState, TransactionRolledBack
from failover.core.endpoint import Role
from failover.local import LocalServer
from failover.stores.redis.capture import DIRTY, RedisCapture

from ..helpers import Traffic, fast_settings, wait_for
from .continuity import Continuity, OwnedKeyWriters, across_an_outage, missing

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def raw(server: LocalServer) -> aioredis.Redis:
    """A plain redis-py client (no failover), to check where data landed; it reconnects once
    after the server was restarted."""
    return aioredis.Redis.from_url(server.url, retry=Retry(NoBackoff(), 1), socket_timeout=10)


def state(dbs: Databases) -> SwitchState:
    return dbs.store("redis").state


async def databases(primary: LocalServer, fallback: LocalServer, **overrides: Any) -> Databases:
    dbs = Databases(fast_settings(UPSTASH_REDIS_URL=primary.url, REDIS_URL=fallback.url, **overrides))
    await dbs.start()
    return dbs


@pytest.fixture
def pair(make_server: Callable[..., LocalServer]) -> tuple[LocalServer, LocalServer]:
    """A primary that keeps its data across a kill (AOF), and a plain fallback."""
    return make_server("redis", persistent=True), make_server("redis")


async def outage(dbs: Databases, primary: LocalServer) -> None:
    primary.kill()
    await wait_for(lambda: state(dbs) is SwitchState.ON_FALLBACK, 10, "failover to the fallback")


async def failback(dbs: Databases, primary: LocalServer, timeout: float = 30) -> None:
    primary.start()
    await wait_for(lambda: state(dbs) is SwitchState.ON_PRIMARY, timeout, "failback to the primary")


async def dump(client: aioredis.Redis, keys: list[bytes]) -> dict[bytes, Any]:
    """Each key's type, value (order-free where Redis is) and whether it has a TTL."""
    out: dict[bytes, Any] = {}
    for key in keys:
        kind = (await client.type(key)).decode()
        if kind == "none":
            out[key] = None
            continue
        if kind == "string":
            value: Any = await client.get(key)
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(await client.smembers(key))
        elif kind == "hash":
            value = await client.hgetall(key)
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = (await client.xrange(key), sorted(g["name"] for g in await client.xinfo_groups(key)))
        else:
            value = kind
        out[key] = (kind, value, await client.pttl(key) >= 0)
    return out


async def user_keys(client: aioredis.Redis) -> list[bytes]:
    return sorted([k async for k in client.scan_iter(count=1000) if not k.startswith(b"failover:")])


async def test_every_kind_of_outage_write_is_on_the_primary_after_failback(pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pair
    p, f = raw(primary), raw(fallback)
    await p.mset({"gone": "primary", "gone2": "primary", "expire-me": "x", "kept": "untouched"})
    dbs = await databases(primary, fallback)
    r = dbs.redis
    try:
        await outage(dbs, primary)
        # strings, counters, TTLs
        assert await r.set("s", "v", ex=300)
        assert await r.execute_command("SETEX", "setex", 300, "v")
        assert await r.psetex("psetex", 300000, "v")
        assert await r.incr("counter") == 1 and await r.incrby("counter", 4) == 5
        assert await r.incrbyfloat("float", 1.5) == 1.5
        assert await r.append("appended", "ab") == 2 and await r.append("appended", "cd") == 4
        assert await r.setrange("ranged", 3, "x") == 4
        assert await r.setbit("bits", 7, 1) == 0
        await r.set("getdel", "x")
        assert await r.getdel("getdel") == b"x"
        assert await r.mset({"m1": "1", "m2": "2", "m3": "3"})
        assert await r.msetnx({"nx1": "1", "nx2": "2"})
        assert await r.bitop("OR", "bitop", "bits", "ranged") == 4
        await r.set("expire-me", "y")
        assert await r.expire("expire-me", 300)
        await r.set("persisted", "p", ex=300)
        assert await r.persist("persisted")
        assert await r.delete("gone", "gone2") == 0  # the cold fallback never had them: deleted on the primary anyway
        # hashes
        assert await r.hset("h", mapping={"a": "1", "b": "2", "c": "3"}) == 3
        assert await r.hincrby("h", "a", 10) == 11
        assert await r.hdel("h", "c") == 1
        # lists
        assert await r.rpush("l", "a", "b", "c") == 3
        assert await r.lpush("l", "z") == 4
        assert await r.linsert("l", "AFTER", "a", "a2") == 5
        assert await r.lset("l", 0, "first")
        assert await r.rpop("l") == b"c"
        assert await r.rpush("src", "1", "2", "3") == 3
        assert await r.lmove("src", "dst", "LEFT", "RIGHT") == b"1"
        assert await r.rpoplpush("src", "dst") == b"3"
        assert await r.blpop(["src"], timeout=1) == (b"src", b"2")  # src is empty now: deleted
        # sets
        assert await r.sadd("set1", "a", "b", "c") == 3
        assert await r.sadd("set2", "b", "c", "d") == 3
        assert await r.srem("set1", "a") == 1
        assert await r.smove("set2", "set1", "d")
        assert await r.sunionstore("sunion", ["set1", "set2"]) == 3
        assert await r.sinterstore("sinter", ["set1", "set2"]) == 2
        assert await r.sdiffstore("sdiff", ["set1", "set2"]) == 1
        # sorted sets
        assert await r.zadd("z1", {"a": 1, "b": 2.5, "c": 0.1}) == 3
        assert await r.zincrby("z1", 1, "a") == 2
        assert await r.zadd("z2", {"b": 1, "x": 7}) == 2
        assert await r.zrem("z2", "x") == 1
        assert await r.zunionstore("zunion", ["z1", "z2"]) == 3
        assert await r.zinterstore("zinter", ["z1", "z2"]) == 1
        assert await r.zdiffstore("zdiff", ["z1", "z2"]) == 2
        # streams, geo, hyperloglog
        first = await r.xadd("stream", {"f": "1"})
        await r.xadd("stream", {"f": "2", "g": "x"})
        await r.xadd("stream", {"f": "3"})
        assert await r.xdel("stream", first) == 1
        assert await r.xgroup_create("stream", "workers", id="0")
        assert await r.geoadd("geo", (13.361389, 38.115556, "Palermo")) == 1
        assert await r.pfadd("hll1", "a", "b") == 1 and await r.pfadd("hll2", "c") == 1
        assert await r.pfmerge("hll", "hll1", "hll2")
        # keys
        await r.set("old", "renamed")
        assert await r.rename("old", "new")
        await r.set("old2", "renamed2")
        assert await r.renamenx("old2", "new2")
        assert await r.copy("new", "copied")
        assert await r.rpush("tosort", 3, 1, 2) == 3
        assert await r.sort("tosort", store="sorted") == 3
        assert await r.unlink("tosort") == 1
        assert await r.eval("redis.call('SET', KEYS[1], ARGV[1]); return 1", 1, "scripted", "lua") == 1
        # a pipeline, a MULTI/EXEC pipeline, a watched transaction
        async with r.pipeline(transaction=False) as pipe:
            pipe.set("pipe1", "a").rpush("pipe2", "x", "y").incr("pipe3")
            assert await pipe.execute() == [True, 2, 1]
        async with r.pipeline(transaction=True) as pipe:
            pipe.set("tx1", "a").hset("tx2", "k", "v").delete("pipe1")
            assert await pipe.execute() == [True, 1, 1]
        async with r.pipeline(transaction=True) as pipe:
            await pipe.watch("watched")
            assert await pipe.get("watched") is None
            pipe.multi()
            pipe.set("watched", "w")
            assert await pipe.execute() == [True]
        expected = await dump(f, await user_keys(f))
        await failback(dbs, primary)
        got = await dump(p, sorted(expected))
        assert got == expected  # every key, every element, TTL or not
        for key in (b"gone", b"gone2", b"getdel", b"pipe1", b"tosort", b"old", b"old2", b"src"):
            assert await p.exists(key) == 0, key
        assert await p.get("kept") == b"untouched"
        assert await p.get("s") == b"v" and 0 < await p.pttl("s") <= 300000
        assert await p.ttl("expire-me") > 200 and await p.ttl("persisted") == -1
        assert await p.hgetall("h") == {b"a": b"11", b"b": b"2"}
        assert await p.lrange("l", 0, -1) == [b"first", b"a", b"a2", b"b"]
        assert await p.lrange("dst", 0, -1) == [b"3", b"1"]  # RPOPLPUSH pushes at the head
        assert await p.zrange("z1", 0, -1, withscores=True) == [(b"c", 0.1), (b"a", 2.0), (b"b", 2.5)]
        assert [e[1] for e in await p.xrange("stream")] == [{b"f": b"2", b"g": b"x"}, {b"f": b"3"}]
        assert await p.pfcount("hll") == 3
        assert await p.get("new") == b"renamed" and await p.get("copied") == b"renamed"
        assert await p.lrange("sorted", 0, -1) == [b"1", b"2", b"3"]
        assert await p.get("counter") == b"5" and await p.get("scripted") == b"lua"
        assert await p.get("watched") == b"w" and await p.hget("tx2", "k") == b"v"
        assert [k async for k in p.scan_iter("failover:*") if not k.startswith(b"failover:warm:hb:")] == []  # nothing of the library's on the primary
        assert await f.scard("failover:dirty") == 0
        reconcile = dbs.status()["redis"]["reconcile"]
        assert reconcile["backlog"] == 0 and reconcile["applied"] >= len(expected)
        assert reconcile["last_run"]["result"] == "completed"
    finally:
        await dbs.close()
        await p.aclose()
        await f.aclose()


async def test_writes_under_traffic_through_a_kill_all_reach_the_primary(pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pair
    dbs = await databases(primary, fallback)
    acknowledged: dict[str, int] = {}
    increments = 0

    async def write(i: int) -> None:
        nonlocal increments
        if i % 4 == 0:
            await dbs.redis.incr("hits")
            increments += 1
        else:
            await dbs.redis.set(f"k:{i}", i)
            acknowledged[f"k:{i}"] = i

    traffic = Traffic(write, workers=4, pause=0.002).start()
    p = raw(primary)
    try:
        await wait_for(lambda: len(acknowledged) > 100, 10, "traffic on the primary")
        await outage(dbs, primary)
        outage_started = len(acknowledged)
        await wait_for(lambda: len(acknowledged) > outage_started + 200, 10, "traffic on the fallback")
        primary.start()
        await wait_for(lambda: state(dbs) is SwitchState.ON_PRIMARY, 30, "failback")
        after = len(acknowledged)
        await wait_for(lambda: len(acknowledged) > after + 100, 10, "traffic after failback")
        await traffic.stop()
        values = await p.mget(list(acknowledged))
        missing = [k for k, v in zip(acknowledged, values) if v is None or int(v) != acknowledged[k]]
        assert missing == [], f"{len(missing)} acknowledged writes are not on the primary"
        run = dbs.status()["redis"]["reconcile"]["last_run"]
        assert run["result"] == "completed" and run["hold_s"] is not None and run["hold_s"] < 2
    finally:
        await traffic.stop()
        await dbs.close()
        await p.aclose()


async def _conflict_setup(pair: tuple[LocalServer, LocalServer], policy: str) -> tuple[Databases, aioredis.Redis, aioredis.Redis]:
    """Keys both servers hold (a warm fallback), changed on the fallback during an outage and
    some of them on the primary too before failback."""
    primary, fallback = pair
    p, f = raw(primary), raw(fallback)
    for client in (p, f):
        await client.mset({"both": "orig", "mine": "orig", "count": "10", "stale": "same"})
        await client.hset("doc-old", mapping={"v": "orig", "updated_at": "1000"})
        await client.hset("doc-new", mapping={"v": "orig", "updated_at": "1000"})
    await p.set("stale", "newer on the primary")  # the fallback's copy is stale
    dbs = await databases(primary, fallback, FAILOVER_CONFLICT_POLICY=policy, FAILOVER_FAILBACK_DELAY=2.0)
    await outage(dbs, primary)
    r = dbs.redis
    await r.set("both", "fallback")
    await r.set("mine", "fallback")
    await r.incr("count")
    await r.incr("count")
    assert await r.set("stale", "ignored", nx=True) is None  # changes nothing on the fallback
    await r.hset("doc-old", "v", "fallback")
    await r.hset("doc-new", "v", "fallback")
    primary.start()
    await p.set("both", "primary")  # another process (already failed back) wrote it meanwhile
    await p.incr("count")
    await p.hset("doc-old", mapping={"v": "primary", "updated_at": "1001"})  # long before our change
    await p.hset("doc-new", mapping={"v": "primary", "updated_at": str(time.time() + 3600)})  # after it
    await wait_for(lambda: state(dbs) is SwitchState.ON_PRIMARY, 30, "failback")
    return dbs, p, f


@pytest.mark.parametrize("policy", ["fallback_wins", "primary_wins", "newest_wins"])
async def test_conflict_policies(pair: tuple[LocalServer, LocalServer], policy: str) -> None:
    dbs, p, f = await _conflict_setup(pair, policy)
    try:
        assert await p.get("mine") == b"fallback"  # changed on the fallback only: no conflict
        assert await p.get("stale") == b"newer on the primary"  # the fallback changed nothing: nothing copied
        conflicts = {c["key"]: c for c in await dbs.conflicts("redis")}
        assert set(conflicts) == {"both", "count", "doc-old", "doc-new"}
        expected = {
            "fallback_wins": {"both": b"fallback", "count": b"12", "doc-old": b"fallback", "doc-new": b"fallback"},
            "primary_wins": {"both": b"primary", "count": b"11", "doc-old": b"primary", "doc-new": b"primary"},
            # strings carry no timestamp: the fallback's wins; hashes compare updated_at
            "newest_wins": {"both": b"fallback", "count": b"12", "doc-old": b"fallback", "doc-new": b"primary"},
        }[policy]
        assert await p.get("both") == expected["both"]
        assert await p.get("count") == expected["count"]
        assert await p.hget("doc-old", "v") == expected["doc-old"]
        assert await p.hget("doc-new", "v") == expected["doc-new"]
        for key, value in expected.items():
            kept = "fallback_kept" if value in (b"fallback", b"12") else "primary_kept"
            assert conflicts[key]["resolution"] == kept, key
            assert conflicts[key]["store"] == "redis" and conflicts[key]["detail"]
        assert conflicts["both"]["primary"] == "primary" and conflicts["both"]["fallback"] == "fallback"
        assert dbs.status()["redis"]["reconcile"]["conflicts"] == 4
        assert await f.llen("failover:conflicts") == 4  # durable, on the fallback
    finally:
        await dbs.close()
        await p.aclose()
        await f.aclose()


async def test_a_big_key_is_copied_in_chunks_and_swapped_in_whole(pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pair
    p, f = raw(primary), raw(fallback)
    await p.hset("big", mapping={"old": "primary"})
    dbs = await databases(primary, fallback, FAILOVER_OPERATION_TIMEOUT=10.0)
    try:
        await outage(dbs, primary)
        fields = {f"field:{i}": f"value:{i}" for i in range(200_000)}
        items = list(fields.items())
        for start in range(0, len(items), 5000):
            async with dbs.redis.pipeline(transaction=False) as pipe:
                pipe.hset("big", mapping=dict(items[start : start + 5000]))
                await pipe.execute()
        await dbs.redis.expire("big", 3600)
        await dbs.redis.rpush("biglist", *range(30_000))
        expected = {k.encode(): v.encode() for k, v in fields.items()}
        assert await f.hlen("big") == 200_000
        primary.start()
        # While it copies, the primary never shows a half-written hash.
        sizes: set[int] = set()
        deadline = time.monotonic() + 60
        while state(dbs) is not SwitchState.ON_PRIMARY:
            assert time.monotonic() < deadline, "no failback within 60 s"
            size = await _hlen(p)
            if size is not None:
                sizes.add(size)
            await asyncio.sleep(0.005)
        assert sizes <= {1, 200_000}, sorted(sizes)[:10]
        await dbs.close()  # reading 200k fields back stalls this event loop: no probes meanwhile
        assert await p.hgetall("big") == expected
        assert 3500 < await p.ttl("big") <= 3600
        assert await p.lrange("biglist", 0, -1) == [str(i).encode() for i in range(30_000)]
        assert [k async for k in p.scan_iter("failover:*") if not k.startswith(b"failover:warm:hb:")] == []
    finally:
        await dbs.close()
        await p.aclose()
        await f.aclose()


async def _hlen(client: aioredis.Redis) -> int | None:
    try:
        return int(await client.hlen("big"))
    except Exception:
        return None  # the primary is still starting


async def test_the_lua_digest_and_the_python_digest_agree(make_server: Callable[..., LocalServer]) -> None:
    server = make_server("redis")
    client = raw(server)
    capture = RedisCapture()
    endpoint = _endpoint(server)
    try:
        await client.set("string", b"\x00\xffbytes")
        await client.rpush("list", "a", "b", "a")
        await client.sadd("set", *[f"m{i}" for i in range(300)])
        await client.hset("hash", mapping={f"f{i}": i for i in range(300)})
        await client.zadd("zset", {"a": 0.1, "b": 1e20, "c": -3, "d": float("inf")})
        await client.xadd("stream", {"f": "v", "g": "w"})
        await client.xadd("stream", {"x": "y"})
        keys = [b"string", b"list", b"set", b"hash", b"zset", b"stream", b"absent"]
        snapshots, _now = await capture._snapshot(capture._client(endpoint), keys)
        views = await capture._primary_views(capture._client(endpoint), snapshots)
        for snap in snapshots:
            assert snap.image == views[snap.key].image, snap.key
            assert snap.image.exact, snap.key
    finally:
        await capture.close()
        await client.aclose()


def _endpoint(server: LocalServer) -> Any:
    from failover.core.endpoint import Endpoint

    return Endpoint("redis", Role.PRIMARY, "test", server.url)


async def test_two_instances_share_the_pair_and_strand_nothing(pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pair
    first = await databases(primary, fallback)
    second = await databases(primary, fallback, FAILOVER_FAILBACK_DELAY=3.0)  # fails back later
    acknowledged: dict[str, str] = {}

    def writer(dbs: Databases, name: str) -> Callable[[int], Any]:
        async def write(i: int) -> None:
            await dbs.redis.set(f"{name}:{i}", i)
            acknowledged[f"{name}:{i}"] = str(i)

        return write

    traffic = [Traffic(writer(first, "a"), workers=2).start(), Traffic(writer(second, "b"), workers=2).start()]
    p = raw(primary)
    try:
        await wait_for(lambda: len(acknowledged) > 50, 10, "traffic")
        primary.kill()
        await wait_for(
            lambda: state(first) is SwitchState.ON_FALLBACK and state(second) is SwitchState.ON_FALLBACK, 10, "failover"
        )
        count = len(acknowledged)
        await wait_for(lambda: len(acknowledged) > count + 200, 10, "writes on the fallback")
        primary.start()
        await wait_for(lambda: state(first) is SwitchState.ON_PRIMARY, 30, "first failback")
        # The second still writes to the fallback here; the first sweeps those writes too.
        count = len(acknowledged)
        await wait_for(lambda: len(acknowledged) > count + 100, 10, "writes while split")
        await wait_for(lambda: state(second) is SwitchState.ON_PRIMARY, 30, "second failback")
        for t in traffic:
            await t.stop()
        # A sweep may still be copying the last writes of the split: wait for an empty backlog.
        f = raw(fallback)
        try:
            await _drained(first, f)
        finally:
            await f.aclose()
        values = await p.mget(list(acknowledged))
        missing = [k for k, v in zip(acknowledged, values) if v is None or v.decode() != acknowledged[k]]
        assert missing == [], f"{len(missing)} of {len(acknowledged)} acknowledged writes are not on the primary"
    finally:
        for t in traffic:
            await t.stop()
        await first.close()
        await second.close()
        await p.aclose()


async def _drained(dbs: Databases, fallback: aioredis.Redis, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while await fallback.scard("failover:dirty"):
        assert time.monotonic() < deadline, "the backlog on the fallback was not drained"
        await dbs.store("redis").probe_round()
        await asyncio.sleep(0.05)


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from failover import Databases, Settings
    from failover.core.endpoint import Role

    async def main():
        settings = Settings(_env_file=None, UPSTASH_REDIS_URL=sys.argv[1], REDIS_URL=sys.argv[2],
                            HEALTH_CHECK_INTERVAL=0.2, FAILOVER_PROBE_TIMEOUT=0.5, FAILOVER_CONNECT_TIMEOUT=0.5,
                            FAILOVER_UNHEALTHY_THRESHOLD=2, FAILOVER_HEALTHY_THRESHOLD=2,
                            FAILOVER_FAILBACK_DELAY=0.5, FAILOVER_RECONCILE_BATCH=50)
        dbs = Databases(settings)
        await dbs.start()
        dbs.store("redis").reconciler.capture.lock_ttl_ms = 1500
        n = int(sys.argv[3])
        for start in range(0, n, 1000):
            async with dbs.redis.pipeline(transaction=False) as pipe:
                for i in range(start, min(n, start + 1000)):
                    pipe.set(f"key:{i}", i)
                await pipe.execute()
        print("written", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_killed_mid_reconcile_another_instance_finishes(pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pair
    primary.kill()
    count = 30_000
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, primary.url, fallback.url, str(count)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    p = f = None
    dbs = None
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30)
        assert line.strip() == b"written"
        f = raw(fallback)
        assert await f.scard("failover:dirty") == count
        primary.start()
        p = raw(primary)
        deadline = time.monotonic() + 30
        while await f.scard("failover:dirty") > count - 200:
            assert time.monotonic() < deadline, "the child never started to reconcile"
            await asyncio.sleep(0.002)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        left = await f.scard("failover:dirty")
        assert 0 < left < count, "the kill did not land mid-reconcile"
        dbs = await databases(primary, fallback)  # starts RECONCILING: a backlog waits
        await wait_for(lambda: state(dbs) is SwitchState.ON_PRIMARY, 30, "the second instance's failback")
        values = await p.mget([f"key:{i}" for i in range(count)])
        assert [int(v) if v is not None else None for v in values] == list(range(count))
        assert await f.scard("failover:dirty") == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if dbs is not None:
            await dbs.close()
        for client in (p, f):
            if client is not None:
                await client.aclose()


async def test_blocking_pop_on_the_fallback_waits_for_a_push(pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pair
    dbs = await databases(primary, fallback)
    f = raw(fallback)
    try:
        await outage(dbs, primary)
        started = time.monotonic()
        assert await dbs.redis.blpop(["queue"], timeout=0.3) is None
        assert time.monotonic() - started >= 0.3
        waiter = asyncio.create_task(dbs.redis.blpop(["queue"], timeout=5))
        await asyncio.sleep(0.1)  # let it wait a little: the pop must not have returned yet
        assert not waiter.done()
        await dbs.redis.rpush("queue", "job")
        assert await asyncio.wait_for(waiter, 5) == (b"queue", b"job")
        assert await f.exists("queue") == 0
        assert await f.sismember("failover:dirty", "queue")
    finally:
        await dbs.close()
        await f.aclose()


async def test_flushdb_is_refused_on_the_fallback(pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pair
    dbs = await databases(primary, fallback)
    try:
        await outage(dbs, primary)
        await dbs.redis.set("k", "v")
        with pytest.raises(Exception, match="FAILOVER_RECONCILE=false"):
            await dbs.redis.flushdb()
        f = raw(fallback)
        try:
            assert await f.get("k") == b"v"
        finally:
            await f.aclose()
    finally:
        await dbs.close()


async def test_reconcile_off_keeps_todays_behaviour(pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pair
    dbs = await databases(primary, fallback, FAILOVER_RECONCILE=False, FAILOVER_WARM="off")  # warm sync would overwrite it
    p, f = raw(primary), raw(fallback)
    try:
        assert dbs.status()["redis"]["reconcile"] == {"enabled": False}
        assert dbs.redis.capture is None
        await outage(dbs, primary)
        await dbs.redis.set("lost", "v")
        await failback(dbs, primary)
        assert await p.get("lost") is None  # stranded on the fallback, as documented
        assert await f.get("lost") == b"v"
        assert [k async for k in f.scan_iter("failover:*")] == []
    finally:
        await dbs.close()
        await p.aclose()
        await f.aclose()


async def test_watched_transactions_lose_no_acknowledged_write_across_an_outage_and_failback(
    pair: tuple[LocalServer, LocalServer],
) -> None:
    """8 writers, each the only one to write its key, with WATCH ... MULTI/EXEC pipelines that stay
    bound ~150 ms (a read-modify-write's work): kill the primary, write on the fallback, restart it.
    A pipeline bound to the fallback across the final catch-up would EXEC there after failback,
    and the sweep would later copy that write over the key's newer ones on the primary."""
    primary, fallback = pair
    dbs = await databases(primary, fallback, FAILOVER_OPERATION_TIMEOUT=5)  # above the hold (2 s)

    async def write(key: bytes, n: int) -> bytes:
        async with dbs.redis.pipeline() as pipe:
            await pipe.watch(key)
            await asyncio.sleep(0.15)  # bound to its endpoint longer than a final catch-up takes
            pipe.multi()
            pipe.set(key, n)
            await pipe.execute()
        return str(n).encode()

    keys = [f"watched:{w}".encode() for w in range(8)]
    writers = OwnedKeyWriters(keys, write, not_applied=(TransactionRolledBack, WatchError))
    try:
        expected = await across_an_outage(Continuity("redis"), dbs, primary, writers)
        assert dbs.store("redis").admission.inflight == 0  # every bound pipeline counted out
        on_fallback = raw(fallback)
        try:  # nor one waiting for a sweep
            assert not await on_fallback.exists(DIRTY)
        finally:
            await on_fallback.aclose()
        client = raw(primary)
        try:
            on_primary = {k: await client.get(k) for k in keys}
        finally:
            await client.aclose()
        wrong = missing(expected, on_primary)
        assert not wrong, f"(key, acknowledged, on the primary): {wrong}"
    finally:
        await dbs.close()


async def test_a_watched_pipeline_counts_as_in_flight_until_reset_or_dropped(pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = pair
    dbs = await databases(primary, fallback)
    admission = dbs.store("redis").admission
    try:
        async with dbs.redis.pipeline() as pipe:
            assert admission.inflight == 0
            await pipe.watch("k")
            assert admission.inflight == 1
            async with admission.hold():  # a final catch-up waits for it...
                idle = asyncio.create_task(admission.idle())
                done, _ = await asyncio.wait({idle}, timeout=0.3)
                assert not done
                pipe.multi()
                pipe.set("k", 1)
                await pipe.execute()  # ...until it ends
                await asyncio.wait_for(idle, 5)
            assert admission.inflight == 0
        dropped = dbs.redis.pipeline()
        await dropped.watch("k")
        assert admission.inflight == 1
        del dropped  # never reset: counted out when collected
        gc.collect()
        assert admission.inflight == 0
    finally:
        await dbs.close()
