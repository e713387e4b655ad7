"""The worker: takes envelopes from the spool, delivers them, retries, reports, survives crashes.

Life of an envelope (each arrow a rename done by ``Spool``, each state durable before the next):

    incoming/NAME -> active/ID.bsmtp -> done/ID.bsmtp        (every recipient final)
                                     -> deferred/ID.bsmtp -> active/ID.bsmtp ...  (retries)
                                     -> rejected/ID.NAME      (not an envelope; quarantined)

``results/ID.json`` says where it is and how every recipient fared. While an envelope is in
``active/`` each recipient's final reply is committed to the journal before the worker moves
on, so a restart resumes from the journal and never sends again to a recipient a server
accepted (apart from the RFC 5321 section 6.1 window, counted as ``possible_duplicates``).
Anything found in ``active/`` at start is an interrupted attempt: it is resumed, and an envelope
that the worker died reading three times in a row is quarantined in ``rejected/`` (quarantine.py).

The worker assembles the parts and drives the attempt: ``Pickup`` (incoming/ to a read
envelope), ``Recovery`` (resume from the journal), ``Scheduler`` (retries, put-backs),
``Records`` (result records, journal commits, checkpoints) and ``Actions`` (the operator's).
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from spoolsmtp import (
    crashpoint,
    diskfull,
    envfile,
    eventloop,
    exitcodes,
    intake,
    journal,
    legacy,
    quarantine,
    retry,
    writer,
)
from spoolsmtp.actions import Actions
from spoolsmtp.config import Config
from spoolsmtp.control import ControlServer
from spoolsmtp.delivery import Deliverer
from spoolsmtp.dsn import Item, Kind, delivery_report, report_tag
from spoolsmtp.envelope import Envelope, MailParams, Notify, Recipient, Ret, Transaction
from spoolsmtp.journal import Journal, Replayed
from spoolsmtp.mx import MxResolver
from spoolsmtp.outcome import RecipientResult, Status
from spoolsmtp.pickup import Pickup
from spoolsmtp.quarantine import Reads
from spoolsmtp.record import (
    QUEUED,
    RcptRecord,
    RcptStatus,
    Record,
    State,
    iso,
    parse_iso,
    reply_dict,
)
from spoolsmtp.records import Records
from spoolsmtp.recovery import Recovery
from spoolsmtp.reply import make
from spoolsmtp.route import Destination
from spoolsmtp.scheduler import Scheduler
from spoolsmtp.spool import ORIGINAL, SUFFIX, Spool
from spoolsmtp.spoollock import SpoolBusy, SpoolLock
from spoolsmtp.stats import Stats
from spoolsmtp.tracer import Kind as TraceKind
from spoolsmtp.tracer import Tracer
from spoolsmtp.watcher import IncomingWatcher

log = logging.getLogger("spoolsmtp")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Summary:
    """What the operator sees of a queued envelope, kept in memory (QUERY reads only this)."""

    id: str
    source: str
    state: State
    received: float
    next_attempt: float | None = None
    destinations: dict[str, int] = field(default_factory=dict)


class Worker:
    """The service machine: one per spool."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.spool = Spool(cfg.spool)
        self.stats = Stats()
        self.tracer = Tracer()
        self.index: dict[str, Summary] = {}
        self._hold_after: set[str] = set()
        self.resolver = MxResolver(
            cfg.dns,
            cfg.delivery.max_addresses,
            cfg.delivery.port,
            trace=self._resolver_trace,
            tracing=lambda: self.tracer.on(TraceKind.RESOLVER),
        )
        self.deliverer = Deliverer(
            cfg,
            self.resolver,
            trace=self._session_trace,
            tracing=lambda: self.tracer.on(TraceKind.SESSION),
        )
        self.journal: Journal | None = None
        self._reads: Reads | None = None
        self.suspended = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        intake.quiet_lease_breaks()
        self._legacy = legacy.needed(cfg.spool)
        self._slots = asyncio.Semaphore(cfg.spool.max_active)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._dead: dict[str, float] = {}
        self._active: dict[str, str] = {}
        self._random = random.Random()
        spool_dirs = [self.spool.dirs["journal"], *self.spool.dirs.values()]
        self.disk = diskfull.DiskWatch(
            spool_dirs,
            cfg.spool.min_free_space,
            cfg.spool.min_free_inodes,
            self.stats,
            self.resume_work,
        )
        putbacks: dict[str, int] = {}
        self.records = Records(self.spool, self.disk, putbacks)
        self.pickup = Pickup(self, self.records)
        self.recovery = Recovery(self, self.records, self.pickup)
        self.scheduler = Scheduler(self, self.records, self.recovery, self.pickup, putbacks)
        self.actions = Actions(self, self.records, self.recovery, self.scheduler)

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT or ``stop``; return the exit code (75 if another worker
        holds the spool)."""
        lock = SpoolLock(self.cfg.spool.path)
        try:
            lock.acquire()
        except SpoolBusy as exc:
            log.error("%s", exc)
            return exitcodes.TEMPFAIL
        try:
            return await self._run()
        finally:
            lock.release()

    async def _run(self) -> int:
        diskfull.check_writable(self.spool.dirs.values())
        self.spool.ensure()
        replayed = journal.replay(self.spool.dirs["journal"])
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        for envelope_id in self.spool.unconverted():
            if self._legacy:
                source = replayed.get(envelope_id, Replayed()).source or envelope_id
                await self.pickup.convert(envelope_id, source)
            else:
                await self.spool.move_file(
                    "active", f"{envelope_id}{ORIGINAL}", "active", f"{envelope_id}{SUFFIX}"
                )
        active = self.spool.ids("active")
        restored = await asyncio.to_thread(self.recovery.restore_records, replayed, set(active))
        self.journal = Journal(self.spool.dirs["journal"], self.spool.batch)
        self.records.journal = self.journal
        self.journal.adopt(set(active))
        self._reads = Reads(self.journal, quarantine.assess(replayed, active))
        log.info(
            "starting: %d to resume, %d result records restored from the journal, spool %s,"
            " event loop %s",
            len(active),
            restored,
            self.cfg.spool.path,
            eventloop.name_of(loop),
        )
        for envelope_id in active:
            await self._slots.acquire()
            self._spawn(self.recovery.resume(envelope_id, replayed.get(envelope_id, Replayed())))
        self.recovery.load_deferred()
        self._control = ControlServer(self, self.cfg.control_socket, self.cfg.operator_socket)
        await self._control.start()
        watcher = IncomingWatcher(
            self.spool.dirs["incoming"],
            self.cfg.spool.settle_seconds,
            self.pickup.found,
            known=self.pickup.known,
            refused=self.pickup.refuse,
        )
        self.pickup.watcher = watcher
        watcher.start()
        watcher.rescan()
        background = [
            asyncio.create_task(self.pickup.run()),
            asyncio.create_task(self.scheduler.run()),
            asyncio.create_task(self.pickup.housekeeping()),
            asyncio.create_task(self.records.checkpoints()),
            asyncio.create_task(self.disk.run(self.journal.commit)),
        ]
        log.info("ready")
        await self._stopping.wait()
        log.info("stopping: %d envelope(s) in flight", len(self._active))
        watcher.stop()
        await self._control.close()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await self._drain()
        await self._reads.stopped(self.spool.ids("active"))
        await self.deliverer.close_all()
        try:
            await self.records.checkpoint()
        except OSError as exc:  # the journal redoes what is not synced
            self.disk.failed(exc, "checkpoint")
        self.journal.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopped")
        return 0

    def stop(self) -> None:
        """Stop taking files, let transactions in flight finish, persist, exit."""
        self._stopping.set()

    async def _drain(self) -> None:
        pending = [t for t in self._tasks if not t.done()]
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=self.cfg.shutdown_timeout)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=10)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.disk.failed(exc, "taking a file")

    # -- the parts (each owns one region; the attempt calls back through these) -------------

    async def _write_record(
        self, record: Record, move_to: str | None = None, *, durable: bool = False
    ) -> None:
        await self.records.write(record, move_to, durable=durable)

    def _finished(self, envelope_id: str) -> None:
        self.records.finished(envelope_id)

    async def _journal(self, rec: dict[str, Any]) -> None:
        await self.records.journal_commit(rec)

    def schedule(self, envelope_id: str, when: float) -> None:
        self.scheduler.schedule(envelope_id, when)

    def resume_work(self) -> None:
        """There is room again: due retries (and put-back envelopes) start at once."""
        self.scheduler.resume_work()

    # -- operator actions (the control channel; see actions.py) -----------------------------

    async def hold(self, envelope_id: str) -> str:
        return await self.actions.hold(envelope_id)

    async def release(self, envelope_id: str) -> str:
        return await self.actions.release(envelope_id)

    def flush(self, envelope_id: str | None = None, destination: str | None = None) -> int:
        return self.actions.flush(envelope_id, destination)

    def expire(self, domain: str) -> bool:
        return self.actions.expire(domain)

    def suspend(self) -> None:
        self.actions.suspend()

    def resume(self) -> None:
        self.actions.resume()

    def reload(self) -> str:
        return self.actions.reload()

    def dead_destinations(self) -> dict[str, float]:
        return self.actions.dead_destinations()

    # -- one attempt -----------------------------------------------------------------------

    def _summarise(self, record: Record, state: State, next_attempt: float | None = None) -> None:
        destinations: dict[str, int] = {}
        for _, rec in record.recipients():
            if not rec.final:
                key = self._destination(rec.address.rpartition("@")[2]).key
                destinations[key] = destinations.get(key, 0) + 1
        self.index[record.id] = Summary(
            record.id,
            record.source,
            state,
            parse_iso(record.received_at).timestamp(),
            next_attempt,
            destinations,
        )

    async def _attempt(
        self, envelope_id: str, env: Envelope, record: Record, data: bytes | None
    ) -> None:
        assert self.journal is not None
        self._summarise(record, State.ACTIVE)
        now = utcnow()
        received = parse_iso(record.received_at)
        path = self.spool.envelope("active", envelope_id)
        last_delivery: float | None = None
        for tx in env.transactions:
            todo = [r for r in tx.recipients if not record.find(tx.number, r.address).final]
            if not todo:
                continue
            alive, dead = self._split_dead(todo)
            results: list[RecipientResult] = []
            if alive:

                async def journal_dot(rcpts: list[Recipient], tx: Transaction = tx) -> None:
                    await self._journal(
                        {
                            "t": "dot",
                            "id": envelope_id,
                            "tx": tx.number,
                            "rcpts": [r.address for r in rcpts],
                        }
                    )

                results = await self.deliverer.deliver(
                    path, tx, envelope_id, now, alive, before_dot=journal_dot, data=data
                )
            results += dead
            for res in results:
                rec = record.find(tx.number, res.recipient.address)
                self._note(rec, res, now)
                if rec.final:
                    self.journal.append(
                        {
                            "t": "rcpt",
                            "id": envelope_id,
                            "tx": tx.number,
                            "rcpt": rec.address,
                            "result": _final_fields(rec),
                        }
                    )
                if res.status is Status.DELIVERED:
                    last_delivery = time.time()
            await self.journal.commit()
            self._mark_dead(tx, results)
            crashpoint.reach("after_journal")
        self._expire(env, record, received, now)
        await self._reports(envelope_id, env, record, received, now)
        await self._finish(envelope_id, record, received, now, last_delivery)

    def _destination(self, domain: str) -> Destination:
        return self.deliverer.router.destination(domain)

    def _split_dead(self, todo: list[Recipient]) -> tuple[list[Recipient], list[RecipientResult]]:
        now = time.time()
        alive: list[Recipient] = []
        dead: list[RecipientResult] = []
        for r in todo:
            dest = self._destination(r.domain)
            until = self._dead.get(dest.key, 0.0)
            if until > now:
                reply = make(451, "4.4.1", f"destination {dest.key} not answering; not tried")
                dead.append(RecipientResult(r, Status.DEFERRED, reply, local=True))
            else:
                alive.append(r)
        return alive, dead

    def _mark_dead(self, tx: Transaction, results: list[RecipientResult]) -> None:
        """A destination none of whose hosts could be reached is backed off as a whole."""
        if self.cfg.retry.dead_destination <= 0:
            return
        by_dest: dict[str, list[RecipientResult]] = {}
        for res in results:
            key = self._destination(res.recipient.domain).key
            by_dest.setdefault(key, []).append(res)
        for key, group in by_dest.items():
            unreachable = all(
                r.status is Status.DEFERRED and r.reply.enhanced == "4.4.1" and r.host is not None
                for r in group
            )
            if unreachable:
                self._dead[key] = time.time() + self.cfg.retry.dead_destination

    def _note(self, rec: RcptRecord, res: RecipientResult, now: datetime) -> None:
        rec.status = RcptStatus(res.status.value)
        rec.reply = res.reply
        rec.host = None if res.local else res.host or rec.host
        rec.decided_locally = res.local
        rec.dsn_relayed = res.dsn_relayed
        tried = res.host is not None or res.status is not Status.DEFERRED
        if tried:
            rec.attempts += 1
            rec.first_attempt_at = rec.first_attempt_at or iso(now)
            rec.last_attempt_at = iso(now)
        if res.after_dot:
            rec.possible_duplicate = True
            self.stats.possible_duplicates += 1
        if res.status is Status.DELIVERED:
            self.stats.delivered += 1
        elif res.status is Status.FAILED:
            self.stats.failed += 1
        else:
            self.stats.deferred += 1
        rec.next_attempt_at = None

    def _expire(self, env: Envelope, record: Record, received: datetime, now: datetime) -> None:
        if not retry.expired(received, now, self.cfg.retry):
            return
        for _, rec in record.recipients():
            if not rec.final:
                rec.status = RcptStatus.FAILED
                rec.reply = retry.expiry_reply(rec.reply, self.cfg.retry)
                self.stats.failed += 1

    # -- reports ---------------------------------------------------------------------------

    async def _reports(
        self, envelope_id: str, env: Envelope, record: Record, received: datetime, now: datetime
    ) -> None:
        warn = retry.warning_due(received, now, self.cfg.retry, record.warned)
        for tx in env.transactions:
            recs = {r.address: record.find(tx.number, r.address) for r in tx.recipients}
            failed = [
                r
                for r in tx.recipients
                if recs[r.address].status == "failed"
                and not recs[r.address].reported
                and _wants(r, Notify.FAILURE, default=True)
            ]
            delayed = [
                r
                for r in tx.recipients
                if not recs[r.address].final and _wants(r, Notify.DELAY, default=True)
            ]
            succeeded = [
                r
                for r in tx.recipients
                if recs[r.address].status == "delivered"
                and not recs[r.address].reported
                and not recs[r.address].dsn_relayed  # the next hop reports, not us
                and _wants(r, Notify.SUCCESS, default=False)
            ]
            for kind, rcpts in ((Kind.FAILURE, failed), (Kind.SUCCESS, succeeded)):
                if rcpts:
                    await self._report(
                        envelope_id, tx, kind, rcpts, recs, received, now, record.reports
                    )
                    for r in rcpts:
                        recs[r.address].reported = True
            if warn and delayed:
                await self._report(
                    envelope_id, tx, Kind.DELAY, delayed, recs, received, now, record.reports
                )
        for _, rec in record.recipients():
            if rec.status == "failed" and not rec.reported:
                rec.reported = True
        if warn:
            record.warned = True

    async def _report(
        self,
        envelope_id: str,
        tx: Transaction,
        kind: Kind,
        rcpts: list[Recipient],
        recs: dict[str, RcptRecord],
        received: datetime,
        now: datetime,
        written: list[str],
    ) -> None:
        """Write one report and add its tag to ``written``; a failure or success report also
        marks its recipients reported in the journal, in the commit that records the report."""
        tag = report_tag(tx.number, kind, written)
        items = [_item(r, recs[r.address]) for r in rcpts]
        full = tx.params.ret is Ret.FULL
        original = await asyncio.to_thread(
            _original, self.spool.envelope("active", envelope_id), tx, full
        )
        until = received + timedelta(seconds=self.cfg.retry.max_age)
        message = delivery_report(
            kind=kind,
            hostname=self.cfg.helo_name,
            envelope_id=f"{envelope_id}.{tx.number}",
            sender=tx.mail_from,
            items=items,
            arrival=received,
            now=now,
            original=original,
            full=full,
            envid=tx.params.envid,
            retry_until=until,
            report_id=f"{envelope_id}.{tag}",
            spool_id=envelope_id,
        )
        marks = [
            {
                "t": "rcpt",
                "id": envelope_id,
                "tx": tx.number,
                "rcpt": r.address,
                "result": {**_final_fields(recs[r.address]), "reported": True},
            }
            for r in rcpts
            if kind is not Kind.DELAY
        ]
        await self._send_report(envelope_id, tag, tx.mail_from, message, then=marks)
        written.append(tag)

    async def _send_report(
        self,
        envelope_id: str,
        tag: str,
        sender: str,
        message: bytes,
        *,
        then: list[dict[str, Any]] | None = None,
    ) -> None:
        """Write a report as a Batch SMTP envelope: to bounces/ (or incoming/ with requeue),
        or to deadletter/ when the original sender was null. ``then``: journal records
        committed with the one that says the report was written."""
        name = f"{envelope_id}.{tag}{SUFFIX}"
        if sender:
            # a UTF-8 sender's report goes with SMTPUTF8, or our own reader refuses it
            params = MailParams(smtputf8=not sender.isascii())
            data = writer.render(
                [writer.Draft("", (Recipient(sender),), message, params)], self.cfg.helo_name
            )
            folder = "incoming" if self.cfg.bounces.requeue else "bounces"
            self.stats.reports += 1
        else:
            data = writer.render(
                [writer.Draft("", (Recipient(f"postmaster@{self.cfg.helo_name}"),), message)],
                self.cfg.helo_name,
            )
            folder = "deadletter"
            self.stats.deadletters += 1
        crashpoint.reach("writing_bounce")
        await self.spool.write(folder, name, data, private=folder == "incoming")
        self._spool_trace(f"{envelope_id}: report {tag} written to {folder}/{name}")
        assert self.journal is not None
        # the report first: a torn commit that kept only it makes a duplicate report, never
        # a lost one (marks without their report would let the next one take its name)
        self.journal.append({"t": "report", "id": envelope_id, "kind": tag})
        for rec in then or ():
            self.journal.append(rec)
        await self.journal.commit()

    # -- finishing -------------------------------------------------------------------------

    async def _finish(
        self,
        envelope_id: str,
        record: Record,
        received: datetime,
        now: datetime,
        last_delivery: float | None,
    ) -> None:
        pending = [rec for _, rec in record.recipients() if not rec.final]
        record.updated_at = iso(utcnow())
        record.crashes = 0
        if pending:
            for rec in pending:
                when = retry.next_attempt(
                    received, max(rec.attempts, 1), now, self.cfg.retry, self._random.random()
                )
                rec.next_attempt_at = iso(when)
                if rec.status == QUEUED:
                    rec.status = RcptStatus.DEFERRED
            due = min(
                parse_iso(r.next_attempt_at).timestamp() for r in pending if r.next_attempt_at
            )
            held = envelope_id in self._hold_after
            self._hold_after.discard(envelope_id)
            folder = "hold" if held else "deferred"
            record.state = State.HELD if held else State.DEFERRED
            record.location = f"{folder}/{envelope_id}{SUFFIX}"
            # the journal redoes a lost move to deferred/ (a crash before the next checkpoint
            # only brings the retry forward); an operator's hold is made durable at once
            await self._write_record(record, folder, durable=held)
            self._summarise(record, record.state, None if held else due)
            if not held:
                self.schedule(envelope_id, due)
            if self.tracer.on(TraceKind.SPOOL):
                self._spool_trace(
                    f"{envelope_id}: deferred until {iso(datetime.fromtimestamp(due, UTC))}"
                )
        else:
            record.state = State.DONE
            record.location = f"done/{envelope_id}{SUFFIX}"
            await self._write_record(record, "done")
            self.index.pop(envelope_id, None)
            self._hold_after.discard(envelope_id)
            self._spool_trace(f"{envelope_id}: done")
        taken = parse_iso(record.received_at).timestamp()
        self.stats.envelope_finished(None if last_delivery is None else last_delivery - taken)
        self._finished(envelope_id)

    # -- tracing ---------------------------------------------------------------------------

    def _resolver_trace(self, text: str) -> None:
        self.tracer.emit(TraceKind.RESOLVER, text)

    def _session_trace(self, text: str) -> None:
        self.tracer.emit(TraceKind.SESSION, text)

    def _spool_trace(self, text: str) -> None:
        self.tracer.emit(TraceKind.SPOOL, text)


def _wants(rcpt: Recipient, what: Notify, *, default: bool) -> bool:
    """Whether NOTIFY asks for this kind of report (no NOTIFY: failures and delays only)."""
    if rcpt.notify is None:
        return default
    return what in rcpt.notify


def _item(rcpt: Recipient, rec: RcptRecord) -> Item:
    last = parse_iso(rec.last_attempt_at) if rec.last_attempt_at is not None else None
    return Item(rcpt.address, rec.reply, rec.host, rcpt.orcpt, last, rec.decided_locally)


def _final_fields(rec: RcptRecord) -> dict[str, Any]:
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
