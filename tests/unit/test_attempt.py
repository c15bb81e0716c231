"""The attempt clock: suspect, cut, cancel — one timer re-armed from stage to stage."""

from __future__ import annotations

import asyncio

import pytest

from failover.core.attempt import AttemptClock, attempt_deadline, current_attempt


async def test_a_quick_attempt_fires_nothing() -> None:
    suspected: list[bool] = []
    loop = asyncio.get_running_loop()
    with AttemptClock(loop.time() + 5, suspect_at=loop.time() + 1, on_suspect=lambda: suspected.append(True)) as clock:
        assert current_attempt() is clock
        assert attempt_deadline() == clock.deadline
        await asyncio.sleep(0)
    assert suspected == []
    assert current_attempt() is None
    assert not clock.expired


async def test_suspect_then_cancel_becomes_timeout_error() -> None:
    suspected: list[bool] = []
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        with AttemptClock(loop.time() + 0.1, suspect_at=loop.time() + 0.02, on_suspect=lambda: suspected.append(True)):
            await asyncio.Event().wait()
    assert suspected == [True]


async def test_cut_hook_runs_at_the_deadline_and_the_cancel_waits_for_the_backstop() -> None:
    loop = asyncio.get_running_loop()
    cut = asyncio.Event()
    with AttemptClock(loop.time() + 0.05, backstop=5.0) as clock:
        clock.on_deadline(cut.set)
        await asyncio.wait_for(cut.wait(), timeout=2)  # the hook ran; the task was not cancelled
    assert not clock.expired


async def test_a_removed_hook_does_not_run_and_the_task_is_cancelled_at_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    ran: list[bool] = []
    with pytest.raises(TimeoutError):
        with AttemptClock(loop.time() + 0.05, backstop=5.0) as clock:
            remove = clock.on_deadline(lambda: ran.append(True))
            remove()
            await asyncio.Event().wait()
    assert ran == []


async def test_an_outside_cancellation_is_not_turned_into_a_timeout() -> None:
    loop = asyncio.get_running_loop()

    async def attempt() -> None:
        with AttemptClock(loop.time() + 10):
            await asyncio.Event().wait()

    task = asyncio.create_task(attempt())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
