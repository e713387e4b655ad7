"""EBCDIC code pages Python lacks, registered as codecs: ``cp1047`` (Latin-1/Open Systems, the
z/OS UNIX code page). It is ``cp037`` with six positions moved: the brackets, the circumflex,
the not sign, Y acute and the diaeresis (IBM CDRA tables for CCSIDs 37 and 1047)."""

from __future__ import annotations

import codecs
from typing import Any

# byte -> character where cp1047 differs from cp037
_CP1047 = {0x5F: "^", 0xAD: "[", 0xB0: "\u00ac", 0xBA: "\u00dd", 0xBB: "\u00a8", 0xBD: "]"}


def _tables() -> tuple[str, Any]:
    chars = list(bytes(range(256)).decode("cp037"))
    for byte, char in _CP1047.items():
        chars[byte] = char
    decoding = "".join(chars)
    return decoding, codecs.charmap_build(decoding)


_DECODE, _ENCODE = _tables()


def _encode(text: str, errors: str = "strict") -> tuple[bytes, int]:
    return codecs.charmap_encode(text, errors, _ENCODE)


def _decode(data: Any, errors: str = "strict") -> tuple[str, int]:
    return codecs.charmap_decode(data, errors, _DECODE)


class _IncrementalEncoder(codecs.IncrementalEncoder):
    def encode(self, text: str, final: bool = False) -> bytes:
        return codecs.charmap_encode(text, self.errors, _ENCODE)[0]


class _IncrementalDecoder(codecs.IncrementalDecoder):
    def decode(self, data: bytes, final: bool = False) -> str:  # type: ignore[override]
        return codecs.charmap_decode(data, self.errors, _DECODE)[0]


def _search(name: str) -> codecs.CodecInfo | None:
    if name.replace("-", "").replace("_", "").lower() not in ("cp1047", "ibm1047"):
        return None
    return codecs.CodecInfo(
        name="cp1047",
        encode=_encode,
        decode=_decode,
        incrementalencoder=_IncrementalEncoder,
        incrementaldecoder=_IncrementalDecoder,
    )


codecs.register(_search)
