"""The I/O batcher: failures reach the right waiters, and an operation queued just as a lane
finishes still runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from spoolsmtp.iobatch import IoBatch


def test_operations_queued_one_after_another_on_one_lane_all_run(tmp_path: Path) -> None:
    """Each run is issued only after the previous returned: the lane that served one has just
    found the queue empty. The next must start a lane of its own, not wait forever."""
    ran: list[int] = []

    async def main() -> None:
        batch = IoBatch(lanes=1)
        for i in range(50):

            def op(i: int = i) -> tuple[Path]:
                ran.append(i)
                return (tmp_path,)

            async with asyncio.timeout(10):  # not wait_for: run() must start in this task
                await batch.run(op)

    asyncio.run(main())
    assert ran == list(range(50))


def test_a_failing_operation_fails_only_its_own_waiter(tmp_path: Path) -> None:
    def good() -> tuple[Path]:
        return (tmp_path,)

    def bad() -> tuple[Path]:
        raise FileNotFoundError(2, "gone", "incoming/x")

    async def main() -> tuple[BaseException | None, ...]:
        batch = IoBatch()
        return await asyncio.gather(
            batch.run(good), batch.run(bad), batch.run(good), return_exceptions=True
        )

    results = asyncio.run(main())
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], FileNotFoundError)
