"""The result of one delivery attempt, per recipient, and how a reply decides a recipient's fate.

Pure values and decisions: a 2xx is delivered, a 5xx failed, a 4xx (or anything that stopped the
dialogue: 421, a lost connection, a timeout) deferred.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from spoolsmtp.model.envelope import Recipient
from spoolsmtp.model.reply import Kind, Reply, make


class Status(Enum):
    """Where a recipient stands after an attempt."""

    DELIVERED = "delivered"
    FAILED = "failed"
    DEFERRED = "deferred"


@dataclass(frozen=True)
class RecipientResult:
    """One recipient's outcome: the reply that decided it and who gave it.

    ``after_dot`` marks a deferral whose cause came after the final dot was sent (RFC 5321
    section 6.1): the server may have accepted the message, so a retry may duplicate it.
    ``local`` marks a reply spoolsmtp decided itself (a server's SIZE limit, a missing
    8BITMIME or SMTPUTF8, a DNS answer, a mail loop): no server said it, and ``host`` is None.
    ``dsn_relayed`` marks a recipient accepted by a server that offered DSN and was given the
    recipient's DSN parameters: from there on, that server reports (RFC 3461 section 6.2.1).
    ``setup`` and ``transfer`` are the seconds the attempt spent setting up (a connection slot,
    DNS, connect, greeting, EHLO, STARTTLS) and transmitting (MAIL FROM to the final reply): the
    mail log's ``delays`` c and d (maillog.py).
    """

    recipient: Recipient
    status: Status
    reply: Reply
    host: str | None = None
    address: str | None = None
    after_dot: bool = False
    local: bool = False
    dsn_relayed: bool = False
    setup: float = 0.0
    transfer: float = 0.0

    def timed(self, setup: float, transfer: float) -> RecipientResult:
        """This result with the attempt's ``setup`` and ``transfer``: ``dataclasses.replace``'s
        result, built directly (it runs for every recipient; replace costs twice as much)."""
        return RecipientResult(
            self.recipient,
            self.status,
            self.reply,
            self.host,
            self.address,
            self.after_dot,
            self.local,
            self.dsn_relayed,
            setup,
            transfer,
        )


def status_of(reply: Reply) -> Status:
    """The fate a final reply gives a recipient."""
    if reply.kind is Kind.POSITIVE:
        return Status.DELIVERED
    if reply.kind is Kind.PERMANENT:
        return Status.FAILED
    return Status.DEFERRED


def result(
    recipient: Recipient,
    reply: Reply,
    host: str | None = None,
    address: str | None = None,
    *,
    after_dot: bool = False,
    local: bool = False,
    dsn_relayed: bool = False,
) -> RecipientResult:
    """A recipient's result decided by ``reply``."""
    status = status_of(reply)
    return RecipientResult(recipient, status, reply, host, address, after_dot, local, dsn_relayed)


def decided_here(recipient: Recipient, reply: Reply) -> RecipientResult:
    """A recipient's result decided by spoolsmtp itself, not by a server's reply."""
    return result(recipient, reply, local=True)


def connection_lost(stage: str) -> Reply:
    return make(451, "4.4.2", f"connection lost {stage}".strip())


def timed_out(stage: str) -> Reply:
    return make(451, "4.4.2", f"timeout {stage}".strip())
