"""The fate of an envelope through one delivery attempt, pure: what each result means for its
recipient, who is not tried because the destination is dead, which destinations die, who
expires, which reports are written (per NOTIFY), when each recipient is tried again and where
the envelope goes next.

``Fate`` is one decision object per attempt with a thin driver (attempt.py), in the manner of
dnspython's ``_Resolution``: the driver asks ``todo`` whom to send a transaction to, delivers,
hands the results to ``tried``; at the end it asks ``settle`` for the expiries and reports,
writes them, and asks ``conclude`` for the whole ``Plan`` (next attempts, next folder). The
driver writes the journal lines, reports, records and moves. ``now``, the moment of each step
and the random draws are parameters; nothing here reads a clock, a file or the network, and
the record is read, never written: every change is a value (``Rcpt``) the driver applies.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from spoolsmtp.model.config import RetryConfig
from spoolsmtp.model.envelope import Envelope, Notify, Recipient, Ret, Transaction
from spoolsmtp.model.outcome import RecipientResult, Status
from spoolsmtp.model.record import (
    FINAL,
    QUEUED,
    RcptRecord,
    RcptStatus,
    Record,
    State,
    iso,
    parse_iso,
)
from spoolsmtp.model.reply import Reply, make
from spoolsmtp.policy import retry
from spoolsmtp.policy.dsn import Item, Kind, report_tag

UNREACHABLE = "4.4.1"  # no host of the destination answered (RFC 3463)
_FOLDER = {State.DONE: "done", State.DEFERRED: "deferred", State.HELD: "hold"}


@dataclass(frozen=True, slots=True)
class Rcpt:
    """One recipient's fields in the result record as the fate leaves them (``RcptRecord``'s,
    with the reply typed)."""

    tx: int
    address: str
    status: RcptStatus
    reply: Reply | None
    host: str | None
    attempts: int
    first_attempt_at: str | None
    last_attempt_at: str | None
    next_attempt_at: str | None
    possible_duplicate: bool
    reported: bool
    decided_locally: bool
    dsn_relayed: bool

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @classmethod
    def of(cls, tx: int, rec: RcptRecord) -> Rcpt:
        return cls(
            tx,
            rec.address,
            rec.status,
            rec.reply,
            rec.host,
            rec.attempts,
            rec.first_attempt_at,
            rec.last_attempt_at,
            rec.next_attempt_at,
            rec.possible_duplicate,
            rec.reported,
            rec.decided_locally,
            rec.dsn_relayed,
        )

    def apply(self, rec: RcptRecord) -> None:
        """Write these fields into the recipient's record."""
        rec.status = self.status
        rec.reply = self.reply
        rec.host = self.host
        rec.attempts = self.attempts
        rec.first_attempt_at = self.first_attempt_at
        rec.last_attempt_at = self.last_attempt_at
        rec.next_attempt_at = self.next_attempt_at
        rec.possible_duplicate = self.possible_duplicate
        rec.reported = self.reported
        rec.decided_locally = self.decided_locally
        rec.dsn_relayed = self.dsn_relayed


@dataclass(frozen=True, slots=True)
class Counts:
    """What to add to the worker's counters (stats.py)."""

    delivered: int = 0
    failed: int = 0
    deferred: int = 0
    possible_duplicates: int = 0


@dataclass(frozen=True, slots=True)
class Todo:
    """Whom of a transaction to send to now; ``not_tried``: the deferrals of recipients whose
    destination is dead (they go to ``tried`` with the others' results)."""

    alive: tuple[Recipient, ...]
    not_tried: tuple[RecipientResult, ...]

    def __bool__(self) -> bool:
        return bool(self.alive or self.not_tried)


@dataclass(frozen=True, slots=True)
class DeadMark:
    """A destination none of whose hosts answered: not tried again before ``until``."""

    key: str
    until: datetime


