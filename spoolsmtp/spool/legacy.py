"""Legacy envelope files: EBCDIC code pages, blank-padded fixed-length records, files with no
line ends at all. ``transcode`` streams such a file into UTF-8 text with LF line ends, which is
what the reader and everything after it see.
"""

from __future__ import annotations

import codecs
import os
import shutil
from pathlib import Path
from typing import BinaryIO

from spoolsmtp.bsmtp import netdata
from spoolsmtp.model.config import SpoolConfig
from spoolsmtp.spool import intake
from spoolsmtp.spool.durable import replacing

CHUNK = 1 << 20
# trailing blanks of an open line are held back (strip_trailing_blanks may yet remove them) up
# to this many; more are written out as they are: such a line is far over any SMTP limit, and
# the reader refuses it, where holding them back let one hostile file take unbounded memory
MAX_HELD_BLANKS = 64 * 1024
_NEL = "\x85"


def needed(cfg: SpoolConfig) -> bool:
    """Whether files must be converted at all (plain UTF-8 files are left byte for byte)."""
    return (
        codecs.lookup(cfg.encoding).name != "utf-8"
        or cfg.strip_trailing_blanks
        or cfg.record_length > 0
    )


def transcode(src: BinaryIO, dst: BinaryIO, cfg: SpoolConfig) -> None:
    """Convert one file; memory stays bounded by the chunk size whatever the file size.

    EBCDIC's NL (U+0085 once decoded) ends a line like LF; with ``record_length`` the text is
    cut into records of that many characters, each one line.

    A line without a line end is written out as it comes (all but its trailing blanks, which
    ``strip_trailing_blanks`` may yet remove), so time is linear and memory bounded whatever the
    line length.
    """
    utf8 = codecs.lookup(cfg.encoding).name == "utf-8"
    errors = "surrogateescape" if utf8 else "strict"
    decoder = codecs.getincrementaldecoder(cfg.encoding)(errors=errors)
    pending = ""
    blanks: list[str] = []  # the trailing blanks of the open line, not yet written
    held = 0  # their length
    while True:
        raw = src.read(CHUNK)
        final = not raw
        text = pending + decoder.decode(raw, final=final)
        if not utf8:
            text = text.replace(_NEL, "\n")
        if cfg.record_length > 0:
            size = cfg.record_length
            cut = len(text) if final else len(text) - len(text) % size
            lines = [text[i : i + size] for i in range(0, cut, size)]
            pending = text[cut:]
            out = "".join(_fix(line, cfg) + "\n" for line in lines)
        else:
            cut = len(text) if final else text.rfind("\n") + 1
            block, rest = text[:cut], text[cut:]
            if blanks and (cut or final):  # the open line ends in this block
                block, blanks, held = "".join(blanks) + block, [], 0
            elif blanks and rest.strip(" \r"):  # it goes on: its blanks were inside it
                rest, blanks, held = "".join(blanks) + rest, [], 0
            lines = block.split("\n")
            last = lines.pop()
            out = "".join(_fix(line, cfg) + "\n" for line in lines)
            out += _fix(last, cfg) if last else ""
            # the open line: what ends in a non-blank is final; its blanks wait for more
            head = rest.rstrip(" \r")
            out += head
            if len(head) < len(rest):
                blanks.append(rest[len(head) :])
                held += len(rest) - len(head)
                if held > MAX_HELD_BLANKS:
                    out, blanks, held = out + "".join(blanks), [], 0
        dst.write(out.encode("utf-8", errors))
        if final:
            return


def convert_file(src: Path, dst: Path, cfg: SpoolConfig) -> None:
    """Convert ``src`` into a durable worker-owned ``dst`` (temp, fsync, rename); blocking.
    ``src`` is read through one descriptor that follows no link, cannot block on a FIFO and
    must be a regular file (``intake.open_regular``), and must not change while it is read.
    The caller syncs the folder (the spool's I/O batch does, once per batch)."""
    fd, info = intake.open_regular(os.fspath(src))
    with os.fdopen(fd, "rb") as fin, replacing(dst, sync_dir=False, mode=0o600) as fout:
        head = fin.read(8)
        fin.seek(0)
        if netdata.recognised(head):  # binary records, unwrapped when read: copied as they are
            shutil.copyfileobj(fin, fout, CHUNK)
        else:
            transcode(fin, fout, cfg)
        intake.check_unchanged(fd, info)


def _fix(line: str, cfg: SpoolConfig) -> str:
    cr = line.endswith("\r")
    if cr:
        line = line[:-1]
    if cfg.strip_trailing_blanks:
        line = line.rstrip(" ")
    return line + ("\r" if cr else "")
