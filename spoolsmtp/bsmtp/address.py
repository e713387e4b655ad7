"""RFC 5321 mailbox and path syntax: the checks a server applies to MAIL FROM and RCPT TO.

Pure functions over text that has already been decoded from UTF-8. Every fault is returned as a
``Reply`` so the reader can answer with it directly.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from spoolsmtp.model.config import Limits
from spoolsmtp.model.reply import Reply, make

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = re.compile(rf"^{_ATEXT}+(?:\.{_ATEXT}+)*$")
_QUOTED = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"$')
_LABEL_TEXT = (
    r"(?:[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]{0,61}"
    r"[A-Za-z0-9\u0080-\U0010ffff])?)"
)
_LABEL = re.compile(rf"^{_LABEL_TEXT}$")
# A whole domain of such labels in one match: what nearly every domain is, checked without a
# split and a match per label. Only a shortcut to "valid": what it does not take is checked
# label by label as before (where ``$`` lets a label end in a newline).
_LDH_DOMAIN = re.compile(rf"{_LABEL_TEXT}(?:\.{_LABEL_TEXT})*")
# The path nearly every MAIL and RCPT carries, in one match: ``<dot-string@domain>`` in ASCII,
# nothing quoted, no source route, no address literal (what ``parse_path`` takes, narrowed).
_ASCII_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]"
_ASCII_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_PLAIN_PATH = re.compile(
    rf"<({_ASCII_ATEXT}+(?:\.{_ASCII_ATEXT}+)*)@({_ASCII_LABEL}(?:\.{_ASCII_LABEL})*)>"
)
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+$")
_SOURCE_ROUTE = re.compile(r"^@[^:,]+(?:,@[^:,]+)*:")


@dataclass(frozen=True)
class Mailbox:
    """A checked mailbox: its local part and domain as written."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def parse_path(
    text: str, limits: Limits, *, sender: bool, utf8: bool
) -> tuple[Mailbox | None, Reply | None]:
    """Check ``<local@domain>`` (or ``<>`` when ``sender``); return the mailbox or a fault.

    ``utf8`` says whether SMTPUTF8 was declared: without it a non-ASCII address is refused with
    553 5.6.7 (RFC 6531 section 3.5).
    """
    status = "5.1.7" if sender else "5.1.3"
    role = "sender" if sender else "recipient"
    if len(text.encode("utf-8")) > limits.path:
        return None, make(553, status, f"{role} path longer than {limits.path} octets")
    if not (text.startswith("<") and text.endswith(">")):
        return None, make(501, status, f"bad {role} address syntax: expected <address>")
    inner = text[1:-1]
    if inner == "":
        if sender:
            return None, None
        return None, make(501, status, "bad recipient address syntax: empty address")
    if inner.startswith("@"):  # the pattern is anchored there; a sub costs a microsecond
        inner = _SOURCE_ROUTE.sub("", inner, count=1)
    local, at, domain = inner.rpartition("@")
    if not at or not local:
        return None, make(501, status, f"bad {role} address syntax: expected local@domain")
    if not (_DOT_STRING.match(local) or _QUOTED.match(local)):
        return None, make(501, status, f"bad {role} address syntax in local part")
    fault = check_domain(domain, role, status)
    if fault:
        return None, fault
    if not utf8 and not inner.isascii():
        return None, make(553, "5.6.7", f"non-ASCII {role} address needs SMTPUTF8")
    if len(local.encode("utf-8")) > limits.local_part:
        return None, make(553, status, f"local part longer than {limits.local_part} octets")
    if len(domain.encode("utf-8")) > limits.domain:
        return None, make(553, status, f"domain longer than {limits.domain} octets")
    return Mailbox(local, domain), None


def plain_path(text: str, limits: Limits) -> Mailbox | None:
    """``text`` when it is the usual path, ``<dot-string@domain>`` in ASCII within the limits,
    as ``parse_path`` would accept it; else None, and ``parse_path`` decides. A shortcut to
    acceptance only, one match instead of a dozen steps: it refuses nothing itself."""
    match = _PLAIN_PATH.fullmatch(text)
    if match is None or len(text) > limits.path:
        return None
    local, domain = match.groups()
    if len(local) > limits.local_part or len(domain) > limits.domain:
        return None
    return Mailbox(local, domain)


def check_domain(domain: str, role: str, status: str) -> Reply | None:
    """A domain name (LDH labels, UTF-8 allowed) or an address literal ``[1.2.3.4]``."""
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            if literal.lower().startswith("ipv6:"):
                # only hex digits, colons and dots: ipaddress would take a zone ("%eth 0\x1b")
                if not _IPV6.match(literal[5:]):
                    raise ValueError(literal)
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            return make(501, status, f"bad {role} address syntax: bad address literal")
        return None
    if _LDH_DOMAIN.fullmatch(domain):
        return None
    labels = domain.split(".")
    if not domain or not all(_LABEL.match(label) for label in labels):
        return make(501, status, f"bad {role} address syntax in domain")
    return None
