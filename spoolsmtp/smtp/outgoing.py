"""The bytes to send for one transaction on one connection, decided in one place: the stored
message as it is, or transformed (8-bit to 7-bit conversion, DKIM signature).

``decide`` runs after EHLO (whether to convert depends on the server's 8BITMIME) and before
MAIL (SIZE counts what goes out). Order, so that a signature covers the bytes on the wire:
our Received header is put first, then the text is converted when it must be, then signed;
the DKIM-Signature goes before the Received header.

``Outgoing.as_stored`` is True when the message goes out exactly as stored (only our Received
in front): the one case where the wire bytes may be taken from the file unchanged. A transform
needs the whole message in memory (at most ``limits.max_message_bytes``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from spoolsmtp.model.envelope import BodyType, Transaction
from spoolsmtp.model.reply import Reply, make
from spoolsmtp.smtp.protocol import Extensions
from spoolsmtp.smtp.sevenbit import NotConvertible, to_7bit
from spoolsmtp.smtp.transaction import eight_bit

MessageText = Callable[[], Iterable[bytes]]


class Signer(Protocol):
    """DKIM (dkimsign.py): whether a key applies to a message's header, and the
    DKIM-Signature field (CRLF-terminated) for a whole message, or b"" when not signing it."""

    def applies(self, head: bytes) -> bool: ...
    def __call__(self, message: bytes) -> bytes: ...


@dataclass(frozen=True)
class Outgoing:
    """What goes out: the transaction as the server sees it (SIZE, BODY), what we put before
    the message, the message in DATA form (CRLF, dot-stuffed); or why it is not sent."""

    tx: Transaction
    head: bytes
    message: MessageText
    as_stored: bool
    refusal: Reply | None = None


def decide(
    tx: Transaction,
    ext: Extensions,
    received: bytes,
    message: MessageText,
    convert: bool,
    signer: Signer | None,
    server: str,
) -> Outgoing:
    """The bytes to send to ``server`` (see the module docstring)."""
    converting = convert and eight_bit(tx) and "8BITMIME" not in ext
    # only the header is read to learn that no key applies: such a message goes as stored
    signing = signer is not None and signer.applies(_head(message))
    if not converting and not signing:
        return Outgoing(tx, received, message, as_stored=True)
    text = unstuff(b"".join(message()))
    if converting:
        try:
            text = to_7bit(text)
        except NotConvertible as exc:
            reply = make(
                554,
                "5.6.3",
                f"8-bit message but {server} does not offer 8BITMIME, "
                f"and it cannot be converted to 7 bit: {exc}",
            )
            return Outgoing(tx, received, message, as_stored=True, refusal=reply)
        body = None if tx.params.body is None else BodyType.SEVEN_BIT
        tx = dataclasses.replace(
            tx,
            message=dataclasses.replace(tx.message, size=len(text), eight_bit=False),
            params=dataclasses.replace(tx.params, body=body),
        )
    head = received
    if signing:
        assert signer is not None
        head = signer(received + text) + received
    wire = stuff(text)
    return Outgoing(tx, head, lambda: iter((wire,)), as_stored=False)


def _head(message: MessageText) -> bytes:
    """The message's header, read only as far as the blank line that ends it."""
    seen = b""
    for chunk in message():
        seen += chunk
        end = seen.find(b"\r\n\r\n")
        if end >= 0:
            return unstuff(seen[: end + 2])
    return unstuff(seen)


def unstuff(wire: bytes) -> bytes:
    """DATA form (CRLF lines, dot-stuffed) back to the text."""
    text = wire.replace(b"\r\n..", b"\r\n.")
    return text[1:] if text.startswith(b"..") else text


def stuff(text: bytes) -> bytes:
    """The text in DATA form: a leading dot doubled on every line."""
    wire = text.replace(b"\r\n.", b"\r\n..")
    return b"." + wire if wire.startswith(b".") else wire
