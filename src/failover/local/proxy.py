"""A fault-injecting TCP proxy, loopback only, for drills, benchmarks and tests.

Killing a server is the easy fault: the kernel resets every connection and the
client learns at once. The faults that hurt in production are quieter: a
network path that silently drops packets (a *blackhole*: connections stay
"open", requests are never answered, only the client's own timeout ends the
wait), a slow path, or a middlebox resetting connections. :class:`FaultProxy`
sits between a client and a server on 127.0.0.1 and produces each of them on
demand, switchable at runtime from the same event loop::

    async with FaultProxy(target_port=server.port) as proxy:
        url = proxied_url(server.url, proxy.port)  # give this URL to the client
        proxy.drop()          # blackhole: accept and read, forward nothing, answer nothing
        proxy.delay(0.5)      # every chunk is held 0.5 s in each direction
        proxy.reset()         # RST every open connection and every new one
        proxy.pass_through()  # back to normal

Modes, precisely:

* ``pass``: bytes are copied both ways as they come.
* ``delay``: each chunk is forwarded *seconds* after it arrived; changing the
  mode re-decides held chunks at once (switching back to ``pass`` releases them).
* ``drop``: new connections are accepted and read but never connected upstream;
  on open connections, bytes in both directions are read and discarded. A
  connection that lost bytes is *poisoned* (its stream is no longer coherent):
  when the mode leaves ``drop`` it is reset, as a peer that gave up would do.
* ``reset``: every open connection is aborted with a TCP RST (``SO_LINGER`` 0)
  and every new one is reset as soon as it is accepted.

The proxy refuses to listen or connect anywhere but loopback: it is a test
instrument, never a network component.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import socket
import struct
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FaultProxy", "ProxyMode", "proxied_url"]

logger = logging.getLogger("failover.proxy")

DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_CONNECT_TIMEOUT = 2.0


class ProxyMode(enum.StrEnum):
    """What the proxy does with traffic."""

    PASS = "pass"
    DELAY = "delay"
    DROP = "drop"
    RESET = "reset"


def _require_loopback(host: str, what: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"the fault proxy only works on loopback; {what} {host!r} is not a loopback address")


def proxied_url(url: str, port: int, host: str = "127.0.0.1") -> str:
    """*url* pointed at ``host:port`` instead of its own host and port (credentials kept).

    >>> proxied_url("postgresql://u:pw@127.0.0.1:5433/db", 40001)
    'postgresql://u:pw@127.0.0.1:40001/db'
    """
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _abort_with_rst(writer: asyncio.StreamWriter | None) -> None:
    """Close *writer*'s socket so the peer gets a TCP RST, not a FIN."""
    if writer is None:
        return
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@dataclass(eq=False)
class _Link:
    """One client connection and, unless born in a blackhole, its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    poisoned: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        _abort_with_rst(self.client)
        _abort_with_rst(self.upstream)
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:port`` to ``target_host:target_port`` whose faults are switchable.

    Args:
        target_port: the server's port.
        target_host: the server's address (loopback only).
        listen_port: the proxy's port; 0 (default) picks a free one, see :attr:`port`.
        connect_timeout: seconds to reach the server for each new connection.

    Attributes:
        accepted: client connections accepted since start.
        active: client connections open now.
        peak_active: the most client connections open at once (see :meth:`reset_peak`).
        dropped_bytes: bytes discarded by ``drop`` mode.
    """

    def __init__(
        self,
        target_port: int,
        *,
        target_host: str = "127.0.0.1",
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        _require_loopback(target_host, "target host")
        _require_loopback(listen_host, "listen host")
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be greater than 0")
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self._listen_port = listen_port
        self.connect_timeout = connect_timeout
        self.mode = ProxyMode.PASS
        self.delay_seconds = 0.0
        self.accepted = 0
        self.peak_active = 0
        self.dropped_bytes = 0
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port clients connect to (known once started)."""
        if self._server is None:
            if self._listen_port:
                return self._listen_port
            raise RuntimeError("the proxy is not started; its port is not chosen yet")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def active(self) -> int:
        return len(self._links)

    async def start(self) -> FaultProxy:
        """Start listening. Returns the proxy, so ``proxy = await FaultProxy(p).start()`` works."""
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, self.listen_host, self._listen_port)
            self._listen_port = self.port  # a restart keeps the same port
            logger.info("proxy 127.0.0.1:%d -> %s:%d started", self.port, self.target_host, self.target_port)
        return self

    async def stop(self) -> None:
        """Stop listening and reset every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        links = list(self._links)
        for link in links:
            link.reset()
        tasks = [t for link in links for t in link.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        self._links.clear()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- modes ----------------------------------------------------------------------------

    def set_mode(self, mode: ProxyMode | str, seconds: float = 0.0) -> None:
        """Switch to *mode* now (``seconds`` is the delay of ``delay`` mode)."""
        mode = ProxyMode(mode)
        if mode is ProxyMode.DELAY and seconds <= 0:
            raise ValueError("delay mode needs seconds greater than 0")
        previous = self.mode
        self.mode = mode
        self.delay_seconds = seconds if mode is ProxyMode.DELAY else 0.0
        logger.info("proxy 127.0.0.1:%d: %s -> %s", self.port if self._server else 0, previous, mode)
        if mode is ProxyMode.RESET:
            for link in list(self._links):
                link.reset()
        elif previous is ProxyMode.DROP:
            for link in [lk for lk in self._links if lk.poisoned or lk.upstream is None]:
                link.reset()
        # Wake every pump holding a chunk so it re-decides under the new mode.
        self._changed.set()
        self._changed = asyncio.Event()

    def pass_through(self) -> None:
        """Forward everything as it comes."""
        self.set_mode(ProxyMode.PASS)

    def delay(self, seconds: float) -> None:
        """Hold every chunk *seconds* before forwarding it, in both directions."""
        self.set_mode(ProxyMode.DELAY, seconds)

    def drop(self) -> None:
        """Blackhole: accept and read, forward nothing, never answer."""
        self.set_mode(ProxyMode.DROP)

    def reset(self) -> None:
        """RST every open connection and every new one."""
        self.set_mode(ProxyMode.RESET)

    def reset_peak(self) -> None:
        """Start counting :attr:`peak_active` again from the connections open now."""
        self.peak_active = len(self._links)

    # --- connections ----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode is ProxyMode.RESET:
            _abort_with_rst(writer)
            return
        link = _Link(writer)
        self._links.add(link)
        self.peak_active = max(self.peak_active, len(self._links))
        try:
            if self.mode is ProxyMode.DROP:
                link.poisoned = True
                await self._swallow(reader)
                return
            try:
                async with asyncio.timeout(self.connect_timeout):
                    up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
            except (OSError, TimeoutError) as exc:
                logger.debug("proxy 127.0.0.1:%d cannot reach its target: %s", self.port, exc)
                _abort_with_rst(writer)  # the closest thing to "connection refused" after accept
                return
            link.upstream = up_writer
            # The mode may have changed while connecting (mypy keeps the narrowing from above).
            if self.mode is ProxyMode.RESET or link.client.transport.is_closing():  # type: ignore[comparison-overlap]
                link.reset()
                return
            link.tasks = [
                asyncio.current_task(),  # type: ignore[list-item]
                asyncio.create_task(self._pump(link, up_reader, writer)),
            ]
            await self._pump(link, reader, up_writer)
            await asyncio.gather(link.tasks[1], return_exceptions=True)
        except asyncio.CancelledError:
            pass
        finally:
            self._links.discard(link)
            for side in (link.client, link.upstream):
                if side is not None and not side.transport.is_closing():
                    side.transport.abort()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        """Read and discard until the client goes away (a connection born in a blackhole)."""
        while True:
            try:
                data = await reader.read(DEFAULT_CHUNK_SIZE)
            except (ConnectionError, OSError):
                return
            if not data:
                return
            self.dropped_bytes += len(data)

    async def _pump(self, link: _Link, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Copy *source* to *sink* chunk by chunk, applying the mode in force for each chunk."""
        try:
            while True:
                data = await source.read(DEFAULT_CHUNK_SIZE)
                arrived = time.monotonic()
                if not data:
                    if self.mode is ProxyMode.DROP:
                        link.poisoned = True  # the FIN is lost in the blackhole too
                        return
                    with contextlib.suppress(OSError, RuntimeError):
                        sink.write_eof()
                    return
                if not await self._hold(link, data, arrived):
                    continue
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            link.reset()
        except asyncio.CancelledError:
            return

    async def _hold(self, link: _Link, data: bytes, arrived: float) -> bool:
        """Wait as the mode says; True to forward *data*, False when it was dropped."""
        while True:
            if self.mode is ProxyMode.PASS:
                return True
            if self.mode is ProxyMode.DROP:
                link.poisoned = True
                self.dropped_bytes += len(data)
                return False
            if self.mode is ProxyMode.RESET:
                link.reset()
                return False
            remaining = arrived + self.delay_seconds - time.monotonic()
            if remaining <= 0:
                return True
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()

    def __repr__(self) -> str:
        where = f"127.0.0.1:{self._listen_port}" if self._listen_port else "not started"
        return f"<FaultProxy {where} -> {self.target_host}:{self.target_port} {self.mode} active={self.active}>"
