"""Stopping background tasks for good."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_and_wait"]

logger = logging.getLogger("failover.tasks")


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel *tasks* (None entries are skipped) and return once every one has ended.

    Python 3.11 swallows a ``cancel()`` that lands as an ``asyncio.timeout`` expires (the
    background loops wait that way, and drivers time their calls that way): the task sees a
    ``TimeoutError`` instead and goes on. So a task still running is cancelled again every
    half second until it ends, where a single ``cancel()`` and ``await task`` could wait for ever.
    What a task ended with is retrieved (logged at DEBUG level), never re-raised.
    """
    started = [t for t in tasks if t is not None]
    pending = [t for t in started if not t.done()]
    while pending:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.5)
        pending = [t for t in pending if not t.done()]
    for task in started:
        if not task.cancelled() and task.exception() is not None:
            logger.debug("task %s ended with %r", task.get_name(), task.exception())
