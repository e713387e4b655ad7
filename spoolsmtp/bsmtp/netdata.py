"""NETDATA: the interchange format of TSO TRANSMIT and CMS SENDFILE/NOTE, decoded (pure, no I/O).

The layout (IBM z/OS TSO/E Customization, "Format of transmitted data"):

* The file is a stream of *segments*, cut into 80-byte card images as the spool carries them (a
  segment may run from one card into the next). A segment is a length byte (counting itself
  and the flags byte, so 2..255), a flags byte, and ``length - 2`` bytes of data.
* Flags: ``0x80`` first segment of a logical record, ``0x40`` last segment of one, ``0x20`` the
  record is a control record, ``0x10`` the record holds the record number of the next record.
  A logical record is the data of its segments, from the one flagged first to the one flagged
  last.
* A control record starts with its identifier in EBCDIC: ``INMR01`` (header: who sent it, to
  whom, when), ``INMR02`` (one per file: a 4-byte file number, then the file's attributes),
  ``INMR03`` (before each file's data records), ``INMR04`` (user), ``INMR06`` (the end),
  ``INMR07`` (acknowledgement). The rest of the record is *text units*: a 2-byte key, a 2-byte
  count, and ``count`` times a 2-byte length and that many bytes of data.
* The data records of a file follow its ``INMR03``; they are the records of the data set, in
  the code page of the sending system (``cp037`` in the US, ``cp1047`` for z/OS UNIX, ``cp500``
  internationally).

Anything that does not follow this layout raises ``NetdataError`` naming the byte offset and
what is wrong, so the file can be rejected with a reason a sender can act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spoolsmtp.model import codepages  # noqa: F401 - registers cp1047

FIRST = 0x80
LAST = 0x40
CONTROL = 0x20
RECNUM = 0x10
CARD = 80

# text unit keys (TSO/E Customization, "Text units")
INMDSNAM = 0x0002
INMDSORG = 0x003C
INMLRECL = 0x0042
INMRECFM = 0x0049
INMTNODE = 0x1001
INMTUID = 0x1002
INMFNODE = 0x1011
INMFUID = 0x1012
INMFTIME = 0x1024
INMUTILN = 0x1028
INMSIZE = 0x102C
INMTERM = 0x0028
INMNUMF = 0x102F

NUMERIC = frozenset({INMDSORG, INMLRECL, INMRECFM, INMSIZE, INMNUMF})
RECFM_FIXED = 0x4000  # INMRECFM: fixed-length records (blank padded)
DSORG_PO = 0x0200  # INMDSORG: a partitioned data set (sent unloaded by IEBCOPY)

# ``INMR01`` in every EBCDIC code page a site uses (the letters and digits do not move)
MAGIC = bytes([0xC9, 0xD5, 0xD4, 0xD9, 0xF0, 0xF1])
END = bytes([0xC9, 0xD5, 0xD4, 0xD9, 0xF0, 0xF6])  # INMR06
_IDS = {"INMR01", "INMR02", "INMR03", "INMR04", "INMR06", "INMR07"}


class NetdataError(ValueError):
    """The file claims to be NETDATA but breaks its layout; ``offset`` is a byte offset."""

    def __init__(self, offset: int, problem: str) -> None:
        self.offset = offset
        self.problem = problem
        super().__init__(f"NETDATA byte {offset}: {problem}")


@dataclass
class DataFile:
    """One transmitted file: its ``INMR02`` text units and its data records."""

    number: int
    units: dict[int, list[bytes]]
    records: list[bytes] = field(default_factory=list)

    @property
    def message(self) -> bool:
        """The terminal message of ``TRANSMIT ... MSG`` (not a data set)."""
        return INMTERM in self.units

    @property
    def fixed(self) -> bool:
        return bool(number(self.units, INMRECFM) & RECFM_FIXED)


@dataclass
class Transmission:
    """What a NETDATA file carries: its ``INMR01`` header and its files in order."""

    header: dict[int, list[bytes]]
    files: list[DataFile]
    codepage: str

    def text(self, key: int) -> str:
        """A character text unit of the header, decoded and stripped ("" if absent)."""
        values = self.header.get(key)
        return values[0].decode(self.codepage).strip() if values else ""


def recognised(data: bytes) -> bool:
    """Whether ``data`` begins as a NETDATA file does: a control record ``INMR01``."""
    return len(data) >= 8 and data[1] & CONTROL != 0 and data[2:8] == MAGIC


def number(units: dict[int, list[bytes]], key: int) -> int:
    values = units.get(key)
    return int.from_bytes(values[0], "big") if values else 0


def records(data: bytes) -> list[tuple[int, int, bytes]]:
    """The logical records of the segment stream: (offset, flags of the first segment, data);
    stops after ``INMR06`` (the rest of its card is padding)."""
    out: list[tuple[int, int, bytes]] = []
    pos = 0
    start = -1
    flags0 = 0
    parts: list[bytes] = []
    while pos < len(data):
        length = data[pos]
        if pos + 1 >= len(data):
            raise NetdataError(pos, "truncated: a segment without its flags byte")
        flags = data[pos + 1]
        if length < 2:
            raise NetdataError(pos, f"segment length {length} is less than 2")
        if pos + length > len(data):
            raise NetdataError(
                pos, f"truncated: a segment of {length} bytes, {len(data) - pos} left in the file"
            )
        body = data[pos + 2 : pos + length]
        if flags & FIRST:
            if start >= 0:
                raise NetdataError(pos, f"a new record begins inside the record begun at {start}")
            start, flags0, parts = pos, flags, []
        elif start < 0:
            raise NetdataError(pos, "a segment continues no record (no first-segment flag 0x80)")
        elif (flags ^ flags0) & CONTROL:
            raise NetdataError(pos, "a record's segments disagree on the control flag 0x20")
        parts.append(body)
        pos += length
        if flags & LAST:
            whole = b"".join(parts)
            out.append((start, flags0, whole))
            start = -1
            if flags0 & CONTROL and whole[:6] == END:
                return out
    if start >= 0:
        raise NetdataError(start, "truncated: the file ends inside a record")
    return out


def text_units(record: bytes, begin: int, offset: int, ident: str) -> dict[int, list[bytes]]:
    """The text units of a control record from byte ``begin`` of it."""
    units: dict[int, list[bytes]] = {}
    pos = begin
    while pos < len(record):
        if pos + 4 > len(record):
            raise NetdataError(
                offset, f"{ident}: a text unit cut short at byte {pos} of the record"
            )
        key = int.from_bytes(record[pos : pos + 2], "big")
        count = int.from_bytes(record[pos + 2 : pos + 4], "big")
        pos += 4
        values: list[bytes] = []
        for _ in range(count):
            if pos + 2 > len(record):
                raise NetdataError(offset, f"{ident}: text unit {key:#06x} runs past the record")
            size = int.from_bytes(record[pos : pos + 2], "big")
            if pos + 2 + size > len(record):
                raise NetdataError(
                    offset, f"{ident}: text unit {key:#06x} runs past the end of the record"
                )
            values.append(record[pos + 2 : pos + 2 + size])
            pos += 2 + size
        units[key] = values
    return units


def decode(data: bytes, codepage: str = "cp037") -> Transmission:
    """Decode a whole NETDATA file; raises ``NetdataError`` on any fault of its layout."""
    if not recognised(data):
        raise NetdataError(0, "does not begin with an INMR01 control record")
    header: dict[int, list[bytes]] | None = None
    announced: list[DataFile] = []
    files: list[DataFile] = []
    current: DataFile | None = None
    ended = False
    for offset, flags, record in records(data):
        if not flags & CONTROL:
            if current is None:
                raise NetdataError(offset, "a data record before any INMR03")
            current.records.append(record)
            continue
        ident = record[:6].decode("cp037")  # the identifiers are the same in every code page
        if ident not in _IDS:
            raise NetdataError(offset, f"control record {record[:6].hex()} is not INMR01..INMR07")
        if header is None and ident != "INMR01":
            raise NetdataError(offset, f"{ident} before INMR01")
        if ident == "INMR01":
            if header is not None:
                raise NetdataError(offset, "a second INMR01")
            header = text_units(record, 6, offset, ident)
        elif ident == "INMR02":
            if len(record) < 10:
                raise NetdataError(offset, "INMR02 without its file number")
            units = text_units(record, 10, offset, ident)
            announced.append(DataFile(int.from_bytes(record[6:10], "big"), units))
        elif ident == "INMR03":
            if len(files) >= len(announced):
                raise NetdataError(offset, "INMR03 for a file no INMR02 described")
            current = announced[len(files)]
            files.append(current)
            text_units(record, 6, offset, ident)  # checked, not needed
        elif ident == "INMR06":
            ended = True
        else:
            text_units(record, 6, offset, ident)
    if not ended:
        raise NetdataError(len(data), "truncated: the file ends without INMR06")
    assert header is not None
    for key in (INMFNODE, INMFUID):
        if not header.get(key) or not header[key][0].strip(b"\x40\x00"):
            name = "INMFNODE" if key == INMFNODE else "INMFUID"
            raise NetdataError(0, f"INMR01 has no {name} (the sender)")
    if not files:
        raise NetdataError(len(data), "no file: no INMR03 and no data records")
    return Transmission(header, files, codepage)


def lines(t: Transmission) -> list[str]:
    """The text of what was sent, one line per record: the data set (the terminal message of
    ``TRANSMIT ... MSG`` when there is nothing else), blank padding of fixed records removed."""
    chosen = [f for f in t.files if not f.message] or t.files
    out: list[str] = []
    for f in chosen:
        if f.units.get(INMUTILN) and f.units[INMUTILN][0].decode(t.codepage).strip() != "INMCOPY":
            raise NetdataError(0, "a data set unloaded by a utility (a PDS?) cannot be mail")
        if number(f.units, INMDSORG) & DSORG_PO:
            raise NetdataError(0, "a partitioned data set cannot be mail")
        for rec in f.records:
            text = rec.decode(t.codepage)
            out.append(text.rstrip(" ") if f.fixed or not f.units.get(INMRECFM) else text)
    return out
