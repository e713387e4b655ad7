"""Reports delivered by spoolsmtp itself (``bounces.requeue``, the default), as Postfix and Exim
deliver theirs: each report becomes an envelope of its own, from the null sender, queued in
deferred/ and due at once; a copy stays in bounces/ for the operator's tools.

A crash neither loses nor repeats one. The report's envelope id is chosen and committed to the
journal (``{"t": "requeue", "id", "kind", "as"}``) before its file is written; the report is
journaled as written (``{"t": "report"}``) only after the file is durable. A restart that finds
the id but not the report writes it again under the same id, unless an envelope of that id is
already queued (written before the crash, and picked up since): then it is only journaled.

A report that cannot be delivered has the null sender: its own failure goes to deadletter/
(a "double bounce"), never to anyone by mail, so no report ever causes a loop. Nor does a
report get a delay warning (fate.py): it would go nowhere but deadletter/ either.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from spoolsmtp.app import mailevents
from spoolsmtp.model.record import RcptRecord, Record, State, TxRecord, iso
from spoolsmtp.spool import crashpoint
from spoolsmtp.spool.folders import SUFFIX, new_id

if TYPE_CHECKING:
    from spoolsmtp.app.host import WorkerHost

# where an envelope of a given id may be once it was queued (rejected/ files carry the source
# name after the id, so they are looked for by the result record)
_QUEUED_IN = ("deferred", "active", "hold", "done")


class Requeue:
    """Queues reports as envelopes of their own; ``worker``: the assembly."""

    def __init__(self, worker: WorkerHost) -> None:
        self._w = worker

    async def queue(self, envelope_id: str, tag: str, recipient: str, data: bytes) -> str:
        """Queue the report envelope ``data`` (MAIL FROM:<>, to ``recipient``) about envelope
        ``envelope_id`` in deferred/, durably, under an id committed to the journal first;
        return that id. It is scheduled by ``due``, once the report itself is journaled."""
        w = self._w
        assert w.journal is not None
        known = w.journal.known(envelope_id)
        report_id = known.requeued.get(tag) if known is not None else None
        if report_id is None:
            report_id = new_id()
            await w._journal({"t": "requeue", "id": envelope_id, "kind": tag, "as": report_id})
        elif self._queued(report_id):
            return report_id
        crashpoint.reach("queueing_report")
        # the envelope before its record: a record found means the envelope was written
        await w.spool.write("deferred", f"{report_id}{SUFFIX}", data)
        now = iso(datetime.now(UTC))
        record = Record(
            report_id,
            f"{envelope_id}.{tag}{SUFFIX}",
            State.DEFERRED,
            now,
            now,
            f"deferred/{report_id}{SUFFIX}",
            [TxRecord(1, "", [RcptRecord(recipient)])],
        )
        await w.spool.write("results", f"{report_id}.json", record.to_json())
        w._summarise(record, State.DEFERRED, time.time())
        mailevents.report_queued(report_id, record.source, len(data))
        w._spool_trace(f"{envelope_id}: report {tag} queued as {report_id}")
        crashpoint.reach("queued_report")
        return report_id

    def due(self, report_id: str) -> None:
        """The report is journaled: deliver it now."""
        self._w.schedule(report_id, time.time())

    def _queued(self, report_id: str) -> bool:
        w = self._w
        if report_id in w.index or report_id in w._active:
            return True
        spool = w.spool
        return any(
            os.path.exists(spool.envelope(folder, report_id)) for folder in _QUEUED_IN
        ) or os.path.exists(spool.path("results", f"{report_id}.json"))
