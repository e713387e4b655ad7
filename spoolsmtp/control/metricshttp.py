"""The metrics endpoint (``metrics.listen``): ``GET /metrics`` over HTTP/1.0, served from the
worker's event loop, with what ``ctl METRICS`` prints.

A tiny responder, not a web server: one request per connection, request line and headers
bounded (8 KiB) and timed (10 s), GET and HEAD of ``/metrics`` only (anything else 404 or 405),
at most ``MAX_CLIENTS`` at once (more are closed at once). It binds exactly the address
configured: 127.0.0.1 or ::1 keep it on this host; another address is the operator's choice
(what it tells is counts: no address, no envelope id). A port it cannot bind stops start-up
with a config error naming ``metrics.listen``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from spoolsmtp.control import exposition, metrics
from spoolsmtp.control.port import ControlPort
from spoolsmtp.model.config import listen_address
from spoolsmtp.model.errors import ConfigError

log = logging.getLogger("spoolsmtp")
MAX_REQUEST = 8192
TIMEOUT = 10.0
MAX_CLIENTS = 16
KEY = "metrics.listen"


class MetricsEndpoint:
    """Serves ``render()`` (the exposition text) at ``listen`` (``host:port``)."""

    def __init__(self, render: Callable[[], Awaitable[str]], listen: str, source: str) -> None:
        self.render = render
        self.listen = listen
        self.source = source
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the kernel's choice for port 0)."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        host, port = listen_address(self.listen, self.source, KEY)
        try:
            self._server = await asyncio.start_server(
                self._client, host, port, reuse_address=True, limit=MAX_REQUEST
            )
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise ConfigError(self.source, KEY, f"cannot listen on {self.listen}: {why}") from exc

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= MAX_CLIENTS:
            writer.close()
            return
        self._clients.add(task)
        try:
            async with asyncio.timeout(TIMEOUT):
                status, body, head_only = await self._answer(reader)
                writer.write(_response(status, body, head_only))
                await writer.drain()
        except (
            ConnectionError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, bytes, bool]:
        request = (await reader.readuntil(b"\n")).decode("latin-1").split()
        seen = 0
        while True:  # the headers, read and ignored, bounded
            line = await reader.readuntil(b"\n")
            seen += len(line)
            if line in (b"\r\n", b"\n") or seen > MAX_REQUEST:
                break
        if len(request) != 3 or not request[2].startswith("HTTP/"):
            return "400 Bad Request", b"bad request\n", False
        method, target = request[0], request[1].split("?", 1)[0]
        if target != "/metrics":
            return "404 Not Found", b"only /metrics is here\n", False
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"GET /metrics\n", False
        return "200 OK", (await self.render()).encode(), method == "HEAD"


def _response(status: str, body: bytes, head_only: bool) -> bytes:
    kind = exposition.CONTENT_TYPE if status.startswith("200") else "text/plain; charset=utf-8"
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body


async def serve(
    port: ControlPort, before: Callable[[], Awaitable[None]] | None = None
) -> MetricsEndpoint | None:
    """The endpoint of ``metrics.listen``, listening; None when the key is null. ``before``
    is awaited before each answer (a supervisor asks its processes for their counters)."""
    listen = port.cfg.metrics.listen
    if listen is None:
        return None

    async def render() -> str:
        if before is not None:
            await before()
        return await metrics.exposition(port)

    endpoint = MetricsEndpoint(render, listen, port.cfg.source)
    await endpoint.start()
    log.info("metrics: serving GET /metrics on %s", listen)
    return endpoint
