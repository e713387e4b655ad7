"""DKIM signing (RFC 6376) of what we send, with dkimpy: one key per sender domain.

The domain is that of the first address in the message's From: field (the author domain DMARC
aligns with); a message from a domain without a key is sent unsigned. rsa-sha256,
relaxed/relaxed, over the header fields of ``SIGNED`` that the message has (From always);
our Received header is not signed (later hops add theirs above it). The signature is made
by ``outgoing.decide`` over the exact text that goes out (after any 7-bit conversion).

dkimpy is an optional dependency (``spoolsmtp[dkim]``): ``load_key`` raises ``MissingDkimpy``
when it is not installed, so a configuration with ``dkim`` keys stops start-up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from types import ModuleType
from typing import Any

SIGNED = (
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Id",
    "List-Unsubscribe",
)
Trace = Callable[[str], None]


class MissingDkimpy(ImportError):
    """dkim keys are configured but dkimpy is not installed."""


class BadKey(ValueError):
    """A key file that dkimpy cannot sign with."""


def _dkim() -> ModuleType:
    try:
        return importlib.import_module("dkim")
    except ImportError as exc:
        raise MissingDkimpy("needs dkimpy: pip install 'spoolsmtp[dkim]'") from exc


def require() -> None:
    """MissingDkimpy unless dkimpy can be imported."""
    _dkim()


@dataclass(frozen=True)
class Key:
    domain: str
    selector: str
    private: bytes

    def __repr__(self) -> str:  # never the key in a log or a traceback
        return f"Key({self.domain!r}, selector={self.selector!r})"


def load_key(domain: str, selector: str, private: bytes) -> Key:
    """A key checked by signing a test message with it (MissingDkimpy, BadKey)."""
    key = Key(domain.lower().rstrip("."), selector, private)
    dkim = _dkim()
    try:
        _sign(dkim, key, f"From: test@{key.domain}\r\nSubject: key check\r\n\r\n".encode())
    except dkim.DKIMException as exc:
        raise BadKey(f"cannot sign with this key ({exc})") from None
    return key


def _sign(dkim: Any, key: Key, message: bytes) -> bytes:
    head = b"\r\n" + message.split(b"\r\n\r\n", 1)[0].lower()
    present = [h for h in SIGNED if f"\r\n{h.lower()}:".encode() in head]
    headers = [h.encode() for h in dict.fromkeys(["From", *present])]
    signature: bytes = dkim.sign(
        message,
        key.selector.encode(),
        key.domain.encode(),
        key.private,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=headers,
        linesep=b"\r\n",
    )
    return signature


def author_domain(message: bytes) -> str | None:
    """The domain of the first From: address, lower case; None without one."""
    head = message.split(b"\r\n\r\n", 1)[0]
    fields = BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n\r\n")
    values = [str(v) for v in fields.get_all("From", [])]
    for _, address in getaddresses(values):
        if "@" in address:
            return address.rpartition("@")[2].lower().rstrip(".")
    return None


class Signer:
    """Signs a message with the key of its author domain (``outgoing.Signer``)."""

    def __init__(self, keys: dict[str, Key], trace: Trace | None = None) -> None:
        self.keys = keys
        self.trace = trace
        self._dkim = _dkim()

    def applies(self, head: bytes) -> bool:
        """A key is configured for the domain of the header's From: address."""
        domain = author_domain(head)
        return domain is not None and domain in self.keys

    def __call__(self, message: bytes) -> bytes:
        domain = author_domain(message)
        key = self.keys.get(domain) if domain is not None else None
        if key is None:
            return b""
        try:
            return _sign(self._dkim, key, message)
        except self._dkim.DKIMException as exc:
            # a header dkimpy cannot parse: the message goes unsigned, as from a domain
            # without a key, rather than not at all
            if self.trace is not None:
                self.trace(f"dkim: not signed for {domain}: {exc}")
            return b""
