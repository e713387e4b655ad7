"""The batch response: every command echoed as a ``050`` line, then its reply.

This is the text ``spoolsmtp check`` prints, and the file ``VERB ON`` keeps as
``results/ID.response``.
"""

from __future__ import annotations

from spoolsmtp.envelope import Envelope


def render(envelope: Envelope) -> str:
    """The batch response of an envelope, one line per echo and per reply line."""
    out: list[str] = []
    for entry in envelope.response:
        out.append(f"050 {entry.echo}")
        out.extend(entry.reply.render())
    return "".join(line + "\n" for line in out)


def error_lines(envelope: Envelope) -> list[str]:
    """``source:line: reply`` for every refused command, as compilers report errors."""
    return [f"{envelope.source}:{e.line}: {e.reply.render()[0]}" for e in envelope.errors]


def verdict(envelope: Envelope) -> str:
    """One line: accepted or not, with counts."""
    recipients = sum(len(t.recipients) for t in envelope.transactions)
    counts = f"{len(envelope.transactions)} transaction(s), {recipients} recipient(s) accepted"
    if envelope.accepted:
        return f"{envelope.source}: OK, {counts}"
    return f"{envelope.source}: {len(envelope.errors)} command(s) refused; {counts}"
