"""A NETDATA writer for tests, written from the published layout (z/OS TSO/E Customization,
"Format of transmitted data"), independent of the decoder under test: control records INMR01,
INMR02, INMR03 and INMR06 made of text units, data records, all cut into segments of at most
255 bytes (length byte, flags byte, data) and the segment stream cut into 80-byte cards.
"""

from __future__ import annotations

import struct

FIRST, LAST, CONTROL = 0x80, 0x40, 0x20
CARD = 80


def unit(key: int, *values: bytes) -> bytes:
    """A text unit: key, number of values, then each value's length and bytes."""
    out = struct.pack(">HH", key, len(values))
    for value in values:
        out += struct.pack(">H", len(value)) + value
    return out


def char(key: int, text: str, codepage: str = "cp037") -> bytes:
    return unit(key, text.encode(codepage))


def num(key: int, value: int, width: int) -> bytes:
    return unit(key, value.to_bytes(width, "big"))


def segments(record: bytes, control: bool, size: int = 253) -> bytes:
    """One logical record as segments of at most ``size`` data bytes each."""
    parts = [record[i : i + size] for i in range(0, len(record), size)] or [b""]
    out = b""
    for i, part in enumerate(parts):
        flags = (FIRST if i == 0 else 0) | (LAST if i == len(parts) - 1 else 0)
        flags |= CONTROL if control else 0
        out += bytes([len(part) + 2, flags]) + part
    return out


def control(ident: str, body: bytes = b"") -> bytes:
    return segments(ident.encode("cp037") + body, control=True)


def cards(stream: bytes, pad: int = 0x40) -> bytes:
    """The stream cut into 80-byte card images, the last one padded."""
    if len(stream) % CARD:
        stream += bytes([pad]) * (CARD - len(stream) % CARD)
    return stream


def transmit(
    lines: list[str],
    *,
    from_node: str = "VMNODE1",
    from_user: str = "ALICE",
    to_node: str = "VMNODE1",
    to_user: str = "SMTP",
    codepage: str = "cp037",
    lrecl: int = 80,
    fixed: bool = True,
    segment: int = 253,
) -> bytes:
    """A whole NETDATA file as CMS SENDFILE or TSO TRANSMIT writes it: one sequential data set
    whose records are ``lines`` (blank padded to ``lrecl`` when ``fixed``)."""
    header = (
        num(0x0042, CARD, 2)  # INMLRECL
        + char(0x1011, from_node)  # INMFNODE
        + char(0x1012, from_user)  # INMFUID
        + char(0x1001, to_node)  # INMTNODE
        + char(0x1002, to_user)  # INMTUID
        + char(0x1024, "20261201101500")  # INMFTIME
        + num(0x102F, 1, 2)  # INMNUMF
    )
    recfm = 0x4000 if fixed else 0x8000
    attrs = (
        char(0x1028, "INMCOPY")  # INMUTILN
        + num(0x003C, 0x4000, 2)  # INMDSORG: PS
        + num(0x0042, lrecl, 2)  # INMLRECL
        + num(0x0049, recfm, 2)  # INMRECFM
        + num(0x102C, 4096, 4)  # INMSIZE
        + char(0x0002, "MAIL")  # INMDSNAM
    )
    stream = control("INMR01", header)
    stream += control("INMR02", struct.pack(">I", 1) + attrs)
    stream += control("INMR03", num(0x003C, 0x4000, 2) + num(0x0042, lrecl, 2))
    for line in lines:
        data = line.encode(codepage)
        if fixed:
            data = data.ljust(lrecl, " ".encode(codepage))
        stream += segments(data, control=False, size=segment)
    stream += control("INMR06")
    return cards(stream)
