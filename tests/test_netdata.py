"""NETDATA input: files built byte by byte from the published layout (tests/netdatafile.py),
decoded, unwrapped, rejected with a reason, and delivered through a real worker."""

from __future__ import annotations

import email
import email.policy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spoolsmtp.bsmtp import netdata
from spoolsmtp.bsmtp.unwrap import unwrap
from spoolsmtp.model.errors import EnvelopeFault
from spoolsmtp.spool import envfile
from tests import netdatafile as nd
from tests.helpers import make_config, statuses
from tests.smtpservers import SmtpServer
from tests.workerproc import start_worker, wait_for

NODES = {"VMNODE1": "vm1.example.com", "VMNODE2": "example.org"}
ENVELOPE = [
    "HELO VMNODE1.EXAMPLE.COM",
    "MAIL FROM:<alice@vm1.example.com>",
    "RCPT TO:<bob@example.org>",
    "DATA",
    "From: alice@vm1.example.com",
    "To: bob@example.org",
    "Subject: payroll run",
    "",
    "Payroll run 42 ended normally.",
    ".",
    "QUIT",
]
NOTE = [
    "Date: 1 December 2026, 10:15:02 EST",
    "From: Alice Smith                 ALICE    at VMNODE1",
    "To:   BOB      at VMNODE2",
    "cc:   CAROL    at VMNODE1, dave@example.net",
    "",
    "Subject: Quarterly figures",
    "",
    "The figures are in.",
    "  Indented line stays indented.",
]


def unwrapped(data: bytes, codepage: str = "cp037") -> bytes:
    return unwrap(
        data, "job.xmit", codepage=codepage, nodes=NODES, hostname="spool.test", envelope_id="ID1"
    )


def test_recognised_only_by_an_inmr01_control_record() -> None:
    assert netdata.recognised(nd.transmit(ENVELOPE))
    assert not netdata.recognised(b"HELO x\nMAIL FROM:<a@b>\n")
    assert not netdata.recognised("HELO x".encode("cp037"))


def test_header_and_records_are_decoded() -> None:
    sent = netdata.decode(nd.transmit(ENVELOPE, segment=30))  # records over several segments
    assert sent.text(netdata.INMFUID) == "ALICE" and sent.text(netdata.INMFNODE) == "VMNODE1"
    assert netdata.lines(sent) == ENVELOPE  # blank padding of fixed records removed


def test_variable_records_keep_trailing_blanks_and_other_code_pages_decode() -> None:
    lines = ["Grüße aus Zürich  ", "[brackets] {braces}"]
    sent = netdata.decode(nd.transmit(lines, fixed=False, codepage="cp1047"), "cp1047")
    assert netdata.lines(sent) == lines


def test_an_envelope_is_given_back_as_batch_smtp_text() -> None:
    out = unwrapped(nd.transmit(ENVELOPE))
    assert out == "".join(line + "\n" for line in ENVELOPE).encode()


def test_a_note_becomes_an_envelope_from_its_sender_to_each_recipient() -> None:
    out = unwrapped(nd.transmit(NOTE))
    env = envfile.read_bytes(out, "job.xmit", make_config().limits, "spool.test")
    (tx,) = env.transactions
    assert env.accepted
    assert tx.mail_from == "alice@vm1.example.com"
    assert [r.address for r in tx.recipients] == [
        "bob@example.org",
        "carol@vm1.example.com",
        "dave@example.net",
    ]
    msg = email.message_from_bytes(out.split(b"DATA\n", 1)[1], policy=email.policy.default)
    assert msg["From"] == "Alice Smith <alice@vm1.example.com>"
    assert msg["To"] == "bob@example.org"
    assert msg["Cc"] == "carol@vm1.example.com, dave@example.net"
    assert msg["Subject"] == "Quarterly figures"
    assert msg["Date"] is not None and "EST" not in msg["Date"]
    assert msg.get_content().startswith("The figures are in.\n  Indented line stays indented.")


def test_a_note_without_subject_gets_one() -> None:
    out = unwrapped(nd.transmit(["To: BOB at VMNODE2", "", "hello"]))
    assert b"\nSubject: (none)\n" in out and b"\nFrom: <alice@vm1.example.com>\n" in out


def bad_length(data: bytes) -> bytes:
    """The second segment's length byte (where the first one ends) made 1."""
    second = data[0]
    return data[:second] + b"\x01" + data[second + 1 :]


def truncated_cut(data: bytes) -> bytes:
    return data[: len(data) - 2 * nd.CARD]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (truncated_cut(nd.transmit(ENVELOPE)), "truncated"),
        (nd.control("INMR01", nd.char(0x1011, "N")) + nd.control("INMR06"), "no INMFUID"),
        (
            nd.control("INMR01", nd.char(0x1011, "N") + b"\x10\x12\x00\x01\x00\x30AB"),
            "text unit 0x1012 runs past the end of the record",
        ),
        (nd.control("INMR01", b"\x10") + nd.control("INMR06"), "text unit cut short"),
        (
            nd.control("INMR01", nd.char(0x1011, "N") + nd.char(0x1012, "U"))
            + nd.control("INMR09"),
            "is not INMR01..INMR07",
        ),
        (
            nd.control("INMR01", nd.char(0x1011, "N") + nd.char(0x1012, "U"))
            + nd.segments(b"data", control=False)
            + nd.control("INMR06"),
            "a data record before any INMR03",
        ),
        (bad_length(nd.transmit(ENVELOPE)), "segment length 1 is less than 2"),
        (
            nd.control("INMR01", nd.char(0x1011, "N") + nd.char(0x1012, "U"))
            + nd.control("INMR06"),
            "no file",
        ),
    ],
)
def test_bad_control_records_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(EnvelopeFault) as caught:
        unwrapped(data)
    assert reason in str(caught.value)
    assert str(caught.value).startswith("job.xmit:1: not a readable NETDATA file: NETDATA byte ")


