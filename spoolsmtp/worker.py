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
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from spoolsmtp import (
    crashpoint,
    diskfull,
    durable,
    envfile,
    eventloop,
    exitcodes,
    intake,
    journal,
    legacy,
    quarantine,
    reconfig,
    response,
    spoolview,
    writer,
)
from spoolsmtp.attempt import Attempts
from spoolsmtp.config import Config
from spoolsmtp.config import load as config_load
from spoolsmtp.control import ControlServer
from spoolsmtp.delivery import Deliverer
from spoolsmtp.dsn import batch_report
from spoolsmtp.envelope import Envelope, MailParams, Recipient
from spoolsmtp.errors import EnvelopeFault
from spoolsmtp.journal import Journal, Replayed
from spoolsmtp.mx import MxResolver
from spoolsmtp.port import COUNTED, NoSuchEnvelope, Reloaded, Traffic
from spoolsmtp.quarantine import QUARANTINE_AFTER, Reads
from spoolsmtp.record import (
    RcptRecord,
    Record,
    State,
    TxRecord,
    iso,
    parse_iso,
)
from spoolsmtp.route import Destination
from spoolsmtp.spool import ORIGINAL, SUFFIX, NotRegular, Spool
from spoolsmtp.spoollock import SpoolBusy, SpoolLock
from spoolsmtp.stats import Stats
from spoolsmtp.tracer import Kind as TraceKind
from spoolsmtp.tracer import Tracer
from spoolsmtp.watcher import IncomingWatcher

