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

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from spoolsmtp.model.config import DeliveryConfig, TlsPolicy
from spoolsmtp.model.envelope import Recipient
from spoolsmtp.model.hop import Hop, always
from spoolsmtp.model.login import Login
from spoolsmtp.model.outcome import RecipientResult, connection_lost, timed_out
from spoolsmtp.model.reply import Reply, make
from spoolsmtp.model.stats import SessionStats
from spoolsmtp.model.tlsdemand import TlsDemand
from spoolsmtp.smtp import auth, bodysend, outgoing, starttls
from spoolsmtp.smtp.bodysend import Verbatim
from spoolsmtp.smtp.broken import SessionBroken, StaleSession
from spoolsmtp.smtp.dotmark import DotHook, DotMark
from spoolsmtp.smtp.protocol import (
    NEED_DATA,
    ClientProtocol,
    Command,
    Event,
    Extensions,
    NeedData,
    RemoteProtocolError,
    Verb,
    timeout_for,
)
from spoolsmtp.smtp.transaction import DATA, MailTransaction, Stage
from spoolsmtp.smtp.transport import Wire

Trace = Callable[[str], None]


CrashPoint = Callable[[str], None]


def _nowhere(phase: str) -> None:
    """The default crash point: none (the deliverer passes ``crashpoint.reach``)."""


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
            return make(451, "4.4.1", f"connect to {self.where} timed out")
        except OSError as exc:
            return make(451, "4.4.1", f"connect to {self.where}: {exc.strerror or exc}")
        self._transport = transport
        self._wire = wire
        self.stats.connections += 1
        try:
            greeting = await self._next()
            if greeting.reply.code != 220:
                await self.close()
                return _prefixed(greeting.reply, f"{self.where} greeting")
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
        return _prefixed(event.reply, f"{self.where} refused our greeting")

    async def _starttls(self, tls: TlsPolicy) -> Reply | None:
        if "STARTTLS" not in self.extensions:
            if tls is TlsPolicy.OPPORTUNISTIC:
                return None
            return make(451, "4.7.4", f"TLS is required but {self.where} does not offer it")
        event = await self._command(Command(Verb.STARTTLS, "STARTTLS"))
        if event.reply.code != 220:
            if tls is TlsPolicy.OPPORTUNISTIC:
                return None
            return _prefixed(event.reply, f"TLS required but {self.where} refused STARTTLS")
        assert self._wire is not None and self._transport is not None
        injected = self.proto.tls_started() + self._wire.take()
        if injected:
            self._trace(f"discarded {len(injected)} bytes sent before the TLS handshake")
        try:
            transport, mismatch = await starttls.upgrade(
                self._transport,
                self._wire,
                tls,
                self.config,
                self.ca_file,
                self.hop.host,
                self.demand,
            )
        except starttls.HandshakeFailed as exc:
            self.abort()
            return make(451, "4.7.5", f"TLS handshake with {self.where} failed{exc.detail}")
        self._transport = transport
        if mismatch is not None:
            self.abort()
            return make(451, "4.7.5", f"DANE: certificate of {self.where}: {mismatch}")
        if self.demand is not None and self.demand.tlsa:
            self._trace("TLS established; certificate matches the TLSA records (DANE)")
        self.encrypted = True
        self.stats.tls += 1
        self._trace("TLS established")
        return await self._hello()

    async def _log_in(self, login: Login) -> Reply | None:
        def send(line: str, shown: str) -> Awaitable[Event]:
            return self._command(Command(Verb.AUTH, line), shown)

        where = self.where
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
        out: outgoing.Outgoing,
        recipients: list[Recipient],
        before_dot: DotHook | None = None,
        verbatim: Verbatim | None = None,
    ) -> tuple[list[RecipientResult], list[Recipient]]:
        """One transaction for ``recipients``: a result for each, and the recipients that got
        452 while others were accepted, to be sent again in a new transaction. The rules are
        ``MailTransaction``'s; this drives it over the connection.

        ``out`` is what goes out (``outgoing.decide`` for this connection's extensions): the
        transaction, our header and the text as DATA sends it (CRLF, dot-stuffed). ``before_dot``
        is called with the recipients as the transaction starts, so the caller can begin to
        journal that a duplicate is possible; the final dot waits until that mark is durable,
        and a transaction that ends without its dot takes the mark back. ``verbatim``, when
        given, is the same text as it lies in the file: sent as it is when ``out`` says the
        bytes are as stored and the wire carries them unchanged (not under TLS).
        """
        self.last_used = time.monotonic()
        self.transactions += 1
        hop = self.hop
        ext, where = self.extensions, self.where
        mt = MailTransaction(
            out.tx, recipients, ext, len(out.head), hop.host, hop.address, where, out.refusal
        )
        if mt.stage is Stage.DONE:
            return mt.results(), []
        self.dirty = True
        mark = before_dot(recipients) if before_dot is not None else None
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
                await self._message(mt, out.message(), out.head, mark, raw)
            elif mt.drop_connection:
                self.abort()
        except SessionBroken as exc:
            self.abort()
            if mt.stale(reused=self.transactions > 1):
                raise StaleSession(str(exc.reply)) from exc
            mt.broken(exc.reply)
        finally:
            if mark is not None and not mt.dotted:
                mark.withdraw()
        return mt.results(), mt.again

    async def _message(
        self,
        mt: MailTransaction,
        chunks: Iterable[bytes],
        received: bytes,
        mark: DotMark | None,
        verbatim: Verbatim | None = None,
    ) -> None:
        """After the 354: the message text, the final dot once ``mark`` is durable, and the
        reply to it."""
        if self._traced():
            self._trace(f"> (message: {received.decode('utf-8', 'replace').splitlines()[0]} ...)")
        if verbatim is not None:
            self.stats.verbatim += 1
            tail = await bodysend.as_stored(received, verbatim, self._write, self._sendfile)
        else:
            tail = await bodysend.stuffed(received, chunks, self.proto.send_body, self._write)
        self.reach("mid_data")
        if mark is not None:
            try:
                await mark.ready(mt.accepted)
            except BaseException:
                # the dot record could not be written (a full disk), or we were cancelled:
                # the server waits for a dot that must not come, so the connection cannot be
                # used again
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

    async def _sendfile(self, fh: BinaryIO, offset: int, count: int) -> None:
        transport = self._check_open()
        try:
            timeout = self.config.timeouts.data_block
            await bodysend.sendfile(transport, fh, offset, count, self._write, self._sent, timeout)
        except TimeoutError:
            raise SessionBroken(timed_out("")) from None
        except bodysend.SocketFailed as exc:
            raise SessionBroken(connection_lost(f"({exc})")) from exc

    def _sent(self, count: int) -> None:
        self.stats.bytes_sent += count

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
        """The next reply (one already received, the rest of a pipelined flight's, at once),
        waiting at most the timeout of the command it answers in all: the deadline covers the
        whole reply, so a server that drips a byte at a time cannot hold the connection."""
        event = self._parsed()
        if event is not NEED_DATA:
            return event
        wire = self._wire
        assert wire is not None
        verb = self.proto.awaiting or Verb.NOOP
        deadline_loop = asyncio.get_running_loop().time() + timeout_for(verb, self.config.timeouts)
        while True:
            if wire.closed and not wire.buffer:
                raise SessionBroken(connection_lost(""))
            if not await wire.wait_data(deadline_loop):
                raise SessionBroken(timed_out(f"waiting for the reply to {verb.name}"))
            self.proto.receive_data(wire.take())
            event = self._parsed()
            if event is not NEED_DATA:
                return event

    def _parsed(self) -> Event | NeedData:
        """The next reply among the bytes received so far, traced; ``NEED_DATA`` if none."""
        try:
            event = self.proto.next_event()
        except RemoteProtocolError as exc:
            self._trace(f"protocol error: {exc}")
            raise SessionBroken(make(451, "4.5.0", f"bad reply from server: {exc}")) from exc
        if event is not NEED_DATA and self._traced():
            for line in event.reply.render():
                self._trace(f"< {line}")
        return event

    @property
    def where(self) -> str:
        """``host[address]:port``, for replies and traces."""
        return f"{self.hop.host}[{self.hop.address}]:{self.hop.port}"

    def _traced(self) -> bool:
        return self.trace is not None and self.tracing()

    def _trace(self, text: str) -> None:
        if self.trace is not None and self.tracing():
            self.trace(f"session {self.hop.host}[{self.hop.address}]: {text}")


def _prefixed(reply: Reply, context: str) -> Reply:
    return Reply(reply.code, reply.enhanced, (f"{context}: {reply.lines[0]}", *reply.lines[1:]))
