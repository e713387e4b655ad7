"""QUERY's view of the spool's files: counted in a thread, one scan at a time, and never a
count from before the query came in."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from spoolsmtp.spool.spoolview import FolderCounts, result


class Gated(FolderCounts):
    """Each scan counts, then waits for ``gate`` before it returns."""

    def __init__(self, folder: Path) -> None:
        super().__init__({"incoming": folder, "rejected": folder})
        self.gate = threading.Event()
        self.scans = 0

    def _count_all(self) -> dict[str, int]:
        counted = super()._count_all()
        self.scans += 1
        self.gate.wait(30)
        return counted


def test_hidden_files_and_reasons_are_not_counted_and_a_missing_folder_holds_none(
    tmp_path: Path,
) -> None:
    for name in ("a", "b.reason", ".tmp-c"):
        (tmp_path / name).write_text("x")
    counts = FolderCounts({"incoming": tmp_path, "rejected": tmp_path, "bounces": tmp_path / "no"})
    assert asyncio.run(counts.counts()) == {"incoming": 2, "rejected": 1, "bounces": 0}


def test_queries_during_a_scan_share_the_next_one_which_sees_what_came_before_them(
    tmp_path: Path,
) -> None:
    counts = Gated(tmp_path)

    async def run() -> list[dict[str, int]]:
        first = asyncio.ensure_future(counts.counts())
        deadline = time.monotonic() + 30
        while counts.scans < 1:
            assert time.monotonic() < deadline, "the first scan never ran"
            await asyncio.sleep(0.001)
        (tmp_path / "new").write_text("x")  # after the first scan counted, before these asked
        later = [asyncio.ensure_future(counts.counts()) for _ in range(5)]
        await asyncio.sleep(0)
        counts.gate.set()
        return [await first, *[await t for t in later]]

    answers = asyncio.run(run())
    assert [a["incoming"] for a in answers] == [0, 1, 1, 1, 1, 1]
    assert counts.scans == 2


def test_a_result_record_is_read_and_a_missing_one_is_none(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"id": "a"}')
    assert asyncio.run(result(tmp_path / "a.json")) == {"id": "a"}
    assert asyncio.run(result(tmp_path / "b.json")) is None