@dataclass(frozen=True, slots=True)
class Tried:
    """What one transaction's results decide: each result's recipient (in the order of the
    results; the final ones are journaled), the destinations to mark dead, the counters."""

    recipients: tuple[Rcpt, ...]
    dead: tuple[DeadMark, ...]
    counts: Counts
    delivered: bool


@dataclass(frozen=True, slots=True)
class Report:
    """One delivery report to write (dsn.delivery_report) about one transaction.

    ``marks``: the recipients it reports, marked reported (in the journal, in the commit that
    records the report) once it is written; none for a delay warning."""

    transaction: Transaction
    kind: Kind
    tag: str
    items: tuple[Item, ...]
    marks: tuple[Rcpt, ...]
    arrival: datetime
    now: datetime
    retry_until: datetime

    @property
    def sender(self) -> str:
        return self.transaction.mail_from

    @property
    def full(self) -> bool:
        return self.transaction.params.ret is Ret.FULL

    @property
    def envid(self) -> str | None:
        return self.transaction.params.envid


@dataclass(frozen=True, slots=True)
class Reporting:
    """The reports to write, in order; then ``settled``: the failed recipients no report names
    (NOTIFY without FAILURE), marked reported all the same; ``warned``: a delay warning was due
    now (the record says so from now on, whether or not anyone wanted one)."""

    reports: tuple[Report, ...]
    settled: tuple[Rcpt, ...]
    warned: bool


@dataclass(frozen=True, slots=True)
class Settled:
    """The attempt's verdicts that are written before the envelope moves on: the ``expired``
    recipients fail, then ``reporting`` is written."""

    expired: tuple[Rcpt, ...]
    reporting: Reporting

    @property
    def counts(self) -> Counts:
        return Counts(failed=len(self.expired))


@dataclass(frozen=True, slots=True)
class Plan(Settled):
    """Where one attempt leaves the envelope, in the order the driver carries it out:
    ``expired`` recipients fail, ``reporting`` is written, the ``retries`` (every recipient
    not final) get their next attempt, and the envelope goes to ``folder`` (``state``).
    ``due``: the first next attempt (None when done); it is scheduled then unless held."""

    retries: tuple[Rcpt, ...]
    state: State
    due: datetime | None

    @property
    def folder(self) -> str:
        return _FOLDER[self.state]


def wants(rcpt: Recipient, what: Notify, *, default: bool) -> bool:
    """Whether NOTIFY asks for this kind of report (no NOTIFY: ``default``, which is failures
    and delays only)."""
    if rcpt.notify is None:
        return default
    return what in rcpt.notify


def not_tried(rcpt: Recipient, key: str) -> RecipientResult:
    """The deferral of a recipient whose destination is dead."""
    reply = make(451, UNREACHABLE, f"destination {key} not answering; not tried")
    return RecipientResult(rcpt, Status.DEFERRED, reply, local=True)


def unreachable(results: Sequence[RecipientResult]) -> bool:
    """None of the destination's hosts answered (a dead destination's own deferrals, with no
    host, do not keep it dead)."""
    return all(
        r.status is Status.DEFERRED and r.reply.enhanced == UNREACHABLE and r.host is not None
        for r in results
    )


