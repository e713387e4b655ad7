"""The worker end to end: a subprocess over a real spool, real SMTP servers on loopback."""

from __future__ import annotations

import email
import signal
import threading
import time
from functools import partial
from pathlib import Path

import pytest
from flufl.bounce import all_failures

from spoolsmtp.bsmtp import response, writer
from spoolsmtp.bsmtp.writer import Draft
from spoolsmtp.model import config
from spoolsmtp.model.envelope import MailParams, Notify, Recipient, Ret
from spoolsmtp.spool import envfile
from tests.helpers import draft, report_failures, statuses
from tests.smtpservers import Script, SmtpServer
from tests.workerproc import WorkerProcess, start_worker, wait_for


def test_delivers_and_records_every_recipient(tmp_path: Path, server: SmtpServer) -> None:
    w = start_worker(tmp_path, server)
    try:
        w.drop_drafts("job1.bsmtp", [draft("oper@example.com", ["a@example.org", "b@example.net"])])
        rec = wait_for(lambda: w.final("job1.bsmtp"), what="job1 done")
    finally:
        assert w.stop() == 0
    assert statuses(rec) == {"a@example.org": "delivered", "b@example.net": "delivered"}
    first = rec["transactions"][0]["recipients"][0]
    assert first["reply"]["code"] == 250 and first["host"] == "127.0.0.1"
    assert first["attempts"] == 1
    assert rec["location"] == f"done/{rec['id']}.bsmtp"
    assert (w.spool / rec["location"]).exists()
    assert w.files("incoming") == [] and w.files("active") == []
    assert [sorted(m.rcpt_tos) for m in server.messages] == [["a@example.org", "b@example.net"]]


def test_partial_failure_writes_a_report_a_bounce_parser_understands(tmp_path: Path) -> None:
    srv = SmtpServer(
        Script(rcpt={"gone@example.org": "550 5.1.1 <gone@example.org>: no such user"})
    )
    w = start_worker(tmp_path, srv)
    try:
        w.drop_drafts(
            "j.bsmtp", [draft("oper@example.com", ["ok@example.org", "gone@example.org"])]
        )
        rec = wait_for(lambda: w.final("j.bsmtp"))
    finally:
        w.stop()
        srv.stop()
    assert statuses(rec) == {"ok@example.org": "delivered", "gone@example.org": "failed"}
    (report,) = w.files("bounces")
    assert report.name == f"{rec['id']}.1.ndr.bsmtp"
    delayed, failed = report_failures(report)
    assert failed == {"gone@example.org"}
    assert delayed == set()
    text = report.read_text()
    assert "RCPT TO:<oper@example.com>" in text and "MAIL FROM:<>" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 <gone@example.org>: no such user" in text
    assert "Content-Type: text/rfc822-headers" in text


def test_deferral_then_success(tmp_path: Path) -> None:
    srv = SmtpServer(Script(defer_first={"slowbox@example.org": 1}))
    w = start_worker(tmp_path, srv, retry={"interval": "300ms", "max_interval": "1s"})
    try:
        w.drop_drafts("j.bsmtp", [draft("o@example.com", ["slowbox@example.org"])])
        # the record is replaced before the envelope is moved to where it says: wait for both
        deferred = wait_for(
            lambda: (
                (r := w.in_state("j.bsmtp", "deferred"))
                and (w.spool / r["location"]).exists()
                and r
            ),
            what="a deferred record and the envelope where it says",
        )
        assert deferred["transactions"][0]["recipients"][0]["reply"]["code"] == 450
        assert deferred["transactions"][0]["recipients"][0]["next_attempt_at"]
        rec = wait_for(lambda: w.final("j.bsmtp"))
    finally:
        w.stop()
        srv.stop()
    rcpt = rec["transactions"][0]["recipients"][0]
    assert rcpt["status"] == "delivered" and rcpt["attempts"] == 2
    assert len(srv.messages) == 1
    assert w.files("bounces") == []


