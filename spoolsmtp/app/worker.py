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
import functools
import logging
import signal
from datetime import UTC, datetime
from typing import Any

from spoolsmtp.app import eventloop, mailevents, reconfig, sdnotify
from spoolsmtp.app.actions import Actions
from spoolsmtp.app.adoption import Adoption
from spoolsmtp.app.attempt import Attempts
from spoolsmtp.app.host import Serving, Summary
from spoolsmtp.app.pickup import Pickup
from spoolsmtp.app.records import Records
from spoolsmtp.app.recovery import Recovery
from spoolsmtp.app.requeue import Requeue
from spoolsmtp.app.scheduler import Scheduler
from spoolsmtp.bsmtp import writer
from spoolsmtp.control import metricshttp
from spoolsmtp.control.port import COUNTED, NoSuchEnvelope, Reloaded, Traffic
from spoolsmtp.control.server import ControlServer
from spoolsmtp.control.tracer import Kind as TraceKind
from spoolsmtp.control.tracer import Tracer
from spoolsmtp.delivery.deliverer import Deliverer
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.delivery.route import Destination
from spoolsmtp.model import exitcodes
from spoolsmtp.model.config import Config
from spoolsmtp.model.envelope import Envelope, MailParams, Recipient
from spoolsmtp.model.record import Record, State
from spoolsmtp.model.stats import Stats
from spoolsmtp.spool import crashpoint, diskfull, intake, journal, legacy, quarantine, spoolview
from spoolsmtp.spool.folders import ORIGINAL, SUFFIX, Spool
from spoolsmtp.spool.journal import Journal, Replayed
from spoolsmtp.spool.lock import SpoolBusy
from spoolsmtp.spool.nodes import Adopted
from spoolsmtp.spool.nodes import lock as node_lock
from spoolsmtp.spool.quarantine import Reads
from spoolsmtp.spool.watcher import IncomingWatcher

