"""Crash safety: kill -9 the worker at every named phase, restart it, and check the ledger.

Every recipient must end delivered exactly once, or failed with one report, or still queued:
nothing lost, and no duplicate outside the RFC 5321 section 6.1 window (after the final dot was
sent), where a duplicate is possible and must be marked ``possible_duplicate``.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest

from spoolsmtp.spool.crashpoint import PHASES
from tests.helpers import draft, report_failures
from tests.smtpservers import Script, SmtpServer
from tests.workerproc import WorkerProcess, wait_for

GOOD = ["a@example.org", "b@example.net"]
BAD = "gone@example.org"
WINDOW = {"after_dot", "after_250"}


@pytest.mark.parametrize("phase", PHASES)
def test_kill_at_each_phase_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, phase: str
) -> None:
    srv = SmtpServer(Script(rcpt={BAD: "550 5.1.1 no such user"}))
    settings = {"smarthost": f"127.0.0.1:{srv.port}"}
    try:
        crashing = WorkerProcess(tmp_path, settings, env={"SPOOLSMTP_CRASH_AT": phase}).start()
        crashing.drop_drafts("job.bsmtp", [draft("oper@example.com", [*GOOD, BAD])])
        assert crashing.wait_exit() == -signal.SIGKILL
        worker = WorkerProcess(tmp_path, settings).start()
        try:
            rec = wait_for(lambda: worker.final("job.bsmtp"), what=f"final after {phase}")
        finally:
            assert worker.stop() == 0
    finally:
        srv.stop()
    got = Counter(r for m in srv.messages for r in m.rcpt_tos)
    recipients = {r["address"]: r for t in rec["transactions"] for r in t["recipients"]}
    for address in GOOD:
        assert recipients[address]["status"] == "delivered", (phase, recipients[address])
        if phase in WINDOW and got[address] == 2:
            assert recipients[address]["possible_duplicate"], phase
        else:
            assert got[address] == 1, (phase, got)
    assert recipients[BAD]["status"] == "failed"
    reports = worker.files("bounces")
    assert len(reports) == 1, (phase, reports)
    assert report_failures(reports[0])[1] == {BAD}
    assert worker.files("active") == [] and worker.files("incoming") == []
    assert rec["crashes"] == 0


def test_a_file_that_crashes_the_worker_three_times_is_quarantined(tmp_path: Path) -> None:
    srv = SmtpServer()
    settings = {"smarthost": f"127.0.0.1:{srv.port}"}
    try:
        first = WorkerProcess(tmp_path, settings, env={"SPOOLSMTP_CRASH_AT": "reading"}).start()
        first.drop_drafts("poison.bsmtp", [draft("o@example.com", ["a@example.org"])])
        assert first.wait_exit() == -signal.SIGKILL
        for _ in range(2):
            again = WorkerProcess(tmp_path, settings, env={"SPOOLSMTP_CRASH_AT": "reading"})
            again.start()
            assert again.wait_exit() == -signal.SIGKILL
        last = WorkerProcess(tmp_path, settings).start()
        try:
            rec = wait_for(lambda: last.final("poison.bsmtp"))
            last.drop_drafts("healthy.bsmtp", [draft("o@example.com", ["h@example.org"])])
            healthy = wait_for(lambda: last.final("healthy.bsmtp"))
        finally:
            assert last.stop() == 0
    finally:
        srv.stop()
    assert rec["state"] == "rejected"
    assert "quarantined" in rec["reason"] and "3 times" in rec["reason"]
    assert (tmp_path / "spool" / rec["location"]).exists()
    assert healthy["state"] == "done"
    # the poison's report to its sender is delivered too (bounces.requeue): not counted here
    assert [m.rcpt_tos for m in srv.messages if m.mail_from != "<>"] == [["h@example.org"]]


@pytest.mark.parametrize("lost", ["record", "record and move"])
def test_what_the_file_system_loses_before_the_checkpoint_the_journal_restores(
    tmp_path: Path, lost: str
) -> None:
    """A finished envelope's result file and its move out of active/ are synced by the next
    checkpoint, not at once: the journal holds them until then. Kill the worker as that
    checkpoint begins, undo what a power failure could have undone, and restart: the record
    comes back, nobody is sent the message again, no second report is written."""
    srv = SmtpServer(Script(rcpt={BAD: "550 5.1.1 no such user"}))
    settings = {"smarthost": f"127.0.0.1:{srv.port}"}
    try:
        crashing = WorkerProcess(
            tmp_path, settings, env={"SPOOLSMTP_CRASH_AT": "before_checkpoint"}
        )
        crashing.start().drop_drafts("job.bsmtp", [draft("oper@example.com", [*GOOD, BAD])])
        assert crashing.wait_exit() == -signal.SIGKILL
        before = crashing.final("job.bsmtp")
        assert before is not None and before["state"] == "done"
        result = tmp_path / "spool" / "results" / f"{before['id']}.json"
        result.write_bytes(b"")
        if lost == "record and move":
            name = f"{before['id']}.bsmtp"
            (tmp_path / "spool" / "done" / name).rename(tmp_path / "spool" / "active" / name)
        worker = WorkerProcess(tmp_path, settings).start()
        try:
            rec = wait_for(lambda: worker.final("job.bsmtp"), what="record restored")
            wait_for(lambda: not worker.files("deferred"), what="the report delivered")
        finally:
            assert worker.stop() == 0
    finally:
        srv.stop()
    assert rec["id"] == before["id"] and rec["state"] == "done"
    statuses = {r["address"]: r["status"] for t in rec["transactions"] for r in t["recipients"]}
    assert statuses == {**dict.fromkeys(GOOD, "delivered"), BAD: "failed"}
    # the report about BAD is delivered too (bounces.requeue), once: no second one after all
    assert Counter(r for m in srv.messages for r in m.rcpt_tos) == Counter(
        [*GOOD, "oper@example.com"]
    )
    assert len(worker.files("bounces")) == 1
    assert worker.files("active") == [] and len(worker.files("done")) == 2  # and the report
    segments = list((tmp_path / "spool" / "journal").glob("*.log"))
    assert all(p.stat().st_size == 0 for p in segments), "a clean stop checkpoints the journal"
