"""Reports to senders, pure: RFC 3464 delivery status notifications and batch error reports.

A delivery report is a multipart/report: a human-readable part, a message/delivery-status part
(Reporting-MTA, Arrival-Date; per recipient Final-Recipient, Action, Status, Remote-MTA,
Diagnostic-Code), and the original headers (text/rfc822-headers) or, with RET=FULL and when it
is small enough, the whole message (message/rfc822). Text from remote servers is sanitised
before it enters a header field. The result is message text with CRLF line endings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from email.parser import BytesHeaderParser
from email.utils import format_datetime
from enum import Enum

from spoolsmtp.model.reply import Reply, sanitise

FULL_LIMIT = 256 * 1024
_XTEXT = re.compile(r"\+([0-9A-F]{2})")
_MSGID = re.compile(r"<[!-;=?-~]{1,900}>")
_EMBEDDED = re.compile(r"\\x\{([0-9A-Fa-f]{2,6})\}")


class Kind(Enum):
    """Which report; the value is part of the report's file name."""

    FAILURE = "ndr"
    DELAY = "delay"
    SUCCESS = "success"
    BATCH = "batch"


# a success we report is always "relayed" (RFC 3464 2.3.3, RFC 3461 6.2.2): spoolsmtp hands
# mail on by SMTP, and writes a success report only when the next hop did not offer DSN
_ACTION = {Kind.FAILURE: "failed", Kind.DELAY: "delayed", Kind.SUCCESS: "relayed"}
_SUBJECT = {
    Kind.FAILURE: "Undelivered Mail Returned to Sender",
    Kind.DELAY: "Delayed Mail (still being retried)",
    Kind.SUCCESS: "Successful Mail Delivery Report",
}


@dataclass(frozen=True)
class Item:
    """One recipient in a delivery report."""

    address: str
    reply: Reply | None
    remote_mta: str | None = None
    orcpt: str | None = None
    last_attempt: datetime | None = None
    local: bool = False


def status_code(reply: Reply | None, kind: Kind) -> str:
    if reply is not None and reply.enhanced:
        return reply.enhanced
    if kind is Kind.SUCCESS:
        return "2.0.0"
    if reply is not None and reply.code >= 500:
        return "5.0.0"
    return "4.0.0"


def report_tag(tx: int, kind: Kind, written: list[str]) -> str:
    """The tag (and file name part) of the next ``kind`` report about transaction ``tx``:
    ``1.ndr``, then ``1.ndr.2``, ``1.ndr.3``... so that no report replaces another. ``written``
    holds the tags of the reports already written for the envelope; a report rewritten after a
    crash, before its tag was journaled, gets the same tag again and replaces only itself."""
    base = f"{tx}.{kind.value}"
    taken = set(written)
    if base not in taken:
        return base
    n = 2
    while f"{base}.{n}" in taken:
        n += 1
    return f"{base}.{n}"


def utf8_addr_xtext(address: str) -> str:
    """``address`` in RFC 6533's utf-8-addr-xtext form: ASCII, each non-ASCII character (and
    ``+``, ``=``, ``\\``) written ``\\x{HEX}``; an ASCII address is unchanged but for those."""
    return "".join(
        ch if "!" <= ch <= "~" and ch not in "+=\\" else f"\\x{{{ord(ch):02X}}}" for ch in address
    )


def utf8_addr_decode(text: str) -> str:
    """The address an RFC 6533 utf-8-addr-xtext (``j\\x{F6}rg@example.org``) stands for."""
    return _EMBEDDED.sub(lambda m: chr(int(m.group(1), 16)), text)


def xtext_decode(text: str) -> str:
    return _XTEXT.sub(lambda m: chr(int(m.group(1), 16)), text)


def _headers(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"{name}: {value}" for name, value in pairs]


def original_message_id(head: bytes) -> str | None:
    """The Message-ID of the message whose header block is ``head``, if it has a usable one."""
    value = BytesHeaderParser().parsebytes(head + b"\r\n\r\n").get("Message-ID")
    match = _MSGID.search(str(value)) if value is not None else None
    return match.group(0) if match else None


