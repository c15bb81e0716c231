"""redis-py's wider surface on dbs.redis, on real servers: locks, pub/sub and blocking commands
across a SIGKILL of the primary, and two PyPI libraries handed dbs.redis as their client."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.exceptions import LockError

from failover import Databases, NotRoutable, SwitchState
from failover.local import LocalServer
from failover.stores.redis import LockLostInFailover
from failover.stores.redis import GAP_MESSAGE_TYPE, SubscriptionsMoved

from ..helpers import wait_for
from .test_redis_failover import databases, raw, state

pytestmark = pytest.mark.integration


async def on_fallback(dbs: Databases, timeout: float = 10.0) -> None:
    async def nudge() -> None:
        # Live traffic notices the crash sooner than the probes; errors here do not matter.
        try:
            await dbs.redis.ping()
        except Exception:
            pass

    deadline = time.monotonic() + timeout
    while state(dbs) is not SwitchState.ON_FALLBACK:
        assert time.monotonic() < deadline, f"still {state(dbs)} after {timeout:g}s"
        await nudge()
        await asyncio.sleep(0.02)


# --- locks ---------------------------------------------------------------------------------


async def test_a_lock_held_when_the_primary_dies_is_lost_and_new_locks_go_to_the_fallback(
    redis_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = redis_pair
    dbs = await databases(primary, fallback)
    try:
        held = dbs.redis.lock("job", timeout=30)
        kept = dbs.redis.lock("report", timeout=30)
        assert await held.acquire(blocking=False)
        assert await kept.acquire(blocking=False)
        assert await held.owned() is True
        assert await raw(primary, "EXISTS", "job") == 1
        assert await dbs.redis.lock("job", timeout=30).acquire(blocking=False) is False  # really exclusive

        primary.kill()
        await on_fallback(dbs)

        with pytest.raises(LockLostInFailover, match="'job'.*switched.*failover") as lost:
            await held.owned()
        assert isinstance(lost.value, LockError)
        with pytest.raises(LockError):
            await held.release()  # already forgotten
        with pytest.raises(LockLostInFailover, match="cannot extend the lock 'report'"):
            await kept.extend(10)

        # New acquisitions run on the fallback, and are exclusive there.
        async with dbs.redis.lock("job", timeout=30, blocking_timeout=2) as fresh:
            assert await fresh.owned() is True
            assert await raw(fallback, "EXISTS", "job") == 1
            assert await dbs.redis.lock("job", timeout=30).acquire(blocking=False) is False
        assert await raw(fallback, "EXISTS", "job") == 0
    finally:
        await dbs.close()


async def test_lock_class_and_signature_are_redis_pys(redis_pair: tuple[LocalServer, LocalServer]) -> None:
    from redis.asyncio.lock import Lock

    acquired: list[bool] = []

    class Audited(Lock):
        async def do_acquire(self, token: Any) -> bool:
            ok = await super().do_acquire(token)
            acquired.append(ok)
            return ok

    dbs = await databases(*redis_pair)
    try:
        lock = dbs.redis.lock("x", timeout=5, lock_class=Audited)
        assert isinstance(lock, Audited) and isinstance(lock, Lock)
        async with lock:
            assert await lock.locked()
        assert acquired == [True]
    finally:
        await dbs.close()


# --- pub/sub -------------------------------------------------------------------------------


async def next_message(pubsub: Any, kinds: set[str], timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if message is not None and message["type"] in kinds:
            return message  # type: ignore[no-any-return]
    raise AssertionError(f"no {kinds} message within {timeout:g}s")


async def subscribed_on_server(dbs: Databases, channel: str, patterns: int) -> None:
    """Wait (≤ 10 s) until the server counts a subscriber of *channel* and *patterns* patterns.

    redis-py's ``subscribe()`` returns once SUBSCRIBE is sent, not once the server took it: a
    PUBLISH on another connection right after can reach the server first (0 receivers; seen with
    redis-py 5.2 in CI).
    """
    deadline = time.monotonic() + 10
    while True:
        counts = dict(await dbs.redis.pubsub_numsub(channel))
        if counts.get(channel.encode(), 0) >= 1 and await dbs.redis.pubsub_numpat() >= patterns:
            return
        assert time.monotonic() < deadline, (counts, await dbs.redis.pubsub_numpat())
        await asyncio.sleep(0.02)


async def publish_until_received(dbs: Databases, pubsub: Any, channel: str, data: str, kind: str = "message") -> dict[str, Any]:
    """Publish every 50 ms until the subscriber gets it (a publish before it re-subscribed is lost)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        await dbs.redis.publish(channel, data)
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if message is not None and message["type"] == kind and message["data"] == data.encode():
            return message  # type: ignore[no-any-return]
    raise AssertionError(f"{data!r} on {channel!r} never arrived")


