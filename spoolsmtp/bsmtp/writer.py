"""The envelope writer: mail transactions to a Batch SMTP file, dot-stuffed (the reader's inverse).

``submit``, the report generator and the tests all write envelopes through here, so every file
spoolsmtp produces is one its own reader accepts.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from spoolsmtp.model.envelope import MailParams, Recipient
from spoolsmtp.model.errors import SpoolsmtpError

_LINES = re.compile(rb"\r\n|\n")
MAX_TEXT_LINE = 998


class MessageError(SpoolsmtpError):
    """A message cannot be carried by SMTP as it is (bare CR, NUL, over-long line)."""

    def __init__(self, line: int, problem: str) -> None:
        self.line = line
        self.problem = problem
        super().__init__(f"message line {line}: {problem}")


@dataclass(frozen=True)
class Draft:
    """One transaction to write: sender, recipients, message text (CRLF or LF line endings)."""

    mail_from: str
    recipients: tuple[Recipient, ...]
    message: bytes
    params: MailParams = field(default_factory=MailParams)


def check_message(message: bytes, max_line: int = MAX_TEXT_LINE) -> None:
    """Refuse text SMTP would not carry unchanged: NUL, bare CR, lines over ``max_line`` octets."""
    for number, line in enumerate(_split(message), 1):
        if b"\x00" in line:
            raise MessageError(number, "NUL byte")
        if b"\r" in line:
            raise MessageError(number, "bare CR")
        if len(line) > max_line:
            raise MessageError(number, f"line longer than {max_line} octets")


def _split(message: bytes) -> list[bytes]:
    lines = _LINES.split(message)
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def write_to(
    out: BinaryIO,
    drafts: Iterable[Draft],
    helo: str,
    *,
    verbose: bool = False,
    tick: str | None = None,
    crlf: bool = True,
) -> None:
    """Write a whole envelope: HELO, optional VERB/TICK, each transaction, QUIT."""
    nl = b"\r\n" if crlf else b"\n"

    def cmd(text: str) -> None:
        out.write(text.encode("utf-8") + nl)

    cmd(f"EHLO {helo}")
    if verbose:
        cmd("VERB ON")
    if tick is not None:
        cmd(f"TICK {tick}")
    for draft in drafts:
        check_message(draft.message)
        params = draft.params.render()
        cmd(f"MAIL FROM:<{draft.mail_from}>" + (f" {params}" if params else ""))
        for rcpt in draft.recipients:
            cmd(f"RCPT TO:{rcpt.render()}")
        cmd("DATA")
        for line in _split(draft.message):
            out.write((b"." + line if line.startswith(b".") else line) + nl)
        out.write(b"." + nl)
    cmd("QUIT")


def render(
    drafts: Iterable[Draft],
    helo: str,
    *,
    verbose: bool = False,
    tick: str | None = None,
    crlf: bool = True,
) -> bytes:
    """The envelope as bytes."""
    buf = io.BytesIO()
    write_to(buf, drafts, helo, verbose=verbose, tick=tick, crlf=crlf)
    return buf.getvalue()