log = logging.getLogger("spoolsmtp")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Worker:
    """The service machine: one per node of a spool (``node``: default ``worker.host_id``;
    ``adopt``: look for dead nodes to adopt at start and every rescan, see adoption.py)."""

    def __init__(self, cfg: Config, node: str | None = None, adopt: bool = True) -> None:
        self.cfg = cfg
        self.node = cfg.worker.host_id if node is None else node
        self._adopting = adopt
        self.spool = Spool(cfg.spool, node=self.node)
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
            warn=log.warning,
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
        self._attempts = Attempts(self)
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
        self.requeue = Requeue(self)
        self.adoption = Adoption(self, self.recovery, self.pickup, self.scheduler)

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT or ``stop``; return the exit code (75 if another worker
        holds the spool)."""
        lock = node_lock(self.cfg.spool, self.node)
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
        loop.add_signal_handler(signal.SIGHUP, self._hangup)
        # the sockets first: a socket the worker cannot open stops it (78) before any mail is
        # touched, so such a stop is never taken for a crash while an envelope was read
        self._metrics = await self._metrics_server()  # a port it cannot bind stops it too
        self._control = self._control_server()
        await self._control.start()
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
        watcher = self._intake()
        background = [
            asyncio.create_task(self.pickup.run()),
            asyncio.create_task(self.scheduler.run()),
            asyncio.create_task(self.pickup.housekeeping()),
            asyncio.create_task(self.records.checkpoints()),
            asyncio.create_task(self.disk.run(self.journal.commit)),
            asyncio.create_task(self.adoption.run(sweep=self._adopting)),  # dead nodes' work
        ]
        log.info("ready")
        sdnotify.ready()
        watchdog = asyncio.create_task(sdnotify.watchdog())  # pings until the very end
        await self._stopping.wait()
        sdnotify.stopping()
        log.info("stopping: %d envelope(s) in flight", len(self._active))
        if watcher is not None:
            watcher.stop()
        await self._control.close()
        if self._metrics is not None:
            await self._metrics.close()
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
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        watchdog.cancel()
        log.info("stopped")
        return 0

    async def _metrics_server(self) -> metricshttp.MetricsEndpoint | None:
        """The Prometheus endpoint (``metrics.listen``); a delivery process has none."""
        return await metricshttp.serve(self)

    def _control_server(self) -> Serving:
        """What serves the operators (a delivery process of a supervisor: its link to it)."""
        return ControlServer(self, self.cfg.control_socket, self.cfg.operator_socket)

    def _intake(self) -> IncomingWatcher | None:
        """Start what feeds the worker: the deferred queue and the watcher of incoming/ (a
        delivery process of a supervisor is fed by it instead: child.py)."""
        self.recovery.load_deferred()
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
        return watcher

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

    def reload(self) -> Reloaded:
        return self.actions.reload()

    def _hangup(self) -> None:
        reconfig.on_hangup(self.reload)

    def dead_destinations(self) -> dict[str, float]:
        return self.actions.dead_destinations()

    async def adopt(self, node: str) -> Adopted:
        return await self.adoption.adopt(node)

    async def bounce(self, envelope_id: str, uid: int) -> str:
        return await self.actions.bounce(envelope_id, uid)

    async def delete(self, envelope_id: str, uid: int, *, report: bool) -> str:
        return await self.actions.delete(envelope_id, uid, report=report)

    def reboot(self, uid: int) -> None:
        self.actions.reboot(uid)

    # -- what else the control port reads (port.py) ----------------------------------------

    def destination_key(self, domain: str) -> str:
        return self._destination(domain).key

    def traffic(self) -> Traffic:
        d, r = self.deliverer.stats, self.resolver.stats
        return Traffic(
            d.connections, d.reused, d.tls, d.bytes_sent, r.lookups, r.cache_hits, r.queries
        )

    async def folder_counts(self) -> dict[str, int]:
        return await self._folder_counts.counts()

    @functools.cached_property
    def _folder_counts(self) -> spoolview.FolderCounts:
        return spoolview.FolderCounts({name: self.spool.dirs[name] for name in COUNTED})

    async def result(self, envelope_id: str) -> dict[str, Any]:
        found = await spoolview.result(self.spool.path("results", f"{envelope_id}.json"))
        if found is None:
            raise NoSuchEnvelope(envelope_id)
        return found

    # -- one attempt -----------------------------------------------------------------------

    def _summarise(self, record: Record, state: State, next_attempt: float | None = None) -> None:
        self.index[record.id] = Summary.of(record, state, next_attempt, self._destination)

    async def _attempt(
        self, envelope_id: str, env: Envelope, record: Record, data: bytes | None
    ) -> None:
        await self._attempts.run(envelope_id, env, record, data)

    def _destination(self, domain: str) -> Destination:
        return self.deliverer.router.destination(domain)

    # -- reports ---------------------------------------------------------------------------

    async def _reports(
        self, envelope_id: str, env: Envelope, record: Record, received: datetime, now: datetime
    ) -> None:
        await self._attempts.reports(envelope_id, env, record, now)

    async def _send_report(
        self,
        envelope_id: str,
        tag: str,
        sender: str,
        message: bytes,
        *,
        then: list[dict[str, Any]] | None = None,
    ) -> None:
        """Write a report as a Batch SMTP envelope: to bounces/ (and, with requeue, queued
        for delivery: requeue.py), or to deadletter/ when the original sender was null.
        ``then``: journal records committed with the one that says the report was written."""
        name = f"{envelope_id}.{tag}{SUFFIX}"
        if sender:
            # a UTF-8 sender's report goes with SMTPUTF8, or our own reader refuses it
            params = MailParams(smtputf8=not sender.isascii())
            data = writer.render(
                [writer.Draft("", (Recipient(sender),), message, params)], self.cfg.helo_name
            )
            folder = "bounces"
            self.stats.reports += 1
        else:
            data = writer.render(
                [writer.Draft("", (Recipient(f"postmaster@{self.cfg.helo_name}"),), message)],
                self.cfg.helo_name,
            )
            folder = "deadletter"
            self.stats.deadletters += 1
        crashpoint.reach("writing_bounce")
        await self.spool.write(folder, name, data)
        self._spool_trace(f"{envelope_id}: report {tag} written to {folder}/{name}")
        mailevents.report(envelope_id, tag, folder, name)
        requeue = bool(sender) and self.cfg.bounces.requeue
        queued = await self.requeue.queue(envelope_id, tag, sender, data) if requeue else None
        assert self.journal is not None
        # the report first: a torn commit that kept only it makes a duplicate report, never
        # a lost one (marks without their report would let the next one take its name)
        self.journal.append({"t": "report", "id": envelope_id, "kind": tag})
        for rec in then or ():
            self.journal.append(rec)
        await self.journal.commit()
        crashpoint.reach("report_committed")
        if queued is not None:
            self.requeue.due(queued)

    # -- tracing ---------------------------------------------------------------------------

    def _resolver_trace(self, text: str) -> None:
        self.tracer.emit(TraceKind.RESOLVER, text)

    def _session_trace(self, text: str) -> None:
        self.tracer.emit(TraceKind.SESSION, text)

    def _spool_trace(self, text: str) -> None:
        self.tracer.emit(TraceKind.SPOOL, text)