def test_expiry_fails_with_a_report(tmp_path: Path) -> None:
    srv = SmtpServer(Script(rcpt={"never@example.org": "451 4.3.0 come back later"}))
    w = start_worker(
        tmp_path,
        srv,
        retry={"interval": "200ms", "max_interval": "300ms", "max_age": "1s", "warning_age": "0s"},
    )
    try:
        w.drop_drafts("j.bsmtp", [draft("o@example.com", ["never@example.org"])])
        rec = wait_for(lambda: w.final("j.bsmtp"))
    finally:
        w.stop()
        srv.stop()
    rcpt = rec["transactions"][0]["recipients"][0]
    assert rcpt["status"] == "failed"
    assert rcpt["reply"]["enhanced"] == "5.4.7"
    assert "451 4.3.0 come back later" in rcpt["reply"]["text"]
    assert rcpt["attempts"] >= 2
    (report,) = w.files("bounces")
    assert report_failures(report) == (set(), {"never@example.org"})


def test_delay_warning_is_sent_once(tmp_path: Path) -> None:
    srv = SmtpServer(Script(rcpt={"later@example.org": "451 4.3.0 later"}))
    w = start_worker(
        tmp_path,
        srv,
        retry={
            "interval": "150ms",
            "max_interval": "200ms",
            "max_age": "1h",
            "warning_age": "300ms",
        },
    )
    try:
        w.drop_drafts("j.bsmtp", [draft("o@example.com", ["later@example.org"])])
        wait_for(lambda: w.files("bounces"), what="delay warning")
        wait_for(
            lambda: (
                (r := w.record_for("j.bsmtp"))
                and r["transactions"][0]["recipients"][0]["attempts"] >= 5
            )
        )
    finally:
        w.stop()
        srv.stop()
    (report,) = w.files("bounces")
    assert report.name.endswith(".1.delay.bsmtp")
    assert report_failures(report) == ({"later@example.org"}, set())
    assert "Will-Retry-Until:" in report.read_text()


def test_null_sender_reports_go_to_deadletter(tmp_path: Path) -> None:
    srv = SmtpServer(Script(rcpt={"gone@example.org": "550 5.1.1 no"}))
    w = start_worker(tmp_path, srv)
    try:
        w.drop_drafts("j.bsmtp", [draft("", ["gone@example.org"])])
        wait_for(lambda: w.final("j.bsmtp"))
    finally:
        w.stop()
        srv.stop()
    assert w.files("bounces") == []
    (dead,) = w.files("deadletter")
    assert dead.name.endswith(".1.ndr.bsmtp")


def test_notify_never_and_success(tmp_path: Path) -> None:
    srv = SmtpServer(Script(rcpt={"gone@example.org": "550 5.1.1 no"}))
    w = start_worker(tmp_path, srv)
    try:
        w.drop_drafts(
            "j.bsmtp",
            [
                Draft(
                    "o@example.com",
                    (
                        Recipient("gone@example.org", frozenset()),
                        Recipient("ok@example.org", frozenset({Notify.SUCCESS})),
                    ),
                    b"Subject: x\r\n\r\nbody\r\n",
                    MailParams(ret=Ret.FULL),
                )
            ],
        )
        wait_for(lambda: w.final("j.bsmtp"))
    finally:
        w.stop()
        srv.stop()
    (report,) = w.files("bounces")
    assert report.name.endswith(".1.success.bsmtp")
    assert "Action: relayed" in report.read_text()


def test_verb_on_keeps_the_batch_response(tmp_path: Path, server: SmtpServer) -> None:
    w = start_worker(tmp_path, server)
    data = (
        b"HELO batch.test\r\nVERB ON\r\nTICK 7\r\nMAIL FROM:<o@example.com>\r\n"
        b"RCPT TO:<a@example.org>\r\nRCPT TO:<bad>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n"
    )
    try:
        w.drop("verbose.bsmtp", data)
        rec = wait_for(lambda: w.final("verbose.bsmtp"))
    finally:
        w.stop()
    kept = (w.spool / "results" / f"{rec['id']}.response").read_text()
    cfg = config.parse("hostname: spoolsmtp.test\n")
    expected = response.render(envfile.read_bytes(data, "verbose.bsmtp", cfg.limits, cfg.helo_name))
    assert kept == expected
    assert "050 TICK 7" in kept
    assert rec["batch_errors"] == [
        "verbose.bsmtp:6: 501 5.1.3 bad recipient address syntax: expected local@domain"
    ]
    (batch,) = w.files("bounces")
    assert batch.name.endswith(".batch.bsmtp")
    assert "RCPT TO:<o@example.com>" in batch.read_text()


