"""cancel_and_wait: background tasks end for good, even when a cancel is swallowed."""

from __future__ import annotations

import asyncio

from failover.core.tasks import cancel_and_wait


async def test_a_task_that_swallows_a_cancel_is_cancelled_again_until_it_ends() -> None:
    swallowed = 0

    async def stubborn() -> None:
        # What Python 3.11 does when a cancel lands as an asyncio.timeout expires: the task goes on.
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1
                current = asyncio.current_task()
                assert current is not None
                current.uncancel()

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait([task, None]), 5)
    assert task.cancelled() and swallowed == 1


async def test_what_a_task_ended_with_is_retrieved_not_raised() -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(broken())
    await asyncio.sleep(0)
    await cancel_and_wait([task])
    assert task.done() and isinstance(task.exception(), RuntimeError)
