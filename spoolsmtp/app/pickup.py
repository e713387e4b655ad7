"""Pickup: names found in incoming/ become claimed, read envelopes in active/ (Postfix's pickup).

The watcher reports names; each is claimed (journaled, then renamed into active/ by ``Spool``),
converted if legacy, read, and handed to the worker's attempt. A file that is not an envelope
goes to rejected/ with its reason; a name never to be taken is logged once (``refuse``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from spoolsmtp.app import inbound, mailevents
from spoolsmtp.app.records import Records
from spoolsmtp.bsmtp import response
from spoolsmtp.control.tracer import Kind as TraceKind
from spoolsmtp.model.envelope import Envelope
from spoolsmtp.model.errors import EnvelopeFault
from spoolsmtp.model.record import RcptRecord, Record, State, TxRecord, iso
from spoolsmtp.policy.dsn import batch_report
from spoolsmtp.spool import crashpoint, diskfull, envfile, intake, legacy
from spoolsmtp.spool.folders import ORIGINAL, SUFFIX, NotRegular
from spoolsmtp.spool.journal import Replayed
from spoolsmtp.spool.watcher import IncomingWatcher

if TYPE_CHECKING:
    from spoolsmtp.app.host import WorkerHost

log = logging.getLogger("spoolsmtp")
BURST_RESCAN = 0.25
INLINE_READ_BYTES = 256 * 1024


def utcnow() -> datetime:
    return datetime.now(UTC)


class Pickup:
    """Intake of incoming/ and the reading (or rejecting) of envelopes in active/.

    ``worker``: the assembly, for what it shares (config, spool, stats, journal, slots) and
    for the attempt that follows a read."""

    def __init__(self, worker: WorkerHost, records: Records) -> None:
        self._w = worker
        self._records = records
        self.watcher: IncomingWatcher | None = None
        self._names: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._ignored: set[str] = set()
        self._refused: set[str] = set()
        self._unconvertible: dict[str, str] = {}
        self._rescan_handle: asyncio.TimerHandle | None = None

    # -- names -----------------------------------------------------------------------------

    def known(self, name: str) -> bool:
        return name in self._queued or name in self._ignored

    def found(self, name: str) -> None:
        if not self.known(name):
            self._queued.add(name)
            self._names.put_nowait(name)

    async def run(self) -> None:
        w = self._w
        while True:
            name = await self._names.get()
            if self._names.empty() and self.watcher is not None and self.watcher.may_miss:
                self._rescan_soon()
            await w._resumed.wait()
            await w.disk.ok.wait()
            await w._slots.acquire()
            w._spawn(self._take(name))

    def _rescan_soon(self) -> None:
        """After a burst, look at incoming/ again, where the watcher may miss events unsaid
        (watchdog's observer does not pass on an overflow of the kernel's queue)."""
        if self._rescan_handle is None:
            loop = asyncio.get_running_loop()
            self._rescan_handle = loop.call_later(BURST_RESCAN, self._burst_rescan)

    def _burst_rescan(self) -> None:
        self._rescan_handle = None
        w = self._w
        if self.watcher is not None and not w.suspended and not w._stopping.is_set():
            self.watcher.rescan()

    async def housekeeping(self) -> None:
        w = self._w
        while True:
            await asyncio.sleep(min(w.cfg.spool.rescan_interval, w.cfg.delivery.idle_timeout))
            if self.watcher is not None and not w.suspended:
                self._ignored.clear()
                self._refused = {n for n in self._refused if self._in_incoming(n)}
                self.watcher.rescan()
            await w.deliverer.close_idle()

    # -- taking one ------------------------------------------------------------------------

    async def _take(self, name: str) -> None:
        w = self._w
        assert w.journal is not None and w._reads is not None
        try:
            envelope_id = w.spool.choose_id(name)
            if envelope_id is not None:
                w._reads.mark(envelope_id)
                # committed by the same batch, before the rename: a restart knows the name
                claim = {"t": "claim", "id": envelope_id, "name": name}
                w.journal.append(claim | inbound.claim_owner(w.spool.file("incoming", name)))
                suffix = ORIGINAL if w._legacy else SUFFIX
                try:
                    claimed = await self._claim(name, envelope_id, suffix)
                except intake.Busy:  # its writer's close (or a rescan) brings it back
                    claimed = False
                    log.debug("incoming/%s is open for writing; not taken", intake.shown(name))
                if not claimed:
                    w._reads.forget(envelope_id)
                    w.journal.finished(envelope_id)
                    return
                # its owner, before a conversion or a copy makes it the worker's
                owner = inbound.owner_of(w.spool.file("active", f"{envelope_id}{suffix}"))
        finally:
            self._queued.discard(name)
        if envelope_id is None:
            if self._in_incoming(name):
                self._ignored.add(name)
                self.refuse(name, "it is not a regular file")
            return
        w.stats.files_taken += 1
        w._active[envelope_id] = name
        if w.tracer.on(TraceKind.SPOOL):
            w._spool_trace(f"{name}: claimed as {envelope_id}")
        crashpoint.reach("after_claim")
        try:
            if w._legacy and not await self.convert(envelope_id, name):
                return
            loaded = await self.read(envelope_id, name, owner)
            if loaded is None:
                return
            env, data = loaded
            record = self.new_record(envelope_id, name, env)
            mailevents.taken(envelope_id, name, env, record, owner[0] if owner else None)
            await self.batch_outputs(envelope_id, env, record, Replayed())
            self._records.announce(record)
            await w._attempt(envelope_id, env, record, data)
        except Exception as exc:
            w.scheduler.put_back(envelope_id, exc)
        finally:
            w._active.pop(envelope_id, None)

    async def _claim(self, name: str, envelope_id: str, suffix: str) -> bool:
        """``Spool.claim``; a claim that failed is no claim: its records are done with."""
        try:
            return await self._w.spool.claim(name, envelope_id, suffix)
        except OSError:
            self._records.finished(envelope_id)
            raise

    def _in_incoming(self, name: str) -> bool:
        return os.path.lexists(self._w.spool.path("incoming", name))

    def refuse(self, name: str, why: str) -> None:
        """A name in incoming/ that is never taken: logged and counted once (again only if
        it leaves and comes back)."""
        if name not in self._refused:
            self._refused.add(name)
            self._w.stats.files_refused += 1
            log.warning("incoming/%s is left alone: %s", intake.shown(name), why)

    async def convert(self, envelope_id: str, source: str) -> bool:
        """Legacy files (EBCDIC, padded records) become UTF-8 text once, right after the claim."""
        w = self._w
        try:
            await w.spool.convert(
                envelope_id, lambda src, dst: legacy.convert_file(src, dst, w.cfg.spool)
            )
        except (UnicodeError, OSError, NotRegular) as exc:
            if diskfull.machine_fault(exc):
                raise  # a full disk is not the file's fault: it stays .orig, put back
            orig = f"{envelope_id}{ORIGINAL}"
            await w.spool.move_file("active", orig, "active", f"{envelope_id}{SUFFIX}")
            reason = f"{source}:1: cannot convert: {exc}"
            if w.journal is None:  # at start: rejected by the resume that follows
                self._unconvertible[envelope_id] = reason
                return False
            await self.reject(envelope_id, source, reason)
            return False
        return True

    # -- reading ---------------------------------------------------------------------------

    async def read(
        self, envelope_id: str, source: str, owner: tuple[int, int] | None = None
    ) -> tuple[Envelope, bytes | None] | None:
        """Read an envelope in active/; a file that is not one, or whose owner may not submit,
        goes to rejected/. ``owner``: who submitted it, when known from before (the record,
        the journal); else the file's owner (inbound.py).

        A small file is read whole, on the loop, and its bytes are kept for delivery (one
        open, one read); a large one is streamed in a thread, and delivery reads the file."""
        w = self._w
        limits, hostname = w.cfg.limits, w.cfg.helo_name
        max_bytes = w.cfg.spool.max_file_bytes
        assert w._reads is not None
        if envelope_id in self._unconvertible:
            await self.reject(envelope_id, source, self._unconvertible.pop(envelope_id))
            return None
        # the phase records around the read (quarantine.py); a journal failure there is not
        # the envelope's fault, so it is outside the try
        async with w._reads.reading(envelope_id):
            crashpoint.reach("reading")
            try:
                who = inbound.submitter(w, envelope_id, source, owner)
                # what is read and sent is ours from here
                opened = await w.spool.open_own(envelope_id, whole=INLINE_READ_BYTES)
                opened = await inbound.unwrapped(w, envelope_id, source, opened)
                local = inbound.unqualified(w)
                data: bytes | None
                if isinstance(opened, bytes):
                    env = envfile.read_bytes(opened, source, limits, hostname, max_bytes, local)
                    data = opened
                else:
                    with opened:
                        env = await asyncio.to_thread(
                            intake.checked,
                            envfile.read_stream,
                            opened,
                            source,
                            limits,
                            hostname,
                            max_bytes,
                            local,
                        )
                    data = None
                env, data = await inbound.rewritten(w, envelope_id, source, env, data, who)
                return inbound.screened(w, env, who), data
            except (EnvelopeFault, NotRegular, OSError) as exc:
                if diskfull.machine_fault(exc):
                    raise  # a full disk is not the envelope's fault: it is put back
                fault = exc
        await self.reject(envelope_id, source, intake.why_not_read(source, fault))
        return None

    async def reject(
        self, envelope_id: str, source: str, reason: str, record: Record | None = None
    ) -> None:
        w = self._w
        name = intake.rejected_name(envelope_id, source)
        text = (reason + "\n").encode("utf-8", "surrogateescape")  # the name's own bytes
        await w.spool.write("rejected", f"{name}.reason", text)
        now = utcnow()
        record = record or Record(envelope_id, source, State.REJECTED, iso(now), iso(now))
        record.state = State.REJECTED
        record.reason = reason
        record.location = f"rejected/{name}"
        record.updated_at = iso(now)
        await self._records.write(record)
        await w.spool.move(envelope_id, "active", "rejected", name)
        w.index.pop(envelope_id, None)
        w.stats.files_rejected += 1
        w._spool_trace(f"{source}: rejected ({reason})")
        mailevents.rejected(envelope_id, source, reason)  # a warning, in the mail log's shape
        self._records.finished(envelope_id)

    def new_record(self, envelope_id: str, source: str, env: Envelope) -> Record:
        now = iso(utcnow())
        record = Record(
            envelope_id,
            source,
            State.ACTIVE,
            now,
            now,
            self._w.spool.location("active", envelope_id),
        )
        record.batch_errors = response.error_lines(env)
        if env.owner is not None:
            record.owner_uid, record.owner_gid = env.owner
        for tx in env.transactions:
            record.transactions.append(
                TxRecord(tx.number, tx.mail_from, [RcptRecord(r.address) for r in tx.recipients])
            )
        return record

    async def batch_outputs(
        self, envelope_id: str, env: Envelope, record: Record, replayed: Replayed
    ) -> None:
        """The batch response (VERB ON) and the batch error report, once per envelope."""
        w = self._w
        if env.verbose:
            await w.spool.write("results", f"{envelope_id}.response", response.render(env).encode())
        rendered = response.render(env) if env.errors else ""
        for tag, sender, errors in response.batch_reports(env):
            if tag in record.reports or tag in replayed.reports:
                continue
            message = batch_report(
                hostname=w.cfg.helo_name,
                envelope_id=envelope_id,
                source=record.source,
                sender=sender or "",
                errors=errors,
                response=rendered,
                now=utcnow(),
            )
            await w._send_report(envelope_id, tag, sender or "", message)
            record.reports.append(tag)