def test_a_note_to_nobody_or_to_an_unknown_node_is_refused() -> None:
    with pytest.raises(EnvelopeFault, match="names no recipient"):
        unwrapped(nd.transmit(["Subject: x", "", "text"]))
    with pytest.raises(EnvelopeFault, match=r"node VMX is not in netdata\.nodes"):
        unwrapped(nd.transmit(["To: BOB at VMX", "", "text"]))


# -- through a real worker --------------------------------------------------------------------


def test_netdata_envelope_and_note_are_delivered(tmp_path: Path, server: SmtpServer) -> None:
    w = start_worker(tmp_path, server, netdata={"nodes": NODES})
    try:
        w.drop("payroll.xmit", nd.transmit(ENVELOPE))
        w.drop("note.xmit", nd.transmit(NOTE, codepage="cp037"))
        env_rec = wait_for(lambda: w.final("payroll.xmit"), what="envelope done")
        note_rec = wait_for(lambda: w.final("note.xmit"), what="note done")
    finally:
        assert w.stop() == 0
    assert statuses(env_rec) == {"bob@example.org": "delivered"}
    assert statuses(note_rec) == {
        "bob@example.org": "delivered",
        "carol@vm1.example.com": "delivered",
        "dave@example.net": "delivered",
    }
    by_sender = {m.mail_from: m for m in server.messages}
    assert set(by_sender) == {"alice@vm1.example.com"} and len(server.messages) == 2
    note = next(m for m in server.messages if len(m.rcpt_tos) == 3)
    msg = email.message_from_bytes(note.content, policy=email.policy.default)
    assert msg["From"] == "Alice Smith <alice@vm1.example.com>"
    assert msg["Subject"] == "Quarterly figures"
    assert "The figures are in." in msg.get_content()
    payroll = next(m for m in server.messages if len(m.rcpt_tos) == 1)
    assert b"Payroll run 42 ended normally." in payroll.content


def test_a_truncated_netdata_file_is_rejected_with_its_reason(
    tmp_path: Path, server: SmtpServer
) -> None:
    w = start_worker(tmp_path, server)
    try:
        w.drop("cut.xmit", truncated_cut(nd.transmit(ENVELOPE)))
        rec = wait_for(lambda: w.final("cut.xmit"), what="rejected")
    finally:
        assert w.stop() == 0
    assert rec["state"] == "rejected"
    assert "not a readable NETDATA file" in rec["reason"] and "truncated" in rec["reason"]
    reason = next(p for p in w.files("rejected") if p.name.endswith(".reason"))
    assert "truncated" in reason.read_text()
    assert server.messages == []


def test_the_code_page_is_checked_at_start_and_cp1047_is_known() -> None:
    from spoolsmtp.model import config
    from spoolsmtp.model.errors import ConfigError

    assert config.parse("netdata: {codepage: cp1047}").netdata.codepage == "cp1047"
    with pytest.raises(ConfigError, match=r"netdata\.codepage"):
        config.parse("netdata: {codepage: cp9999}")


def test_netdata_is_unwrapped_when_legacy_conversion_is_on(
    tmp_path: Path, server: SmtpServer
) -> None:
    """spool.encoding (plain EBCDIC text files) must not transcode a NETDATA file's binary
    records before it is unwrapped."""
    w = start_worker(tmp_path, server, spool={"encoding": "cp037"}, netdata={"nodes": NODES})
    try:
        w.drop("payroll.xmit", nd.transmit(ENVELOPE))
        rec = wait_for(lambda: w.final("payroll.xmit"), what="done")
    finally:
        assert w.stop() == 0
    assert statuses(rec) == {"bob@example.org": "delivered"}


def test_check_reads_a_netdata_file_as_the_worker_would(tmp_path: Path) -> None:
    (tmp_path / "conf.yaml").write_text(yaml.safe_dump({"netdata": {"nodes": NODES}}))
    (tmp_path / "note.xmit").write_bytes(nd.transmit(NOTE))
    (tmp_path / "cut.xmit").write_bytes(truncated_cut(nd.transmit(ENVELOPE)))
    argv = [sys.executable, "-m", "spoolsmtp", "check", "--config", "conf.yaml"]
    ok = subprocess.run(
        [*argv, "note.xmit"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "050 RCPT TO:<carol@vm1.example.com>" in ok.stdout
    assert ok.stdout.rstrip().endswith("OK, 1 transaction(s), 3 recipient(s) accepted")
    bad = subprocess.run(
        [*argv, "cut.xmit"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert bad.returncode == 65
    assert "not a readable NETDATA file" in bad.stdout and "truncated" in bad.stdout
