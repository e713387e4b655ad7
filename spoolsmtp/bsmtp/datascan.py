"""Scanning a message's text in a Batch SMTP envelope: lines, size, headers, the end of data.

Rules of message text (SPEC.md "The envelope"): in CRLF files the end of data is only
``CRLF . CRLF``; in LF files only ``LF . LF``. A line with the other ending, a bare CR, a NUL or
a line over ``limits.text_line`` is a fault, and the message is refused at its end: nothing that
could smuggle an end-of-data past a remote server ever leaves us. The first fault's line is
reported, whatever the blocks the file was cut into.

Pure: a message is scanned a block of whole lines at a time with bytes methods (count, find,
split), which keeps a 200 MB message well above 100 MB/s; only offsets are kept, not text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from spoolsmtp.model.config import Limits
from spoolsmtp.model.envelope import Message
from spoolsmtp.model.reply import Reply, make

# A line longer than this without any LF is taken as proof that the file is not line text.
MAX_PARTIAL = 64 * 1024
_RECEIVED = re.compile(rb"^received[ \t]*:", re.I | re.M)
# A line beginning with a dot (stuffed, or the end of data). The regex engine's search for a
# literal prefix runs about twice as fast as ``bytes.count``/``find`` for a pattern whose first
# byte is as common as LF is in text.
_DOT_LINE = re.compile(rb"\n\.")
_BARE_CR = re.compile(rb"\r(?!\n)")


@dataclass
class Scan:
    """What is known of a message while its lines are being read."""

    line: int
    start: int
    lines: int = 0
    size: int = 0
    eight_bit: bool = False
    received: int = 0
    in_headers: bool = True
    line_start: bool = True
    can_end: bool = True
    fault: Reply | None = None

    def message(self, end: int, crlf: bool) -> Message:
        """The scanned message, its text ending at offset ``end`` (terminator excluded)."""
        return Message(
            start=self.start,
            end=end,
            crlf=crlf,
            lines=self.lines,
            size=self.size,
            eight_bit=self.eight_bit,
            received=self.received,
        )


def scan_data(
    scan: Scan,
    buf: bytes,
    pos: int,
    *,
    final: bool,
    crlf: bool,
    line: int,
    skip: bool,
    limits: Limits,
) -> tuple[int, int, int | None]:
    """Consume whole message lines of ``buf`` from ``pos``, the last line read being ``line``.

    Returns where the next unread byte is, the number of the last line read, and the index in
    ``buf`` of the terminating dot line when the end of data was reached (else None).
    ``skip``: the body of a refused DATA, only counted."""
    last_nl = buf.rfind(b"\n", pos)
    if last_nl < 0:
        if len(buf) - pos > MAX_PARTIAL and not final:
            line = data_block(
                scan, buf[pos:], complete=False, crlf=crlf, line=line, skip=skip, limits=limits
            )
            return len(buf), line, None
        return pos, line, None
    region_end = last_nl + 1
    term = b".\r\n" if crlf else b".\n"
    dots: int | None = 0
    if scan.can_end and buf.startswith(term, pos):
        stop = pos
    else:
        stop, dots = _dot_lines(buf, pos, region_end, crlf)
    block_end = stop if stop >= 0 else region_end
    if block_end > pos:
        line = data_block(
            scan,
            buf[pos:block_end],
            complete=True,
            crlf=crlf,
            line=line,
            skip=skip,
            limits=limits,
            dots=dots,
        )
    if stop < 0:
        return region_end, line, None
    return stop + len(term), line + 1, stop


def _dot_lines(buf: bytes, pos: int, end: int, crlf: bool) -> tuple[int, int]:
    """In ``buf[pos:end]`` (whole lines), where the end-of-data line begins (-1 if it is not
    there) and how many lines before it begin with a dot after a line break, in one search:
    the end of data is the first such line holding only the dot, its line break the file's
    (``CRLF . CRLF`` or ``LF . LF``)."""
    dots = 0
    for match in _DOT_LINE.finditer(buf, pos, end):
        at = match.start()
        if crlf:
            if at > pos and buf[at - 1] == 13 and buf.startswith(b"\r\n", at + 2):
                return at + 1, dots
        elif buf.startswith(b"\n", at + 2):
            return at + 1, dots
        dots += 1
    return -1, dots


def data_block(
    scan: Scan,
    block: bytes,
    *,
    complete: bool,
    crlf: bool,
    line: int,
    skip: bool,
    limits: Limits,
    dots: int | None = None,
) -> int:
    """Account for a run of message text: lines, size, and the first fault in it. Returns the
    number of the last line read. ``dots``: the lines in it that begin with a dot after a line
    break, when the caller has counted them."""
    first_line = line + 1
    newlines = block.count(b"\n")
    if dots is None:
        dots = len(_DOT_LINE.findall(block))
    dots += 1 if scan.line_start and block.startswith(b".") else 0
    scan.size += len(block) - dots + (0 if crlf else newlines)
    scan.lines += newlines
    line += newlines
    scan.can_end = complete and (not crlf or block.endswith(b"\r\n"))
    if skip:
        scan.line_start = complete
        return line
    if not scan.eight_bit and not block.isascii():
        scan.eight_bit = True
    if scan.in_headers:
        scan_headers(scan, block, crlf)
    if scan.fault is None:
        scan.fault = block_fault(
            block, first_line, crlf, scan.line_start, limits.text_line, newlines
        )
    if scan.fault is None and scan.size > limits.max_message_bytes:
        scan.fault = make(
            552,
            "5.3.4",
            f"message exceeds fixed maximum message size ({limits.max_message_bytes})",
        )
    scan.line_start = complete
    return line


def scan_headers(scan: Scan, block: bytes, crlf: bool) -> None:
    blank = b"\r\n" if crlf else b"\n"
    if scan.line_start and block.startswith(blank):
        scan.in_headers = False
        return
    end = block.find(b"\n" + blank)
    head = block if end < 0 else block[: end + 1]
    scan.received += len(_RECEIVED.findall(head))
    if end >= 0:
        scan.in_headers = False


def block_fault(
    block: bytes,
    first_line: int,
    crlf: bool,
    line_start: bool,
    text_line: int,
    newlines: int | None = None,
) -> Reply | None:
    """The first fault of a block of message text (``newlines``: its LFs, if counted)."""

    def at(index: int) -> int:
        return first_line + block.count(b"\n", 0, index)

    # every kind of fault, by line; the first line's is reported (ties in this order), so
    # that the verdict does not depend on how the file was cut into blocks
    found: list[tuple[int, int, str]] = []
    nul = block.find(b"\x00")
    if nul >= 0:
        found.append((at(nul), 0, "NUL in message text at line {}"))
    if crlf:
        if newlines is None:
            newlines = block.count(b"\n")
        # without a bare CR every CR begins a CRLF, so the CRLFs are the CRs: two searches
        # where counting the CRLFs and comparing took three
        crs = block.count(b"\r")
        bare = _BARE_CR.search(block) if crs else None
        pairs = crs if bare is None else block.count(b"\r\n")
        if pairs != newlines:
            lone = re.search(rb"(?<!\r)\n", block)
            found.append((at(lone.start() if lone else 0), 1, "bare LF in message text at line {}"))
        if bare is not None:
            found.append((at(bare.start()), 2, "bare CR in message text at line {}"))
    elif b"\r" in block:
        found.append((at(block.find(b"\r")), 2, "bare CR in message text at line {}"))
    longest = text_line - (1 if crlf else 2)
    if len(block) > longest and (not found or min(found)[0] > first_line):
        over = _long_line(block, longest, line_start)
        if over is not None:
            why = f"message line {{}} longer than {text_line} octets"
            found.append((at(over), 3, why))
    if found:
        line, _, what = min(found)
        return make(554, "5.6.0", what.format(line) + "; refused")
    return None


def _long_line(block: bytes, longest: int, line_start: bool) -> int | None:
    """Where the first line longer than ``longest`` begins, found by C searches over the
    block: from a line's start, the last newline within ``longest + 1`` bytes ends every line
    begun before it within the limit, so the search jumps past it (one ``rfind`` per
    ``longest`` bytes or so, none per line); with no newline there, the line at hand is too
    long. RFC 5321 4.5.3.1.6: the dot added by dot-stuffing does not count toward the limit,
    so a line one over it that begins with a dot is not too long (the block's first line only
    if it begins a line)."""
    end = len(block)
    start = 0
    while end - start > longest:
        newline = block.rfind(b"\n", start, start + longest + 1)
        if newline >= 0:
            start = newline + 1
            continue
        stop = block.find(b"\n", start)
        stop = end if stop < 0 else stop
        stuffed = block.startswith(b".", start) and (start > 0 or line_start)
        if stop - start - stuffed > longest:
            return start
        start = stop + 1
    return None