log = logging.getLogger("spoolsmtp")
ANNOUNCE_AFTER = 0.5
CHECKPOINT_INTERVAL = 1.0
BURST_RESCAN = 0.25
INLINE_READ_BYTES = 256 * 1024
PUT_BACK_MAX = 300.0


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
        self._names: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._ignored: set[str] = set()
        self._refused: set[str] = set()
        self._unconvertible: dict[str, str] = {}
        intake.quiet_lease_breaks()
        self._rescan_handle: asyncio.TimerHandle | None = None
        self._legacy = legacy.needed(cfg.spool)
        self._slots = asyncio.Semaphore(cfg.spool.max_active)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._dead: dict[str, float] = {}
        self._active: dict[str, str] = {}
        self._watcher: IncomingWatcher | None = None
        self._attempts = Attempts(self)
        self._announcing: dict[str, tuple[float, Record]] = {}
        self._announce_timer: asyncio.TimerHandle | None = None
        self._putbacks: dict[str, int] = {}
        spool_dirs = [self.spool.dirs["journal"], *self.spool.dirs.values()]
        self.disk = diskfull.DiskWatch(
            spool_dirs,
            cfg.spool.min_free_space,
            cfg.spool.min_free_inodes,
            self.stats,
            self.resume_work,
        )

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT or ``stop``; return the exit code (75 if another worker
        holds the spool)."""
        lock = SpoolLock([self.spool.dirs["active"], self.spool.dirs["journal"]])
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
                await self._convert(envelope_id, source)
            else:
                await self.spool.move_file(
                    "active", f"{envelope_id}{ORIGINAL}", "active", f"{envelope_id}{SUFFIX}"
                )
        active = self.spool.ids("active")
        restored = await asyncio.to_thread(self._restore_records, replayed, set(active))
        self.journal = Journal(self.spool.dirs["journal"], self.spool.batch)
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
            self._spawn(self._resume(envelope_id, replayed.get(envelope_id, Replayed())))
        self._load_deferred()
        self._control = ControlServer(self, self.cfg.control_socket, self.cfg.operator_socket)
        await self._control.start()
        self._watcher = IncomingWatcher(
            self.spool.dirs["incoming"],
            self.cfg.spool.settle_seconds,
            self._found,
            known=self._known,
            refused=self._refuse,
        )
        self._watcher.start()
        self._watcher.rescan()
        background = [
            asyncio.create_task(self._intake()),
            asyncio.create_task(self._scheduler()),
            asyncio.create_task(self._housekeeping()),
            asyncio.create_task(self._checkpoints()),
            asyncio.create_task(self.disk.run(self.journal.commit)),
        ]
        log.info("ready")
        await self._stopping.wait()
        log.info("stopping: %d envelope(s) in flight", len(self._active))
        self._watcher.stop()
        await self._control.close()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await self._drain()
        await self._reads.stopped(self.spool.ids("active"))
        await self.deliverer.close_all()
        try:
            await self._checkpoint()
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

    # -- intake ----------------------------------------------------------------------------

    def _known(self, name: str) -> bool:
        return name in self._queued or name in self._ignored

    def _found(self, name: str) -> None:
        if not self._known(name):
            self._queued.add(name)
            self._names.put_nowait(name)

    async def _intake(self) -> None:
        while True:
            name = await self._names.get()
            if self._names.empty():
                self._rescan_soon()
            await self._resumed.wait()
            await self.disk.ok.wait()
            await self._slots.acquire()
            self._spawn(self._take(name))

    def _rescan_soon(self) -> None:
        """After a burst, look at incoming/ again: the kernel drops inotify events when its
        queue overflows, and watchdog does not say so to its handlers."""
        if self._rescan_handle is None:
            loop = asyncio.get_running_loop()
            self._rescan_handle = loop.call_later(BURST_RESCAN, self._burst_rescan)

    def _burst_rescan(self) -> None:
        self._rescan_handle = None
        if self._watcher is not None and not self.suspended and not self._stopping.is_set():
            self._watcher.rescan()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(min(self.cfg.spool.rescan_interval, self.cfg.delivery.idle_timeout))
            if self._watcher is not None and not self.suspended:
                self._ignored.clear()
                self._refused = {n for n in self._refused if self._in_incoming(n)}
                self._watcher.rescan()
            await self.deliverer.close_idle()

    async def _take(self, name: str) -> None:
        assert self.journal is not None and self._reads is not None
        try:
            envelope_id = self.spool.choose_id(name)
            if envelope_id is not None:
                self._reads.mark(envelope_id)
                # committed by the same batch, before the rename: a restart knows the name
                self.journal.append({"t": "claim", "id": envelope_id, "name": name})
                suffix = ORIGINAL if self._legacy else SUFFIX
                try:
                    claimed = await self._claim(name, envelope_id, suffix)
                except intake.Busy:  # its writer's close (or a rescan) brings it back
                    claimed = False
                    log.debug("incoming/%s is open for writing; not taken", intake.shown(name))
                if not claimed:
                    self._reads.forget(envelope_id)
                    self.journal.finished(envelope_id)
                    return
        finally:
            self._queued.discard(name)
        if envelope_id is None:
            if self._in_incoming(name):
                self._ignored.add(name)
                self._refuse(name, "it is not a regular file")
            return
        self.stats.files_taken += 1
        self._active[envelope_id] = name
        if self.tracer.on(TraceKind.SPOOL):
            self._spool_trace(f"{name}: claimed as {envelope_id}")
        crashpoint.reach("after_claim")
        try:
            if self._legacy and not await self._convert(envelope_id, name):
                return
            loaded = await self._read(envelope_id, name)
            if loaded is None:
                return
            env, data = loaded
            record = self._new_record(envelope_id, name, env)
            await self._batch_outputs(envelope_id, env, record, Replayed())
            self._announce(record)
            await self._attempt(envelope_id, env, record, data)
        except Exception as exc:
            self._put_back(envelope_id, exc)
        finally:
            self._active.pop(envelope_id, None)

    async def _claim(self, name: str, envelope_id: str, suffix: str) -> bool:
        """``Spool.claim``; a claim that failed (a full disk) but whose rename was done is a
        claim (the envelope is in active/ and goes on), one that was not is no claim."""
        try:
            return await self.spool.claim(name, envelope_id, suffix)
        except OSError:
            if self.spool.path("active", f"{envelope_id}{suffix}").exists():
                return True
            self._finished(envelope_id)
            raise

    def _in_incoming(self, name: str) -> bool:
        return os.path.lexists(self.spool.path("incoming", name))

    def _refuse(self, name: str, why: str) -> None:
        """A name in incoming/ that is never taken: logged and counted once (again only if
        it leaves and comes back)."""
        if name not in self._refused:
            self._refused.add(name)
            self.stats.files_refused += 1
            log.warning("incoming/%s is left alone: %s", intake.shown(name), why)

    async def _convert(self, envelope_id: str, source: str) -> bool:
        """Legacy files (EBCDIC, padded records) become UTF-8 text once, right after the claim."""
        try:
            await self.spool.convert(
                envelope_id, lambda src, dst: legacy.convert_file(src, dst, self.cfg.spool)
            )
        except (UnicodeError, OSError, NotRegular) as exc:
            orig = f"{envelope_id}{ORIGINAL}"
            await self.spool.move_file("active", orig, "active", f"{envelope_id}{SUFFIX}")
            reason = f"{source}:1: cannot convert: {exc}"
            if self.journal is None:  # at start: rejected by the resume that follows
                self._unconvertible[envelope_id] = reason
                return False
            await self._reject(envelope_id, source, reason)
            return False
        return True

    async def _read(self, envelope_id: str, source: str) -> tuple[Envelope, bytes | None] | None:
        """Read an envelope in active/; a file that is not one goes to rejected/.

        A small file is read whole, on the loop, and its bytes are kept for delivery (one
        open, one read); a large one is streamed in a thread, and delivery reads the file."""
        limits, hostname = self.cfg.limits, self.cfg.helo_name
        max_bytes = self.cfg.spool.max_file_bytes
        assert self._reads is not None
        if envelope_id in self._unconvertible:
            await self._reject(envelope_id, source, self._unconvertible.pop(envelope_id))
            return None
        # the phase records around the read (quarantine.py); a journal failure there is not
        # the envelope's fault, so it is outside the try
        async with self._reads.reading(envelope_id):
            crashpoint.reach("reading")
            try:
                await self.spool.make_own(envelope_id)  # what is read and sent is ours from here
                opened = self.spool.open_envelope("active", envelope_id, whole=INLINE_READ_BYTES)
                if isinstance(opened, bytes):
                    return envfile.read_bytes(opened, source, limits, hostname, max_bytes), opened
                with opened:
                    env = await asyncio.to_thread(
                        intake.checked,
                        envfile.read_stream,
                        opened,
                        source,
                        limits,
                        hostname,
                        max_bytes,
                    )
                    return env, None
            except (EnvelopeFault, NotRegular, OSError) as exc:
                if diskfull.machine_fault(exc):
                    raise  # a full disk is not the envelope's fault: it is put back
                fault = exc
        await self._reject(envelope_id, source, intake.why_not_read(source, fault))
        return None

    async def _reject(
        self, envelope_id: str, source: str, reason: str, record: Record | None = None
    ) -> None:
        name = intake.rejected_name(envelope_id, source)
        text = (reason + "\n").encode("utf-8", "surrogateescape")  # the name's own bytes
        await self.spool.write("rejected", f"{name}.reason", text)
        now = utcnow()
        record = record or Record(envelope_id, source, State.REJECTED, iso(now), iso(now))
        record.state = State.REJECTED
        record.reason = reason
        record.location = f"rejected/{name}"
        record.updated_at = iso(now)
        await self._write_record(record)
        await self.spool.move(envelope_id, "active", "rejected", name)
        self.index.pop(envelope_id, None)
        self.stats.files_rejected += 1
        self._spool_trace(f"{source}: rejected ({reason})")
        log.warning("%s rejected: %s", source, reason)
        self._finished(envelope_id)

    def _new_record(self, envelope_id: str, source: str, env: Envelope) -> Record:
        now = iso(utcnow())
        record = Record(
            envelope_id, source, State.ACTIVE, now, now, f"active/{envelope_id}{SUFFIX}"
        )
        record.batch_errors = response.error_lines(env)
        for tx in env.transactions:
            record.transactions.append(
                TxRecord(tx.number, tx.mail_from, [RcptRecord(r.address) for r in tx.recipients])
            )
        return record

    async def _batch_outputs(
        self, envelope_id: str, env: Envelope, record: Record, replayed: Replayed
    ) -> None:
        """The batch response (VERB ON) and the batch error report, once per envelope."""
        if env.verbose:
            await self.spool.write(
                "results", f"{envelope_id}.response", response.render(env).encode()
            )
        rendered = response.render(env) if env.errors else ""
        for tag, sender, errors in response.batch_reports(env):
            if tag in record.reports or tag in replayed.reports:
                continue
            message = batch_report(
                hostname=self.cfg.helo_name,
                envelope_id=envelope_id,
                source=record.source,
                sender=sender or "",
                errors=errors,
                response=rendered,
                now=utcnow(),
            )
            await self._send_report(envelope_id, tag, sender or "", message)
            record.reports.append(tag)

    # -- resuming and retrying -------------------------------------------------------------

    async def _open(
        self, envelope_id: str, fallback_source: str, journaled: Record | None = None
    ) -> tuple[Envelope, Record, bytes | None] | None:
        """Read an envelope in active/ with its record (the journal's newest, else the file,
        else rebuilt from the envelope); None if rejected.

        The record is set to say ``active`` at once: a record left saying ``done`` or
        ``deferred`` while the envelope is being delivered again would mislead a polling job.
        """
        record = journaled or self._load_record(envelope_id)
        source = record.source if record else fallback_source
        self._active[envelope_id] = source
        loaded = await self._read(envelope_id, source)
        if loaded is None:
            return None
        env, data = loaded
        record = record or self._new_record(envelope_id, source, env)
        record.state = State.ACTIVE
        record.location = f"active/{envelope_id}{SUFFIX}"
        return env, record, data

    async def _resume(self, envelope_id: str, replayed: Replayed) -> None:
        try:
            journaled = Record.from_dict(replayed.record) if replayed.record else None
            fallback = replayed.source or f"{envelope_id}{SUFFIX}"
            assert self._reads is not None
            crashes = self._reads.crashes(envelope_id)
            if crashes > QUARANTINE_AFTER:
                # even the read for the reports killed it: quarantine it unread
                unread = journaled or self._load_record(envelope_id)
                if unread is not None:
                    self._apply_journal(unread, replayed)
                await self._quarantine(envelope_id, unread, fallback, crashes)
                return
            opened = await self._open(envelope_id, fallback, journaled)
            if opened is None:
                return
            env, record, data = opened
            record.crashes = crashes
            self._apply_journal(record, replayed)
            if crashes == QUARANTINE_AFTER:
                await self._quarantine(envelope_id, record, record.source, crashes, env)
                return
            await self._write_record(record)
            await self._batch_outputs(envelope_id, env, record, replayed)
            await self._attempt(envelope_id, env, record, data)
        except Exception as exc:
            self._put_back(envelope_id, exc)
        finally:
            self._active.pop(envelope_id, None)

    async def _quarantine(
        self,
        envelope_id: str,
        record: Record | None,
        source: str,
        crashes: int,
        env: Envelope | None = None,
    ) -> None:
        """Reading it killed the worker ``crashes`` times: fail what is left, tell the senders
        (if it could be read once more: ``env``), and move it to rejected/."""
        if record is not None:
            record.crashes = crashes
            self.stats.failed += quarantine.fail_unfinished(record, crashes)
            source = record.source
        if record is not None and env is not None:
            now = utcnow()
            await self._reports(envelope_id, env, record, parse_iso(record.received_at), now)
        self.stats.quarantined += 1
        reason = quarantine.reason(source, crashes, read=env is not None)
        await self._reject(envelope_id, source, reason, record)

    def _apply_journal(self, record: Record, replayed: Replayed) -> None:
        for (tx, address), result in replayed.results.items():
            with contextlib.suppress(KeyError):
                rec = record.find(tx, address)
                for key, value in result.items():
                    setattr(rec, key, value)
        for tx, address in replayed.dots:
            with contextlib.suppress(KeyError):
                rec = record.find(tx, address)
                if not rec.final:
                    rec.possible_duplicate = True
                    self.stats.possible_duplicates += 1
        # a recipient's ``reported`` comes back with its result: it is journaled in the same
        # commit as the report that named it
        for kind in replayed.reports:
            if kind not in record.reports:
                record.reports.append(kind)

    def _restore_records(self, replayed: dict[str, Replayed], active: set[str]) -> int:
        """Before anything else at start: put back every result record the journal holds
        that the file system lost or left stale (written after the last checkpoint, then a
        crash). Envelopes still in active/ are not touched: resuming rewrites theirs."""
        restored = 0
        folder = self.spool.dirs["results"]
        for envelope_id, entry in replayed.items():
            if entry.record is None or envelope_id in active:
                continue
            path = folder / f"{envelope_id}.json"
            try:
                current = json.loads(path.read_bytes())
            except (OSError, ValueError):
                current = None
            if current != entry.record:
                durable.write_file(path, Record.from_dict(entry.record).to_json(), sync_dir=False)
                restored += 1
        if restored:
            durable.fsync_dir(folder)
            log.warning("restored %d result record(s) from the journal", restored)
        return restored

    def _load_record(self, envelope_id: str) -> Record | None:
        try:
            return Record.from_json(self.spool.path("results", f"{envelope_id}.json").read_bytes())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _load_deferred(self) -> None:
        for envelope_id in self.spool.ids("deferred"):
            record = self._load_record(envelope_id)
            due = time.time()
            if record is not None:
                times = [
                    parse_iso(r.next_attempt_at).timestamp()
                    for _, r in record.recipients()
                    if not r.final and r.next_attempt_at
                ]
                due = min(times, default=due)
                self._summarise(record, State.DEFERRED, due)
            self.schedule(envelope_id, due)
        for envelope_id in self.spool.ids("hold"):
            record = self._load_record(envelope_id)
            if record is not None:
                self._summarise(record, State.HELD)

    def schedule(self, envelope_id: str, when: float) -> None:
        summary = self.index.get(envelope_id)
        if summary is not None:
            summary.next_attempt = when
        self._due[envelope_id] = when
        heapq.heappush(self._heap, (when, envelope_id))
        self._wake.set()

    async def _scheduler(self) -> None:
        while True:
            self._wake.clear()
            now = time.time()
            halted = self.suspended or self.disk.full
            while self._heap and self._heap[0][0] <= now and not halted:
                when, envelope_id = heapq.heappop(self._heap)
                if self._due.get(envelope_id) != when:
                    continue
                del self._due[envelope_id]
                await self._slots.acquire()
                self._spawn(self._retry(envelope_id))
            # suspended, due retries wait for RESUME (which wakes us), not for a timer: with a
            # past due time that would be a busy loop
            waiting = self._heap and not halted
            delay = self._heap[0][0] - now if waiting else 3600.0
            # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that
            # arrives as the event is set, and the scheduler then outlived SIGTERM
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(delay, 3600.0))):
                    await self._wake.wait()

    async def _retry(self, envelope_id: str) -> None:
        put_back = envelope_id in self._putbacks
        try:
            if not (put_back and self.spool.envelope("active", envelope_id).exists()):
                put_back = False
                await self.spool.move(envelope_id, "deferred", "active")
        except FileNotFoundError:
            return
        except OSError as exc:
            self._put_back(envelope_id, exc)
            return
        summary = self.index.get(envelope_id)
        if summary is not None:
            summary.state = State.ACTIVE
        try:
            known = await self._known_of(envelope_id) if put_back else None
            journaled = Record.from_dict(known.record) if known and known.record else None
            source = known.source if known and known.source else f"{envelope_id}{SUFFIX}"
            opened = await self._open(envelope_id, source, journaled)
            if opened is None:
                return
            env, record, data = opened
            if known is not None:
                self._apply_journal(record, known)
                await self._write_record(record)
                await self._batch_outputs(envelope_id, env, record, known)
            self._announce(record)
            await self._attempt(envelope_id, env, record, data)
        except Exception as exc:
            self._put_back(envelope_id, exc)
        finally:
            self._active.pop(envelope_id, None)

    def _put_back(self, envelope_id: str, exc: BaseException) -> None:
        """The work on an envelope failed (a full disk, EIO, a bug): it is logged once per
        episode and tried again with backoff, and only once there is room, from what the
        journal knows of it (so a recipient a server accepted is not sent again)."""
        self.disk.failed(exc, f"envelope {envelope_id}")
        tries = self._putbacks.get(envelope_id, 0) + 1
        self._putbacks[envelope_id] = tries
        self.schedule(envelope_id, time.time() + min(2.0**tries, PUT_BACK_MAX))

    async def _known_of(self, envelope_id: str) -> Replayed:
        """What the journal knows of an envelope put back; its pending records are written
        first (the commit fails while they cannot be)."""
        assert self.journal is not None
        await self.journal.commit()
        known = self.journal.known(envelope_id)
        if known is None:
            everything = await asyncio.to_thread(journal.replay, self.spool.dirs["journal"])
            known = everything.get(envelope_id, Replayed())
        return known

    def resume_work(self) -> None:
        """There is room again: due retries (and put-back envelopes) start at once."""
        self._wake.set()

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

    def _finished(self, envelope_id: str) -> None:
        self._putbacks.pop(envelope_id, None)
        if self.journal is not None:
            self.journal.finished(envelope_id)

    async def _write_record(
        self, record: Record, move_to: str | None = None, *, durable: bool = False
    ) -> None:
        """Commit the record to the journal, then replace the file with it and move the
        envelope out of active/ to ``move_to``, in one batch. The file is synced later, by a
        checkpoint: until then the journal restores it after a crash."""
        assert self.journal is not None
        self._announced(record.id)
        data = record.to_json()
        self.journal.append_record(record.id, data)
        await self.spool.conclude(record.id, data, move_to, durable=durable)

    def _announce(self, record: Record) -> None:
        """The record that says an envelope is being delivered, written once it has been
        active for ``ANNOUNCE_AFTER`` (most are finished sooner, and their first record is the
        final one: writing one that is replaced a few milliseconds later costs a file created
        and a file freed per envelope, which is what slows a busy spool down the most).

        Pending announcements wait in taking order (so the oldest is first) under one timer
        set for the oldest, not a timer each."""
        loop = asyncio.get_running_loop()
        self._announcing[record.id] = (loop.time() + ANNOUNCE_AFTER, record)
        if self._announce_timer is None:
            self._announce_timer = loop.call_later(ANNOUNCE_AFTER, self._announce_due)

    def _announce_due(self) -> None:
        """Write the records of envelopes active for ``ANNOUNCE_AFTER`` by now; wait for the
        next."""
        self._announce_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._announcing:
            envelope_id, (due, record) = next(iter(self._announcing.items()))
            if due > now:
                self._announce_timer = loop.call_at(due, self._announce_due)
                return
            del self._announcing[envelope_id]
            self._write_quick(record)

    def _announced(self, envelope_id: str) -> None:
        """A newer record is about to be written: the pending announcement is void."""
        self._announcing.pop(envelope_id, None)

    def _write_quick(self, record: Record) -> None:
        """Atomic, not journaled (the envelope rebuilds it); at once, in the loop's thread: a
        write queued to the I/O lanes could land after the final record."""
        if record.state is State.ACTIVE:
            try:
                self.spool.write_quick("results", f"{record.id}.json", record.to_json())
            except OSError as exc:  # a timer callback: it must not die of a full disk
                self.disk.failed(exc, f"results/{record.id}.json")

    async def _journal(self, rec: dict[str, Any]) -> None:
        assert self.journal is not None
        self.journal.append(rec)
        await self.journal.commit()

    async def _checkpoints(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            try:
                await self._checkpoint()
            except OSError as exc:
                self.disk.failed(exc, "checkpoint")

    async def _checkpoint(self) -> None:
        """Sync what finished envelopes wrote, then drop their journal segments."""
        assert self.journal is not None
        await asyncio.to_thread(self.journal.checkpoint, self.spool.unsynced())

    # -- operator actions (the control channel) ---------------------------------------------

    async def hold(self, envelope_id: str) -> str:
        """Move a deferred envelope to hold/ (an active one goes there after its attempt)."""
        summary = self.index.get(envelope_id)
        if summary is None:
            raise LookupError(f"no queued envelope {envelope_id}")
        if summary.state is State.HELD:
            return f"{envelope_id} is already held"
        if summary.state is State.ACTIVE:
            self._hold_after.add(envelope_id)
            return f"{envelope_id} is being delivered; it will be held after this attempt"
        self._due.pop(envelope_id, None)
        try:
            await self.spool.move(envelope_id, "deferred", "hold")
        except FileNotFoundError:
            self._hold_after.add(envelope_id)
            return f"{envelope_id} is being delivered; it will be held after this attempt"
        await self._restate(envelope_id, State.HELD, "hold")
        summary.state, summary.next_attempt = State.HELD, None
        self._spool_trace(f"{envelope_id}: held by operator")
        return f"{envelope_id} held"

    async def release(self, envelope_id: str) -> str:
        """Move a held envelope back to deferred/ and try it at once."""
        summary = self.index.get(envelope_id)
        if summary is None:
            raise LookupError(f"no queued envelope {envelope_id}")
        if envelope_id in self._hold_after:
            self._hold_after.discard(envelope_id)
            return f"{envelope_id} will not be held after all"
        if summary.state is not State.HELD:
            return f"{envelope_id} is not held ({summary.state.value})"
        await self.spool.move(envelope_id, "hold", "deferred")
        await self._restate(envelope_id, State.DEFERRED, "deferred")
        summary.state = State.DEFERRED
        self.schedule(envelope_id, time.time())
        self._spool_trace(f"{envelope_id}: released by operator")
        return f"{envelope_id} released"

    async def _restate(self, envelope_id: str, state: State, folder: str) -> None:
        record = self._load_record(envelope_id)
        if record is not None:
            record.state = state
            record.location = f"{folder}/{envelope_id}{SUFFIX}"
            record.updated_at = iso(utcnow())
            await self._write_record(record)
            self._finished(envelope_id)

    def flush(self, envelope_id: str | None = None, destination: str | None = None) -> int:
        """Retry deferred envelopes now: one, those for a destination, or all."""
        if envelope_id is not None and envelope_id not in self.index:
            raise LookupError(f"no queued envelope {envelope_id}")
        now = time.time()
        count = 0
        for summary in list(self.index.values()):
            if summary.state is not State.DEFERRED:
                continue
            if envelope_id is not None and summary.id != envelope_id:
                continue
            if destination is not None and not self._matches(summary, destination):
                continue
            self.schedule(summary.id, now)
            count += 1
        if destination is not None:
            self._dead.pop(self._destination(destination).key, None)
        elif envelope_id is None:
            self._dead.clear()
        return count

    def _matches(self, summary: Summary, destination: str) -> bool:
        return self._destination(destination).key in summary.destinations

    def expire(self, domain: str) -> bool:
        """Forget cached DNS answers (and the dead-destination mark) for a domain."""
        self._dead.pop(self._destination(domain).key, None)
        return self.resolver.expire(domain)

    def suspend(self) -> None:
        self.suspended = True
        self._resumed.clear()

    def resume(self) -> None:
        self.suspended = False
        self._resumed.set()
        self._wake.set()

    def reload(self) -> Reloaded:
        """Read the config file again and apply every key that can change while running; the
        others keep their value until a restart, and the answer names them (reconfig.py). A
        bad file raises ConfigError and changes nothing."""
        plan = reconfig.plan(self.cfg, config_load(self.cfg.source))
        if plan.renew_resolver:
            resolver = reconfig.renewed_resolver(self.resolver, plan.config)
            self.resolver = self.deliverer.resolver = resolver
        self.cfg = plan.config
        self.deliverer.reconfigure(plan.config)
        self.disk.min_free_space = plan.config.spool.min_free_space
        self.disk.min_free_inodes = plan.config.spool.min_free_inodes
        log.info("%s", plan.done.summary)
        return plan.done

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

    def dead_destinations(self) -> dict[str, float]:
        now = time.time()
        return {k: v for k, v in self._dead.items() if v > now}

    # -- tracing ---------------------------------------------------------------------------

    def _resolver_trace(self, text: str) -> None:
        self.tracer.emit(TraceKind.RESOLVER, text)

    def _session_trace(self, text: str) -> None:
        self.tracer.emit(TraceKind.SESSION, text)

    def _spool_trace(self, text: str) -> None:
        self.tracer.emit(TraceKind.SPOOL, text)