class Fate:
    """The decisions of one attempt on one envelope. ``destination`` names a recipient
    domain's destination (route.Destination.key)."""

    def __init__(
        self,
        record: Record,
        env: Envelope,
        now: datetime,
        cfg: RetryConfig,
        destination: Callable[[str], str],
    ) -> None:
        self.record = record
        self.env = env
        self.now = now
        self.cfg = cfg
        self.destination = destination
        self.received = parse_iso(record.received_at)
        self._changed: dict[tuple[int, str], Rcpt] = {}
        self._written = list(record.reports)
        self._settled: Settled | None = None

    def rcpt(self, tx: int, address: str) -> Rcpt:
        """A recipient as the fate has it now: changed here, else as the record says."""
        found = self._changed.get((tx, address))
        return found if found is not None else Rcpt.of(tx, self.record.find(tx, address))

    def _change(self, rcpt: Rcpt) -> Rcpt:
        self._changed[rcpt.tx, rcpt.address] = rcpt
        return rcpt

    def _final(self, tx: int, address: str) -> bool:
        found = self._changed.get((tx, address))
        if found is not None:
            return found.final
        return self.record.find(tx, address).final

    # -- one transaction -------------------------------------------------------------------

    def todo(self, tx: Transaction, dead: Mapping[str, float], at: datetime) -> Todo:
        """The recipients of ``tx`` not yet final, split by whether their destination is dead
        at ``at`` in ``dead`` (destination key -> until, seconds since the epoch)."""
        moment = at.timestamp()
        alive: list[Recipient] = []
        skipped: list[RecipientResult] = []
        for r in tx.recipients:
            if self._final(tx.number, r.address):
                continue
            key = self.destination(r.domain)
            if dead.get(key, 0.0) > moment:
                skipped.append(not_tried(r, key))
            else:
                alive.append(r)
        return Todo(tuple(alive), tuple(skipped))

    def tried(self, tx: Transaction, results: Sequence[RecipientResult], at: datetime) -> Tried:
        """What the results of ``tx`` (those of ``todo``'s ``not_tried`` included) decide;
        ``at``: when they came (a dead destination stays dead from then on)."""
        stamp = iso(self.now)
        changed: list[Rcpt] = []
        delivered = failed = deferred = duplicates = 0
        for res in results:
            old = self.rcpt(tx.number, res.recipient.address)
            # tried: a server was reached, or the recipient's fate is decided (not a deferral
            # before any server answered, nor a dead destination's)
            tried = res.host is not None or res.status is not Status.DEFERRED
            first, last = old.first_attempt_at, old.last_attempt_at
            if tried:
                first, last = first or stamp, stamp
            new = self._change(
                Rcpt(  # not dataclasses.replace: this runs for every recipient
                    old.tx,
                    old.address,
                    RcptStatus(res.status.value),
                    res.reply,
                    None if res.local else res.host or old.host,
                    old.attempts + tried,
                    first,
                    last,
                    None,
                    old.possible_duplicate or res.after_dot,
                    old.reported,
                    res.local,
                    res.dsn_relayed,
                )
            )
            changed.append(new)
            duplicates += res.after_dot
            if res.status is Status.DELIVERED:
                delivered += 1
            elif res.status is Status.FAILED:
                failed += 1
            else:
                deferred += 1
        counts = Counts(delivered, failed, deferred, duplicates)
        return Tried(tuple(changed), self._dead(results, at), counts, delivered > 0)

    def _dead(self, results: Sequence[RecipientResult], at: datetime) -> tuple[DeadMark, ...]:
        """A destination none of whose hosts could be reached is backed off as a whole."""
        if self.cfg.dead_destination <= 0:
            return ()
        by_dest: dict[str, list[RecipientResult]] = {}
        for res in results:
            by_dest.setdefault(self.destination(res.recipient.domain), []).append(res)
        span = timedelta(seconds=self.cfg.dead_destination)
        return tuple(DeadMark(k, at + span) for k, group in by_dest.items() if unreachable(group))

    # -- the end of the attempt ------------------------------------------------------------

    def settle(self) -> Settled:
        """Expiry, then the reports (decided once; ``conclude`` includes them). The driver
        writes these before it asks ``conclude``: an operator's HOLD may come meanwhile."""
        if self._settled is None:
            expired = self._expire()
            self._settled = Settled(expired, self.reports())
        return self._settled

    def conclude(self, *, hold: bool, rng: random.Random) -> Plan:
        """The whole plan: what ``settle`` decided, then every recipient not final gets its
        next attempt and the envelope its next folder. ``hold``: the operator asked to hold
        the envelope after this attempt; ``rng`` draws the spread of each backoff."""
        settled = self.settle()
        retries: list[Rcpt] = []
        whens: list[datetime] = []
        for current in self._all():
            if not current.final:
                tries = max(current.attempts, 1)
                when = retry.next_attempt(self.received, tries, self.now, self.cfg, rng.random())
                status = RcptStatus.DEFERRED if current.status == QUEUED else current.status
                retries.append(
                    self._change(replace(current, next_attempt_at=iso(when), status=status))
                )
                whens.append(when)
        if not retries:
            state, due = State.DONE, None
        else:
            state = State.HELD if hold else State.DEFERRED
            due = parse_iso(iso(min(whens)))  # as the record says it: to the millisecond
        return Plan(settled.expired, settled.reporting, tuple(retries), state, due)

    def _expire(self) -> tuple[Rcpt, ...]:
        """After ``max_age`` every recipient not final fails, with the last reply it had."""
        if not retry.expired(self.received, self.now, self.cfg):
            return ()
        expire = retry.expiry_reply
        return tuple(
            self._change(replace(c, status=RcptStatus.FAILED, reply=expire(c.reply, self.cfg)))
            for c in self._all()
            if not c.final
        )

    def reports(self) -> Reporting:
        """The reports the recipients' states call for, per NOTIFY: a failure report for the
        failed ones not yet reported, a success report for the delivered ones whose next hop
        does not report (``dsn_relayed``), and once, after ``warning_age``, a delay warning
        for those not final. Each gets its own tag (dsn.report_tag). Asked once: alone (a
        quarantine, whose failures the record already holds) or through ``settle``."""
        warn = retry.warning_due(self.received, self.now, self.cfg, self.record.warned)
        out: list[Report] = []
        for tx in self.env.transactions:
            recs = {r.address: self.rcpt(tx.number, r.address) for r in tx.recipients}
            failed: list[Recipient] = []
            succeeded: list[Recipient] = []
            delayed: list[Recipient] = []
            for r in tx.recipients:
                c = recs[r.address]
                if c.status == "failed" and not c.reported:
                    if wants(r, Notify.FAILURE, default=True):
                        failed.append(r)
                elif c.status == "delivered" and not c.reported:
                    # dsn_relayed: the next hop reports, not us
                    if not c.dsn_relayed and wants(r, Notify.SUCCESS, default=False):
                        succeeded.append(r)
                elif not c.final and tx.mail_from and wants(r, Notify.DELAY, default=True):
                    # not for a null sender (a report): it could only go to deadletter/
                    delayed.append(r)
            for kind, rcpts in ((Kind.FAILURE, failed), (Kind.SUCCESS, succeeded)):
                if rcpts:
                    marks = tuple(replace(recs[r.address], reported=True) for r in rcpts)
                    out.append(self._report(tx, kind, rcpts, recs, marks))
                    for mark in marks:
                        recs[mark.address] = self._change(mark)
            if warn and delayed:
                out.append(self._report(tx, Kind.DELAY, delayed, recs, ()))
        settled = [
            self._change(replace(current, reported=True))
            for current in self._all()
            if current.status == "failed" and not current.reported
        ]
        return Reporting(tuple(out), tuple(settled), warn)

    def _report(
        self,
        tx: Transaction,
        kind: Kind,
        rcpts: list[Recipient],
        recs: dict[str, Rcpt],
        marks: tuple[Rcpt, ...],
    ) -> Report:
        tag = report_tag(tx.number, kind, self._written)
        self._written.append(tag)
        items = tuple(item(r, recs[r.address]) for r in rcpts)
        until = self.received + timedelta(seconds=self.cfg.max_age)
        return Report(tx, kind, tag, items, marks, self.received, self.now, until)

    def _all(self) -> list[Rcpt]:
        return [
            self.rcpt(t.number, r.address) for t in self.record.transactions for r in t.recipients
        ]


def item(rcpt: Recipient, current: Rcpt) -> Item:
    """One recipient as a delivery report names it."""
    last = parse_iso(current.last_attempt_at) if current.last_attempt_at is not None else None
    return Item(
        rcpt.address, current.reply, current.host, rcpt.orcpt, last, current.decided_locally
    )
