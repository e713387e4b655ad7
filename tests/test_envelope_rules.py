"""The envelope's rules as a job sees them: what the worker delivers and reports, and the
per-file limits that keep one hostile envelope from exhausting memory or freezing other mail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spoolsmtp.bsmtp import writer
from spoolsmtp.model.config import Limits
from spoolsmtp.spool import envfile
from tests.helpers import draft
from tests.smtpservers import Script, SmtpServer
from tests.workerproc import ROOT, start_worker, wait_for

MB = 1024 * 1024


def lines(*text: str) -> bytes:
    return "".join(t + "\r\n" for t in text).encode()


def test_a_full_length_line_starting_with_a_dot_is_delivered_intact(
    tmp_path: Path, server: SmtpServer
) -> None:
    text = b"Subject: dots\r\n\r\n." + b"x" * 997 + b"\r\n"
    w = start_worker(tmp_path, server)
    try:
        w.drop_drafts("dots.bsmtp", [draft("o@example.com", ["a@example.org"], text)])
        rec = wait_for(lambda: w.final("dots.bsmtp"))
    finally:
        w.stop()
    assert rec["state"] == "done" and rec["batch_errors"] == []
    (message,) = server.messages
    assert message.content.endswith(b"\r\nSubject: dots\r\n\r\n." + b"x" * 997 + b"\r\n")


def test_helo_in_a_transaction_drops_its_recipients(tmp_path: Path, server: SmtpServer) -> None:
    data = lines(
        "HELO batch.test",
        "MAIL FROM:<first@example.com>",
        "RCPT TO:<lost@example.org>",
        "HELO batch.test",
        "MAIL FROM:<second@example.com>",
        "RCPT TO:<kept@example.org>",
        "DATA",
        "hello",
        ".",
        "QUIT",
    )
    w = start_worker(tmp_path, server)
    try:
        w.drop("helo.bsmtp", data)
        rec = wait_for(lambda: w.final("helo.bsmtp"))
    finally:
        w.stop()
    # (the batch error report to first@ is delivered too: bounces.requeue; not counted here)
    assert [(m.mail_from, m.rcpt_tos) for m in server.messages if m.mail_from != "<>"] == [
        ("second@example.com", ["kept@example.org"])
    ]
    assert rec["batch_errors"] == [
        "helo.bsmtp:4: 503 5.5.1 transaction begun at line 2 abandoned without DATA: HELO resets it"
    ]


def test_local_parts_differing_in_case_each_get_their_copy(
    tmp_path: Path, server: SmtpServer
) -> None:
    rcpts = ["Dup@example.org", "dup@example.org", "dup@EXAMPLE.org"]
    w = start_worker(tmp_path, server)
    try:
        w.drop_drafts("case.bsmtp", [draft("o@example.com", rcpts)])
        rec = wait_for(lambda: w.final("case.bsmtp"))
    finally:
        w.stop()
    delivered = {r["address"]: r["status"] for r in rec["transactions"][0]["recipients"]}
    assert delivered == {"Dup@example.org": "delivered", "dup@example.org": "delivered"}
    assert sorted(server.messages[0].rcpt_tos) == ["Dup@example.org", "dup@example.org"]


def test_postmaster_without_a_domain_is_our_postmaster(tmp_path: Path, server: SmtpServer) -> None:
    data = lines(
        "HELO batch.test", "MAIL FROM:<o@example.com>", "RCPT TO:<postmaster>", "DATA", "hi", "."
    )
    w = start_worker(tmp_path, server)
    try:
        w.drop("pm.bsmtp", data)
        rec = wait_for(lambda: w.final("pm.bsmtp"))
    finally:
        w.stop()
    assert rec["state"] == "done" and rec["batch_errors"] == []
    assert server.messages[0].rcpt_tos == ["postmaster@spoolsmtp.test"]


def report_to(path: Path) -> tuple[str, str]:
    """(recipient, the refused commands listed) of a batch error report envelope."""
    env = envfile.read(path, Limits(), "x")
    text = envfile.message_bytes(path, env.transactions[0].message).decode()
    refused = text.split("Refused commands:")[1].split("The batch response:")[0]
    return env.transactions[0].recipients[0].address, refused


def test_each_sender_gets_the_refusals_of_its_own_transactions(
    tmp_path: Path, server: SmtpServer
) -> None:
    data = lines(
        "RCPT TO:<early@example.org>",
        "HELO batch.test",
        "MAIL FROM:<alice@example.com>",
        "RCPT TO:<bad>",
        "RCPT TO:<a@example.org>",
        "DATA",
        "x",
        ".",
        "MAIL FROM:<bob@example.com>",
        "RCPT TO:<b@example.org>",
        "FROB",
        "DATA",
        "y",
        ".",
    )
    w = start_worker(tmp_path, server)
    try:
        w.drop("two.bsmtp", data)
        rec = wait_for(lambda: w.final("two.bsmtp"))
    finally:
        w.stop()
    reports = {p.name.removeprefix(rec["id"] + "."): p for p in w.files("bounces")}
    assert sorted(reports) == ["batch.2.bsmtp", "batch.bsmtp"]
    alice, alice_lines = report_to(reports["batch.bsmtp"])
    bob, bob_lines = report_to(reports["batch.2.bsmtp"])
    assert alice == "alice@example.com"
    assert "two.bsmtp:1: 503" in alice_lines and "two.bsmtp:4: 501" in alice_lines
    assert "FROB" not in alice_lines
    assert bob == "bob@example.com"
    assert bob_lines.strip() == "two.bsmtp:11: 500 5.5.2 command unrecognized: FROB"
    assert sorted(rec["reports"]) == ["batch", "batch.2"]


# -- one hostile envelope -----------------------------------------------------------------------


def one_transaction_of_a_million_recipients() -> bytes:
    rcpts = b"".join(b"RCPT TO:<r%07d@example.org>\r\n" % n for n in range(1_000_000))
    return b"HELO h\r\nMAIL FROM:<a@example.com>\r\n" + rcpts + b"DATA\r\nx\r\n.\r\nQUIT\r\n"


def a_thousand_transactions_of_a_thousand_recipients() -> bytes:
    rcpts = b"".join(b"RCPT TO:<r%04d@example.org>\r\n" % n for n in range(1000))
    tx = b"MAIL FROM:<a@example.com>\r\n" + rcpts + b"DATA\r\nx\r\n.\r\n"
    return b"HELO h\r\n" + tx * 1000 + b"QUIT\r\n"


def a_hundred_thousand_transactions() -> bytes:
    tx = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nx\r\n.\r\n"
    return b"HELO h\r\n" + tx * 100_000 + b"QUIT\r\n"


def long_unknown_commands() -> bytes:
    return b"HELO h\r\n" + b"".join(b"X%0500d\r\n" % n for n in range(120_000))


CHECK_RSS = """
import json, re, sys, time
from spoolsmtp.app import cli
start = time.monotonic()
code = cli.main(["check", "-q", sys.argv[1]])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec
status = open("/proc/self/status").read()
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024
print(json.dumps({"code": code, "rss": peak, "seconds": time.monotonic() - start}))
"""


@pytest.mark.parametrize(
    ("make", "limit"),
    [
        (one_transaction_of_a_million_recipients, "limits.commands_per_file"),
        (a_thousand_transactions_of_a_thousand_recipients, "limits.recipients_per_file"),
        (a_hundred_thousand_transactions, "limits.transactions_per_file"),
        (long_unknown_commands, "limits.commands_per_file"),
    ],
)
def test_a_huge_envelope_is_refused_by_a_named_limit_in_bounded_memory(
    tmp_path: Path, make: Any, limit: str
) -> None:
    path = tmp_path / "huge.bsmtp"
    path.write_bytes(make())
    result = subprocess.run(
        [sys.executable, "-c", CHECK_RSS, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    *out, measured = result.stdout.splitlines()
    figures = json.loads(measured)
    print(f"{make.__name__}: {figures}")
    assert figures["code"] == 65
    assert f"({limit}); the whole file is refused" in out[0]
    assert "REJECTED" in out[1]
    assert figures["rss"] < 200 * MB


def test_a_huge_envelope_beside_a_normal_one_does_not_stop_its_delivery(
    tmp_path: Path, server: SmtpServer
) -> None:
    w = start_worker(tmp_path, server)
    try:
        w.drop("huge.bsmtp", a_hundred_thousand_transactions())
        w.drop_drafts("normal.bsmtp", [draft("o@example.com", ["n@example.org"])])
        normal = wait_for(lambda: w.final("normal.bsmtp"), what="normal delivered")
        huge = wait_for(lambda: w.final("huge.bsmtp"), what="huge rejected")
    finally:
        w.stop()
    assert normal["state"] == "done"
    assert [m.rcpt_tos for m in server.messages] == [["n@example.org"]]
    assert huge["state"] == "rejected"
    assert "huge.bsmtp:50002: more than 10000 transactions in one file" in huge["reason"]


def test_writer_and_reader_agree_on_the_longest_dot_line() -> None:
    ok = writer.render(
        [draft("o@example.com", ["a@example.org"], b"." + b"x" * 997 + b"\r\n")], "h"
    )
    env = envfile.read_bytes(ok, "ok.bsmtp", Limits(), "mx.test")
    assert env.accepted, env.errors
    assert env.transactions[0].message.size == 1000


def test_control_bytes_in_envelope_fields_reach_neither_the_wire_nor_a_report(
    tmp_path: Path,
) -> None:
    srv = SmtpServer(Script(rcpt={"gone@example.org": "550 5.1.1 no such user"}))
    data = lines(
        "HELO ok.example.com",
        "EHLO evil\x1b]0;x\x07.example.com",
        "MAIL FROM:<o@example.com>",
        "RCPT TO:<a@example.org> ORCPT=rfc822\x1b[31m;a@example.org",
        "RCPT TO:<b@example.org> ORCPT=rfc822;b+1B[31m@example.org",
        "RCPT TO:<c@[IPv6:fe80::1%eth0\x1b]>",
        "RCPT TO:<gone@example.org> ORCPT=rfc822;gone+07@example.org",
        "RCPT TO:<ok@example.org> ORCPT=rfc822;ok@example.org",
        "DATA",
        "hi",
        ".",
    )
    w = start_worker(tmp_path, srv)
    try:
        w.drop("ctl.bsmtp", data)
        rec = wait_for(lambda: w.final("ctl.bsmtp"))
    finally:
        w.stop()
        srv.stop()
    # (reports to o@ are delivered too: bounces.requeue; their bytes are checked below)
    assert [m.rcpt_tos for m in srv.messages if m.mail_from != "<>"] == [["ok@example.org"]]
    assert [line.split(": ", 1)[1][:3] for line in rec["batch_errors"]] == ["501"] * 5
    sent = b"".join(srv.raw)
    assert b"\x1b" not in sent and b"\x07" not in sent
    assert b"Received: from ok.example.com" in srv.messages[0].content
    for report in w.files("bounces"):
        assert b"\x1b" not in report.read_bytes() and b"\x07" not in report.read_bytes()
