"""Reports to senders (``spoolsmtp.policy.dsn``), pure, read back with the ``email`` package as a
sender's mail program would read them."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.message import EmailMessage, Message

import pytest

from spoolsmtp.model.reply import make
from spoolsmtp.policy.dsn import Item, Kind, batch_report, delivery_report

ARRIVAL = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
UNTIL = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
ORIGINAL = (
    b"From: Ann <ann@example.com>\r\nTo: bob@example.org\r\nSubject: hello\r\n"
    b"Message-ID: <m1@example.com>\r\n\r\nthe text\r\n"
)
BOUNCED = Item("bob@example.org", make(550, "5.1.1", "no such user"), "mx.example.org")
# decided here about a server (it lacks 8BITMIME): the server is named in the text only
LOCAL = Item(
    "cid@example.net",
    make(554, "5.6.3", "8-bit message but mx.example.net does not offer 8BITMIME"),
    "mx.example.net",
    local=True,
)


def report(kind: Kind, *items: Item, sender: str = "ann@example.com", **kw: object) -> EmailMessage:
    data = delivery_report(
        kind=kind,
        hostname="spool.test",
        envelope_id="ENV1",
        sender=sender,
        items=list(items or [BOUNCED]),
        arrival=ARRIVAL,
        now=NOW,
        original=ORIGINAL,
        full=bool(kw.pop("full", False)),
        **kw,  # type: ignore[arg-type]
    )
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def status_blocks(message: EmailMessage) -> list[dict[str, str]]:
    """The field blocks of the delivery-status part: the message's, then one per recipient."""
    part = next(p for p in message.iter_parts() if p.get_content_type().endswith("-status"))
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    fields: list[Message] = [b for b in blocks if isinstance(b, Message)]
    if part.get_content_type() == "message/global-delivery-status":
        # the email package splits only message/delivery-status into field blocks; of the
        # global one it gives the first block, the rest as its (UTF-8) body
        rest = fields[0].get_payload(decode=True)
        assert isinstance(rest, bytes)
        text = rest.decode("utf-8")
        fields += [email.message_from_string(b) for b in text.split("\r\n\r\n") if b]
    return [dict(b.items()) for b in fields]


