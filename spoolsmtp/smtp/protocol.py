"""The SMTP client protocol as a pure state machine: commands to bytes, bytes to (command, reply).

Shape taken from h11: no sockets here. The driver calls ``send`` for each command and writes the
bytes it returns, feeds what the server sends to ``receive_data`` and takes ``next_event`` until
it returns ``NEED_DATA``. Each event pairs a reply with the command it answers, which is how
pipelined RCPT replies are attributed to the right recipient.

Rules of the protocol (RFC 5321, RFC 2920 for PIPELINING, RFC 3207 for STARTTLS):

* The server speaks first: the first reply answers ``GREETING``.
* Commands may be queued ahead of their replies only when PIPELINING is offered, and then only
  up to a command that ends a flight: EHLO, HELO, DATA, STARTTLS, QUIT, NOOP may be last in a
  flight, never followed before their reply arrives (RFC 2920 section 3.1). Without
  PIPELINING one command is outstanding at a time.
* After a 354 to DATA the message is sent with ``send_body`` (already CRLF and dot-stuffed) and
  closed with ``send_end_of_data``; nothing is pipelined past the final dot.
* After a 220 to STARTTLS, whatever else the server already sent is discarded (it cannot be
  trusted: it was not under TLS) and ``tls_started`` resets the protocol for the new EHLO.

Faults are split as h11 does: ``LocalProtocolError`` when we would break these rules,
``RemoteProtocolError`` when the server does (garbage, over-long lines, replies out of turn).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from enum import Enum, auto

from spoolsmtp.model.config import Timeouts
from spoolsmtp.model.errors import SpoolsmtpError
from spoolsmtp.model.reply import Reply, escape_controls, with_enhanced

MAX_REPLY_LINE = 2048
MAX_REPLY_LINES = 100
_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -])(.*)$", re.S)


class LocalProtocolError(SpoolsmtpError):
    """We tried to do something the protocol forbids at this point."""


class RemoteProtocolError(SpoolsmtpError):
    """The server sent something that is not a valid reply where one was due."""


class Verb(Enum):
    """What a reply answers."""

    GREETING = auto()
    EHLO = auto()
    HELO = auto()
    STARTTLS = auto()
    AUTH = auto()
    MAIL = auto()
    RCPT = auto()
    DATA = auto()
    END_OF_DATA = auto()
    RSET = auto()
    NOOP = auto()
    QUIT = auto()


_ENDS_FLIGHT = {
    Verb.EHLO,
    Verb.HELO,
    Verb.DATA,
    Verb.STARTTLS,
    Verb.AUTH,
    Verb.QUIT,
    Verb.NOOP,
}


class NeedData(Enum):
    """The sentinel ``next_event`` returns when a whole reply has not arrived yet."""

    NEED_DATA = auto()


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True)
class Command:
    """One command sent; ``tag`` lets the driver attribute the reply (e.g. a recipient index)."""

    verb: Verb
    text: str = ""
    tag: int = -1


@dataclass(frozen=True)
class Event:
    """A reply and the command it answers."""

    command: Command
    reply: Reply


@dataclass(frozen=True)
class Extensions:
    """What a server's EHLO reply offers."""

    names: frozenset[str]
    size: int | None = None
    auth: frozenset[str] = frozenset()  # the AUTH mechanisms offered

    @classmethod
    def parse(cls, reply: Reply) -> Extensions:
        names: set[str] = set()
        size: int | None = None
        auth: set[str] = set()
        for line in reply.lines[1:]:
            words = line.upper().split()
            if not words:
                continue
            if words[0].startswith("AUTH="):  # the pre-RFC 4954 form some servers still send
                words = ["AUTH", words[0][5:], *words[1:]]
            names.add(words[0])
            if words[0] == "SIZE" and len(words) > 1 and words[1].isdigit():
                size = int(words[1]) or None
            if words[0] == "AUTH":
                auth.update(words[1:])
        return cls(frozenset(names), size, frozenset(auth))

    def __contains__(self, name: object) -> bool:
        return name in self.names


NO_EXTENSIONS = Extensions(frozenset())