def _address_list(addresses: list[str]) -> str:
    """Addresses for a header field, folded one a line when they do not fit on one."""
    line = ", ".join(addresses)
    return line if len(line) <= 60 else ",\r\n ".join(addresses)


def delivery_report(
    *,
    kind: Kind,
    hostname: str,
    envelope_id: str,
    sender: str,
    items: list[Item],
    arrival: datetime,
    now: datetime,
    original: bytes,
    full: bool,
    envid: str | None = None,
    retry_until: datetime | None = None,
    report_id: str | None = None,
    spool_id: str | None = None,
) -> bytes:
    """An RFC 3464 report about ``items`` to ``sender``; ``original`` is the message text.

    When the sender or a recipient address is not ASCII, the report follows RFC 6533: a
    message/global-delivery-status part with ``utf-8`` address types, in UTF-8. Each part says
    the charset it needs (utf-8 only if it has non-ASCII text), and the report's own header
    stays ASCII unless the sender's address is not (then it travels with SMTPUTF8 anyway).

    ``report_id`` names this report (its Message-ID and MIME boundary), unique among the
    reports of the envelope; by default ``envelope_id`` and the kind. ``spool_id``, the id of
    the envelope in the spool, is given in ``X-Spoolsmtp-Envelope-Id``. As Postfix's and
    Exim's do, a failure report lists its recipients in ``X-Failed-Recipients``, and a report
    refers to the original's Message-ID (``References``, ``In-Reply-To``)."""
    report_id = report_id or f"{envelope_id}.{kind.value}"
    boundary = f"{report_id}/{hostname}"
    utf8 = not (sender.isascii() and all(i.address.isascii() for i in items))
    status_type = "global-delivery-status" if utf8 else "delivery-status"
    original_head, _, _ = original.partition(b"\r\n\r\n")
    extra: list[tuple[str, str]] = []
    if kind is Kind.FAILURE:
        # always ASCII, a UTF-8 address in RFC 6533's xtext form: bounce parsers (flufl.bounce's
        # Exim detector among them) cannot read message/global-delivery-status, but read this
        failed = [a if a.isascii() else utf8_addr_xtext(a) for a in (i.address for i in items)]
        extra.append(("X-Failed-Recipients", _address_list(failed)))
    message_id = original_message_id(original_head)
    if message_id is not None:
        extra += [("References", message_id), ("In-Reply-To", message_id)]
    if spool_id is not None:
        extra.append(("X-Spoolsmtp-Envelope-Id", spool_id))
    head = _headers(
        [
            ("From", f"Mail Delivery System <MAILER-DAEMON@{hostname}>"),
            ("To", f"<{sender}>"),
            ("Subject", _SUBJECT[kind]),
            ("Date", format_datetime(now)),
            ("Message-ID", f"<{report_id}@{hostname}>"),
            *extra,
            ("Auto-Submitted", "auto-replied"),
            ("MIME-Version", "1.0"),
            (
                "Content-Type",
                f'multipart/report; report-type={status_type}; boundary="{boundary}"',
            ),
        ]
    )
    human = _human(kind, hostname, items, retry_until)
    status = _headers([("Reporting-MTA", f"dns; {hostname}")])
    if envid:
        status += _headers([("Original-Envelope-Id", sanitise(xtext_decode(envid), 100))])
    status += _headers([("Arrival-Date", format_datetime(arrival))])
    for item in items:
        status.append("")
        fields = []
        if item.orcpt:
            addr_type, _, value = item.orcpt.partition(";")
            fields.append(("Original-Recipient", f"{addr_type}; {sanitise(xtext_decode(value))}"))
        address_type = "rfc822" if item.address.isascii() else "utf-8"
        fields += [
            ("Final-Recipient", f"{address_type}; {item.address}"),
            ("Action", _ACTION[kind]),
            ("Status", status_code(item.reply, kind)),
        ]
        if item.remote_mta and not item.local:
            fields.append(("Remote-MTA", f"dns; {sanitise(item.remote_mta, 200)}"))
        if item.reply is not None:
            text = sanitise(" ".join(item.reply.render()), 700)
            # our own decision is not dressed as a server's reply (Postfix writes X-Postfix;)
            fields.append(("Diagnostic-Code", f"{'X-Spoolsmtp' if item.local else 'smtp'}; {text}"))
        if item.last_attempt is not None:
            fields.append(("Last-Attempt-Date", format_datetime(item.last_attempt)))
        if kind is Kind.DELAY and retry_until is not None:
            fields.append(("Will-Retry-Until", format_datetime(retry_until)))
        status += _headers(fields)
    global_head = not original_head.isascii()
    if full and kind is Kind.FAILURE and len(original) <= FULL_LIMIT:
        enclosed = original
        enclosed_type = "message/global" if global_head else "message/rfc822"
    else:
        enclosed = original_head + b"\r\n"
        enclosed_type = "message/global-headers" if global_head else "text/rfc822-headers"
    parts = [
        "\r\n".join(head),
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        f"Content-Type: text/plain; charset={_charset(human)}",
        "Content-Description: Notification",
        *_eight_bit(human),
        "",
        *human,
        "",
        f"--{boundary}",
        f"Content-Type: message/{status_type}",
        "Content-Description: Delivery report",
        *_eight_bit(status),
        "",
        *status,
        "",
        f"--{boundary}",
        f"Content-Type: {enclosed_type}",
        "Content-Description: Undelivered message"
        if kind is Kind.FAILURE
        else "Content-Description: Message headers",
        *([] if enclosed.isascii() else ["Content-Transfer-Encoding: 8bit"]),
        "",
        "",
    ]
    encoded = "\r\n".join(parts).encode("utf-8")
    return encoded + enclosed.rstrip(b"\r\n") + f"\r\n\r\n--{boundary}--\r\n".encode()


