"""Redis failover on real servers: crash, hang, recovery, flapping, both down, lost commands."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from failover import (
    last_served,
    Databases,
    FailoverError,
    NoEndpointAvailable,
    OutcomeUnknown,
    SwitchState,
)
from failover.local import LocalServer

from ..helpers import fast_settings, wait_for
from . import scenarios

pytestmark = pytest.mark.integration


async def raw(server: LocalServer | str, *args: Any) -> Any:
    """Run one command on a server directly (no failover), to check where data landed."""
    url = server if isinstance(server, str) else server.url
    client = aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_timeout=2, decode_responses=True)
    try:
        return await client.execute_command(*args)
    finally:
        await client.aclose()


def state(dbs: Databases) -> SwitchState:
    return dbs.store("redis").state


async def databases(primary: LocalServer | str | None, fallback: LocalServer | str | None, **overrides: Any) -> Databases:
    urls: dict[str, Any] = {}
    if primary is not None:
        urls["UPSTASH_REDIS_URL"] = primary if isinstance(primary, str) else primary.url
    if fallback is not None:
        urls["REDIS_URL"] = fallback if isinstance(fallback, str) else fallback.url
    dbs = Databases(fast_settings(**urls, **overrides))
    await dbs.start()
    return dbs


def subject(dbs: Databases, pair: tuple[LocalServer, LocalServer]) -> scenarios.Subject:
    return scenarios.Subject(dbs, "redis", pair[0], pair[1], reads_and_writes(dbs))


def reads_and_writes(dbs: Databases) -> Callable[[int], Any]:
    """SET, GET and INCR in turn; each returns the role that was active after it."""

    async def operation(i: int) -> str:
        kind = i % 3
        if kind == 0:
            await dbs.redis.set(f"key:{i % 50}", i)
        elif kind == 1:
            await dbs.redis.get(f"key:{i % 50}")
        else:
            await dbs.redis.incr("counter")
        endpoint = last_served()  # the endpoint that served this call, not the one active after it
        return str(endpoint.role) if endpoint else "none"

    return operation


async def test_healthy_start_serves_from_primary(redis_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = redis_pair
    # Warm sync off: the fallback must stay untouched by routing (with it on, its mirror copies
    # these writes into the fallback on purpose: tests/integration/test_redis_warm.py).
    dbs = await databases(primary, fallback, FAILOVER_WARM="off")
    try:
        status = dbs.status()
        assert status["overall_status"] == "healthy"
        redis_status = status["redis"]
        assert redis_status["using_primary"] is True
        assert redis_status["primary_available"] is True
        assert redis_status["fallback_available"] is True
        assert redis_status["primary_healthy"] is True
        assert redis_status["current_db"] == "Primary Redis"
        assert redis_status["endpoints"]["fallback"]["name"] == "Local Redis"
        assert await dbs.redis.set("greeting", "hello") is True
        assert await dbs.redis.get("greeting") == b"hello"
        assert await dbs.redis.incr("n") == 1
        assert await dbs.redis.hset("h", mapping={"a": 1, "b": 2}) == 2
        assert await dbs.redis.hgetall("h") == {b"a": b"1", b"b": b"2"}
        assert await dbs.redis.rpush("l", "x", "y") == 2
        assert await dbs.redis.lrange("l", 0, -1) == [b"x", b"y"]
        assert await dbs.redis.zadd("z", {"m": 2.5}) == 1
        assert await dbs.redis.zrange("z", 0, -1, withscores=True) == [(b"m", 2.5)]
        assert await dbs.redis.expire("greeting", 100) is True
        assert 0 < await dbs.redis.ttl("greeting") <= 100
        # failover:* keys are the library's own (warm sync's heartbeat on the primary)
        keys = [k async for k in dbs.redis.scan_iter(match="*") if not k.startswith(b"failover:")]
        assert sorted(keys) == [b"greeting", b"h", b"l", b"n", b"z"]
        assert await dbs.redis.delete("n") == 1
        assert await raw(primary, "GET", "greeting") == "hello"
        assert await raw(fallback, "DBSIZE") == 0
    finally:
        await dbs.close()


async def test_sigkill_primary_under_traffic_moves_within_a_second_without_errors(
    redis_pair: tuple[LocalServer, LocalServer],
) -> None:
    dbs = await databases(*redis_pair)
    try:
        await scenarios.crash_moves_within_a_second(subject(dbs, redis_pair))
    finally:
        await dbs.close()
    assert int(await raw(redis_pair[1], "GET", "counter")) > 0


async def test_sigstop_primary_fails_over_within_the_timeouts(redis_pair: tuple[LocalServer, LocalServer]) -> None:
    dbs = await databases(*redis_pair)
    try:
        await scenarios.hang_fails_over_within_the_timeouts(subject(dbs, redis_pair))
    finally:
        await dbs.close()


async def test_failback_waits_for_the_failback_delay(redis_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = redis_pair
    dbs = await databases(primary, fallback, FAILOVER_FAILBACK_DELAY=1.5)

    async def during_outage() -> None:
        assert await dbs.redis.set("during", "outage") is True  # live traffic notices the crash
        assert await raw(fallback, "GET", "during") == "outage"

    async def after_failback() -> None:
        assert await dbs.redis.set("after", "failback") is True
        assert await raw(primary, "GET", "after") == "failback"

    try:
        await scenarios.failback_waits_for_the_delay(subject(dbs, redis_pair), during_outage, after_failback)
    finally:
        await dbs.close()


async def test_flapping_primary_causes_a_bounded_number_of_switches(
    redis_pair: tuple[LocalServer, LocalServer],
) -> None:
    dbs = await databases(*redis_pair, FAILOVER_FAILBACK_DELAY=2.0)
    try:
        await scenarios.flapping_switches_a_bounded_number_of_times(subject(dbs, redis_pair))
    finally:
        await dbs.close()


async def test_both_down_raises_a_typed_error_without_hanging(redis_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = redis_pair
    dbs = await databases(primary, fallback)
    try:
        assert await dbs.redis.ping() is True
        await asyncio.to_thread(primary.kill)
        await asyncio.to_thread(fallback.kill)
        for command in (dbs.redis.incr("n"), dbs.redis.get("k")):
            started = time.monotonic()
            with pytest.raises(NoEndpointAvailable):
                await asyncio.wait_for(command, timeout=10)
            assert time.monotonic() - started <= dbs.settings.operation_timeout + 0.5
        await wait_for(lambda: dbs.status()["overall_status"] == "unhealthy", 3, "unhealthy status")
        assert dbs.status()["redis"]["current_db"] is None
    finally:
        await dbs.close()


async def test_both_hung_raises_within_the_operation_timeout(redis_pair: tuple[LocalServer, LocalServer]) -> None:
    dbs = await databases(*redis_pair)
    try:
        await scenarios.both_hung_raise_within_the_operation_timeout(
            subject(dbs, redis_pair), lambda: dbs.redis.get("k"), lambda: dbs.redis.incr("n")
        )
    finally:
        await dbs.close()


async def test_fallback_down_while_on_primary_is_reported_and_harmless(
    redis_pair: tuple[LocalServer, LocalServer],
) -> None:
    dbs = await databases(*redis_pair)
    try:
        await scenarios.fallback_down_is_reported_and_harmless(subject(dbs, redis_pair))
    finally:
        await dbs.close()


async def test_incr_lost_after_sending_raises_outcome_unknown_and_is_not_resent(
    redis_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = redis_pair
    dbs = await databases(primary, fallback, FAILOVER_OPERATION_TIMEOUT=5.0)
    try:
        assert await dbs.redis.incr("counter") == 1  # leaves one live pooled connection
        primary.pause()
        incr = asyncio.create_task(dbs.redis.incr("counter"))
        # With a live pooled connection, taking it and sending happen in one step:
        # once it is in use, INCR is on the wire to the hung server.
        await wait_for(lambda: dbs.redis.backend.stats()["primary"]["in_use"] == 1, 2, "INCR sent")
        await asyncio.to_thread(primary.kill)
        with pytest.raises(OutcomeUnknown) as caught:
            await asyncio.wait_for(incr, timeout=10)
        assert caught.value.retryable is False
        assert caught.value.endpoint == "Primary Redis"
        assert await raw(fallback, "GET", "counter") is None  # never re-sent elsewhere
    finally:
        await dbs.close()


async def test_incr_on_a_pooled_connection_of_a_dead_server_goes_to_the_fallback(
    redis_pair: tuple[LocalServer, LocalServer],
) -> None:
    primary, fallback = redis_pair
    dbs = await databases(primary, fallback)
    try:
        assert await dbs.redis.incr("counter") == 1
        assert dbs.redis.backend.stats()["primary"]["idle"] >= 1
        await asyncio.to_thread(primary.kill)
        # The pooled connection is found dead before INCR is sent, so it is safe to send it elsewhere.
        assert await dbs.redis.incr("counter") == 1
        assert await raw(fallback, "GET", "counter") == "1"
        assert state(dbs) is SwitchState.ON_FALLBACK
    finally:
        await dbs.close()


async def test_pipeline_and_multi_run_wholly_on_one_endpoint(redis_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = redis_pair
    dbs = await databases(primary, fallback)
    try:
        async with dbs.redis.pipeline(transaction=True) as pipe:
            pipe.set("a", 1).incr("a").lpush("list", "x")
            assert await pipe.execute() == [True, 2, 1]
        assert await raw(primary, "GET", "a") == "2"
        assert await raw(fallback, "EXISTS", "a", "list") == 0

        pipe = dbs.redis.pipeline(transaction=False)
        pipe.get("a")
        pipe.lrange("list", 0, -1)
        assert await pipe.execute() == [b"2", [b"x"]]

        await asyncio.to_thread(primary.kill)
        # The pipeline's connection is checked before sending: the whole MULTI goes to the fallback.
        async with dbs.redis.pipeline() as pipe:
            pipe.incr("b").incr("b").set("c", "z")
            assert await pipe.execute() == [1, 2, True]
        assert await raw(fallback, "MGET", "b", "c") == ["2", "z"]

        # WATCH binds the pipeline to one endpoint; a concurrent change aborts the transaction.
        from redis.exceptions import WatchError

        async with dbs.redis.pipeline() as pipe:
            await pipe.watch("b")
            assert await pipe.get("b") == b"2"
            pipe.multi()
            pipe.set("b", 10)
            await raw(fallback, "SET", "b", "99")
            with pytest.raises(WatchError):
                await pipe.execute()
        assert await raw(fallback, "GET", "b") == "99"
    finally:
        await dbs.close()


async def test_a_replica_is_not_usable_for_writes(
    redis_pair: tuple[LocalServer, LocalServer], make_server: Callable[..., LocalServer]
) -> None:
    primary, fallback = redis_pair
    upstream = make_server("redis")
    await raw(primary, "REPLICAOF", "127.0.0.1", str(upstream.port))
    dbs = await databases(primary, fallback)
    try:
        status = dbs.status()["redis"]
        assert status["using_primary"] is False
        assert status["primary_available"] is False
        assert "read-only" in status["endpoints"]["primary"]["last_error"]
        assert status["current_db"] == "Local Redis"
        assert await dbs.redis.set("k", "v") is True
        assert await raw(fallback, "GET", "k") == "v"
    finally:
        await dbs.close()


async def test_a_primary_demoted_to_replica_sends_writes_to_the_fallback(
    redis_pair: tuple[LocalServer, LocalServer], make_server: Callable[..., LocalServer]
) -> None:
    primary, fallback = redis_pair
    upstream = make_server("redis")
    dbs = await databases(primary, fallback, HEALTH_CHECK_INTERVAL=30)  # only live traffic can notice
    try:
        assert await dbs.redis.set("k", "before") is True
        await raw(primary, "REPLICAOF", "127.0.0.1", str(upstream.port))
        # READONLY means the write was refused, not applied: it moves to the fallback without an error.
        assert await dbs.redis.incr("n") == 1
        assert await raw(fallback, "GET", "n") == "1"
        assert state(dbs) is SwitchState.ON_FALLBACK
    finally:
        await dbs.close()


async def test_passwords_never_appear(make_server: Callable[..., LocalServer], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret, wrong = "s3cret-pw", "wr0ng-pw-42"
    primary = make_server("redis", password=secret)
    fallback = make_server("redis", password=secret)
    fallback_url = f"redis://:{wrong}@127.0.0.1:{fallback.port}/0"
    dbs = await databases(primary, fallback_url)
    seen: list[str] = []
    try:
        assert await dbs.redis.set("k", "v") is True
        status = dbs.status()
        assert status["redis"]["using_primary"] is True
        assert status["redis"]["fallback_available"] is False  # wrong password
        seen.append(repr(status))
        seen.append(repr(dbs.redis))
        await asyncio.to_thread(primary.kill)
        with pytest.raises(FailoverError) as caught:
            await dbs.redis.get("k")
        seen.append(str(caught.value))
        seen.append(repr(caught.value.__cause__))
        await wait_for(lambda: dbs.status()["overall_status"] == "unhealthy", 3, "unhealthy status")
        seen.append(repr(dbs.status()))
    finally:
        await dbs.close()
    seen.append(caplog.text)
    text = "\n".join(seen)
    assert "Primary Redis" in text
    assert secret not in text
    assert wrong not in text


async def test_decode_responses_follows_the_url(redis_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = redis_pair
    dbs = await databases(primary.url + "?decode_responses=true", fallback.url + "?decode_responses=true")
    try:
        await dbs.redis.set("k", "v")
        assert await dbs.redis.get("k") == "v"
        assert [k async for k in dbs.redis.scan_iter()] == ["k"]
    finally:
        await dbs.close()
