"""The journal of an envelope resumed at start: what it wrote before the restart is kept."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from spoolsmtp.spool import journal
from spoolsmtp.spool.iobatch import IoBatch
from spoolsmtp.spool.journal import Journal
from tests.hostile import fill, needs_root, small_tmpfs

RECORD = b'{"id":"A","source":"job.bsmtp","state":"active"}'


async def crashed_mid_send(folder: Path) -> None:
    """A worker that claimed A, sent its final dot, wrote its record, then was killed."""
    j = Journal(folder, IoBatch())
    j.append({"t": "claim", "id": "A", "name": "job.bsmtp"})
    j.append_record("A", RECORD)
    j.append({"t": "dot", "id": "A", "tx": 1, "rcpts": ["a@x.org"]})
    await j.commit()
    j.close()


async def restarted(folder: Path) -> Journal:
    """The next start: A is resumed from active/ and is being read again."""
    j = Journal(folder, IoBatch())
    j.adopt({"A"})
    j.append({"t": "phase", "id": "A", "phase": "reading"})
    await j.commit()
    return j


def test_a_resumed_envelope_put_back_still_knows_its_dot_and_source(tmp_path: Path) -> None:
    folder = tmp_path / "journal"

    async def main() -> journal.Replayed | None:
        await crashed_mid_send(folder)
        j = await restarted(folder)
        known = j.known("A")
        j.close()
        return known

    known = asyncio.run(main())
    # a put-back retry builds its record from this: without the dot the recipient is sent
    # again unflagged, without the source the record names A.bsmtp
    assert known is not None
    assert known.dots == {(1, "a@x.org")}
    assert known.source == "job.bsmtp"
    assert known.record is not None and known.record["source"] == "job.bsmtp"


def test_a_new_segment_after_a_restart_does_not_drop_the_dot_written_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "journal"
    monkeypatch.setattr(journal, "SEGMENT_BYTES", 0)  # every commit begins a new segment

    async def main() -> None:
        await crashed_mid_send(folder)
        j = await restarted(folder)
        j.append({"t": "phase", "id": "A", "phase": "read"})
        await j.commit()
        j.checkpoint([tmp_path])
        j.close()  # then killed again: the next start replays what is left

    asyncio.run(main())
    entry = journal.replay(folder)["A"]
    assert entry.dots == {(1, "a@x.org")}
    assert entry.source == "job.bsmtp"
    assert entry.record is not None and entry.record["source"] == "job.bsmtp"


class RacingJournal(Journal):
    """A real journal in which, once, another lane appends A's dot at the moment a new
    segment is begun, and the disk fills right then (so copying forward fails)."""

    race: Path | None = None
    filler: Path | None = None

    def _open_segment(self, number: int) -> None:
        if self.race is not None:
            fs, self.race = self.race, None
            self.append({"t": "dot", "id": "A", "tx": 1, "rcpts": ["a@x.org"]})
            self.filler = fill(fs)
        super()._open_segment(number)


@needs_root
def test_a_dot_written_into_the_next_segment_keeps_that_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's dot is appended while segment 1 is current but written into segment 2 (segment 1
    was closed between the append and the write): segment 2 must stay while A is active,
    even when the checkpoint's new segment cannot be written and another envelope finishes."""
    with small_tmpfs(tmp_path / "fs", size="1m") as fs:
        folder = fs / "journal"

        async def main() -> None:
            j = RacingJournal(folder, IoBatch())
            j.append({"t": "claim", "id": "A", "name": "a"})
            j.append({"t": "claim", "id": "B", "name": "b"})
            await j.commit()
            monkeypatch.setattr(journal, "SEGMENT_BYTES", 0)
            j.race = fs
            j.append({"t": "phase", "id": "B", "phase": "read"})
            await j.commit()  # written; the new segment 2 begun, copying forward failed
            monkeypatch.undo()
            assert j.filler is not None
            j.filler.unlink()
            await j.commit()  # A's dot, into segment 2
            filler = fill(fs)
            j.checkpoint([fs])  # a new segment 3 cannot be copied into
            filler.unlink()
            j.finished("B")
            j.checkpoint([fs])
            j.close()  # killed: the next start replays what is left

        asyncio.run(main())
        entry = journal.replay(folder)["A"]
        assert entry.dots == {(1, "a@x.org")}
