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
offsets, not message text, so memory does not grow with message size. A message is scanned a
block of whole lines at a time with bytes methods (count, find, split), which keeps a 200 MB
message well above 100 MB/s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum, auto

from spoolsmtp.address import check_domain, parse_path
from spoolsmtp.config import Limits
from spoolsmtp.envelope import (
    Entry,
    Envelope,
    MailParams,
    Message,
    Recipient,
    Transaction,
)
from spoolsmtp.errors import EnvelopeFault
from spoolsmtp.params import mail_params, rcpt_params, split_path
from spoolsmtp.reply import Reply, make

# A line longer than this without any LF is taken as proof that the file is not line text.
_MAX_PARTIAL = 64 * 1024
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_RECEIVED = re.compile(rb"^received[ \t]*:", re.I | re.M)
_TICK = re.compile(r"^[\x21-\x7e]{1,64}$")
_POSTMASTER = "<postmaster>"
_NOT_IN_BATCH = {"STARTTLS", "AUTH", "VRFY", "EXPN", "ETRN", "TURN", "ATRN", "BDAT"}


class State(Enum):
    """Where the reader is in the SMTP dialogue."""

    NO_HELO = auto()
    READY = auto()
    MAIL = auto()
    DATA = auto()
    SKIP = auto()
    CLOSED = auto()


@dataclass
class _Open:
    """A transaction between MAIL and the end of its DATA."""

    line: int
    mail_from: str
    params: MailParams
    recipients: list[Recipient] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)


@dataclass
class _Scan:
    """What is known of a message while its lines are being read."""

    line: int
    start: int
    lines: int = 0
    size: int = 0
    eight_bit: bool = False
    received: int = 0
    in_headers: bool = True
    line_start: bool = True
    can_end: bool = True
    fault: Reply | None = None


