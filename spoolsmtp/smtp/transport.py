"""The transport under an SMTP session: the asyncio protocol that keeps the server's bytes until
the session takes them (with write flow control), and the TLS context STARTTLS uses.

No SMTP here: the rules are ``smtpclient``'s and ``transaction``'s, the driving is ``session``'s.
"""

from __future__ import annotations

import asyncio
import ssl
import warnings

from spoolsmtp.model.config import TlsPolicy, TlsVersion

_TLS_VERSIONS = {
    TlsVersion.TLSV1: ssl.TLSVersion.TLSv1,
    TlsVersion.TLSV1_1: ssl.TLSVersion.TLSv1_1,
    TlsVersion.TLSV1_2: ssl.TLSVersion.TLSv1_2,
    TlsVersion.TLSV1_3: ssl.TLSVersion.TLSv1_3,
}


class Wire(asyncio.Protocol):
    """Bytes in from the transport, kept until the session takes them; write flow control."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.closed = False
        self._waiter: asyncio.Future[bool] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost = asyncio.Event()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
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
        return data

    async def wait_data(self, deadline: float) -> bool:
        """Until bytes arrive or the connection closes (True), or the loop's clock reaches
        ``deadline`` (False). One future and one timer per wait: no ``asyncio.timeout``
        (a task cancelled and uncancelled) for every reply."""
        if self.buffer or self.closed:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_at(deadline, _settle, waiter, False)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None:
            _settle(self._waiter, True)

    @property
    def writable(self) -> bool:
        return self._writable.is_set()

    async def drained(self) -> None:
        await self._writable.wait()


def _settle(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


def tls_context(tls: TlsPolicy, minimum_version: TlsVersion, ca_file: str | None) -> ssl.SSLContext:
    """The client context for ``tls``: chain and host name checked only under ``verify``."""
    if tls is TlsPolicy.VERIFY:
        context = ssl.create_default_context(cafile=ca_file)
        context.check_hostname = True
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    minimum = _TLS_VERSIONS[minimum_version]
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