async def test_pubsub_subscriptions_move_to_the_fallback_and_back_and_report_the_gap(
    redis_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = redis_pair
    dbs = await databases(primary, fallback, FAILOVER_FAILBACK_DELAY=0.5)
    moves: list[SubscriptionsMoved] = []
    dbs.subscribe(lambda e: moves.append(e) if isinstance(e, SubscriptionsMoved) else None)
    pubsub = dbs.redis.pubsub()
    try:
        await pubsub.subscribe("news")
        await pubsub.psubscribe("ev:*")
        assert pubsub.subscribed
        await subscribed_on_server(dbs, "news", patterns=1)
        assert await dbs.redis.publish("news", "one") == 1
        assert (await next_message(pubsub, {"message"}))["data"] == b"one"
        assert await dbs.redis.publish("ev:a", "two") == 1
        pmessage = await next_message(pubsub, {"pmessage"})
        assert (pmessage["pattern"], pmessage["channel"], pmessage["data"]) == (b"ev:*", b"ev:a", b"two")

        primary.kill()
        gap = await next_message(pubsub, {GAP_MESSAGE_TYPE})  # the read notices the hang-up at once
        assert gap["data"]["to_role"] == "fallback" and gap["data"]["endpoint"] == "Local Redis"
        assert gap["data"]["channels"] == ("news",) and gap["data"]["patterns"] == ("ev:*",)
        assert pubsub.gaps == 1 and moves and moves[-1].to_role.value == "fallback"
        assert pubsub.endpoint_role.value == "fallback"
        await on_fallback(dbs)
        await publish_until_received(dbs, pubsub, "news", "three")
        await publish_until_received(dbs, pubsub, "ev:b", "four", kind="pmessage")
        assert await raw(fallback, "PUBSUB", "NUMSUB", "news") == ["news", 1]

        # Failback: the fallback stays up, yet the subscriber follows the publishers to the primary.
        primary.restart()
        gap = await next_message(pubsub, {GAP_MESSAGE_TYPE}, timeout=20)
        assert gap["data"]["to_role"] == "primary"
        assert state(dbs) is SwitchState.ON_PRIMARY
        await publish_until_received(dbs, pubsub, "news", "five")
        assert await raw(primary, "PUBSUB", "NUMSUB", "news") == ["news", 1]
        assert await raw(fallback, "PUBSUB", "NUMSUB", "news") == ["news", 0]
        assert pubsub.gaps == 2
    finally:
        await pubsub.aclose()
        await dbs.close()


async def test_pubsub_listen_resumes_after_a_kill(redis_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = redis_pair
    dbs = await databases(primary, fallback)
    received: list[dict[str, Any]] = []

    async def listen(pubsub: Any) -> None:
        async for message in pubsub.listen():
            received.append(message)

    async with dbs.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe("jobs")
        listener = asyncio.create_task(listen(pubsub))
        try:
            deadline = time.monotonic() + 5
            while not any(m["data"] == b"before" for m in received):  # SUBSCRIBE is not awaited: repeat
                assert time.monotonic() < deadline, received
                await dbs.redis.publish("jobs", "before")
                await asyncio.sleep(0.05)
            primary.kill()
            await wait_for(lambda: any(m["type"] == GAP_MESSAGE_TYPE for m in received), 10, "the gap message")
            await on_fallback(dbs)
            deadline = time.monotonic() + 10
            while not any(m["data"] == b"after" for m in received):
                assert time.monotonic() < deadline, received
                await dbs.redis.publish("jobs", "after")
                await asyncio.sleep(0.05)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        assert not listener.done() or listener.cancelled()
    await dbs.close()


# --- blocking commands ---------------------------------------------------------------------


async def test_blocking_commands_keep_their_own_timeouts(redis_pair: tuple[LocalServer, LocalServer]) -> None:
    dbs = await databases(*redis_pair, FAILOVER_OPERATION_TIMEOUT=1.0)
    try:
        started = time.monotonic()
        assert await dbs.redis.blpop(["empty"], timeout=2) is None  # twice the operation timeout
        assert 1.9 < time.monotonic() - started < 4

        async def later() -> None:
            await asyncio.sleep(1.5)
            await dbs.redis.rpush("q", "v")
            await asyncio.sleep(1.0)  # XREAD below is blocked on "$" by then
            await dbs.redis.xadd("s", {"f": "1"})

        pusher = asyncio.create_task(later())
        assert await dbs.redis.brpop(["q"], timeout=0) == (b"q", b"v")  # 0: forever
        reply = await dbs.redis.xread({"s": "$"}, block=5000)
        await pusher
        assert reply[0][0] == b"s" and reply[0][1][0][1] == {b"f": b"1"}
        assert await dbs.redis.wait(0, 100) == 0
    finally:
        await dbs.close()


async def test_a_consumer_blocked_on_the_primary_moves_to_the_fallback(redis_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = redis_pair
    dbs = await databases(primary, fallback)
    try:
        consumer = asyncio.create_task(dbs.redis.blpop(["work"], timeout=0))
        await asyncio.sleep(0.3)  # let it block on the primary (nothing to wait for: any moment will do)
        primary.kill()
        await on_fallback(dbs)
        assert not consumer.done()
        await dbs.redis.rpush("work", "item")
        assert await asyncio.wait_for(consumer, timeout=5) == (b"work", b"item")
        assert await raw(fallback, "LLEN", "work") == 0
    finally:
        await dbs.close()


# --- refused methods -----------------------------------------------------------------------


async def test_monitor_and_client_are_refused_with_a_reason(redis_pair: tuple[LocalServer, LocalServer]) -> None:
    dbs = await databases(*redis_pair)
    try:
        with pytest.raises(NotRoutable, match=r"monitor\(\).*one server"):
            dbs.redis.monitor()
        with pytest.raises(NotRoutable, match=r"client\(\)"):
            dbs.redis.client()

        async def increment(pipe: Any) -> None:
            value = await pipe.get("t")  # watched: runs at once
            pipe.multi()
            pipe.set("t", int(value or 0) + 1)

        assert await dbs.redis.transaction(increment, "t") == [True]
        assert await dbs.redis.transaction(increment, "t", value_from_callable=True) is None
        assert await dbs.redis.get("t") == b"2"
        assert await dbs.redis is dbs.redis
    finally:
        await dbs.close()
