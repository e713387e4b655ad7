"""The Batch SMTP envelope reader: a pure state machine answering each command as a server would.

Rules of the file (SPEC.md "The envelope"):

* Lines end in LF or CRLF; the first line fixes which. A line with the other ending, a bare CR,
  or a NUL inside a message is an error and the message is refused at its end: nothing that could
  smuggle an end-of-data past a remote server ever leaves us. In CRLF files the end of data is
  only ``CRLF . CRLF``; in LF files only ``LF . LF``.
* Commands are case-insensitive; blank command lines are skipped. QUIT is implied at end of file;
  a HELO/EHLO after QUIT opens a new session (concatenated envelopes stay readable).
* The states are NO_HELO -> READY -> MAIL (a transaction is open) -> DATA (reading a message)
  -> READY, plus SKIP (the body of a refused DATA, consumed and dropped) and CLOSED (after QUIT).
* A transaction abandoned without DATA (QUIT, HELO/EHLO, or end of file after MAIL) is answered
  with an error, like a refused command. Only RSET discards a transaction silently. HELO/EHLO in
  a transaction resets it (RFC 5321 4.1.4): its recipients never join a later transaction.
* Every refusal remembers the sender of the transaction it stood in (``Entry.sender``), so that
  each sender is told of its own refused commands.
* Structural faults reject the whole file, raising ``EnvelopeFault``: binary content (a NUL or
  control bytes among commands), an empty file, DATA never terminated, a file over the size limit,
  more commands, transactions or recipients than the per-file limits allow. Reading stops at the
  line that passes a limit, so what the reader keeps stays bounded (about 1 KB per command line).
* Fields that reach headers, the wire or a terminal carry no control characters: HELO/EHLO must
  name a domain or an address literal, ORCPT must be ``atom;xtext`` that encodes no control
  character.

The reader does no I/O: feed it bytes with ``feed`` and call ``finish`` at end of file. It keeps
offsets, not message text, so memory does not grow with message size; message text is scanned
by ``datascan``, and the fixed answers and echoes are in ``batchreply``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum, auto

from spoolsmtp.bsmtp import batchreply, paths
from spoolsmtp.bsmtp.address import check_domain
from spoolsmtp.bsmtp.datascan import MAX_PARTIAL, Scan, scan_data
from spoolsmtp.model.config import Limits
from spoolsmtp.model.envelope import Entry, Envelope, MailParams, Recipient, Transaction
from spoolsmtp.model.errors import EnvelopeFault
from spoolsmtp.model.reply import Reply, make

_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class State(Enum):
    """Where the reader is in the SMTP dialogue."""

    NO_HELO = auto()
    READY = auto()
    MAIL = auto()
    DATA = auto()
    SKIP = auto()
    CLOSED = auto()


# The states as module names: ``State.X`` goes through EnumType's ``__getattr__`` hook in
# Python 3.11, about 0.15 us a time, and the reader compares states several times a line.
_NO_HELO, _READY, _MAIL = State.NO_HELO, State.READY, State.MAIL
_DATA, _SKIP, _CLOSED = State.DATA, State.SKIP, State.CLOSED


@dataclass
class _Open:
    """A transaction between MAIL and the end of its DATA."""

    line: int
    mail_from: str
    params: MailParams
    recipients: list[Recipient] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)


class Reader:
    """Reads one envelope file's bytes and answers each command; see the module docstring."""

    def __init__(
        self,
        source: str,
        limits: Limits,
        hostname: str,
        max_file_bytes: int | None = None,
        unqualified: paths.Qualify | None = None,
    ) -> None:
        self.source = source
        # what an address with no domain stands for (rewrite.qualify_domain, nicknames);
        # None: such an address is refused, as RFC 5321 says
        self.unqualified = unqualified
        self.limits = limits
        self.hostname = hostname
        self.max_file_bytes = max_file_bytes
        self._buf = b""
        self._offset = 0
        self._line = 0
        self._crlf: bool | None = None
        self._state = _NO_HELO
        self._helo = ""
        self._helo_line = 0
        self._quit_line = 0
        self._verbose = False
        self._open: _Open | None = None
        self._scan: Scan | None = None
        self._long_line = 0
        self._last_sender: str | None = None
        self._first_sender: str | None = None
        self._commands = 0
        self._replies: dict[Reply, Reply] = {}
        self._mails = 0
        self._recipients = 0
        self._entries: list[Entry] = []
        self._transactions: list[Transaction] = []
        self._seen_content = False

    # -- input -----------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the file; raises ``EnvelopeFault`` on a structural fault."""
        if not data:
            return
        total = self._offset + len(self._buf) + len(data)
        if self.max_file_bytes is not None and total > self.max_file_bytes:
            raise EnvelopeFault(self.source, 1, f"file larger than {self.max_file_bytes} octets")
        self._buf += data
        self._process(final=False)

    def finish(self) -> Envelope:
        """End of file: settle the last line, answer what was left open, return the result."""
        if self._buf:
            self._process(final=True)
        if self._state in (_DATA, _SKIP):
            assert self._scan is not None
            raise EnvelopeFault(
                self.source,
                self._scan.line,
                "DATA begun here is never terminated by a line holding only '.'",
            )
        if not self._seen_content:
            raise EnvelopeFault(self.source, 1, "empty file: no commands")
        if self._open is not None:
            self._answer(self._line + 1, "(end of file)", batchreply.abandoned(self._open.line))
            self._open = None
        errors = tuple(
            e if e.sender is not None else Entry(e.line, e.echo, e.reply, self._first_sender)
            for e in self._entries
            if not e.reply.ok
        )
        return Envelope(
            source=self.source,
            transactions=tuple(self._transactions),
            response=tuple(self._entries),
            verbose=self._verbose,
            last_sender=self._last_sender,
            errors=errors,
        )

    # -- line splitting --------------------------------------------------------------------

    def _process(self, *, final: bool) -> None:
        buf = self._buf
        pos = 0
        end = len(buf)
        while pos < end:
            if self._state in (_DATA, _SKIP):
                new = self._scan_data(buf, pos, final=final)
                if new == pos:
                    break
                pos = new
                continue
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if final:
                    self._command(buf[pos:], self._offset + pos)
                    pos = end
                elif end - pos > MAX_PARTIAL:
                    self._no_line_end(buf[pos:end])
                    pos = end
                break
            self._command(buf[pos : nl + 1], self._offset + pos)
            pos = nl + 1
        self._offset += pos
        self._buf = buf[pos:]

    def _no_line_end(self, chunk: bytes) -> None:
        """A run of bytes with no LF in sight: binary at the start, else one over-long line."""
        if not self._seen_content or _CONTROL.search(chunk):
            raise EnvelopeFault(self.source, self._line + 1, "binary content: no line structure")
        if not self._long_line:
            self._long_line = self._line + 1

    # -- commands --------------------------------------------------------------------------

    def _command(self, raw: bytes, offset: int) -> None:
        self._line += 1
        line = self._line
        ended = raw.endswith(b"\n")
        if not ended:
            content, crlf = raw, self._crlf is not False
        elif raw.endswith(b"\r\n"):
            content, crlf = raw[:-2], True
        else:
            content, crlf = raw[:-1], False
        if self._long_line:
            start, self._long_line = self._long_line, 0
            self._line = line = start
            echo = batchreply.echo(content, 40) + "..."
            self._answer(line, echo, batchreply.too_long(self.limits.command_line))
            return
        if b"\x00" in content or (not self._seen_content and _CONTROL.search(content)):
            raise EnvelopeFault(self.source, line, "binary content: NUL or control bytes")
        if not content or content.isspace():
            return
        if self._crlf is None and ended:
            self._crlf = crlf
        self._seen_content = True
        self._commands += 1
        limits = self.limits
        if self._commands > limits.commands_per_file:
            self._over(line, limits.commands_per_file, "commands", "commands_per_file")
        # decoded once, for the echo and the command: not UTF-8 is answered below, in its turn
        try:
            text: str | None = content.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        echo = batchreply.echo(content, limits.command_line, text)
        if len(content) + 2 > limits.command_line:
            self._answer(line, echo, batchreply.too_long(limits.command_line))
            return
        if b"\r" in content:
            self._answer(line, echo, batchreply.BARE_CR)
            return
        if ended and crlf != self._crlf:
            self._answer(line, echo, batchreply.mixed(self._crlf))
            return
        if text is None:
            if len(self._entries) == 0:
                raise EnvelopeFault(
                    self.source, line, "binary content: first line is not UTF-8 text"
                )
            self._answer(line, echo, batchreply.NOT_UTF8)
            return
        verb, _, arg = text.strip().partition(" ")
        verb = verb.upper()
        arg = arg.strip()
        self._answer(line, echo, self._dispatch(verb, arg, line, offset + len(raw)))

    def _dispatch(self, verb: str, arg: str, line: int, next_offset: int) -> Reply:
        if self._state is _CLOSED and verb not in ("HELO", "EHLO"):
            return make(
                503,
                "5.5.1",
                f"session ended by QUIT at line {self._quit_line}; HELO or EHLO to start again",
            )
        if verb in ("HELO", "EHLO"):
            return self._helo_cmd(verb, arg, line)
        if verb == "MAIL":
            return self._mail(arg, line)
        if verb == "RCPT":
            return self._rcpt(arg, line)
        if verb == "DATA":
            return self._data(arg, line, next_offset)
        if verb == "RSET":
            if arg:
                return make(501, "5.5.4", "RSET takes no argument")
            self._open = None
            if self._state is _MAIL:
                self._state = _READY
            return batchreply.RESET
        if verb == "QUIT":
            return self._quit(arg, line)
        if verb == "VERB":
            return self._verb(arg)
        return batchreply.stateless(verb, arg)

    def _helo_cmd(self, verb: str, arg: str, line: int) -> Reply:
        if not arg or " " in arg:
            return make(501, "5.5.4", f"Syntax: {verb} hostname")
        if check_domain(arg, "HELO", "5.5.4") is not None:
            return make(
                501,
                "5.5.4",
                f"{verb} needs a domain name or an address literal such as [192.0.2.1]",
            )
        self._helo = arg
        self._helo_line = line
        self._state = _READY
        if self._open is not None:
            # RFC 5321 4.1.4: HELO/EHLO in a transaction resets it, as RSET would (and as Exim
            # does); unlike RSET it is answered as an error, so the job learns of the loss
            begun, self._open = self._open.line, None
            return make(
                503,
                "5.5.1",
                f"transaction begun at line {begun} abandoned without DATA: {verb} resets it",
            )
        return batchreply.greeting(verb, arg, self.hostname, self.limits.max_message_bytes)

    def _mail(self, arg: str, line: int) -> Reply:
        if self._state is _NO_HELO:
            return make(503, "5.5.1", "send HELO or EHLO first")
        if self._open is not None:
            return make(503, "5.5.1", f"nested MAIL command (MAIL at line {self._open.line})")
        if not arg.upper().startswith("FROM:"):
            return make(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
        params, mailbox, fault = paths.sender(arg[5:].lstrip(), self.limits, self.unqualified)
        if fault is not None:
            return fault
        sender = str(mailbox) if mailbox else ""
        self._mails += 1
        if self._mails > self.limits.transactions_per_file:
            self._over(
                line, self.limits.transactions_per_file, "transactions", "transactions_per_file"
            )
        self._open = _Open(line, sender, params)
        self._state = _MAIL
        self._last_sender = sender
        if self._first_sender is None:
            self._first_sender = sender
        return batchreply.sender_ok(sender)

    def _rcpt(self, arg: str, line: int) -> Reply:
        if self._open is None:
            return make(503, "5.5.1", "need MAIL before RCPT")
        if not arg.upper().startswith("TO:"):
            return make(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
        utf8 = self._open.params.smtputf8
        mailbox, notify, orcpt, fault = paths.recipient(
            arg[3:].lstrip(), self.limits, self.hostname, self.unqualified, utf8=utf8
        )
        if fault is not None:
            return fault
        assert mailbox is not None
        address = str(mailbox)
        # RFC 5321 2.4: a local part is case-sensitive; only the domain is not
        key = f"{mailbox.local}@{mailbox.domain.lower()}"
        if key in self._open.seen:
            return make(250, "2.1.5", f"<{address}> duplicate recipient, delivered once")
        if len(self._open.recipients) >= self.limits.recipients:
            return make(452, "4.5.3", f"too many recipients (limit {self.limits.recipients})")
        self._recipients += 1
        if self._recipients > self.limits.recipients_per_file:
            self._over(line, self.limits.recipients_per_file, "recipients", "recipients_per_file")
        self._open.recipients.append(Recipient(address, notify, orcpt, line))
        self._open.seen.add(key)
        return make(250, "2.1.5", f"<{address}> recipient ok")

    def _data(self, arg: str, line: int, next_offset: int) -> Reply:
        if arg:
            return make(501, "5.5.4", "DATA takes no argument")
        self._scan = Scan(line=line, start=next_offset)
        if self._open is None:
            self._state = _SKIP
            return make(503, "5.5.1", "need MAIL and RCPT before DATA; message skipped")
        if not self._open.recipients:
            self._state = _SKIP
            self._open = None
            return make(554, "5.5.1", "no valid recipients; message skipped")
        self._state = _DATA
        return batchreply.SEND_DATA

    def _quit(self, arg: str, line: int) -> Reply:
        if arg:
            return make(501, "5.5.4", "QUIT takes no argument")
        self._state = _CLOSED
        self._quit_line = line
        if self._open is not None:
            begun, self._open = self._open.line, None
            return batchreply.abandoned(begun)
        return batchreply.closing(self.hostname)

    def _verb(self, arg: str) -> Reply:
        mode = arg.upper() or "ON"
        if mode not in ("ON", "OFF"):
            return make(501, "5.5.4", "Syntax: VERB [ON|OFF]")
        self._verbose = self._verbose or mode == "ON"
        return make(250, "2.0.0", f"verbose mode {mode.lower()}")

    def _answer(self, line: int, echo: str, reply: Reply) -> None:
        # equal replies share one object: a file of 100,000 refused RCPTs keeps one 452
        reply = self._replies.setdefault(reply, reply)
        if reply.ok:
            self._entries.append(Entry(line, echo, reply))
        else:
            # a refusal belongs to the transaction it stood in: the last valid MAIL FROM before
            # it ("" for <>); refusals before any are settled in ``finish``
            self._entries.append(Entry(line, echo, reply, self._last_sender))

    def _over(self, line: int, limit: int, what: str, key: str) -> None:
        """A per-file limit is passed: the whole file is refused and reading stops here."""
        raise EnvelopeFault(
            self.source,
            line,
            f"more than {limit} {what} in one file (limits.{key}); the whole file is refused",
        )

    # -- message text ----------------------------------------------------------------------

    def _scan_data(self, buf: bytes, pos: int, *, final: bool) -> int:
        """Consume whole message lines from ``pos``; return where the next unread byte is."""
        scan = self._scan
        assert scan is not None
        pos, self._line, stop = scan_data(
            scan,
            buf,
            pos,
            final=final,
            crlf=self._crlf is not False,
            line=self._line,
            skip=self._state is _SKIP,
            limits=self.limits,
        )
        if stop is not None:
            self._end_of_data(scan, self._offset + stop)
        return pos

    def _end_of_data(self, scan: Scan, end: int) -> None:
        if self._state is _SKIP:
            self._state = _READY if self._helo else _NO_HELO
            self._scan = None
            return
        tx = self._open
        assert tx is not None
        self._open = None
        self._scan = None
        self._state = _READY
        if scan.fault is not None:
            self._answer(self._line, ".", scan.fault)
            return
        number = len(self._transactions) + 1
        message = scan.message(end, self._crlf is not False)
        self._transactions.append(
            Transaction(
                number=number,
                line=tx.line,
                helo=self._helo,
                mail_from=tx.mail_from,
                params=tx.params,
                recipients=tuple(tx.recipients),
                message=message,
            )
        )
        self._answer(
            self._line,
            ".",
            make(250, "2.0.0", f"message {number} accepted for delivery ({scan.size} octets)"),
        )
