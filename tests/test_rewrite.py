"""Address rewriting: the pure rewriter (bsmtp/rewrite.py), the reader's unqualified addresses,
and the rewritten headers in the message a real server received from a real worker."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest

from spoolsmtp.app import inbound
from spoolsmtp.bsmtp.rewrite import Rewriter, spans
from spoolsmtp.spool import envfile
from tests.helpers import make_config, statuses
from tests.smtpservers import SmtpServer
from tests.workerproc import start_worker, wait_for

RW = Rewriter(
    qualify_domain="example.com",
    addresses={
        "@vm1.example.com": "@example.com",
        "OPER at VMNODE1": "ops@example.com",
        "old@example.org": "new@example.org",
        "a@loop.test": "b@loop.test",
        "b@loop.test": "a@loop.test",
        "c1@chain.test": "c2@chain.test",
        "c2@chain.test": "c3@chain.test",
    },
    nicknames={"PAYROLL": "payroll-team@example.net"},
)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("OPERATOR", "OPERATOR@example.com"),
        ("payroll", "payroll-team@example.net"),
        ("alice@vm1.example.com", "alice@example.com"),
        ("Alice@VM1.Example.COM", "Alice@example.com"),
        ("OPER at VMNODE1", "ops@example.com"),
        ("OLD@example.org", "new@example.org"),
        ("c1@chain.test", "c3@chain.test"),  # followed to its end, once
        ("a@loop.test", "a@loop.test"),  # a loop: left alone
        ("someone@else.test", "someone@else.test"),
        ("", ""),
    ],
)
def test_addresses(address: str, expected: str) -> None:
    assert RW.address(address) == expected
    assert RW.address(RW.address(address)) == RW.address(address)  # rewriting twice: the same


def test_a_chain_longer_than_the_limit_is_left_alone() -> None:
    chain = {f"x{i}@c.test": f"x{i + 1}@c.test" for i in range(10)}
    assert Rewriter(addresses=chain).address("x0@c.test") == "x0@c.test"


def test_spans_skip_names_quotes_comments_and_group_names() -> None:
    text = (
        ' "Smith, John (boss)" <old@example.org>, (c) plain@vm1.example.com (x),'
        ' team: OPERATOR, BOB at VMNODE1;, "q\\"x"@example.org, a(in)@b.c'
    )
    found = [text[s:e] for s, e in spans(text)]
    assert found == [
        "old@example.org",
        "plain@vm1.example.com",
        "OPERATOR",
        "BOB at VMNODE1",
        '"q\\"x"@example.org',
    ]


def test_headers_change_only_where_an_address_is_rewritten() -> None:
    message = (
        b'From: "Old, Account" <old@example.org> (legacy)\r\n'
        b"To: payroll,\r\n"
        b'\tOPER at VMNODE1, "Keep Me" <keep@else.test>\r\n'
        b"Cc: undisclosed:;\r\n"
        b"Subject: old@example.org stays in the subject\r\n"
        b"X-Other: old@example.org\r\n"
        b"\r\n"
        b"From: old@example.org is body text\r\n"
    )
    out = RW.message(message)
    assert out == (
        b'From: "Old, Account" <new@example.org> (legacy)\r\n'
        b"To: payroll-team@example.net,\r\n"
        b'\tops@example.com, "Keep Me" <keep@else.test>\r\n'
        b"Cc: undisclosed:;\r\n"
        b"Subject: old@example.org stays in the subject\r\n"
        b"X-Other: old@example.org\r\n"
        b"\r\n"
        b"From: old@example.org is body text\r\n"
    )
    assert RW.message(out) == out


def test_the_reader_qualifies_with_the_rewriter_and_refuses_without() -> None:
    data = b"HELO h\nMAIL FROM:<batch>\nRCPT TO:<OPERATOR>\nRCPT TO:<postmaster>\nDATA\nx\n.\n"
    limits = make_config().limits
    env = envfile.read_bytes(data, "job", limits, "spool.test", None, RW.unqualified)
    (tx,) = env.transactions
    assert tx.mail_from == "batch@example.com"
    assert [r.address for r in tx.recipients] == ["OPERATOR@example.com", "postmaster@spool.test"]
    plain = envfile.read_bytes(data, "job", limits, "spool.test")  # no rewriting configured
    assert plain.transactions == ()
    assert plain.errors[0].echo == "MAIL FROM:<batch>"
    assert "expected local@domain" in plain.errors[0].reply.render()[0]


def test_our_own_reports_are_not_rewritten() -> None:
    report = (
        b"EHLO spool.test\r\nMAIL FROM:<>\r\nRCPT TO:<old@example.org>\r\nDATA\r\n"
        b"From: Mail Delivery System <MAILER-DAEMON@spool.test>\r\nTo: old@example.org\r\n"
        b"\r\nreport\r\n.\r\nQUIT\r\n"
    )
    env = envfile.read_bytes(report, "r", make_config().limits, "spool.test")
    assert inbound._drafts(RW, env, report, ours=True) is None
    rewritten = inbound._drafts(RW, env, report, ours=False)  # the same from a user: rewritten
    assert rewritten is not None and rewritten[0].recipients[0].address == "new@example.org"


def test_rewritten_headers_arrive_and_the_body_does_not_change(
    tmp_path: Path, server: SmtpServer
) -> None:
    w = start_worker(
        tmp_path,
        server,
        rewrite={
            "qualify_domain": "example.com",
            "addresses": {"@vm1.example.com": "@example.com", "OPER at VMNODE1": "ops@example.org"},
            "nicknames": {"PAYROLL": "payroll-team@example.net"},
        },
    )
    body = b"From: alice@vm1.example.com wrote this line.\r\n.dot line\r\n"
    envelope = (
        b"HELO batch.test\r\nMAIL FROM:<alice@vm1.example.com>\r\nRCPT TO:<OPERATOR>\r\n"
        b"RCPT TO:<payroll>\r\nDATA\r\n"
        b"From: Alice (payroll) <alice@vm1.example.com>\r\n"
        b"To: OPER at VMNODE1, payroll\r\n"
        b'Reply-To: "Desk, Help" <help@vm1.example.com>\r\n'
        b"Subject: run 42\r\n\r\n" + body.replace(b"\r\n.", b"\r\n..") + b".\r\nQUIT\r\n"
    )
    try:
        w.drop("job.bsmtp", envelope)
        rec = wait_for(lambda: w.final("job.bsmtp"), what="done")
    finally:
        assert w.stop() == 0
    assert statuses(rec) == {
        "OPERATOR@example.com": "delivered",
        "payroll-team@example.net": "delivered",
    }
    (got,) = server.messages
    assert got.mail_from == "alice@example.com"
    head, _, received_body = got.content.partition(b"\r\n\r\n")
    assert received_body == body
    msg = email.message_from_bytes(got.content, policy=email.policy.default)
    assert msg["From"].addresses[0].addr_spec == "alice@example.com"
    assert b"\r\nFrom: Alice (payroll) <alice@example.com>\r\n" in head + b"\r\n"
    assert b"\r\nTo: ops@example.org, payroll-team@example.net\r\n" in head + b"\r\n"
    assert b'\r\nReply-To: "Desk, Help" <help@example.com>\r\n' in head + b"\r\n"
