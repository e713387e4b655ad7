"""One end of the socketpair between the supervisor and a delivery process (wire.py says what
travels on it): batches written once per turn of the event loop, batches read and handed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

from spoolsmtp.app.wire import Batch, Decoder

log = logging.getLogger("spoolsmtp")
READ_SIZE = 256 * 1024


class Link:
    """Sends with ``send`` (flushed at the end of the current loop turn) and passes each batch
    read to ``handle``; ``closed`` is set when the other end is gone (EOF or an error)."""

    def __init__(self, sock: socket.socket, handle: Callable[[dict[str, list[Any]]], None]) -> None:
        self._sock = sock
        self._handle = handle
        self._out = Batch()
        self._decoder = Decoder()
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    async def open(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
        self._reading = asyncio.create_task(self._read(reader))

    def send(self, kind: str, item: Any) -> None:
        if self._out.add(kind, item):
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        if not self._out:
            return
        data = self._out.take()
        if self._writer is not None and not self.closed.is_set():
            try:
                self._writer.write(data)
            except (ConnectionError, RuntimeError):
                self.closed.set()

    async def drain(self) -> None:
        """Everything sent so far handed to the kernel (or the other end gone)."""
        self.flush()
        if self._writer is not None and not self.closed.is_set():
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._writer.drain()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                for batch in self._decoder.feed(data):
                    self._handle(batch)
        except (ConnectionError, OSError):
            pass
        except Exception:  # a bug, or the other end is not what it should be: one line
            log.exception("the link to the other process failed; closing it")
        finally:
            self.closed.set()

    async def close(self) -> None:
        await self.drain()
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
        self.closed.set()