def _charset(lines: list[str]) -> str:
    return "us-ascii" if all(line.isascii() for line in lines) else "utf-8"


def _eight_bit(lines: list[str]) -> list[str]:
    """The transfer encoding header a part of these lines needs, if any."""
    return [] if all(line.isascii() for line in lines) else ["Content-Transfer-Encoding: 8bit"]


def _human(kind: Kind, hostname: str, items: list[Item], until: datetime | None) -> list[str]:
    lines = [f"This is the mail system at host {hostname}.", ""]
    if kind is Kind.FAILURE:
        lines += [
            "Your message could not be delivered to one or more recipients.",
            "It is attached below. For each recipient, the reason is given:",
        ]
    elif kind is Kind.DELAY:
        lines += ["Your message has not yet been delivered to the recipients below."]
        if until is not None:
            lines += [f"It will be retried until {format_datetime(until)}."]
        lines += ["You do not need to send it again."]
    else:
        lines += [
            "Your message was relayed to the recipients below. Their mail system does not",
            "send delivery notifications, so this is the last notice you will receive.",
        ]
    lines.append("")
    for item in items:
        reason = sanitise(item.reply.render()[0], 300) if item.reply else ""
        where = ""
        if item.remote_mta and not item.local:
            where = f" (from {sanitise(item.remote_mta, 200)})"
        lines.append(f"<{item.address}>: {reason}{where}")
    return lines


def batch_report(
    *,
    hostname: str,
    envelope_id: str,
    source: str,
    sender: str,
    errors: list[str],
    response: str,
    now: datetime,
) -> bytes:
    """The batch error report: which commands of the envelope were refused, and the response."""
    head = _headers(
        [
            ("From", f"Mail Delivery System <MAILER-DAEMON@{hostname}>"),
            ("To", f"<{sender}>"),
            ("Subject", f"Batch SMTP errors in {sanitise(source, 200)}"),
            ("Date", format_datetime(now)),
            ("Message-ID", f"<{envelope_id}.batch@{hostname}>"),
            ("Auto-Submitted", "auto-replied"),
            ("MIME-Version", "1.0"),
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Transfer-Encoding", "8bit"),
        ]
    )
    body = [
        f"This is the mail system at host {hostname}.",
        "",
        f"Some commands of the batch envelope {source} (id {envelope_id}) were refused.",
        "Mail of refused transactions was not sent; the rest was queued for delivery.",
        "",
        "Refused commands:",
        *[f"  {line}" for line in errors],
        "",
        "The batch response:",
        "",
        *[line[:990] for line in response.splitlines()],
    ]
    return ("\r\n".join([*head, "", *body]) + "\r\n").encode("utf-8")
