"""The incoming/ watcher in-process, on a real folder with a real watchdog observer, with the
narrow inotify mask (renames in, closes after writing) and with watchdog's own events (the
fallback where the narrow mask is not available): a file renamed in is reported at once, a file
written in place once it has settled, a writer's temp file never."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from spoolsmtp.spool import watcher as watcher_module
from spoolsmtp.spool.watcher import IncomingWatcher


async def until(found: list[str], name: str, deadline: float = 10.0) -> None:
    """Wait until ``name`` is reported."""
    async with asyncio.timeout(deadline):
        while name not in found:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("narrow", [True, False])
def test_renamed_at_once_written_in_place_once_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, narrow: bool
) -> None:
    """With an hour to settle, a file renamed in is still reported at once, while a file
    written in place before it is held back (events are handled in order, so it was seen
    first); with a short settle time the file written in place is reported once settled."""
    if not narrow:
        monkeypatch.setattr(watcher_module, "_NARROW", None)
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
