"""The batch response: every command echoed as a ``050`` line, then its reply.

This is the text ``spoolsmtp check`` prints, and the file ``VERB ON`` keeps as
``results/ID.response``. Everything here is made printable (``shown``): an envelope's bytes,
and a file's name, never reach a terminal or a report as control characters.
"""

from __future__ import annotations

import re

from spoolsmtp.model.envelope import Entry, Envelope

# C0 controls but tab, DEL, C1 controls, and lone surrogates (undecodable bytes of a file name)
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")


def shown(text: str) -> str:
    """Text made safe to print on a terminal: control characters become ``\\xNN``."""
    return _UNSAFE.sub(_escape, text)


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\x{code:02x}"


def render(envelope: Envelope) -> str:
    """The batch response of an envelope, one line per echo and per reply line."""
    out: list[str] = []
    for entry in envelope.response:
        out.append(f"050 {entry.echo}")
        out.extend(entry.reply.render())
    return "".join(shown(line) + "\n" for line in out)


def error_lines(envelope: Envelope, errors: tuple[Entry, ...] | None = None) -> list[str]:
    """``source:line: reply`` for every refused command, as compilers report errors."""
    source = shown(envelope.source)
    chosen = envelope.errors if errors is None else errors
    return [f"{source}:{e.line}: {shown(e.reply.render()[0])}" for e in chosen]


def batch_reports(envelope: Envelope) -> list[tuple[str, str | None, list[str]]]:
    """One batch error report per sender: (tag, sender, its refused lines), in file order.

    A refused command is reported to the sender of the transaction it stood in (``Entry.sender``).
    The first report keeps the tag ``batch``, the others are ``batch.2``, ``batch.3``...
    """
    groups: dict[str | None, list[Entry]] = {}
    for entry in envelope.errors:
        groups.setdefault(entry.sender, []).append(entry)
    return [
        ("batch" if n == 1 else f"batch.{n}", sender, error_lines(envelope, tuple(entries)))
        for n, (sender, entries) in enumerate(groups.items(), 1)
    ]


def verdict(envelope: Envelope) -> str:
    """One line: accepted or not, with counts."""
    recipients = sum(len(t.recipients) for t in envelope.transactions)
    counts = f"{len(envelope.transactions)} transaction(s), {recipients} recipient(s) accepted"
    if envelope.accepted:
        return f"{shown(envelope.source)}: OK, {counts}"
    return f"{shown(envelope.source)}: {len(envelope.errors)} command(s) refused; {counts}"
