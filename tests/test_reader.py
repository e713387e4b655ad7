"""The envelope reader and writer: message extents, dot-stuffing, wire form, limits, streaming."""

from __future__ import annotations

import io
import resource
from pathlib import Path

import pytest

from spoolsmtp.bsmtp import writer
from spoolsmtp.bsmtp.reader import Reader
from spoolsmtp.model.config import Limits
from spoolsmtp.model.envelope import Envelope, MailParams, Notify, Recipient, Ret
from spoolsmtp.model.errors import EnvelopeFault
from spoolsmtp.spool import envfile

LIMITS = Limits()


def read(data: bytes) -> Envelope:
    return envfile.read_bytes(data, "t.bsmtp", LIMITS, "mx.test")


def test_message_text_is_unstuffed_and_crlf_whatever_the_file_uses(tmp_path: Path) -> None:
    for nl in (b"\n", b"\r\n"):
        lines = [
            b"HELO h",
            b"MAIL FROM:<a@b.c>",
            b"RCPT TO:<d@e.f>",
            b"DATA",
            b"Subject: s",
            b"",
            b"..leading dot",
            b"...two",
            b"..",
            b"plain",
            b".",
            b"QUIT",
        ]
        raw = b"".join(line + nl for line in lines)
        path = tmp_path / "e.bsmtp"
        path.write_bytes(raw)
        env = envfile.read(path, LIMITS, "mx.test")
        (tx,) = env.transactions
        text = envfile.message_bytes(path, tx.message)
        assert text == b"Subject: s\r\n\r\n.leading dot\r\n..two\r\n.\r\nplain\r\n"
        assert tx.message.size == len(text)
        with open(path, "rb") as fh:
            wire = b"".join(envfile.wire_chunks(fh, tx.message, chunk=5))
        assert wire == b"Subject: s\r\n\r\n..leading dot\r\n...two\r\n..\r\nplain\r\n"


def test_a_single_dot_line_start_is_unstuffed_even_when_the_writer_forgot_to_stuff(
    tmp_path: Path,
) -> None:
    path = tmp_path / "e.bsmtp"
    path.write_bytes(b"HELO h\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n.x\r\n.\r\n")
    env = envfile.read(path, LIMITS, "mx.test")
    with open(path, "rb") as fh:
        assert b"".join(envfile.wire_chunks(fh, env.transactions[0].message)) == b"x\r\n"


def test_parameters_are_kept_on_the_transaction() -> None:
    env = read(
        b"EHLO h\nMAIL FROM:<a@b.c> SIZE=10 RET=HDRS ENVID=abc SMTPUTF8\n"
        b"RCPT TO:<d@e.f> NOTIFY=FAILURE,DELAY ORCPT=rfc822;d@e.f\nDATA\nx\n.\n"
    )
    (tx,) = env.transactions
    assert tx.params == MailParams(size=10, ret=Ret.HDRS, envid="abc", smtputf8=True)
    (rcpt,) = tx.recipients
    assert rcpt.notify == frozenset({Notify.FAILURE, Notify.DELAY})
    assert rcpt.orcpt == "rfc822;d@e.f"
    assert rcpt.line == 3
    assert tx.helo == "h"


def test_eight_bit_and_received_headers_are_noticed() -> None:
    env = read(
        "HELO h\nMAIL FROM:<a@b.c>\nRCPT TO:<d@e.f>\nDATA\nReceived: x\nReceived: y\n"
        "Subject: caf\u00e9\n\nReceived: body\n.\n".encode()
    )
    message = env.transactions[0].message
    assert message.eight_bit
    assert message.received == 2


def test_unterminated_data_names_the_data_line() -> None:
    with pytest.raises(EnvelopeFault) as info:
        read(b"HELO h\nMAIL FROM:<a@b.c>\nRCPT TO:<d@e.f>\nDATA\nno end\n")
    assert info.value.line == 4
    assert "never terminated" in info.value.problem


def test_file_over_the_size_limit_is_a_fault() -> None:
    reader = Reader("big", LIMITS, "mx.test", max_file_bytes=100)
    with pytest.raises(EnvelopeFault, match="larger than 100"):
        reader.feed(b"HELO h\n" + b"NOOP\n" * 30)


def test_writer_output_reads_back_with_all_parameters() -> None:
    drafts = [
        writer.Draft(
            "oper@example.com",
            (Recipient("a@example.org", frozenset({Notify.FAILURE}), "rfc822;a@example.org"),),
            b"Subject: x\n\n.dot\nend\n",
            MailParams(ret=Ret.FULL, envid="job1"),
        ),
        writer.Draft("", (Recipient("b@example.org", frozenset()),), b""),
    ]
    data = writer.render(drafts, "batch.example", verbose=True, tick="7")
    env = read(data)
    assert env.accepted
    assert env.verbose
    assert [t.mail_from for t in env.transactions] == ["oper@example.com", ""]
    assert env.transactions[0].recipients[0].notify == frozenset({Notify.FAILURE})
    assert env.transactions[1].recipients[0].notify == frozenset()
    assert env.transactions[0].params.ret is Ret.FULL


@pytest.mark.parametrize(
    ("message", "problem"),
    [(b"a\rb\n", "bare CR"), (b"a\x00\n", "NUL"), (b"x" * 999 + b"\n", "longer than 998")],
)
def test_writer_refuses_text_smtp_cannot_carry(message: bytes, problem: str) -> None:
    with pytest.raises(writer.MessageError, match=problem):
        writer.render([writer.Draft("a@b.c", (Recipient("d@e.f"),), message)], "h")


def test_a_large_message_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """64 MB of message text must not raise the peak RSS by anything like its size."""
    path = tmp_path / "big.bsmtp"
    line = b"0123456789" * 7 + b"\r\n"
    count = 64 * 1000**2 // len(line)
    with open(path, "wb") as fh:
        fh.write(b"HELO h\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
        block = line * 10000
        for _ in range(count // 10000):
            fh.write(block)
        fh.write(b".\r\nQUIT\r\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    env = envfile.read(path, Limits(max_message_bytes=100 * 1000**2), "mx.test")
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert env.transactions[0].message.size == (count // 10000) * 10000 * len(line)
    assert grown_kb < 16 * 1024


def test_check_reads_standard_layout_from_a_stream() -> None:
    env = envfile.read_stream(
        io.BytesIO(b"HELO h\nMAIL FROM:<a@b.c>\nRCPT TO:<d@e.f>\nDATA\n.\n"), "s", LIMITS, "m"
    )
    assert env.transactions[0].message.size == 0


@pytest.mark.parametrize(
    "literal",
    [
        "[IPv6:fe80::1%eth0]",
        "[IPv6:fe80::1%eth 0]",
        "[IPv6:fe80::1%\x1b]",
        "[IPv6: ::1]",
        "[ 1.2.3.4]",
    ],
)
def test_an_address_literal_is_an_address_and_nothing_else(literal: str) -> None:
    data = f"HELO h\nMAIL FROM:<a@b.c>\nRCPT TO:<x@{literal}>\nRSET\n".encode()
    (refused,) = read(data).errors
    assert refused.reply.render() == ["501 5.1.3 bad recipient address syntax: bad address literal"]
    if " " not in literal:
        helo = read(f"NOOP\nHELO {literal}\n".encode())
        assert [e.reply.code for e in helo.errors] == [501]