def test_not_an_envelope_goes_to_rejected_with_its_reason(
    tmp_path: Path, server: SmtpServer
) -> None:
    w = start_worker(tmp_path, server)
    try:
        w.drop("picture.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR")
        rec = wait_for(lambda: w.final("picture.png"))
    finally:
        w.stop()
    assert rec["state"] == "rejected"
    assert "picture.png:1: binary content" in rec["reason"]
    names = sorted(p.name for p in w.files("rejected"))
    assert names == [f"{rec['id']}.picture.png", f"{rec['id']}.picture.png.reason"]
    assert server.connections == 0


def test_dot_files_and_tmp_files_are_never_taken(tmp_path: Path, server: SmtpServer) -> None:
    w = start_worker(tmp_path, server)
    body = b"HELO h\r\nMAIL FROM:<o@example.com>\r\nRCPT TO:<a@example.org>\r\nDATA\r\nx\r\n.\r\n"
    try:
        (w.spool / "incoming" / ".hidden").write_bytes(body)
        (w.spool / "incoming" / "partial.tmp").write_bytes(body)
        w.drop("real.bsmtp", body)
        wait_for(lambda: w.final("real.bsmtp"))
    finally:
        w.stop()
    left = sorted(p.name for p in (w.spool / "incoming").iterdir())
    assert left == [".hidden", "partial.tmp"]
    assert len(server.messages) == 1


def test_a_file_written_in_place_is_taken_only_when_settled(
    tmp_path: Path, server: SmtpServer
) -> None:
    w = start_worker(tmp_path, server, spool={"settle_seconds": "400ms"})
    lines = [b"HELO h", b"MAIL FROM:<o@example.com>", b"RCPT TO:<a@example.org>", b"DATA"]
    lines += [b"line %d" % i for i in range(12)] + [b".", b"QUIT"]
    try:
        with open(w.spool / "incoming" / "legacy.bsmtp", "wb") as fh:
            for line in lines:
                fh.write(line + b"\r\n")
                fh.flush()
                time.sleep(0.05)  # a slow legacy writer, not a wait for the worker
        rec = wait_for(lambda: w.final("legacy.bsmtp"))
    finally:
        w.stop()
    assert rec["state"] == "done"
    assert server.messages[0].content.endswith(b"line 11\r\n")


def test_a_file_moved_in_whole_is_taken_without_settling(
    tmp_path: Path, server: SmtpServer
) -> None:
    """A rename into incoming/ (from a dot-name, or from another folder of the same file
    system) puts a whole file there: it is taken at once, however long the settle time for
    files written in place (test_a_file_written_in_place_is_taken_only_when_settled)."""
    w = start_worker(tmp_path, server, spool={"settle_seconds": "1h"})
    # the control socket answers a moment before incoming/ is watched: a file renamed in
    # that moment is found by the first look, as one written in place (it settles); "ready"
    # comes once the watch is armed (a race the fresh-clone CI hit once)
    wait_for(lambda: w.readies() >= 1, what="the worker watching incoming/")
    outside = tmp_path / "outside"
    outside.mkdir()
    message = writer.render([draft("o@example.com", ["b@example.org"])], "batch.test")
    (outside / "moved.bsmtp").write_bytes(message)
    try:
        w.drop_drafts("dotted.bsmtp", [draft("o@example.com", ["a@example.org"])])
        (outside / "moved.bsmtp").rename(w.spool / "incoming" / "moved.bsmtp")
        wait_for(lambda: w.final("dotted.bsmtp") and w.final("moved.bsmtp"), timeout=20)
    finally:
        w.stop()
    assert sorted(m.rcpt_tos[0] for m in server.messages) == ["a@example.org", "b@example.org"]


