"""The incoming/ watcher in-process, on a real folder with a real watchdog observer, with the
narrow inotify mask (renames in, closes after writing) and with watchdog's own events (the
fallback where the narrow mask is not available): a file renamed in is reported at once, a file
written in place once it has settled, a writer's temp file never."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from spoolsmtp import watcher as watcher_module
from spoolsmtp.watcher import IncomingWatcher


async def until(found: list[str], name: str, deadline: float = 10.0) -> float:
    """Wait until ``name`` is reported; return when (monotonic)."""
    async with asyncio.timeout(deadline):
        while name not in found:
            await asyncio.sleep(0.01)
    return time.monotonic()


@pytest.mark.parametrize("narrow", [True, False])
def test_renamed_at_once_written_in_place_once_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, narrow: bool
) -> None:
    if not narrow:
        monkeypatch.setattr(watcher_module, "_NARROW", None)
    found: list[str] = []
    settle = 1.5

    async def main() -> tuple[float, float]:
        w = IncomingWatcher(tmp_path, settle, found.append, known=found.__contains__)
        w.start()
        try:
            start = time.monotonic()
            (tmp_path / ".renamed.bsmtp").write_bytes(b"HELO x\n")
            (tmp_path / ".renamed.bsmtp").rename(tmp_path / "renamed.bsmtp")
            renamed = await until(found, "renamed.bsmtp") - start
            start = time.monotonic()
            with open(tmp_path / "inplace.bsmtp", "wb") as fh:
                fh.write(b"HELO x\n")
            in_place = await until(found, "inplace.bsmtp") - start
            return renamed, in_place
        finally:
            w.stop()

    renamed, in_place = asyncio.run(main())
    assert renamed < settle  # not held back by the settle rule
    assert in_place >= settle - 0.05  # its mtime had to be settle_seconds old (clock slack)
    assert found == ["renamed.bsmtp", "inplace.bsmtp"]  # the dot-file never
