"""One delivery attempt on one envelope, carried out: the deliverer's results go to the fate
(fate.py), and what it decides is written here: the journal lines, the reports, the record and
the move out of ``active/``.

The order is what makes a crash harmless: each transaction's final results are committed to
the journal before the next is sent; a failure or success report is committed together with
the marks that say its recipients were reported; the record and the move come last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import random
import time
from datetime import UTC, datetime
from typing import Any

from spoolsmtp.app import mailevents
from spoolsmtp.app.host import WorkerHost
from spoolsmtp.control.tracer import Kind as TraceKind
from spoolsmtp.delivery.deliverer import PartlyDelivered
from spoolsmtp.model.envelope import Envelope, Transaction
from spoolsmtp.model.outcome import RecipientResult
from spoolsmtp.model.record import RcptRecord, Record, State, iso, parse_iso, reply_dict
from spoolsmtp.model.stats import Stats
from spoolsmtp.policy.dsn import delivery_report
from spoolsmtp.policy.fate import Counts, Fate, Plan, Report, Reporting, Tried
from spoolsmtp.spool import crashpoint, envfile
from spoolsmtp.spool.journalmark import JournalMark


def utcnow() -> datetime:
    return datetime.now(UTC)


class Attempts:
    """Runs attempts for the worker (``host``); ``random`` draws the spread of backoffs."""

    def __init__(self, host: WorkerHost) -> None:
        self.host = host
        self.random = random.Random()

    def _fate(self, record: Record, env: Envelope, now: datetime) -> Fate:
        host = self.host
        return Fate(record, env, now, host.cfg.retry, lambda domain: host._destination(domain).key)

    async def run(
        self, envelope_id: str, env: Envelope, record: Record, data: bytes | None
    ) -> None:
        """One attempt at every recipient not yet final, then the reports, the record and
        the move (to done/, deferred/ or hold/)."""
        host = self.host
        journal = host.journal
        assert journal is not None
        host._summarise(record, State.ACTIVE)
        now = utcnow()
        started = now.timestamp()
        fate = self._fate(record, env, now)
        path = host.spool.envelope("active", envelope_id)
        last_delivery: float | None = None
        for tx in env.transactions:
            todo = fate.todo(tx, host._dead, utcnow())
            if not todo:
                continue
            results: list[RecipientResult] = []
            tx_started = time.time()
            if todo.alive:
                journal_dot = functools.partial(JournalMark, journal, envelope_id, tx.number)
                try:
                    results = await host.deliverer.deliver(
                        path, tx, envelope_id, now, list(todo.alive), journal_dot, data
                    )
                except PartlyDelivered as partly:
                    # part of the transaction was decided before one delivery failed: that is
                    # journaled before the envelope is put back (the retry commits it before
                    # it reads the journal), so the retry does not send it again. A duplicate
                    # possible after a dot is counted by the retry, from its mark, not here.
                    done = partly.results
                    self._tried(
                        envelope_id, record, fate, tx, done, started, tx_started, duplicates=False
                    )
                    await journal.commit()
                    raise partly.error from None
            results += todo.not_tried
            tried = self._tried(envelope_id, record, fate, tx, results, started, tx_started)
            if tried.delivered:
                last_delivery = time.time()
            await journal.commit()
            crashpoint.reach("after_journal")
        settled = fate.settle()
        for rcpt in settled.expired:
            rcpt.apply(record.find(rcpt.tx, rcpt.address))
        mailevents.expired(host, envelope_id, record, settled.expired, started, time.time())
        count(host.stats, settled.counts)
        await self._write_reports(envelope_id, record, settled.reporting)
        plan = fate.conclude(hold=envelope_id in host._hold_after, rng=self.random)
        mailevents.concluded(envelope_id, plan)
        await self._finish(envelope_id, record, plan, last_delivery)

    def _tried(
        self,
        envelope_id: str,
        record: Record,
        fate: Fate,
        tx: Transaction,
        results: list[RecipientResult],
        started: float,
        tx_started: float,
        *,
        duplicates: bool = True,
    ) -> Tried:
        """One transaction's results: into the record, the mail log and the counters, the
        final ones appended to the journal (committed by the caller), dead destinations
        marked."""
        host = self.host
        tried = fate.tried(tx, results, at := utcnow())
        mailevents.tried(
            host,
            envelope_id,
            tx.number,
            record,
            results,
            tried.recipients,
            started,
            tx_started,
            at.timestamp(),
        )
        journal = host.journal
        assert journal is not None
        for rcpt in tried.recipients:
            rec = record.find(tx.number, rcpt.address)
            rcpt.apply(rec)
            if rec.final:
                journal.append(
                    {
                        "t": "rcpt",
                        "id": envelope_id,
                        "tx": tx.number,
                        "rcpt": rec.address,
                        "result": final_fields(rec),
                    }
                )
        counts = tried.counts
        if not duplicates:  # counted by the retry, from their marks
            counts = dataclasses.replace(counts, possible_duplicates=0)
        count(host.stats, counts)
        for mark in tried.dead:
            host._dead[mark.key] = mark.until.timestamp()
        return tried

    async def reports(self, envelope_id: str, env: Envelope, record: Record, now: datetime) -> None:
        """Write the reports the record calls for now, and nothing else (a quarantine)."""
        await self._write_reports(envelope_id, record, self._fate(record, env, now).reports())

    async def _write_reports(self, envelope_id: str, record: Record, reporting: Reporting) -> None:
        for report in reporting.reports:
            await self._report(envelope_id, record, report)
        for rcpt in reporting.settled:
            rcpt.apply(record.find(rcpt.tx, rcpt.address))
        if reporting.warned:
            record.warned = True

    async def _report(self, envelope_id: str, record: Record, report: Report) -> None:
        """Write one report and add its tag to the record; a failure or success report also
        marks its recipients reported in the journal, in the commit that records the report."""
        host = self.host
        tx = report.transaction
        original = await asyncio.to_thread(
            _original, host.spool.envelope("active", envelope_id), tx, report.full
        )
        message = delivery_report(
            kind=report.kind,
            hostname=host.cfg.helo_name,
            envelope_id=f"{envelope_id}.{tx.number}",
            sender=report.sender,
            items=list(report.items),
            arrival=report.arrival,
            now=report.now,
            original=original,
            full=report.full,
            envid=report.envid,
            retry_until=report.retry_until,
            report_id=f"{envelope_id}.{report.tag}",
            spool_id=envelope_id,
        )
        marks = [
            {
                "t": "rcpt",
                "id": envelope_id,
                "tx": tx.number,
                "rcpt": rcpt.address,
                "result": {**final_fields(record.find(tx.number, rcpt.address)), "reported": True},
            }
            for rcpt in report.marks
        ]
        await host._send_report(envelope_id, report.tag, report.sender, message, then=marks)
        record.reports.append(report.tag)
        for rcpt in report.marks:
            rcpt.apply(record.find(rcpt.tx, rcpt.address))

    async def _finish(
        self, envelope_id: str, record: Record, plan: Plan, last_delivery: float | None
    ) -> None:
        host = self.host
        for rcpt in plan.retries:
            rcpt.apply(record.find(rcpt.tx, rcpt.address))
        record.updated_at = iso(utcnow())
        record.crashes = 0
        record.state = plan.state
        record.location = host.spool.location(plan.folder, envelope_id)
        if plan.state is not State.DONE:
            assert plan.due is not None
            held = plan.state is State.HELD
            host._hold_after.discard(envelope_id)
            # the journal redoes a lost move to deferred/ (a crash before the next checkpoint
            # only brings the retry forward); an operator's hold is made durable at once
            await host._write_record(record, plan.folder, durable=held)
            due = plan.due.timestamp()
            host._summarise(record, record.state, None if held else due)
            if not held:
                host.schedule(envelope_id, due)
            if host.tracer.on(TraceKind.SPOOL):
                host._spool_trace(f"{envelope_id}: deferred until {iso(plan.due)}")
        else:
            await host._write_record(record, plan.folder)
            host.index.pop(envelope_id, None)
            host._hold_after.discard(envelope_id)
            host._spool_trace(f"{envelope_id}: done")
        taken = parse_iso(record.received_at).timestamp()
        host.stats.envelope_finished(None if last_delivery is None else last_delivery - taken)
        host._finished(envelope_id)


def count(stats: Stats, counts: Counts) -> None:
    stats.delivered += counts.delivered
    stats.failed += counts.failed
    stats.deferred += counts.deferred
    stats.possible_duplicates += counts.possible_duplicates


def final_fields(rec: RcptRecord) -> dict[str, Any]:
    """A recipient's result as the journal holds it."""
    return {
        "status": rec.status,
        "reply": reply_dict(rec.reply) if rec.reply is not None else None,
        "host": rec.host,
        "attempts": rec.attempts,
        "first_attempt_at": rec.first_attempt_at,
        "last_attempt_at": rec.last_attempt_at,
        "possible_duplicate": rec.possible_duplicate,
        "decided_locally": rec.decided_locally,
        "dsn_relayed": rec.dsn_relayed,
    }


def _original(path: Any, tx: Transaction, full: bool) -> bytes:
    """The message text to enclose in a report: whole (RET=FULL) or enough for its headers."""
    with open(path, "rb") as fh:
        if full:
            return b"".join(envfile.text_chunks(fh, tx.message))
        head = b""
        for chunk in envfile.text_chunks(fh, tx.message, chunk=64 * 1024):
            head += chunk
            if b"\r\n\r\n" in head or len(head) > 256 * 1024:
                break
        return head
