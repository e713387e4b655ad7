"""The pure parts of adoption: carrying a dead node's journal into another's, a claim another
node won, and which result record is newer on a spool several nodes share."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from spoolsmtp.spool import journal, nodes, quarantine
from spoolsmtp.spool.iobatch import IoBatch
from spoolsmtp.spool.journal import Journal


def test_what_a_dead_node_journaled_is_carried_whole_into_the_adopters_journal(
    tmp_path: Path,
) -> None:
    dead, ours = tmp_path / "dead", tmp_path / "ours"
    old = json.dumps({"id": "A", "n": 1}).encode()
    new = json.dumps({"id": "A", "n": 2}).encode()

    async def main() -> None:
        j = Journal(dead, IoBatch())
        j.append({"t": "claim", "id": "A", "name": "job.bsmtp"})
        j.append_record("A", old)
        j.append({"t": "dot", "id": "A", "tx": 1, "rcpts": ["a@x.org", "b@x.org"]})
        j.append({"t": "rcpt", "id": "A", "tx": 1, "rcpt": "a@x.org", "result": {"s": "ok"}})
        j.append({"t": "report", "id": "A", "kind": "failed"})
        j.append_record("A", new)
        j.append({"t": "claim", "id": "B", "name": "other.bsmtp"})
        await j.commit()
        j.close()
        adopter = Journal(ours, IoBatch())
        adopter.take(journal.carried(dead, ["A", "Z"]))
        await adopter.commit()
        known = adopter.known("A")
        assert known is not None and known.record == json.loads(new)
        adopter.close()

    asyncio.run(main())
    entry = journal.replay(ours)["A"]
    assert entry.source == "job.bsmtp" and entry.reports == {"failed"}
    assert entry.dots == {(1, "a@x.org"), (1, "b@x.org")}
    assert entry.results == {(1, "a@x.org"): {"s": "ok"}}
    assert entry.record == json.loads(new)
    assert set(journal.replay(ours)) == {"A"}, "only the envelopes adopted"
    assert journal.drop_segments(dead) == 1 and journal.replay(dead) == {}


def test_a_claim_another_node_won_is_never_blamed_for_a_crash(tmp_path: Path) -> None:
    """The claim lost the rename race; later this node takes the same envelope from deferred/
    and dies before reading it: that death is not counted against the envelope."""

    async def main() -> None:
        j = Journal(tmp_path, IoBatch())
        reads = quarantine.Reads(j, {})
        reads.mark("A")
        j.append({"t": "claim", "id": "A", "name": "job.bsmtp"})
        reads.forget("A")  # the rename found nothing: another node had it
        await j.commit()
        j.close()

    asyncio.run(main())
    replayed = journal.replay(tmp_path)
    assert quarantine.assess(replayed, ["A"]) == {}


def record(attempts: list[int], updated: str) -> dict[str, Any]:
    recipients = [{"address": f"r{i}@x.org", "attempts": n} for i, n in enumerate(attempts)]
    return {"transactions": [{"recipients": recipients}], "updated_at": updated}


def test_a_record_another_node_moved_on_is_not_restored_over() -> None:
    journaled = record([1, 1], "2026-01-01T10:00:00Z")
    assert nodes.superseded(journaled, record([1, 2], "2026-01-01T09:00:00Z")), "more attempts"
    assert nodes.superseded(journaled, record([1, 1], "2026-01-01T10:00:01Z")), "written later"
    assert not nodes.superseded(journaled, record([1, 1], "2026-01-01T10:00:00Z"))
    assert not nodes.superseded(journaled, record([1, 0], "2026-01-01T11:00:00Z")), "lost attempt"
    assert not nodes.superseded(journaled, {})
