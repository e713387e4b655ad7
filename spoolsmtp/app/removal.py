"""The operator's removals (DELETE, BOUNCE) and REBOOT, on the worker's side.

DELETE is Postfix's ``postsuper -d`` and Exim's ``-Mrm``; BOUNCE is Exim's ``-Mg`` ("give
up"). Both take a queued envelope (deferred or held; one being delivered is ``Busy``) back into
active/, so no retry can start on it meanwhile, fail every recipient not yet final with a reply
that names the operator's uid, commit that to the journal, write the reports the senders are
owed (BOUNCE always, DELETE only with REPORT), and conclude the record in the same durable
order as an attempt: the record says ``done``, with a ``reason``. BOUNCE keeps the envelope in
done/; DELETE then removes the file: its record stays in results/, nothing is silently gone. A
failure half-way puts the envelope back to the scheduler, which resumes it from the journal.

REBOOT drains like SHUTDOWN and asks ``cli`` to re-execute the same command line once the
worker has released the spool (``Reboot``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from spoolsmtp.app import sdnotify
from spoolsmtp.app.attempt import final_fields
from spoolsmtp.control.port import Busy
from spoolsmtp.model.record import RcptStatus, Record, State, iso, parse_iso
from spoolsmtp.model.reply import make
from spoolsmtp.spool.durable import fsync_dir
from spoolsmtp.spool.folders import SUFFIX

if TYPE_CHECKING:
    from spoolsmtp.app.host import WorkerHost
    from spoolsmtp.app.records import Records
    from spoolsmtp.app.recovery import Recovery
    from spoolsmtp.app.scheduler import Scheduler

log = logging.getLogger("spoolsmtp")


class Removal:
    """DELETE and BOUNCE for the worker (``host``)."""

    def __init__(
        self, host: WorkerHost, records: Records, recovery: Recovery, scheduler: Scheduler
    ) -> None:
        self._w = host
        self._records = records
        self._recovery = recovery
        self._scheduler = scheduler

    async def remove(
        self, envelope_id: str, uid: int, *, report: bool, keep: bool, state: State | None = None
    ) -> str:
        """Fail what is left of a queued envelope for the operator ``uid``; ``report``: tell
        the sender; ``keep``: the envelope stays in done/ (BOUNCE), else it is removed.
        ``state``: where it is queued, when the caller knows and this worker does not (a
        supervisor's delivery process is asked of an envelope in the supervisor's queue)."""
        w = self._w
        summary = w.index.get(envelope_id)
        if state is None:
            if summary is None:
                raise LookupError(f"no queued envelope {envelope_id}")
            state = summary.state
        if state is State.ACTIVE or envelope_id in w._active:
            raise Busy(envelope_id)
        folder = "hold" if state is State.HELD else "deferred"
        self._scheduler.unschedule(envelope_id)
        try:
            await w.spool.move(envelope_id, folder, "active")
        except FileNotFoundError:  # a retry took it first
            raise Busy(envelope_id) from None
        if summary is not None:
            summary.state = State.ACTIVE
        try:
            opened = await self._recovery.open(envelope_id, f"{envelope_id}{SUFFIX}")
            if opened is None:  # unreadable now: pickup moved it to rejected/ with a reason
                return f"{envelope_id} could not be read; moved to rejected/"
            env, record, _ = opened
            verb = "deleted" if not keep else "returned to the sender"
            failed = await self._fail(record, uid, verb, reported=not report)
            if report:
                now = datetime.now(UTC)
                await w._reports(envelope_id, env, record, parse_iso(record.received_at), now)
            await self._conclude(record, uid, verb, keep=keep)
        except Exception as exc:
            w.scheduler.put_back(envelope_id, exc)  # resumed from the journal
            raise
        finally:
            w._active.pop(envelope_id, None)
        told = "the sender is told" if report else "no report"
        log.info(
            "%s: %s by the operator (uid %d): %d recipient(s) failed, %s",
            envelope_id,
            "removed" if not keep else "bounced",
            uid,
            failed,
            told,
        )
        w._spool_trace(f"{envelope_id}: {verb} by the operator (uid {uid})")
        return f"{envelope_id} {verb}: {failed} recipient(s) not delivered, {told}"

    async def _fail(self, record: Record, uid: int, verb: str, *, reported: bool) -> int:
        """Every recipient not final fails, committed to the journal; how many."""
        w = self._w
        assert w.journal is not None
        reply = make(554, "5.0.0", f"{verb} by the operator (uid {uid})")
        count = 0
        for tx, rec in record.recipients():
            if rec.final:
                continue
            rec.status, rec.reply, rec.host = RcptStatus.FAILED, reply, None
            rec.next_attempt_at, rec.decided_locally = None, True
            rec.reported = reported  # no report owed: none is ever written for it
            result = {**final_fields(rec), "reported": reported}
            w.journal.append(
                {
                    "t": "rcpt",
                    "id": record.id,
                    "tx": tx.number,
                    "rcpt": rec.address,
                    "result": result,
                }
            )
            count += 1
        await w.journal.commit()
        w.stats.failed += count
        return count

    async def _conclude(self, record: Record, uid: int, verb: str, *, keep: bool) -> None:
        w = self._w
        envelope_id = record.id
        record.state = State.DONE
        record.reason = f"{verb} by the operator (uid {uid})"
        record.location = f"done/{envelope_id}{SUFFIX}" if keep else ""
        record.updated_at = iso(datetime.now(UTC))
        await self._records.write(record, "done", durable=True)
        w.index.pop(envelope_id, None)
        w._hold_after.discard(envelope_id)
        self._records.finished(envelope_id)
        if not keep:  # the record says it is gone; a crash before this leaves it in done/
            await asyncio.to_thread(_unlink, w.spool.envelope("done", envelope_id))


def _unlink(path: os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(os.path.dirname(path))


class Reboot:
    """REBOOT: asked on the control channel, done by ``cli`` after the worker has stopped and
    released the spool (its lock, its sockets), so the new process takes them cleanly."""

    requested = False

    @classmethod
    def request(cls, stop: Callable[[], None], uid: int) -> None:
        """Drain (``stop``: the worker's or the supervisor's), then re-execute."""
        log.info("REBOOT by the operator (uid %d): draining, then re-executing", uid)
        sdnotify.reloading()  # systemd: the same pid says READY=1 again after the exec
        cls.requested = True
        stop()

    @classmethod
    def execute(cls) -> None:
        """Replace this process with the same command line (``sys.orig_argv``: the same
        interpreter options and ``-m`` or script); never returns."""
        argv = [sys.executable, *sys.orig_argv[1:]]
        log.info("re-executing: %s", " ".join(argv))
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, argv)
