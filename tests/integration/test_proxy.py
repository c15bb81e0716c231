"""The fault proxy really passes, delays, drops and resets (behaviour, never speed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from failover.local import LocalServer
from failover.local.proxy import FaultProxy, ProxyMode, proxied_url
from ..helpers import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A line echo server on loopback (the simplest real peer)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, limit=1 << 20)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.fixture
async def proxy(echo_port: int) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(echo_port) as p:
        yield p


async def _connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 20), 2)


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes, timeout: float = 2.0) -> bytes:
    writer.write(line)
    await writer.drain()
    return await asyncio.wait_for(reader.readline(), timeout)


async def test_pass_forwards_both_ways_and_counts_connections(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)
    assert await _ask(reader, writer, b"hello\n") == b"hello\n"
    big = b"x" * 300_000 + b"\n"  # bigger than one chunk: arrives whole and in order
    assert await _ask(reader, writer, big) == big
    assert proxy.accepted == 1 and proxy.active == 1 and proxy.peak_active == 1
    writer.close()
    await wait_for(lambda: proxy.active == 0, 2, "the proxy to see the client leave")


async def test_delay_holds_replies_until_switched_back(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)
    proxy.delay(60)
    writer.write(b"held\n")
    await writer.drain()
    pending = asyncio.ensure_future(reader.readline())
    done, _ = await asyncio.wait({pending}, timeout=0.5)
    assert not done, "a reply went through while the proxy was delaying by 60 s"
    proxy.pass_through()  # releases what the delay held, at once
    assert await asyncio.wait_for(pending, 2) == b"held\n"
    writer.close()


async def test_delay_forwards_after_the_delay(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)
    proxy.delay(0.2)
    sent = time.monotonic()
    assert await _ask(reader, writer, b"late\n", timeout=5) == b"late\n"
    # Held at least the delay (a lower bound: a behaviour, not a speed).
    assert time.monotonic() - sent >= 0.2
    assert proxy.mode is ProxyMode.DELAY
    writer.close()


async def test_drop_never_answers_until_the_clients_own_timeout(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)
    assert await _ask(reader, writer, b"before\n") == b"before\n"
    proxy.drop()
    with pytest.raises(TimeoutError):
        await _ask(reader, writer, b"lost\n", timeout=0.5)
    # New connections are accepted (the TCP handshake succeeds) but never answered either.
    reader2, writer2 = await _connect(proxy)
    with pytest.raises(TimeoutError):
        await _ask(reader2, writer2, b"lost too\n", timeout=0.5)
    assert proxy.dropped_bytes >= len(b"lost\n") + len(b"lost too\n")
    # Healing resets the connections whose bytes were lost, and serves new ones.
    proxy.pass_through()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        line = await asyncio.wait_for(reader.readline(), 2)
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
    reader3, writer3 = await _connect(proxy)
    assert await _ask(reader3, writer3, b"after\n") == b"after\n"
    for w in (writer, writer2, writer3):
        w.close()


async def test_reset_resets_open_and_new_connections(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)
    assert await _ask(reader, writer, b"ping\n") == b"ping\n"
    proxy.reset()
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError, BrokenPipeError)):
        await _ask_or_eof(reader, writer, b"ping\n")
    reader2, writer2 = await _connect(proxy)  # the kernel accepts; the proxy answers with RST
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError, BrokenPipeError)):
        await _ask_or_eof(reader2, writer2, b"ping\n")
    proxy.pass_through()
    reader3, writer3 = await _connect(proxy)
    assert await _ask(reader3, writer3, b"ping\n") == b"ping\n"
    writer3.close()


async def test_a_real_redis_client_sees_each_fault(make_server: Callable[..., LocalServer]) -> None:
    server = make_server("redis")
    async with FaultProxy(server.port) as proxy:
        client = aioredis.Redis.from_url(proxied_url(server.url, proxy.port), socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            assert await client.set("k", "v")
            proxy.drop()
            with pytest.raises(redis.exceptions.TimeoutError):
                await client.get("k")
            proxy.pass_through()
            assert await client.get("k") == b"v"
            proxy.reset()
            with pytest.raises(redis.exceptions.ConnectionError):
                await client.get("k")
            proxy.pass_through()
            assert await client.get("k") == b"v"
        finally:
            await client.aclose()


def test_refuses_anything_but_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(5432, target_host="10.1.2.3")
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(5432, listen_host="0.0.0.0")
    assert proxied_url("redis://:s3cret@127.0.0.1:6379/0", 1234) == "redis://:s3cret@127.0.0.1:1234/0"


async def _ask_or_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> bytes:
    writer.write(line)
    await writer.drain()
    got = await asyncio.wait_for(reader.readline(), 2)
    if not got:
        raise asyncio.IncompleteReadError(b"", None)
    return got

