"""The I/O batcher: the log is committed before the operations of its batch, failures reach the
right waiters, and an operation queued just as a lane finishes still runs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from spoolsmtp.spool.iobatch import IoBatch


class RecordingLog:
    """A log that notes when it was synced, in the order of everything else."""

    def __init__(self, events: list[str], fail: bool = False) -> None:
        self.events = events
        self.fail = fail
        self.pending: list[str] = []
        self.lock = threading.Lock()

    def append(self, what: str) -> None:
        with self.lock:
            self.pending.append(what)

    def sync(self) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        with self.lock:
            done, self.pending = self.pending, []
        self.events.extend(f"committed {w}" for w in done)


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


def test_the_log_is_committed_before_the_operations_of_its_batch(tmp_path: Path) -> None:
    events: list[str] = []
    log = RecordingLog(events)

    async def claim(name: str) -> None:
        log.append(f"claim {name}")

        def rename() -> tuple[Path]:
            events.append(f"rename {name}")
            return (tmp_path,)

        await batch.run(rename)

    batch = IoBatch(lanes=2)
    batch.log = log

    async def main() -> None:
        await asyncio.gather(*(claim(f"f{i}") for i in range(20)))

    asyncio.run(main())
    for i in range(20):
        assert events.index(f"committed claim f{i}") < events.index(f"rename f{i}")


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


@pytest.mark.parametrize("inline", [True, False])
def test_when_the_log_cannot_be_committed_no_operation_runs(tmp_path: Path, inline: bool) -> None:
    """Neither the batch's operations nor a commit of its own (the mark before a final
    dot, which must then not be sent) hear success."""
    ran: list[str] = []
    batch = IoBatch(inline=inline)
    batch.log = RecordingLog([], fail=True)

    def op() -> tuple[Path]:
        ran.append("op")
        return (tmp_path,)

    async def main() -> list[BaseException | None]:
        runs = (batch.run(op), batch.run(op, quick=True), batch.run(quick=True))
        return list(await asyncio.gather(*runs, return_exceptions=True))

    results = asyncio.run(main())
    assert [type(r) for r in results] == [OSError, OSError, OSError]
    assert all("No space" in str(r) for r in results)
    assert ran == []


@pytest.mark.parametrize("inline", [True, False])
def test_a_commit_returns_once_the_log_is_synced_not_after_its_batch(
    tmp_path: Path, inline: bool
) -> None:
    """A journal commit (the mark before a final dot, on which a connection waits) shares
    its batch's fdatasync but not the rest: it returns while an operation of the same batch
    is still running (here one that cannot end until the commit has returned)."""
    events: list[str] = []
    log = RecordingLog(events)
    commit_returned = threading.Event()

    def slow() -> tuple[Path]:
        events.append("slow began")
        if not commit_returned.wait(5):  # fails the same way each time (the test's own is 10)
            raise TimeoutError("the commit waited for the rest of its batch")
        return (tmp_path,)

    async def main() -> None:
        batch = IoBatch(inline=inline)
        batch.log = log
        log.append("mark")
        slow_op = asyncio.ensure_future(batch.run(slow))
        commit = asyncio.ensure_future(batch.run(quick=True))
        async with asyncio.timeout(10):
            await commit
            assert "committed mark" in events
            commit_returned.set()
            await slow_op
        assert batch.batches == 1  # the two shared one batch, as under load

    asyncio.run(main())
    assert events[0] == "committed mark"


@pytest.mark.parametrize("inline", [True, False])
def test_quick_operations_run_after_the_commit_on_the_loop_only_when_inline(
    tmp_path: Path, inline: bool
) -> None:
    """On a local disk a rename runs on the loop (no hand-over of the interpreter lock per
    system call); elsewhere in the I/O thread. Either way after the log's commit, and a slow
    operation of the same batch still runs in the thread."""
    events: list[str] = []
    where: dict[str, bool] = {}
    batch = IoBatch(inline=inline)
    log = RecordingLog(events)
    batch.log = log

    def op(name: str) -> Callable[[], tuple[Path]]:
        def run() -> tuple[Path]:
            where[name] = threading.current_thread() is threading.main_thread()
            events.append(f"ran {name}")
            return (tmp_path,)

        return run

    async def main() -> None:
        log.append("quick")
        log.append("slow")
        await asyncio.gather(batch.run(op("quick"), quick=True), batch.run(op("slow")))

    asyncio.run(main())
    assert where == {"quick": inline, "slow": False}
    assert events.index("committed quick") < events.index("ran quick")
    assert events.index("committed slow") < events.index("ran slow")


def test_a_failing_quick_operation_fails_only_its_own_waiter(tmp_path: Path) -> None:
    def good() -> tuple[Path]:
        return (tmp_path,)

    def full() -> tuple[Path]:
        raise OSError(28, "No space left on device")

    async def main() -> tuple[BaseException | None, ...]:
        batch = IoBatch(inline=True)
        return await asyncio.gather(
            batch.run(good, quick=True),
            batch.run(full, quick=True),
            batch.run(good),
            return_exceptions=True,
        )

    results = asyncio.run(main())
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], OSError) and results[1].errno == 28


def test_a_quick_operation_whose_folder_cannot_be_synced_fails(tmp_path: Path) -> None:
    """The folder's fsync (in the thread) is part of the operation: it failing fails it."""
    gone = tmp_path / "gone"

    async def main() -> None:
        await IoBatch(inline=True).run(lambda: (gone,), quick=True)

    with pytest.raises(FileNotFoundError):
        asyncio.run(main())
