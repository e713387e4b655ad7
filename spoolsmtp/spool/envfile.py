"""Reading envelope files from disk: the driver that streams a file through the pure ``Reader``,
and the streams that give a message back, either as its text or in wire form for DATA.
"""

from __future__ import annotations

import io
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from spoolsmtp.bsmtp import netdata
from spoolsmtp.bsmtp.reader import Reader
from spoolsmtp.bsmtp.unwrap import unwrap
from spoolsmtp.model.config import Limits, NetdataConfig, SpoolConfig
from spoolsmtp.model.envelope import Envelope, Message
from spoolsmtp.smtp.bodysend import Verbatim
from spoolsmtp.spool import legacy

CHUNK = 1 << 20


def read(
    path: Path,
    limits: Limits,
    hostname: str,
    *,
    max_file_bytes: int | None = None,
    source: str | None = None,
) -> Envelope:
    """Read one envelope file in bounded memory; raises ``EnvelopeFault`` if it is not one."""
    with open(path, "rb") as fh:
        return read_stream(fh, source or path.name, limits, hostname, max_file_bytes)


@contextmanager
def converted(
    path: Path, spool: SpoolConfig, nd: NetdataConfig | None = None, hostname: str = ""
) -> Iterator[Path]:
    """The file as the worker will see it: legacy files converted to UTF-8, and (given ``nd``)
    a NETDATA file unwrapped, in a temp copy. Raises ``EnvelopeFault`` for bad NETDATA."""
    if nd is not None:
        with open(path, "rb") as fh:
            if netdata.recognised(fh.read(8)):
                fh.seek(0)
                data = unwrap(
                    fh.read(),
                    str(path),
                    codepage=nd.codepage,
                    nodes=nd.nodes,
                    hostname=hostname,
                    envelope_id=f"netdata-{secrets.token_hex(8)}",
                )
                with tempfile.TemporaryDirectory(prefix="spoolsmtp-") as tmp:
                    dest = Path(tmp) / path.name
                    dest.write_bytes(data)
                    yield dest
                return
    if not legacy.needed(spool):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="spoolsmtp-") as tmp:
        dest = Path(tmp) / path.name
        # the user named this file: a link to it is followed (the worker's own reads are not)
        legacy.convert_file(path.resolve(), dest, spool)
        yield dest


def read_stream(
    fh: BinaryIO,
    source: str,
    limits: Limits,
    hostname: str,
    max_file_bytes: int | None = None,
    unqualified: Callable[[str], str | None] | None = None,
) -> Envelope:
    """Read an envelope from an open binary stream (a file, or standard input)."""
    reader = Reader(source, limits, hostname, max_file_bytes, unqualified)
    while chunk := fh.read(CHUNK):
        reader.feed(chunk)
    return reader.finish()


def read_bytes(
    data: bytes,
    source: str,
    limits: Limits,
    hostname: str,
    max_file_bytes: int | None = None,
    unqualified: Callable[[str], str | None] | None = None,
) -> Envelope:
    """Read an envelope held in memory (a small file read whole, tests, reports)."""
    reader = Reader(source, limits, hostname, max_file_bytes, unqualified)
    reader.feed(data)
    return reader.finish()


def _blocks(fh: BinaryIO, message: Message, chunk: int) -> Iterator[bytes]:
    """The message's lines as written, in blocks of whole lines (LF or CRLF as in the file)."""
    fh.seek(message.start)
    left = message.end - message.start
    carry = b""
    while left > 0:
        data = fh.read(min(chunk, left))
        if not data:
            raise OSError(f"envelope file shorter than recorded (offset {message.end})")
        left -= len(data)
        data = carry + data
        cut = data.rfind(b"\n") + 1
        if left == 0:
            cut = len(data)
        carry = data[cut:]
        if cut:
            yield data[:cut]


def _unstuff(block: bytes, crlf: bool) -> bytes:
    """One block of whole lines with the leading dot removed where it was stuffed, in CRLF."""
    text = block.replace(b"\n.", b"\n")
    if text.startswith(b"."):
        text = text[1:]
    return text if crlf else text.replace(b"\n", b"\r\n")


def text_chunks(fh: BinaryIO, message: Message, chunk: int = CHUNK) -> Iterator[bytes]:
    """The message itself, as the sender meant it: unstuffed, with CRLF line endings."""
    for block in _blocks(fh, message, chunk):
        yield _unstuff(block, message.crlf)


def wire_chunks(fh: BinaryIO, message: Message, chunk: int = CHUNK) -> Iterator[bytes]:
    """The message as DATA sends it: CRLF lines, dot-stuffed by us, terminator not included.

    Stuffing is recomputed from the unstuffed text rather than trusted from the file, so what
    goes on the wire is canonical whatever the writer of the envelope did.
    """
    for block in text_chunks(fh, message, chunk):
        stuffed = block.replace(b"\n.", b"\n..")
        yield b"." + stuffed if stuffed.startswith(b".") else stuffed


def verbatim(fh: BinaryIO, message: Message) -> Verbatim | None:
    """The message as it lies in the file, when that is what DATA sends (``wire_chunks`` would
    give the same bytes), for a stream of ``open_text``; else None."""
    if not message.verbatim:
        return None
    source = fh.getvalue() if isinstance(fh, io.BytesIO) else fh  # the bytes it was given
    return Verbatim(source, message.start, message.end)


def open_text(path: Path, data: bytes | None) -> BinaryIO:
    """A stream over an envelope file for ``text_chunks``/``wire_chunks``: its bytes when they
    are already in memory (no second open), else the file. One stream per reader: the chunk
    functions seek."""
    return io.BytesIO(data) if data is not None else open(path, "rb")


def message_bytes(path: Path, message: Message) -> bytes:
    """The whole message text in memory (tests and small reports only)."""
    with open(path, "rb") as fh:
        return b"".join(text_chunks(fh, message))
