"""The shared traffic generator: keys, outcomes, the readings the tests, drill and benchmarks use."""

from __future__ import annotations

import asyncio

import pytest

from failover.local.traffic import Traffic, write_ids


async def test_records_every_call_with_its_key_and_stops() -> None:
    seen: list[int] = []
    enough = asyncio.Event()

    async def operation(key: int) -> int:
        seen.append(key)
        if len(seen) >= 20:
            enough.set()
        if key % 5 == 0:
            raise ConnectionError("refused")
        return key * 2

    traffic = Traffic(operation, workers=3, pause=0).start()
    async with asyncio.timeout(10):
        await enough.wait()
    await traffic.stop()

    assert sorted(o.key for o in traffic.outcomes) == list(range(1, len(traffic.outcomes) + 1))
    assert all(o.value == o.key * 2 for o in traffic.acked())
    failed = [o for o in traffic.outcomes if not o.ok]
    assert failed and all(o.key % 5 == 0 and o.error_kind == "ConnectionError" for o in failed)
    assert traffic.errors_between(float("-inf"), float("inf"))["ConnectionError"] == len(failed)
    assert traffic.first_success_after(float("-inf")) == min(o.finished for o in traffic.acked())


async def test_write_ids_name_their_worker_and_stop_ends_a_pause() -> None:
    started = asyncio.Event()

    async def operation(key: str) -> None:
        started.set()

    traffic = Traffic(operation, workers=2, pause=3600, keys=write_ids).start()
    async with asyncio.timeout(10):
        await started.wait()
        await traffic.stop()  # a pause of an hour ends with the stop
    assert {o.key for o in traffic.outcomes} <= {"w1-1", "w2-1"}
    assert traffic.longest_gap(0.0, 0.0) == 0.0


def test_rejects_bad_options() -> None:
    async def operation(key: int) -> None:
        pass

    with pytest.raises(ValueError, match="workers"):
        Traffic(operation, workers=0)
    with pytest.raises(ValueError, match="pause"):
        Traffic(operation, pause=-1)
