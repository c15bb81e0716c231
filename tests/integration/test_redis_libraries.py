"""PyPI libraries that take a redis.asyncio client, handed dbs.redis, across a kill of the Redis primary:
fastapi-cache2 (caching) and pyrate-limiter (rate limiting, Lua scripts by SHA)."""

from __future__ import annotations

import pytest
from fastapi_cache.backends.redis import RedisBackend
from pyrate_limiter import Duration, Limiter, Rate, RedisBucket

from failover.local import LocalServer

from .test_redis_failover import databases, raw
from .test_redis_surface import on_fallback

pytestmark = pytest.mark.integration


async def test_fastapi_cache2_backend_on_dbs_redis_across_a_kill(redis_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = redis_pair
    dbs = await databases(primary, fallback)
    try:
        cache = RedisBackend(dbs.redis)  # type: ignore[arg-type]
        await cache.set("ns:a", b"1", expire=60)
        assert await cache.get("ns:a") == b"1"
        ttl, value = await cache.get_with_ttl("ns:a")  # a MULTI/EXEC pipeline
        assert value == b"1" and 0 < ttl <= 60

        primary.kill()
        await on_fallback(dbs)
        assert await cache.get("ns:a") is None  # a cold fallback: a miss, not an error
        await cache.set("ns:b", b"2", expire=60)
        ttl, value = await cache.get_with_ttl("ns:b")
        assert value == b"2" and 0 < ttl <= 60
        assert await raw(fallback, "GET", "ns:b") == "2"
        await cache.clear(namespace="ns")  # EVAL over KEYS on the fallback
        assert await cache.get("ns:b") is None
    finally:
        await dbs.close()


async def test_pyrate_limiter_redis_bucket_on_dbs_redis_across_a_kill(redis_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = redis_pair
    dbs = await databases(primary, fallback)
    try:
        bucket = await RedisBucket.init([Rate(3, Duration.MINUTE)], dbs.redis, "rate:user")  # SCRIPT LOAD on the primary
        limiter = Limiter(bucket)
        assert [await limiter.try_acquire_async("user", blocking=False) for _ in range(4)] == [True, True, True, False]

        primary.kill()
        await on_fallback(dbs)
        # The fallback never saw the script: EVALSHA answers NOSCRIPT, dbs.redis loads it there and runs it.
        results = [await limiter.try_acquire_async("user", blocking=False) for _ in range(4)]
        assert results == [True, True, True, False]  # a new window on the fallback, still limited
        assert await raw(fallback, "ZCARD", "rate:user") == 3
    finally:
        await dbs.close()