def test_files_present_at_start_are_taken(tmp_path: Path, server: SmtpServer) -> None:
    w = WorkerProcess(tmp_path, {"smarthost": f"127.0.0.1:{server.port}"})
    for i in range(5):
        w.drop_drafts(f"early{i}.bsmtp", [draft("o@example.com", [f"r{i}@example.org"])])
    w.start()
    try:
        wait_for(lambda: all(w.final(f"early{i}.bsmtp") for i in range(5)))
    finally:
        w.stop()
    assert len(server.messages) == 5


def test_a_thousand_files_dropped_at_once(tmp_path: Path, server: SmtpServer) -> None:
    w = start_worker(tmp_path, server)
    try:
        for i in range(1000):
            w.drop_drafts(f"bulk{i:04d}.bsmtp", [draft("o@example.com", [f"r{i}@example.org"])])
        wait_for(lambda: len(w.files("done")) == 1000, timeout=120, what="1000 done")
    finally:
        assert w.stop() == 0
    got = sorted(m.rcpt_tos[0] for m in server.messages)
    assert got == sorted(f"r{i}@example.org" for i in range(1000))
    assert w.files("incoming") == [] and w.files("active") == [] and w.files("deferred") == []
    assert all(r["state"] == "done" for r in w.records())


def test_small_and_large_files_reach_every_destination_whole(tmp_path: Path) -> None:
    """A small file is read once and sent from memory, to several destinations at once; a
    file too large for that is streamed from disk. Either way each server gets the text whole,
    dot-stuffing undone by it exactly as we applied it."""
    small = b"Subject: small\r\n\r\n.dot first\r\nbody\r\n"
    lines = [b".%06d dotted" % i if i % 5 == 0 else b"y" * 76 for i in range(5000)]
    large = b"Subject: large\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    assert len(large) > 300 * 1024
    one, two = SmtpServer(), SmtpServer()
    w = start_worker(
        tmp_path,
        one,
        routes={"one.example": f"127.0.0.1:{one.port}", "two.example": f"127.0.0.1:{two.port}"},
        smarthost=None,
    )
    try:
        for name, message in (("small.bsmtp", small), ("large.bsmtp", large)):
            rcpts = ["a@one.example", "b@two.example"]
            w.drop_drafts(name, [draft("o@example.com", rcpts, message)])
            rec = wait_for(partial(w.final, name), what=name)
            assert set(statuses(rec).values()) == {"delivered"}
    finally:
        w.stop()
        one.stop()
        two.stop()
    for srv in (one, two):
        assert [m.content.endswith(small) for m in srv.messages] == [True, False]
        assert [m.content.endswith(large) for m in srv.messages] == [False, True]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_worker_runs_on_either_event_loop(
    tmp_path: Path, server: SmtpServer, loop: str
) -> None:
    """uvloop is the default where installed; asyncio's own loop stays a supported choice."""
    w = start_worker(tmp_path, server, event_loop=loop)
    try:
        w.drop_drafts("j.bsmtp", [draft("o@example.com", ["a@example.org"])])
        rec = wait_for(lambda: w.final("j.bsmtp"), what="j done")
    finally:
        assert w.stop() == 0
    assert statuses(rec) == {"a@example.org": "delivered"}
    assert f"event loop {loop}".encode() in w.log.read_bytes()


