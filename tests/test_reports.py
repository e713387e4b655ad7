"""The reports spoolsmtp writes, read as their readers read them: the ``email`` package and
flufl.bounce, a real worker over a real spool, real SMTP servers on loopback."""

from __future__ import annotations

import asyncio
import email
import signal
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path

from flufl.bounce import all_failures

from spoolsmtp.bsmtp.writer import Draft
from spoolsmtp.model import config
from spoolsmtp.model.envelope import MailParams, Notify, Recipient
from spoolsmtp.policy.dsn import utf8_addr_decode
from spoolsmtp.spool import envfile
from tests.helpers import draft
from tests.smtpservers import RawServer, Script, SmtpServer, read_line
from tests.workerproc import WorkerProcess, start_worker, wait_for

FAST_RETRY = {"interval": "200ms", "max_interval": "300ms", "max_age": "1s", "warning_age": "0s"}


def report_of(path: Path) -> Message:
    """The report message inside a report envelope, parsed as a mail reader would."""
    env = envfile.read(path, config.Config().limits, "x")
    assert env.accepted, env.errors
    return email.message_from_bytes(envfile.message_bytes(path, env.transactions[0].message))


def failures(message: Message) -> tuple[set[str], set[str]]:
    temporary, permanent = all_failures(message)
    return {a.decode() for a in temporary}, {a.decode() for a in permanent}


def status_blocks(message: Message) -> list[Message]:
    (part,) = [p for p in message.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks[1:] if isinstance(b, Message)]


# -- every report keeps its own name ---------------------------------------------------------


def test_a_later_failure_of_the_same_transaction_gets_a_report_of_its_own(
    tmp_path: Path,
) -> None:
    srv = SmtpServer(
        Script(
            rcpt={
                "gone@example.org": "550 5.1.1 no such user",
                "later@example.org": "451 4.3.0 come back later",
            }
        )
    )
    w = start_worker(tmp_path, srv.port, retry=FAST_RETRY)
    try:
        w.drop_drafts(
            "j.bsmtp", [draft("o@example.com", ["gone@example.org", "later@example.org"])]
        )
        wait_for(lambda: w.final("j.bsmtp"))
    finally:
        w.stop()
        srv.stop()
    reports = w.files("bounces")
    assert len(reports) == 2, reports
    found = sorted(sorted(failures(report_of(r))[1]) for r in reports)
    assert found == [["gone@example.org"], ["later@example.org"]]
    ids = {report_of(r)["Message-ID"] for r in reports}
    assert len(ids) == 2


def test_requeued_reports_of_one_transaction_are_all_delivered(tmp_path: Path) -> None:
    srv = SmtpServer(
        Script(
            rcpt={
                "gone@example.org": "550 5.1.1 no such user",
                "later@example.org": "451 4.3.0 come back later",
            }
        )
    )
    w = start_worker(tmp_path, srv.port, retry=FAST_RETRY, bounces={"requeue": True})
    try:
        w.drop_drafts(
            "j.bsmtp", [draft("o@example.com", ["gone@example.org", "later@example.org"])]
        )
        wait_for(lambda: w.final("j.bsmtp"))
        sent = wait_for(
            lambda: (
                (got := [m for m in srv.messages if m.rcpt_tos == ["o@example.com"]])
                and len(got) == 2
                and got
            )
        )
    finally:
        w.stop()
        srv.stop()
    found = sorted(sorted(failures(email.message_from_bytes(m.content))[1]) for m in sent)
    assert found == [["gone@example.org"], ["later@example.org"]]


# -- what operators and bounce parsers look for ---------------------------------------------


def test_a_report_names_the_failed_recipients_the_original_and_our_envelope(
    tmp_path: Path,
) -> None:
    srv = SmtpServer(Script(rcpt={"gone@example.org": "550 5.1.1 no such user"}))
    w = start_worker(tmp_path, srv.port)
    original = b"Subject: hello\r\nMessage-ID:\r\n <orig.1@batch.test>\r\n\r\nhi\r\n"
    try:
        w.drop_drafts(
            "j.bsmtp",
            [
                draft("o@example.com", ["gone@example.org", "ok@example.org"], original),
                draft("o@example.com", ["gone@example.org"]),
            ],
        )
        rec = wait_for(lambda: w.final("j.bsmtp"))
    finally:
        w.stop()
        srv.stop()
    first, second = (report_of(r) for r in w.files("bounces"))
    assert first["X-Failed-Recipients"] == "gone@example.org"
    assert first["References"] == "<orig.1@batch.test>"
    assert first["In-Reply-To"] == "<orig.1@batch.test>"
    assert first["X-Spoolsmtp-Envelope-Id"] == rec["id"]
    assert "Original-Envelope-Id" not in str(first)
    # the second message had no Message-ID: nothing to refer to
    assert second["References"] is None and second["In-Reply-To"] is None
    assert second["X-Spoolsmtp-Envelope-Id"] == rec["id"]


