"""Quarantine blames an envelope only for crashes it plausibly caused, and never abandons mail
silently: stops we asked for and kills while a server thinks do not count; an envelope that
kills the worker while it is read is quarantined, its recipients fail and its sender is told."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from spoolsmtp.spool.journal import Replayed
from spoolsmtp.spool.quarantine import Reads, Verdict, assess
from tests.helpers import draft, report_failures, statuses
from tests.smtpservers import Script, SmtpServer
from tests.workerproc import WorkerProcess, wait_for

DOT = b"\r\n.\r\n"


def sent(srv: SmtpServer, dots: int) -> Callable[[], bool]:
    """True once the server has been sent ``dots`` final dots (and is thinking about them)."""
    return lambda: srv.wire.count(DOT) >= dots


def busy_or_idle(srv: SmtpServer, worker: WorkerProcess) -> Callable[[], bool]:
    """True once the server has been sent one more message, or nothing is left to send."""
    dot = sent(srv, srv.wire.count(DOT) + 1)
    return lambda: dot() or not (worker.files("active") or worker.files("incoming"))


def test_three_sigterms_while_a_slow_server_thinks_do_not_quarantine(tmp_path: Path) -> None:
    gate = threading.Event()
    srv = SmtpServer(Script(gate=gate))
    settings = {"smarthost": f"127.0.0.1:{srv.port}", "shutdown_timeout": "200ms"}
    try:
        for n in range(1, 4):
            worker = WorkerProcess(tmp_path, settings).start()
            if n == 1:
                worker.drop_drafts("slow.bsmtp", [draft("o@example.com", ["a@example.org"])])
            wait_for(sent(srv, n), what=f"dot sent, attempt {n}")
            assert worker.stop() == 0
        gate.set()
        last = WorkerProcess(tmp_path, settings).start()
        try:
            rec = wait_for(lambda: last.final("slow.bsmtp"), what="final record")
        finally:
            assert last.stop() == 0
    finally:
        gate.set()
        srv.stop()
    assert rec["state"] == "done", rec.get("reason")
    assert statuses(rec) == {"a@example.org": "delivered"}


def test_kill_9_while_the_server_answers_the_dot_does_not_quarantine(tmp_path: Path) -> None:
    gate = threading.Event()
    srv = SmtpServer(Script(gate=gate))
    settings = {"smarthost": f"127.0.0.1:{srv.port}"}
    try:
        for n in range(1, 4):
            worker = WorkerProcess(tmp_path, settings).start()
            if n == 1:
                worker.drop_drafts("job.bsmtp", [draft("o@example.com", ["a@example.org"])])
            wait_for(sent(srv, n), what=f"dot sent, attempt {n}")
            worker.kill()
        gate.set()
        last = WorkerProcess(tmp_path, settings).start()
        try:
            rec = wait_for(lambda: last.final("job.bsmtp"), what="final record")
        finally:
            assert last.stop() == 0
    finally:
        gate.set()
        srv.stop()
    assert rec["state"] == "done", rec.get("reason")
    (rcpt,) = rec["transactions"][0]["recipients"]
    assert rcpt["status"] == "delivered" and rcpt["possible_duplicate"]
    assert rec["crashes"] == 0


def test_a_kill_9_loop_over_many_envelopes_quarantines_none(tmp_path: Path) -> None:
    """Kill -9 the worker each time the server (answering the dot after a short think) has
    been sent another message, four times over, then let it finish: every envelope is
    delivered, none is quarantined."""
    srv = SmtpServer(Script(data_delay=0.3))
    settings = {"smarthost": f"127.0.0.1:{srv.port}"}
    names = [f"job{i:02d}.bsmtp" for i in range(20)]
    try:
        for n in range(4):
            worker = WorkerProcess(tmp_path, settings).start()
            if n == 0:
                for name in names:
                    worker.drop_drafts(name, [draft("o@example.com", [f"{name}@example.org"])])
            wait_for(busy_or_idle(srv, worker), what=f"a dot sent in run {n}")
            worker.kill()
        last = WorkerProcess(tmp_path, settings).start()
        try:
            records = wait_for(
                lambda: (
                    [last.final(name) for name in names]
                    if all(last.final(name) for name in names)
                    else None
                ),
                what="every envelope final",
            )
        finally:
            assert last.stop() == 0
    finally:
        srv.stop()
    assert [r["state"] for r in records] == ["done"] * len(names), [
        r.get("reason") for r in records
    ]
    assert last.files("rejected") == []


@pytest.mark.parametrize("crashes", [3, 4])
def test_an_envelope_that_kills_the_worker_while_read_is_quarantined_and_reported(
    tmp_path: Path, crashes: int
) -> None:
    """a@ is delivered on the first attempt, b@ deferred; every later read of the envelope
    kills the worker (SPOOLSMTP_CRASH_AT=reading). After three such crashes it is
    quarantined: a@ stays delivered, b@ fails, and the sender gets a report naming b@. If
    the read for that report kills the worker too (a fourth crash), it is quarantined unread
    and no report can be sent, but the record still says who failed."""
    # b@ is deferred however often the first worker tries it before it stops (its retries are
    # 50 ms apart): only the crashing workers come after
    srv = SmtpServer(Script(defer_first={"b@example.org": 1000}))
    settings = {
        "smarthost": f"127.0.0.1:{srv.port}",
        "retry": {"interval": "50ms", "max_interval": "50ms"},
    }
    crash = {"SPOOLSMTP_CRASH_AT": "reading"}
    try:
        first = WorkerProcess(tmp_path, settings).start()
        first.drop_drafts(
            "poison.bsmtp", [draft("o@example.com", ["a@example.org", "b@example.org"])]
        )
        wait_for(lambda: first.in_state("poison.bsmtp", "deferred"), what="first attempt")
        assert first.stop() == 0
        for _ in range(crashes):
            crashing = WorkerProcess(tmp_path, settings, env=crash).start()
            assert crashing.wait_exit() == -signal.SIGKILL
        last = WorkerProcess(tmp_path, settings).start()
        try:
            rec = wait_for(lambda: last.final("poison.bsmtp"), what="quarantined")
        finally:
            assert last.stop() == 0
    finally:
        srv.stop()
    assert rec["state"] == "rejected"
    assert "quarantined" in rec["reason"] and f"{crashes} times" in rec["reason"]
    assert (tmp_path / "spool" / rec["location"]).exists()
    assert statuses(rec) == {"a@example.org": "delivered", "b@example.org": "failed"}
    b = rec["transactions"][0]["recipients"][1]
    assert (b["reply"]["code"], b["reply"]["enhanced"]) == (554, "5.3.0")
    # (the report about b@ is delivered too: bounces.requeue; not counted here)
    assert [m.rcpt_tos for m in srv.messages if m.mail_from != "<>"] == [["a@example.org"]]
    # the mail log says so too, once: b@ bounced by the quarantine (README, The mail log)
    bounced = re.findall(
        r"to=<b@example\.org>, relay=none, .*dsn=5\.3\.0, status=bounced", last.log.read_text()
    )
    assert len(bounced) == 1
    if crashes == 3:
        (report,) = last.files("bounces")
        assert report_failures(report)[1] == {"b@example.org"}
    else:
        assert last.files("bounces") == []
        assert "no report was sent" in rec["reason"]


def test_a_crash_while_several_were_read_blames_none_until_one_is_read_alone() -> None:
    """Two envelopes being read when the worker died: neither is blamed, both are read alone
    next time; the one being read alone at the next crash is blamed, the other not."""
    both = {i: Replayed(phase="reading", crashes=1 if i == "b" else 0) for i in ("a", "b")}
    verdicts = assess(both, ["a", "b"])
    assert verdicts == {"a": Verdict(0, alone=True), "b": Verdict(1, alone=True)}
    again = {
        "a": Replayed(phase="reading", crashes=0, alone=True),
        "b": Replayed(phase="reading", crashes=1),
    }
    assert assess(again, ["a", "b"]) == {"a": Verdict(1, alone=True), "b": Verdict(1, True)}
    stopped = {"a": Replayed(phase="stopped", crashes=2), "b": Replayed(phase="read")}
    assert assess(stopped, ["a", "b"]) == {"a": Verdict(2, alone=True)}


def test_a_start_stopped_by_its_config_is_never_a_crash(tmp_path: Path) -> None:
    """An envelope left in active/ (its worker killed after the claim) and a worker that
    cannot start, four times over, because something that is not a socket sits at its
    control socket's path (exit 78): the stops are the config's, never the envelope's. Once
    the path is free the envelope is delivered, not quarantined."""
    srv = SmtpServer()
    settings = {"smarthost": f"127.0.0.1:{srv.port}"}
    try:
        claimed = WorkerProcess(tmp_path, settings, env={"SPOOLSMTP_CRASH_AT": "after_claim"})
        claimed.start()
        # large enough to be read in a thread: a start that resumed before opening its
        # sockets was still reading it when the socket error stopped it
        big = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
        claimed.drop_drafts("left.bsmtp", [draft("o@example.com", ["a@example.org"], big * 20_000)])
        assert claimed.wait_exit() == -signal.SIGKILL
        squatter = tmp_path / "spool" / "control.sock"
        squatter.unlink()  # the killed worker's socket
        squatter.write_text("not a socket\n")
        for _ in range(4):
            refused = WorkerProcess(tmp_path, settings).start()
            assert refused.wait_exit() == 78
        squatter.unlink()
        last = WorkerProcess(tmp_path, settings).start()
        try:
            rec = wait_for(lambda: last.final("left.bsmtp"), what="delivered")
        finally:
            assert last.stop() == 0
    finally:
        srv.stop()
    assert rec["state"] == "done", rec
    assert [m.rcpt_tos for m in srv.messages] == [["a@example.org"]]


def test_a_read_waits_for_no_commit_of_its_own_and_its_mark_reaches_the_disk(
    tmp_path: Path,
) -> None:
    """The ``read`` mark of a new envelope rides with the journal's next commit instead of a
    commit the read waits for: reads end while the journal cannot commit, many reads ending
    together cost one commit, and each mark is on disk soon after without anyone asking. A
    read alone still commits its mark before the next read may begin."""
    from spoolsmtp.spool.iobatch import IoBatch
    from spoolsmtp.spool.journal import Journal, replay

    async def run() -> tuple[int, int, int]:
        journal = Journal(tmp_path / "journal", IoBatch())
        reads = Reads(journal, {"alone": Verdict(1, alone=True)})
        ids = [f"E{i}" for i in range(20)]
        for envelope_id in ids:
            reads.mark(envelope_id)
        await journal.commit()  # the claims' commit
        before = journal.commits

        async def read(envelope_id: str) -> None:
            async with reads.reading(envelope_id):
                await asyncio.sleep(0)

        # the journal's disk is stuck (its I/O lock held): every read must end all the same
        with journal._io_lock:
            await asyncio.wait_for(asyncio.gather(*(read(i) for i in ids)), 10)
            waited = journal.commits - before
        await asyncio.wait_for(_flushed(reads), 10)
        after_flush = journal.commits - before
        async with reads.reading("alone"):
            pass
        alone = journal.commits - before - after_flush
        return waited, after_flush, alone

    waited, after_flush, alone = asyncio.run(run())
    assert waited == 0  # no read waited for a commit
    assert 1 <= after_flush <= 2  # one flush for all twenty (one more if a mark came late)
    assert alone == 2  # ``reading`` alone before, ``read`` after
    phases = {i: r.phase for i, r in replay(tmp_path / "journal").items()}
    assert phases == {**{f"E{i}": "read" for i in range(20)}, "alone": "read"}


async def _flushed(reads: Reads) -> None:
    while reads._flushing is not None:
        await asyncio.sleep(0.01)
