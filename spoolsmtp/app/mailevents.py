"""Where the worker's outcomes become mail log lines (model/maillog.py) and outcome counters
(model/stats.py): called by the attempt, the pickup, the report writer, at the moment each
outcome is recorded, in the process that did the work (each writes to its own stderr)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from spoolsmtp.model import maillog
from spoolsmtp.model.envelope import Envelope
from spoolsmtp.model.outcome import RecipientResult
from spoolsmtp.model.record import RcptRecord, Record, iso, parse_iso

if TYPE_CHECKING:
    from spoolsmtp.app.host import WorkerHost
    from spoolsmtp.policy.fate import Plan, Rcpt

FINAL = frozenset({"sent", "bounced", "expired"})


def arrival(record: Record) -> float:
    return parse_iso(record.received_at).timestamp()


def _port(host: WorkerHost, domain: str) -> int:
    dest = host._destination(domain)
    route = dest.route
    return route.port if route is not None and route.port is not None else host.cfg.delivery.port


def tried(
    host: WorkerHost,
    envelope_id: str,
    tx: int,
    record: Record,
    results: Sequence[RecipientResult],
    rcpts: Sequence[Rcpt],
    started: float,
    tx_started: float,
    at: float,
) -> None:
    """One transaction's results (``rcpts``: what the fate made of each, in the same order):
    a line and a count each. ``started``: the attempt's start, ``tx_started`` the
    transaction's, ``at`` when its results came (seconds since the epoch)."""
    came = arrival(record)
    line_id = f"{envelope_id}.{tx}"
    logging_on = maillog.enabled()  # else only the counters: no line is built
    for res, rcpt in zip(results, rcpts, strict=True):
        status = maillog.STATUS[rcpt.status.value]
        dsn = maillog.dsn_of(res.reply)
        host.stats.recipient(status, dsn, at - came if status in FINAL else None)
        if not logging_on:
            continue
        relay = (
            "none"
            if res.local or res.host is None
            else maillog.relay_of(res.host, res.address, _port(host, res.recipient.domain))
        )
        fields = maillog.recipient(
            line_id,
            rcpt.address,
            status,
            res.reply,
            relay,
            at - came,
            (started - came, tx_started - started, res.setup, res.transfer),
        )
        maillog.emit(fields)


def expired(
    host: WorkerHost,
    envelope_id: str,
    record: Record,
    rcpts: Sequence[Rcpt],
    started: float,
    at: float,
) -> None:
    """Recipients failed at ``retry.max_age``, each with its expiry reply."""
    came = arrival(record)
    for rcpt in rcpts:
        assert rcpt.reply is not None
        fields = maillog.recipient(
            f"{envelope_id}.{rcpt.tx}",
            rcpt.address,
            "expired",
            rcpt.reply,
            "none",
            at - came,
            (started - came, at - started, 0.0, 0.0),
        )
        host.stats.recipient("expired", fields["dsn"], at - came)
        maillog.emit(fields)


def failed_here(
    host: WorkerHost, envelope_id: str, record: Record, rcpts: Sequence[tuple[int, RcptRecord]]
) -> None:
    """Recipients failed without an attempt (a quarantine): each with the reply it got."""
    at = time.time()
    came = arrival(record)
    for tx, rcpt in rcpts:
        assert rcpt.reply is not None
        fields = maillog.recipient(
            f"{envelope_id}.{tx}",
            rcpt.address,
            "bounced",
            rcpt.reply,
            "none",
            at - came,
            (at - came, 0.0, 0.0, 0.0),
        )
        host.stats.recipient("bounced", fields["dsn"], at - came)
        maillog.emit(fields)


def taken(envelope_id: str, file: str, env: Envelope, record: Record, uid: int | None) -> None:
    """An envelope read after its claim: a line per transaction, and one per command refused
    in it."""
    for tx in env.transactions:
        maillog.emit(
            maillog.taken(
                f"{envelope_id}.{tx.number}",
                tx.mail_from,
                tx.message.size,
                len(tx.recipients),
                file,
                uid,
            )
        )
    for line in record.batch_errors:
        maillog.emit(maillog.refused(envelope_id, line))


def rejected(envelope_id: str, file: str, reason: str) -> None:
    """A file that is not an envelope: a warning, as before the mail log, in its shape."""
    maillog.emit(maillog.rejected(envelope_id, file, reason), logging.WARNING)


def report(envelope_id: str, tag: str, folder: str, name: str) -> None:
    maillog.emit(maillog.report(envelope_id, tag, folder, name))


def report_queued(report_id: str, source: str, size: int) -> None:
    """A report queued to be mailed (requeue.py): its own take line, from <>, naming the
    report it carries (``ID.TAG.bsmtp``, as the report's line of its envelope says), so its
    later ``to=`` lines lead back to the mail it reports on."""
    maillog.emit(maillog.taken(f"{report_id}.1", "", size, 1, source, os.getuid()))


def concluded(envelope_id: str, plan: Plan) -> None:
    """Where the attempt left the envelope."""
    due = None if plan.due is None else iso(plan.due)
    maillog.emit(maillog.concluded(envelope_id, plan.state.value, len(plan.retries), due))
