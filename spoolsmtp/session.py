"""One SMTP connection to one remote address: the asyncio driver around ``ClientProtocol``.

The session owns the transport; the protocol object owns the rules. Every wait has the
RFC 5321 section 4.5.3.2 timeout of the command it waits for. A failure to open (refused,
greeting or EHLO refused, TLS refused under a policy that needs it) is returned as a reply so
the caller can try the next host; anything that breaks an open session (421, a lost
connection, a timeout, garbage) leaves every recipient not yet final deferred.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from spoolsmtp import crashpoint, envfile
from spoolsmtp.config import DeliveryConfig, Timeouts, TlsPolicy, TlsVersion
from spoolsmtp.envelope import BodyType, Recipient, Transaction
from spoolsmtp.mx import Hop
from spoolsmtp.outcome import RecipientResult, connection_lost, decided_here, result, timed_out
from spoolsmtp.reply import Reply, make
from spoolsmtp.smtpclient import (
    NEED_DATA,
    ClientProtocol,
    Command,
    Event,
    Extensions,
    RemoteProtocolError,
    Verb,
)
from spoolsmtp.tracer import always

Trace = Callable[[str], None]
DotHook = Callable[[list[Recipient]], Awaitable[None]]
BODY_WRITE = 64 * 1024
_TLS_VERSIONS = {
    TlsVersion.TLSV1: ssl.TLSVersion.TLSv1,
    TlsVersion.TLSV1_1: ssl.TLSVersion.TLSv1_1,
    TlsVersion.TLSV1_2: ssl.TLSVersion.TLSv1_2,
    TlsVersion.TLSV1_3: ssl.TLSVersion.TLSv1_3,
}


class SessionBroken(Exception):
    """The session cannot go on; ``reply`` says why (a 421, a synthetic 451 for loss/timeout)."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        super().__init__(str(reply))


class StaleSession(Exception):
    """A reused connection was found closed before it answered anything: open a new one."""