def test_a_slow_destination_does_not_delay_a_fast_one(tmp_path: Path) -> None:
    """The slow server holds its reply to every final dot until the fast destination has all
    of its own: nothing sent to the slow one waits in front of the fast ones."""
    gate = threading.Event()
    slow = SmtpServer(Script(gate=gate))
    fast = SmtpServer()
    w = start_worker(
        tmp_path,
        fast,
        routes={"slow.example": f"127.0.0.1:{slow.port}", "fast.example": f"127.0.0.1:{fast.port}"},
        smarthost=None,
        delivery={"max_per_destination": 2, "timeouts": {"data_end": "30s"}},
    )
    try:
        for i in range(6):
            w.drop_drafts(f"slow{i}.bsmtp", [draft("o@example.com", [f"s{i}@slow.example"])])
        for i in range(6):
            w.drop_drafts(f"fast{i}.bsmtp", [draft("o@example.com", [f"f{i}@fast.example"])])
        wait_for(lambda: all(w.final(f"fast{i}.bsmtp") for i in range(6)), timeout=30)
        slow_done = sum(1 for i in range(6) if w.final(f"slow{i}.bsmtp"))
        gate.set()
        wait_for(lambda: all(w.final(f"slow{i}.bsmtp") for i in range(6)), timeout=60)
    finally:
        gate.set()
        w.stop()
        slow.stop()
        fast.stop()
    assert slow_done == 0
    assert len(fast.messages) == 6 and len(slow.messages) == 6


def test_an_envelope_being_delivered_has_a_record_that_says_so(tmp_path: Path) -> None:
    """A job polling results/ID.json sees the envelope taken while its delivery is under way
    (a moment after the take: most envelopes are finished sooner, and their first record is
    the final one)."""
    gate = threading.Event()
    srv = SmtpServer(Script(gate=gate))
    w = start_worker(tmp_path, srv)
    try:
        w.drop_drafts("j.bsmtp", [draft("o@example.com", ["a@example.org"])])
        during = wait_for(lambda: w.in_state("j.bsmtp", "active"), what="record while active")
        gate.set()
        after = wait_for(lambda: w.final("j.bsmtp"))
    finally:
        gate.set()
        w.stop()
        srv.stop()
    assert during["location"] == f"active/{during['id']}.bsmtp"
    assert statuses(during) == {"a@example.org": "queued"}
    assert after["id"] == during["id"] and statuses(after) == {"a@example.org": "delivered"}


def test_sigterm_lets_work_in_flight_finish(tmp_path: Path) -> None:
    """SIGTERM arrives while the server holds its answer to the final dot: the worker waits
    for it, records the delivery and exits 0."""
    gate = threading.Event()
    srv = SmtpServer(Script(gate=gate))
    w = start_worker(tmp_path, srv)
    try:
        w.drop_drafts("j.bsmtp", [draft("o@example.com", ["a@example.org"])])
        wait_for(lambda: b"\r\n.\r\n" in srv.wire, what="the final dot sent")
        assert w.proc is not None
        w.proc.send_signal(signal.SIGTERM)
        gate.set()
        code = w.wait_exit()
    finally:
        gate.set()
        w.kill()
        srv.stop()
    assert code == 0
    rec = w.final("j.bsmtp")
    assert rec is not None and statuses(rec) == {"a@example.org": "delivered"}


def test_requeued_reports_are_delivered_by_spoolsmtp_itself(tmp_path: Path) -> None:
    srv = SmtpServer(Script(rcpt={"gone@example.org": "550 5.1.1 no such user"}))
    w = start_worker(tmp_path, srv, bounces={"requeue": True})
    try:
        w.drop_drafts("j.bsmtp", [draft("oper@example.com", ["gone@example.org"])])
        wait_for(lambda: w.final("j.bsmtp"))
        report = wait_for(lambda: [m for m in srv.messages if m.rcpt_tos == ["oper@example.com"]])
    finally:
        w.stop()
        srv.stop()
    # a copy stays in bounces/ for the operator's tools (issue 16.5)
    (copy,) = w.files("bounces")
    assert copy.name.endswith(".1.ndr.bsmtp")
    (msg,) = report
    assert msg.mail_from in ("", "<>")
    _, failed = all_failures(email.message_from_bytes(msg.content))
    assert {a.decode() for a in failed} == {"gone@example.org"}
    assert len(w.files("done")) == 2
