"""Detecting a dead server *before* sending.

PyMongo's async pool checks an idle connection only with
``transport.is_closing()`` and only after one second of idleness
(``Pool._perished``); its protocol pauses reading between replies, so a FIN from
a crashed server goes unnoticed and the first write after a crash would be sent
on a dead socket, with an unknown outcome. So each client of a single-host
endpoint is paired with a *sentinel*: a plain TCP connection to the same server,
opened before the client, that never carries a request. Before every operation
the sentinel is peeked (one non-blocking ``recv`` with ``MSG_PEEK``, no round
trip). When the server hung up on it, the server died or restarted, so every
pooled connection (all younger than the sentinel) is dead too: the client is
retired, a new sentinel is opened, and when that is refused the operation is
reported as not sent and goes to the fallback. Replica-set and ``mongodb+srv``
URLs have no sentinel: there PyMongo's own server discovery and retryable writes
handle a dying member, and a write cut mid-flight raises ``OutcomeUnknown``.
"""

from __future__ import annotations

import asyncio
import select
import socket

# Precomputed: ``MSG_PEEK | MSG_DONTWAIT`` on the IntFlag members costs an enum operation per call.
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
# Anything but "idle and connected": data or FIN (POLLIN/POLLRDHUP), reset or error (POLLERR/POLLHUP).
_EVENTS = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | getattr(select, "POLLRDHUP", 0)


class _Sentinel:
    """A plain TCP connection to a server that never carries a request.

    The server closes it when it dies or restarts, so peeking at it tells, with
    no round trip, whether the connections pooled after it was opened are dead.
    """

    __slots__ = ("sock", "_poller", "poll")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # A poll object registered once: the per-operation check is one poll(0)
        # syscall that returns an empty list, with no exception raised.
        self._poller = select.poll()
        self._poller.register(sock, _EVENTS)
        self.poll = self._poller.poll
        """``poll(0)``: [] while connected and idle (the cheap first half of :meth:`alive`)."""

    @classmethod
    async def open(cls, host: str, port: int, timeout: float) -> _Sentinel:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, type_, proto, _, address = infos[0]
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, address)
            except BaseException:
                sock.close()
                raise
        return cls(sock)

    def alive(self) -> bool:
        """False once the server closed or reset the connection."""
        if not self.poll(0):
            return True  # no event: nothing to read, no hang-up, no error
        try:
            data = self.sock.recv(1, _PEEK)
        except (BlockingIOError, InterruptedError):
            return True  # nothing to read: still connected
        except OSError:
            return False
        return bool(data)  # b"" is the server's FIN

    def close(self) -> None:
        try:
            self._poller.unregister(self.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.sock.close()

