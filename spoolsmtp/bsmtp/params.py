"""The ESMTP parameters of MAIL FROM and RCPT TO, and the path they follow, checked as a server
checks them: SIZE, BODY, SMTPUTF8, RET, ENVID (RFC 1870, 6152, 6531, 3461), NOTIFY and ORCPT
(RFC 3461). Pure functions; every fault is a ``Reply`` the reader answers with.

ORCPT is ``addr-type;xtext`` with an atom as addr-type, and neither its xtext (``+XX``) nor a
utf-8-addr escape (``\\x{HEX}``) may encode a control character: the value goes on the wire and
into the Original-Recipient field of reports.
"""

from __future__ import annotations

import re

from spoolsmtp.model.config import Limits
from spoolsmtp.model.envelope import BodyType, MailParams, Notify, Ret
from spoolsmtp.model.reply import Reply, make

_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9!#$%&'*/=?^_`{|}~\-]+$")
_HEX = re.compile(r"\+([0-9A-F]{2})|\\x\{([0-9A-Fa-f]{1,6})\}")
# MAIL FROM without parameters, the usual case: one shared value, not one built per command
NO_PARAMS = MailParams()


def split_path(text: str) -> tuple[str, str]:
    """Split ``<path> params``, respecting quoted local parts; a bare path ends at a space."""
    if not text.startswith("<"):
        path, _, rest = text.partition(" ")
        return path, rest
    if '"' not in text:
        # nothing quoted, so nothing escaped: the first '>' ends the path, found in C rather
        # than by the walk (split_at_close), a Python step per character of every MAIL and RCPT
        end = text.find(">")
        return (text, "") if end < 0 else (text[: end + 1], text[end + 1 :])
    return split_at_close(text)


def split_at_close(text: str) -> tuple[str, str]:
    """``<path>`` and what follows: the path ends at the first '>' outside a quoted string (a
    backslash quotes within one), found by walking the text; ``split_path`` takes a C search
    instead when nothing is quoted, which must find the same end."""
    quoted = False
    escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return text[: i + 1], text[i + 1 :]
    return text, ""


def _params(text: str) -> tuple[dict[str, str | None], Reply | None]:
    out: dict[str, str | None] = {}
    if text and not text.startswith(" "):
        return out, make(501, "5.5.4", "parameters must follow the address after a space")
    for word in text.split():
        name, eq, value = word.partition("=")
        key = name.upper()
        if key in out:
            return out, make(501, "5.5.4", f"duplicate parameter {key}")
        out[key] = value if eq else None
    return out, None


def mail_params(text: str, limits: Limits) -> tuple[MailParams, Reply | None]:
    if not text:
        return NO_PARAMS, None
    params, fault = _params(text)
    if fault is not None:
        return MailParams(), fault
    size: int | None = None
    body: BodyType | None = None
    smtputf8 = False
    ret: Ret | None = None
    envid: str | None = None
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                return MailParams(), make(501, "5.5.4", "SIZE needs a number of octets")
            size = int(value)
            if size > limits.max_message_bytes:
                return MailParams(), make(
                    552,
                    "5.3.4",
                    f"message size exceeds fixed maximum message size ({limits.max_message_bytes})",
                )
        elif key == "BODY":
            names = {b.value: b for b in BodyType}
            if value is None or value.upper() not in names:
                if value is not None and value.upper() == "BINARYMIME":
                    return MailParams(), make(555, "5.5.4", "BODY=BINARYMIME is not supported")
                return MailParams(), make(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
            body = names[value.upper()]
        elif key == "SMTPUTF8":
            if value is not None:
                return MailParams(), make(501, "5.5.4", "SMTPUTF8 takes no value")
            smtputf8 = True
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                return MailParams(), make(501, "5.5.4", "RET must be FULL or HDRS")
            ret = Ret(value.upper())
        elif key == "ENVID":
            if value is None or not value or len(value) > 100 or not _XTEXT.match(value):
                return MailParams(), make(501, "5.5.4", "ENVID must be 1-100 characters of xtext")
            envid = value
        else:
            return MailParams(), make(555, "5.5.4", f"unsupported MAIL parameter {key}")
    return MailParams(size, body, smtputf8, ret, envid), None


def rcpt_params(text: str) -> tuple[frozenset[Notify] | None, str | None, Reply | None]:
    if not text:
        return None, None, None
    params, fault = _params(text)
    if fault is not None:
        return None, None, fault
    notify: frozenset[Notify] | None = None
    orcpt: str | None = None
    for key, value in params.items():
        if key == "NOTIFY":
            words = (value or "").upper().split(",")
            if words == ["NEVER"]:
                notify = frozenset()
            elif words and all(w in ("SUCCESS", "FAILURE", "DELAY") for w in words):
                notify = frozenset(Notify(w) for w in words)
            else:
                return (
                    None,
                    None,
                    make(501, "5.5.4", "NOTIFY must be NEVER or a list of SUCCESS,FAILURE,DELAY"),
                )
        elif key == "ORCPT":
            kind, semi, addr = (value or "").partition(";")
            if not semi or not kind or not addr or len(value or "") > 500:
                return None, None, make(501, "5.5.4", "ORCPT must be addr-type;address")
            if not _ADDR_TYPE.match(kind):
                return None, None, make(501, "5.5.4", "ORCPT addr-type must be an atom (rfc822)")
            if not _XTEXT.match(addr) or _hides_control(addr):
                return None, None, make(501, "5.5.4", "ORCPT address must be printable xtext")
            orcpt = value
        else:
            return None, None, make(555, "5.5.4", f"unsupported RCPT parameter {key}")
    return notify, orcpt, None


def _hides_control(xtext: str) -> bool:
    """True when xtext (``+XX``, or utf-8-addr ``\\x{HEX}``) encodes a control character."""
    for m in _HEX.finditer(xtext):
        code = int(m.group(1) or m.group(2), 16)
        if code < 0x20 or 0x7F <= code < 0xA0:
            return True
    return False
