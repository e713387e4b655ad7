"""The journal: what a restart reads back, and which segments a checkpoint may delete."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from spoolsmtp.spool import journal
from spoolsmtp.spool.iobatch import IoBatch
from spoolsmtp.spool.journal import Journal
from tests.hostile import fill, needs_root, small_tmpfs


def segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.log"))


async def claimed(folder: Path, *ids: str) -> Journal:
    """A journal (new, or reopened after a crash) that has committed a claim for each id."""
    j = Journal(folder, IoBatch())
    for envelope_id in ids:
        j.append({"t": "claim", "id": envelope_id, "name": envelope_id.lower()})
    await j.commit()
    return j


def test_replay_gives_the_newest_record_and_every_final_reply(tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    first = json.dumps({"id": "A", "state": "active", "n": 1}).encode() + b"\n"
    second = json.dumps({"id": "A", "state": "done", "text": "caf\u00e9 \u2713"}).encode() + b"\n"

    async def main() -> None:
        j = Journal(folder, IoBatch())
        j.append({"t": "claim", "id": "A", "name": "job.bsmtp"})
        j.append({"t": "dot", "id": "A", "tx": 1, "rcpts": ["a@x.org"]})
        j.append({"t": "rcpt", "id": "A", "tx": 1, "rcpt": "a@x.org", "result": {"s": "ok"}})
        j.append_record("A", first)
        j.append_record("A", second)
        await j.commit()
        j.close()

    asyncio.run(main())
    with open(segments(folder)[-1], "ab") as fh:
        fh.write(b'{"t":"rcpt","id":"A","tx":1,"rcpt":"b@x.org","res')  # torn by a crash
    entry = journal.replay(folder)["A"]
    assert entry.source == "job.bsmtp"
    assert entry.dots == {(1, "a@x.org")}
    assert entry.results == {(1, "a@x.org"): {"s": "ok"}}
    assert entry.record == json.loads(second)


def test_a_checkpoint_deletes_only_segments_whose_envelopes_all_finished(tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    spool = [tmp_path]

    async def main() -> None:
        j = await claimed(folder, "A", "B")
        assert j.checkpoint(spool) == 0, "both still active: nothing to delete"
        j.finished("A")
        assert j.checkpoint(spool) == 0, "B is still active"
        assert "A" in journal.replay(folder)
        j.finished("B")
        assert j.checkpoint(spool) == 1
        assert journal.replay(folder) == {}
        j.append({"t": "claim", "id": "C", "name": "c"})
        await j.commit()
        assert set(journal.replay(folder)) == {"C"}
        j.close()

    asyncio.run(main())


def test_segments_found_at_start_stay_until_the_envelopes_resumed_from_them_finish(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "journal"
    spool = [tmp_path]

    async def crashed() -> None:
        (await claimed(folder, "A", "Z")).close()

    async def restarted() -> None:
        j = Journal(folder, IoBatch())
        j.adopt({"A"})
        assert j.checkpoint(spool) == 0
        assert set(journal.replay(folder)) == {"A", "Z"}
        j.finished("A")
        assert j.checkpoint(spool) == 1
        assert journal.replay(folder) == {}
        j.close()

    asyncio.run(crashed())
    asyncio.run(restarted())


def test_a_long_active_envelope_does_not_pin_the_segments_written_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a segment is closed, the records of envelopes still active are copied into the new
    one: the old segments can go, and a restart still finds everything."""
    monkeypatch.setattr(journal, "SEGMENT_BYTES", 2000)
    folder = tmp_path / "journal"
    spool = [tmp_path]
    record = json.dumps({"id": "SLOW", "state": "active"}).encode()

    async def main() -> None:
        j = Journal(folder, IoBatch())
        j.append({"t": "claim", "id": "SLOW", "name": "slow.bsmtp"})
        j.append({"t": "dot", "id": "SLOW", "tx": 1, "rcpts": ["a@x.org"]})
        j.append_record("SLOW", record)
        await j.commit()
        (first,) = segments(folder)
        for i in range(200):  # many quick envelopes while SLOW waits on its server
            j.append({"t": "claim", "id": f"Q{i}", "name": f"q{i}"})
            await j.commit()
            j.finished(f"Q{i}")
        j.checkpoint(spool)
        assert not first.exists(), "SLOW's records were copied forward; its segment went"
        assert len(segments(folder)) <= 2
        entry = journal.replay(folder)["SLOW"]
        assert entry.source == "slow.bsmtp" and entry.dots == {(1, "a@x.org")}
        assert entry.record == json.loads(record)
        j.finished("SLOW")
        j.checkpoint(spool)
        assert journal.replay(folder) == {}
        j.close()

    asyncio.run(main())


@needs_root
def test_a_commit_after_a_failed_write_is_not_reported_durable_and_nothing_is_torn(
    tmp_path: Path,
) -> None:
    """The disk fills while a batch of records is written: the write is cut short (a torn
    line) and fails. A commit must not then report success for records that are not on disk,
    and once space is back every record, the lost batch and the next, reads back whole."""
    with small_tmpfs(tmp_path / "fs", size="1m") as fs:
        folder = fs / "journal"
        big = "x" * 20_000  # larger than what is left of the segment's last page

        async def main() -> None:
            j = await claimed(folder, "A")
            filler = fill(fs)
            j.append({"t": "claim", "id": "B", "name": "b", "pad": big})
            with pytest.raises(OSError):
                await j.commit()
            # another caller committing now must hear that B is not on disk either
            j.append({"t": "claim", "id": "C", "name": "c"})
            with pytest.raises(OSError):
                await j.commit()
            filler.unlink()
            j.append({"t": "claim", "id": "D", "name": "d"})
            await j.commit()
            j.close()

        asyncio.run(main())
        replayed = journal.replay(folder)
        assert {k: v.source for k, v in replayed.items()} == {
            "A": "a",
            "B": "b",
            "C": "c",
            "D": "d",
        }


@needs_root
def test_a_record_swallowed_by_a_failed_batch_does_not_get_success_from_the_next(
    tmp_path: Path,
) -> None:
    """B is appended while another caller's batch fails: B's own commit, in the next batch,
    must fail too (its record is not on disk), not succeed on an empty buffer."""
    with small_tmpfs(tmp_path / "fs", size="1m") as fs:
        folder = fs / "journal"

        async def main() -> None:
            j = await claimed(folder, "A")
            filler = fill(fs)
            j.append({"t": "claim", "id": "X", "name": "x" * 20_000})
            j.append({"t": "claim", "id": "B", "name": "b"})
            with pytest.raises(OSError):
                await j.commit()  # X's caller
            with pytest.raises(OSError):
                await j.commit()  # B's caller
            filler.unlink()
            await j.commit()
            j.close()

        asyncio.run(main())
        assert set(journal.replay(folder)) == {"A", "X", "B"}