class ReplyParser:
    """Splits the server's bytes into replies; multi-line replies are joined."""

    def __init__(self) -> None:
        self._buf = b""
        self._lines: list[bytes] = []
        self._code: bytes | None = None

    def feed(self, data: bytes) -> None:
        self._buf += data

    def discard(self) -> bytes:
        """Drop whatever has not been parsed yet; return it (for the trace)."""
        left = self._buf
        self._buf = b""
        self._lines = []
        self._code = None
        return left

    @property
    def pending(self) -> bool:
        return bool(self._buf) or bool(self._lines)

    def next_reply(self) -> Reply | None:
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_REPLY_LINE:
                    raise RemoteProtocolError(f"reply line longer than {MAX_REPLY_LINE} octets")
                return None
            if nl > MAX_REPLY_LINE:
                raise RemoteProtocolError(f"reply line longer than {MAX_REPLY_LINE} octets")
            raw = self._buf[:nl].rstrip(b"\r")
            self._buf = self._buf[nl + 1 :]
            m = _REPLY_LINE.match(raw) or (_REPLY_LINE.match(raw + b" ") if len(raw) == 3 else None)
            if not m:
                shown = raw[:60].decode("ascii", "backslashreplace")
                raise RemoteProtocolError(f"not an SMTP reply line: {shown!r}")
            code, sep, text = m.groups()
            if self._code is not None and code != self._code:
                raise RemoteProtocolError("reply code changed inside a multi-line reply")
            self._code = code
            self._lines.append(text)
            if len(self._lines) > MAX_REPLY_LINES:
                raise RemoteProtocolError(f"reply of more than {MAX_REPLY_LINES} lines")
            if sep == b" ":
                lines = [escape_controls(x.decode("utf-8", "replace")) for x in self._lines]
                reply = with_enhanced(int(code), lines)
                self._lines = []
                self._code = None
                return reply


class ClientProtocol:
    """The client side of one SMTP connection; see the module docstring for its rules."""

    def __init__(self) -> None:
        self._parser = ReplyParser()
        self._pending: deque[Command] = deque([Command(Verb.GREETING)])
        self.extensions = NO_EXTENSIONS
        self.pipelining = False
        self._in_body = False
        self.closed = False

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    @property
    def awaiting(self) -> Verb | None:
        """The command the next reply will answer (None when nothing is outstanding)."""
        return self._pending[0].verb if self._pending else None

    def send(self, command: Command) -> bytes:
        """Queue a command; return the bytes to write."""
        if self.closed:
            raise LocalProtocolError("connection is closed")
        if self._in_body:
            raise LocalProtocolError(f"{command.verb.name} while the message body is open")
        if command.verb in (Verb.GREETING, Verb.END_OF_DATA):
            raise LocalProtocolError(f"{command.verb.name} is not a command")
        if self._pending:
            last = self._pending[-1]
            if not self.pipelining:
                raise LocalProtocolError(
                    f"{command.verb.name} before the reply to {last.verb.name}"
                )
            if last.verb in _ENDS_FLIGHT or last.verb in (Verb.GREETING, Verb.END_OF_DATA):
                raise LocalProtocolError(f"{command.verb.name} pipelined after {last.verb.name}")
        self._pending.append(command)
        return command.text.encode("utf-8") + b"\r\n"

    def send_body(self, data: bytes) -> bytes:
        """Message text after a 354; the caller has made it CRLF and dot-stuffed."""
        if not self._in_body:
            raise LocalProtocolError("message text without a 354 to DATA")
        return data

    def send_end_of_data(self) -> bytes:
        if not self._in_body:
            raise LocalProtocolError("end of data without a 354 to DATA")
        self._in_body = False
        self._pending.append(Command(Verb.END_OF_DATA))
        return b".\r\n"

    def receive_data(self, data: bytes) -> None:
        self._parser.feed(data)

    def next_event(self) -> Event | NeedData:
        reply = self._parser.next_reply()
        if reply is None:
            return NEED_DATA
        if not self._pending:
            raise RemoteProtocolError(f"reply {reply.code} when no command was outstanding")
        command = self._pending.popleft()
        if reply.code == 421:
            self.closed = True
        if command.verb is Verb.DATA and reply.code == 354:
            if self._pending:
                raise RemoteProtocolError("354 while other replies are still due")
            self._in_body = True
        if command.verb in (Verb.EHLO,) and reply.code == 250:
            self.extensions = Extensions.parse(reply)
        if command.verb is Verb.QUIT:
            self.closed = True
        return Event(command, reply)

    def tls_started(self) -> bytes:
        """After the 220 to STARTTLS: forget pre-TLS state; return discarded bytes (if any)."""
        if self._pending:
            raise LocalProtocolError("TLS started with replies still outstanding")
        self.extensions = NO_EXTENSIONS
        self.pipelining = False
        return self._parser.discard()

    def discard_unread(self) -> bytes:
        """Bytes received but not yet parsed (e.g. injected after a STARTTLS 220)."""
        return self._parser.discard() if self._parser.pending else b""


# which of ``Timeouts`` bounds the wait for the reply to each command
_TIMEOUT_FIELD = {
    Verb.GREETING: "greeting",
    Verb.EHLO: "ehlo",
    Verb.HELO: "ehlo",
    Verb.STARTTLS: "starttls",
    Verb.AUTH: "ehlo",
    Verb.MAIL: "mail",
    Verb.RCPT: "rcpt",
    Verb.DATA: "data",
    Verb.END_OF_DATA: "data_end",
    Verb.RSET: "mail",
    Verb.NOOP: "mail",
    Verb.QUIT: "quit",
}


def timeout_for(verb: Verb, t: Timeouts) -> float:
    """How long the reply to ``verb`` may take (RFC 5321 section 4.5.3.2)."""
    value: float = getattr(t, _TIMEOUT_FIELD[verb])
    return value
