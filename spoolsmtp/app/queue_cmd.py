"""``spoolsmtp queue``: the queue listed as Postfix's ``mailq`` lists it, or with ``--json`` one
object a line as ``postqueue -j`` writes them; filters by state, destination, sender and age.

It reads the spool (queueview.py), not the worker: it works with the worker stopped, needs only
read access, and writes nothing. The formatting is pure (``render_text``, ``to_json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spoolsmtp.bsmtp.response import shown
from spoolsmtp.model import exitcodes
from spoolsmtp.model.config import Config
from spoolsmtp.model.record import parse_iso
from spoolsmtp.model.reply import Reply
from spoolsmtp.model.units import parse_duration
from spoolsmtp.spool.queueview import STATES, Queued, QueuedRcpt, scan

# mailq's status mark after the id: being delivered, held; ours: not yet taken
_MARK = {"active": "*", "hold": "!", "incoming": "+", "deferred": " "}
_HEAD = f"{'-Queue ID-':<30} {'--Size--':>8} {'----Arrival Time----':<20}  -Sender/Recipient-------"
_INDENT = " " * 62


def add_parser(sub: Any) -> None:
    """Register ``queue`` on the ``spoolsmtp`` subcommand parser."""
    q = sub.add_parser("queue", help="list the queue (like mailq; --json like postqueue -j)")
    q.add_argument("--config", type=Path, help="YAML config (default conf/spoolsmtp.yaml)")
    q.add_argument("--json", action="store_true", help="one JSON object a line (postqueue -j)")
    q.add_argument(
        "--state",
        action="append",
        metavar="STATE",
        help=f"only these states (repeat or comma-separate: {', '.join(STATES)})",
    )
    q.add_argument(
        "--destination", metavar="DOMAIN", help="only with a recipient still to do at DOMAIN"
    )
    q.add_argument("--sender", metavar="ADDR", help="only from ADDR (<> for the null sender)")
    q.add_argument("--older-than", metavar="DURATION", help="arrived more than DURATION ago")
    q.add_argument("--younger-than", metavar="DURATION", help="arrived less than DURATION ago")


@dataclass(frozen=True)
class Filters:
    """What to list: ``states`` in order; the others None for any."""

    states: tuple[str, ...] = STATES
    destination: str | None = None
    sender: str | None = None
    older_than: float | None = None
    younger_than: float | None = None

    def keep(self, item: Queued, now: float) -> bool:
        if self.destination is not None and not any(
            r.domain == self.destination for r in item.pending
        ):
            return False
        if self.sender is not None and self.sender not in (s.lower() for s in item.senders):
            return False
        age = now - item.arrival
        if self.older_than is not None and age <= self.older_than:
            return False
        return not (self.younger_than is not None and age >= self.younger_than)


def filters(args: argparse.Namespace) -> Filters:
    """The filters the command line asks for; ValueError naming the option on a bad one."""
    states: list[str] = []
    for value in args.state or ():
        for word in filter(None, (s.strip() for s in value.split(","))):
            state = "hold" if word == "held" else word  # the record's word for hold/
            if state not in STATES:
                raise ValueError(f"--state: {state!r} is not one of {', '.join(STATES)}")
            states.append(state)
    ages: dict[str, float | None] = {}
    for option in ("older_than", "younger_than"):
        value = getattr(args, option)
        try:
            ages[option] = parse_duration(value) if value is not None else None
        except ValueError as exc:
            raise ValueError(f"--{option.replace('_', '-')}: {exc}") from None
    sender = args.sender
    if sender is not None:
        sender = "" if sender in ("<>", "") else sender.strip("<>").lower()
    return Filters(
        tuple(dict.fromkeys(states)) or STATES,
        args.destination.lower().rstrip(".") if args.destination else None,
        sender,
        ages["older_than"],
        ages["younger_than"],
    )


def listed(
    cfg: Config, chosen: Filters, now: float, denied: list[Path] | None = None
) -> Iterator[Queued]:
    return (item for item in scan(cfg, chosen.states, denied) if chosen.keep(item, now))


def run(cfg: Config, args: argparse.Namespace) -> int:
    """List; 0, or 77 when a folder could not be read (each named once on stderr; the others
    are listed all the same), 64 on a bad option."""
    try:
        chosen = filters(args)
    except ValueError as exc:
        print(f"spoolsmtp queue: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    denied: list[Path] = []
    items = listed(cfg, chosen, time.time(), denied)
    out = sys.stdout
    if args.json:
        for item in items:
            out.write(json.dumps(to_json(item), ensure_ascii=False) + "\n")
    else:
        for line in render_text(items):
            out.write(line + "\n")
    out.flush()
    for folder in denied:
        print(f"spoolsmtp queue: {shown(str(folder))}: permission denied", file=sys.stderr)
    return exitcodes.NOPERM if denied else exitcodes.OK


# -- the formats (pure) -----------------------------------------------------------------------


def reason(reply: Reply | None) -> str | None:
    """A recipient's last reply as one line (mailq's delay reason)."""
    return " ".join(reply.render()) if reply is not None else None


def to_json(item: Queued) -> dict[str, Any]:
    """One envelope as ``postqueue -j`` writes a message (queue_name, queue_id, arrival_time,
    message_size, sender, recipients with address and delay_reason), plus ours: the recipients'
    status, transaction, sender, attempts and next attempt; ``source``; how many recipients
    are ``delivered`` and ``failed`` already (the listed recipients are the pending ones)."""
    recipients = [_rcpt_json(r) for r in item.pending]
    return {
        "queue_name": item.state,
        "queue_id": item.id,
        "arrival_time": int(item.arrival),
        "message_size": item.size,
        "sender": item.sender or "",
        "recipients": recipients,
        "source": item.source,
        "senders": list(item.senders),
        "delivered": sum(1 for r in item.recipients if r.status == "delivered"),
        "failed": sum(1 for r in item.recipients if r.status == "failed"),
    }


def _rcpt_json(rcpt: QueuedRcpt) -> dict[str, Any]:
    out: dict[str, Any] = {"address": rcpt.address}
    why = reason(rcpt.reply)
    if why is not None:
        out["delay_reason"] = why
    out["status"] = rcpt.status
    out["transaction"] = rcpt.transaction
    out["sender"] = rcpt.sender
    out["attempts"] = rcpt.attempts
    if rcpt.next_attempt_at is not None:
        out["next_attempt_time"] = int(parse_iso(rcpt.next_attempt_at).timestamp())
    return out


def render_text(items: Iterable[Queued]) -> Iterator[str]:
    """mailq's listing: a header, each envelope (id and mark, size, arrival, sender; then its
    pending recipients, each after its last reply in parentheses), and the summary line."""
    count = size = 0
    for item in items:
        if count == 0:
            yield _HEAD
        count += 1
        size += item.size
        yield from _entry(item)
        yield ""
    if count == 0:
        yield "Mail queue is empty"
        return
    kbytes = (size + 1023) // 1024
    yield f"-- {kbytes} Kbytes in {count} Request{'s' if count != 1 else ''}."


def _entry(item: Queued) -> Iterator[str]:
    arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(item.arrival))
    sender = _sender(item.sender)
    head = f"{shown(item.id)}{_MARK.get(item.state, ' ')}"
    yield f"{head:<30} {item.size:>8} {arrival:<20}  {sender}"
    last: str | None = None
    # grouped by reason, as mailq does: those not tried yet (no reason) first
    for rcpt in sorted(item.pending, key=lambda r: reason(r.reply) or ""):
        why = reason(rcpt.reply)
        if why is not None and why != last:
            yield f"({shown(why)})"
        last = why
        other = f" (from {_sender(rcpt.sender)})" if rcpt.sender != item.sender else ""
        yield f"{_INDENT}{shown(rcpt.address)}{other}"


def _sender(sender: str | None) -> str:
    if sender is None:
        return "?"
    return shown(sender) if sender else "MAILER-DAEMON"
