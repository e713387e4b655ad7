"""What a NETDATA file carries, as a Batch SMTP envelope: the envelope itself, or a CMS/PROFS note
turned into one (pure: bytes in, bytes out).

A file whose first non-blank line is HELO or EHLO is the envelope a job wrote (the punch file of
the VM service machine): its lines are given back as they are. Anything else is a note, as CMS
NOTE and SENDFILE wrote it: a header of ``Key: value`` lines (``To: BOB at VMNODE2``, ``cc:``,
``From: Alice Smith  ALICE at VMNODE1``), a blank line, the text. ``USER at NODE`` becomes
``user@domain`` through ``netdata.nodes`` (a node not listed must already be a domain name); the
note's sender, for MAIL FROM, is the origin user at the origin node of its ``INMR01``. A
``Subject:`` line just after the blank line (where NOTE puts it) moves into the header, and one
is added when there is none, as NOTE EXEC did. A date that is not RFC 5322 is replaced by ours.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from email.header import Header
from email.utils import parsedate_to_datetime

from spoolsmtp.bsmtp import netdata, writer
from spoolsmtp.bsmtp.compose import complete_headers, phrase
from spoolsmtp.model.envelope import BodyType, MailParams, Recipient
from spoolsmtp.model.errors import EnvelopeFault

NO_SUBJECT = "(none)"
_FIELD = re.compile(r"([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]?(.*)")
_AT = re.compile(r"([^\s,<>()\"@]+)\s+at\s+([^\s,<>()\"@]+)", re.IGNORECASE)
_MAIL = re.compile(r"<?([^\s,<>()\"@]+@[^\s,<>()\"@]+)>?")
_ADDRESS = re.compile(f"{_AT.pattern}|{_MAIL.pattern}", re.IGNORECASE)
_RECIPIENTS = ("to", "cc", "bcc")
_NAMES = {"to": "To", "cc": "Cc", "bcc": "Bcc", "from": "From", "reply-to": "Reply-To"}


class NoteError(ValueError):
    """A note that cannot become mail: no recipient, a node with no domain."""


def mailbox(user: str, node: str, nodes: Mapping[str, str]) -> str:
    """``USER at NODE`` as ``user@domain`` (VM user ids are not case-sensitive: lower case)."""
    wanted = node.upper()
    for key, domain in nodes.items():
        if key.upper() == wanted:
            return f"{user.lower()}@{domain}"
    if "." in node:
        return f"{user.lower()}@{node.lower()}"
    raise NoteError(f"node {node} is not in netdata.nodes and is not a domain name")


def addresses(value: str, nodes: Mapping[str, str]) -> list[tuple[str, str]]:
    """(display name, address) of every address in a note's header value, in order."""
    out: list[tuple[str, str]] = []
    last = 0
    for m in _ADDRESS.finditer(value):
        shown = value[last : m.start()].strip(" ,;\t")
        last = m.end()
        if m.group(1):
            out.append((shown, mailbox(m.group(1), m.group(2), nodes)))
        else:
            out.append((shown, m.group(3)))
    return out


def _rendered(found: list[tuple[str, str]]) -> str:
    return ", ".join(f"{phrase(name, chr(10))} <{addr}>" if name else addr for name, addr in found)


def _header_value(text: str) -> str:
    return text if text.isascii() else Header(text, "utf-8").encode()


def note_message(
    lines: list[str], sender: str, nodes: Mapping[str, str]
) -> tuple[list[str], list[str]]:
    """The note as RFC 5322 header lines and body lines, and its recipients."""
    head: list[tuple[str, str]] = []
    pos = 0
    while pos < len(lines):
        line = lines[pos]
        m = _FIELD.fullmatch(line)
        if m:
            head.append((m.group(1), m.group(2).strip()))
        elif line[:1] in (" ", "\t") and line.strip() and head:
            name, value = head[-1]
            head[-1] = (name, f"{value} {line.strip()}")
        else:
            break
        pos += 1
    body = lines[pos:]
    while body and not body[0].strip():
        body = body[1:]
    if body and (m := _FIELD.fullmatch(body[0])) and m.group(1).lower() == "subject":
        head.append(("Subject", m.group(2).strip()))
        body = body[1:]
        while body and not body[0].strip():
            body = body[1:]
    out: list[str] = []
    recipients: list[str] = []
    for name, value in head:
        key = name.lower()
        if key in _NAMES:
            found = addresses(value, nodes)
            if key in _RECIPIENTS:
                recipients += [addr for _, addr in found]
            if key != "bcc" and found:
                out.append(f"{_NAMES[key]}: {_rendered(found)}")
        elif key == "date":
            try:
                parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                continue  # a VM date ("1 December 2026, 10:15:02 EST"): ours replaces it
            out.append(f"Date: {value}")
        else:
            out.append(f"{name}: {_header_value(value)}")
    if not recipients:
        raise NoteError("the note names no recipient (no To:, cc: or bcc: address)")
    names = {line.split(":", 1)[0].lower() for line in out}
    if "subject" not in names:
        out.append(f"Subject: {NO_SUBJECT}")
    if "from" not in names:
        out.insert(0, f"From: <{sender}>")
    if not all(line.isascii() for line in body):
        out += [
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
        ]
    return [*out, "", *body], list(dict.fromkeys(recipients))


def is_envelope(lines: list[str]) -> bool:
    for line in lines:
        if line.strip():
            return line.split(None, 1)[0].upper() in ("HELO", "EHLO")
    return False


def unwrap(
    data: bytes,
    source: str,
    *,
    codepage: str,
    nodes: Mapping[str, str],
    hostname: str,
    envelope_id: str,
) -> bytes:
    """The Batch SMTP envelope a NETDATA file carries, or makes of the note it carries; raises
    ``EnvelopeFault`` (with the reason for rejected/) when it cannot."""
    try:
        sent = netdata.decode(data, codepage)
        lines = netdata.lines(sent)
        if is_envelope(lines):
            return "".join(line + "\n" for line in lines).encode("utf-8")
        node = sent.text(netdata.INMFNODE)
        sender = mailbox(sent.text(netdata.INMFUID), node, nodes)
        text, recipients = note_message(lines, sender, nodes)
        message = "".join(line + "\n" for line in text).encode("utf-8")
        message = complete_headers(message, sender, None, hostname, envelope_id, hostname)
        params = MailParams(body=None if message.isascii() else BodyType.EIGHT_BIT)
        helo = sender.rpartition("@")[2]
        draft = writer.Draft(sender, tuple(Recipient(r) for r in recipients), message, params)
        return writer.render([draft], helo, crlf=False)
    except netdata.NetdataError as exc:
        raise EnvelopeFault(source, 1, f"not a readable NETDATA file: {exc}") from None
    except NoteError as exc:
        raise EnvelopeFault(source, 1, f"NETDATA note: {exc}") from None
    except writer.MessageError as exc:
        raise EnvelopeFault(source, 1, f"NETDATA note: {exc}") from None