class _Wire(asyncio.Protocol):
    """Bytes in from the transport, kept until the session takes them; write flow control."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.closed = False
        self._arrived = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost = asyncio.Event()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._arrived.set()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._arrived.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._arrived.set()
        self._writable.set()
        self._lost.set()

    async def lost(self) -> None:
        """Until the transport is really gone (a TLS close first exchanges close_notify)."""
        await self._lost.wait()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        self._arrived.clear()
        return data

    async def wait_data(self) -> None:
        if not self.buffer and not self.closed:
            await self._arrived.wait()

    @property
    def writable(self) -> bool:
        return self._writable.is_set()

    async def drained(self) -> None:
        await self._writable.wait()


# which of ``Timeouts`` bounds the wait for the reply to each command
_TIMEOUT_FIELD = {
    Verb.GREETING: "greeting",
    Verb.EHLO: "ehlo",
    Verb.HELO: "ehlo",
    Verb.STARTTLS: "starttls",
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


@dataclass
class SessionStats:
    """Counters a session adds to; shared by all sessions of a deliverer."""

    connections: int = 0
    reused: int = 0
    tls: int = 0
    bytes_sent: int = 0


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
    proto: ClientProtocol = field(default_factory=ClientProtocol)
    encrypted: bool = False
    last_used: float = field(default_factory=time.monotonic)
    transactions: int = 0
    _wire: _Wire | None = None
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
                    _Wire, self.hop.address, self.hop.port
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
        context = self._tls_context(tls)
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
        self.encrypted = True
        self.stats.tls += 1
        self._trace("TLS established")
        return await self._hello()

    def _tls_context(self, tls: TlsPolicy) -> ssl.SSLContext:
        if tls is TlsPolicy.VERIFY:
            context = ssl.create_default_context(cafile=self.ca_file)
            context.check_hostname = True
        else:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        minimum = _TLS_VERSIONS[self.config.tls_min_version]
        if minimum < ssl.TLSVersion.TLSv1_2:
            # the operator allowed TLS 1.0/1.1 on purpose: Python's deprecation warning is not
            # news to them, and OpenSSL 3 needs its security level lowered to speak them
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                context.minimum_version = minimum
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        else:
            context.minimum_version = minimum
        return context

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
        fh: BinaryIO,
        received: bytes,
        before_dot: DotHook | None = None,
    ) -> tuple[list[RecipientResult], list[Recipient]]:
        """One transaction for ``recipients``: a result for each, and the recipients that got
        452 while others were accepted, to be sent again in a new transaction.

        ``before_dot`` is awaited with the accepted recipients just before the final dot, so the
        caller can journal that a duplicate is possible from here on.
        """
        self.last_used = time.monotonic()
        self.transactions += 1
        ext = self.extensions
        refusal = _refusal(tx, recipients, ext, len(received), self._where())
        if refusal is not None:
            return [decided_here(r, refusal) for r in recipients], []
        dsn = "DSN" in ext
        commands = [
            Command(Verb.MAIL, f"MAIL FROM:<{tx.mail_from}>{_mail_args(tx, ext, len(received))}")
        ]
        commands += [
            Command(Verb.RCPT, f"RCPT TO:<{r.address}>{_rcpt_args(r) if dsn else ''}", i)
            for i, r in enumerate(recipients)
        ]
        final: dict[int, RecipientResult] = {}
        accepted: list[int] = []
        events: list[Event] = []
        stage = "after MAIL"
        self.dirty = True
        try:
            if self.proto.pipelining:
                await self._flight([*commands, Command(Verb.DATA, "DATA")], events)
            else:
                for command in commands:
                    events.append(await self._command(command))
                    if command.verb is Verb.MAIL and not events[-1].reply.ok:
                        break
            self._apply(events, recipients, final, accepted)
            again = [recipients[i] for i in sorted(final) if final[i].reply.code == 452]
            crashpoint.reach("after_rcpt")
            data_event = next((e for e in events if e.command.verb is Verb.DATA), None)
            if len(final) == len(recipients):
                if data_event is not None and data_event.reply.code == 354:
                    self.abort()
                return [final[i] for i in range(len(recipients))], []
            stage = "after RCPT"
            if data_event is None:
                data_event = await self._command(Command(Verb.DATA, "DATA"))
            if data_event.reply.code != 354:
                for i in accepted:
                    final[i] = self._result(recipients[i], data_event.reply)
                return [final[i] for i in range(len(recipients))], []
            stage = "during DATA"
            tail = await self._body(received, envfile.wire_chunks(fh, tx.message))
            if before_dot is not None:
                try:
                    await before_dot([recipients[i] for i in accepted])
                except BaseException:
                    # the dot record could not be written (a full disk): the server waits
                    # for a dot that must not come, so the connection cannot be used again
                    self.abort()
                    raise
            self._check_open()
            stage = "after the final dot"
            await self._write(tail + self.proto.send_end_of_data())
            self._trace("> .")
            crashpoint.reach("after_dot")
            end = await self._next()
            if end.reply.code < 300:
                crashpoint.reach("after_250")
            self.dirty = False
            for i in accepted:
                final[i] = self._result(recipients[i], end.reply, dsn_relayed=dsn)
        except SessionBroken as exc:
            self.abort()
            if stage == "after MAIL" and not events and self.transactions > 1:
                raise StaleSession(str(exc.reply)) from exc
            if stage == "after MAIL":
                self._apply(events, recipients, final, accepted)
            reply = exc.reply
            if reply.code != 421:
                reply = make(reply.code, reply.enhanced, f"{reply.text} {stage}".strip())
            after_dot = stage == "after the final dot"
            for i, r in enumerate(recipients):
                if i not in final:
                    final[i] = self._result(r, reply, after_dot=after_dot)
            return [final[i] for i in range(len(recipients))], []
        return [final[i] for i in range(len(recipients))], again

    def _apply(
        self,
        events: list[Event],
        recipients: list[Recipient],
        final: dict[int, RecipientResult],
        accepted: list[int],
    ) -> None:
        """Record the replies to MAIL and RCPT received so far."""
        if events and not events[0].reply.ok:
            for i, r in enumerate(recipients):
                final[i] = self._result(r, events[0].reply)
            return
        for event in events:
            if event.command.verb is not Verb.RCPT:
                continue
            i = event.command.tag
            if event.reply.ok:
                accepted.append(i)
            else:
                final[i] = self._result(recipients[i], event.reply)

    async def _flight(self, commands: list[Command], events: list[Event]) -> None:
        """Send commands in one write (PIPELINING) and collect their replies in order."""
        data = b"".join(self.proto.send(c) for c in commands)
        if self._traced():
            for c in commands:
                self._trace(f"> {c.text}")
        await self._write(data)
        for _ in commands:
            events.append(await self._next())
            if self.proto.closed:
                raise SessionBroken(events.pop().reply)

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
        crashpoint.reach("mid_data")
        return b"".join(pending)

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

    async def _command(self, command: Command) -> Event:
        data = self.proto.send(command)
        if self._traced():
            self._trace(f"> {command.text}")
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

    async def _write(self, data: bytes) -> None:
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

    def _result(
        self, rcpt: Recipient, reply: Reply, *, after_dot: bool = False, dsn_relayed: bool = False
    ) -> RecipientResult:
        return result(
            rcpt,
            reply,
            self.hop.host,
            self.hop.address,
            after_dot=after_dot,
            dsn_relayed=dsn_relayed,
        )

    def _where(self) -> str:
        return f"{self.hop.host}[{self.hop.address}]:{self.hop.port}"

    def _traced(self) -> bool:
        return self.trace is not None and self.tracing()

    def _trace(self, text: str) -> None:
        if self.trace is not None and self.tracing():
            self.trace(f"session {self.hop.host}[{self.hop.address}]: {text}")


def _prefixed(reply: Reply, context: str) -> Reply:
    return Reply(reply.code, reply.enhanced, (f"{context}: {reply.lines[0]}", *reply.lines[1:]))


def _needs_utf8(tx: Transaction, recipients: list[Recipient]) -> bool:
    return tx.params.smtputf8 and not (
        tx.mail_from.isascii() and all(r.address.isascii() for r in recipients)
    )


def _refusal(
    tx: Transaction, recipients: list[Recipient], ext: Extensions, extra: int, server: str
) -> Reply | None:
    """A reason to fail the transaction on this server without sending it (decided here: the
    text names the server whose limit or lack it was)."""
    size = tx.message.size + extra
    if ext.size is not None and size > ext.size:
        return make(
            552, "5.3.4", f"message of {size} octets exceeds the limit {ext.size} of {server}"
        )
    eight_bit = tx.message.eight_bit or tx.params.body is BodyType.EIGHT_BIT
    if eight_bit and "8BITMIME" not in ext:
        return make(554, "5.6.3", f"8-bit message but {server} does not offer 8BITMIME")
    if _needs_utf8(tx, recipients) and "SMTPUTF8" not in ext:
        return make(554, "5.6.7", f"non-ASCII address but {server} does not offer SMTPUTF8")
    return None


def _mail_args(tx: Transaction, ext: Extensions, extra: int) -> str:
    args: list[str] = []
    if "SIZE" in ext:
        args.append(f"SIZE={tx.message.size + extra}")
    if (tx.message.eight_bit or tx.params.body is BodyType.EIGHT_BIT) and "8BITMIME" in ext:
        args.append("BODY=8BITMIME")
    if tx.params.smtputf8 and "SMTPUTF8" in ext:
        args.append("SMTPUTF8")
    if "DSN" in ext:
        if tx.params.ret is not None:
            args.append(f"RET={tx.params.ret.value}")
        if tx.params.envid is not None:
            args.append(f"ENVID={tx.params.envid}")
    return "".join(" " + a for a in args)


def _rcpt_args(rcpt: Recipient) -> str:
    rendered = rcpt.render()
    return rendered[len(f"<{rcpt.address}>") :]


def fold_received(parts: Iterator[str] | list[str]) -> bytes:
    """A Received header folded at 78 columns, CRLF-terminated."""
    lines: list[str] = []
    current = "Received:"
    for part in parts:
        if len(current) + 1 + len(part) > 78 and current.strip() != "Received:":
            lines.append(current)
            current = "\t" + part
        else:
            current += " " + part
    lines.append(current)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