# -- our own refusals are ours ---------------------------------------------------------------


def test_a_refusal_decided_here_is_not_dressed_as_the_servers(tmp_path: Path) -> None:
    srv = SmtpServer(size_limit=500)
    w = start_worker(tmp_path, srv.port)
    try:
        w.drop_drafts("j.bsmtp", [draft("o@example.com", ["big@example.org"], b"x\r\n" * 300)])
        rec = wait_for(lambda: w.final("j.bsmtp"))
    finally:
        w.stop()
        srv.stop()
    (rcpt,) = rec["transactions"][0]["recipients"]
    assert rcpt["status"] == "failed" and rcpt["reply"]["enhanced"] == "5.3.4"
    assert rcpt["host"] is None and rcpt["decided_locally"] is True
    assert "127.0.0.1" in rcpt["reply"]["text"]  # whose limit it was
    (report,) = w.files("bounces")
    message = report_of(report)
    (block,) = status_blocks(message)
    assert block["Remote-MTA"] is None
    assert block["Diagnostic-Code"].startswith("X-Spoolsmtp; 552 5.3.4 ")
    assert failures(message)[1] == {"big@example.org"}
    assert b"MAIL FROM" not in srv.wire


# -- NOTIFY=SUCCESS: one notice, from whoever is responsible ----------------------------------


def dsn_server() -> tuple[RawServer, list[bytes]]:
    """A server that offers DSN (aiosmtpd refuses RCPT parameters): the lines it received."""
    received: list[bytes] = []

    async def dialogue(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 dsn.test ready\r\n")
        while True:
            line = await read_line(reader)
            received.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-dsn.test\r\n250-8BITMIME\r\n250 DSN\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                received.append(await reader.readuntil(b"\r\n.\r\n"))
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"250 2.0.0 ok\r\n")
            await writer.drain()

    return RawServer(dialogue), received


def success_draft(address: str) -> Draft:
    rcpt = Recipient(address, frozenset({Notify.SUCCESS, Notify.FAILURE}))
    return Draft("o@example.com", (rcpt,), b"Subject: x\r\n\r\nbody\r\n")


def test_success_relayed_to_a_dsn_server_is_reported_by_it_not_by_us(tmp_path: Path) -> None:
    srv, received = dsn_server()
    w = start_worker(tmp_path, srv.port)
    try:
        w.drop_drafts("j.bsmtp", [success_draft("ok@example.org")])
        rec = wait_for(lambda: w.final("j.bsmtp"))
    finally:
        w.stop()
        srv.stop()
    (rcpt,) = rec["transactions"][0]["recipients"]
    assert rcpt["status"] == "delivered" and rcpt["dsn_relayed"] is True
    assert b"RCPT TO:<ok@example.org> NOTIFY=FAILURE,SUCCESS\r\n" in received
    assert w.files("bounces") == []


def test_success_relayed_to_a_server_without_dsn_is_reported_as_relayed(
    tmp_path: Path, server: SmtpServer
) -> None:
    w = start_worker(tmp_path, server.port)
    try:
        w.drop_drafts("j.bsmtp", [success_draft("ok@example.org")])
        rec = wait_for(lambda: w.final("j.bsmtp"))
    finally:
        w.stop()
    assert rec["transactions"][0]["recipients"][0]["dsn_relayed"] is False
    (report,) = w.files("bounces")
    (block,) = status_blocks(report_of(report))
    assert block["Action"] == "relayed"
    assert block["Final-Recipient"] == "rfc822; ok@example.org"


def test_that_the_next_hop_reports_success_survives_a_crash_before_our_reports(
    tmp_path: Path,
) -> None:
    srv, _ = dsn_server()
    settings = {"smarthost": f"127.0.0.1:{srv.port}"}
    try:
        crashing = WorkerProcess(tmp_path, settings, env={"SPOOLSMTP_CRASH_AT": "after_journal"})
        crashing.start().drop_drafts("j.bsmtp", [success_draft("ok@example.org")])
        assert crashing.wait_exit() == -signal.SIGKILL
        worker = WorkerProcess(tmp_path, settings).start()
        try:
            rec = wait_for(lambda: worker.final("j.bsmtp"))
        finally:
            assert worker.stop() == 0
    finally:
        srv.stop()
    assert rec["transactions"][0]["recipients"][0]["dsn_relayed"] is True
    assert worker.files("bounces") == []


# -- reports about UTF-8 addresses (RFC 6533) -------------------------------------------------


def global_status_blocks(path: Path) -> list[Message]:
    """The per-recipient blocks of the message/global-delivery-status part of a report (the
    email package reads such a part as a message of its own: this reads its text as is)."""
    env = envfile.read(path, config.Config().limits, "x")
    raw = envfile.message_bytes(path, env.transactions[0].message)
    start = raw.index(b"Content-Type: message/global-delivery-status\r\n")
    start = raw.index(b"\r\n\r\n", start) + 4
    text = raw[start : raw.index(b"\r\n--", start)].decode("utf-8")
    return [HeaderParser().parsestr(b) for b in text.split("\r\n\r\n")[1:]]


