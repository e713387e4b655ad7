"""The values an envelope is made of: mail parameters, recipients, message extents, transactions.

A message is not held in memory: ``Message`` records where its text lies in the envelope file
(byte offsets of the dot-stuffed lines as written), so a 200 MB message costs a few integers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from spoolsmtp.model.reply import Reply


class BodyType(Enum):
    """The BODY= parameter of MAIL FROM (RFC 6152)."""

    SEVEN_BIT = "7BIT"
    EIGHT_BIT = "8BITMIME"


class Ret(Enum):
    """The RET= parameter of MAIL FROM (RFC 3461): what a report returns of the message."""

    FULL = "FULL"
    HDRS = "HDRS"


class Notify(Enum):
    """One value of the NOTIFY= parameter of RCPT TO (RFC 3461); NEVER is the empty set."""

    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"


@dataclass(frozen=True)
class MailParams:
    """The ESMTP parameters of MAIL FROM."""

    size: int | None = None
    body: BodyType | None = None
    smtputf8: bool = False
    ret: Ret | None = None
    envid: str | None = None

    def render(self) -> str:
        parts: list[str] = []
        if self.size is not None:
            parts.append(f"SIZE={self.size}")
        if self.body is not None:
            parts.append(f"BODY={self.body.value}")
        if self.smtputf8:
            parts.append("SMTPUTF8")
        if self.ret is not None:
            parts.append(f"RET={self.ret.value}")
        if self.envid is not None:
            parts.append(f"ENVID={self.envid}")
        return " ".join(parts)


@dataclass(frozen=True)
class Recipient:
    """An accepted RCPT TO: the address as written and its DSN parameters."""

    address: str
    notify: frozenset[Notify] | None = None
    orcpt: str | None = None
    line: int = 0

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()

    def render(self) -> str:
        parts = [f"<{self.address}>"]
        if self.notify is not None:
            names = sorted(n.value for n in self.notify)
            parts.append("NOTIFY=" + (",".join(names) if names else "NEVER"))
        if self.orcpt is not None:
            parts.append(f"ORCPT={self.orcpt}")
        return " ".join(parts)


@dataclass(frozen=True)
class Message:
    """Where a message's text lies in the envelope file, and what a scan learned of it.

    ``start``/``end`` delimit the dot-stuffed lines as written (terminator excluded); ``crlf``
    is the file's line ending; ``size`` counts the octets of the message itself (unstuffed,
    CRLF line endings), which is what SIZE= and ``max_message_bytes`` measure.
    """

    start: int
    end: int
    crlf: bool
    lines: int
    size: int
    eight_bit: bool
    received: int

    @property
    def verbatim(self) -> bool:
        """The lines as written are the wire form: CRLF, and none begins with a dot (the scan
        counts a leading dot as stuffing, so only then is ``size`` the extent's length)."""
        return self.crlf and self.size == self.end - self.start


@dataclass(frozen=True)
class Transaction:
    """One accepted mail transaction: sender, accepted recipients, and its message."""

    number: int
    line: int
    helo: str
    mail_from: str
    params: MailParams
    recipients: tuple[Recipient, ...]
    message: Message
    owner_uid: int | None = None  # who wrote the file (our Received header says so)


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of the batch response: a command as written (its echo) and the reply it got.

    ``sender`` (refusals only) is the MAIL FROM of the transaction the command stood in: the
    last valid one before it, else the file's first; "" for ``<>``; None when the file has none.
    """

    line: int
    echo: str
    reply: Reply
    sender: str | None = None


@dataclass(frozen=True)
class Envelope:
    """Everything a read of one envelope file learned: what to send and how each command fared."""

    source: str
    transactions: tuple[Transaction, ...]
    response: tuple[Entry, ...]
    verbose: bool = False
    last_sender: str | None = None
    errors: tuple[Entry, ...] = field(default=())
    owner: tuple[int, int] | None = None  # uid and gid of the file as submitted

    @property
    def accepted(self) -> bool:
        """True when every command got a positive reply."""
        return not self.errors