class Reader:
    """Reads one envelope file's bytes and answers each command; see the module docstring."""

    def __init__(
        self, source: str, limits: Limits, hostname: str, max_file_bytes: int | None = None
    ) -> None:
        self.source = source
        self.limits = limits
        self.hostname = hostname
        self.max_file_bytes = max_file_bytes
        self._buf = b""
        self._offset = 0
        self._line = 0
        self._crlf: bool | None = None
        self._state = State.NO_HELO
        self._helo = ""
        self._helo_line = 0
        self._quit_line = 0
        self._verbose = False
        self._open: _Open | None = None
        self._scan: _Scan | None = None
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
        if self._state in (State.DATA, State.SKIP):
            assert self._scan is not None
            raise EnvelopeFault(
                self.source,
                self._scan.line,
                "DATA begun here is never terminated by a line holding only '.'",
            )
        if not self._seen_content:
            raise EnvelopeFault(self.source, 1, "empty file: no commands")
        if self._open is not None:
            self._answer(
                self._line + 1,
                "(end of file)",
                make(
                    503,
                    "5.5.1",
                    f"transaction begun at line {self._open.line} abandoned without DATA",
                ),
            )
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
            if self._state in (State.DATA, State.SKIP):
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
                elif end - pos > _MAX_PARTIAL:
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
        if raw.endswith(b"\r\n"):
            content, crlf = raw[:-2], True
        elif raw.endswith(b"\n"):
            content, crlf = raw[:-1], False
        else:
            content, crlf = raw, self._crlf is not False
        if self._long_line:
            start, self._long_line = self._long_line, 0
            self._line = line = start
            self._answer(line, _echo(content, 40) + "...", _too_long(self.limits.command_line))
            return
        if b"\x00" in content or (not self._seen_content and _CONTROL.search(content)):
            raise EnvelopeFault(self.source, line, "binary content: NUL or control bytes")
        if not content.strip():
            return
        if self._crlf is None and raw.endswith(b"\n"):
            self._crlf = crlf
        self._seen_content = True
        self._commands += 1
        if self._commands > self.limits.commands_per_file:
            self._over(line, self.limits.commands_per_file, "commands", "commands_per_file")
        echo = _echo(content, self.limits.command_line)
        if len(content) + 2 > self.limits.command_line:
            self._answer(line, echo, _too_long(self.limits.command_line))
            return
        if b"\r" in content:
            self._answer(line, echo, make(500, "5.5.2", "bare CR in command line"))
            return
        if raw.endswith(b"\n") and crlf != self._crlf:
            self._answer(line, echo, _mixed(self._crlf))
            return
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError:
            if len(self._entries) == 0:
                raise EnvelopeFault(
                    self.source, line, "binary content: first line is not UTF-8 text"
                ) from None
            self._answer(line, echo, make(500, "5.5.2", "command line is not valid UTF-8"))
            return
        verb, _, arg = text.strip().partition(" ")
        verb = verb.upper()
        arg = arg.strip()
        self._answer(line, echo, self._dispatch(verb, arg, line, offset + len(raw)))

    def _dispatch(self, verb: str, arg: str, line: int, next_offset: int) -> Reply:
        if self._state is State.CLOSED and verb not in ("HELO", "EHLO"):
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
            if self._state is State.MAIL:
                self._state = State.READY
            return make(250, "2.0.0", "reset")
        if verb == "NOOP":
            return make(250, "2.0.0", "OK")
        if verb == "QUIT":
            return self._quit(arg, line)
        if verb == "VERB":
            return self._verb(arg)
        if verb == "TICK":
            if not _TICK.match(arg):
                return make(501, "5.5.4", "TICK needs an id of 1 to 64 printable characters")
            return make(250, "2.0.0", f"TICK {arg}")
        if verb == "HELP":
            return make(
                214,
                "2.0.0",
                "commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VERB TICK HELP",
            )
        if verb in _NOT_IN_BATCH:
            return make(502, "5.5.1", f"{verb} is not available in a batch envelope")
        return make(500, "5.5.2", f"command unrecognized: {_echo(verb.encode(), 40)}")

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
        self._state = State.READY
        if self._open is not None:
            # RFC 5321 4.1.4: HELO/EHLO in a transaction resets it, as RSET would (and as Exim
            # does); unlike RSET it is answered as an error, so the job learns of the loss
            begun, self._open = self._open.line, None
            return make(
                503,
                "5.5.1",
                f"transaction begun at line {begun} abandoned without DATA: {verb} resets it",
            )
        if verb == "HELO":
            return Reply(250, None, (f"{self.hostname} hello {arg}",))
        return Reply(
            250,
            None,
            (
                f"{self.hostname} hello {arg}",
                f"SIZE {self.limits.max_message_bytes}",
                "8BITMIME",
                "SMTPUTF8",
                "DSN",
                "ENHANCEDSTATUSCODES",
            ),
        )

    def _mail(self, arg: str, line: int) -> Reply:
        if self._state is State.NO_HELO:
            return make(503, "5.5.1", "send HELO or EHLO first")
        if self._open is not None:
            return make(503, "5.5.1", f"nested MAIL command (MAIL at line {self._open.line})")
        if not arg.upper().startswith("FROM:"):
            return make(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
        path, rest = split_path(arg[5:].lstrip())
        params, fault = mail_params(rest, self.limits)
        if fault is not None:
            return fault
        mailbox, fault = parse_path(path, self.limits, sender=True, utf8=params.smtputf8)
        if fault is not None:
            return fault
        sender = str(mailbox) if mailbox else ""
        self._mails += 1
        if self._mails > self.limits.transactions_per_file:
            self._over(
                line, self.limits.transactions_per_file, "transactions", "transactions_per_file"
            )
        self._open = _Open(line, sender, params)
        self._state = State.MAIL
        self._last_sender = sender
        if self._first_sender is None:
            self._first_sender = sender
        return make(250, "2.1.0", f"<{sender}> sender ok")

    def _rcpt(self, arg: str, line: int) -> Reply:
        if self._open is None:
            return make(503, "5.5.1", "need MAIL before RCPT")
        if not arg.upper().startswith("TO:"):
            return make(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
        path, rest = split_path(arg[3:].lstrip())
        notify, orcpt, fault = rcpt_params(rest)
        if fault is not None:
            return fault
        if path.lower() == _POSTMASTER:
            # RFC 5321 4.5.1: <Postmaster> without a domain must be accepted; it is ours
            path = f"<{path[1:-1]}@{self.hostname}>"
        mailbox, fault = parse_path(
            path, self.limits, sender=False, utf8=self._open.params.smtputf8
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
        self._scan = _Scan(line=line, start=next_offset)
        if self._open is None:
            self._state = State.SKIP
            return make(503, "5.5.1", "need MAIL and RCPT before DATA; message skipped")
        if not self._open.recipients:
            self._state = State.SKIP
            self._open = None
            return make(554, "5.5.1", "no valid recipients; message skipped")
        self._state = State.DATA
        return make(354, None, "end data with <CR><LF>.<CR><LF>")

    def _quit(self, arg: str, line: int) -> Reply:
        if arg:
            return make(501, "5.5.4", "QUIT takes no argument")
        self._state = State.CLOSED
        self._quit_line = line
        if self._open is not None:
            begun, self._open = self._open.line, None
            return make(503, "5.5.1", f"transaction begun at line {begun} abandoned without DATA")
        return make(221, "2.0.0", f"{self.hostname} closing")

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
        crlf = self._crlf is not False
        last_nl = buf.rfind(b"\n", pos)
        if last_nl < 0:
            if len(buf) - pos > _MAX_PARTIAL and not final:
                self._data_block(scan, buf[pos:], complete=False)
                return len(buf)
            return pos
        region_end = last_nl + 1
        term = b".\r\n" if crlf else b".\n"
        if scan.can_end and buf.startswith(term, pos):
            stop = pos
        else:
            sep = b"\r\n.\r\n" if crlf else b"\n.\n"
            found = buf.find(sep, pos, region_end)
            stop = found + len(sep) - len(term) if found >= 0 else -1
        block_end = stop if stop >= 0 else region_end
        if block_end > pos:
            self._data_block(scan, buf[pos:block_end], complete=True)
        if stop < 0:
            return region_end
        self._line += 1
        self._end_of_data(scan, self._offset + stop)
        return stop + len(term)

    def _data_block(self, scan: _Scan, block: bytes, *, complete: bool) -> None:
        """Account for a run of message text: lines, size, and the first fault in it."""
        crlf = self._crlf is not False
        first_line = self._line + 1
        newlines = block.count(b"\n")
        dots = block.count(b"\n.") + (1 if scan.line_start and block.startswith(b".") else 0)
        scan.size += len(block) - dots + (0 if crlf else newlines)
        scan.lines += newlines
        self._line += newlines
        scan.can_end = complete and (not crlf or block.endswith(b"\r\n"))
        if self._state is State.SKIP:
            scan.line_start = complete
            return
        if not scan.eight_bit and not block.isascii():
            scan.eight_bit = True
        if scan.in_headers:
            self._scan_headers(scan, block)
        if scan.fault is None:
            scan.fault = self._block_fault(block, first_line, crlf, scan.line_start)
        if scan.fault is None and scan.size > self.limits.max_message_bytes:
            scan.fault = make(
                552,
                "5.3.4",
                f"message exceeds fixed maximum message size ({self.limits.max_message_bytes})",
            )
        scan.line_start = complete

    def _scan_headers(self, scan: _Scan, block: bytes) -> None:
        blank = b"\r\n" if self._crlf is not False else b"\n"
        if scan.line_start and block.startswith(blank):
            scan.in_headers = False
            return
        end = block.find(b"\n" + blank)
        head = block if end < 0 else block[: end + 1]
        scan.received += len(_RECEIVED.findall(head))
        if end >= 0:
            scan.in_headers = False

    def _block_fault(
        self, block: bytes, first_line: int, crlf: bool, line_start: bool
    ) -> Reply | None:
        def at(index: int) -> int:
            return first_line + block.count(b"\n", 0, index)

        # every kind of fault, by line; the first line's is reported (ties in this order), so
        # that the verdict does not depend on how the file was cut into blocks
        found: list[tuple[int, int, str]] = []
        nul = block.find(b"\x00")
        if nul >= 0:
            found.append((at(nul), 0, "NUL in message text at line {}"))
        if crlf:
            pairs = block.count(b"\r\n")
            if pairs != block.count(b"\n"):
                lone = re.search(rb"(?<!\r)\n", block)
                found.append(
                    (at(lone.start() if lone else 0), 1, "bare LF in message text at line {}")
                )
            if pairs != block.count(b"\r"):
                bare = re.search(rb"\r(?!\n)", block)
                found.append(
                    (at(bare.start() if bare else 0), 2, "bare CR in message text at line {}")
                )
        elif b"\r" in block:
            found.append((at(block.find(b"\r")), 2, "bare CR in message text at line {}"))
        longest = self.limits.text_line - (1 if crlf else 2)
        if len(block) > longest and (not found or min(found)[0] > first_line):
            # RFC 5321 4.5.3.1.6: the dot added by dot-stuffing does not count toward the limit
            lines = block.split(b"\n")
            lengths = [len(x) - x.startswith(b".") for x in lines]
            if not line_start and lines[0].startswith(b"."):
                lengths[0] += 1
            over = next((i for i, n in enumerate(lengths) if n > longest), None)
            if over is not None:
                why = f"message line {{}} longer than {self.limits.text_line} octets"
                found.append((first_line + over, 3, why))
        if found:
            line, _, what = min(found)
            return make(554, "5.6.0", what.format(line) + "; refused")
        return None

    def _end_of_data(self, scan: _Scan, end: int) -> None:
        if self._state is State.SKIP:
            self._state = State.READY if self._helo else State.NO_HELO
            self._scan = None
            return
        tx = self._open
        assert tx is not None
        self._open = None
        self._scan = None
        self._state = State.READY
        if scan.fault is not None:
            self._answer(self._line, ".", scan.fault)
            return
        number = len(self._transactions) + 1
        message = Message(
            start=scan.start,
            end=end,
            crlf=self._crlf is not False,
            lines=scan.lines,
            size=scan.size,
            eight_bit=scan.eight_bit,
            received=scan.received,
        )
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


def _too_long(limit: int) -> Reply:
    return make(500, "5.5.2", f"command line longer than {limit} octets")


def _mixed(crlf: bool | None) -> Reply:
    expected = "CRLF" if crlf else "LF"
    return make(500, "5.5.2", f"line ending differs from the file's ({expected}): bare LF or CR")


_ESCAPED = re.compile("[\x00-\x08\x0a-\x1f]")


def _echo(content: bytes, limit: int) -> str:
    """A command as the batch response echoes it: control characters but tab as ``\\xNN``."""
    text = content[:limit].decode("utf-8", "backslashreplace")
    return _ESCAPED.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