def test_a_failed_utf8_recipient_gets_an_rfc6533_report_a_bounce_parser_reads(
    tmp_path: Path,
) -> None:
    srv = SmtpServer(Script(rcpt={"j\u00f6rg@example.org": "550 5.1.1 no such user"}))
    w = start_worker(tmp_path, srv.port)
    try:
        w.drop_drafts(
            "j.bsmtp",
            [
                draft(
                    "o@example.com",
                    ["j\u00f6rg@example.org", "gone@example.org"],
                    params=MailParams(smtputf8=True),
                )
            ],
        )
        wait_for(lambda: w.final("j.bsmtp"))
    finally:
        w.stop()
        srv.stop()
    (report,) = w.files("bounces")
    assert b"MAIL FROM:<>\r\n" in report.read_bytes()  # to an ASCII sender: no SMTPUTF8 needed
    message = report_of(report)
    assert message.get_param("report-type") == "global-delivery-status"
    (block,) = global_status_blocks(report)
    assert block["Final-Recipient"] == "utf-8; j\u00f6rg@example.org"
    assert block["Action"] == "failed" and block["Status"] == "5.1.1"
    human = message.get_payload(0)
    assert isinstance(human, Message) and human.get_content_type() == "text/plain"
    assert human.get_content_charset() == "utf-8"
    text = human.get_payload(decode=True)
    assert isinstance(text, bytes) and "<j\u00f6rg@example.org>" in text.decode("utf-8")
    # flufl.bounce reads X-Failed-Recipients (its Exim detector), where a UTF-8 address is
    # written in RFC 6533's ASCII form
    _, failed = failures(message)
    assert {utf8_addr_decode(a) for a in failed} == {"j\u00f6rg@example.org"}


def test_an_ascii_report_stays_ascii(tmp_path: Path) -> None:
    srv = SmtpServer(Script(rcpt={"gone@example.org": "550 5.1.1 no such user"}))
    w = start_worker(tmp_path, srv.port)
    try:
        w.drop_drafts("j.bsmtp", [draft("o@example.com", ["gone@example.org"])])
        wait_for(lambda: w.final("j.bsmtp"))
    finally:
        w.stop()
        srv.stop()
    (report,) = w.files("bounces")
    message = report_of(report)
    assert report.read_bytes().isascii()
    assert message.get_param("report-type") == "delivery-status"
    human = message.get_payload(0)
    assert isinstance(human, Message) and human.get_content_type() == "text/plain"
    assert human.get_content_charset() == "us-ascii"
    (block,) = status_blocks(message)
    assert block["Final-Recipient"] == "rfc822; gone@example.org"


def test_a_report_to_a_utf8_sender_is_written_so_that_it_can_be_sent(tmp_path: Path) -> None:
    srv = SmtpServer(Script(rcpt={"gone@example.org": "550 5.1.1 no such user"}))
    w = start_worker(tmp_path, srv.port, bounces={"requeue": True})
    try:
        w.drop_drafts(
            "j.bsmtp",
            [
                draft(
                    "j\u00f6rg@example.com", ["gone@example.org"], params=MailParams(smtputf8=True)
                )
            ],
        )
        wait_for(lambda: w.final("j.bsmtp"))
        sent = wait_for(
            lambda: [m for m in srv.messages if m.rcpt_tos == ["j\u00f6rg@example.com"]]
        )
    finally:
        w.stop()
        srv.stop()
    assert w.files("deadletter") == []
    (msg,) = sent
    assert msg.mail_from in ("", "<>") and "SMTPUTF8" in msg.mail_options
    _, failed = failures(email.message_from_bytes(msg.content))
    assert failed == {"gone@example.org"}


def test_a_requeued_report_cannot_be_blocked_by_a_name_taken_before_it(tmp_path: Path) -> None:
    """incoming/ is open to others: a folder made there under the report's foreseeable name
    (the envelope's id is the submitted file's) left the report unwritten and the envelope
    retried for ever. Reports dropped into incoming/ get a name no one can foresee."""
    srv = SmtpServer(Script(rcpt={"gone@example.org": "550 5.1.1 no such user"}))
    w = start_worker(tmp_path, srv.port, bounces={"requeue": True})
    envelope_id = "20261201-000000-000000-abcdef"
    try:
        (w.spool / "incoming" / f"{envelope_id}.1.ndr.bsmtp").mkdir()
        w.drop_drafts(f"{envelope_id}.bsmtp", [draft("o@example.com", ["gone@example.org"])])
        rec = wait_for(lambda: w.final(f"{envelope_id}.bsmtp"))
        wait_for(lambda: [m for m in srv.messages if m.rcpt_tos == ["o@example.com"]])
    finally:
        w.stop()
        srv.stop()
    assert rec["id"] == envelope_id and rec["state"] == "done"
