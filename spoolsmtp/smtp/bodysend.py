"""A message body that goes out as the envelope file holds it (``Verbatim``), and the
sendfile(2) that sends it from the file: no Python per line or per block.

The session decides when a body may go this way (its bytes on the wire are the file's: CRLF
lines, none beginning with a dot, no TLS, nothing converted or signed) and owns the socket;
this module only moves the bytes.
"""

from __future__ import annotations

import asyncio
import os
import select
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

BODY_WRITE = 64 * 1024


@dataclass(frozen=True)
class Verbatim:
    """The message text exactly as DATA sends it: bytes ``start``-``end`` of the envelope file,
    whose lines all end in CRLF and none begins with a dot (nothing to stuff). ``source`` is
    the file's bytes when they are in memory, else the open file (sent with sendfile(2))."""

    source: bytes | BinaryIO
    start: int
    end: int


async def stuffed(
    received: bytes,
    chunks: Iterable[bytes],
    send_body: Callable[[bytes], bytes],
    write: Callable[[bytes], Awaitable[None]],
) -> bytes:
    """Our Received header and the message text (through the protocol's ``send_body``) in
    writes of ``BODY_WRITE`` bytes or more; the rest, unsent, is returned: it goes out with
    the final dot. A small message is then one system call, header, text and dot."""
    pending = [send_body(received)]
    size = len(pending[0])
    for chunk in chunks:
        data = send_body(chunk)
        pending.append(data)
        size += len(data)
        if size >= BODY_WRITE:
            await write(b"".join(pending))
            pending, size = [], 0
    return b"".join(pending)


async def as_stored(
    received: bytes,
    body: Verbatim,
    write: Callable[[bytes | memoryview], Awaitable[None]],
    send_file: Callable[[BinaryIO, int, int], Awaitable[None]],
) -> bytes:
    """Our Received header, then the message as the file holds it: from memory in one write,
    or from the file by ``send_file`` (sendfile(2)); the rest, unsent, is returned (a small
    message goes out with the final dot: from a file, read with one pread(2), which costs
    less than a write and a sendfile of its own)."""
    size = body.end - body.start
    small = len(received) + size < BODY_WRITE
    if isinstance(body.source, bytes):
        view = memoryview(body.source)[body.start : body.end]
        if small:
            return received + view
        await write(received)
        await write(view)
    elif small:
        return received + _pread(body.source, body.start, size)
    else:
        await write(received)
        await send_file(body.source, body.start, size)
    return b""


def _pread(fh: BinaryIO, offset: int, count: int) -> bytes:
    data = os.pread(fh.fileno(), count, offset)
    if len(data) < count:
        raise OSError(f"envelope file shorter than recorded (offset {offset + count})")
    return data


class SocketFailed(Exception):
    """sendfile(2) to the socket failed (the peer is gone): the session is broken."""


async def sendfile(
    transport: asyncio.Transport,
    fh: BinaryIO,
    offset: int,
    count: int,
    write: Callable[[bytes], Awaitable[None]],
    counted: Callable[[int], None],
    block_timeout: float,
) -> None:
    """``count`` bytes of ``fh`` from ``offset`` straight to the socket, each sendfile(2)'s
    bytes ``counted`` (those given to ``write`` are counted there). Only once the transport
    has nothing buffered (else the bytes are read and written in blocks through ``write``);
    on a duplicate of the socket's descriptor, so a connection closed meanwhile cannot hand
    its number to another file; a full socket buffer is waited for in a thread, at most
    ``block_timeout`` (TimeoutError)."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_write_buffer_size():
        fh.seek(offset)
        while count > 0:
            data = fh.read(min(count, BODY_WRITE * 16))
            if not data:
                raise OSError(f"envelope file shorter than recorded (offset {offset + count})")
            await write(data)
            count -= len(data)
        return
    fd = os.dup(sock.fileno())
    try:
        while count > 0:
            try:
                sent = os.sendfile(fd, fh.fileno(), offset, count)
            except BlockingIOError:
                if not await asyncio.to_thread(_writable, fd, block_timeout):
                    raise TimeoutError from None
                continue
            except OSError as exc:
                raise SocketFailed(exc.strerror or str(exc)) from exc
            if sent == 0:
                raise OSError(f"envelope file shorter than recorded (offset {offset + count})")
            offset += sent
            count -= sent
            counted(sent)
    finally:
        os.close(fd)


def _writable(fd: int, timeout: float) -> bool:
    """Until the socket can take more (in an I/O thread); False when ``timeout`` passed."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(timeout * 1000))
