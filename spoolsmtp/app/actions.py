"""The operator's actions on the queue (the control channel's HOLD, RELEASE, FLUSH, EXPIRE,
SUSPEND, RESUME, RELOAD; DELETE, BOUNCE and REBOOT in removal.py), as Postfix's postsuper and
postqueue do them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from spoolsmtp.app import reconfig, sdnotify
from spoolsmtp.app.removal import Reboot, Removal
from spoolsmtp.control.port import Reloaded
from spoolsmtp.model.config import Config
from spoolsmtp.model.config import load as config_load
from spoolsmtp.model.record import State, iso

if TYPE_CHECKING:
    from spoolsmtp.app.host import Summary, WorkerHost
    from spoolsmtp.app.records import Records
    from spoolsmtp.app.recovery import Recovery
    from spoolsmtp.app.scheduler import Scheduler

log = logging.getLogger("spoolsmtp")


class Actions:
    """What the operator may do; ``worker``: the assembly, for its index, its hold and
    dead-destination marks, its suspension and its config."""

    def __init__(
        self, worker: WorkerHost, records: Records, recovery: Recovery, scheduler: Scheduler
    ) -> None:
        self._w = worker
        self._records = records
        self._recovery = recovery
        self._scheduler = scheduler
        self._removal = Removal(worker, records, recovery, scheduler)

    async def hold(self, envelope_id: str) -> str:
        """Move a deferred envelope to hold/ (an active one goes there after its attempt)."""
        w = self._w
        summary = w.index.get(envelope_id)
        if summary is None:
            raise LookupError(f"no queued envelope {envelope_id}")
        if summary.state is State.HELD:
            return f"{envelope_id} is already held"
        if summary.state is State.ACTIVE:
            await self.hold_after(envelope_id, True)
            return f"{envelope_id} is being delivered; it will be held after this attempt"
        self._scheduler.unschedule(envelope_id)
        try:
            await w.spool.move(envelope_id, "deferred", "hold")
        except FileNotFoundError:
            await self.hold_after(envelope_id, True)
            return f"{envelope_id} is being delivered; it will be held after this attempt"
        await self._restate(envelope_id, State.HELD, "hold")
        summary.state, summary.next_attempt = State.HELD, None
        w._spool_trace(f"{envelope_id}: held by operator")
        return f"{envelope_id} held"

    async def hold_after(self, envelope_id: str, on: bool) -> None:
        """Hold an envelope being delivered once this attempt is over (or not, after all).
        Journaled while it is in flight here, so that a crash does not forget the operator's
        word: the attempt resumed after a restart ends held too (recovery.py)."""
        w = self._w
        if on:
            w._hold_after.add(envelope_id)
        else:
            w._hold_after.discard(envelope_id)
        if envelope_id in w._active:  # else the journal would keep the line for good
            await w._journal({"t": "hold", "id": envelope_id, "on": on})

    async def release(self, envelope_id: str) -> str:
        """Move a held envelope back to deferred/ and try it at once."""
        w = self._w
        summary = w.index.get(envelope_id)
        if summary is None:
            raise LookupError(f"no queued envelope {envelope_id}")
        if envelope_id in w._hold_after:
            await self.hold_after(envelope_id, False)
            return f"{envelope_id} will not be held after all"
        if summary.state is not State.HELD:
            return f"{envelope_id} is not held ({summary.state.value})"
        await w.spool.move(envelope_id, "hold", "deferred")
        await self._restate(envelope_id, State.DEFERRED, "deferred")
        summary.state = State.DEFERRED
        self._scheduler.schedule(envelope_id, time.time())
        w._spool_trace(f"{envelope_id}: released by operator")
        return f"{envelope_id} released"

    async def _restate(self, envelope_id: str, state: State, folder: str) -> None:
        record = self._w.spool.load_record(envelope_id)
        if record is not None:
            record.state = state
            record.location = self._w.spool.location(folder, envelope_id)
            record.updated_at = iso(datetime.now(UTC))
            await self._records.write(record)
            self._records.finished(envelope_id)

    def flush(self, envelope_id: str | None = None, destination: str | None = None) -> int:
        """Retry deferred envelopes now: one, those for a destination, or all."""
        w = self._w
        if envelope_id is not None and envelope_id not in w.index:
            raise LookupError(f"no queued envelope {envelope_id}")
        now = time.time()
        count = 0
        for summary in list(w.index.values()):
            if summary.state is not State.DEFERRED:
                continue
            if envelope_id is not None and summary.id != envelope_id:
                continue
            if destination is not None and not self._matches(summary, destination):
                continue
            self._scheduler.schedule(summary.id, now)
            count += 1
        if destination is not None:
            w._dead.pop(w._destination(destination).key, None)
        elif envelope_id is None:
            w._dead.clear()
        return count

    def _matches(self, summary: Summary, destination: str) -> bool:
        return self._w._destination(destination).key in summary.destinations

    def expire(self, domain: str) -> bool:
        """Forget cached DNS answers (and the dead-destination mark) for a domain: those of
        its destination (MX, or route host), its hosts' TLSA and its MTA-STS TXT records."""
        w = self._w
        dest = w._destination(domain)
        w._dead.pop(dest.key, None)
        return w.resolver.expire(dest)

    def suspend(self) -> None:
        self._w.suspended = True
        self._w._resumed.clear()

    def resume(self) -> None:
        self._w.suspended = False
        self._w._resumed.set()
        self._scheduler.wake()

    def reload(self, fresh: Callable[[Config], Config] | None = None) -> Reloaded:
        """Read the config file again and apply every key that can change while running; the
        others keep their value until a restart, and the answer names them (reconfig.py). A
        bad file raises ConfigError and changes nothing. ``fresh``: what the file says, made
        this process's (a supervisor's delivery process keeps its share of the limits)."""
        with sdnotify.reloading_now():
            return self._reload(fresh)

    def _reload(self, fresh: Callable[[Config], Config] | None) -> Reloaded:
        w = self._w
        loaded = config_load(w.cfg.source)
        plan = reconfig.plan(w.cfg, fresh(loaded) if fresh else loaded)
        w.deliverer.reconfigure(plan.config)  # first: unsafe secret files change nothing
        if plan.renew_resolver:
            resolver = reconfig.renewed_resolver(w.resolver, plan.config)
            w.resolver = w.deliverer.resolver = resolver
        w.cfg = plan.config
        w.disk.min_free_space = plan.config.spool.min_free_space
        w.disk.min_free_inodes = plan.config.spool.min_free_inodes
        log.info("%s", plan.done.summary)
        return plan.done

    async def remove(
        self, envelope_id: str, uid: int, *, report: bool, keep: bool, state: State
    ) -> str:
        """DELETE or BOUNCE asked by a supervisor, which knows where the envelope is queued."""
        return await self._removal.remove(envelope_id, uid, report=report, keep=keep, state=state)

    async def bounce(self, envelope_id: str, uid: int) -> str:
        return await self._removal.remove(envelope_id, uid, report=True, keep=True)

    async def delete(self, envelope_id: str, uid: int, *, report: bool) -> str:
        return await self._removal.remove(envelope_id, uid, report=report, keep=False)

    def reboot(self, uid: int) -> None:
        Reboot.request(self._w._stopping.set, uid)

    def dead_destinations(self) -> dict[str, float]:
        now = time.time()
        return {k: v for k, v in self._w._dead.items() if v > now}
