"""The incoming/ watcher in-process, on a real folder: with inotify read on the event loop
(Linux) and with watchdog's observer and its own events (the fallback elsewhere): a file
renamed in is reported at once, a file written in place once it has settled, a writer's temp
file never; when the kernel's event queue overflows, nothing is missed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoolsmtp.spool import watcher as watcher_module
from spoolsmtp.spool.watcher import IncomingWatcher


async def until(found: list[str], name: str, deadline: float = 10.0) -> None:
    """Wait until ``name`` is reported."""
    async with asyncio.timeout(deadline):
        while name not in found:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("inotify", [True, False])
def test_renamed_at_once_written_in_place_once_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inotify: bool
) -> None:
    """With an hour to settle, a file renamed in is still reported at once, while a file
    written in place before it is held back (events are handled in order, so it was seen
    first); with a short settle time the file written in place is reported once settled."""
    if not inotify:
        monkeypatch.setattr(watcher_module, "_INOTIFY", False)
    held, settled = tmp_path / "held", tmp_path / "settled"
    held.mkdir()
    settled.mkdir()
    found: list[str] = []
    found_settled: list[str] = []

    async def main() -> None:
        w = IncomingWatcher(held, 3600, found.append, known=found.__contains__)
        w.start()
        try:
            with open(held / "inplace.bsmtp", "wb") as fh:
                fh.write(b"HELO x\n")
            (held / ".renamed.bsmtp").write_bytes(b"HELO x\n")
            (held / ".renamed.bsmtp").rename(held / "renamed.bsmtp")
            await until(found, "renamed.bsmtp")
        finally:
            w.stop()
        w = IncomingWatcher(settled, 0.3, found_settled.append, known=found_settled.__contains__)
        w.start()
        try:
            with open(settled / "inplace.bsmtp", "wb") as fh:
                fh.write(b"HELO x\n")
            await until(found_settled, "inplace.bsmtp")
        finally:
            w.stop()

    asyncio.run(main())
    assert found == ["renamed.bsmtp"]  # not the one still settling, and the dot-file never
    assert found_settled == ["inplace.bsmtp"]


QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")


@pytest.fixture
def short_inotify_queue() -> Iterator[int]:
    """The kernel keeps at most 16 events per inotify instance made meanwhile (root only;
    the setting is restored after)."""
    if os.geteuid() != 0 or not os.access(QUEUED, os.W_OK):
        pytest.skip("needs root to shorten the kernel's inotify queue")
    before = QUEUED.read_text()
    QUEUED.write_text("16")
    try:
        yield 16
    finally:
        QUEUED.write_text(before)


def test_overflowed_queue_misses_nothing(tmp_path: Path, short_inotify_queue: int) -> None:
    """100 files renamed in while the loop is busy: the kernel queues 16 events, drops the
    rest and says so; every file is still reported, once (those the rescan found once they
    have settled: it cannot tell how they got there)."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    found: list[str] = []
    names = [f"f{i:03d}.bsmtp" for i in range(100)]

    async def main() -> None:
        w = IncomingWatcher(folder, 0.2, found.append, known=found.__contains__)
        w.start()
        try:
            for name in names:  # no await between: the loop reads nothing meanwhile
                (folder / f".{name}").write_bytes(b"HELO x\n")
                (folder / f".{name}").rename(folder / name)
            async with asyncio.timeout(10):
                while len(found) < len(names):
                    await asyncio.sleep(0.01)
        finally:
            w.stop()

    asyncio.run(main())
    assert sorted(found) == names
