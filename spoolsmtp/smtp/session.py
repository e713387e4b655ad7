"""One SMTP connection to one remote address: the asyncio driver of ``ClientProtocol`` (the
protocol) and ``MailTransaction`` (the rules of a transaction).

The session owns the socket, the timeouts, TLS and the writes (a pipelined flight or one
command at a time); it decides nothing about a recipient. Every wait has the RFC 5321 section
4.5.3.2 timeout of the command it waits for. A failure to open (refused, greeting or EHLO
refused, TLS refused under a policy that needs it) is returned as a reply so the caller can try
the next host; anything that breaks an open session (421, a lost connection, a timeout,
garbage) is handed to the transaction, which defers every recipient not yet final.
"""

from __future__ import annotations

import _ssl
import asyncio
import contextlib
import os
import select
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from spoolsmtp.model.config import DeliveryConfig, Timeouts, TlsPolicy
from spoolsmtp.model.envelope import Recipient, Transaction
from spoolsmtp.model.hop import Hop, always
from spoolsmtp.model.login import Login
from spoolsmtp.model.outcome import RecipientResult, connection_lost, timed_out
from spoolsmtp.model.reply import Reply, make
from spoolsmtp.model.tlsdemand import TlsDemand
from spoolsmtp.smtp import auth, dane, outgoing
from spoolsmtp.smtp.protocol import (
    NEED_DATA,
    ClientProtocol,
    Command,
    Event,
    Extensions,
    RemoteProtocolError,
    Verb,
)
from spoolsmtp.smtp.transaction import DATA, MailTransaction, Stage
from spoolsmtp.smtp.transport import Wire, tls_context

Trace = Callable[[str], None]
DotHook = Callable[[list[Recipient]], Awaitable[None]]
CrashPoint = Callable[[str], None]
MessageText = outgoing.MessageText
BODY_WRITE = 64 * 1024


@dataclass(frozen=True)
class Verbatim:
    """The message text exactly as DATA sends it: bytes ``start``-``end`` of the envelope file,
    whose lines all end in CRLF and none begins with a dot (nothing to stuff). ``source`` is
    the file's bytes when they are in memory, else the open file (sent with sendfile(2))."""

    source: bytes | BinaryIO
    start: int
    end: int


