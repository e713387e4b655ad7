"""Real SMTP servers on loopback for tests: aiosmtpd scripted per address, and raw asyncio
servers for the misbehaviour aiosmtpd cannot produce. Each runs its own event loop in a thread,
so the code under test (in-process or a worker subprocess) talks to it over real sockets.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Message:
    """One message a server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    rcpt_options: list[str]
    tls: bool


@dataclass
class Script:
    """How a server answers. Replies are full reply lines such as ``550 5.1.1 no such user``."""

    rcpt: dict[str, str] = field(default_factory=dict)
    mail: str | None = None
    data: str | None = None
    ehlo_extra: list[str] = field(default_factory=list)
    data_delay: float = 0.0
    max_rcpts: int | None = None
    defer_first: dict[str, int] = field(default_factory=dict)
    gate: threading.Event | None = None
    drop_extensions: list[str] = field(default_factory=list)  # e.g. 8BITMIME, always offered


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        extra = [f"250-{x}" for x in self.server.script.ehlo_extra]
        dropped = {f"250-{x}" for x in self.server.script.drop_extensions}
        kept = [r for r in responses[:-1] if r.split(" ")[0] not in dropped]
        return [*kept, *extra, responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.server.script.mail:
            return self.server.script.mail
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        scripted = self.server.script.rcpt.get(address)
        if scripted:
            return scripted
        left = self.server.script.defer_first.get(address, 0)
        if left > 0:
            self.server.script.defer_first[address] = left - 1
            return "450 4.2.1 mailbox busy, try later"
        limit = self.server.script.max_rcpts
        if limit is not None and len(envelope.rcpt_tos) >= limit:
            return "452 4.5.3 too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        script = self.server.script
        if script.gate is not None:
            gate = script.gate
            await asyncio.get_running_loop().run_in_executor(None, gate.wait, 30)
        if script.data_delay:
            await asyncio.sleep(script.data_delay)
        if script.data:
            return script.data
        content = envelope.original_content or b""
        self.server.messages.append(
            Message(
                envelope.mail_from or "",
                list(envelope.rcpt_tos),
                content,
                list(envelope.mail_options),
                list(envelope.rcpt_options),
                session.ssl is not None,
            )
        )
        return "250 2.0.0 queued"


class _LoopThread:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(_cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class SmtpServer:
    """An aiosmtpd server on a loopback address, answering as its ``Script`` says."""

    def __init__(
        self,
        script: Script | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        smtputf8: bool = True,
        size_limit: int | None = 33554432,
        decode_data: bool = False,
        **smtp_options: Any,
    ) -> None:
        """``smtp_options`` go to aiosmtpd's ``SMTP`` (e.g. ``authenticator``)."""
        self.script = script or Script()
        self.host = host
        self.messages: list[Message] = []
        self.raw: list[bytes] = []
        self.connections = 0
        handler = _Handler(self)
        outer = self

        class _Recording(SMTP):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                outer.connections += 1
                super().connection_made(transport)

            def data_received(self, data: bytes) -> None:
                outer.raw.append(data)
                super().data_received(data)

        def factory() -> SMTP:
            return _Recording(
                handler,
                hostname="mx.test",
                tls_context=tls_context,
                require_starttls=require_starttls,
                enable_SMTPUTF8=smtputf8,
                data_size_limit=size_limit,
                decode_data=decode_data,
                **smtp_options,
            )

        self._lt = _LoopThread()

        async def start() -> asyncio.Server:
            return await asyncio.get_running_loop().create_server(factory, host, port)

        self._server: asyncio.Server = self._lt.run(start())
        self.port: int = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            await self._server.wait_closed()

        self._lt.run(close())
        self._lt.stop()

    @property
    def wire(self) -> bytes:
        return b"".join(self.raw)


RawScript = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A bare asyncio server that runs ``script`` for each connection: for misbehaviour."""

    def __init__(self, script: RawScript, host: str = "127.0.0.1", port: int = 0) -> None:
        self.script = script
        self.host = host
        self.received: list[bytes] = []
        self._lt = _LoopThread()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await script(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        async def start() -> asyncio.Server:
            return await asyncio.start_server(handle, host, port)

        self._server: asyncio.Server = self._lt.run(start())
        self.port: int = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()

        self._lt.run(close())
        self._lt.stop()


async def read_line(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\n")


async def standard_dialogue(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    received: list[bytes],
    rcpt: Callable[[bytes], Awaitable[bytes]] | None = None,
    mail: Callable[[bytes], Awaitable[bytes]] | None = None,
    dot: Callable[[list[bytes]], Awaitable[bool]] | None = None,
) -> None:
    """A minimal well-behaved server (no extensions) for raw scripts to build on; ``rcpt``
    and ``mail``, when given, answer each RCPT or MAIL line (a reply line, CRLF included).
    ``dot``, when given, is called with ``received`` once a message's text is in: True ends
    the connection with that dot unanswered."""
    writer.write(b"220 raw.test ready\r\n")
    while True:
        line = await read_line(reader)
        received.append(line)
        verb = line[:4].upper()
        if verb == b"RCPT" and rcpt is not None:
            writer.write(await rcpt(line))
        elif verb == b"MAIL" and mail is not None:
            writer.write(await mail(line))
        elif verb == b"DATA":
            writer.write(b"354 go ahead\r\n")
            body = await reader.readuntil(b"\r\n.\r\n")
            received.append(body)
            if dot is not None and await dot(received):
                return
            writer.write(b"250 2.0.0 ok\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 bye\r\n")
            await writer.drain()
            return
        else:
            writer.write(b"250 ok\r\n")
        await writer.drain()
