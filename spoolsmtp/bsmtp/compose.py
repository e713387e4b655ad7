"""The message a submitter hands us, completed as sendmail would: where its header block ends,
Date/Message-ID/From added when missing, unqualified addresses given the local domain.

"Has headers" is decided as sendmail's collect() does: the block is the run of lines at the
start that are header fields (``name:``, the name printable ASCII without spaces or colons, not
starting with ``--``) or continuation lines of one; it ends at a blank line (the separator) or
at the first other line, before which the separator is added. A leading blank line means no
headers at all.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime
from email.header import Header
from email.utils import format_datetime, getaddresses

_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+")
ADDRESS_FIELDS = frozenset(
    {"from", "sender", "reply-to", "to", "cc", "bcc"}
    | {"resent-from", "resent-sender", "resent-to", "resent-cc", "resent-bcc"}
)
_BAD_CATEGORIES = {"Cc", "Cs", "Zl", "Zp"}
# and in an address, format characters too: bidi overrides, zero-width spaces (category Cf)
_BAD_IN_ADDRESS = _BAD_CATEGORIES | {"Cf"}


def _is_field(line: bytes) -> bool:
    return not line.startswith(b"--") and _FIELD.match(line) is not None


def split(message: bytes) -> tuple[bytes, bytes, bytes]:
    """Header block, the blank line that ends it (empty when there is none), body."""
    pos, seen = 0, False
    while pos < len(message):
        end = message.find(b"\n", pos)
        end = len(message) if end < 0 else end + 1
        line = message[pos:end]
        if line in (b"\n", b"\r\n"):
            return message[:pos], line, message[end:]
        if _is_field(line) or (seen and line[:1] in (b" ", b"\t")):
            seen, pos = True, end
            continue
        break
    return message[:pos], b"", message[pos:]


def fields(head: bytes) -> list[tuple[str, bytes]]:
    """Header fields with their continuation lines, in order: (lower-case name, raw bytes)."""
    out: list[tuple[str, bytes]] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and out:
            name, raw = out[-1]
            out[-1] = (name, raw + line)
        else:
            out.append((line.split(b":", 1)[0].strip().lower().decode("ascii", "replace"), line))
    return out


def recipients_from_headers(message: bytes) -> tuple[list[str], bytes]:
    """-t: addresses of To, Cc and Bcc; the message returned without its Bcc fields."""
    head, blank, body = split(message)
    found = fields(head)
    values = []
    for name, raw in found:
        if name in ("to", "cc", "bcc"):
            # unfolded on ASCII white space only: str.split() would turn U+0085 or U+2028 in
            # an address into a space, and the address into another one
            value = b" ".join(raw.split(b":", 1)[1].split())
            values.append(value.decode("utf-8", "replace"))
    addresses = [addr for _, addr in getaddresses(values) if addr]
    kept = b"".join(raw for name, raw in found if name != "bcc")
    return list(dict.fromkeys(addresses)), kept + blank + body


def qualify(address: str, domain: str) -> str:
    """``root`` becomes ``root@domain``, as sendmail, Postfix and Exim do for local submissions;
    the null sender and qualified addresses are left alone."""
    if address == "" or ("@" in address and not address.endswith('"')):
        return address
    return f"{address}@{domain}"


def address_fault(address: str) -> str | None:
    """Why ``address`` cannot go into an envelope or a header, as far as its characters go:
    a C0 or C1 control character, DEL, a line separator, or a format character such as the
    bidi override U+202E (it makes an address display as another one). None: no such one."""
    for ch in address:
        category = unicodedata.category(ch)
        if category in _BAD_IN_ADDRESS:
            kind = "a format (bidi) character" if category == "Cf" else "a control character"
            return f"holds {kind} (U+{ord(ch):04X})"
    return None


def check_phrase(name: str) -> str | None:
    """Why a full name (-F) cannot be a display name, or None: no control characters."""
    for ch in name:
        if unicodedata.category(ch) in _BAD_CATEGORIES:
            return f"holds a control character (U+{ord(ch):04X})"
    if len(name) > 256:
        return "longer than 256 characters"
    return None


def phrase(name: str, nl: str) -> str:
    """A full name as an RFC 5322 phrase: as is, quoted, or RFC 2047 encoded if not ASCII."""
    if not name.isascii():
        return Header(name, "utf-8").encode(linesep=nl)
    if _ATOM.fullmatch(name) and name.strip() == name:
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def complete_headers(
    message: bytes,
    sender: str,
    full_name: str | None,
    hostname: str,
    envelope_id: str,
    domain: str,
) -> bytes:
    """Add From, Date and Message-ID when missing; qualify bare addresses in address fields;
    make sure a blank line separates the header block from the body."""
    head, blank, body = split(message)
    nl = b"\r\n" if b"\r\n" in message[:1000] else b"\n"
    found = fields(head)
    names = {name for name, _ in found}
    added: list[str] = []
    if "from" not in names and sender:
        shown = phrase(full_name, nl.decode()) if full_name else ""
        added.append(f"From: {shown} <{sender}>" if shown else f"From: <{sender}>")
    if "date" not in names:
        added.append(f"Date: {format_datetime(datetime.now(UTC))}")
    if "message-id" not in names:
        added.append(f"Message-ID: <{envelope_id}@{hostname}>")
    extra = b"".join(a.encode("utf-8") + nl for a in added)
    head = b"".join(
        qualify_field(raw, domain) if name in ADDRESS_FIELDS else raw for name, raw in found
    )
    if head and not head.endswith(b"\n"):
        head += nl
    return extra + head + (blank or nl) + body


def qualify_field(raw: bytes, domain: str) -> bytes:
    """An address field with ``@domain`` inserted after every unqualified address, nothing else
    changed (comments, quoting, encoded words and folding stay as written)."""
    name, colon, value = raw.partition(b":")
    text = value.decode("utf-8", "surrogateescape")
    spots = _unqualified(text)
    for pos in reversed(spots):
        text = f"{text[:pos]}@{domain}{text[pos:]}"
    return name + colon + text.encode("utf-8", "surrogateescape")


def _unqualified(text: str) -> list[int]:
    """Where ``@domain`` goes in an address list: after each bare word with no ``@`` that is a
    whole address, and before ``>`` of each ``<local>`` with no ``@``."""
    spots: list[int] = []
    depth = 0  # comment nesting
    quoted = escaped = False
    angle: int | None = None  # where the open angle bracket is
    angle_at = False
    runs = 0
    run_end = -1
    last_in_run = False
    has_at = has_angle = False

    def close_entry() -> None:
        if not has_angle and not has_at and runs == 1:
            spots.append(run_end)

    for i, ch in enumerate(text):
        in_run = False
        if escaped:
            escaped = False
            in_run = depth == 0 and angle is None
        elif ch == "\\" and (quoted or depth):
            escaped = True
            in_run = depth == 0 and angle is None
        elif quoted:
            quoted = ch != '"'
            in_run = angle is None
        elif depth:
            depth += {"(": 1, ")": -1}.get(ch, 0)
        elif ch == "(":
            depth = 1
        elif ch == '"':
            quoted = True
            in_run = angle is None
        elif angle is not None:
            if ch == "@":
                angle_at = True
            elif ch == ">":
                if text[angle + 1 : i].strip() and not angle_at:
                    spots.append(i)
                angle = None
        elif ch == "<":
            angle, angle_at, has_angle = i, False, True
        elif ch in ",;:":
            if ch != ":":
                close_entry()
            runs, has_at, has_angle = 0, False, False
        elif not ch.isspace():
            has_at = has_at or ch == "@"
            in_run = True
        if in_run:
            if not last_in_run:
                runs += 1
            run_end = i + 1
        last_in_run = in_run
    close_entry()
    return spots
