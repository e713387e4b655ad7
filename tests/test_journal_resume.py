"""The journal of an envelope resumed at start: what it wrote before the restart is kept."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from spoolsmtp import journal
from spoolsmtp.iobatch import IoBatch
from spoolsmtp.journal import Journal

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
