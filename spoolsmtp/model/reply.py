"""SMTP replies as values: a code, an enhanced status code and text, with parsing and rendering.

A reply is data. A 550 for one recipient is a ``Reply``, never an exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

# an enhanced status code at the start of a line, by its class digit (RFC 3463: 2, 4 or 5)
_ENHANCED_OF_CLASS = {
    digit: re.compile(rf"^({digit}\.\d{{1,3}}\.\d{{1,3}})(?:\s+|$)") for digit in (2, 4, 5)
}


class Kind(Enum):
    """What a reply means for the command it answers."""

    POSITIVE = "positive"
    INTERMEDIATE = "intermediate"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class Reply:
    """One SMTP reply. ``lines`` holds the text of every line (multi-line replies have several)."""

    code: int
    enhanced: str | None
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def kind(self) -> Kind:
        first = self.code // 100
        if first == 2:
            return Kind.POSITIVE
        if first == 3:
            return Kind.INTERMEDIATE
        if first == 4:
            return Kind.TRANSIENT
        return Kind.PERMANENT

    @property
    def ok(self) -> bool:
        """True for 2xx and 3xx: the command was accepted."""
        return self.code < 400

    def render(self) -> list[str]:
        """The reply as it appears on the wire, one string per line, without line endings."""
        out = []
        last = len(self.lines) - 1
        for i, line in enumerate(self.lines or ("",)):
            sep = " " if i >= last else "-"
            text = f"{self.enhanced} {line}" if self.enhanced else line
            out.append(f"{self.code}{sep}{text}".rstrip())
        return out

    def __str__(self) -> str:
        return " / ".join(self.render())


def make(code: int, enhanced: str | None, text: str) -> Reply:
    """Build a reply; ``text`` may hold several lines separated by newlines."""
    return Reply(code, enhanced, tuple(text.split("\n")))


def with_enhanced(code: int, lines: list[str]) -> Reply:
    """Build a reply from received text lines, splitting off an enhanced status code.

    The enhanced code is kept only when its class digit matches the reply code's (RFC 3463).
    """
    pattern = _ENHANCED_OF_CLASS.get(code // 100)
    if pattern is None:  # a 354 (or no class RFC 3463 gives): no enhanced code to look for
        return Reply(code, None, tuple(lines))
    enhanced: str | None = None
    out: list[str] = []
    for line in lines:
        m = pattern.match(line)
        if m:
            enhanced = enhanced or m.group(1)
            out.append(line[m.end() :])
        else:
            out.append(line)
    return Reply(code, enhanced, tuple(out))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """Control characters (C0, DEL, C1) as ``\\xNN``: remote text kept whole but unable to
    move a terminal's cursor, retitle it or ring its bell when an operator reads it."""
    if text.isprintable():  # the usual reply: no control character (they are not printable)
        return text
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def sanitise(text: str, limit: int = 400) -> str:
    """Text from a remote server made safe for a header or a log line: printable ASCII, bounded."""
    cleaned = "".join(ch if 32 <= ord(ch) < 127 else " " for ch in text)
    cleaned = " ".join(cleaned.split())
    return cleaned[:limit]