class SessionBroken(Exception):
    """The session cannot go on; ``reply`` says why (a 421, a synthetic 451 for loss/timeout)."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        super().__init__(str(reply))


class StaleSession(Exception):
    """A reused connection was found closed before it answered anything: open a new one."""


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


def _timeout_for(verb: Verb, t: Timeouts) -> float:
    value: float = getattr(t, _TIMEOUT_FIELD[verb])
    return value


def _nowhere(phase: str) -> None:
    """The default crash point: none (the deliverer passes ``crashpoint.reach``)."""


@dataclass
class SessionStats:
    """Counters a session adds to; shared by all sessions of a deliverer."""

    connections: int = 0
    reused: int = 0
    tls: int = 0
    bytes_sent: int = 0
    verbatim: int = 0  # messages sent as the file holds them (no per-line work)


@dataclass
class Session:
    """An open (or opening) SMTP connection to one hop."""

    hop: Hop
    config: DeliveryConfig
    helo_name: str
    tls: TlsPolicy
    trace: Trace | None = None
    tracing: Callable[[], bool] = always
    stats: SessionStats = field(default_factory=SessionStats)
    ca_file: str | None = None
    reach: CrashPoint = _nowhere
    demand: TlsDemand | None = None
    login: Login | None = None  # SMTP AUTH after EHLO (and STARTTLS)
    auth_plaintext: bool = False  # the login may go out without TLS
    signer: outgoing.Signer | None = None  # DKIM, just before sending
    proto: ClientProtocol = field(default_factory=ClientProtocol)
    encrypted: bool = False
    last_used: float = field(default_factory=time.monotonic)
    transactions: int = 0
    _wire: Wire | None = None
    _transport: asyncio.Transport | None = None
    dirty: bool = False

    @property
    def alive(self) -> bool:
        return (
            self._wire is not None
            and not self._wire.closed
            and not self.proto.closed
            and self._transport is not None
            and not self._transport.is_closing()
        )

    @property
    def extensions(self) -> Extensions:
        return self.proto.extensions

    # -- opening ---------------------------------------------------------------------------

    async def open(self) -> Reply | None:
        """Connect, read the greeting, EHLO (HELO fallback), STARTTLS by policy.

        Returns None when the session is ready for MAIL, else the reply that says why not.
        Under ``opportunistic`` a failed TLS handshake is retried once in plain text.
        """
        failure = await self._open_once(self.tls)
        if (
            failure is not None
            and failure.enhanced == "4.7.5"
            and self.tls is TlsPolicy.OPPORTUNISTIC
        ):
            self._trace("TLS handshake failed; trying again without TLS (opportunistic)")
            self.proto = ClientProtocol()
            failure = await self._open_once(TlsPolicy.OFF)
        return failure

    async def _open_once(self, tls: TlsPolicy) -> Reply | None:
        t = self.config.timeouts
        loop = asyncio.get_running_loop()
        self._trace(f"connecting to {self.hop.host}[{self.hop.address}]:{self.hop.port}")
        try:
            async with asyncio.timeout(t.connect):
                transport, wire = await loop.create_connection(
                    Wire, self.hop.address, self.hop.port
                )
        except TimeoutError:
            return make(451, "4.4.1", f"connect to {self._where()} timed out")
        except OSError as exc:
            return make(451, "4.4.1", f"connect to {self._where()}: {exc.strerror or exc}")
        self._transport = transport
        self._wire = wire
        self.stats.connections += 1
        try:
            greeting = await self._next()
            if greeting.reply.code != 220:
                await self.close()
                return _prefixed(greeting.reply, f"{self._where()} greeting")
            failure = await self._hello()
            if failure is not None:
                await self.close()
                return failure
            if tls is not TlsPolicy.OFF:
                failure = await self._starttls(tls)
                if failure is not None:
                    await self.close()
                    return failure
            if self.login is not None and (failure := await self._log_in(self.login)):
                await self.close()
                return failure
        except SessionBroken as exc:
            self.abort()
            return exc.reply
        self.proto.pipelining = self.config.pipelining and "PIPELINING" in self.extensions
        return None

    async def _hello(self) -> Reply | None:
        event = await self._command(Command(Verb.EHLO, f"EHLO {self.helo_name}"))
        if event.reply.code == 250:
            return None
        if event.reply.code >= 500:
            event = await self._command(Command(Verb.HELO, f"HELO {self.helo_name}"))
            if event.reply.code == 250:
                return None
        return _prefixed(event.reply, f"{self._where()} refused our greeting")

    async def _starttls(self, tls: TlsPolicy) -> Reply | None:
        if "STARTTLS" not in self.extensions:
            if tls is TlsPolicy.OPPORTUNISTIC:
                return None
            return make(451, "4.7.4", f"TLS is required but {self._where()} does not offer it")
        event = await self._command(Command(Verb.STARTTLS, "STARTTLS"))
        if event.reply.code != 220:
            if tls is TlsPolicy.OPPORTUNISTIC:
                return None
            return _prefixed(event.reply, f"TLS required but {self._where()} refused STARTTLS")
        assert self._wire is not None and self._transport is not None
        injected = self.proto.tls_started() + self._wire.take()
        if injected:
            self._trace(f"discarded {len(injected)} bytes sent before the TLS handshake")
        context = tls_context(tls, self.config.tls_min_version, self.ca_file)
        try:
            async with asyncio.timeout(self.config.timeouts.starttls):
                transport = await asyncio.get_running_loop().start_tls(
                    self._transport, self._wire, context, server_hostname=self.hop.host
                )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            self.abort()
            reason = getattr(exc, "reason", None) or type(exc).__name__
            return make(451, "4.7.5", f"TLS handshake with {self._where()} failed: {reason}")
        if transport is None:
            return make(451, "4.7.5", f"TLS handshake with {self._where()} failed")
        self._transport = transport
        if self.demand is not None and self.demand.tlsa:
            why = dane.check(peer_chain(transport), self.demand.tlsa, self.demand.names)
            if why is not None:
                self.abort()
                return make(451, "4.7.5", f"DANE: certificate of {self._where()}: {why}")
            self._trace("TLS established; certificate matches the TLSA records (DANE)")
        self.encrypted = True
        self.stats.tls += 1
        self._trace("TLS established")
        return await self._hello()

    async def _log_in(self, login: Login) -> Reply | None:
        def send(line: str, shown: str) -> Awaitable[Event]:
            return self._command(Command(Verb.AUTH, line), shown)

        where = self._where()
        return await auth.authenticate(
            login, self.extensions, self.encrypted, self.auth_plaintext, where, send
        )

    # -- transactions ----------------------------------------------------------------------

    async def reset(self) -> bool:
        """RSET before reusing the connection; False when it is no longer usable."""
        try:
            event = await self._command(Command(Verb.RSET, "RSET"))
        except SessionBroken:
            self.abort()
            return False
        self.dirty = False
        return event.reply.code == 250

    async def send(
        self,
        tx: Transaction,
        recipients: list[Recipient],
        message: MessageText,
        received: bytes,
        before_dot: DotHook | None = None,
        verbatim: Verbatim | None = None,
    ) -> tuple[list[RecipientResult], list[Recipient]]:
        """One transaction for ``recipients``: a result for each, and the recipients that got
        452 while others were accepted, to be sent again in a new transaction. The rules are
        ``MailTransaction``'s; this drives it over the connection.

        ``message`` gives the text as DATA sends it (CRLF, dot-stuffed), afresh at each call.
        ``before_dot`` is awaited with the accepted recipients just before the final dot, so the
        caller can journal that a duplicate is possible from here on. ``verbatim``, when given,
        is the same text as it lies in the file: sent as it is where the wire carries the
        file's bytes unchanged (not under TLS).
        """
        self.last_used = time.monotonic()
        self.transactions += 1
        hop = self.hop
        # THE BYTES TO SEND are decided here and only here: ``out.as_stored`` when the stored
        # text goes out unchanged, else converted to 7 bit and/or DKIM-signed (outgoing.py)
        where, ext, convert = self._where(), self.extensions, self.config.mime_conversion
        out = outgoing.decide(tx, ext, received, message, convert, self.signer, where)
        size = len(out.head)
        mt = MailTransaction(
            out.tx, recipients, ext, size, hop.host, hop.address, where, out.refusal
        )
        if mt.stage is Stage.DONE:
            return mt.results(), []
        self.dirty = True
        try:
            if self.proto.pipelining:
                await self._flight([*mt.commands(), DATA], mt.receive)
            else:
                for command in mt.commands():
                    mt.receive(await self._command(command))
                    if mt.mail_refused:
                        break
            self.reach("after_rcpt")
            if mt.envelope_answered() is Stage.AFTER_RCPT:
                mt.receive(await self._command(DATA))
            if mt.stage is Stage.DURING_DATA:
                # the file's bytes go out as they lie only when nothing transforms them
                raw = verbatim if out.as_stored and not self.encrypted else None
                await self._message(mt, out.message(), out.head, before_dot, raw)
            elif mt.drop_connection:
                self.abort()
        except SessionBroken as exc:
            self.abort()
            if mt.stale(reused=self.transactions > 1):
                raise StaleSession(str(exc.reply)) from exc
            mt.broken(exc.reply)
        return mt.results(), mt.again

    async def _message(
        self,
        mt: MailTransaction,
        chunks: Iterable[bytes],
        received: bytes,
        before_dot: DotHook | None,
        verbatim: Verbatim | None = None,
    ) -> None:
        """After the 354: the message text, the final dot, and the reply to it."""
        if verbatim is not None:
            tail = await self._verbatim(received, verbatim)
        else:
            tail = await self._body(received, chunks)
        if before_dot is not None:
            try:
                await before_dot(mt.accepted)
            except BaseException:
                # the dot record could not be written (a full disk): the server waits
                # for a dot that must not come, so the connection cannot be used again
                self.abort()
                raise
        self._check_open()
        mt.dot_sent()
        await self._write(tail + self.proto.send_end_of_data())
        self._trace("> .")
        self.reach("after_dot")
        end = await self._next()
        if end.reply.code < 300:
            self.reach("after_250")
        self.dirty = False
        mt.receive(end)

    async def _flight(self, commands: list[Command], receive: Callable[[Event], None]) -> None:
        """Send commands in one write (PIPELINING) and hand over their replies in order."""
        data = b"".join(self.proto.send(c) for c in commands)
        if self._traced():
            for c in commands:
                self._trace(f"> {c.text}")
        await self._write(data)
        for _ in commands:
            event = await self._next()
            if self.proto.closed:
                raise SessionBroken(event.reply)
            receive(event)

    async def _body(self, received: bytes, chunks: Iterable[bytes]) -> bytes:
        """Send our Received header and the message text in writes of ``BODY_WRITE`` bytes or
        more, and return the rest, unsent: it goes out with the final dot. A small message is
        then one system call, header, text and dot, instead of three."""
        if self._traced():
            self._trace(f"> (message: {received.decode('utf-8', 'replace').splitlines()[0]} ...)")
        pending = [self.proto.send_body(received)]
        size = len(pending[0])
        for chunk in chunks:
            data = self.proto.send_body(chunk)
            pending.append(data)
            size += len(data)
            if size >= BODY_WRITE:
                await self._write(b"".join(pending))
                pending, size = [], 0
        self.reach("mid_data")
        return b"".join(pending)

    async def _verbatim(self, received: bytes, body: Verbatim) -> bytes:
        """Our Received header, then the message as the file holds it: from memory in one
        write, or from the file by sendfile(2); no Python per line or per block. Returns the
        rest, unsent (a small message goes out with the final dot)."""
        if self._traced():
            self._trace(f"> (message: {received.decode('utf-8', 'replace').splitlines()[0]} ...)")
        size = body.end - body.start
        self.stats.verbatim += 1
        if isinstance(body.source, bytes):
            view = memoryview(body.source)[body.start : body.end]
            if len(received) + size < BODY_WRITE:
                self.reach("mid_data")
                return received + view
            await self._write(received)
            await self._write(view)
        else:
            await self._write(received)
            await self._sendfile(body.source, body.start, size)
        self.reach("mid_data")
        return b""

    async def _sendfile(self, fh: BinaryIO, offset: int, count: int) -> None:
        """``count`` bytes of ``fh`` from ``offset`` straight to the socket. Only once the
        transport has nothing buffered (else the bytes are read and written in blocks); on a
        duplicate of the socket's descriptor, so a connection closed meanwhile cannot hand its
        number to another file; a full socket buffer is waited for in a thread."""
        transport = self._check_open()
        sock = transport.get_extra_info("socket")
        if sock is None or transport.get_write_buffer_size():
            fh.seek(offset)
            while count > 0:
                data = fh.read(min(count, BODY_WRITE * 16))
                if not data:
                    raise OSError(f"envelope file shorter than recorded (offset {offset + count})")
                await self._write(data)
                count -= len(data)
            return
        fd = os.dup(sock.fileno())
        try:
            while count > 0:
                try:
                    sent = os.sendfile(fd, fh.fileno(), offset, count)
                except BlockingIOError:
                    timeout = self.config.timeouts.data_block
                    if not await asyncio.to_thread(_writable, fd, timeout):
                        raise SessionBroken(timed_out("")) from None
                    continue
                except OSError as exc:
                    raise SessionBroken(connection_lost(f"({exc.strerror})")) from exc
                if sent == 0:
                    raise OSError(f"envelope file shorter than recorded (offset {offset + count})")
                offset += sent
                count -= sent
                self.stats.bytes_sent += sent
        finally:
            os.close(fd)

    async def close(self) -> None:
        """QUIT politely, close, and wait until the connection is gone; all of it bounded by
        the QUIT timeout, after which the connection is aborted."""
        if self.alive and not self.proto.outstanding:
            with contextlib.suppress(SessionBroken):
                await self._command(Command(Verb.QUIT, "QUIT"))
        self.proto.closed = True
        transport, wire = self._transport, self._wire
        if transport is None or wire is None:
            return
        if not transport.is_closing():
            transport.close()
        try:
            async with asyncio.timeout(self.config.timeouts.quit):
                await wire.lost()
        except TimeoutError:
            transport.abort()

    def abort(self) -> None:
        """Drop the connection at once: no QUIT, no TLS shutdown (the session is broken)."""
        if self._transport is not None:
            self._transport.abort()
        self.proto.closed = True

    # -- plumbing --------------------------------------------------------------------------

    async def _command(self, command: Command, shown: str | None = None) -> Event:
        """Send one command and wait for its reply; the trace shows ``shown`` if given."""
        data = self.proto.send(command)
        if self._traced():
            self._trace(f"> {command.text if shown is None else shown}")
        await self._write(data)
        event = await self._next()
        if self.proto.closed and command.verb is not Verb.QUIT:
            raise SessionBroken(event.reply)
        return event

    def _check_open(self) -> asyncio.Transport:
        wire, transport = self._wire, self._transport
        if wire is None or transport is None or wire.closed or transport.is_closing():
            raise SessionBroken(connection_lost(""))
        return transport

    async def _write(self, data: bytes | memoryview) -> None:
        transport = self._check_open()
        wire = self._wire
        assert wire is not None
        transport.write(data)
        self.stats.bytes_sent += len(data)
        if not wire.writable:
            try:
                async with asyncio.timeout(self.config.timeouts.data_block):
                    await wire.drained()
            except TimeoutError:
                raise SessionBroken(timed_out("")) from None
        if wire.closed:
            raise SessionBroken(connection_lost(""))

    async def _next(self) -> Event:
        """The next reply, waiting at most the timeout of the command it answers in all.

        The deadline covers the whole reply, so a server that drips a byte at a time cannot
        hold the connection beyond it.
        """
        wire = self._wire
        assert wire is not None
        verb = self.proto.awaiting or Verb.NOOP
        deadline_loop = asyncio.get_running_loop().time() + _timeout_for(verb, self.config.timeouts)
        while True:
            try:
                event = self.proto.next_event()
            except RemoteProtocolError as exc:
                self._trace(f"protocol error: {exc}")
                raise SessionBroken(make(451, "4.5.0", f"bad reply from server: {exc}")) from exc
            if event is not NEED_DATA:
                if self._traced():
                    for line in event.reply.render():
                        self._trace(f"< {line}")
                return event
            if wire.closed and not wire.buffer:
                raise SessionBroken(connection_lost(""))
            try:
                async with asyncio.timeout_at(deadline_loop):
                    await wire.wait_data()
            except TimeoutError:
                raise SessionBroken(timed_out(f"waiting for the reply to {verb.name}")) from None
            self.proto.receive_data(wire.take())

    def _where(self) -> str:
        return f"{self.hop.host}[{self.hop.address}]:{self.hop.port}"

    def _traced(self) -> bool:
        return self.trace is not None and self.tracing()

    def _trace(self, text: str) -> None:
        if self.trace is not None and self.tracing():
            self.trace(f"session {self.hop.host}[{self.hop.address}]: {text}")


def _writable(fd: int, timeout: float) -> bool:
    """Until the socket can take more (in an I/O thread); False when ``timeout`` passed."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(timeout * 1000))


def _prefixed(reply: Reply, context: str) -> Reply:
    return Reply(reply.code, reply.enhanced, (f"{context}: {reply.lines[0]}", *reply.lines[1:]))


def peer_chain(transport: asyncio.BaseTransport) -> list[bytes]:
    """The certificates the server sent, leaf first, as DER (for DANE, which checks them
    itself). Python 3.13 has ``get_unverified_chain``; before it, the same method exists on the
    ``_ssl`` object underneath; without either, the leaf alone (DANE-EE still works)."""
    obj = transport.get_extra_info("ssl_object")
    if obj is None:
        return []
    for owner in (obj, getattr(obj, "_sslobj", None)):
        method = getattr(owner, "get_unverified_chain", None)
        if method is not None:
            der = _ssl.ENCODING_DER
            return [c if isinstance(c, bytes) else c.public_bytes(der) for c in method() or []]
    leaf = obj.getpeercert(binary_form=True)
    return [leaf] if leaf else []
