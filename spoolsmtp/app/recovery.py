"""Recovery: what the worker finds at start, and an envelope picked up again from what the
journal knows of it (a resume after a crash, a retry, an envelope put back).

An envelope found in active/ at start is an interrupted attempt: its record comes from the
journal (else the file, else the envelope), the journal's per-recipient results are applied so
no accepted recipient is sent again, and one that killed the worker ``QUARANTINE_AFTER`` times
while being read goes to rejected/ (quarantine.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from spoolsmtp.app import mailevents
from spoolsmtp.app.pickup import Pickup, utcnow
from spoolsmtp.app.records import Records
from spoolsmtp.model.envelope import Envelope
from spoolsmtp.model.record import Record, State, parse_iso
from spoolsmtp.spool import nodes, quarantine
from spoolsmtp.spool.folders import SUFFIX
from spoolsmtp.spool.journal import Replayed
from spoolsmtp.spool.quarantine import QUARANTINE_AFTER

if TYPE_CHECKING:
    from spoolsmtp.app.host import WorkerHost

log = logging.getLogger("spoolsmtp")


class Recovery:
    """Resumes envelopes from the journal and restores what a crash lost.

    ``worker``: the assembly, for what it shares and for the attempt and reports."""

    def __init__(self, worker: WorkerHost, records: Records, pickup: Pickup) -> None:
        self._w = worker
        self._records = records
        self._pickup = pickup

    async def open(
        self,
        envelope_id: str,
        fallback_source: str,
        journaled: Record | None = None,
        owner: tuple[int, int] | None = None,
    ) -> tuple[Envelope, Record, bytes | None] | None:
        """Read an envelope in active/ with its record (the journal's newest, else the file,
        else rebuilt from the envelope); None if rejected.

        The record is set to say ``active`` at once: a record left saying ``done`` or
        ``deferred`` while the envelope is being delivered again would mislead a polling job.
        """
        found = journaled or self._w.spool.load_record(envelope_id)
        source = found.source if found else fallback_source
        self._w._active[envelope_id] = source
        if found is not None and found.owner_uid is not None and found.owner_gid is not None:
            owner = (found.owner_uid, found.owner_gid)
        loaded = await self._pickup.read(envelope_id, source, owner)
        if loaded is None:
            return None
        env, data = loaded
        found = found or self._pickup.new_record(envelope_id, source, env)
        found.state = State.ACTIVE
        found.location = self._w.spool.location("active", envelope_id)
        return env, found, data

    @staticmethod
    def journaled(replayed: Replayed | None) -> Record | None:
        """The newest result record the journal holds of an envelope, if any."""
        return Record.from_dict(replayed.record) if replayed and replayed.record else None

    async def relocate(self, envelope_id: str, replayed: Replayed) -> None:
        """An envelope adopted from a dead node, in our active/ now and waiting for a slot:
        its record named the dead node's area, where the operator would find nothing. It
        says where it is from now on (the journal's results applied, as ``resume`` does)."""
        w = self._w
        found = self.journaled(replayed) or w.spool.load_record(envelope_id)
        here = w.spool.location("active", envelope_id)
        if found is None or found.location == here:
            return
        self.apply_journal(found, replayed)
        found.state = State.ACTIVE
        found.location = here
        await self._records.write(found)

    async def resume(self, envelope_id: str, replayed: Replayed) -> None:
        w = self._w
        try:
            journaled = self.journaled(replayed)
            fallback = replayed.source or f"{envelope_id}{SUFFIX}"
            assert w._reads is not None
            crashes = w._reads.crashes(envelope_id)
            if crashes > QUARANTINE_AFTER:
                # even the read for the reports killed it: quarantine it unread
                unread = journaled or self._w.spool.load_record(envelope_id)
                if unread is not None:
                    self.apply_journal(unread, replayed)
                await self._quarantine(envelope_id, unread, fallback, crashes)
                return
            opened = await self.open(envelope_id, fallback, journaled, replayed.owner)
            if opened is None:
                return
            env, rec, data = opened
            rec.crashes = crashes
            self.apply_journal(rec, replayed)
            if crashes == QUARANTINE_AFTER:
                await self._quarantine(envelope_id, rec, rec.source, crashes, env)
                return
            await self._records.write(rec)
            await self._pickup.batch_outputs(envelope_id, env, rec, replayed)
            if replayed.hold:  # the operator's HOLD while it was in flight holds still
                w._hold_after.add(envelope_id)
            await w._attempt(envelope_id, env, rec, data)
        except Exception as exc:
            w.scheduler.put_back(envelope_id, exc)
        finally:
            w._active.pop(envelope_id, None)

    async def _quarantine(
        self,
        envelope_id: str,
        rec: Record | None,
        source: str,
        crashes: int,
        env: Envelope | None = None,
    ) -> None:
        """Reading it killed the worker ``crashes`` times: fail what is left, tell the senders
        (if it could be read once more: ``env``), and move it to rejected/."""
        w = self._w
        if rec is not None:
            rec.crashes = crashes
            failed = quarantine.fail_unfinished(rec, crashes)
            w.stats.failed += len(failed)
            mailevents.failed_here(w, envelope_id, rec, failed)
            source = rec.source
        if rec is not None and env is not None:
            now = utcnow()
            await w._reports(envelope_id, env, rec, parse_iso(rec.received_at), now)
        w.stats.quarantined += 1
        reason = quarantine.reason(source, crashes, read=env is not None)
        await self._pickup.reject(envelope_id, source, reason, rec)

    def apply_journal(self, rec: Record, replayed: Replayed) -> None:
        for (tx, address), result in replayed.results.items():
            with contextlib.suppress(KeyError):
                rec.find(tx, address).update(result)
        for tx, address in replayed.dots:
            with contextlib.suppress(KeyError):
                rcpt = rec.find(tx, address)
                if not rcpt.final:
                    rcpt.possible_duplicate = True
                    self._w.stats.possible_duplicates += 1
        # a recipient's ``reported`` comes back with its result: it is journaled in the same
        # commit as the report that named it
        for kind in replayed.reports:
            if kind not in rec.reports:
                rec.reports.append(kind)

    def restore_records(self, replayed: dict[str, Replayed], active: set[str]) -> int:
        """Before anything else at start: put back every result record the journal holds
        that the file system lost or left stale (written after the last checkpoint, then a
        crash), unless, on a spool several nodes share, another node has moved the envelope
        on since. Envelopes still in active/ are not touched: resuming rewrites theirs."""
        spool = self._w.spool
        shared = spool.node != "" or len(nodes.present(spool.cfg)) > 1
        restored = 0
        for envelope_id, entry in replayed.items():
            if entry.record is None or envelope_id in active:
                continue
            path = spool.path("results", f"{envelope_id}.json")
            try:
                current = json.loads(path.read_bytes())
            except (OSError, ValueError):
                current = None
            if shared and isinstance(current, dict) and nodes.superseded(entry.record, current):
                continue  # another node has had it since
            if current != entry.record:
                spool.restore_record(envelope_id, Record.from_dict(entry.record).to_json())
                restored += 1
        if restored:
            spool.sync_results()
            log.warning("restored %d result record(s) from the journal", restored)
        return restored

    def load_deferred(self, known: Callable[[str], bool] | None = None) -> int:
        """Schedule the retry of every envelope in deferred/ (but those ``known``); how many."""
        w = self._w
        count = 0
        for envelope_id in w.spool.ids("deferred"):
            if known is not None and known(envelope_id):
                continue
            count += 1
            rec = self._w.spool.load_record(envelope_id)
            due = time.time()
            if rec is not None:
                due = rec.next_due(due)
                w._summarise(rec, State.DEFERRED, due)
            w.schedule(envelope_id, due)
        for envelope_id in w.spool.ids("hold"):
            rec = self._w.spool.load_record(envelope_id)
            if rec is not None:
                w._summarise(rec, State.HELD)
        return count