def test_a_failure_report_is_a_multipart_report_to_the_sender() -> None:
    message = report(Kind.FAILURE)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [a.addr_spec for a in message["To"].addresses] == ["ann@example.com"]
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@spool.test>"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Message-ID"] == "<ENV1.ndr@spool.test>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["X-Failed-Recipients"] == "bob@example.org"
    assert message["In-Reply-To"] == message["References"] == "<m1@example.com>"
    assert [p.get_content_type() for p in message.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_the_status_fields_of_a_server_refusal() -> None:
    head, rcpt = status_blocks(report(Kind.FAILURE, envid="E+2B1"))
    assert head == {
        "Reporting-MTA": "dns; spool.test",
        "Original-Envelope-Id": "E+1",
        "Arrival-Date": "Mon, 23 Nov 2026 12:00:00 +0000",
    }
    assert rcpt == {
        "Final-Recipient": "rfc822; bob@example.org",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.org",
        "Diagnostic-Code": "smtp; 550 5.1.1 no such user",
    }


def test_a_local_decision_names_no_remote_mta_and_is_not_dressed_as_smtp() -> None:
    _, rcpt = status_blocks(report(Kind.FAILURE, LOCAL))
    assert "Remote-MTA" not in rcpt
    assert rcpt["Diagnostic-Code"].startswith("X-Spoolsmtp; 554 5.6.3 ")
    human = next(iter(report(Kind.FAILURE, LOCAL).iter_parts()))
    assert "(from " not in human.get_content()


@pytest.mark.parametrize(
    ("kind", "action", "subject"),
    [
        (Kind.FAILURE, "failed", "Undelivered Mail Returned to Sender"),
        (Kind.DELAY, "delayed", "Delayed Mail (still being retried)"),
        (Kind.SUCCESS, "relayed", "Successful Mail Delivery Report"),
    ],
)
def test_the_action_and_subject_per_kind(kind: Kind, action: str, subject: str) -> None:
    message = report(kind)
    assert message["Subject"] == subject
    assert [b.get("Action") for b in status_blocks(message)[1:]] == [action]
    assert (message["X-Failed-Recipients"] is not None) is (kind is Kind.FAILURE)


def test_a_delay_report_says_until_when_it_is_retried() -> None:
    message = report(
        Kind.DELAY, Item("bob@example.org", make(451, "4.4.1", "later")), retry_until=UNTIL
    )
    _, rcpt = status_blocks(message)
    assert rcpt["Will-Retry-Until"] == "Thu, 26 Nov 2026 12:00:00 +0000"
    assert "retried until Thu, 26 Nov 2026" in next(iter(message.iter_parts())).get_content()


def test_a_status_without_an_enhanced_code_is_its_class() -> None:
    items = [
        Item("a@example.org", make(550, None, "no")),
        Item("b@example.org", make(450, None, "x")),
    ]
    assert [b["Status"] for b in status_blocks(report(Kind.FAILURE, *items))[1:]] == [
        "5.0.0",
        "4.0.0",
    ]
    assert status_blocks(report(Kind.SUCCESS, Item("a@example.org", None)))[1]["Status"] == "2.0.0"


def test_ret_full_returns_the_whole_message_only_in_a_failure() -> None:
    failure = list(report(Kind.FAILURE, full=True).iter_parts())[2]
    assert failure.get_content_type() == "message/rfc822"
    enclosed = failure.get_payload()
    assert isinstance(enclosed, list)
    (returned,) = enclosed
    assert isinstance(returned, EmailMessage)
    assert returned["Subject"] == "hello"
    assert returned.get_content().strip() == "the text"
    delay = list(report(Kind.DELAY, full=True).iter_parts())[2]
    assert delay.get_content_type() == "text/rfc822-headers"
    assert "the text" not in delay.get_content()


def test_a_utf8_recipient_makes_a_global_report() -> None:
    item = Item("jörg@example.org", make(550, "5.1.1", "no such user"), "mx.example.org")
    message = report(Kind.FAILURE, item, BOUNCED)
    assert message.get_param("report-type") == "global-delivery-status"
    parts = list(message.iter_parts())
    assert parts[1].get_content_type() == "message/global-delivery-status"
    assert parts[0].get_content_charset() == "utf-8"
    _, utf8, ascii = status_blocks(message)
    assert utf8["Final-Recipient"] == "utf-8; jörg@example.org"
    assert ascii["Final-Recipient"] == "rfc822; bob@example.org"
    # an ASCII header field for bounce parsers that cannot read the global type (RFC 6533 xtext)
    assert message["X-Failed-Recipients"] == "j\\x{F6}rg@example.org, bob@example.org"


def test_an_ascii_report_says_us_ascii() -> None:
    message = report(Kind.FAILURE)
    assert next(iter(message.iter_parts())).get_content_charset() == "us-ascii"


def test_remote_text_cannot_add_header_fields() -> None:
    evil = Item("bob@example.org", make(550, None, "no\r\nBcc: victim@example.com"), "mx\r\nX: y")
    _, rcpt = status_blocks(report(Kind.FAILURE, evil))
    assert set(rcpt) == {"Final-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code"}
    assert rcpt["Diagnostic-Code"] == "smtp; 550-no 550 Bcc: victim@example.com"
    assert rcpt["Remote-MTA"] == "dns; mx X: y"


def test_the_batch_report_lists_the_refused_commands_and_the_response() -> None:
    data = batch_report(
        hostname="spool.test",
        envelope_id="ENV1",
        source="in/batch.bsmtp",
        sender="ann@example.com",
        errors=["in/batch.bsmtp:3: 501 5.1.3 bad address"],
        response="050 MAIL FROM:<ann@example.com>\n250 2.1.0 ok\n",
        now=NOW,
    )
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message["Subject"] == "Batch SMTP errors in in/batch.bsmtp"
    assert [a.addr_spec for a in message["To"].addresses] == ["ann@example.com"]
    assert message["Message-ID"] == "<ENV1.batch@spool.test>"
    assert message.get_content_type() == "text/plain"
    lines = message.get_content().splitlines()
    assert "  in/batch.bsmtp:3: 501 5.1.3 bad address" in lines
    assert lines[-2:] == ["050 MAIL FROM:<ann@example.com>", "250 2.1.0 ok"]
