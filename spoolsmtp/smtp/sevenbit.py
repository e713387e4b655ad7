"""8-bit to 7-bit conversion of a MIME message, for a server that does not offer 8BITMIME
(RFC 6152 section 3, RFC 2045, RFC 2046): pure, bytes in, bytes out.

``to_7bit`` takes the message as sent (CRLF lines, not dot-stuffed) and returns it with every
MIME part that holds 8-bit octets re-encoded, the rest byte for byte as it was:

* ``text/*`` parts: quoted-printable; other leaf parts (application/*, image/*, ...): base64.
  The part's ``Content-Transfer-Encoding`` field is replaced (or added); no other header field
  is touched, and the decoded content is the original octets.
* ``multipart/*``: each part converted in turn (its default type is text/plain, or
  message/rfc822 in multipart/digest); preamble and epilogue must be 7-bit.
* ``message/rfc822`` may not be encoded (RFC 2046 section 5.2.1): the enclosed message is
  converted the same way, its header must be 7-bit.
* A part whose label says 8bit or binary but whose content is 7-bit is relabelled 7bit.

``NotConvertible`` says why a message cannot be: not MIME (no MIME-Version), 8-bit octets in a
header, in a multipart's preamble or epilogue, in a base64 or quoted-printable part, in another
message/* type, a multipart without its boundary, or nesting deeper than ``MAX_DEPTH``.
"""

from __future__ import annotations

import base64
import binascii
import email
import re
from email.message import Message

CRLF = b"\r\n"
MAX_DEPTH = 50
_HIGH = re.compile(rb"[\x80-\xff]")
_CTE_FIELD = re.compile(rb"content-transfer-encoding[ \t]*:", re.I)
_ENCODED = ("base64", "quoted-printable")
_EIGHT = ("8bit", "binary")


class NotConvertible(ValueError):
    """The message cannot be sent as 7-bit; the text says why."""


def eight_bit(data: bytes) -> bool:
    """Whether ``data`` holds an octet above 127."""
    return _HIGH.search(data) is not None


def to_7bit(message: bytes) -> bytes:
    """The message with every 8-bit part re-encoded (see the module docstring)."""
    head, body = _split(message)
    if eight_bit(head):
        raise NotConvertible("8-bit octets in the header")
    if _fields(head).get("MIME-Version") is None:
        raise NotConvertible("not MIME (no MIME-Version header field)")
    changed = _entity(head, body, "text/plain", 0, "the message")
    return message if changed is None else changed[0] + CRLF + changed[1]


def _split(entity: bytes) -> tuple[bytes, bytes]:
    """Header (each field with its CRLF) and body of an entity; the blank line is neither."""
    if entity.startswith(CRLF) or not entity:
        return b"", entity[2:]
    end = entity.find(CRLF + CRLF)
    if end < 0:
        return entity if entity.endswith(CRLF) else entity + CRLF, b""
    return entity[: end + 2], entity[end + 4 :]


def _fields(head: bytes) -> Message:
    return email.message_from_bytes(head + CRLF)


def _entity(
    head: bytes, body: bytes, default: str, depth: int, where: str
) -> tuple[bytes, bytes] | None:
    """The entity's new header and body, or None when it needs no change."""
    if depth > MAX_DEPTH:
        raise NotConvertible(f"MIME parts nested more than {MAX_DEPTH} deep")
    if eight_bit(head):
        raise NotConvertible(f"8-bit octets in the header of {where}")
    fields = _fields(head)
    ctype = fields.get_content_type() if fields.get("Content-Type") else default
    cte = str(fields.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    maintype = ctype.split("/")[0]
    new_body: bytes | None = None
    if maintype == "multipart":
        new_body = _multipart(fields, ctype, body, depth, where)
    elif ctype == "message/rfc822":
        inner_head, inner_body = _split(body)
        inner = _entity(inner_head, inner_body, "text/plain", depth + 1, f"a message in {where}")
        if inner is not None:
            new_body = inner[0] + CRLF + inner[1]
    elif not eight_bit(body):
        pass
    elif cte in _ENCODED:
        raise NotConvertible(f"8-bit octets in a {cte} part ({where})")
    elif maintype == "message":
        raise NotConvertible(f"8-bit octets in a {ctype} part, which may not be encoded")
    elif maintype == "text":
        return _relabel(head, "quoted-printable"), _quoted_printable(body)
    else:
        return _relabel(head, "base64"), _base64(body)
    final = body if new_body is None else new_body
    if cte in _EIGHT and not eight_bit(final):
        return _relabel(head, "7bit"), final
    return None if new_body is None else (head, new_body)


def _multipart(fields: Message, ctype: str, body: bytes, depth: int, where: str) -> bytes | None:
    """The multipart body with its parts converted, or None when none needed it."""
    if not eight_bit(body):
        return None
    boundary = fields.get_boundary()
    if not boundary:
        raise NotConvertible(f"{ctype} without a boundary ({where})")
    lines = body.split(CRLF)
    dash = boundary.encode("ascii", "replace")
    dash = b"--" + dash
    marks = [i for i, line in enumerate(lines) if line.rstrip(b" \t") in (dash, dash + b"--")]
    if not marks:
        raise NotConvertible(f"{ctype} whose boundary never appears ({where})")
    close = next((i for i in marks if lines[i].rstrip(b" \t") == dash + b"--"), len(lines))
    marks = [i for i in marks if i < close]
    if eight_bit(CRLF.join(lines[: marks[0]])) or eight_bit(CRLF.join(lines[close + 1 :])):
        raise NotConvertible(f"8-bit octets in the preamble or epilogue of {ctype} ({where})")
    default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
    out = lines[: marks[0]]
    for n, (start, end) in enumerate(zip(marks, [*marks[1:], close], strict=True), 1):
        out.append(lines[start])
        part = CRLF.join(lines[start + 1 : end])
        part_head, part_body = _split(part)
        changed = _entity(part_head, part_body, default, depth + 1, f"part {n} of {where}")
        if changed is None:
            out.extend(lines[start + 1 : end])
        else:
            out.extend((changed[0] + CRLF + changed[1]).split(CRLF))
    out.extend(lines[close:])
    return CRLF.join(out)


def _relabel(head: bytes, cte: str) -> bytes:
    """The header with its Content-Transfer-Encoding field (folded or not) set to ``cte``."""
    new = b"Content-Transfer-Encoding: " + cte.encode("ascii") + CRLF
    lines = head.split(CRLF)[:-1] if head else []
    out: list[bytes] = []
    replaced = False
    skipping = False
    for line in lines:
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        skipping = False
        if _CTE_FIELD.match(line):
            skipping = True
            if not replaced:
                out.append(new[:-2])
                replaced = True
            continue
        out.append(line)
    if not replaced:
        out.append(new[:-2])
    return CRLF.join(out) + CRLF


def _quoted_printable(body: bytes) -> bytes:
    """Quoted-printable (RFC 2045 section 6.7) that decodes to ``body`` octet for octet: line
    breaks are the CRLFs of the text, any other CR or LF is encoded."""
    lines = body.split(CRLF)
    encoded = [
        binascii.b2a_qp(line, quotetabs=False, istext=False, header=False).replace(b"\n", CRLF)
        for line in lines
    ]
    return CRLF.join(encoded)


def _base64(body: bytes) -> bytes:
    return base64.encodebytes(body).replace(b"\n", CRLF)
