"""Zero-round-trip checks on a pooled connection's socket."""

from __future__ import annotations

import select

__all__ = ["hung_up_or_pending"]

_BAD = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | getattr(select, "POLLRDHUP", 0)


def hung_up_or_pending(fd: int) -> bool:
    """True when the socket *fd* has something to read, an error or a hang-up.

    An idle connection of a request/response protocol (PostgreSQL, RESP) must have
    nothing to read, so any of these means the server closed it (or sent an
    unsolicited message the caller must look at). Uses ``poll``, not ``select``,
    which fails for descriptors above 1023.
    """
    poller = select.poll()
    poller.register(fd, _BAD)
    return bool(poller.poll(0))
