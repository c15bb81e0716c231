"""Checks every integration test gets for free."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import failover

_PACKAGE = str(Path(failover.__file__).resolve().parent)


def _is_ours(task: asyncio.Task[object]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and str(Path(code.co_filename).resolve()).startswith(_PACKAGE)


@pytest.fixture(autouse=True)
async def no_task_outlives_its_test() -> AsyncIterator[None]:
    """Fail a test that leaves a failover background task running (the loop is the session's).

    A leaked task (a warm sync or probe loop of a store nobody closed) keeps working against
    servers the test has stopped, floods the log of the tests after it, and is a real bug of
    ``close()`` when the test did close what it opened.
    """
    before = set(asyncio.all_tasks())
    yield
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10  # a cancelled task may take a while to end; a leaked loop never does
    while True:
        leaked = [t for t in asyncio.all_tasks() if t not in before and not t.done() and _is_ours(t)]
        if not leaked or loop.time() > deadline:
            break
        await asyncio.sleep(0.05)
    for task in leaked:
        task.cancel()
    assert not leaked, f"failover tasks still running after the test: {sorted(t.get_name() for t in leaked)}"
